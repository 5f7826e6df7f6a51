//! Admission: the gate a state change closes, and the tickets requests
//! and copy batches hold while they run.

use super::Volume;
use crate::core::geometry::Track;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

/// Admission of requests. A state change closes the gate, waits until the
/// requests already admitted have finished, changes tables and state, and
/// opens it again: no request ever sees a half-made transition.
#[derive(Default)]
pub(super) struct Gate {
    inflight: AtomicUsize,
    closed: AtomicBool,
}

/// Proof that a request (or a copy batch) was admitted; dropping it ends it.
pub struct Ticket<'a> {
    vol: &'a Volume,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let gate = &self.vol.gate;
        gate.inflight.fetch_sub(1, SeqCst);
        // A state change may be waiting for the last request to end.
        if gate.closed.load(SeqCst) {
            self.vol.wake_progress();
        }
    }
}

/// Why a request cannot proceed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A state change is under way; retry `enter` shortly.
    Transition,
    /// This track is locked by a copy or a merge; retry when it is released.
    Track(Track),
}

impl Volume {
    /// Admits a request, unless a state change is under way.
    pub fn enter(&self) -> Result<Ticket<'_>, Wait> {
        self.gate.inflight.fetch_add(1, SeqCst);
        if self.gate.closed.load(SeqCst) {
            self.gate.inflight.fetch_sub(1, SeqCst);
            return Err(Wait::Transition);
        }
        Ok(Ticket { vol: self })
    }

    /// Starts a state change: no new request is admitted. Returns false if
    /// another change holds the gate.
    pub fn close_gate(&self) -> bool {
        self.gate
            .closed
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_ok()
    }

    /// Whether every admitted request has finished (the gate must be closed).
    pub fn is_drained(&self) -> bool {
        self.gate.inflight.load(SeqCst) == 0
    }

    /// Whether a state change holds the gate (requests wait to enter).
    pub fn gate_closed(&self) -> bool {
        self.gate.closed.load(SeqCst)
    }

    pub fn open_gate(&self) {
        self.gate.closed.store(false, SeqCst);
        self.bump();
    }
}
