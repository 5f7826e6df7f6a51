//! Backends: where the executors' reads, writes and flushes go.
//!
//! Every backend implements [`Backend`] (defined with the host path, which
//! is its main user): the standalone io_uring ([`uring`]) for the copy
//! engine, the crash soak and the benches; plain blocking I/O
//! ([`blocking`]) for `format` and `verify`; the deterministic simulation
//! ([`sim`], built only for tests and with the `sim` feature). The ublk
//! queue's own ring lives with the queue loop in [`crate::ublk`].
//! [`device`] opens the primary and secondary and checks their layout.

pub use crate::exec::host::Backend;

pub(crate) mod blocking;
pub(crate) mod device;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod uring;
