//! `splitmirror run` and `format`: opens the devices and the metadata, and
//! wires the core to its executors (ublk queues, copy engine, committer,
//! control socket). (Skeleton: signatures are the contract with the CLI.)

use crate::config::Config;
use crate::error::Result;

/// `splitmirror format`: writes fresh metadata for the configured devices.
pub fn format(_cfg: &Config, _assume_clean: bool, _force: bool) -> Result<()> {
    todo!("server::format")
}

/// `splitmirror run`: serves the device until SIGINT/SIGTERM.
pub fn run(_cfg: &Config) -> Result<()> {
    todo!("server::run")
}
