//! Crash-consistent metadata: the track tables, the volume state and the
//! running operation, on a metadata file or block device.
//!
//! - [`format`]: the on-disk layout (superblock, two header slots, two
//!   copies of every table page) and its checksums;
//! - [`store`]: format, open and the shadow-paged commit, with the ordering
//!   rules that make it crash-consistent (explained there);
//! - [`committer`]: the thread that runs group commits;
//! - [`device`]: the metadata file or block device behind a [`MetaDevice`];
//! - [`identity`]: who a data device is, and what is already on it;
//! - [`restore_log`]: the restore log's writer and replay.
//!
//! Use from the server:
//!
//! ```ignore
//! let (store, vol) = MetadataStore::open(&cfg.metadata, &binding)?; // exit 2 on mismatch
//! let vol = Arc::new(vol);
//! let committer = Committer::start(store, vol.clone(), data_flush, Duration::from_millis(500));
//! let commits = committer.handle();
//! // Backend::request_commit → commits.request();
//! // Backend::commit_failed  → commits.failed().is_some();
//! committer.stop()?; // final commit on SIGTERM
//! ```

pub mod committer;
pub(crate) mod device;
pub mod format;
pub(crate) mod identity;
pub mod restore_log;
pub(crate) mod store;

use crate::core::DevSet;
use std::io;

pub use committer::{CommitHandle, Committer};
pub use device::{FileMeta, MetaDevice};
pub use restore_log::RestoreLogWriter;
pub use store::{CommitBatch, FormatOptions, MetadataStore, Replaced};

/// What the metadata is bound to; `open` refuses metadata made for other
/// devices (exit 2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// Bytes the volume presents (the primary's size).
    pub volume_size: u64,
    pub track_size: u64,
    pub primary_size: u64,
    pub secondary_size: u64,
    /// Who each device is ([`identity`]): recorded by `format`, checked
    /// by `run`, so a swapped, renumbered or replaced disk is refused.
    pub primary_id: String,
    pub secondary_id: String,
    /// The configured paths, for messages only (not recorded).
    pub primary_path: String,
    pub secondary_path: String,
}

/// Makes the data devices' copies durable before a commit records them.
pub type DataFlush = Box<dyn FnMut(DevSet) -> io::Result<()> + Send>;
