//! Copies: which table a copy works down, picking the next jobs (tracks the
//! host reads first), finishing them, and clearing idle write intent.

use super::{Ticket, Volume};
use crate::core::geometry::Track;
use crate::core::plan::*;
use crate::core::state::VolumeState;
use crate::core::table::TrackTable;
use crate::core::Dev;
use std::sync::atomic::Ordering::SeqCst;

impl Volume {
    /// The table a copy works down in the current state, and its direction.
    pub(super) fn copy_source(&self) -> Option<(&TrackTable, Dev, Dev)> {
        match self.state() {
            VolumeState::Restoring => Some((&self.tables.pending, Dev::Secondary, Dev::Primary)),
            VolumeState::Syncing | VolumeState::Resyncing => {
                Some((&self.tables.stale, Dev::Primary, Dev::Secondary))
            }
            _ => None,
        }
    }

    /// Tracks still to copy by the running operation.
    pub fn copy_remaining(&self) -> u64 {
        self.copy_source().map_or(0, |(t, _, _)| t.count())
    }

    /// Picks up to `max` tracks to copy next and locks each exclusive:
    /// tracks the host is reading first, then onwards from where the last
    /// batch stopped. Tracks held by host writes are passed over for now.
    pub fn next_copies(&self, _t: &Ticket, max: usize) -> Vec<CopyJob> {
        let Some((table, from, to)) = self.copy_source() else {
            return Vec::new();
        };
        let mut jobs = Vec::new();
        let take = |t: Track, jobs: &mut Vec<CopyJob>| {
            if table.get(t) && self.locks.try_exclusive(t) {
                if table.get(t) {
                    let (offset, len) = self.geometry.track_extent(t);
                    jobs.push(CopyJob {
                        track: t,
                        from,
                        to,
                        offset,
                        len,
                    });
                } else {
                    self.locks.release_exclusive(t);
                    self.wake_progress();
                }
            }
        };
        while jobs.len() < max && self.hot_count.load(SeqCst) > 0 {
            let Some(t) = self.hot.next_one(0) else { break };
            if self.hot.clear(t) {
                self.hot_count.fetch_sub(1, SeqCst);
            }
            take(t, &mut jobs);
        }
        let start = self.copy_cursor.load(SeqCst);
        let mut cursor = start;
        let mut scanned = 0u64;
        while jobs.len() < max && scanned < self.geometry.tracks() {
            let Some(t) = table.next_set(cursor) else {
                break;
            };
            let step = if t >= cursor {
                t - cursor + 1
            } else {
                self.geometry.tracks() - cursor + t + 1
            };
            scanned += step;
            cursor = (t + 1) % self.geometry.tracks();
            if !jobs.iter().any(|j| j.track == t) {
                take(t, &mut jobs);
            }
        }
        self.copy_cursor.store(cursor, SeqCst);
        jobs.sort_by_key(|j| j.track);
        jobs
    }

    /// Ends a copy. Call only once the copied data is on the destination;
    /// the commit that records it flushes the destination first (see the
    /// metadata store), so "copied" is never durable before the data.
    pub fn finish_copy(&self, job: CopyJob, ok: bool) {
        self.end_copy(job, ok, false);
    }

    /// Ends a copy whose destination was flushed after its data was
    /// written (the copy engine does that, off the host's path, so that
    /// metadata commits during a restore need not flush the primary). The
    /// source still needs the commit's flush where host writes reach it
    /// (establish, resync: the primary); during a restore nothing writes
    /// the secondary (frozen since the restore's state change flushed it).
    pub fn finish_flushed_copy(&self, job: CopyJob, ok: bool) {
        self.end_copy(job, ok, true);
    }

    fn end_copy(&self, job: CopyJob, ok: bool, destination_flushed: bool) {
        if ok {
            if let Some((table, from, _)) = self.copy_source() {
                if from == job.from {
                    // Both ends: the copy may have read host writes still in
                    // the source's volatile cache; if the source lost them
                    // and the destination kept them, the devices would
                    // differ on a track recorded as identical.
                    let flush = match (destination_flushed, self.state()) {
                        (true, VolumeState::Restoring) => DevSet::NONE,
                        (true, _) if from == Dev::Primary => DevSet::PRIMARY,
                        (true, _) => DevSet::SECONDARY,
                        (false, _) => DevSet::BOTH,
                    };
                    self.need_flush(flush);
                    table.clear(job.track);
                }
            }
        }
        self.locks.release_exclusive(job.track);
        self.bump();
    }

    /// Devices whose data a metadata commit must flush before it writes:
    /// the destination of the running copy (its "copied" bits must never be
    /// durable before the data they describe).
    pub fn commit_flush_set(&self) -> DevSet {
        match self.state() {
            // Every clear of a pending bit comes with its own flush: a copy
            // flushed by the engine, a merge written with FUA, or
            // `need_flush` (full-track writes, skipped tracks). A commit
            // that carries only merges then writes metadata and nothing
            // else (see `finish_write`).
            VolumeState::Restoring => DevSet::NONE,
            VolumeState::Syncing | VolumeState::Resyncing => DevSet::SECONDARY,
            _ => DevSet::NONE,
        }
    }

    /// Clears write-intent bits of tracks with no write in flight; returns
    /// how many. Safe at any time: a writer sets its intent bit only while
    /// holding its track, and we clear only while holding it exclusive.
    /// Clears every idle track at once; the committer ages them instead
    /// ([`Self::age_intents`]).
    pub fn clear_idle_intents(&self) -> u64 {
        self.clear_intents_where(|_, _| true)
    }

    /// One aging pass of write intent (the committer runs one per commit
    /// interval, as md's bitmap daemon does): a region written since the
    /// last pass starts over; the idle tracks of a region that has gone
    /// more than `idle_passes` passes without a write are cleared (as
    /// [`Self::clear_idle_intents`]). So steady writes to a working set
    /// keep their bits set and durable and need no commit at all, while a
    /// region left alone is cleared a few intervals later and a crash does
    /// not resync it. Returns the bits cleared.
    pub fn age_intents(&self, idle_passes: u8) -> u64 {
        let mut ages = self.intent_age.lock().unwrap_or_else(|e| e.into_inner());
        if ages.is_empty() {
            ages.resize(self.geometry.tracks().div_ceil(64) as usize, 0);
        }
        let mut seen = None;
        let mut old = false;
        self.clear_intents_where(|t, _| {
            let region = t / 64;
            if seen != Some(region) {
                seen = Some(region);
                let age = &mut ages[region as usize];
                *age = if self.intent_recent.clear(region) {
                    0
                } else {
                    age.saturating_add(1)
                };
                old = *age > idle_passes;
            }
            old
        })
    }

    fn clear_intents_where(&self, mut idle_enough: impl FnMut(Track, &Self) -> bool) -> u64 {
        let mirrors = self.state().mirrors();
        let mut n = 0;
        let set: Vec<Track> = self.tables.intent.iter_set().collect();
        for t in set {
            if idle_enough(t, self) && self.locks.try_exclusive(t) {
                if mirrors {
                    // The writes under this bit completed but may sit in a
                    // volatile cache: both devices are flushed before the
                    // clear is committed, or a crash could leave them
                    // differing with no intent to resync them.
                    self.need_flush(DevSet::BOTH);
                    self.intent_unflushed.set(t);
                }
                // Outside a mirror the bit covers the primary-only writes
                // whose exact "changed" bit (set before they were issued)
                // is not durable yet: the commit that carries this clear
                // takes "changed" first (`TAKE_ORDER`), so it carries them.
                n += self.tables.intent.clear(t) as u64;
                self.locks.release_exclusive(t);
                self.wake_progress();
            }
        }
        n
    }
}
