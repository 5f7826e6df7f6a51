//! Executors: they run the core's plans and report back what happened.
//!
//! Nothing here decides a rule. A host request asks [`crate::core`] for a
//! plan and performs its steps ([`host`]); the copy engine asks which tracks
//! to copy and copies them ([`engine`]); `verify` compares the two sides
//! where the core says they are identical. Both reach the devices only through
//! a [`crate::backend`].

pub mod engine;
pub mod host;
pub mod load;
pub mod pace;
pub(crate) mod verify;
