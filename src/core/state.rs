//! Volume states, the commands that move between them, and the copy
//! operation each state runs (names as in docs/interface.md).

use serde::{Deserialize, Serialize};

/// A volume's state. The names (`name`, serde, `Display`) are the ones
/// the control socket, the command line and the metrics show; the codes
/// (`code`) are the metadata header's, written out here so that reordering
/// the enum cannot change the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Mirroring: writes go to both devices, reads come from the primary.
    Established = 0,
    /// Establish copy primary→secondary in progress; host I/O live.
    Syncing = 1,
    /// Secondary frozen; primary changes recorded in "changed since split".
    Split = 2,
    /// Copy secondary→primary in progress; secondary write-disabled.
    Restoring = 3,
    /// After a restore: tracks written during it go primary→secondary.
    Resyncing = 4,
    /// The secondary failed while mirroring; behaves as split.
    Degraded = 5,
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

    /// The state's code in the metadata header (and in `Volume`'s atomic).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The state a metadata header's code names; `None` for a code no
    /// state has.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == c)
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

/// The copy an operation runs. Named and coded like `VolumeState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    Establish = 0,
    Restore = 1,
    Resync = 2,
}

impl OperationKind {
    pub const ALL: [OperationKind; 3] = [
        OperationKind::Establish,
        OperationKind::Restore,
        OperationKind::Resync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OperationKind::Establish => "establish",
            OperationKind::Restore => "restore",
            OperationKind::Resync => "resync",
        }
    }

    /// The kind's code in the metadata header.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind a metadata header's code names; `None` for a code no kind
    /// has.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata header stores these codes: they must never change.
    #[test]
    fn on_disk_codes_are_pinned() {
        let states = [
            (VolumeState::Established, 0),
            (VolumeState::Syncing, 1),
            (VolumeState::Split, 2),
            (VolumeState::Restoring, 3),
            (VolumeState::Resyncing, 4),
            (VolumeState::Degraded, 5),
        ];
        assert_eq!(states.len(), VolumeState::ALL.len());
        for (s, code) in states {
            assert_eq!(s.code(), code, "{s}");
            assert_eq!(VolumeState::from_code(code), Some(s));
        }
        let kinds = [
            (OperationKind::Establish, 0),
            (OperationKind::Restore, 1),
            (OperationKind::Resync, 2),
        ];
        assert_eq!(kinds.len(), OperationKind::ALL.len());
        for (k, code) in kinds {
            assert_eq!(k.code(), code, "{k}");
            assert_eq!(OperationKind::from_code(code), Some(k));
        }
        assert_eq!(VolumeState::from_code(6), None);
        assert_eq!(OperationKind::from_code(3), None);
    }

    /// The names shown everywhere (JSON, command line, metrics) are the
    /// ones `name` spells.
    #[test]
    fn names_are_the_serde_names() {
        for s in VolumeState::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
            assert_eq!(s.to_string(), s.name());
        }
        for k in OperationKind::ALL {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
            assert_eq!(k.to_string(), k.name());
        }
    }
}
