//! The edges: what users and other programs touch.
//!
//! The command line ([`cli`]), the config file ([`config`]), the control
//! socket ([`control`]), the metrics endpoint ([`metrics`]) and the server
//! that wires the core, executors, backends and metadata together
//! ([`server`]). No rule of the restore lives here.

pub mod cli;
pub mod config;
pub mod control;
pub mod events;
pub mod fleet;
pub mod live;
pub(crate) mod metrics;
pub(crate) mod server;
pub mod splittime;
