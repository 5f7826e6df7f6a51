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
use super::table::{taken_seq, Durability, Taken, TrackTable, CHUNK_WORDS};
use super::volume::Volume;
use super::wake::WakeList;
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
    /// Their wakers: woken as a commit finishes.
    wakes: WakeList,
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
        self.wakes.wake_all();
    }

    pub fn wakes(&self) -> &WakeList {
        &self.wakes
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

    /// Several queue threads mark overlapping tracks while a committer
    /// takes dirty chunks back to back. A writer is "acknowledged" once
    /// `needed_for` says its bit is durable (at once, or after the commit it
    /// names finished); at that moment the committed image must hold the
    /// bit. Each round starts from bits that are clear and durable, so a
    /// writer that finds another's bit set before it is marked unsynced
    /// would be acknowledged with the bit missing from the image.
    #[test]
    fn no_writer_is_acknowledged_before_the_commit_that_carried_its_bit() {
        use crate::core::table::CHUNK_TRACKS;
        use std::sync::atomic::AtomicBool;
        use std::sync::{Barrier, Mutex};

        const TRACKS: u64 = 2 * CHUNK_TRACKS;
        const WRITERS: usize = 4;
        const ROUNDS: usize = 1000;
        const PER_ROUND: usize = 200;
        let table = TrackTable::new(TRACKS);
        let clock = CommitClock::default();
        let image = Mutex::new(vec![0u64; (TRACKS / 64) as usize]);
        let stop = AtomicBool::new(false);
        let start = Barrier::new(WRITERS + 1);
        let end = Barrier::new(WRITERS + 1);
        let round_tracks = Mutex::new(Vec::<Track>::new());
        // A failure is recorded, not panicked on: a panicking thread would
        // leave the others waiting at a barrier forever.
        let failure = Mutex::new(None::<String>);
        let fail = |msg: String| {
            failure.lock().unwrap().get_or_insert(msg);
        };
        let committed = |t: Track| image.lock().unwrap()[(t / 64) as usize] >> (t % 64) & 1 == 1;
        let wait_durable = |seq: CommitSeq| {
            while !clock.is_durable(seq) {
                std::thread::yield_now();
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u64; CHUNK_WORDS];
                while !stop.load(SeqCst) {
                    let seq = clock.begin();
                    for c in 0..table.chunks() {
                        let took = table.take_dirty_chunk_for(c, &mut buf, seq);
                        let mut img = image.lock().unwrap();
                        let words = &mut img[c * CHUNK_WORDS..(c + 1) * CHUNK_WORDS];
                        match took {
                            Taken::Clean => {}
                            Taken::Ones => words.fill(!0),
                            Taken::Words => words.copy_from_slice(&buf),
                        }
                    }
                    clock.finish(seq);
                    std::thread::yield_now();
                }
            });
            for w in 0..WRITERS {
                let (table, clock, start, end) = (&table, &clock, &start, &end);
                let (round_tracks, committed, fail) = (&round_tracks, &committed, &fail);
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        start.wait();
                        let tracks = round_tracks.lock().unwrap().clone();
                        for &t in &tracks {
                            table.set(t);
                            match clock.needed_for(table, t) {
                                None if !committed(t) => fail(format!(
                                    "round {round}: writer {w} acknowledged on track {t} \
                                     before any commit carried its bit"
                                )),
                                None => {}
                                Some(seq) => {
                                    wait_durable(seq);
                                    if !committed(t) {
                                        fail(format!(
                                            "round {round}: writer {w}: commit {seq} done \
                                             but track {t} not in it"
                                        ));
                                    }
                                }
                            }
                        }
                        end.wait();
                    }
                });
            }
            let mut rng = fastrand::Rng::with_seed(11);
            for _ in 0..ROUNDS {
                // Same tracks, same order for every writer: they collide.
                let tracks: Vec<Track> = (0..PER_ROUND).map(|_| rng.u64(0..TRACKS)).collect();
                *round_tracks.lock().unwrap() = tracks.clone();
                start.wait();
                end.wait();
                for &t in &tracks {
                    table.clear(t);
                }
                wait_durable(clock.next());
                if tracks.iter().any(|&t| committed(t)) {
                    fail("a cleared track is still in the image".into());
                }
            }
            stop.store(true, SeqCst);
        });
        assert_eq!(failure.into_inner().unwrap(), None);
    }
}
