//! Group commit bookkeeping: which metadata commit a request must wait for.
//!
//! The metadata store numbers its commits. A request whose track bit is
//! unsynced must wait for a commit that *starts* after it looked (its bit
//! may have missed the snapshot of the one in progress); a request whose bit
//! is synced but may have been taken by the commit in progress waits for
//! that one. A request whose bits are all durable waits for nothing: that is
//! what keeps the common write free of metadata I/O.

use super::geometry::Track;
use super::plan::DevSet;
use super::state::{Operation, VolumeState};
use super::table::{Taken, TrackTable, CHUNK_WORDS, TAKEN_UNKNOWN};
use super::volume::Volume;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Number of a metadata commit; commit `n` is durable once `done >= n`.
pub type CommitSeq = u64;

#[derive(Default)]
pub struct CommitClock {
    started: AtomicU64,
    done: AtomicU64,
    /// Host requests waiting for a commit now. The copy engine holds back
    /// new copies meanwhile: a commit flushes the data devices, and every
    /// copy issued before the flush is data the flush must write back.
    waiters: AtomicU64,
}

/// A request waiting for a commit (see [`CommitClock::waiters`]).
pub struct CommitWaiter<'a>(&'a CommitClock);

impl Drop for CommitWaiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

impl CommitClock {
    /// Called by the store as a commit starts, before it takes any chunk.
    pub fn begin(&self) -> CommitSeq {
        self.started.fetch_add(1, SeqCst) + 1
    }

    /// Called by the store once commit `seq` is durable.
    pub fn finish(&self, seq: CommitSeq) {
        self.done.fetch_max(seq, SeqCst);
    }

    /// Restarts the numbering after the metadata was loaded.
    pub fn reset(&self, seq: CommitSeq) {
        self.started.store(seq, SeqCst);
        self.done.store(seq, SeqCst);
    }

    /// Registers a host request that waits for a commit until dropped.
    pub fn wait_guard(&self) -> CommitWaiter<'_> {
        self.waiters.fetch_add(1, SeqCst);
        CommitWaiter(self)
    }

    /// Host requests waiting for a commit now.
    pub fn waiters(&self) -> u64 {
        self.waiters.load(SeqCst)
    }

    pub fn done(&self) -> CommitSeq {
        self.done.load(SeqCst)
    }

    pub fn is_durable(&self, seq: CommitSeq) -> bool {
        self.done() >= seq
    }

    /// The commit after which `table[t]` is durable as it is now, if any.
    pub fn needed_for(&self, table: &TrackTable, t: Track) -> Option<CommitSeq> {
        let unsynced = table.is_unsynced(t);
        let started = self.started.load(SeqCst);
        if unsynced {
            return Some(started + 1);
        }
        // Synced: durable once the commit that took it is.
        match table.taken_by(t) {
            TAKEN_UNKNOWN => (started > self.done()).then_some(started),
            seq => (seq > self.done()).then_some(seq),
        }
    }

    /// The commit that makes everything changed up to now durable.
    pub fn next(&self) -> CommitSeq {
        self.started.load(SeqCst) + 1
    }
}

/// Tables (by index in `Tables::all`) in the order a commit takes them:
/// "pending" before "changed", because a track restored by a host write
/// gets "changed" set before "pending" is cleared, and no commit may record
/// it as neither.
pub const TAKE_ORDER: [usize; 4] = [1, 0, 2, 3];

/// One table chunk a commit carries: `words`, or None when every bit of it
/// is set (the store records that as a flag, not a page).
pub type TakenChunk = (usize, usize, Option<Vec<u64>>);

/// The in-memory half of one metadata commit: everything it must make
/// durable, taken from the volume in one step. The store encodes and
/// writes it; the simulation just finishes it.
#[derive(Debug)]
pub struct CommitTake {
    pub seq: CommitSeq,
    pub state: VolumeState,
    pub operation: Option<Operation>,
    /// (table, chunk, words) for every chunk changed since the last take.
    pub chunks: Vec<TakenChunk>,
    /// The data devices to flush before the commit records anything.
    pub flush: DevSet,
}

impl Volume {
    /// Numbers the next commit and takes what it carries: the state, the
    /// operation and the dirty chunks under the snapshot lock (a state
    /// change is taken whole or not at all), then the flush set (after the
    /// chunks, so the flush covers every copy they record: see
    /// `Volume::take_flush_set`).
    pub fn take_commit(&self) -> CommitTake {
        let snapshot = self.lock_snapshot();
        let seq = self.clock.begin();
        self.take_header_dirty();
        let (state, operation) = (self.state(), self.operation());
        let tables = self.tables.all();
        let mut chunks = Vec::new();
        let mut words = vec![0u64; CHUNK_WORDS];
        for t in TAKE_ORDER {
            for c in 0..tables[t].chunks() {
                match tables[t].take_dirty_chunk_for(c, &mut words, seq) {
                    Taken::Clean => {}
                    Taken::Ones => chunks.push((t, c, None)),
                    Taken::Words => chunks.push((t, c, Some(words.clone()))),
                }
            }
        }
        drop(snapshot);
        let flush = self.take_flush_set().union(self.commit_flush_set());
        CommitTake {
            seq,
            state,
            operation,
            chunks,
            flush,
        }
    }

    /// A commit failed: what it took is carried by the next one (its
    /// sequence number stays unfinished).
    pub fn requeue_commit(&self, take: &CommitTake) {
        let tables = self.tables.all();
        for (t, c, _) in &take.chunks {
            tables[*t].mark_chunk_dirty(*c);
        }
        self.mark_header_dirty();
        self.need_flush(take.flush);
    }
}

/// The later of two optional commit requirements.
pub fn later(a: Option<CommitSeq>, b: Option<CommitSeq>) -> Option<CommitSeq> {
    a.max(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::{Taken, CHUNK_WORDS};

    #[test]
    fn a_synced_bit_waits_only_for_the_commit_that_carried_its_word() {
        let clock = CommitClock::default();
        let table = TrackTable::new(1000);
        let mut buf = vec![0u64; CHUNK_WORDS];
        assert_eq!(clock.needed_for(&table, 5), None);
        table.set(5);
        assert_eq!(
            clock.needed_for(&table, 5),
            Some(1),
            "unsynced: the next commit"
        );
        let seq = clock.begin();
        assert_eq!(table.take_dirty_chunk_for(0, &mut buf, seq), Taken::Words);
        assert_eq!(
            clock.needed_for(&table, 5),
            Some(seq),
            "taken by the one in progress"
        );
        clock.finish(seq);
        assert_eq!(clock.needed_for(&table, 5), None);
        // Another commit in progress that does not carry this bit: no wait,
        // even when it takes the same chunk for another word's change.
        table.set(640);
        let next = clock.begin();
        assert_eq!(table.take_dirty_chunk_for(0, &mut buf, next), Taken::Words);
        assert_eq!(clock.needed_for(&table, 5), None);
        assert_eq!(clock.needed_for(&table, 640), Some(next));
        clock.finish(next);
        // A store that does not say which commit took a chunk: conservative.
        table.set(6);
        let _third = clock.begin();
        assert!(table.take_dirty_chunk(0, &mut buf));
        assert_eq!(clock.needed_for(&table, 6), Some(3));
    }

    #[test]
    fn a_commit_takes_pending_before_changed_and_the_flush_set() {
        use crate::core::Geometry;
        let v = Volume::new(Geometry::new(1 << 30, 1 << 16).unwrap(), VolumeState::Split);
        v.tables.changed.set(1);
        v.tables.pending.set(2);
        v.need_flush(DevSet::BOTH);
        let take = v.take_commit();
        assert_eq!(take.seq, 1);
        let tables: Vec<usize> = take.chunks.iter().map(|(t, _, _)| *t).collect();
        assert_eq!(tables, [1, 0], "pending, then changed");
        assert_eq!(take.flush, DevSet::BOTH);
        assert!(!v.needs_commit());
        v.requeue_commit(&take);
        assert!(v.needs_commit());
        assert_eq!(v.take_flush_set(), DevSet::BOTH);
    }

    #[test]
    fn the_simulation_commits_with_the_same_take() {
        use crate::core::Geometry;
        let v = Volume::new(Geometry::new(1 << 30, 1 << 16).unwrap(), VolumeState::Split);
        v.tables.changed.set(1);
        v.need_flush(DevSet::BOTH);
        let seq = crate::backend::sim::mem_commit_begin(&v);
        assert_eq!(seq, 1);
        assert!(!v.needs_commit());
        assert_eq!(v.take_flush_set(), DevSet::NONE, "the flush set was taken");
    }
}
