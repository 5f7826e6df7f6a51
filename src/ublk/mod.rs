//! The ublk block device (libublk): creates `/dev/ublkbN`, runs one thread
//! per queue with one async task per tag, and serves each request through
//! the host path over the queue's own io_uring.

use crate::core::{Dev, Volume, VolumeState};
use crate::hostpath::{self, Backend, HostLoad};
use crate::metadata::CommitHandle;
use crate::metrics::{HostOp, Metrics};
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use std::io;
use std::os::fd::RawFd;
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

/// Creates and starts the device, calls `started` once it is usable (on
/// the calling thread; the device stays up until `started` returns and
/// the device is stopped, e.g. with `UblkCtrl::kill_dev`), and returns once
/// every queue has wound down. The device is deleted when this returns.
pub fn serve<W>(p: DeviceParams, ctx: QueueCtx, started: W) -> Result<(), String>
where
    W: FnOnce(&UblkCtrl) + Send + Sync + 'static,
{
    // No optional driver feature is enabled (zero copy, auto buffer
    // registration, quiesce, ...): 6.12 lacks most of them, and a device
    // asking for a missing one hangs rather than failing. Logged for
    // diagnosis only.
    match UblkCtrl::get_features() {
        Some(f) => log::info!("ublk driver features {f:#x}"),
        None => log::info!("ublk driver does not report features (kernel before 6.5)"),
    }
    let ctrl = UblkCtrlBuilder::default()
        .name("splitmirror")
        .id(p.id)
        .nr_queues(p.queues)
        .depth(p.depth)
        .io_buf_bytes(p.max_io)
        .ctrl_flags(0)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| format!("cannot create the ublk device: {e}"))?;
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
    ctrl.run_target(
        tgt_init,
        move |qid, dev: &UblkDev| queue_thread(qid, dev, ctx),
        started,
    )
    .map_err(|e| format!("ublk device failed: {e}"))?;
    if let Err(e) = ctrl.del_dev() {
        log::debug!("deleting the ublk device: {e}");
    }
    Ok(())
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
        sys::UBLK_IO_OP_READ if in_range => hostpath::read(vol, b, offset, &mut buf[..len]).await,
        sys::UBLK_IO_OP_WRITE if in_range => {
            let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
            hostpath::write(vol, b, offset, &buf[..len], fua).await
        }
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => return -libc::EINVAL,
        sys::UBLK_IO_OP_FLUSH => hostpath::flush(vol, b).await,
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
}

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

    fn commit_failed(&self) -> bool {
        self.commit.failed().is_some()
    }
}
