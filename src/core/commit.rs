//! Group commit bookkeeping: which metadata commit a request must wait for.
//!
//! The metadata store numbers its commits. A request whose track bit is
//! unsynced must wait for a commit that *starts* after it looked (its bit
//! may have missed the snapshot of the one in progress); a request whose bit
//! is synced but may have been taken by the commit in progress waits for
//! that one. A request whose bits are all durable waits for nothing: that is
//! what keeps the common write free of metadata I/O.

use super::geometry::Track;
use super::table::{taken_seq, Durability, TrackTable};
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
        // The table's answer first, then the clock: a commit that took the
        // word had begun before the take, so `started` covers it.
        let durability = table.durability(t);
        let started = self.started.load(SeqCst);
        let taken = match durability {
            Durability::Unsynced => return Some(started + 1),
            Durability::TakenUnknown => started,
            Durability::Taken(tag) => taken_seq(tag, started),
        };
        // Synced: durable once the commit that took it is.
        (taken > self.done()).then_some(taken)
    }

    /// The commit that makes everything changed up to now durable.
    pub fn next(&self) -> CommitSeq {
        self.started.load(SeqCst) + 1
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
}
