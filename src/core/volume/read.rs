//! Host reads and flushes: where each byte of a read comes from and which
//! devices a flush must reach. Reads never lock and never wait.

use super::{Ticket, Volume};
use crate::core::plan::*;
use crate::core::state::VolumeState;
use std::sync::atomic::Ordering::SeqCst;

impl Volume {
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
}
