//! Crash-consistent metadata: the track tables, the volume state and the
//! running operation, on a metadata file or block device.
//! (Skeleton: the signatures are the contract with the server and the CLI.)

use crate::core::{DevSet, Volume};
use crate::error::Result;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What the metadata is bound to; `open` refuses metadata made for other
/// devices (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Bytes the volume presents (the primary's size).
    pub volume_size: u64,
    pub track_size: u64,
    pub primary_size: u64,
    pub secondary_size: u64,
}

/// Makes the data devices' copies durable before a commit records them.
pub type DataFlush = Box<dyn FnMut(DevSet) -> io::Result<()> + Send>;

pub struct MetadataStore {
    _private: (),
}

impl MetadataStore {
    /// Writes fresh metadata for `vol`. Refuses valid existing metadata
    /// unless `force`.
    pub fn format(_path: &Path, _binding: &Binding, _vol: &Volume, _force: bool) -> Result<Self> {
        todo!("metadata::format")
    }
    /// Loads the metadata and the volume it describes (tables, state, the
    /// running operation).
    pub fn open(_path: &Path, _binding: &Binding) -> Result<(Self, Volume)> {
        todo!("metadata::open")
    }
    /// One group commit of everything that changed in `vol` since the last.
    pub fn commit(&mut self, _vol: &Volume, _flush_data: &mut DataFlush) -> io::Result<()> {
        todo!("metadata::commit")
    }
}

/// The thread that commits on request (and every `interval` for lazy
/// intent clearing).
pub struct Committer {
    _private: (),
}

#[derive(Clone)]
pub struct CommitHandle {
    _private: (),
}

impl CommitHandle {
    pub fn request(&self) {}
    /// The last commit error, while commits fail.
    pub fn failed(&self) -> Option<String> {
        None
    }
}

impl Committer {
    pub fn start(
        _store: MetadataStore,
        _vol: Arc<Volume>,
        _flush_data: DataFlush,
        _interval: Duration,
    ) -> Committer {
        todo!("Committer::start")
    }
    pub fn handle(&self) -> CommitHandle {
        todo!()
    }
    /// Stops the thread after a final commit.
    pub fn stop(self) -> io::Result<()> {
        todo!()
    }
}
