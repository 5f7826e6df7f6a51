//! The host path: runs host reads, writes and flushes through the core's
//! plans against a [`Backend`]. A ublk queue calls exactly these functions;
//! so do the crash soak, the benches and the simulation, each with its own
//! backend. Everything here is async and never blocks the thread: a request
//! that must wait (for a track, a commit or a state change) yields to the
//! other requests of its executor.

use crate::core::{
    CommitSeq, Dev, ReadSeg, RepairLock, Ticket, Volume, Wait, WriteOutcome, WritePlan, WriteStep,
};
use std::io;

/// What an executor offers the host path: device I/O, a way to wait, and
/// the metadata committer.
#[allow(async_fn_in_trait)]
pub trait Backend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    async fn flush(&self, dev: Dev) -> io::Result<()>;
    /// Yields for a short while: something the caller waits for (a track
    /// lock, a commit, a state change) is being done elsewhere.
    async fn pause(&self);
    /// Sleeps about `d`: the caller knows when it has work again (the copy
    /// engine waiting for rate-limit tokens). Waking every `pause` instead
    /// costs 10 000 wake-ups a second for nothing.
    async fn sleep(&self, _d: std::time::Duration) {
        self.pause().await
    }
    /// Asks the metadata committer for a commit soon.
    fn request_commit(&self);
    /// Whether metadata commits are failing: a write that needs one must
    /// not be acknowledged.
    fn commit_failed(&self) -> bool {
        false
    }
    /// A buffer suitable for direct I/O (merges and copies). Its contents
    /// are unspecified: every user reads into it before writing it out.
    fn buffer(&self, len: usize) -> AlignedBuf {
        AlignedBuf::new(len)
    }
}

/// Admits a request, waiting out any state change.
pub async fn admit<'v, B: Backend>(vol: &'v Volume, b: &B) -> crate::core::Ticket<'v> {
    loop {
        match vol.enter() {
            Ok(t) => return t,
            Err(_) => b.pause().await,
        }
    }
}

/// Waits until commit `seq` is durable.
pub async fn wait_commit<B: Backend>(vol: &Volume, b: &B, seq: CommitSeq) -> io::Result<()> {
    if vol.clock.is_durable(seq) {
        return Ok(());
    }
    let _waiting = vol.clock.wait_guard();
    while !vol.clock.is_durable(seq) {
        if b.commit_failed() {
            return Err(io::Error::other("metadata commit failed"));
        }
        b.request_commit();
        b.pause().await;
    }
    Ok(())
}

/// Host read of `buf.len()` bytes at `offset`.
pub async fn read<B: Backend>(vol: &Volume, b: &B, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let ticket = admit(vol, b).await;
    let segs = vol.plan_read(&ticket, offset, buf.len() as u64);
    for ReadSeg {
        dev,
        offset,
        len,
        buf_offset,
    } in segs
    {
        let range = buf_offset as usize..(buf_offset + len) as usize;
        match b.read(dev, offset, &mut buf[range.clone()]).await {
            Ok(()) => {}
            Err(e) if dev == Dev::Primary => {
                read_repair(vol, b, &ticket, offset, &mut buf[range], e).await?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A primary read failed: serves each track of the range whose secondary
/// copy is known identical from the secondary and rewrites the whole track
/// on the primary (a disk remaps bad sectors on write), as md raid1 does.
/// A track that cannot be repaired fails the read with the primary's error.
async fn read_repair<B: Backend>(
    vol: &Volume,
    b: &B,
    ticket: &Ticket<'_>,
    offset: u64,
    out: &mut [u8],
    error: io::Error,
) -> io::Result<()> {
    for span in vol.geometry().spans(offset, out.len() as u64) {
        let part = &mut out[span.buf_offset as usize..(span.buf_offset + span.len) as usize];
        // Only the tracks that still fail need the secondary.
        if b.read(Dev::Primary, span.offset, part).await.is_ok() {
            continue;
        }
        loop {
            match vol.lock_for_repair(ticket, span.track) {
                RepairLock::NotIdentical => return Err(error),
                RepairLock::Busy => b.pause().await,
                RepairLock::Locked => break,
            }
        }
        let repaired = repair_track(vol, b, span.track, span.offset, part).await;
        vol.unlock_repair(span.track);
        if let Err(e) = repaired {
            log::warn!(
                "track {}: primary read failed ({error}) and the secondary could not serve it: {e}",
                span.track
            );
            return Err(error);
        }
    }
    Ok(())
}

/// Under the track's exclusive lock: reads the secondary's track into
/// `part` (the host's bytes at `offset`) and rewrites the primary's track.
async fn repair_track<B: Backend>(
    vol: &Volume,
    b: &B,
    track: crate::core::Track,
    offset: u64,
    part: &mut [u8],
) -> io::Result<()> {
    let (track_offset, track_len) = vol.geometry().track_extent(track);
    let mut data = b.buffer(track_len as usize);
    b.read(Dev::Secondary, track_offset, &mut data).await?;
    let at = (offset - track_offset) as usize;
    part.copy_from_slice(&data[at..at + part.len()]);
    match b.write(Dev::Primary, track_offset, &data, false).await {
        Ok(()) => {
            vol.note_read_repair();
            log::warn!("track {track}: primary read error repaired from the secondary");
        }
        // The host still gets the right bytes; the next read tries again.
        Err(e) => log::error!("track {track}: rewriting the primary after a read error: {e}"),
    }
    Ok(())
}

/// Host write of `buf` at `offset`; with `fua` the data is durable on
/// return. Returns once the write may be acknowledged.
pub async fn write<B: Backend>(
    vol: &Volume,
    b: &B,
    offset: u64,
    buf: &[u8],
    fua: bool,
) -> io::Result<()> {
    loop {
        let ticket = admit(vol, b).await;
        let plan = match vol.plan_write(&ticket, offset, buf.len() as u64) {
            Ok(plan) => plan,
            Err(Wait::Track(_)) | Err(Wait::Transition) => {
                drop(ticket);
                b.pause().await;
                continue;
            }
        };
        if let Some(seq) = plan.commit_before_issue {
            if let Err(e) = wait_commit(vol, b, seq).await {
                vol.finish_write(
                    plan,
                    WriteOutcome {
                        primary_failed: true,
                        not_issued: true,
                        ..Default::default()
                    },
                );
                return Err(e);
            }
        }
        let (outcome, primary_error) = run_steps(b, &plan, buf, fua).await;
        let done = vol.finish_write(plan, outcome);
        if let Some(seq) = done.ack_after {
            wait_commit(vol, b, seq).await?;
        }
        drop(ticket);
        return match (done.ok, primary_error) {
            (true, _) => Ok(()),
            // The primary's own error (ENOSPC from a thin or file-backed
            // primary must reach the host as ENOSPC, not as EIO).
            (false, Some(e)) => Err(e),
            (false, None) => Err(io::Error::from_raw_os_error(libc::EIO)),
        };
    }
}

/// Runs a write's data I/O; returns what failed and the primary's error.
async fn run_steps<B: Backend>(
    b: &B,
    plan: &WritePlan,
    buf: &[u8],
    fua: bool,
) -> (WriteOutcome, Option<io::Error>) {
    let mut out = WriteOutcome::default();
    let mut primary_error = None;
    for step in &plan.steps {
        match *step {
            WriteStep::Direct {
                devs,
                offset,
                len,
                buf_offset,
            } => {
                let data = &buf[buf_offset as usize..(buf_offset + len) as usize];
                let (p, s) = smol::future::zip(
                    async {
                        if devs.primary {
                            b.write(Dev::Primary, offset, data, fua).await
                        } else {
                            Ok(())
                        }
                    },
                    async {
                        !devs.secondary || b.write(Dev::Secondary, offset, data, fua).await.is_ok()
                    },
                )
                .await;
                if let Err(e) = p {
                    out.primary_failed = true;
                    primary_error = Some(e);
                }
                out.secondary_failed |= !s;
            }
            WriteStep::Merge {
                track_offset,
                track_len,
                offset,
                len,
                buf_offset,
                ..
            } => {
                let host = &buf[buf_offset as usize..(buf_offset + len) as usize];
                if let Err(e) = merge(b, track_offset, track_len, offset, host, fua).await {
                    out.primary_failed = true;
                    primary_error = Some(e);
                }
            }
        }
        if out.primary_failed {
            break;
        }
    }
    (out, primary_error)
}

/// Claim 6: the secondary's track combined with the host's bytes lands on
/// the primary as one whole track.
async fn merge<B: Backend>(
    b: &B,
    track_offset: u64,
    track_len: u64,
    offset: u64,
    host: &[u8],
    fua: bool,
) -> io::Result<()> {
    let mut track = b.buffer(track_len as usize);
    b.read(Dev::Secondary, track_offset, &mut track).await?;
    let at = (offset - track_offset) as usize;
    track[at..at + host.len()].copy_from_slice(host);
    b.write(Dev::Primary, track_offset, &track, fua).await
}

/// Host flush: every device that holds acknowledged data. Its result is
/// the primary's: a secondary whose flush fails is split off (degraded,
/// see `Volume::secondary_flush_failed`) and the host never hears of it.
pub async fn flush<B: Backend>(vol: &Volume, b: &B) -> io::Result<()> {
    let ticket = admit(vol, b).await;
    let devs = vol.plan_flush(&ticket);
    let (p, s) = smol::future::zip(
        async {
            if devs.primary {
                b.flush(Dev::Primary).await
            } else {
                Ok(())
            }
        },
        async {
            if devs.secondary {
                b.flush(Dev::Secondary).await
            } else {
                Ok(())
            }
        },
    )
    .await;
    // Still admitted: no state change runs between the flush and this.
    if let Err(e) = s {
        secondary_flush_failed(vol, &e);
    }
    drop(ticket);
    p
}

/// A failed secondary flush anywhere (host flush, state change, commit):
/// the secondary is split off, with one log line.
pub fn secondary_flush_failed(vol: &Volume, e: &io::Error) -> bool {
    let changed = vol.secondary_flush_failed();
    if changed {
        log::error!(
            "secondary flush failed ({e}): its cache may have lost writes, so it is split off \
             (volume degraded, every track marked changed); host I/O goes on to the primary; \
             repair or replace the secondary, then `establish`"
        );
    }
    changed
}

/// A buffer aligned to 4096 bytes, for O_DIRECT: from the heap, or lent by
/// a backend's registered pool (and given back to it on drop).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    lender: Option<std::sync::Arc<dyn Lender>>,
}

/// Where a lent [`AlignedBuf`] goes back to when dropped.
pub trait Lender: Send + Sync {
    fn give_back(&self, ptr: std::ptr::NonNull<u8>, len: usize);
}

// SAFETY: AlignedBuf owns its allocation (or its lent region) exclusively,
// like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).expect("buffer layout")
    }

    pub fn new(len: usize) -> Self {
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        let ptr = std::ptr::NonNull::new(raw)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        AlignedBuf {
            ptr,
            len,
            lender: None,
        }
    }

    /// A buffer over `len` bytes at `ptr` that `lender` owns.
    ///
    /// # Safety
    /// `ptr` must be 4096-aligned and valid for `len` bytes, used by nothing
    /// else until `lender.give_back(ptr, len)`.
    pub unsafe fn lent(
        ptr: std::ptr::NonNull<u8>,
        len: usize,
        lender: std::sync::Arc<dyn Lender>,
    ) -> Self {
        AlignedBuf {
            ptr,
            len,
            lender: Some(lender),
        }
    }
}

impl AlignedBuf {
    /// Gives up ownership of a heap buffer (from `new`) without freeing it.
    fn into_raw(self) -> std::ptr::NonNull<u8> {
        debug_assert!(self.lender.is_none());
        let me = std::mem::ManuallyDrop::new(self);
        me.ptr
    }

    /// Frees a buffer from `new`/`into_raw`.
    ///
    /// # Safety
    /// `ptr` must come from `AlignedBuf::new(len)` and be unused.
    unsafe fn dealloc(ptr: std::ptr::NonNull<u8>, len: usize) {
        std::alloc::dealloc(ptr.as_ptr(), Self::layout(len))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.lender.take() {
            Some(l) => l.give_back(self.ptr, self.len),
            // SAFETY: allocated in `new` with the same layout.
            None => unsafe { Self::dealloc(self.ptr, self.len) },
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Recycles track-sized buffers for a backend without a registered pool
/// (a ublk queue's merges). A fresh 128 KiB heap buffer is an mmap, page
/// faults and an munmap with its TLB shootdown; in the VM profile of
/// host writes during a restore that was a quarter of the queue thread's
/// CPU.
pub struct BufCache {
    len: usize,
    keep: usize,
    free: std::sync::Mutex<Vec<FreeBuf>>,
}

/// A buffer in the cache: owned by it alone.
struct FreeBuf(std::ptr::NonNull<u8>);

// SAFETY: a cached buffer is plain memory that nobody else references.
unsafe impl Send for FreeBuf {}

impl BufCache {
    /// Caches up to `keep` buffers of `len` bytes.
    pub fn new(len: usize, keep: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(BufCache {
            len,
            keep,
            free: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<FreeBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes: a cached one if `len` is the cache's size.
    pub fn get(self: &std::sync::Arc<Self>, len: usize) -> AlignedBuf {
        if len != self.len {
            return AlignedBuf::new(len);
        }
        let ptr = match self.free().pop() {
            Some(FreeBuf(p)) => p,
            None => AlignedBuf::new(len).into_raw(),
        };
        // SAFETY: `ptr` is an aligned allocation of `len` bytes (from
        // `AlignedBuf::new`) that only the cache held.
        unsafe { AlignedBuf::lent(ptr, len, self.clone()) }
    }
}

impl Lender for BufCache {
    fn give_back(&self, ptr: std::ptr::NonNull<u8>, len: usize) {
        let mut free = self.free();
        if free.len() < self.keep {
            free.push(FreeBuf(ptr));
        } else {
            drop(free);
            // SAFETY: allocated by `AlignedBuf::new` with this length.
            unsafe { AlignedBuf::dealloc(ptr, len) }
        }
    }
}

impl Drop for BufCache {
    fn drop(&mut self) {
        for FreeBuf(p) in self.free().drain(..) {
            // SAFETY: as in `give_back`.
            unsafe { AlignedBuf::dealloc(p, self.len) }
        }
    }
}

/// How busy the host is, for the copy engine to yield to it. Whoever runs
/// host requests (a ublk queue, a bench) holds a [`HostLoad::enter`] guard
/// per request; the engine only reads the counters. Two relaxed atomics per
/// request: cheap enough for the fast path.
#[derive(Debug, Default)]
pub struct HostLoad {
    inflight: std::sync::atomic::AtomicU64,
    started: std::sync::atomic::AtomicU64,
}

pub struct HostLoadGuard<'a>(&'a HostLoad);

impl HostLoad {
    pub fn enter(&self) -> HostLoadGuard<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        self.started.fetch_add(1, Relaxed);
        self.inflight.fetch_add(1, Relaxed);
        HostLoadGuard(self)
    }

    /// Host requests in flight now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Host requests started so far (compare two readings to see whether
    /// the host was active in between).
    pub fn started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HostLoadGuard<'_> {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_cache_reuses_track_buffers_and_keeps_only_so_many() {
        let cache = BufCache::new(8192, 1);
        let a = cache.get(8192);
        let first = a.as_ptr();
        assert_eq!(first as usize % AlignedBuf::ALIGN, 0);
        drop(a);
        let b = cache.get(8192);
        assert_eq!(b.as_ptr(), first, "the freed buffer comes back");
        let c = cache.get(8192);
        assert_ne!(c.as_ptr(), first);
        drop(b);
        drop(c); // beyond `keep`: freed
        assert_eq!(cache.free().len(), 1);
        let other = cache.get(4096);
        assert_eq!(other.len(), 4096, "other sizes come from the heap");
    }
}
