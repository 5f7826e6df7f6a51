//! Per-track locks. Host writes hold a track *shared* while their data is
//! in flight; a copy or a merge holds it *exclusive*. So a copy never races
//! a host write on the same track (claim 3), while host writes to one track
//! still run in parallel with each other and with copies of other tracks.
//!
//! A mirrored host write also holds the byte range it writes in the track:
//! two mirrored writes whose ranges overlap never run at once. The block
//! layer gives no order to overlapping writes in flight together, so
//! either result is right for the host, but the primary and the secondary
//! could each complete them in a different order and end up different
//! (md raid1 has `serialize_policy` for this; here it is always on). Only
//! overlapping writes in flight at once wait, which filesystems and
//! databases rarely issue.
//!
//! Nothing here blocks: a failed attempt tells the caller which track to
//! wait for, and the caller waits in its own executor.
//!
//! # Memory in proportion to what is in flight
//!
//! Only tracks held right now have an entry: at most the queues' depth
//! (a request holds each track it spans) plus the copies in flight. A lock
//! word per track would cost 4 bytes per track of the volume as soon as
//! each track has been written once (256 MiB at 8 TiB with 128 KiB tracks).
//! The entries are spread over shards by track number, so neighbouring
//! tracks (one request's span) and the queue threads rarely meet on one
//! shard's mutex; each shard holds a handful of entries and is searched
//! linearly, which beats hashing at that size. A shard's mutex is held for
//! a few instructions only, never while waiting for a track.

use super::geometry::Track;
use std::sync::{Mutex, MutexGuard};

const EXCLUSIVE: u32 = 1 << 31;
/// A power of two; more than the queue threads plus the copy engine.
const SHARDS: usize = 64;

/// The held tracks of one shard: (track, holders), holders being a count
/// of shared holders or [`EXCLUSIVE`]. Tracks not listed are free.
#[derive(Default)]
struct Shard {
    held: Vec<(Track, u32)>,
    /// Byte ranges in flight of mirrored writes: (track, start, end) with
    /// start and end relative to the track; their tracks are held shared.
    mirrored: Vec<(Track, u32, u32)>,
}

impl Shard {
    fn find(&self, t: Track) -> Option<usize> {
        self.held.iter().position(|&(track, _)| track == t)
    }

    /// One more shared holder of `t`, unless it is held exclusive.
    fn add_shared(&mut self, t: Track) -> bool {
        match self.find(t) {
            None => self.held.push((t, 1)),
            Some(i) if self.held[i].1 & EXCLUSIVE != 0 => return false,
            Some(i) => self.held[i].1 += 1,
        }
        true
    }

    fn drop_shared(&mut self, t: Track) {
        let i = self.find(t);
        debug_assert!(
            i.is_some_and(|i| self.held[i].1 & EXCLUSIVE == 0),
            "release of an unheld shared lock"
        );
        if let Some(i) = i {
            self.held[i].1 -= 1;
            if self.held[i].1 == 0 {
                self.held.swap_remove(i);
            }
        }
    }
}

pub struct TrackLocks {
    shards: Box<[Mutex<Shard>]>,
}

impl TrackLocks {
    /// Locks for a volume of `tracks` tracks; costs the same at any size.
    pub fn new(_tracks: u64) -> Self {
        TrackLocks {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, t: Track) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard cannot leave it half-changed (each
        // change is one push, store or swap_remove), so poison is ignored.
        self.shards[t as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Who holds track `t` now: 0 (free), a count of shared holders, or
    /// the exclusive mark. A waiter for `t` compares two readings: a
    /// change means a holder left or came.
    pub fn holders(&self, t: Track) -> u32 {
        let shard = self.shard(t);
        shard.find(t).map_or(0, |i| shard.held[i].1)
    }

    pub fn try_shared(&self, t: Track) -> bool {
        self.shard(t).add_shared(t)
    }

    pub fn release_shared(&self, t: Track) {
        self.shard(t).drop_shared(t)
    }

    /// A shared hold of `t` for a mirrored write of `start..end` (bytes in
    /// the track); fails while the track is held exclusive or another
    /// mirrored write of an overlapping range is in flight.
    pub fn try_mirrored(&self, t: Track, start: u32, end: u32) -> bool {
        let mut shard = self.shard(t);
        let overlaps = shard
            .mirrored
            .iter()
            .any(|&(track, s, e)| track == t && s < end && start < e);
        if overlaps || !shard.add_shared(t) {
            return false;
        }
        shard.mirrored.push((t, start, end));
        true
    }

    pub fn release_mirrored(&self, t: Track, start: u32, end: u32) {
        let mut shard = self.shard(t);
        let i = shard.mirrored.iter().position(|&r| r == (t, start, end));
        debug_assert!(i.is_some(), "release of an unheld mirrored range");
        if let Some(i) = i {
            shard.mirrored.swap_remove(i);
        }
        shard.drop_shared(t);
    }

    pub fn try_exclusive(&self, t: Track) -> bool {
        let mut shard = self.shard(t);
        if shard.find(t).is_some() {
            return false;
        }
        shard.held.push((t, EXCLUSIVE));
        true
    }

    pub fn release_exclusive(&self, t: Track) {
        let mut shard = self.shard(t);
        let i = shard.find(t);
        debug_assert!(
            i.is_some_and(|i| shard.held[i].1 == EXCLUSIVE),
            "release of an unheld exclusive lock"
        );
        if let Some(i) = i {
            shard.held.swap_remove(i);
        }
    }

    pub fn is_free(&self, t: Track) -> bool {
        self.shard(t).find(t).is_none()
    }

    /// Tracks held now (for tests and memory accounting).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).held.len())
            .sum()
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

    #[test]
    fn tracks_sharing_a_shard_lock_independently() {
        // Claim 3 at the lock level: a held track blocks only itself, also
        // when other tracks land in the same shard.
        let l = TrackLocks::new(1 << 40);
        let same_shard = [3, 3 + SHARDS as u64, 3 + 1000 * SHARDS as u64];
        assert!(l.try_exclusive(same_shard[0]));
        assert!(l.try_shared(same_shard[1]));
        assert!(l.try_exclusive(same_shard[2]));
        assert!(!l.try_shared(same_shard[0]));
        assert!(!l.try_exclusive(same_shard[1]));
        l.release_exclusive(same_shard[0]);
        assert!(l.try_shared(same_shard[0]));
        assert!(!l.is_free(same_shard[2]));
        assert!(l.is_free(same_shard[2] + 1));
    }

    #[test]
    fn overlapping_mirrored_ranges_exclude_each_other_and_nothing_else() {
        let l = TrackLocks::new(4);
        assert!(l.try_mirrored(1, 0, 4096));
        assert!(l.try_mirrored(1, 4096, 8192), "adjacent ranges run at once");
        assert!(!l.try_mirrored(1, 4095, 4097), "an overlapping one waits");
        assert!(l.try_mirrored(2, 0, 4096), "other tracks are independent");
        assert!(l.try_shared(1), "unmirrored shared holds are not ranges");
        assert!(!l.try_exclusive(1));
        let before = l.holders(1);
        l.release_mirrored(1, 0, 4096);
        assert_ne!(l.holders(1), before, "a waiter sees the release");
        assert!(l.try_mirrored(1, 0, 4096), "free again once released");
        l.release_mirrored(1, 0, 4096);
        l.release_mirrored(1, 4096, 8192);
        l.release_shared(1);
        l.release_mirrored(2, 0, 4096);
        assert_eq!(l.held(), 0);
        assert!(l.try_exclusive(1));
        assert!(!l.try_mirrored(1, 0, 512), "a copy or merge excludes it");
    }

    #[test]
    fn only_held_tracks_cost_an_entry() {
        // A lock per track would allocate 4 bytes for each of 2^40 tracks.
        let l = TrackLocks::new(1 << 40);
        for t in (0..1000u64).map(|i| i * 1_000_003) {
            assert!(l.try_shared(t));
            assert!(l.try_shared(t));
        }
        assert_eq!(l.held(), 1000);
        for t in (0..1000u64).map(|i| i * 1_000_003) {
            l.release_shared(t);
            assert!(!l.is_free(t));
            l.release_shared(t);
            assert!(l.is_free(t));
        }
        assert_eq!(l.held(), 0);
    }
}
