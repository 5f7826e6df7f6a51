//! Host writes: the action per track (the claims' rules), the track locks,
//! the plan with the commit that must be durable first, and what a finished
//! or failed write changes.

use super::{Ticket, Volume, Wait};
use crate::core::commit::{later, CommitSeq};
use crate::core::geometry::{Track, TrackSpan};
use crate::core::plan::*;
use crate::core::state::VolumeState;
use crate::core::table::TrackTable;

impl Volume {
    /// Plans a host write, locking the tracks it touches. On `Err(track)`
    /// nothing is held: wait for that track and plan again.
    pub fn plan_write(&self, t: &Ticket, offset: u64, len: u64) -> Result<WritePlan, Wait> {
        self.plan(t, offset, len, Payload::Data)
    }

    /// Plans a discard or write-zeroes of `offset..offset+len`: a write of
    /// zeros under exactly the rules of [`Volume::plan_write`], in every
    /// state. So a zeroed range is mirrored (established), recorded as
    /// changed (split, degraded), and during a restore a pending track it
    /// covers whole is restored without a copy (claim 5) while one it covers
    /// in part is merged (claim 6: the secondary's track with the range
    /// zeroed goes to the primary); either way the track is restored and
    /// changed, so nothing zeroed on the primary can come back from the
    /// secondary (a copy of the track waits for its lock, then finds it
    /// restored). Deterministic zeros rather than "contents undefined" keep
    /// the two devices byte-identical, which `verify` and every later copy
    /// rely on.
    pub fn plan_zero(
        &self,
        t: &Ticket,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<WritePlan, Wait> {
        self.plan(t, offset, len, Payload::Zeros { unmap })
    }

    fn plan(
        &self,
        _t: &Ticket,
        offset: u64,
        len: u64,
        payload: Payload,
    ) -> Result<WritePlan, Wait> {
        let state = self.state();
        let spans: PlanVec<TrackSpan> = self.geometry.spans(offset, len).collect();
        let actions: PlanVec<Action> = spans.iter().map(|s| self.action_for(state, s)).collect();
        let holds = self.lock_tracks(&spans, &actions)?;
        // Decisions were taken before the locks; a copy or merge may have
        // restored a track since. Under the locks they are stable.
        let changed = spans
            .iter()
            .zip(&actions)
            .any(|(s, a)| self.action_for(state, s) != *a);
        if changed {
            self.release(&holds);
            return self.plan(_t, offset, len, payload);
        }
        Ok(self.build_write(&spans, &actions, holds, payload))
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
    ) -> Result<PlanVec<(Track, Hold)>, Wait> {
        let mut holds = PlanVec::with_capacity(spans.len());
        for (span, action) in spans.iter().zip(actions) {
            let hold = match action {
                Action::Merge => Hold::Exclusive,
                Action::Mirror => {
                    let start = span.offset - self.geometry.track_extent(span.track).0;
                    Hold::Mirrored {
                        start: start as u32,
                        end: (start + span.len) as u32,
                    }
                }
                _ => Hold::Shared,
            };
            let ok = match hold {
                Hold::Shared => self.locks.try_shared(span.track),
                Hold::Mirrored { start, end } => self.locks.try_mirrored(span.track, start, end),
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
                Hold::Mirrored { start, end } => self.locks.release_mirrored(t, start, end),
                Hold::Exclusive => self.locks.release_exclusive(t),
            }
        }
        if holds.iter().any(|h| h.1 == Hold::Exclusive) {
            self.bump();
        } else if !holds.is_empty() {
            self.wake_progress();
        }
    }

    fn build_write(
        &self,
        spans: &[TrackSpan],
        actions: &[Action],
        holds: PlanVec<(Track, Hold)>,
        payload: Payload,
    ) -> WritePlan {
        let mut plan = WritePlan {
            payload,
            steps: PlanVec::new(),
            commit_before_issue: None,
            on_logged: None,
            holds,
            restores: PlanVec::new(),
            mirrors: PlanVec::new(),
        };
        for (span, action) in spans.iter().zip(actions) {
            let t = span.track;
            let need = match action {
                Action::Mirror => self.mark_intent(t),
                Action::PrimaryStale => self.clock.needed_for(&self.tables.stale, t),
                // A track a logged write restored: no commit of its own.
                // The write is as durable as the one that restored the
                // track: after its record is written a kill keeps both,
                // and a power cut makes the track pending again, the
                // resumed restore copying the secondary over both (lost
                // unflushed writes); a host flush, or this write if FUA,
                // waits for the commit that settles it.
                Action::PrimaryChanged if self.restore_log.holds(t) => {
                    self.tables.changed.set(t);
                    let logged = self.restore_log.entry_of(t);
                    plan.on_logged = Logged::join(plan.on_logged, logged);
                    // A track the copy restored (`log_restored`) may not be
                    // pending again after a power cut (its own bit may be
                    // durable already), so the write's data may stay: its
                    // "changed" bit needs the region's intent, durable
                    // before it is issued, as any primary write's does.
                    if self.restore_log.copied(t) {
                        self.mark_intent(t)
                    } else {
                        None
                    }
                }
                Action::PrimaryChanged => {
                    // "changed" is exact in memory and committed lazily; the
                    // region's write intent, durable before the write is
                    // issued, covers a crash (`recover_intents` folds it
                    // into "changed"), as it covers mirror writes. So a
                    // write to a warm region needs no commit at all.
                    self.tables.changed.set(t);
                    // claim 7 during a restore: the track's "restored" bit
                    // (cleared by the copy, or by a neighbour's in the
                    // same word) must survive a restart before new data
                    // on top is acknowledged.
                    let restored = match self.clock.needed_for(&self.tables.pending, t) {
                        Some(settle) => match self.log_restored(t, settle) {
                            logged @ Some(_) => {
                                plan.on_logged = Logged::join(plan.on_logged, logged);
                                None
                            }
                            None => Some(settle),
                        },
                        None => None,
                    };
                    later(self.mark_intent(t), restored)
                }
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

    /// Logs `t`, not pending in memory but maybe pending on disk until
    /// commit `settle`, so that a write on top of it waits for a restore
    /// log record (one metadata write) instead of that commit (a flush of
    /// both devices), as a write on top of a merge does: after `kill -9`
    /// the record keeps the track restored; after a power cut the track is
    /// either pending again, copied over the unflushed write, or was
    /// restored on disk already (only a neighbour's bit was not durable),
    /// and the write's intent covers its "changed" bit. A flush or FUA
    /// waits for `settle`. `None`: no log (off, failed or full), wait for
    /// `settle` before issuing the write.
    fn log_restored(&self, t: Track, settle: CommitSeq) -> Option<Logged> {
        if !self.restore_log_enabled() {
            return None;
        }
        let record = self.restore_log.append_copied(t, settle)?;
        Some(Logged { record, settle })
    }

    /// Sets the write intent of `t`'s region and notes the region as
    /// written for the aging pass. A region (64 tracks, one word of the
    /// table) is marked whole: its durability is tracked per word anyway,
    /// and the next write anywhere in it then finds its bit set and durable
    /// and needs no commit. A crash resyncs the region whole.
    fn mark_intent(&self, t: Track) -> Option<CommitSeq> {
        let region = t / 64;
        // Read first: a warm region costs no write to a shared line.
        if !self.intent_recent.get(region) {
            self.intent_recent.set(region);
        }
        if !self.tables.intent.get(t) {
            self.tables.intent.set_word(t);
        }
        self.clock.needed_for(&self.tables.intent, t)
    }

    /// Sets a bit that must be durable before data is written under it.
    fn mark(&self, table: &TrackTable, t: Track) -> Option<CommitSeq> {
        table.set(t);
        self.clock.needed_for(table, t)
    }

    fn push_step(&self, steps: &mut PlanVec<WriteStep>, span: &TrackSpan, action: Action) {
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
            // "changed" bit set, and its region's intent durable, before
            // the write was issued. Mirrored
            // tracks need more: see `primary_write_failed`.
            if !outcome.not_issued {
                self.primary_write_failed(&plan.mirrors);
            }
            self.release(&plan.holds);
            return WriteDone {
                ok: false,
                ack_after: None,
                logged: None,
            };
        }
        let mut ack = None;
        if mirrored && self.state() == VolumeState::Degraded {
            // The secondary may lack this write: record it like a split write.
            for &(t, _) in &plan.holds {
                ack = later(ack, self.mark(&self.tables.changed, t));
            }
        }
        let logged = self.restored_by_write(&plan, &mut ack);
        self.release(&plan.holds);
        WriteDone {
            ok: true,
            ack_after: ack,
            logged,
        }
    }

    /// Claims 5, 6: the write put whole tracks on the primary; they are
    /// restored now. "changed" is set before "pending" is cleared and the
    /// store takes pending first, so no commit records a track as neither
    /// (the resync would miss it).
    ///
    /// The acknowledgement must wait until a restart would find them
    /// restored, or a resumed restore would copy the old data over this
    /// write: until a restore log record carries them (`core::restore_log`:
    /// no device flush), or, without the log, until the commit that
    /// clears "pending" is durable. Either way the commit flushes the
    /// primary first, except after a merge written with FUA (made only
    /// when there is no log: it is durable on its own, and the commit is
    /// then one metadata write, not a flush of the whole primary with
    /// whatever the copy left in its cache).
    fn restored_by_write(&self, plan: &WritePlan, ack: &mut Option<CommitSeq>) -> Option<Logged> {
        if plan.restores.is_empty() {
            return None;
        }
        let log = self.restore_log_enabled();
        for &t in &plan.restores {
            // `configured`, not `log`: a merge issued while the log still
            // worked was written without FUA even if the log failed since.
            if self.restore_log.configured() || !plan.merges(t) {
                self.need_flush(DevSet::PRIMARY);
            }
            self.tables.changed.set(t);
            self.tables.pending.clear(t);
        }
        let settle = self.clock.next();
        if log {
            if let Some(record) = self.restore_log.append(&plan.restores, settle) {
                return Some(Logged { record, settle });
            }
        }
        for &t in &plan.restores {
            *ack = later(*ack, self.clock.needed_for(&self.tables.pending, t));
            *ack = later(*ack, self.clock.needed_for(&self.tables.changed, t));
        }
        None
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
                self.sync_stale();
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
