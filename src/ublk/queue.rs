//! One queue: its thread and executor, one task per tag parked in the
//! kernel until a request arrives, and the handling of one request
//! through the host path.

use super::ring::{watch_kicks, RingBackend, MERGE_BUFS_KEPT};
use super::QueueCtx;
use crate::backend::buf::{BufCache, FileBufs};
use crate::backend::hostbuf::{Fixed, HostBytes, HostBytesMut};
use crate::backend::kick::Kick;
use crate::core::{Volume, VolumeState};
use crate::edge::metrics::HostOp;
use crate::exec::host;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use std::io;
use std::rc::Rc;

pub(super) fn queue_thread(qid: u16, dev: &UblkDev, ctx: QueueCtx) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let kick = match Kick::new() {
        Ok(k) => k,
        Err(e) => {
            log::error!("ublk queue {qid}: creating its wake-up eventfd: {e}");
            return;
        }
    };
    let track = ctx.vol.geometry().track_size() as usize;
    // Without them a merge writes around the host's bytes (three writes).
    let file_bufs = q
        .support_auto_buf_zc()
        .then(|| FileBufs::new(track, MERGE_BUFS_KEPT))
        .and_then(|r| {
            r.map_err(|e| log::warn!("ublk queue {qid}: no memfd merge buffers: {e}"))
                .ok()
        });
    let backend = Rc::new(RingBackend {
        fds: ctx.fds,
        commit: ctx.commit.clone(),
        load: ctx.load.clone(),
        metrics: ctx.metrics.clone(),
        degraded_logged: std::cell::Cell::new(false),
        merge_bufs: BufCache::new(track, MERGE_BUFS_KEPT),
        file_bufs,
        kick: kick.clone(),
    });
    // Not among `tasks`: the queue is done when its tags are.
    let _kicks = exe.spawn(watch_kicks(kick));
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
    let metrics = ctx.metrics.clone();
    smol::block_on(exe.run(async move {
        // Called once per wait in the ring, after the completions it
        // brought have been handed to their tasks.
        let run_ops = || {
            metrics.ring_wait();
            while ex.try_tick() {}
        };
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
}

/// Where a tag's request data is while the server handles it.
enum TagBuf {
    /// The tag's own buffer: the kernel copies a write's bytes in before
    /// the request arrives and a read's bytes out after it completes.
    Mem(IoBuf<u8>),
    /// Zero copy (`UBLK_F_AUTO_BUF_REG`): the kernel registers the
    /// request's pages in the queue's ring at buffer index `tag` before
    /// the request arrives and unregisters them when it completes. The
    /// host path reaches them by fixed-buffer I/O only.
    Registered,
}

/// The automatic registration of `tag`'s request pages: at index `tag`
/// of the sparse table libublk registers in the queue's ring (one slot per
/// tag, so a slot is always free when its tag gets a request). With the
/// fallback flag a failed registration still delivers the request, marked
/// `UBLK_IO_F_NEED_REG_BUF`, instead of failing it (see `Tag::handle`).
fn auto_reg(tag: u16) -> sys::ublk_auto_buf_reg {
    sys::ublk_auto_buf_reg {
        index: tag,
        flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
        ..Default::default()
    }
}

/// What a tag's task serves its requests with, for all of them.
struct Tag<'a, 'q> {
    q: &'a UblkQueue<'q>,
    tag: u16,
    vol: &'a Volume,
    b: &'a RingBackend,
    /// The largest request the device takes (bytes).
    max: usize,
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    vol: &Volume,
    b: &RingBackend,
) -> Result<(), UblkError> {
    let t = Tag {
        q,
        tag,
        vol,
        b,
        max: q.dev.dev_info.max_io_buf_bytes as usize,
    };
    let mut buf = if q.support_auto_buf_zc() {
        TagBuf::Registered
    } else {
        TagBuf::Mem(IoBuf::<u8>::new(t.max))
    };
    match &buf {
        TagBuf::Mem(m) => {
            q.submit_io_prep_cmd(tag, BufDesc::Slice(m.as_slice()), 0, Some(m))
                .await?
        }
        TagBuf::Registered => {
            q.submit_io_prep_cmd(tag, BufDesc::AutoReg(auto_reg(tag)), 0, None)
                .await?
        }
    };
    loop {
        let res = t.handle(&mut buf).await;
        let desc = match &buf {
            TagBuf::Mem(m) => BufDesc::Slice(m.as_slice()),
            TagBuf::Registered => BufDesc::AutoReg(auto_reg(tag)),
        };
        q.submit_io_commit_cmd(tag, desc, res).await?;
    }
}

impl Tag<'_, '_> {
    /// Runs one request; returns its result for the kernel (bytes or
    /// -errno).
    async fn handle(&self, buf: &mut TagBuf) -> i32 {
        let (q, tag) = (self.q, self.tag);
        // The kernel could not register this request's pages on its own
        // (it says so with `UBLK_IO_F_NEED_REG_BUF`): registered here at
        // the same index for this request, and unregistered before it
        // completes.
        let iod = q.get_iod(tag);
        let register =
            matches!(buf, TagBuf::Registered) && iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0;
        if register {
            let r = q.submit_register_io_buf(tag, tag).await;
            if r < 0 {
                // Its bytes are reachable no other way.
                log::error!("tag {tag}: registering the request's buffer: {}", errno(r));
                return -libc::EIO;
            }
        }
        let res = self.serve(buf).await;
        if register {
            let r = q.submit_unregister_io_buf(tag, tag).await;
            if r < 0 {
                log::warn!(
                    "tag {tag}: unregistering the request's buffer: {}",
                    errno(r)
                );
            }
        }
        res
    }

    /// [`Tag::handle`] once the request's bytes are reachable.
    async fn serve(&self, buf: &mut TagBuf) -> i32 {
        let (vol, b) = (self.vol, self.b);
        let iod = self.q.get_iod(self.tag);
        let op = iod.op_flags & 0xff;
        let offset = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        let in_range = len <= self.max && vol.geometry().contains(offset, len as u64);
        let fixed = Fixed {
            index: self.tag,
            at: 0,
            len,
        };
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let kind = match op {
            sys::UBLK_IO_OP_READ => HostOp::Read,
            sys::UBLK_IO_OP_WRITE => HostOp::Write,
            sys::UBLK_IO_OP_DISCARD => HostOp::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => HostOp::WriteZeroes,
            _ => HostOp::Flush,
        };
        // One clock read serves the metrics and the copy engine's latency
        // histogram (below).
        let _busy = b.load.enter_untimed();
        let started = std::time::Instant::now();
        let res = match op {
            sys::UBLK_IO_OP_READ if in_range => {
                let to = match buf {
                    TagBuf::Mem(m) => HostBytesMut::Mem(&mut m.as_mut_slice()[..len]),
                    TagBuf::Registered => HostBytesMut::Fixed(fixed),
                };
                host::read(vol, b, offset, to).await
            }
            sys::UBLK_IO_OP_WRITE if in_range => {
                let from = match buf {
                    TagBuf::Mem(m) => HostBytes::Mem(&m.as_slice()[..len]),
                    TagBuf::Registered => HostBytes::Fixed(fixed),
                };
                host::write(vol, b, offset, from, fua).await
            }
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => return -libc::EINVAL,
            sys::UBLK_IO_OP_FLUSH => host::flush(vol, b).await,
            // No data buffer: the length is bounded by the device's discard
            // limits, not by the buffer.
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
                if vol.geometry().contains(offset, len as u64) =>
            {
                // A discard may unmap; so may a write-zeroes unless the
                // caller asked to keep the range allocated.
                let unmap =
                    op == sys::UBLK_IO_OP_DISCARD || iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0;
                host::zero(vol, b, offset, len as u64, unmap, fua).await
            }
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => return -libc::EINVAL,
            _ => return -libc::EOPNOTSUPP,
        };
        let took = started.elapsed();
        b.metrics.host(kind, len as u64, took, res.is_ok());
        // Reads' and writes' latencies tell the copy engine how much it may copy.
        if kind != HostOp::Flush {
            b.load.record(took);
        }
        if matches!(kind, HostOp::Write | HostOp::Discard | HostOp::WriteZeroes)
            && vol.state() == VolumeState::Degraded
            && !b.degraded_logged.replace(true)
        {
            log::error!(
                "volume degraded: the secondary failed while mirroring and was split off; \
                 host I/O goes on to the primary"
            );
        }
        match res {
            // The kernel reads no byte count for discard and write-zeroes.
            Ok(()) if matches!(kind, HostOp::Discard | HostOp::WriteZeroes) => 0,
            Ok(()) => len as i32,
            Err(e) => {
                log::warn!("host request op {op} at {offset}+{len} failed: {e}");
                -host_errno(&e)
            }
        }
    }
}

fn errno(negative: i32) -> io::Error {
    io::Error::from_raw_os_error(-negative)
}

/// The errno a failed request reports to the kernel. ENOSPC (a thin or
/// file-backed primary out of space; EDQUOT is the same to a block device)
/// keeps its meaning, so a filesystem above can tell "full" from "broken";
/// everything else is EIO, the one error every block layer user expects.
fn host_errno(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errno_keeps_enospc_and_maps_the_rest_to_eio() {
        let errno = |n| host_errno(&io::Error::from_raw_os_error(n));
        assert_eq!(errno(libc::ENOSPC), libc::ENOSPC);
        assert_eq!(errno(libc::EDQUOT), libc::ENOSPC);
        assert_eq!(errno(libc::EIO), libc::EIO);
        assert_eq!(errno(libc::EBADF), libc::EIO);
        assert_eq!(
            host_errno(&io::Error::other("metadata commit failed")),
            libc::EIO
        );
    }
}
