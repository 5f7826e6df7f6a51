//! Read repair and `verify`: locking a track exclusive only while the
//! tables say primary and secondary hold the same data there.

use super::{Tables, Ticket, Volume};
use crate::core::geometry::Track;
use crate::core::plan::*;
use crate::core::state::VolumeState;
use std::sync::atomic::Ordering::SeqCst;

impl Volume {
    /// For a host read the primary failed: locks track `t` exclusive if the
    /// secondary's copy is known identical to what the primary should hold
    /// (no table marks it: not changed since the split, not pending, not
    /// stale; the secondary not split off after a failure), so that it can
    /// be served from the secondary and rewritten on the primary, as md
    /// raid1 does. A write-intent bit does not matter: under the exclusive
    /// lock no mirror write is in flight, and a failed one marked the track
    /// stale. Release with [`Self::unlock_repair`].
    pub fn lock_for_repair(&self, _t: &Ticket, t: Track) -> RepairLock {
        let identical = |v: &Self| {
            v.state() != VolumeState::Degraded
                && !v.tables.changed.get(t)
                && !v.tables.pending.get(t)
                && !v.tables.stale.get(t)
        };
        if !identical(self) {
            return RepairLock::NotIdentical;
        }
        if !self.locks.try_exclusive(t) {
            return RepairLock::Busy;
        }
        if !identical(self) {
            self.unlock_repair(t);
            return RepairLock::NotIdentical;
        }
        RepairLock::Locked
    }

    pub fn unlock_repair(&self, t: Track) {
        self.locks.release_exclusive(t);
        self.bump();
    }

    /// Counts a primary track rewritten from the secondary.
    pub fn note_read_repair(&self) {
        self.read_repairs.fetch_add(1, SeqCst);
    }

    /// Primary read errors repaired from the secondary since start.
    pub fn read_repairs(&self) -> u64 {
        self.read_repairs.load(SeqCst)
    }

    // ---- verify ---------------------------------------------------------

    /// For `verify`: locks track `t` exclusive if no table says primary and
    /// secondary may differ there, so that no write or copy changes either
    /// copy while the two are compared. Release with [`Self::unlock_identical`].
    pub fn lock_identical(&self, _t: &Ticket, t: Track) -> VerifyLock {
        let marked = |tables: &Tables| tables.all().iter().any(|table| table.get(t));
        if marked(&self.tables) {
            return VerifyLock::NotIdentical;
        }
        if !self.locks.try_exclusive(t) {
            return VerifyLock::Busy;
        }
        // A write may have marked the track between the check and the lock.
        if marked(&self.tables) {
            self.locks.release_exclusive(t);
            self.bump();
            return VerifyLock::NotIdentical;
        }
        VerifyLock::Locked
    }

    pub fn unlock_identical(&self, t: Track) {
        self.locks.release_exclusive(t);
        self.bump();
    }
}

/// Whether `verify` may compare a track now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLock {
    /// A table marks the track as possibly different: not compared.
    NotIdentical,
    /// A write or copy holds the track; try again shortly.
    Busy,
    /// Locked; compare, then `unlock_identical`.
    Locked,
}
