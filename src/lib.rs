//! splitmirror: a ublk server that presents a primary and a secondary device
//! as one block device with mirror, split and instant restore.
//!
//! Architecture: [`core`] is a pure state machine (tracks, volume states and
//! the restore rules) that performs no I/O. Everything else is a thin
//! executor around it:
//! - [`hostpath`] runs host requests (read/write/flush) through the core's
//!   plans against any [`hostpath::Backend`] (a ublk queue's ring, or
//!   [`uring::UringBackend`] for the engine, the crash soak and the benches);
//! - [`engine`] copies tracks (restore, establish, resync);
//! - [`metadata`] persists the track tables crash-consistently;
//! - [`ublk`] creates the block device with libublk;
//! - [`control`] is the Unix-socket control protocol (server and client);
//! - [`config`], [`device`] and [`cli`] are the user-facing edges.

pub mod blocking;
pub mod cli;
pub mod config;
pub mod control;
pub mod core;
pub mod device;
pub mod engine;
pub mod error;
pub mod hostpath;
pub mod metadata;
pub mod metrics;
pub mod server;
pub mod sim;
pub mod ublk;
pub mod uring;
