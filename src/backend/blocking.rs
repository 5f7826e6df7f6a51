//! A plain blocking [`Backend`]: pread/pwrite on the O_DIRECT device fds,
//! fdatasync for flushes, and a short sleep to wait. It serves control
//! commands and verify (and the copy engine where io_uring is unavailable),
//! where a blocked thread holds up nothing else; the ublk queues and the
//! copy engine use io_uring.

use crate::backend::device::Devices;
use crate::backend::transfer::Transfer;
use crate::backend::Backend;
use crate::core::Dev;
use crate::metadata::CommitHandle;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub struct BlockingBackend {
    devs: Arc<Devices>,
    commit: CommitHandle,
}

impl BlockingBackend {
    pub fn new(devs: Arc<Devices>, commit: CommitHandle) -> Self {
        BlockingBackend { devs, commit }
    }

    fn fd(&self, dev: Dev) -> RawFd {
        self.devs.get(dev).fd()
    }
}

/// A syscall's byte count, or the error its -1 stands for.
fn count(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn pread_all(fd: RawFd, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut t = Transfer::new(buf.len());
    while !t.is_complete() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe {
            libc::pread(
                fd,
                buf[t.done()..].as_mut_ptr().cast(),
                t.remaining(),
                (offset + t.done() as u64) as libc::off_t,
            )
        };
        t.advance(count(n))?;
    }
    Ok(())
}

pub fn pwrite_all(fd: RawFd, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
    let mut t = Transfer::new(buf.len());
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    while !t.is_complete() {
        let iov = libc::iovec {
            iov_base: buf[t.done()..].as_ptr() as *mut libc::c_void,
            iov_len: t.remaining(),
        };
        // SAFETY: one iovec over the unwritten tail of `buf`.
        let n = unsafe {
            libc::pwritev2(
                fd,
                &iov,
                1,
                (offset + t.done() as u64) as libc::off_t,
                flags,
            )
        };
        t.advance(count(n))?;
    }
    Ok(())
}

impl Backend for BlockingBackend {
    async fn read(&self, dev: Dev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        pread_all(self.fd(dev), offset, buf)
    }

    async fn write(&self, dev: Dev, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        pwrite_all(self.fd(dev), offset, buf, fua)
    }

    async fn flush(&self, dev: Dev) -> io::Result<()> {
        self.devs.get(dev).file.sync_data()
    }

    async fn fallocate(&self, dev: Dev, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd the devices keep open.
        let r = unsafe {
            libc::fallocate(
                self.fd(dev),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    async fn pause(&self) {
        std::thread::sleep(Duration::from_micros(100));
    }

    fn request_commit(&self) {
        self.commit.request();
    }

    fn request_log(&self) {
        self.commit.request_log();
    }

    fn commit_failed(&self) -> bool {
        self.commit.failed().is_some()
    }
}
