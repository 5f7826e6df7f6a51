//! The restore log on the metadata device: its records' writer and their
//! replay at open. What the log is for, and why a record is enough, is in
//! `core::restore_log`; the byte map is in docs/design.md ("Restore log").

use super::device::MetaDevice;
use super::format::{RestoreRecord, Superblock, LOG_SLOT_BYTES};
use crate::backend::buf::AlignedBuf;
use crate::core::{Track, Volume};
use std::io;

/// Writes restore log records, on a handle of its own to the metadata
/// ([`MetaDevice::log_handle`]: buffered, so a record's write ends in the
/// page cache), so that a host write waiting for a record never waits
/// behind a commit's flushes or the copy's I/O.
pub struct RestoreLogWriter<D> {
    dev: D,
    uuid: [u8; 16],
    boot: [u8; 16],
    slots: [u64; 2],
}

impl<D: MetaDevice> RestoreLogWriter<D> {
    /// `None` when the log cannot be used: the boot is unknown, or the
    /// device cannot be opened a second time.
    pub(crate) fn new(dev: &D, sb: &Superblock) -> Option<Self> {
        let Some(boot) = dev.boot_id() else {
            log::warn!(
                "the kernel's boot id is unknown: restoring writes wait for metadata commits"
            );
            return None;
        };
        let dev = dev.log_handle().ok()?;
        Some(RestoreLogWriter {
            dev,
            uuid: sb.uuid,
            boot,
            slots: [sb.layout.log_offset(0), sb.layout.log_offset(1)],
        })
    }

    /// Writes the record the volume wants, if any; returns whether it
    /// wrote one. A failure turns the log off: the writes waiting for it
    /// wait for a commit instead.
    pub fn write(&mut self, vol: &Volume) -> io::Result<bool> {
        let Some((seq, tracks)) = vol.take_restore_log() else {
            return Ok(false);
        };
        let record = RestoreRecord {
            boot: self.boot,
            seq,
            tracks,
        };
        let mut b = AlignedBuf::new(record.encoded_len());
        record.encode(&self.uuid, &mut b);
        match self.dev.write_at(&b, self.slots[(seq % 2) as usize]) {
            Ok(()) => {
                vol.restore_log_written(seq);
                Ok(true)
            }
            Err(e) => {
                log::error!(
                    "restore log write failed ({e}): writes that restore a track wait for a \
                     metadata commit from now on"
                );
                vol.restore_log_failed();
                Err(e)
            }
        }
    }

    /// The tracks the records of this boot name (both slots: each record
    /// is a fact about this restore, see `core::restore_log`).
    pub(crate) fn read_own(&self, dev: &mut D) -> io::Result<Vec<Track>> {
        let mut tracks = Vec::new();
        let mut b = AlignedBuf::new(LOG_SLOT_BYTES as usize);
        for &at in &self.slots {
            dev.read_at(&mut b, at)?;
            match RestoreRecord::decode(&b, &self.uuid) {
                Some(r) if r.boot == self.boot => tracks.extend(r.tracks),
                _ => {}
            }
        }
        Ok(tracks)
    }
}
