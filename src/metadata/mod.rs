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
//! Use from the server (`edge::server` does this, with its devices' sync
//! as the data flush):
//!
//! ```no_run
//! use splitmirror::metadata::{Binding, Committer, DataFlush, MetadataStore};
//! use std::{path::Path, sync::Arc, time::Duration};
//!
//! fn serve(path: &Path, binding: &Binding) -> Result<(), Box<dyn std::error::Error>> {
//!     // A swapped device or foreign metadata is refused here (exit 2).
//!     let (store, vol) = MetadataStore::open(path, binding)?;
//!     let vol = Arc::new(vol);
//!     // Runs before every commit: the data the tables describe is durable first.
//!     let flush_data: DataFlush = Box::new(|_devs| Ok(()));
//!     let committer = Committer::start(store, vol.clone(), flush_data, Duration::from_secs(1));
//!     let commits = committer.handle();
//!     commits.request(); // what `Backend::request_commit` does
//!     assert!(commits.failed().is_none()); // `Backend::commit_failed`
//!     committer.stop()?; // the final commit, on SIGTERM
//!     Ok(())
//! }
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
