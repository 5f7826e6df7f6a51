//! Volume states, the commands that move between them, and the copy
//! operation each state runs (names as in docs/interface.md).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Mirroring: writes go to both devices, reads come from the primary.
    Established,
    /// Establish copy primary→secondary in progress; host I/O live.
    Syncing,
    /// Secondary frozen; primary changes recorded in "changed since split".
    Split,
    /// Copy secondary→primary in progress; secondary write-disabled.
    Restoring,
    /// After a restore: tracks written during it go primary→secondary.
    Resyncing,
    /// The secondary failed while mirroring; behaves as split.
    Degraded,
}

impl VolumeState {
    pub const ALL: [VolumeState; 6] = [
        VolumeState::Established,
        VolumeState::Syncing,
        VolumeState::Split,
        VolumeState::Restoring,
        VolumeState::Resyncing,
        VolumeState::Degraded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VolumeState::Established => "established",
            VolumeState::Syncing => "syncing",
            VolumeState::Split => "split",
            VolumeState::Restoring => "restoring",
            VolumeState::Resyncing => "resyncing",
            VolumeState::Degraded => "degraded",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }

    /// The copy this state runs in the background, if any.
    pub fn copy_kind(self) -> Option<OperationKind> {
        match self {
            VolumeState::Syncing => Some(OperationKind::Establish),
            VolumeState::Restoring => Some(OperationKind::Restore),
            VolumeState::Resyncing => Some(OperationKind::Resync),
            _ => None,
        }
    }

    /// Whether host writes reach the secondary in this state.
    pub fn mirrors(self) -> bool {
        matches!(
            self,
            VolumeState::Established | VolumeState::Syncing | VolumeState::Resyncing
        )
    }
}

impl std::fmt::Display for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    Establish,
    Restore,
    Resync,
}

/// The copy operation in progress and how it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub kind: OperationKind,
    pub incremental: bool,
    pub protect: bool,
    /// Tracks to copy when the operation started (for progress).
    pub total: u64,
}

/// A state change asked for by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Command {
    Split,
    Establish { full: bool },
    Restore { incremental: bool, protect: bool },
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Split => "split",
            Command::Establish { .. } => "establish",
            Command::Restore { .. } => "restore",
        }
    }
}

/// A command that is not valid in the current state (exit code 3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} while the volume is {state}: {hint}")]
pub struct TransitionError {
    pub command: &'static str,
    pub state: VolumeState,
    pub hint: &'static str,
}

impl From<TransitionError> for crate::error::Error {
    fn from(e: TransitionError) -> Self {
        crate::error::Error::State(e.to_string())
    }
}

/// Whether `cmd` may run in `state`; the hint says what to do instead.
pub fn check_command(state: VolumeState, cmd: Command) -> Result<(), TransitionError> {
    use VolumeState::*;
    let hint = match (cmd, state) {
        (Command::Split, Established) => return Ok(()),
        (Command::Establish { .. }, Split | Degraded) => return Ok(()),
        (Command::Restore { .. }, Split) => return Ok(()),
        (_, Syncing | Restoring | Resyncing) => {
            "a copy is running; wait for it (`splitmirror wait`) and retry"
        }
        (Command::Split, Split | Degraded) => "the volume is already split",
        (Command::Establish { .. }, Established) => "the volume is already established",
        (Command::Restore { .. }, Established) => {
            "restore needs a split volume; `split` first (restore copies the split image back)"
        }
        (Command::Restore { .. }, Degraded) => {
            "the secondary failed; repair it and `establish` before restoring from it"
        }
    };
    Err(TransitionError {
        command: cmd.name(),
        state,
        hint,
    })
}
