//! What the core tells an executor to do: the plans for host requests and
//! copies. Offsets are absolute byte offsets on the devices (the volume's
//! offset N is offset N on both the primary and the secondary).

use super::commit::CommitSeq;
use super::geometry::Track;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dev {
    Primary,
    Secondary,
}

impl Dev {
    /// The device's place in per-device arrays (fds, caches): the primary
    /// first, the secondary second. The one place this order is written.
    pub fn index(self) -> usize {
        match self {
            Dev::Primary => 0,
            Dev::Secondary => 1,
        }
    }
}

/// A set of data devices (for writes and flushes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevSet {
    pub primary: bool,
    pub secondary: bool,
}

impl DevSet {
    pub const NONE: DevSet = DevSet {
        primary: false,
        secondary: false,
    };
    pub const PRIMARY: DevSet = DevSet {
        primary: true,
        secondary: false,
    };
    pub const SECONDARY: DevSet = DevSet {
        primary: false,
        secondary: true,
    };
    pub const BOTH: DevSet = DevSet {
        primary: true,
        secondary: true,
    };

    pub fn union(self, o: DevSet) -> DevSet {
        DevSet {
            primary: self.primary || o.primary,
            secondary: self.secondary || o.secondary,
        }
    }

    pub fn devs(self) -> impl Iterator<Item = Dev> {
        let p = self.primary.then_some(Dev::Primary);
        let s = self.secondary.then_some(Dev::Secondary);
        p.into_iter().chain(s)
    }
}

/// Read `len` bytes at `offset` of `dev` into the request buffer at `buf_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSeg {
    pub dev: Dev,
    pub offset: u64,
    pub len: u64,
    pub buf_offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Write the host bytes `buf_offset..+len` at `offset` on `devs`.
    Direct {
        devs: DevSet,
        offset: u64,
        len: u64,
        buf_offset: u64,
    },
    /// Claims 6, 8, 9: read the secondary's whole track
    /// (`track_offset..+track_len`), overlay the host bytes
    /// (`buf_offset..+len`, landing at `offset`), write the combined track
    /// to the primary with FUA (the commit that records it restored does
    /// not flush the primary for it).
    Merge {
        track: Track,
        track_offset: u64,
        track_len: u64,
        offset: u64,
        len: u64,
        buf_offset: u64,
    },
}

/// What a host write puts on its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The request's own bytes.
    Data,
    /// Zeros: a discard or a write-zeroes. Both mean "the range reads back
    /// as zeros" on both devices, so the mirror stays byte-identical;
    /// `unmap`: the devices may deallocate the range (a discard, or a
    /// write-zeroes without NOUNMAP) instead of writing it.
    Zeros { unmap: bool },
}

/// How a request holds one track while it is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    Shared,
    /// Shared, with the bytes `start..end` of the track (a mirrored write:
    /// see the locks' notes on overlapping writes).
    Mirrored {
        start: u32,
        end: u32,
    },
    Exclusive,
}

/// A planned host write. Run [`WritePlan::steps`] (after
/// `commit_before_issue` is durable), then hand the plan back to
/// [`super::Volume::finish_write`]. Each step puts [`WritePlan::payload`]
/// on its range: the host's bytes, or zeros (a `Direct` step then zeroes
/// the range on its devices, a `Merge` overlays zeros instead of host bytes).
/// Per-request lists, inline up to a few tracks: a host write plans and
/// runs without touching the allocator (a request of more tracks than
/// that spills to the heap).
pub type PlanVec<T> = smallvec::SmallVec<[T; 4]>;

#[derive(Debug)]
pub struct WritePlan {
    pub payload: Payload,
    pub steps: PlanVec<WriteStep>,
    /// Bits this write set (changed since split, write intent, ...) must be
    /// durable before any data reaches a device: wait for this commit.
    pub commit_before_issue: Option<CommitSeq>,
    pub(crate) holds: PlanVec<(Track, Hold)>,
    /// The write goes on top of tracks a logged write restored, whose
    /// "restored" bits are not durable: it is acknowledged as that write is
    /// (see [`Logged`]), or a restart could find them pending and copy the
    /// secondary over it.
    pub on_logged: Option<Logged>,
    /// Pending tracks this write makes restored once its data is on primary.
    pub(crate) restores: PlanVec<Track>,
    /// Tracks written to both devices (their secondary copy is meant to
    /// stay identical).
    pub(crate) mirrors: PlanVec<Track>,
}

impl WritePlan {
    pub fn devs(&self) -> DevSet {
        self.steps.iter().fold(DevSet::NONE, |acc, s| match s {
            WriteStep::Direct { devs, .. } => acc.union(*devs),
            WriteStep::Merge { .. } => acc.union(DevSet::PRIMARY),
        })
    }

    /// Whether track `t` is merged by this write. A merge's track write
    /// must carry FUA: `finish_write` records the track restored without
    /// asking the next commit to flush the primary for it.
    pub fn merges(&self, t: Track) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, WriteStep::Merge { track, .. } if *track == t))
    }

    /// Tracks this write makes restored (claims 5, 6), for tests and stats.
    pub fn restores(&self) -> &[Track] {
        &self.restores
    }
}

/// Whether a host read may be repaired from the secondary (see
/// [`super::Volume::lock_for_repair`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairLock {
    /// The secondary's copy of the track is not known identical: no repair.
    NotIdentical,
    /// A write or copy holds the track; try again shortly.
    Busy,
    /// Locked exclusive and known identical: read the secondary, rewrite
    /// the primary, then [`super::Volume::unlock_repair`].
    Locked,
}

/// What the executor reports back about a write's data I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    pub primary_failed: bool,
    pub secondary_failed: bool,
    /// The write was abandoned before any data was issued (its bits could
    /// not be made durable): no device was touched.
    pub not_issued: bool,
}

/// How a host write ends: `ok` is the status for the host, and the
/// acknowledgement waits until `ack_after` is durable and `logged` is
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteDone {
    pub ok: bool,
    pub ack_after: Option<CommitSeq>,
    pub logged: Option<Logged>,
}

/// A write that restored tracks, acknowledged once restore log record
/// `record` is written (see `core::restore_log`); if the log fails first,
/// once commit `settle` is durable. A FUA write waits for `settle` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    pub record: super::restore_log::RecordSeq,
    pub settle: CommitSeq,
}

impl Logged {
    /// What waiting for both `a` and `b` takes.
    pub fn join(a: Option<Logged>, b: Option<Logged>) -> Option<Logged> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Logged {
                record: a.record.max(b.record),
                settle: a.settle.max(b.settle),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// One track to copy from `from` to `to`; the track is locked exclusive
/// until [`super::Volume::finish_copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyJob {
    pub track: Track,
    pub from: Dev,
    pub to: Dev,
    pub offset: u64,
    pub len: u64,
}
