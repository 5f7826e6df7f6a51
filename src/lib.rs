//! splitmirror: a ublk server that presents a primary and a secondary device
//! as one block device with mirror, split and instant restore.
//!
//! The folders are the layers, from the inside out:
//! - [`core`]: the pure state machine (tracks, volume states, the restore
//!   rules). It performs no I/O; it answers *what to read, write, wait for*.
//! - [`exec`]: the executors of the core's plans: host requests
//!   ([`exec::host`]) and the copy engine ([`exec::engine`]).
//! - [`backend`]: where the executors' reads, writes and flushes go: the
//!   standalone io_uring ([`backend::uring`]), blocking I/O, the simulation,
//!   and opening the devices. The ublk queue's own ring is in [`ublk`].
//! - [`metadata`]: persists the track tables crash-consistently.
//! - [`ublk`]: the block device (add, recover, delete) and its queue loop.
//! - [`edge`]: what users touch: command line, config, control socket,
//!   metrics, and the server that wires everything together.

pub mod backend;
pub mod core;
pub mod edge;
pub mod error;
pub mod exec;
pub mod metadata;
pub(crate) mod ublk;
