//! A plain blocking [`Backend`]: pread/pwrite on the O_DIRECT device fds,
//! fdatasync for flushes, and a short sleep to wait. It serves control
//! commands and verify (and the copy engine where io_uring is unavailable),
//! where a blocked thread holds up nothing else; the ublk queues and the
//! copy engine use io_uring.

use crate::backend::device::Devices;
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

/// Turns a short transfer into an error: direct I/O inside the device never
/// stops early, so a short count means the device shrank or failed.
fn full(done: usize, want: usize) -> io::Result<()> {
    if done == want {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {done} of {want} bytes"),
        ))
    }
}

pub fn pread_all(fd: RawFd, mut offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let want = buf.len();
    let mut done = 0;
    while done < want {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                want - done,
                offset as libc::off_t,
            )
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            0 => break,
            n => {
                done += n as usize;
                offset += n as u64;
            }
        }
    }
    full(done, want)
}

pub fn pwrite_all(fd: RawFd, mut offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
    let want = buf.len();
    let mut done = 0;
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    while done < want {
        let iov = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: want - done,
        };
        // SAFETY: one iovec over the unwritten tail of `buf`.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, offset as libc::off_t, flags) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            0 => break,
            n => {
                done += n as usize;
                offset += n as u64;
            }
        }
    }
    full(done, want)
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

    async fn pause(&self) {
        std::thread::sleep(Duration::from_micros(100));
    }

    fn request_commit(&self) {
        self.commit.request();
    }

    fn commit_failed(&self) -> bool {
        self.commit.failed().is_some()
    }
}
