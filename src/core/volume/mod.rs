//! The volume: its state, its track tables, and the rules that turn host
//! requests and copy steps into plans. See the module header in `core/mod.rs`.
//!
//! This file owns the `Volume` struct, its constructors, the state and
//! operation accessors and what the metadata store reads of it (header
//! dirty flag, snapshot lock, flush set). The rules live by concern:
//!
//! - `gate.rs`: admission (tickets) and the gate a state change closes;
//! - `read.rs`: where a host read comes from, what a flush reaches;
//! - `write.rs`: host writes, from plan to finish, and write failures;
//! - `copy.rs`: picking copy jobs, finishing them, idle write intent;
//! - `repair.rs`: track locks for read repair and `verify`;
//! - `transition.rs`: operator commands, completion, degrading, crash
//!   recovery of write intent.

mod copy;
mod gate;
mod read;
mod repair;
mod transition;
mod write;

pub use gate::{Ticket, Wait};
pub use repair::VerifyLock;

use super::bitmap::AtomicBitmap;
use super::commit::{CommitClock, CommitSeq};
use super::geometry::Geometry;
use super::locks::TrackLocks;
use super::plan::*;
use super::restore_log::{RecordSeq, RestoreLog};
use super::state::{Operation, OperationKind, VolumeState};
use super::table::TrackTable;
use super::wake::WakeList;
use gate::Gate;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// The persistent track tables.
pub struct Tables {
    /// Primary tracks written since the split: they differ from the frozen
    /// secondary (split, degraded; during a restore, tracks the host wrote).
    pub changed: TrackTable,
    /// Restore pending: primary invalid, secondary valid (claim 4).
    pub pending: TrackTable,
    /// Secondary stale: to be copied primary→secondary (syncing, resyncing).
    pub stale: TrackTable,
    /// Write intent: mirror writes may be in flight here. Set before a
    /// mirror write is issued, cleared lazily once the track is idle; after
    /// a crash these tracks are resynced.
    pub intent: TrackTable,
}

/// Names a track table (for [`Volume::table`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableId {
    Changed,
    Pending,
    Stale,
    Intent,
}

/// Bits set in the tables `status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    pub changed: u64,
    pub pending: u64,
    pub stale: u64,
}

impl Tables {
    fn new(tracks: u64) -> Self {
        Tables {
            changed: TrackTable::new(tracks),
            pending: TrackTable::new(tracks),
            stale: TrackTable::new(tracks),
            intent: TrackTable::new(tracks),
        }
    }

    pub fn all(&self) -> [&TrackTable; 4] {
        [&self.changed, &self.pending, &self.stale, &self.intent]
    }
}

pub struct Volume {
    geometry: Geometry,
    state: AtomicU8,
    operation: Mutex<Option<Operation>>,
    /// Private to the core: outside it, see the accessors at the end of
    /// `impl Volume`.
    pub(super) tables: Tables,
    locks: TrackLocks,
    /// Pending tracks the host is reading: the copy engine takes them first.
    hot: AtomicBitmap,
    /// Bits set in `hot`, so that `next_copies` skips scanning the whole
    /// bitmap (128K words at 1 TiB) on every batch when none is.
    hot_count: AtomicU64,
    copy_cursor: AtomicU64,
    pub(super) clock: CommitClock,
    header_dirty: AtomicBool,
    /// Data devices the next commit must flush first (bits: 1 primary,
    /// 2 secondary): set *before* a bit is cleared that claims data is on a
    /// device (copied, restored, intent done), taken by the store *after* it
    /// snapshots the tables. So every clear a commit carries is covered by
    /// that commit's flush or an earlier one.
    flush_needed: AtomicU8,
    /// Held by state changes and by the store while it snapshots, so a
    /// commit never records a state change's tables without its header.
    snapshot_lock: Mutex<()>,
    /// The secondary failed a flush: it is out until the next `establish`
    /// (see `secondary_flush_failed`).
    secondary_out: AtomicBool,
    /// Primary read errors served from the secondary (read repair).
    read_repairs: AtomicU64,
    gate: Gate,
    /// Bumped whenever a lock is released or the state changes, so waiters
    /// know when to look again.
    progress: AtomicU64,
    /// Write intent regions (words of 64 tracks) mirror-written since the
    /// last aging pass (see `Volume::age_intents`); in memory only.
    intent_recent: AtomicBitmap,
    /// Aging passes each intent region has gone without a write; only the
    /// aging pass touches it (allocated at its first run).
    intent_age: Mutex<Vec<u8>>,
    /// Tracks whose write intent was cleared since the secondary's last
    /// good flush: their last writes may still sit in its volatile cache
    /// (in memory only; see `Volume::secondary_flush_failed`).
    intent_unflushed: TrackTable,
    /// Requests waiting for a track lock or a state change (the gate, a
    /// drain): woken by lock releases, ended requests and state changes.
    progress_wakes: WakeList,
    /// Host merges in flight and host requests waiting for a track lock:
    /// the copy engine issues no new copies meanwhile, so a merge's I/O
    /// does not queue behind them, and a track the copy holds (until its
    /// group's flush) is let go at once.
    host_ahead: AtomicU64,
    /// Tracks restored by host writes ahead of their commit (see
    /// `core::restore_log`).
    pub(super) restore_log: RestoreLog,
}

/// A host merge in flight, or a host request waiting for a track (see
/// [`Volume::ahead_guard`]).
pub struct AheadGuard<'a>(&'a AtomicU64);

impl Drop for AheadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Volume {
    /// A volume in `state` with every table clear.
    pub fn new(geometry: Geometry, state: VolumeState) -> Self {
        let tracks = geometry.tracks();
        Volume {
            geometry,
            state: AtomicU8::new(state.code()),
            operation: Mutex::new(None),
            tables: Tables::new(tracks),
            locks: TrackLocks::new(tracks),
            hot: AtomicBitmap::new(tracks),
            hot_count: AtomicU64::new(0),
            copy_cursor: AtomicU64::new(0),
            clock: CommitClock::default(),
            header_dirty: AtomicBool::new(true),
            flush_needed: AtomicU8::new(0),
            snapshot_lock: Mutex::new(()),
            secondary_out: AtomicBool::new(false),
            read_repairs: AtomicU64::new(0),
            gate: Gate::default(),
            progress: AtomicU64::new(0),
            intent_recent: AtomicBitmap::new(tracks.div_ceil(64)),
            intent_age: Mutex::new(Vec::new()),
            intent_unflushed: TrackTable::new(tracks),
            progress_wakes: WakeList::default(),
            host_ahead: AtomicU64::new(0),
            restore_log: RestoreLog::new(tracks),
        }
    }

    /// A freshly formatted volume: `syncing` with every track stale, or
    /// `established` with nothing to copy (`--assume-clean`).
    pub fn formatted(geometry: Geometry, assume_clean: bool) -> Self {
        if assume_clean {
            return Volume::new(geometry, VolumeState::Established);
        }
        let v = Volume::new(geometry, VolumeState::Syncing);
        v.tables.stale.fill();
        v.set_operation(Some(Operation {
            kind: OperationKind::Establish,
            incremental: false,
            protect: false,
            total: geometry.tracks(),
        }));
        v
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn state(&self) -> VolumeState {
        VolumeState::from_code(self.state.load(SeqCst)).expect("valid state code")
    }

    fn set_state(&self, s: VolumeState) {
        self.state.store(s.code(), SeqCst);
        self.header_dirty.store(true, SeqCst);
        self.bump();
    }

    pub fn operation(&self) -> Option<Operation> {
        *self.operation.lock().unwrap()
    }

    fn set_operation(&self, op: Option<Operation>) {
        *self.operation.lock().unwrap() = op;
        self.header_dirty.store(true, SeqCst);
    }

    /// Restores state and operation from committed metadata.
    pub fn load_header(&self, state: VolumeState, op: Option<Operation>) {
        self.state.store(state.code(), SeqCst);
        *self.operation.lock().unwrap() = op;
        self.header_dirty.store(false, SeqCst);
    }

    /// For the metadata store: whether state or operation changed since the
    /// last commit (clears the flag).
    pub fn take_header_dirty(&self) -> bool {
        self.header_dirty.swap(false, SeqCst)
    }

    /// For the metadata store after a failed commit: the header must be
    /// written again.
    pub fn mark_header_dirty(&self) {
        self.header_dirty.store(true, SeqCst);
    }

    /// For the metadata store: held while it takes the header and the dirty
    /// chunks, so that a state change is recorded whole or not at all.
    pub fn lock_snapshot(&self) -> MutexGuard<'_, ()> {
        self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the next commit must flush `devs` first (also used by
    /// the store to hand back the flush of a commit that failed).
    pub fn need_flush(&self, devs: DevSet) {
        let bits = devs.primary as u8 | (devs.secondary as u8) << 1;
        self.flush_needed.fetch_or(bits, SeqCst);
    }

    /// For the metadata store, after it took the dirty chunks: the data
    /// devices to flush before writing them (see `flush_needed`).
    pub fn take_flush_set(&self) -> DevSet {
        let bits = self.flush_needed.swap(0, SeqCst);
        DevSet {
            primary: bits & 1 != 0,
            // A secondary that failed a flush is out with every track
            // changed: no commit claims anything about its data.
            secondary: bits & 2 != 0 && !self.secondary_out(),
        }
    }

    /// Whether anything awaits a metadata commit.
    pub fn needs_commit(&self) -> bool {
        self.header_dirty.load(SeqCst) || self.tables.all().iter().any(|t| t.has_dirty_chunks())
    }

    pub fn progress(&self) -> u64 {
        self.progress.load(SeqCst)
    }

    fn bump(&self) {
        self.progress.fetch_add(1, SeqCst);
        self.progress_wakes.wake_all();
    }

    /// Wakes requests waiting for a track or a state change (after a lock
    /// release that needs no `progress` bump: costs one shared read when
    /// nobody waits).
    fn wake_progress(&self) {
        self.progress_wakes.wake_all();
    }

    /// Waiters for track locks and state changes.
    pub fn progress_wakes(&self) -> &WakeList {
        &self.progress_wakes
    }

    /// Waiters for metadata commits: woken when a commit is durable, and
    /// by the committer when one fails.
    pub fn commit_wakes(&self) -> &WakeList {
        self.clock.wakes()
    }

    /// Whether track `t` is held by nobody now (a waiter for it looks).
    pub fn track_free(&self, t: super::geometry::Track) -> bool {
        self.locks.is_free(t)
    }

    /// Who holds track `t` (0: nobody): a request waiting for `t` tries
    /// again once this changed (a holder left) or `t` is free.
    pub fn track_holders(&self, t: super::geometry::Track) -> u32 {
        self.locks.holders(t)
    }

    // ---- Accessors for the executors, the store, the edges and tests ----
    //
    // The tables and the commit clock are private to the core; the rest of
    // the crate, the tests and the benches see them only through these.

    /// One track table: for status counts, and for tests that read a bit
    /// or set one up (its bit operations take `&self`, as the core's own
    /// do; the volume's methods are what keep the rules between tables).
    pub fn table(&self, id: TableId) -> &TrackTable {
        let t = &self.tables;
        match id {
            TableId::Changed => &t.changed,
            TableId::Pending => &t.pending,
            TableId::Stale => &t.stale,
            TableId::Intent => &t.intent,
        }
    }

    /// The tables in their on-disk order (the store loads and encodes them).
    pub(crate) fn tables_on_disk(&self) -> [&TrackTable; 4] {
        self.tables.all()
    }

    /// Tracks changed since the split, restore-pending and secondary-stale
    /// (`status`).
    pub fn counts(&self) -> TableCounts {
        TableCounts {
            changed: self.tables.changed.count(),
            pending: self.tables.pending.count(),
            stale: self.tables.stale.count(),
        }
    }

    /// Whether commit `seq` is durable.
    pub fn is_durable(&self, seq: CommitSeq) -> bool {
        self.clock.is_durable(seq)
    }

    /// Held by a request while it waits for a commit: the copy engine
    /// issues no new copies meanwhile (see [`Volume::commit_waiters`]).
    pub fn wait_guard(&self) -> crate::core::commit::CommitWaiter<'_> {
        self.clock.wait_guard()
    }

    /// Requests waiting for a commit now.
    pub fn commit_waiters(&self) -> u64 {
        self.clock.waiters()
    }

    /// Held by a host merge while its reads and writes run, and by a host
    /// request while it waits for a track lock: they go ahead of copies
    /// (the copy engine starts none meanwhile).
    pub fn ahead_guard(&self) -> AheadGuard<'_> {
        self.host_ahead.fetch_add(1, SeqCst);
        AheadGuard(&self.host_ahead)
    }

    /// Host requests holding an [`AheadGuard`] now.
    pub fn host_ahead(&self) -> u64 {
        self.host_ahead.load(SeqCst)
    }

    /// The commit that will cover everything changed up to now.
    pub fn next_commit(&self) -> CommitSeq {
        self.clock.next()
    }

    /// The last durable commit.
    pub fn commits_done(&self) -> CommitSeq {
        self.clock.done()
    }

    /// Commit `seq` is on stable storage (the store, or the simulation's
    /// in-memory commit).
    pub(crate) fn finish_commit(&self, seq: CommitSeq) {
        self.clock.finish(seq);
        // Tracks this commit settled leave the log (and `holds`) now.
        self.restore_log.settle(|s| self.clock.is_durable(s));
    }

    /// The store formatted or opened the metadata at `generation`.
    pub(crate) fn reset_commits(&self, generation: CommitSeq) {
        self.clock.reset(generation)
    }

    // ---- The restore log (see `core::restore_log`) ----

    /// The store has a log area with room for `capacity` tracks per
    /// record, and knows the boot.
    pub(crate) fn enable_restore_log(&self, capacity: usize) {
        self.restore_log.enable(capacity)
    }

    /// Whether host writes that restore a track are acknowledged after a
    /// log record instead of a commit.
    pub fn restore_log_enabled(&self) -> bool {
        self.restore_log.enabled()
    }

    /// A log record is wanted (the restore log's thread writes it).
    pub fn restore_log_wanted(&self) -> bool {
        self.restore_log.wanted()
    }

    /// For the store: the next record to write, if one is wanted.
    pub(crate) fn take_restore_log(&self) -> Option<(RecordSeq, Vec<super::geometry::Track>)> {
        self.restore_log.take()
    }

    /// Record `seq` is written: the writes waiting for it are acknowledged.
    pub(crate) fn restore_log_written(&self, seq: RecordSeq) {
        self.restore_log.mark_written(seq);
        self.clock.wakes().wake_all();
    }

    /// A log write failed: waiting writes fall back to the commit.
    pub(crate) fn restore_log_failed(&self) {
        self.restore_log.fail();
        self.clock.wakes().wake_all();
    }

    /// Whether record `seq` is written; `None`: the log failed, wait for
    /// the commit instead.
    pub fn restore_record_written(&self, seq: RecordSeq) -> Option<bool> {
        if self.restore_log.is_written(seq) {
            Some(true)
        } else if self.restore_log.failed() {
            None
        } else {
            Some(false)
        }
    }

    /// The commit a host flush must wait for: it makes durable every track
    /// a logged write restored.
    pub fn unsettled_restores(&self) -> Option<CommitSeq> {
        self.restore_log.unsettled()
    }

    /// A restart found `tracks` restored by writes of this boot (the
    /// records the store read): restored, changed, and logged again until
    /// a commit made durable after a flush of the primary settles them.
    pub(crate) fn replay_restore_log(&self, tracks: &[super::geometry::Track]) -> usize {
        let mut replayed = Vec::new();
        for &t in tracks {
            if t < self.geometry.tracks() && self.tables.pending.get(t) {
                self.tables.changed.set(t);
                self.tables.pending.clear(t);
                replayed.push(t);
            }
        }
        if !replayed.is_empty() {
            self.need_flush(DevSet::PRIMARY);
            let settle = self.clock.next();
            let logged = self.restore_log.append(&replayed, settle);
            debug_assert!(logged.is_some(), "a replayed record fits the log");
        }
        replayed.len()
    }
}
