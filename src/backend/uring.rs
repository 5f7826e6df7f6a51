//! A standalone io_uring [`Backend`] for threads outside ublk: the copy
//! engine, control commands, the benches and the crash soak.
//!
//! One `UringBackend` belongs to one thread (it is `!Sync`): it owns a ring
//! and a tiny reactor. [`UringBackend::block_on`] polls one future (usually
//! a join of many) and, whenever that future is waiting, submits every SQE
//! the poll queued in one `io_uring_enter` and reaps the completions. So a
//! batch of copies or a queue of host requests all sit in the ring at once,
//! with one syscall per round instead of one per I/O.
//!
//! The backend opens nothing: it takes raw fds of the primary and the
//! secondary (opened with O_DIRECT by the caller) and never closes them.
//!
//! Copy and merge buffers come from a fixed pool of track-sized slots in one
//! aligned region registered with the ring, so those transfers use
//! `READ_FIXED`/`WRITE_FIXED` and the kernel skips pinning pages per I/O.
//! Any other buffer (a host request's) goes through plain `READ`/`WRITE`.

use crate::backend::buf::{AlignedBuf, Lender};
use crate::backend::kick::Kick;
use crate::backend::transfer::Transfer;
use crate::backend::{Backend, DevFds};
use crate::core::Dev;
use io_uring::{opcode, squeue, types, IoUring};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// How to build a [`UringBackend`].
#[derive(Debug, Clone, Copy)]
pub struct UringOptions {
    /// Submission queue entries (the completion queue gets twice as many).
    pub entries: u32,
    /// Slots in the registered buffer pool (`restore.max_inflight`).
    pub pool_buffers: usize,
    /// Bytes per pool slot (the track size).
    pub buffer_size: usize,
    /// How long [`Backend::pause`] sleeps: short, because what a paused
    /// request waits for (a track lock, a commit) usually takes well under
    /// a millisecond.
    pub pause: Duration,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            entries: 256,
            pool_buffers: 64,
            buffer_size: 128 << 10,
            pause: Duration::from_micros(100),
        }
    }
}

/// An I/O priority class for a backend's reads and writes (Linux
/// `ioprio`). Only schedulers that implement priorities act on it: BFQ
/// (classes and best-effort levels) and mq-deadline (classes only; an idle
/// request is served at the latest after `prio_aging_expire`, 10 s by
/// default). With `none` (the default for NVMe and multi-queue virtio) or
/// kyber the value is carried and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPriority {
    /// The submitting thread's (best effort, level 4 unless set otherwise).
    Default,
    /// Best effort at level 7, the lowest (BFQ weighs it; mq-deadline
    /// treats it as any best-effort request).
    BestEffortLowest,
    /// Idle class: served when no other class waits (BFQ serves it at
    /// least every 200 ms, mq-deadline after `prio_aging_expire`).
    Idle,
}

impl IoPriority {
    /// `IOPRIO_PRIO_VALUE(class, level)`: class in the top 3 of 16 bits.
    pub fn ioprio(self) -> u16 {
        const CLASS_SHIFT: u16 = 13;
        const CLASS_BE: u16 = 2;
        const CLASS_IDLE: u16 = 3;
        match self {
            IoPriority::Default => 0,
            IoPriority::BestEffortLowest => (CLASS_BE << CLASS_SHIFT) | 7,
            IoPriority::Idle => CLASS_IDLE << CLASS_SHIFT,
        }
    }
}

/// Sets the calling thread's nice value: the copy engine's thread runs
/// below the host path's threads when `restore.priority` puts the host
/// first. Where CPU time is what host requests and copies share (few cores,
/// or emulated devices whose every request costs the hypervisor's CPU), a
/// woken ublk queue thread is then scheduled ahead of the copy's
/// submissions. Linux keeps the nice value per thread; going back to a
/// lower value needs CAP_SYS_NICE, which the server (root) has.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: plain syscalls on the calling thread's id; no memory passed.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// State of one submitted operation, indexed by its `user_data`.
enum Slot {
    Free,
    InFlight(Option<Waker>),
    Done(i32),
}

type CommitHook = Box<dyn Fn()>;
type FailedHook = Box<dyn Fn() -> bool>;

pub struct UringBackend {
    ring: RefCell<IoUring>,
    fds: DevFds,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    /// Operations in the ring whose completion has not been reaped.
    inflight: Cell<usize>,
    /// The most operations that were in the ring at once (tests check
    /// that concurrent waits really wait together).
    peak_inflight: Cell<usize>,
    pool: Arc<BufPool>,
    /// Whether the pool is registered (registration can fail, e.g. under a
    /// small RLIMIT_MEMLOCK; the pool then still serves plain I/O).
    fixed: bool,
    /// Transfers issued as READ_FIXED/WRITE_FIXED (tests check the pool
    /// really is registered and used).
    fixed_ops: Cell<u64>,
    pause: Duration,
    /// Kicked by wakes from other threads while `block_on` waits in the
    /// ring (a commit finished, a track was released elsewhere).
    kick: Arc<Kick>,
    /// Whether a poll of `kick` is in the ring.
    kick_armed: Cell<bool>,
    /// The I/O priority of reads and writes (`ioprio` of each SQE; 0: the
    /// submitting thread's, i.e. best effort).
    ioprio: Cell<u16>,
    on_commit: CommitHook,
    /// What `request_log` does; unset: `on_commit`.
    on_log: Option<CommitHook>,
    on_commit_failed: FailedHook,
}

impl UringBackend {
    /// A backend over `primary` and `secondary` (O_DIRECT fds, not owned).
    pub fn new(primary: RawFd, secondary: RawFd, opts: UringOptions) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(opts.entries * 2)
            .build(opts.entries)?;
        let pool = Arc::new(BufPool::new(opts.pool_buffers, opts.buffer_size));
        let fixed = !pool.is_empty() && {
            let iov = libc::iovec {
                iov_base: pool.base.as_ptr().cast(),
                iov_len: pool.len(),
            };
            // SAFETY: the region stays allocated as long as the pool, and the
            // backend (which owns the ring) holds the pool.
            match unsafe { ring.submitter().register_buffers(&[iov]) } {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("io_uring buffer registration failed ({e}); using plain I/O");
                    false
                }
            }
        };
        Ok(UringBackend {
            ring: RefCell::new(ring),
            fds: DevFds::new(primary, secondary),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            inflight: Cell::new(0),
            peak_inflight: Cell::new(0),
            pool,
            fixed,
            fixed_ops: Cell::new(0),
            pause: opts.pause,
            kick: Kick::new()?,
            kick_armed: Cell::new(false),
            ioprio: Cell::new(0),
            on_commit: Box::new(|| {}),
            on_log: None,
            on_commit_failed: Box::new(|| false),
        })
    }

    /// What `request_commit` does (the server passes its `CommitHandle`).
    pub fn with_commit(mut self, request: impl Fn() + 'static) -> Self {
        self.on_commit = Box::new(request);
        self
    }

    /// What `request_log` does (unset: `request_commit`'s hook, for a
    /// backend whose commit hook also wakes whatever writes the log).
    pub fn with_log(mut self, request: impl Fn() + 'static) -> Self {
        self.on_log = Some(Box::new(request));
        self
    }

    /// What `commit_failed` answers.
    pub fn with_commit_failed(mut self, failed: impl Fn() -> bool + 'static) -> Self {
        self.on_commit_failed = Box::new(failed);
        self
    }

    /// Commits through the committer thread behind `commit`: requests go
    /// to it, and its failure is what `commit_failed` answers.
    pub fn with_committer(self, commit: &crate::metadata::CommitHandle) -> Self {
        let (c1, c2, c3) = (commit.clone(), commit.clone(), commit.clone());
        self.with_commit(move || c1.request())
            .with_log(move || c3.request_log())
            .with_commit_failed(move || c2.failed().is_some())
    }

    /// Sets the I/O priority of this backend's reads and writes from now
    /// on: the copy engine's I/O yields to host I/O where the device's
    /// scheduler honours priorities (see [`IoPriority`]).
    pub fn set_io_priority(&self, p: IoPriority) {
        self.ioprio.set(p.ioprio());
    }

    /// The `ioprio` value reads and writes carry now.
    pub fn io_priority(&self) -> u16 {
        self.ioprio.get()
    }

    /// Whether pool buffers go through READ_FIXED/WRITE_FIXED.
    pub fn uses_fixed_buffers(&self) -> bool {
        self.fixed
    }

    /// The most operations that were in flight at once so far.
    pub fn peak_inflight(&self) -> usize {
        self.peak_inflight.get()
    }

    /// How many transfers went through READ_FIXED/WRITE_FIXED so far.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops.get()
    }

    fn fd(&self, dev: Dev) -> types::Fd {
        types::Fd(self.fds.get(dev))
    }

    /// Runs `fut` to completion on this thread, driving the ring.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let wake = Arc::new(ThreadWake {
            woken: AtomicBool::new(true),
            thread: std::thread::current(),
            kick: self.kick.clone(),
        });
        let waker = Waker::from(wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        loop {
            if wake.woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            if self.inflight.get() > 0 {
                let want = usize::from(!wake.woken.load(Ordering::Acquire));
                if want > 0 {
                    // Waiting in the ring: a wake from another thread must
                    // end the wait.
                    self.arm_kick();
                }
                self.submit(want);
                self.reap();
            } else if !wake.woken.load(Ordering::Acquire) {
                // Nothing in the ring: only another thread can wake us.
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
    }

    /// Puts a poll of the kick eventfd in the ring, unless one is there.
    fn arm_kick(&self) {
        if self.kick_armed.replace(true) {
            return;
        }
        let entry = opcode::PollAdd::new(types::Fd(self.kick.fd()), libc::POLLIN as u32)
            .build()
            .user_data(KICK_DATA);
        loop {
            // SAFETY: a poll entry points at no memory.
            let pushed = unsafe { self.ring.borrow_mut().submission().push(&entry).is_ok() };
            if pushed {
                return;
            }
            self.submit(0);
        }
    }

    /// Submits queued SQEs, waiting for `want` completions.
    fn submit(&self, want: usize) {
        loop {
            let r = self.ring.borrow().submitter().submit_and_wait(want);
            match r {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reap, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap();
                    if want == 0 {
                        return;
                    }
                }
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
        }
    }

    /// Moves completions into their slots and wakes their futures.
    fn reap(&self) {
        let mut wakers = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                if cqe.user_data() == KICK_DATA {
                    self.kick_armed.set(false);
                    self.kick.drain();
                    continue;
                }
                let i = cqe.user_data() as usize;
                if let Slot::InFlight(w) =
                    std::mem::replace(&mut slots[i], Slot::Done(cqe.result()))
                {
                    wakers.extend(w);
                }
                self.inflight.set(self.inflight.get() - 1);
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    fn push(&self, entry: squeue::Entry) -> usize {
        let i = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(Slot::Free);
                slots.len() - 1
            }
        };
        self.slots.borrow_mut()[i] = Slot::InFlight(None);
        let entry = entry.user_data(i as u64);
        loop {
            // SAFETY: every buffer or timespec the entry points at is kept
            // alive by the `Op` that owns slot `i` until the completion is
            // reaped (its Drop waits for that).
            let pushed = unsafe { self.ring.borrow_mut().submission().push(&entry).is_ok() };
            if pushed {
                break;
            }
            self.submit(0);
        }
        self.inflight.set(self.inflight.get() + 1);
        self.peak_inflight
            .set(self.peak_inflight.get().max(self.inflight.get()));
        i
    }

    /// Submits `entry` and waits for its result (negative errno on error).
    fn op(&self, entry: squeue::Entry) -> Op<'_> {
        Op {
            be: self,
            entry: Some(entry),
            slot: None,
        }
    }

    fn pool_index(&self, ptr: *const u8, len: usize) -> Option<u16> {
        (self.fixed && self.pool.contains(ptr, len)).then_some(0)
    }

    async fn rw(
        &self,
        dev: Dev,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        write: bool,
        fua: bool,
    ) -> io::Result<()> {
        let fd = self.fd(dev);
        let mut t = Transfer::new(len);
        while !t.is_complete() {
            // SAFETY: ptr..ptr+len is the caller's buffer, borrowed for the
            // whole call.
            let p = unsafe { ptr.add(t.done()) };
            let n = t.remaining().min(1 << 30) as u32;
            let off = offset + t.done() as u64;
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            let idx = self.pool_index(p, n as usize);
            if idx.is_some() {
                self.fixed_ops.set(self.fixed_ops.get() + 1);
            }
            let prio = self.ioprio.get();
            let entry = match (idx, write) {
                (Some(idx), false) => opcode::ReadFixed::new(fd, p, n, idx)
                    .offset(off)
                    .ioprio(prio)
                    .build(),
                (Some(idx), true) => opcode::WriteFixed::new(fd, p, n, idx)
                    .offset(off)
                    .ioprio(prio)
                    .rw_flags(flags)
                    .build(),
                (None, false) => opcode::Read::new(fd, p, n).offset(off).ioprio(prio).build(),
                (None, true) => opcode::Write::new(fd, p, n)
                    .offset(off)
                    .ioprio(prio)
                    .rw_flags(flags)
                    .build(),
            };
            let res = self.op(entry).await;
            t.advance(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            })?;
        }
        Ok(())
    }
}

impl Backend for UringBackend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.rw(dev, offset, buf.as_mut_ptr(), buf.len(), false, false)
            .await
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        // The kernel only reads from a write's buffer.
        self.rw(dev, offset, buf.as_ptr().cast_mut(), buf.len(), true, fua)
            .await
    }

    async fn flush(&self, dev: Dev) -> io::Result<()> {
        let entry = opcode::Fsync::new(self.fd(dev))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let res = self.op(entry).await;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    async fn fallocate(&self, dev: Dev, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(self.fd(dev), len)
            .offset(offset)
            .mode(mode)
            .build();
        let res = self.op(entry).await;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    async fn pause(&self) {
        self.sleep(self.pause).await
    }

    async fn sleep(&self, d: Duration) {
        let ts = Box::new(
            types::Timespec::new()
                .sec(d.as_secs())
                .nsec(d.subsec_nanos()),
        );
        let entry = opcode::Timeout::new(&*ts).build();
        // -ETIME is the normal outcome of a timeout.
        let _ = self.op(entry).await;
        drop(ts);
    }

    fn request_commit(&self) {
        (self.on_commit)()
    }

    fn request_log(&self) {
        match &self.on_log {
            Some(f) => f(),
            None => (self.on_commit)(),
        }
    }

    fn commit_failed(&self) -> bool {
        (self.on_commit_failed)()
    }

    /// A pool slot run when one is free (fixed-buffer I/O), else a heap
    /// buffer. Pool buffers are not zeroed: every user reads into them first.
    fn buffer(&self, len: usize) -> AlignedBuf {
        self.pool.take(len).unwrap_or_else(|| AlignedBuf::new(len))
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Ops borrow the backend, so none can be alive here; but a future
        // leaked with mem::forget could leave I/O in flight into memory we
        // are about to free. Wait it out.
        while self.inflight.get() > 0 {
            self.submit(1);
            self.reap();
        }
        // The kick's poll points at no memory, but end it so the eventfd
        // is not closed under the ring's feet.
        if self.kick_armed.get() {
            self.kick.kick();
            while self.kick_armed.get() {
                self.submit(1);
                self.reap();
            }
        }
    }
}

/// `user_data` of the kick's poll (slots are numbered from 0).
const KICK_DATA: u64 = u64::MAX;

/// One submitted SQE; resolves to the CQE's result.
struct Op<'a> {
    be: &'a UringBackend,
    entry: Option<squeue::Entry>,
    slot: Option<usize>,
}

impl Future for Op<'_> {
    type Output = i32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let be = self.be;
        let i = match self.slot {
            Some(i) => i,
            None => {
                let entry = self.entry.take().expect("op polled after completion");
                let i = be.push(entry);
                self.slot = Some(i);
                i
            }
        };
        let mut slots = be.slots.borrow_mut();
        match &mut slots[i] {
            Slot::Done(res) => {
                let res = *res;
                slots[i] = Slot::Free;
                drop(slots);
                be.free.borrow_mut().push(i);
                self.slot = None;
                Poll::Ready(res)
            }
            Slot::InFlight(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Free => unreachable!("op slot freed while in use"),
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        // Dropped while in flight: the kernel may still touch the buffer this
        // op borrows, so wait for the completion before letting it go.
        while matches!(self.be.slots.borrow()[i], Slot::InFlight(_)) {
            self.be.submit(1);
            self.be.reap();
        }
        self.be.slots.borrow_mut()[i] = Slot::Free;
        self.be.free.borrow_mut().push(i);
    }
}

/// Wakes `block_on`: sets the flag and unparks its thread (for wakes from
/// other threads; wakes from completions just set the flag).
struct ThreadWake {
    woken: AtomicBool,
    thread: std::thread::Thread,
    kick: Arc<Kick>,
}

impl Wake for ThreadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if std::thread::current().id() != self.thread.id() {
            // The thread may be waiting in the ring, not parked.
            self.kick.kick();
            self.thread.unpark();
        }
    }
}

/// A fixed region of `slots` track-sized slots. A buffer is a run of
/// adjacent free slots, so a coalesced copy of several tracks still gets
/// one fixed buffer.
pub struct BufPool {
    base: NonNull<u8>,
    slot_size: usize,
    /// Bytes in the region (kept outside the mutex: every I/O asks).
    len: usize,
    used: Mutex<Vec<bool>>,
}

// SAFETY: the region is only handed out in disjoint runs, tracked under the
// mutex; like a Vec<u8> otherwise.
unsafe impl Send for BufPool {}
unsafe impl Sync for BufPool {}

impl BufPool {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), AlignedBuf::ALIGN).expect("pool layout")
    }

    pub fn new(slots: usize, slot_size: usize) -> Self {
        let slot_size = slot_size.next_multiple_of(AlignedBuf::ALIGN);
        let layout = Self::layout(slots * slot_size);
        // SAFETY: non-zero size. Zeroed so that no stale heap bytes can ever
        // reach a device.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        BufPool {
            base,
            slot_size,
            len: slots * slot_size,
            used: Mutex::new(vec![false; slots]),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= start && p + len <= start + self.len()
    }

    /// A buffer of `len` bytes from adjacent free slots, if there are any.
    fn take(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let n = len.div_ceil(self.slot_size).max(1);
        let mut used = self.used.lock().unwrap();
        let first =
            (0..used.len().checked_sub(n - 1)?).find(|&s| used[s..s + n].iter().all(|u| !u))?;
        used[first..first + n].iter_mut().for_each(|u| *u = true);
        // SAFETY: first + n <= slots, inside the region.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(first * self.slot_size)) };
        // SAFETY: the slots are marked used until `give_back`.
        Some(unsafe { AlignedBuf::lent(ptr, len, self.clone()) })
    }
}

impl Lender for BufPool {
    fn give_back(&self, ptr: NonNull<u8>, len: usize) {
        let first = (ptr.as_ptr() as usize - self.base.as_ptr() as usize) / self.slot_size;
        let n = len.div_ceil(self.slot_size).max(1);
        let mut used = self.used.lock().unwrap();
        used[first..first + n].iter_mut().for_each(|u| *u = false);
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let len = self.len;
        // SAFETY: allocated in `new` with this layout; every lent buffer holds
        // an Arc, so none is alive.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), Self::layout(len)) }
    }
}
