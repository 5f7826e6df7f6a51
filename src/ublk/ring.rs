//! `RingBackend`: the host path's backend on a ublk queue. Target I/O goes
//! onto the queue's own io_uring as SQEs, awaited by the tag's task.

use crate::backend::buf::{AlignedBuf, BufCache, FileBufs};
use crate::backend::hostbuf::Fixed;
use crate::backend::kick::Kick;
use crate::backend::transfer::Transfer;
use crate::backend::{Backend, DevFds};
use crate::core::Dev;
use crate::edge::metrics::Metrics;
use crate::exec::load::HostLoad;
use crate::metadata::CommitHandle;
use io_uring::{opcode, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use std::io;
use std::sync::Arc;

/// The host path's backend on a ublk queue: target I/O goes onto the
/// queue's own io_uring, so waiting never blocks the queue's other tags.
pub(super) struct RingBackend {
    pub(super) fds: DevFds,
    pub(super) commit: CommitHandle,
    pub(super) load: Arc<HostLoad>,
    pub(super) metrics: Arc<Metrics>,
    /// This queue has logged the switch to degraded (once per queue).
    pub(super) degraded_logged: std::cell::Cell<bool>,
    /// Track buffers for merges, reused.
    pub(super) merge_bufs: Arc<BufCache>,
    /// With zero copy: track buffers in a memfd, so that a merge can copy
    /// registered host bytes into one (see [`FileBufs`]).
    pub(super) file_bufs: Option<Arc<FileBufs>>,
    /// Wakes this queue's thread out of its ring when a waiting request is
    /// woken from another thread (see [`watch_kicks`]).
    pub(super) kick: Arc<Kick>,
}

/// Track buffers a queue keeps for merges (more in flight are allocated).
pub(super) const MERGE_BUFS_KEPT: usize = 16;

impl RingBackend {
    fn fd(&self, dev: Dev) -> types::Fd {
        types::Fd(self.fds.get(dev))
    }

    /// Reads (`write_fua` None) or writes bytes of a request registered in
    /// this queue's ring (zero copy) at `offset` of `fd`. The kernel
    /// addresses a registered request's pages from 0, so the "address" is
    /// the offset into them.
    async fn fixed_io(
        &self,
        fd: types::Fd,
        offset: u64,
        f: Fixed,
        write_fua: Option<bool>,
    ) -> io::Result<()> {
        let mut t = Transfer::new(f.len);
        while !t.is_complete() {
            let at = (f.at + t.done()) as u64;
            let len = t.remaining() as u32;
            let pos = offset + t.done() as u64;
            let sqe = match write_fua {
                None => opcode::ReadFixed::new(fd, at as *mut u8, len, f.index)
                    .offset(pos)
                    .build(),
                Some(fua) => opcode::WriteFixed::new(fd, at as *const u8, len, f.index)
                    .offset(pos)
                    .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                    .build(),
            };
            t.advance(submit(sqe).await.map(|n| n as usize))?;
        }
        Ok(())
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

/// The queue's kick task: keeps a poll of the kick eventfd in the queue's
/// ring, so a kick from another thread ends the ring's wait and the queue
/// runs the tasks that were woken. It never ends; the queue drops it.
pub(super) async fn watch_kicks(kick: Arc<Kick>) {
    loop {
        let sqe = opcode::PollAdd::new(types::Fd(kick.fd()), libc::POLLIN as u32).build();
        if submit(sqe).await.is_err() {
            // The ring is going down (or cannot poll): nothing to watch.
            return;
        }
        kick.drain();
    }
}

impl Backend for RingBackend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut t = Transfer::new(buf.len());
        while !t.is_complete() {
            let rest = &mut buf[t.done()..];
            let sqe = opcode::Read::new(self.fd(dev), rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + t.done() as u64)
                .build();
            t.advance(submit(sqe).await.map(|n| n as usize))?;
        }
        Ok(())
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let mut t = Transfer::new(buf.len());
        while !t.is_complete() {
            let rest = &buf[t.done()..];
            let sqe = opcode::Write::new(self.fd(dev), rest.as_ptr(), rest.len() as u32)
                .offset(offset + t.done() as u64)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build();
            t.advance(submit(sqe).await.map(|n| n as usize))?;
        }
        Ok(())
    }

    async fn read_fixed(&self, dev: Dev, offset: u64, f: Fixed) -> io::Result<()> {
        self.fixed_io(self.fd(dev), offset, f, None).await
    }

    async fn write_fixed(&self, dev: Dev, offset: u64, f: Fixed, fua: bool) -> io::Result<()> {
        self.fixed_io(self.fd(dev), offset, f, Some(fua)).await
    }

    async fn copy_fixed(&self, f: Fixed, buf: &mut AlignedBuf, at: usize) -> io::Result<bool> {
        let Some(fb) = &self.file_bufs else {
            return Ok(false);
        };
        let Some(offset) = fb.file_offset(buf, at) else {
            return Ok(false);
        };
        assert!(at + f.len <= buf.len());
        // Into the memfd's page cache, which is `buf`'s memory.
        self.fixed_io(types::Fd(fb.fd()), offset, f, Some(false))
            .await
            .map(|()| true)
    }

    async fn flush(&self, dev: Dev) -> io::Result<()> {
        let sqe = opcode::Fsync::new(self.fd(dev))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(sqe).await.map(|_| ())
    }

    async fn fallocate(&self, dev: Dev, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let sqe = opcode::Fallocate::new(self.fd(dev), len)
            .offset(offset)
            .mode(mode)
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

    fn request_log(&self) {
        self.commit.request_log();
    }

    fn waker(&self, w: &std::task::Waker) -> std::task::Waker {
        self.kick.waker(w)
    }

    fn buffer(&self, len: usize) -> AlignedBuf {
        match self.file_bufs.as_ref().and_then(|fb| fb.get(len)) {
            Some(b) => b,
            None => self.merge_bufs.get(len),
        }
    }

    fn commit_failed(&self) -> bool {
        self.commit.failed().is_some()
    }
}
