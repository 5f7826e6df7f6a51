//! The ublk block device (libublk): creates `/dev/ublkbN`, runs one thread
//! per queue with one async task per tag, and serves each request through
//! the host path over the queue's own io_uring.

use crate::backend::buf::{AlignedBuf, BufCache};
use crate::backend::Backend;
use crate::core::{Dev, Volume, VolumeState};
use crate::edge::metrics::{HostOp, Metrics};
use crate::exec::host;
use crate::exec::load::HostLoad;
use crate::metadata::CommitHandle;
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// How the block device looks to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct DeviceParams {
    /// -1: the kernel picks N.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    pub size: u64,
    /// 512 or more: the smallest direct I/O the data devices take. Host
    /// requests are passed through unsplit, so the device must not accept
    /// anything smaller.
    pub logical_block: u32,
}

/// What every queue thread needs; cheap to clone.
#[derive(Clone)]
pub struct QueueCtx {
    pub vol: Arc<Volume>,
    /// Raw fds of the primary and the secondary, kept open by the server
    /// for as long as the device exists.
    pub fds: [RawFd; 2],
    pub commit: CommitHandle,
    /// Host requests in flight: the copy engine backs off while there are.
    pub load: Arc<HostLoad>,
    pub metrics: Arc<Metrics>,
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

/// The device of an earlier run, as found on `run`.
enum Previous {
    /// Nothing to do: none recorded, or it no longer exists.
    None,
    /// Quiesced by the death of its server: ready for `START_USER_RECOVERY`.
    Recoverable(u32),
    /// It exists but cannot be taken over; `delete` if it is ours.
    Stale { id: u32, why: String, delete: bool },
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
    // No other optional driver feature is enabled (zero copy, auto buffer
    // registration, quiesce, ...): 6.12 lacks most of them, and a device
    // asking for a missing one hangs rather than failing.
    let features = UblkCtrl::get_features();
    match features {
        Some(f) => log::info!("ublk driver features {f:#x}"),
        None => log::info!("ublk driver does not report features (kernel before 6.5)"),
    }
    let flags = recovery_flags(features.unwrap_or(0));
    if flags == 0 {
        log::info!("no user recovery in the driver: a crashed server's device will be recreated");
    }
    let mut origin = Origin::Created;
    let mut recover = None;
    match previous(id_file, &p, flags != 0) {
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
        None if flags != 0 => {
            log::info!("creating the device with user recovery (flags {flags:#x})");
            add_device(&p, flags)?
        }
        None => add_device(&p, flags)?,
    };
    let tgt_init = move |dev: &mut UblkDev| {
        let tgt = &mut dev.tgt;
        tgt.dev_size = p.size;
        // Each request may have a few target I/Os in flight at once (a
        // mirrored write, a commit wait's timeouts): room for them.
        tgt.sq_depth = (u32::from(p.depth) * 4).min(32768) as u16;
        tgt.cq_depth = tgt.sq_depth;
        let lbs_shift = p.logical_block.trailing_zeros() as u8;
        tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
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

fn add_device(p: &DeviceParams, flags: u64) -> Result<UblkCtrl, String> {
    UblkCtrlBuilder::default()
        .name("splitmirror")
        .id(p.id)
        .nr_queues(p.queues)
        .depth(p.depth)
        .io_buf_bytes(p.max_io)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| format!("cannot create the ublk device: {e}"))
}

/// The device flags for user recovery, given the driver's features.
///
/// With `UBLK_F_USER_RECOVERY` a device outlives its server: when the
/// server dies the kernel quiesces the queues (host I/O waits, nothing
/// fails) until a new server takes over. `UBLK_F_USER_RECOVERY_REISSUE`
/// decides what happens to the requests the dead server had taken but not
/// completed: without it they fail with EIO (a filesystem sees a failed
/// journal write and shuts itself down); with it they are sent again to
/// the new server. Re-sending is safe here: none of them was acknowledged,
/// a write is redone with the same data at the same place (the write
/// intent / changed bits it needs are set again before it is
/// acknowledged), and reads and flushes are idempotent. So reissue when
/// the driver can.
fn recovery_flags(features: u64) -> u64 {
    let rec = u64::from(sys::UBLK_F_USER_RECOVERY);
    let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    if features & rec == 0 {
        0
    } else {
        rec | (features & reissue)
    }
}

fn read_id(id_file: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(id_file).ok()?;
    match s.trim().parse() {
        Ok(id) => Some(id),
        Err(_) => {
            log::warn!("ignoring {}: not a device id", id_file.display());
            None
        }
    }
}

fn write_id(id_file: &Path, id: u32) -> io::Result<()> {
    if let Some(dir) = id_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = id_file.with_extension("ublk-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, id_file)
}

/// What became of the device recorded in `id_file`. It is taken for ours
/// when its queues, depth, buffer size and size match this volume's.
fn previous(id_file: &Path, p: &DeviceParams, can_recover: bool) -> Previous {
    // Without a record (e.g. /run was cleared), a fixed `ublk.id` names
    // the candidate.
    let recorded = read_id(id_file);
    let Some(id) = recorded.or(u32::try_from(p.id).ok()) else {
        return Previous::None;
    };
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        if recorded.is_some() {
            log::info!("/dev/ublkb{id} of an earlier run is gone: creating a new device");
        }
        return Previous::None;
    }
    let ctrl = match UblkCtrl::new_simple(id as i32) {
        Ok(c) => c,
        Err(e) => {
            return Previous::Stale {
                id,
                why: format!("cannot be inspected ({e}): left alone"),
                delete: false,
            }
        }
    };
    let info = ctrl.dev_info();
    let mut params = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    let size = ctrl
        .get_params(&mut params)
        .ok()
        .map(|_| params.basic.dev_sectors << 9);
    let ours = info.nr_hw_queues == p.queues
        && info.queue_depth == p.depth
        && info.max_io_buf_bytes == p.max_io
        && size == Some(p.size);
    if !ours {
        return Previous::Stale {
            id,
            why: "does not match this volume (another device took its number): left alone".into(),
            delete: false,
        };
    }
    if p.id >= 0 && id != p.id as u32 {
        return Previous::Stale {
            id,
            why: format!("is not the configured ublk.id {}: deleting it", p.id),
            delete: info.state != sys::UBLK_S_DEV_LIVE as u16,
        };
    }
    let state = u32::from(info.state);
    if state == sys::UBLK_S_DEV_LIVE {
        // Its server is alive (the data devices' O_EXCL opens make that
        // unlikely): not ours to take.
        return Previous::Stale {
            id,
            why: format!("is live (server pid {}): left alone", info.ublksrv_pid),
            delete: false,
        };
    }
    let can = info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0;
    if state == sys::UBLK_S_DEV_QUIESCED && can && can_recover {
        return Previous::Recoverable(id);
    }
    Previous::Stale {
        id,
        why: format!(
            "cannot be recovered (state {}, {}): deleting it",
            match state {
                sys::UBLK_S_DEV_DEAD => "dead".to_string(),
                sys::UBLK_S_DEV_QUIESCED => "quiesced".to_string(),
                s => s.to_string(),
            },
            if can {
                "created with user recovery"
            } else {
                "created without user recovery"
            }
        ),
        delete: true,
    }
}

fn delete_device(id: u32) {
    match UblkCtrl::new_simple(id as i32).and_then(|c| {
        let _ = c.kill_dev();
        c.del_dev()
    }) {
        Ok(_) => log::info!("deleted the stale /dev/ublkb{id}"),
        Err(e) => log::warn!("cannot delete the stale /dev/ublkb{id}: {e}"),
    }
}

fn queue_thread(qid: u16, dev: &UblkDev, ctx: QueueCtx) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let backend = Rc::new(RingBackend {
        fds: ctx.fds,
        commit: ctx.commit.clone(),
        load: ctx.load.clone(),
        metrics: ctx.metrics.clone(),
        degraded_logged: std::cell::Cell::new(false),
        merge_bufs: BufCache::new(ctx.vol.geometry().track_size() as usize, MERGE_BUFS_KEPT),
    });
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let b = backend.clone();
        let vol = ctx.vol.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, &vol, &b).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("ublk queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    let ex = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while ex.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    vol: &Volume,
    b: &RingBackend,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(q, tag, vol, b, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Runs one request; returns its result for the kernel (bytes or -errno).
async fn handle(q: &UblkQueue<'_>, tag: u16, vol: &Volume, b: &RingBackend, buf: &mut [u8]) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let in_range = len <= buf.len() && vol.geometry().contains(offset, len as u64);
    let _busy = b.load.enter();
    let started = std::time::Instant::now();
    let kind = match op {
        sys::UBLK_IO_OP_READ => HostOp::Read,
        sys::UBLK_IO_OP_WRITE => HostOp::Write,
        _ => HostOp::Flush,
    };
    let res = match op {
        sys::UBLK_IO_OP_READ if in_range => host::read(vol, b, offset, &mut buf[..len]).await,
        sys::UBLK_IO_OP_WRITE if in_range => {
            let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
            host::write(vol, b, offset, &buf[..len], fua).await
        }
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => return -libc::EINVAL,
        sys::UBLK_IO_OP_FLUSH => host::flush(vol, b).await,
        // Discard and write-zeroes are not advertised.
        _ => return -libc::EOPNOTSUPP,
    };
    b.metrics
        .host(kind, len as u64, started.elapsed(), res.is_ok());
    if kind == HostOp::Write
        && vol.state() == VolumeState::Degraded
        && !b.degraded_logged.replace(true)
    {
        log::error!(
            "volume degraded: the secondary failed while mirroring and was split off; \
             host I/O goes on to the primary"
        );
    }
    match res {
        Ok(()) => len as i32,
        Err(e) => {
            log::warn!("host request op {op} at {offset}+{len} failed: {e}");
            -libc::EIO
        }
    }
}

/// The host path's backend on a ublk queue: target I/O goes onto the
/// queue's own io_uring, so waiting never blocks the queue's other tags.
struct RingBackend {
    fds: [RawFd; 2],
    commit: CommitHandle,
    load: Arc<HostLoad>,
    metrics: Arc<Metrics>,
    /// This queue has logged the switch to degraded (once per queue).
    degraded_logged: std::cell::Cell<bool>,
    /// Track buffers for merges, reused.
    merge_bufs: Arc<BufCache>,
}

/// Track buffers a queue keeps for merges (more in flight are allocated).
const MERGE_BUFS_KEPT: usize = 16;

impl RingBackend {
    fn fd(&self, dev: Dev) -> types::Fd {
        types::Fd(match dev {
            Dev::Primary => self.fds[0],
            Dev::Secondary => self.fds[1],
        })
    }
}

/// Submits one SQE on this thread's queue ring and waits for its result.
async fn submit(sqe: io_uring::squeue::Entry) -> io::Result<i32> {
    let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res)
    }
}

fn short(done: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short transfer: {done} of {want} bytes"),
    )
}

impl Backend for RingBackend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let want = buf.len();
        let mut done = 0;
        while done < want {
            let rest = &mut buf[done..];
            let sqe = opcode::Read::new(self.fd(dev), rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            match submit(sqe).await {
                Ok(0) => return Err(short(done, want)),
                Ok(n) => done += n as usize,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let want = buf.len();
        let mut done = 0;
        while done < want {
            let rest = &buf[done..];
            let sqe = opcode::Write::new(self.fd(dev), rest.as_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build();
            match submit(sqe).await {
                Ok(0) => return Err(short(done, want)),
                Ok(n) => done += n as usize,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn flush(&self, dev: Dev) -> io::Result<()> {
        let sqe = opcode::Fsync::new(self.fd(dev))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(sqe).await.map(|_| ())
    }

    async fn pause(&self) {
        // The timespec lives in this future until the timeout completes.
        let ts = types::Timespec::new().nsec(100_000);
        let sqe = opcode::Timeout::new(&ts).build();
        // -ETIME is how a timeout ends; nothing else can go wrong here
        // that waiting longer would not also survive.
        let _ = submit(sqe).await;
    }

    fn request_commit(&self) {
        self.commit.request();
    }

    fn buffer(&self, len: usize) -> AlignedBuf {
        self.merge_bufs.get(len)
    }

    fn commit_failed(&self) -> bool {
        self.commit.failed().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_flags_follow_the_driver() {
        let rec = u64::from(sys::UBLK_F_USER_RECOVERY);
        let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
        assert_eq!(recovery_flags(0), 0);
        assert_eq!(recovery_flags(0x1fe), rec | reissue); // 6.12
        assert_eq!(recovery_flags(rec), rec);
        assert_eq!(recovery_flags(reissue), 0);
    }

    #[test]
    fn id_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/vol.ublk-id");
        assert_eq!(read_id(&f), None);
        write_id(&f, 7).unwrap();
        assert_eq!(read_id(&f), Some(7));
        std::fs::write(&f, "junk").unwrap();
        assert_eq!(read_id(&f), None);
    }
}
