//! The ublk block device (libublk): creates `/dev/ublkbN`, runs one thread
//! per queue with one async task per tag, and serves each request through
//! the host path over the queue's own io_uring.
//!
//! This file owns `serve` (the device's life from add or recovery to
//! delete) and what it is given. The rest by concern:
//!
//! - `device.rs`: adding, recovering and deleting the device, the id file;
//! - `queue.rs`: the queue thread, one task per tag, one request's handling;
//! - `ring.rs`: `RingBackend`, the host path's backend on the queue's ring.

mod device;
mod queue;
mod ring;

use crate::backend::device::Zeroing;
use crate::backend::DevFds;
use crate::core::Volume;
use crate::edge::metrics::Metrics;
use crate::exec::load::HostLoad;
use crate::metadata::CommitHandle;
use device::{
    add_device, delete_device, previous, recovery_flags, write_id, zero_copy_flags, Previous,
};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use queue::queue_thread;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// How the block device looks to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct DeviceParams {
    /// -1: the kernel picks N.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    /// Zero copy if the driver can (`ublk.zero_copy: auto`).
    pub zero_copy: bool,
    pub size: u64,
    /// 512 or more: the smallest direct I/O the data devices take. Host
    /// requests are passed through unsplit, so the device must not accept
    /// anything smaller.
    pub logical_block: u32,
    /// What both data devices can zero without writing; discard and
    /// write-zeroes are offered only as far as they can.
    pub zeroing: Zeroing,
    /// The volume's track size: bounds how many tracks one discard or
    /// write-zeroes request spans.
    pub track_size: u64,
}

/// Tracks one discard or write-zeroes request may span: each is planned
/// and locked like a write, so a request stays a bounded piece of work
/// (the kernel splits larger ones).
const MAX_ZERO_TRACKS: u64 = 256;

/// The discard / write-zeroes parameters of the device, or `None` when
/// neither is offered (then the kernel never sends either, and
/// write-zeroes users such as `BLKZEROOUT` write zero pages themselves).
fn discard_params(p: &DeviceParams) -> Option<sys::ublk_param_discard> {
    let z = p.zeroing;
    if !z.discard && !z.write_zeroes {
        return None;
    }
    let max_sectors = ((MAX_ZERO_TRACKS * p.track_size) >> 9).min(u64::from(u32::MAX)) as u32;
    Some(sys::ublk_param_discard {
        discard_alignment: 0,
        // At least a logical block and 4 KiB; a device's own coarser
        // granularity keeps discards it would only half honour away.
        discard_granularity: z.granularity.max(p.logical_block).max(4096),
        max_discard_sectors: if z.discard { max_sectors } else { 0 },
        max_write_zeroes_sectors: if z.write_zeroes { max_sectors } else { 0 },
        max_discard_segments: 1,
        ..Default::default()
    })
}

/// What every queue thread needs; cheap to clone.
#[derive(Clone)]
pub struct QueueCtx {
    pub vol: Arc<Volume>,
    /// Raw fds of the primary and the secondary, kept open by the server
    /// for as long as the device exists.
    pub fds: DevFds,
    pub commit: CommitHandle,
    /// Host requests in flight: the copy engine backs off while there are.
    pub load: Arc<HostLoad>,
    pub metrics: Arc<Metrics>,
}

/// Whether the device's queues run with zero copy (it was added with
/// automatic buffer registration).
pub fn zero_copy_on(ctrl: &UblkCtrl) -> bool {
    ctrl.dev_info().flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0
}

/// How the device of this run came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A new device (no earlier one was recorded).
    Created,
    /// The device a crashed server left behind, taken over (user recovery):
    /// `/dev/ublkbN` stayed, and host I/O blocked on it goes on.
    Recovered,
    /// An earlier device was recorded but could not be recovered: it was
    /// deleted (if it was ours) and a new one created.
    Recreated,
}

/// Creates and starts the device, calls `started` once it is usable (on
/// the calling thread; the device stays up until `started` returns and
/// the device is stopped, e.g. with `UblkCtrl::kill_dev`), and returns once
/// every queue has wound down. The device is deleted when this returns.
///
/// `id_file` records the device's id while the server runs: a server
/// killed without a clean stop leaves it behind, and the next `serve`
/// recovers that device (user recovery) instead of adding a new one.
pub fn serve<W>(
    p: DeviceParams,
    ctx: QueueCtx,
    id_file: &Path,
    started: W,
) -> Result<Origin, String>
where
    W: FnOnce(&UblkCtrl, Origin) + Send + Sync + 'static,
{
    // Optional driver features are enabled only when the driver reports
    // them: a device asking for a missing one hangs rather than failing.
    let features = UblkCtrl::get_features();
    match features {
        Some(f) => log::info!("ublk driver features {f:#x}"),
        None => log::info!("ublk driver does not report features (kernel before 6.5)"),
    }
    let recovery = recovery_flags(features.unwrap_or(0));
    if recovery == 0 {
        log::info!("no user recovery in the driver: a crashed server's device will be recreated");
    }
    let zero_copy = zero_copy_flags(features.unwrap_or(0), p.zero_copy);
    let flags = recovery | zero_copy;
    let mut origin = Origin::Created;
    let mut recover = None;
    match previous(id_file, &p, recovery != 0) {
        Previous::None => {}
        Previous::Recoverable(id) => {
            match UblkCtrl::new_simple(id as i32).and_then(|c| c.start_user_recover()) {
                Ok(r) if r >= 0 => recover = Some(id),
                Ok(r) => {
                    log::warn!(
                        "cannot recover /dev/ublkb{id}: {}",
                        io::Error::from_raw_os_error(-r)
                    );
                    delete_device(id);
                    origin = Origin::Recreated;
                }
                Err(e) => {
                    log::warn!("cannot recover /dev/ublkb{id}: {e}");
                    delete_device(id);
                    origin = Origin::Recreated;
                }
            }
        }
        Previous::Stale { id, why, delete } => {
            log::warn!("/dev/ublkb{id} of an earlier run {why}");
            if delete {
                delete_device(id);
            }
            origin = Origin::Recreated;
        }
    }
    let ctrl = match recover {
        Some(id) => match UblkCtrlBuilder::default()
            .name("splitmirror")
            .id(id as i32)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
        {
            Ok(c) => {
                origin = Origin::Recovered;
                c
            }
            Err(e) => {
                log::warn!("cannot recover /dev/ublkb{id}: {e}");
                delete_device(id);
                origin = Origin::Recreated;
                add_device(&p, flags)?
            }
        },
        None if recovery != 0 => {
            log::info!("creating the device with user recovery (flags {flags:#x})");
            add_device(&p, flags)?
        }
        None => add_device(&p, flags)?,
    };
    // A recovered device keeps the flags it was added with: its queues
    // follow them, not this run's config.
    let zc = zero_copy_on(&ctrl);
    log::info!(
        "zero copy: {}",
        match (zc, p.zero_copy) {
            (true, _) => "on (the kernel registers each request's pages; no copy to the server)",
            (false, false) => "off (ublk.zero_copy: off)",
            (false, true) if zero_copy == 0 =>
                "off (the driver lacks automatic buffer registration)",
            (false, true) => "off (the recovered device was created without it)",
        }
    );
    let tgt_init = move |dev: &mut UblkDev| {
        let tgt = &mut dev.tgt;
        tgt.dev_size = p.size;
        // Each request may have a few target I/Os in flight at once (a
        // mirrored write, a commit wait's timeouts): room for them.
        tgt.sq_depth = (u32::from(p.depth) * 4).min(32768) as u16;
        tgt.cq_depth = tgt.sq_depth;
        let lbs_shift = p.logical_block.trailing_zeros() as u8;
        let discard = discard_params(&p);
        match discard {
            Some(d) => log::info!(
                "offering discard: {}, write-zeroes: {} (up to {} bytes a request, granularity {})",
                d.max_discard_sectors > 0,
                d.max_write_zeroes_sectors > 0,
                u64::from(d.max_discard_sectors.max(d.max_write_zeroes_sectors)) << 9,
                d.discard_granularity
            ),
            None => log::info!(
                "not offering discard or write-zeroes: the data devices cannot both zero a range without writing it"
            ),
        }
        tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC
                | if discard.is_some() {
                    sys::UBLK_PARAM_TYPE_DISCARD
                } else {
                    0
                },
            discard: discard.unwrap_or_default(),
            basic: sys::ublk_param_basic {
                // A volatile write cache with FUA: the kernel sends flushes
                // and FUA writes, which reach the data devices.
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: lbs_shift,
                physical_bs_shift: lbs_shift.max(12),
                io_opt_shift: 12,
                io_min_shift: lbs_shift,
                max_sectors: p.max_io >> 9,
                dev_sectors: p.size >> 9,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };
    let id_path = id_file.to_path_buf();
    let recorded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rec = recorded.clone();
    ctrl.run_target(
        tgt_init,
        move |qid, dev: &UblkDev| queue_thread(qid, dev, ctx),
        move |ctrl: &UblkCtrl| {
            let id = ctrl.dev_info().dev_id;
            let path = ctrl.get_bdev_path();
            match origin {
                Origin::Created => log::info!("created {path}"),
                Origin::Recovered => log::info!("recovered {path}"),
                Origin::Recreated => {
                    log::warn!("recreated {path} (not recovered): reopen or remount it")
                }
            }
            match write_id(&id_path, id) {
                Ok(()) => rec.store(true, std::sync::atomic::Ordering::SeqCst),
                Err(e) => log::warn!(
                    "cannot record the device id in {}: {e}; a crashed server's device \
                     will not be recovered",
                    id_path.display()
                ),
            }
            started(ctrl, origin)
        },
    )
    .map_err(|e| format!("ublk device failed: {e}"))?;
    if let Err(e) = ctrl.del_dev() {
        log::debug!("deleting the ublk device: {e}");
    }
    // A clean stop: nothing for the next run to recover.
    if recorded.load(std::sync::atomic::Ordering::SeqCst) {
        if let Err(e) = std::fs::remove_file(id_file) {
            log::debug!("removing {}: {e}", id_file.display());
        }
    }
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(zeroing: Zeroing) -> DeviceParams {
        DeviceParams {
            id: -1,
            queues: 1,
            depth: 128,
            max_io: 512 << 10,
            zero_copy: true,
            size: 1 << 30,
            logical_block: 512,
            zeroing,
            track_size: 128 << 10,
        }
    }

    #[test]
    fn discard_is_offered_only_as_far_as_both_devices_zero() {
        assert!(discard_params(&params(Zeroing::default())).is_none());
        let wz_only = Zeroing {
            write_zeroes: true,
            ..Default::default()
        };
        let d = discard_params(&params(wz_only)).unwrap();
        assert_eq!(d.max_discard_sectors, 0);
        assert_eq!(d.max_write_zeroes_sectors, (256 * (128 << 10)) >> 9);
        let both = Zeroing {
            discard: true,
            write_zeroes: true,
            granularity: 1 << 20,
        };
        let d = discard_params(&params(both)).unwrap();
        assert_eq!(d.max_discard_sectors, d.max_write_zeroes_sectors);
        assert_eq!(d.max_discard_segments, 1, "the driver takes one segment");
        assert_eq!(d.discard_granularity, 1 << 20);
        let small = Zeroing {
            granularity: 512,
            ..both
        };
        assert_eq!(
            discard_params(&params(small)).unwrap().discard_granularity,
            4096
        );
    }
}
