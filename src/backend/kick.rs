//! Waking an io_uring thread from another thread. A thread that sleeps in
//! `io_uring_enter` does not notice a task woken elsewhere (the committer
//! finishing a commit, another queue releasing a track): it keeps an
//! eventfd poll in its ring, and wakers from other threads write that
//! eventfd, so the poll completes and the thread runs the woken task.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::thread::ThreadId;

/// The eventfd of one io_uring thread.
pub struct Kick {
    fd: OwnedFd,
    owner: ThreadId,
    /// Kicks sent (tests check that cross-thread wakes really kick).
    sent: std::sync::atomic::AtomicU64,
}

impl Kick {
    /// A kick for the calling thread's ring.
    pub fn new() -> io::Result<Arc<Kick>> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Kick {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            owner: std::thread::current().id(),
            sent: Default::default(),
        }))
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the eventfd readable (from any thread).
    pub fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN)
        // still leaves it readable, which is all a kick needs.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Empties the eventfd after its poll completed (on the owner thread).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (already empty) is fine.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Kicks sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `w`, which also kicks this ring when woken from another thread.
    pub fn waker(self: &Arc<Self>, w: &Waker) -> Waker {
        Waker::from(Arc::new(KickWaker {
            inner: w.clone(),
            kick: self.clone(),
        }))
    }
}

struct KickWaker {
    inner: Waker,
    kick: Arc<Kick>,
}

impl Wake for KickWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.inner.wake_by_ref();
        if std::thread::current().id() != self.kick.owner {
            self.kick.kick();
        }
    }
}
