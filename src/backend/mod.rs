//! Backends: where the executors' reads, writes and flushes go.
//!
//! Every backend implements [`Backend`]: the standalone io_uring ([`uring`]) for the copy
//! engine, the crash soak and the benches; plain blocking I/O
//! ([`blocking`]) for `format` and `verify`; the deterministic simulation
//! ([`sim`], built only for tests and with the `sim` feature). The ublk
//! queue's own ring lives with the queue loop in [`crate::ublk`].
//! [`device`] opens the primary and secondary and checks their layout;
//! [`buf`] has the aligned buffers direct I/O needs; [`hostbuf`] where a
//! host request's bytes are (memory, or a registered buffer with zero copy); [`zero`] what zeroing a
//! range (discard, write-zeroes) does on a device.

use crate::core::Dev;
use buf::AlignedBuf;
use hostbuf::{Fixed, HostBytes, HostBytesMut};
use std::io;
use std::os::fd::RawFd;

pub(crate) mod blocking;
pub mod buf;
pub mod device;
pub mod hostbuf;
pub mod kick;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub(crate) mod transfer;
pub mod uring;
pub mod zero;

/// The raw fds of the primary and the secondary, by [`Dev`] (not owned: the
/// server keeps the devices open while any backend uses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevFds([RawFd; 2]);

impl DevFds {
    pub fn new(primary: RawFd, secondary: RawFd) -> Self {
        DevFds([primary, secondary])
    }

    pub fn get(self, dev: Dev) -> RawFd {
        self.0[dev.index()]
    }
}

/// What an executor offers the host path: device I/O, a way to wait, and
/// the metadata committer.
#[allow(async_fn_in_trait)]
pub trait Backend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    async fn flush(&self, dev: Dev) -> io::Result<()>;
    /// Reads into a registered host buffer. Only a backend whose ring
    /// holds them (a ublk queue with zero copy; the simulation) can; the
    /// others say `EOPNOTSUPP`.
    async fn read_fixed(&self, _dev: Dev, _offset: u64, _buf: Fixed) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Writes from a registered host buffer (see [`Backend::read_fixed`]).
    async fn write_fixed(
        &self,
        _dev: Dev,
        _offset: u64,
        _buf: Fixed,
        _fua: bool,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Copies registered host bytes into `buf[at..at + f.len]`, where `buf`
    /// is a buffer this backend lent ([`Backend::buffer`]) that I/O can
    /// reach (a ublk queue's memfd buffers with zero copy). `Ok(false)`:
    /// not this buffer; the caller writes around the host's bytes instead.
    async fn copy_fixed(&self, _f: Fixed, _buf: &mut AlignedBuf, _at: usize) -> io::Result<bool> {
        Ok(false)
    }
    /// Reads into a host request's bytes, wherever they are.
    async fn read_host(&self, dev: Dev, offset: u64, buf: HostBytesMut<'_>) -> io::Result<()> {
        match buf {
            HostBytesMut::Mem(m) => self.read(dev, offset, m).await,
            HostBytesMut::Fixed(f) => self.read_fixed(dev, offset, f).await,
        }
    }
    /// Writes a host request's bytes, wherever they are.
    async fn write_host(
        &self,
        dev: Dev,
        offset: u64,
        buf: HostBytes<'_>,
        fua: bool,
    ) -> io::Result<()> {
        match buf {
            HostBytes::Mem(m) => self.write(dev, offset, m, fua).await,
            HostBytes::Fixed(f) => self.write_fixed(dev, offset, f, fua).await,
        }
    }
    /// `fallocate(2)` on a device (`mode`: [`zero::PUNCH_HOLE`] or
    /// [`zero::ZERO_RANGE`]). A backend without it says `EOPNOTSUPP`.
    async fn fallocate(&self, _dev: Dev, _mode: i32, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Makes the range read back as zeros (a discard or write-zeroes, see
    /// [`zero`]); `unmap`: it may be deallocated; `fua`: durable on return.
    async fn zero(
        &self,
        dev: Dev,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> io::Result<()> {
        zero::zero(self, dev, offset, len, unmap, fua).await
    }
    /// Yields for a short while: something the caller waits for (a track
    /// lock, a commit, a state change) is being done elsewhere.
    async fn pause(&self);
    /// Sleeps about `d`: the caller knows when it has work again (the copy
    /// engine waiting for rate-limit tokens). Waking every `pause` instead
    /// costs 10 000 wake-ups a second for nothing.
    async fn sleep(&self, _d: std::time::Duration) {
        self.pause().await
    }
    /// The waker to hand to the core's wake lists for a task polled with
    /// `w`: the core's waiters may be woken from another thread (the
    /// committer, another queue), so an executor that sleeps in the kernel
    /// returns one that also interrupts that sleep.
    fn waker(&self, w: &std::task::Waker) -> std::task::Waker {
        w.clone()
    }
    /// Asks the metadata committer for a commit soon.
    fn request_commit(&self);
    /// Asks for a restore log record soon (see `core::restore_log`). Every
    /// executor says where that goes: a commit request instead would not
    /// wake the log's writer.
    fn request_log(&self);
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
