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
            // The state change may have seen this request's count and
            // gone to sleep until the count drops to zero: a refusal that
            // drops it last must wake it, as a finished request does.
            if self.gate.inflight.fetch_sub(1, SeqCst) == 1 {
                self.wake_progress();
            }
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

#[cfg(test)]
mod tests {
    use crate::core::{Geometry, Volume, VolumeState};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use std::time::Duration;

    /// Unparks the thread that waits, and says it was woken.
    struct Unpark(std::thread::Thread, AtomicBool);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.1.store(true, SeqCst);
            self.0.unpark();
        }
    }

    /// A state change waits (woken, not polling) for the admitted requests
    /// to drain while other threads keep trying to enter and are refused.
    /// A refusal can be the last to drop the count the change saw: it must
    /// wake the change, or the gate stays closed and all host I/O hangs
    /// (seen as a mount that never returned after a restart mid-restore).
    #[test]
    fn a_refused_request_that_drains_the_gate_wakes_the_state_change() {
        let vol = Arc::new(Volume::new(
            Geometry::new(64 << 20, 64 << 10).unwrap(),
            VolumeState::Split,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let entering: Vec<_> = (0..2)
            .map(|_| {
                let (vol, stop) = (vol.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        if let Ok(t) = vol.enter() {
                            drop(t);
                        }
                    }
                })
            })
            .collect();
        let (mut waits, lost) = (AtomicU64::new(0), AtomicU64::new(0));
        // Until the change has had to wait often enough (the entering
        // threads may get little CPU on a loaded machine).
        let started = std::time::Instant::now();
        while *waits.get_mut() < 2000 && started.elapsed() < Duration::from_secs(20) {
            while !vol.close_gate() {}
            let w = Arc::new(Unpark(std::thread::current(), AtomicBool::new(false)));
            vol.progress_wakes().register(&Waker::from(w.clone()));
            if !vol.is_drained() {
                *waits.get_mut() += 1;
                // The refused requests leave at once; a wake-up that has
                // not come a second later never will.
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while !w.1.load(SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                if !w.1.load(SeqCst) {
                    lost.fetch_add(1, SeqCst);
                }
            }
            vol.open_gate();
            if lost.load(SeqCst) > 0 {
                break;
            }
        }
        stop.store(true, SeqCst);
        entering.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(
            lost.load(SeqCst),
            0,
            "a drained gate never woke its state change"
        );
        assert!(*waits.get_mut() > 0, "the race was never even tried");
    }
}
