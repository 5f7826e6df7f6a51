//! The volume: its state, its track tables, and the rules that turn host
//! requests and copy steps into plans. See the module header in `mod.rs`.

use super::bitmap::AtomicBitmap;
use super::commit::{later, CommitClock, CommitSeq};
use super::geometry::{Geometry, Track, TrackSpan};
use super::locks::TrackLocks;
use super::plan::*;
use super::state::{
    check_command, Command, Operation, OperationKind, TransitionError, VolumeState,
};
use super::table::TrackTable;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
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

/// Admission of requests. A state change closes the gate, waits until the
/// requests already admitted have finished, changes tables and state, and
/// opens it again: no request ever sees a half-made transition.
#[derive(Default)]
struct Gate {
    inflight: AtomicUsize,
    closed: AtomicBool,
}

/// Proof that a request (or a copy batch) was admitted; dropping it ends it.
pub struct Ticket<'a> {
    gate: &'a Gate,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.gate.inflight.fetch_sub(1, SeqCst);
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
    }

    // ---- admission ------------------------------------------------------

    /// Admits a request, unless a state change is under way.
    pub fn enter(&self) -> Result<Ticket<'_>, Wait> {
        self.gate.inflight.fetch_add(1, SeqCst);
        if self.gate.closed.load(SeqCst) {
            self.gate.inflight.fetch_sub(1, SeqCst);
            return Err(Wait::Transition);
        }
        Ok(Ticket { gate: &self.gate })
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

    pub fn open_gate(&self) {
        self.gate.closed.store(false, SeqCst);
        self.bump();
    }

    // ---- host reads -----------------------------------------------------

    /// Where each byte of a host read comes from. Pending tracks are read
    /// from the secondary, which holds their data until they are restored;
    /// a track being copied still reads correctly from the secondary, so
    /// reads never wait.
    pub fn plan_read(&self, _t: &Ticket, offset: u64, len: u64) -> Vec<ReadSeg> {
        let restoring = self.state() == VolumeState::Restoring;
        let mut segs: Vec<ReadSeg> = Vec::new();
        for span in self.geometry.spans(offset, len) {
            let dev = if restoring && self.tables.pending.get(span.track) {
                if self.hot.set(span.track) {
                    self.hot_count.fetch_add(1, SeqCst);
                }
                Dev::Secondary
            } else {
                Dev::Primary
            };
            match segs.last_mut() {
                Some(last) if last.dev == dev => last.len += span.len,
                _ => segs.push(ReadSeg {
                    dev,
                    offset: span.offset,
                    len: span.len,
                    buf_offset: span.buf_offset,
                }),
            }
        }
        segs
    }

    /// Devices a host flush must reach: every device that holds
    /// acknowledged data written in this state.
    pub fn plan_flush(&self, _t: &Ticket) -> DevSet {
        if self.state().mirrors() {
            DevSet::BOTH
        } else {
            DevSet::PRIMARY
        }
    }

    // ---- host writes ----------------------------------------------------

    /// Plans a host write, locking the tracks it touches. On `Err(track)`
    /// nothing is held: wait for that track and plan again.
    pub fn plan_write(&self, _t: &Ticket, offset: u64, len: u64) -> Result<WritePlan, Wait> {
        let state = self.state();
        let spans: Vec<TrackSpan> = self.geometry.spans(offset, len).collect();
        let actions: Vec<Action> = spans.iter().map(|s| self.action_for(state, s)).collect();
        let holds = self.lock_tracks(&spans, &actions)?;
        // Decisions were taken before the locks; a copy or merge may have
        // restored a track since. Under the locks they are stable.
        let recheck: Vec<Action> = spans.iter().map(|s| self.action_for(state, s)).collect();
        if recheck != actions {
            self.release(&holds);
            return self.plan_write(_t, offset, len);
        }
        Ok(self.build_write(&spans, &actions, holds))
    }

    /// What a write does to one track in `state` (the rules, by claim).
    fn action_for(&self, state: VolumeState, span: &TrackSpan) -> Action {
        let t = span.track;
        match state {
            VolumeState::Established => Action::Mirror,
            VolumeState::Syncing | VolumeState::Resyncing => {
                if self.tables.stale.get(t) {
                    Action::PrimaryStale
                } else {
                    Action::Mirror
                }
            }
            VolumeState::Split | VolumeState::Degraded => Action::PrimaryChanged,
            VolumeState::Restoring => {
                if !self.tables.pending.get(t) {
                    Action::PrimaryChanged // claim 7
                } else if span.full {
                    Action::RestoreFull // claim 5
                } else {
                    Action::Merge // claims 6, 8, 9
                }
            }
        }
    }

    fn lock_tracks(
        &self,
        spans: &[TrackSpan],
        actions: &[Action],
    ) -> Result<Vec<(Track, Hold)>, Wait> {
        let mut holds = Vec::with_capacity(spans.len());
        for (span, action) in spans.iter().zip(actions) {
            let hold = if *action == Action::Merge {
                Hold::Exclusive
            } else {
                Hold::Shared
            };
            let ok = match hold {
                Hold::Shared => self.locks.try_shared(span.track),
                Hold::Exclusive => self.locks.try_exclusive(span.track),
            };
            if !ok {
                self.release(&holds);
                return Err(Wait::Track(span.track));
            }
            holds.push((span.track, hold));
        }
        Ok(holds)
    }

    fn release(&self, holds: &[(Track, Hold)]) {
        for &(t, hold) in holds {
            match hold {
                Hold::Shared => self.locks.release_shared(t),
                Hold::Exclusive => self.locks.release_exclusive(t),
            }
        }
        if holds.iter().any(|h| h.1 == Hold::Exclusive) {
            self.bump();
        }
    }

    fn build_write(
        &self,
        spans: &[TrackSpan],
        actions: &[Action],
        holds: Vec<(Track, Hold)>,
    ) -> WritePlan {
        let mut plan = WritePlan {
            steps: Vec::new(),
            commit_before_issue: None,
            holds,
            restores: Vec::new(),
            mirrors: Vec::new(),
        };
        for (span, action) in spans.iter().zip(actions) {
            let t = span.track;
            let need = match action {
                Action::Mirror => self.mark(&self.tables.intent, t),
                Action::PrimaryStale => self.clock.needed_for(&self.tables.stale, t),
                Action::PrimaryChanged => later(
                    self.mark(&self.tables.changed, t),
                    // claim 7 during a restore: the track's "restored" bit
                    // must be durable before new data goes on top of it.
                    self.clock.needed_for(&self.tables.pending, t),
                ),
                Action::RestoreFull | Action::Merge => {
                    plan.restores.push(t);
                    None
                }
            };
            plan.commit_before_issue = later(plan.commit_before_issue, need);
            if *action == Action::Mirror {
                plan.mirrors.push(t);
            }
            self.push_step(&mut plan.steps, span, *action);
        }
        plan
    }

    /// Sets a bit that must be durable before data is written under it.
    fn mark(&self, table: &TrackTable, t: Track) -> Option<CommitSeq> {
        table.set(t);
        self.clock.needed_for(table, t)
    }

    fn push_step(&self, steps: &mut Vec<WriteStep>, span: &TrackSpan, action: Action) {
        let devs = match action {
            Action::Mirror => DevSet::BOTH,
            Action::Merge => {
                let (track_offset, track_len) = self.geometry.track_extent(span.track);
                steps.push(WriteStep::Merge {
                    track: span.track,
                    track_offset,
                    track_len,
                    offset: span.offset,
                    len: span.len,
                    buf_offset: span.buf_offset,
                });
                return;
            }
            _ => DevSet::PRIMARY,
        };
        if let Some(WriteStep::Direct { devs: d, len, .. }) = steps.last_mut() {
            if *d == devs {
                *len += span.len;
                return;
            }
        }
        steps.push(WriteStep::Direct {
            devs,
            offset: span.offset,
            len: span.len,
            buf_offset: span.buf_offset,
        });
    }

    /// Ends a write whose data I/O has completed: applies what it changes
    /// and releases its tracks. The host is told `ok` once `ack_after` is
    /// durable.
    pub fn finish_write(&self, plan: WritePlan, outcome: WriteOutcome) -> WriteDone {
        let mirrored = !plan.mirrors.is_empty();
        if mirrored && outcome.secondary_failed {
            self.degrade();
        }
        if outcome.primary_failed {
            // The request fails. A pending track stays pending and will be
            // copied over the partial data; a split-mode track had its
            // "changed" bit durable before the write was issued. Mirrored
            // tracks need more: see `primary_write_failed`.
            if !outcome.not_issued {
                self.primary_write_failed(&plan.mirrors);
            }
            self.release(&plan.holds);
            return WriteDone {
                ok: false,
                ack_after: None,
            };
        }
        let mut ack = None;
        if mirrored && self.state() == VolumeState::Degraded {
            // The secondary may lack this write: record it like a split write.
            for &(t, _) in &plan.holds {
                ack = later(ack, self.mark(&self.tables.changed, t));
            }
        }
        for &t in &plan.restores {
            // Claims 5, 6: the whole track is on primary now. Restored must be
            // durable before the host hears of it, or a resumed restore would
            // copy the old data over this write. "changed" is set before
            // "pending" is cleared and the store takes pending first, so no
            // commit records the track as neither (the resync would miss it).
            self.need_flush(DevSet::PRIMARY);
            self.tables.changed.set(t);
            self.tables.pending.clear(t);
            ack = later(ack, self.clock.needed_for(&self.tables.pending, t));
            ack = later(ack, self.clock.needed_for(&self.tables.changed, t));
        }
        self.release(&plan.holds);
        WriteDone {
            ok: true,
            ack_after: ack,
        }
    }

    /// A mirrored write failed on the primary: the host is told so, but the
    /// secondary may hold the new bytes while the primary holds the old or
    /// torn ones. The track is marked stale (primary→secondary copy due),
    /// so that the two are made equal *from the primary* before anything
    /// relies on them being equal: an established volume goes `syncing` for
    /// these tracks, and `split` (the point from which a restore copies
    /// the secondary back) is refused until they are copied. The write
    /// intent bit, durable since before the write, keeps them covered
    /// across a crash until this is committed (it is cleared only with the
    /// track idle, by a commit that carries the stale bit too).
    fn primary_write_failed(&self, tracks: &[Track]) {
        if tracks.is_empty() {
            return;
        }
        let _snapshot = self.lock_snapshot();
        match self.state() {
            VolumeState::Established => {
                for &t in tracks {
                    self.tables.stale.set(t);
                }
                let total = self.tables.stale.count();
                self.start(
                    VolumeState::Syncing,
                    OperationKind::Establish,
                    true,
                    false,
                    total,
                );
            }
            VolumeState::Syncing | VolumeState::Resyncing => {
                for &t in tracks {
                    self.tables.stale.set(t);
                }
            }
            // Degraded since the write was planned: the secondary is out,
            // and establish copies every changed track from the primary.
            VolumeState::Degraded => {
                for &t in tracks {
                    self.tables.changed.set(t);
                }
            }
            // Never mirrored (a state change drains writes first).
            VolumeState::Split | VolumeState::Restoring => {}
        }
        self.bump();
    }

    /// A FLUSH of the secondary failed: whatever it had in its volatile
    /// cache may be lost, and splitmirror does not know which tracks those
    /// were (bits cleared since its last good flush claim data that may be
    /// gone). So the secondary is split off with every track recorded as
    /// changed: the next `establish` copies the whole volume. From then on
    /// no commit waits for the secondary's flush. Returns whether the
    /// volume changed (false while restoring: the secondary is not written
    /// then, and the restore's start flushed it, so nothing depends on it).
    pub fn secondary_flush_failed(&self) -> bool {
        let _snapshot = self.lock_snapshot();
        if self.state() == VolumeState::Restoring || self.secondary_out.swap(true, SeqCst) {
            return false;
        }
        self.tables.changed.fill();
        self.tables.stale.clear_all();
        self.set_operation(None);
        self.set_state(VolumeState::Degraded);
        true
    }

    /// Whether the secondary was split off after a failed flush (until the
    /// next `establish`).
    pub fn secondary_out(&self) -> bool {
        self.secondary_out.load(SeqCst)
    }

    /// The secondary failed while mirroring: split it off. No drain is
    /// needed: every mirror write in flight has its intent bit set, and
    /// intent is folded into "changed".
    pub fn degrade(&self) {
        let _snapshot = self.lock_snapshot();
        let state = self.state();
        if !state.mirrors() {
            return;
        }
        self.set_state(VolumeState::Degraded);
        self.tables.changed.merge_from(&self.tables.intent);
        self.tables.changed.merge_from(&self.tables.stale);
        self.tables.stale.clear_all();
        self.set_operation(None);
    }

    // ---- copies ---------------------------------------------------------

    /// The table a copy works down in the current state, and its direction.
    fn copy_source(&self) -> Option<(&TrackTable, Dev, Dev)> {
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
        if ok {
            if let Some((table, from, _)) = self.copy_source() {
                if from == job.from {
                    // Both ends: the copy may have read host writes still in
                    // the source's volatile cache; if the source lost them
                    // and the destination kept them, the devices would
                    // differ on a track recorded as identical.
                    self.need_flush(DevSet::BOTH);
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
            VolumeState::Restoring => DevSet::PRIMARY,
            VolumeState::Syncing | VolumeState::Resyncing => DevSet::SECONDARY,
            _ => DevSet::NONE,
        }
    }

    /// Clears write-intent bits of tracks with no write in flight; returns
    /// how many. Safe at any time: a writer sets its intent bit only while
    /// holding its track, and we clear only while holding it exclusive.
    pub fn clear_idle_intents(&self) -> u64 {
        if !self.state().mirrors() {
            return 0;
        }
        let mut n = 0;
        let set: Vec<Track> = self.tables.intent.iter_set().collect();
        for t in set {
            if self.locks.try_exclusive(t) {
                // The writes under this bit completed but may sit in a
                // volatile cache: both devices are flushed before the clear
                // is committed, or a crash could leave them differing
                // with no intent to resync them.
                self.need_flush(DevSet::BOTH);
                n += self.tables.intent.clear(t) as u64;
                self.locks.release_exclusive(t);
            }
        }
        n
    }

    // ---- read repair ----------------------------------------------------

    /// For a host read the primary failed: locks track `t` exclusive if the
    /// secondary's copy is known identical to what the primary should hold
    /// (no table marks it: not changed since the split, not pending, not
    /// stale; the secondary not split off after a failure), so that it can
    /// be served from the secondary and rewritten on the primary, as md
    /// raid1 does. A write-intent bit does not matter: under the exclusive
    /// lock no mirror write is in flight, and a failed one marked the track
    /// stale. Release with [`Self::unlock_repair`].
    pub fn lock_for_repair(&self, _t: &Ticket, t: Track) -> RepairLock {
        let identical = |v: &Self| {
            v.state() != VolumeState::Degraded
                && !v.tables.changed.get(t)
                && !v.tables.pending.get(t)
                && !v.tables.stale.get(t)
        };
        if !identical(self) {
            return RepairLock::NotIdentical;
        }
        if !self.locks.try_exclusive(t) {
            return RepairLock::Busy;
        }
        if !identical(self) {
            self.unlock_repair(t);
            return RepairLock::NotIdentical;
        }
        RepairLock::Locked
    }

    pub fn unlock_repair(&self, t: Track) {
        self.locks.release_exclusive(t);
        self.bump();
    }

    /// Counts a primary track rewritten from the secondary.
    pub fn note_read_repair(&self) {
        self.read_repairs.fetch_add(1, SeqCst);
    }

    /// Primary read errors repaired from the secondary since start.
    pub fn read_repairs(&self) -> u64 {
        self.read_repairs.load(SeqCst)
    }

    // ---- verify ---------------------------------------------------------

    /// For `verify`: locks track `t` exclusive if no table says primary and
    /// secondary may differ there, so that no write or copy changes either
    /// copy while the two are compared. Release with [`Self::unlock_identical`].
    pub fn lock_identical(&self, _t: &Ticket, t: Track) -> VerifyLock {
        let marked = |tables: &Tables| tables.all().iter().any(|table| table.get(t));
        if marked(&self.tables) {
            return VerifyLock::NotIdentical;
        }
        if !self.locks.try_exclusive(t) {
            return VerifyLock::Busy;
        }
        // A write may have marked the track between the check and the lock.
        if marked(&self.tables) {
            self.locks.release_exclusive(t);
            self.bump();
            return VerifyLock::NotIdentical;
        }
        VerifyLock::Locked
    }

    pub fn unlock_identical(&self, t: Track) {
        self.locks.release_exclusive(t);
        self.bump();
    }

    // ---- state changes --------------------------------------------------

    /// Whether `cmd` is valid now (checked before draining host I/O).
    pub fn check(&self, cmd: Command) -> Result<(), TransitionError> {
        check_command(self.state(), cmd)
    }

    /// Applies an operator command. The gate must be closed and drained.
    /// Every change here is word-wise, so it takes microseconds at any size.
    pub fn apply(&self, cmd: Command) -> Result<(), TransitionError> {
        debug_assert!(self.is_drained());
        // Checked under the snapshot lock: the committer may split the
        // secondary off (`secondary_flush_failed`) at any time.
        let _snapshot = self.lock_snapshot();
        check_command(self.state(), cmd)?;
        // Split clears write intent: the mirror writes under it must be
        // durable on both devices first.
        self.need_flush(DevSet::BOTH);
        let tables = &self.tables;
        match cmd {
            Command::Split => {
                // Drained: every mirror write has reached both devices.
                tables.intent.clear_all();
                tables.changed.clear_all();
                self.set_state(VolumeState::Split);
            }
            Command::Establish { full } => {
                // A repaired or replaced secondary is back in.
                self.secondary_out.store(false, SeqCst);
                let total = if full {
                    tables.stale.fill()
                } else {
                    tables.stale.copy_from(&tables.changed)
                };
                tables.changed.clear_all();
                self.start(
                    VolumeState::Syncing,
                    OperationKind::Establish,
                    !full,
                    false,
                    total,
                );
            }
            Command::Restore {
                incremental,
                protect,
            } => {
                // Claims 10, 11: which tracks to restore.
                let total = if incremental {
                    tables.pending.copy_from(&tables.changed)
                } else {
                    tables.pending.fill()
                };
                // From here on "changed" records what the host writes during
                // the restore (claim 2).
                tables.changed.clear_all();
                self.start(
                    VolumeState::Restoring,
                    OperationKind::Restore,
                    incremental,
                    protect,
                    total,
                );
            }
        }
        self.complete_locked();
        Ok(())
    }

    fn start(
        &self,
        state: VolumeState,
        kind: OperationKind,
        incremental: bool,
        protect: bool,
        total: u64,
    ) {
        self.copy_cursor.store(0, SeqCst);
        self.set_operation(Some(Operation {
            kind,
            incremental,
            protect,
            total,
        }));
        self.set_state(state);
    }

    /// Moves on when the running copy has nothing left; returns whether the
    /// state changed. The gate must be closed and drained.
    pub fn complete_if_done(&self) -> bool {
        let _snapshot = self.lock_snapshot();
        self.complete_locked()
    }

    fn complete_locked(&self) -> bool {
        // `is_clear` stops at the first set word: right after a restore
        // starts this is one load, not a count over the whole table.
        if self.copy_source().is_none_or(|(t, _, _)| !t.is_clear()) {
            return false;
        }
        let tables = &self.tables;
        match self.state() {
            VolumeState::Restoring => {
                let op = self.operation().expect("restoring has an operation");
                if op.protect {
                    // Claim 1(E) withheld: the secondary stays split and intact;
                    // "changed" now names the tracks that differ from it.
                    self.set_operation(None);
                    self.set_state(VolumeState::Split);
                } else {
                    // Claim 1(E): copy and updates done, re-enable the secondary
                    // and send it what the host wrote meanwhile (claim 2).
                    let total = tables.stale.copy_from(&tables.changed);
                    tables.changed.clear_all();
                    self.start(
                        VolumeState::Resyncing,
                        OperationKind::Resync,
                        true,
                        false,
                        total,
                    );
                    self.complete_locked();
                }
            }
            VolumeState::Syncing | VolumeState::Resyncing => {
                self.set_operation(None);
                self.set_state(VolumeState::Established);
            }
            _ => {}
        }
        true
    }

    /// After loading metadata: fold write intent into the tables so that
    /// tracks with mirror writes in flight at the crash are resynced.
    pub fn recover_intents(&self) {
        let tables = &self.tables;
        if tables.intent.is_clear() {
            return;
        }
        match self.state() {
            VolumeState::Established => {
                let total = tables.stale.copy_from(&tables.intent);
                self.start(
                    VolumeState::Syncing,
                    OperationKind::Establish,
                    true,
                    false,
                    total,
                );
            }
            VolumeState::Syncing | VolumeState::Resyncing => {
                tables.stale.merge_from(&tables.intent)
            }
            _ => tables.changed.merge_from(&tables.intent),
        }
        tables.intent.clear_all();
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
        self.clock.finish(seq)
    }

    /// The store formatted or opened the metadata at `generation`.
    pub(crate) fn reset_commits(&self, generation: CommitSeq) {
        self.clock.reset(generation)
    }
}

/// Whether `verify` may compare a track now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLock {
    /// A table marks the track as possibly different: not compared.
    NotIdentical,
    /// A write or copy holds the track; try again shortly.
    Busy,
    /// Locked; compare, then `unlock_identical`.
    Locked,
}

/// What a host write does to one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Write both devices, under write intent.
    Mirror,
    /// Write the primary only; the track is stale and will be copied.
    PrimaryStale,
    /// Write the primary only and record the track as changed (claim 7 during a restore).
    PrimaryChanged,
    /// Claim 5: a full-track write restores a pending track without a copy.
    RestoreFull,
    /// Claims 6, 8, 9: a partial write to a pending track merges.
    Merge,
}
