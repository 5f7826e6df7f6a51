//! The control socket: a JSON-lines protocol over a root-only Unix socket.
//! [`serve`] runs in the server, [`client`] in the CLI.
//! (Skeleton: types and signatures are the contract between the server and
//! the CLI; bodies are filled in by the control work.)

use crate::core::Command;
use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// `status --json`, field for field as `../shared/interface.md` gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub device: Option<String>,
    pub state: String,
    pub track_size: u64,
    pub tracks: u64,
    pub changed_since_split: u64,
    pub restore_pending: u64,
    pub secondary_stale: u64,
    pub operation: Option<OperationStatus>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationStatus {
    /// "restore" | "establish" | "resync"
    pub kind: String,
    pub incremental: bool,
    pub protect: bool,
    pub total: u64,
    pub done: u64,
    pub percent: f64,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<f64>,
}

/// Result of `verify`: tracks the tables say are identical, compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub compared: u64,
    pub mismatches: Vec<u64>,
}

/// What the server offers the control socket.
pub trait ControlTarget: Send + Sync {
    fn status(&self) -> Status;
    /// Starts `cmd`; returns once host I/O sees its effect (for restore: the
    /// split image). Wrong state → `Error::State`.
    fn command(&self, cmd: Command) -> Result<()>;
    /// Compares primary and secondary on every track the tables say is
    /// identical, each track locked while compared, throttled.
    fn verify(&self) -> Result<VerifyReport>;
}

/// A running control listener; dropping or `stop` removes the socket.
pub struct ControlServer {
    _private: (),
}

impl ControlServer {
    pub fn stop(self) {}
}

/// Binds `socket` (directory 0700, socket 0600, root-only peers) and serves
/// requests on a thread of its own.
pub fn serve(_socket: &Path, _target: Arc<dyn ControlTarget>) -> Result<ControlServer> {
    todo!("control::serve")
}

pub mod client {
    use super::*;
    /// One request/response round trip.
    pub fn status(_socket: &Path) -> Result<Status> {
        todo!("client::status")
    }
    pub fn command(_socket: &Path, _cmd: Command) -> Result<()> {
        todo!("client::command")
    }
    pub fn verify(_socket: &Path) -> Result<VerifyReport> {
        todo!("client::verify")
    }
}
