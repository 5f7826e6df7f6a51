//! Per-track locks. Host writes hold a track *shared* while their data is
//! in flight; a copy or a merge holds it *exclusive*. So a copy never races
//! a host write on the same track (claim 3), while host writes to one track
//! still run in parallel with each other and with copies of other tracks.
//!
//! Nothing here blocks: a failed attempt tells the caller which track to
//! wait for, and the caller waits in its own executor.

use super::geometry::Track;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

const EXCLUSIVE: u32 = 1 << 31;

pub struct TrackLocks {
    words: Box<[AtomicU32]>,
}

impl TrackLocks {
    pub fn new(tracks: u64) -> Self {
        let words = Box::<[AtomicU32]>::new_zeroed_slice(tracks as usize);
        // SAFETY: an all-zero AtomicU32 is a valid 0 (unlocked).
        TrackLocks {
            words: unsafe { words.assume_init() },
        }
    }

    pub fn try_shared(&self, t: Track) -> bool {
        let w = &self.words[t as usize];
        if w.fetch_add(1, SeqCst) & EXCLUSIVE != 0 {
            w.fetch_sub(1, SeqCst);
            return false;
        }
        true
    }

    pub fn release_shared(&self, t: Track) {
        let prev = self.words[t as usize].fetch_sub(1, SeqCst);
        debug_assert!(prev & !EXCLUSIVE != 0, "release of an unheld shared lock");
    }

    pub fn try_exclusive(&self, t: Track) -> bool {
        self.words[t as usize]
            .compare_exchange(0, EXCLUSIVE, SeqCst, SeqCst)
            .is_ok()
    }

    pub fn release_exclusive(&self, t: Track) {
        let prev = self.words[t as usize].fetch_and(!EXCLUSIVE, SeqCst);
        debug_assert!(prev & EXCLUSIVE != 0, "release of an unheld exclusive lock");
    }

    pub fn is_free(&self, t: Track) -> bool {
        self.words[t as usize].load(SeqCst) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_and_vice_versa() {
        let l = TrackLocks::new(4);
        assert!(l.try_shared(1));
        assert!(l.try_shared(1));
        assert!(!l.try_exclusive(1));
        l.release_shared(1);
        l.release_shared(1);
        assert!(l.try_exclusive(1));
        assert!(!l.try_shared(1));
        l.release_exclusive(1);
        assert!(l.is_free(1));
    }
}
