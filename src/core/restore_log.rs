//! Tracks restored by host writes whose "restored" bit is not durable yet.
//!
//! A host write that restores a pending track (a full-track write, claim 5,
//! or a merge, claim 6) must not be acknowledged before a restart would
//! find the track restored: a resumed restore would copy the secondary over
//! it. Making the bit durable costs a flush of the primary (the track's data
//! must be durable before the bit is) and a metadata commit: two or three
//! device flushes per first touch of a track.
//!
//! The two ways a server goes down differ in what they lose:
//!
//! - **The process dies** (`kill -9`, a panic, an upgrade): every completed
//!   write is still in the devices' caches. A record in the metadata's
//!   *restore log*, written without a flush, is enough for the restart to
//!   find the track restored.
//! - **The machine loses power** (or reboots): the devices' caches are
//!   gone, and with them any write the host did not flush. The track may
//!   hold anything on the primary, but its durable bit still says pending,
//!   so the resumed restore copies the secondary's data over it: the track
//!   reads back as it was before those writes, which is what a lost
//!   unflushed write may look like. A host flush waits for the commit that
//!   makes the bit durable, so no flushed write is lost.
//!
//! Each log record carries the kernel's boot id, and a restart applies only
//! records of its own boot: the records are facts about device caches,
//! which a reboot empties. The log is cleared when a restore starts, so a
//! record never outlives its restore.
//!
//! This module keeps the in-memory side: which tracks the next record must
//! carry (every logged track whose commit is not yet durable) and which
//! record a host write waits for. The store writes and reads the records.

use super::commit::CommitSeq;
use super::geometry::Track;
use super::plan::Logged;
use super::table::TrackTable;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

/// Number of a restore log record; a host write waits until the record
/// with its number (or a later one) is written.
pub type RecordSeq = u64;

pub struct RestoreLog {
    /// Tracks a record can carry; 0: the metadata has no log area (or the
    /// boot cannot be told), and restoring writes wait for commits.
    capacity: AtomicUsize,
    /// A log write failed: the log is off until the server restarts.
    failed: AtomicBool,
    /// Highest record written (completed, not necessarily durable).
    written: AtomicU64,
    /// Tracks logged and not yet settled by a durable commit; mirrors
    /// `entries` for a lock-free test on the host path.
    logged: TrackTable,
    /// Those of them the copy restored and a host write logged
    /// ([`RestoreLog::append_copied`]).
    copied: TrackTable,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    /// Each logged track, the latest record that carries it and the
    /// commit that makes its bits durable. Keyed by track: a host write
    /// on top of a logged track looks its entry up under the mutex.
    tracks: BTreeMap<Track, Logged>,
    /// Highest record number handed out.
    appended: RecordSeq,
}

impl RestoreLog {
    pub fn new(tracks: u64) -> Self {
        RestoreLog {
            capacity: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            written: AtomicU64::new(0),
            logged: TrackTable::new(tracks),
            copied: TrackTable::new(tracks),
            inner: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store found room for `capacity` tracks per record.
    pub fn enable(&self, capacity: usize) {
        self.capacity.store(capacity, SeqCst);
    }

    /// The store set the log up (it may have failed since): merges may
    /// have been written without FUA.
    pub fn configured(&self) -> bool {
        self.capacity.load(SeqCst) > 0
    }

    pub fn enabled(&self) -> bool {
        self.capacity.load(SeqCst) > 0 && !self.failed.load(SeqCst)
    }

    /// A log write failed: from now on restoring writes wait for commits.
    pub fn fail(&self) {
        self.failed.store(true, SeqCst);
    }

    pub fn failed(&self) -> bool {
        self.failed.load(SeqCst)
    }

    /// Logs `tracks`, restored by one host write, settled by commit
    /// `settle`. `None`: the log is off or full, and the write must wait
    /// for `settle` instead.
    pub fn append(&self, tracks: &[Track], settle: CommitSeq) -> Option<RecordSeq> {
        self.append_as(tracks, settle, false)
    }

    /// Logs `t`, which the copy restored (its data is flushed), for a host
    /// write on top of it while its cleared pending bit is not durable.
    /// Unlike a track a host write restored, such a track may not be
    /// pending again after a power cut; writes on top of it keep their
    /// write intent (see `Volume::log_restored`).
    pub fn append_copied(&self, t: Track, settle: CommitSeq) -> Option<RecordSeq> {
        self.append_as(&[t], settle, true)
    }

    fn append_as(&self, tracks: &[Track], settle: CommitSeq, copied: bool) -> Option<RecordSeq> {
        if !self.enabled() {
            return None;
        }
        let mut e = self.entries();
        if e.tracks.len() + tracks.len() > self.capacity.load(SeqCst) {
            return None;
        }
        e.appended += 1;
        let record = e.appended;
        let entry = Logged { record, settle };
        for &t in tracks {
            // `copied` before `logged`: whoever sees the track logged sees
            // how.
            if copied {
                self.copied.set(t);
            }
            self.logged.set(t);
            // Logged again before its commit was durable: it settles with
            // the later of the two.
            e.tracks
                .entry(t)
                .and_modify(|old| *old = Logged::join(Some(*old), Some(entry)).unwrap_or(entry))
                .or_insert(entry);
        }
        Some(record)
    }

    /// Whether logged track `t` was logged by [`RestoreLog::append_copied`].
    pub fn copied(&self, t: Track) -> bool {
        self.copied.get(t)
    }

    /// Drops the entries whose commit is durable (the header has them
    /// now): after every commit, the only way a commit becomes durable, so
    /// the entries left are exactly the unsettled ones.
    pub fn settle(&self, durable: impl Fn(CommitSeq) -> bool) {
        self.entries().tracks.retain(|&t, entry| {
            let keep = !durable(entry.settle);
            if !keep {
                self.logged.clear(t);
                self.copied.clear(t);
            }
            keep
        });
    }

    /// Whether `t` is logged and not yet settled: its bits are not durable,
    /// but a power cut would make it pending again, so a write on top of it
    /// needs no commit of its own (see the module header).
    pub fn holds(&self, t: Track) -> bool {
        self.logged.get(t)
    }

    /// The record that carries logged track `t` and the commit that
    /// settles it, while it is unsettled: a write on top of the track is
    /// as durable as the write that restored it once that record is
    /// written (after `kill -9`), and only once that commit is after a
    /// power cut.
    pub fn entry_of(&self, t: Track) -> Option<Logged> {
        if !self.holds(t) {
            return None;
        }
        self.entries().tracks.get(&t).copied()
    }

    /// The record to write next: its number and every unsettled track.
    /// `None`: the last record written is current.
    pub fn take(&self) -> Option<(RecordSeq, Vec<Track>)> {
        if !self.wanted() {
            return None;
        }
        let e = self.entries();
        Some((e.appended, e.tracks.keys().copied().collect()))
    }

    /// A record was appended that is not written yet.
    pub fn wanted(&self) -> bool {
        self.enabled() && self.entries().appended > self.written.load(SeqCst)
    }

    pub fn mark_written(&self, seq: RecordSeq) {
        self.written.fetch_max(seq, SeqCst);
    }

    pub fn is_written(&self, seq: RecordSeq) -> bool {
        self.written.load(SeqCst) >= seq
    }

    /// The commit that settles every logged track, if one is not durable:
    /// a host flush waits for it.
    pub fn unsettled(&self) -> Option<CommitSeq> {
        self.entries().tracks.values().map(|e| e.settle).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_carries_every_track_until_its_commit_is_durable() {
        let log = RestoreLog::new(64);
        assert_eq!(log.append(&[1], 5), None, "off until enabled");
        log.enable(3);
        let r1 = log.append(&[1], 5).unwrap();
        let r2 = log.append(&[2, 3], 6).unwrap();
        assert!(r2 > r1 && log.holds(2));
        assert_eq!(log.append(&[4], 6), None, "full");
        assert_eq!(log.take(), Some((r2, vec![1, 2, 3])));
        log.mark_written(r2);
        assert!(log.is_written(r1) && !log.wanted());
        assert_eq!(
            (log.entry_of(1), log.entry_of(3)),
            (
                Some(Logged {
                    record: r1,
                    settle: 5
                }),
                Some(Logged {
                    record: r2,
                    settle: 6
                })
            )
        );
        log.settle(|s| s <= 5);
        assert_eq!(log.unsettled(), Some(6));
        assert_eq!(log.entry_of(1), None, "settled");
        assert!(!log.holds(1) && log.holds(3), "commit 5 settled track 1");
        log.settle(|_| true);
        assert_eq!(log.unsettled(), None);
        log.fail();
        assert_eq!(log.append(&[9], 7), None, "off after a failure");
    }

    #[test]
    fn a_track_logged_twice_stays_logged_until_the_later_commit() {
        let log = RestoreLog::new(64);
        log.enable(8);
        log.append(&[1], 5).unwrap();
        let r2 = log.append(&[1], 6).unwrap();
        assert_eq!(
            log.entry_of(1),
            Some(Logged {
                record: r2,
                settle: 6
            })
        );
        log.settle(|s| s <= 5);
        assert!(log.holds(1), "commit 6 is not durable yet");
        assert_eq!(log.take().map(|(_, t)| t), Some(vec![1]));
        log.settle(|s| s <= 6);
        assert!(!log.holds(1) && log.unsettled().is_none());
    }
}
