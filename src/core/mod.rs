//! The core: tracks, volume states and the restore rules, with no I/O.
//!
//! Nothing here touches a file, socket, ring, clock or thread. Executors
//! (the ublk queues, the copy engine, the metadata store, the simulation)
//! ask the core *what to do* and report back *what happened*.
//!
//! # Track state
//!
//! Each track has one bit in each persistent table, and a lock while held:
//!
//! | table     | set means                                            | set by            | cleared by |
//! |-----------|------------------------------------------------------|-------------------|------------|
//! | `changed` | primary differs from the frozen secondary            | split-mode writes, writes during a restore | establish, restore start |
//! | `pending` | restore pending: primary invalid, secondary valid (claim 4) | restore start (claims 10, 11) | copy, full write (5), merge (6) |
//! | `stale`   | secondary must be copied from primary                | establish, restore end, crash recovery | copy |
//! | `intent`  | a mirror write may be in flight; outside a mirror, a primary write whose exact `changed` bit may not be durable yet (per region of 64 tracks) | host writes | lazily when idle; leaving a state without a mirror |
//!
//! Lock: *shared* while host writes to the track are in flight, *exclusive*
//! while a copy or a merge runs on it. During a restore every track is
//! either pending (its data is wholly on the secondary) or restored (wholly
//! on the primary), never mixed; that invariant keeps the rules small.
//!
//! # What each request does
//!
//! | state        | read                          | write to a track                                          | flush |
//! |--------------|-------------------------------|-----------------------------------------------------------|-------|
//! | established  | primary                       | both devices, intent durable first                        | both  |
//! | syncing, resyncing | primary                 | stale: primary only; else both, intent durable first      | both  |
//! | split, degraded | primary                    | primary, `changed` set, its region's intent durable first | primary |
//! | restoring    | pending: secondary; else primary | pending+full: primary, then restored (5); pending+partial: merge secondary track + host bytes → primary, then restored (6, 8, 9); restored: primary, `changed` set, its region's intent and its restored bit durable first (7) | primary |
//!
//! A discard or write-zeroes is a write of zeros under the same rules
//! (`Volume::plan_zero`): the range reads back as zeros on every device
//! the state writes, so the mirror stays byte-identical.
//!
//! The secondary is never written while restoring (claim 1A). Writes to a
//! track locked exclusive wait for that track only (claim 3); reads never
//! wait. A write that restores a track is acknowledged only once a restart
//! would find the track restored: after a restore log record (see
//! `restore_log`; a power cut voids it, and a host flush waits for the
//! commit that makes the bit durable), or without the log after that
//! commit.
//!
//! # Copies
//!
//! Restoring copies pending tracks secondary→primary; syncing and resyncing
//! copy stale tracks primary→secondary. Tracks the host reads go first.
//! When nothing is left, restoring moves to resyncing with `stale = changed`
//! (claims 1E, 2), or to split with a protected restore; syncing and
//! resyncing move to established.

pub(crate) mod bitmap;
pub(crate) mod commit;
pub(crate) mod geometry;
pub(crate) mod locks;
pub(crate) mod plan;
pub(crate) mod restore_log;
pub(crate) mod state;
pub(crate) mod table;
pub(crate) mod volume;
pub mod wake;

pub use commit::{CommitSeq, CommitTake, CommitWaiter};
pub use geometry::{Geometry, Track, TrackSpan};
pub use plan::*;
pub use restore_log::RecordSeq;
pub use state::{Command, Operation, OperationKind, TransitionError, VolumeState};
pub use table::{TrackTable, CHUNK_WORDS};
pub use volume::{AheadGuard, TableCounts, TableId, Ticket, VerifyLock, Volume, Wait};
