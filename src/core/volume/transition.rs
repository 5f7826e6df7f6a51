//! State changes: operator commands, moving on when a copy is done,
//! splitting the secondary off after a failure, and folding write intent
//! into the tables after a crash.

use super::Volume;
use crate::core::plan::*;
use crate::core::state::{
    check_command, Command, Operation, OperationKind, TransitionError, VolumeState,
};
use std::sync::atomic::Ordering::SeqCst;

impl Volume {
    /// A FLUSH of the secondary failed: whatever it had in its volatile
    /// cache may be lost. Every write it got since its last good flush is
    /// under a bit still: a mirrored write's write intent (set before the
    /// write, cleared only by the committer, which then flushes both
    /// devices before anything else), a copy's stale bit (cleared once the
    /// engine flushed the copy), or, for an intent cleared since the last
    /// good flush, `intent_unflushed`. So the secondary is split off with
    /// exactly those tracks recorded as changed, and the next `establish`
    /// (or `attach-secondary`) copies them, not the whole volume. From then
    /// on no commit waits for the secondary's flush. Returns whether the
    /// volume changed (false while restoring: the secondary is not written
    /// then, and the restore's start flushed it, so nothing depends on it).
    pub fn secondary_flush_failed(&self) -> bool {
        let _snapshot = self.lock_snapshot();
        if self.state() == VolumeState::Restoring || self.secondary_out.swap(true, SeqCst) {
            return false;
        }
        self.fold_unflushed_into_changed();
        self.set_operation(None);
        self.set_state(VolumeState::Degraded);
        true
    }

    /// What the secondary may lack or have lost becomes `changed`: the
    /// tracks under write intent while mirroring (outside a mirror intent
    /// only covers primary writes, whose "changed" bits are exact), those
    /// whose intent was cleared since its last good flush, and the stale
    /// ones (copies not yet done). Called before the state changes.
    fn fold_unflushed_into_changed(&self) {
        if self.state().mirrors() {
            self.tables.changed.merge_from(&self.tables.intent);
        }
        self.tables.changed.merge_from(&self.intent_unflushed);
        self.tables.changed.merge_from(&self.tables.stale);
        self.tables.stale.clear_all();
    }

    /// A flush of the secondary by the committer or by a state change
    /// succeeded: the writes under every intent cleared before it are
    /// durable there. The committer clears intent (aging) and flushes after
    /// clearing, on the same thread; a state change clears it (split) with
    /// every request drained and flushes after, with none admitted until
    /// it ends. So every write whose intent was cleared by the time this is
    /// called had completed before the flush began.
    pub fn secondary_flushed(&self) {
        if !self.intent_unflushed.is_clear() {
            self.intent_unflushed.clear_all();
        }
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
        self.fold_unflushed_into_changed();
        self.set_state(VolumeState::Degraded);
        self.set_operation(None);
    }

    /// The secondary is missing (absent or unopenable at start, or let go
    /// of to be reopened): the volume runs `degraded` on the primary alone.
    /// Every track that may differ between the two (changed since a split,
    /// stale, under write intent or cleared since the last good flush) is
    /// recorded as changed, so a later
    /// `establish` on the same disk copies just those; no commit waits for
    /// the secondary's flush meanwhile. Refused while restoring: the
    /// secondary then holds the part of the split image not yet on the
    /// primary. Returns the state the volume was in.
    pub fn secondary_missing(&self) -> Result<VolumeState, VolumeState> {
        let _snapshot = self.lock_snapshot();
        let state = self.state();
        if state == VolumeState::Restoring {
            return Err(state);
        }
        self.fold_unflushed_into_changed();
        self.secondary_out.store(true, SeqCst);
        if state != VolumeState::Degraded {
            self.set_operation(None);
            self.set_state(VolumeState::Degraded);
        }
        Ok(state)
    }

    /// A different disk is put in as the secondary: nothing on it is known,
    /// so every track is recorded as changed. Only while `degraded` with the
    /// secondary out (see `secondary_missing`); returns whether it applied.
    pub fn secondary_replaced(&self) -> bool {
        let _snapshot = self.lock_snapshot();
        if self.state() != VolumeState::Degraded || !self.secondary_out() {
            return false;
        }
        self.tables.changed.fill();
        self.bump();
        true
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
        if !self.state().mirrors() {
            self.drop_primary_intent();
        }
        let tables = &self.tables;
        match cmd {
            Command::Split => {
                // Drained: every mirror write has reached both devices,
                // though perhaps only their caches until this change's
                // flush (see `secondary_flush_failed`).
                self.intent_unflushed.merge_from(&tables.intent);
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

    pub(super) fn start(
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
                self.drop_primary_intent();
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

    /// Leaving a state without a mirror (drained, under the snapshot
    /// lock): its write intent covered only the primary writes whose exact
    /// "changed" bits were not durable yet, and this state change's commit
    /// carries those bits, so the intent is dropped with it rather than
    /// folded into the tables after a crash or a secondary failure later.
    fn drop_primary_intent(&self) {
        if !self.tables.intent.is_clear() {
            self.tables.intent.clear_all();
        }
    }

    /// An established volume whose `stale` tracks may differ between the
    /// two devices (a crash with writes in flight, a failed primary write)
    /// goes `syncing` to copy them primary→secondary.
    pub(super) fn sync_stale(&self) {
        let total = self.tables.stale.count();
        self.start(
            VolumeState::Syncing,
            OperationKind::Establish,
            true,
            false,
            total,
        );
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
                tables.stale.copy_from(&tables.intent);
                self.sync_stale();
            }
            VolumeState::Syncing | VolumeState::Resyncing => {
                tables.stale.merge_from(&tables.intent)
            }
            _ => tables.changed.merge_from(&tables.intent),
        }
        tables.intent.clear_all();
    }
}
