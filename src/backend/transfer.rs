//! The short-transfer rules every backend's read and write loop follows,
//! defined once: a transfer resumes from where a short one stopped, an
//! interrupted or would-block attempt is tried again, and an attempt that
//! moves nothing is an error naming how far it got (direct I/O inside a
//! device never stops early, so that means the device shrank or failed).

use std::io;

/// One read or write of `want` bytes, attempt by attempt.
#[derive(Debug)]
pub(crate) struct Transfer {
    done: usize,
    want: usize,
}

impl Transfer {
    pub(crate) fn new(want: usize) -> Self {
        Transfer { done: 0, want }
    }

    /// Bytes moved so far: the next attempt starts this far into the
    /// buffer and the device range.
    pub(crate) fn done(&self) -> usize {
        self.done
    }

    /// Bytes the next attempt asks for.
    pub(crate) fn remaining(&self) -> usize {
        self.want - self.done
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.done == self.want
    }

    /// Accounts one attempt that asked for at most `remaining()` bytes:
    /// `Ok(n)` with `n > 0` moved `n` bytes; EINTR and EAGAIN leave the
    /// transfer where it was, to be tried again; `Ok(0)` and every other
    /// error end it.
    pub(crate) fn advance(&mut self, attempt: io::Result<usize>) -> io::Result<()> {
        match attempt {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short transfer: {} of {} bytes", self.done, self.want),
            )),
            Ok(n) => {
                self.done += n.min(self.remaining());
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_attempt_is_resumed_where_it_stopped() {
        let mut t = Transfer::new(8192);
        t.advance(Ok(4096)).unwrap();
        assert!(!t.is_complete());
        assert_eq!((t.done(), t.remaining()), (4096, 4096));
        t.advance(Ok(4096)).unwrap();
        assert!(t.is_complete());
    }

    #[test]
    fn interrupted_and_would_block_attempts_are_retried() {
        let mut t = Transfer::new(512);
        for errno in [libc::EINTR, libc::EAGAIN] {
            t.advance(Err(io::Error::from_raw_os_error(errno))).unwrap();
            assert_eq!(t.done(), 0);
        }
    }

    #[test]
    fn nothing_moved_is_an_error_naming_the_short_count() {
        let mut t = Transfer::new(8192);
        t.advance(Ok(512)).unwrap();
        let e = t.advance(Ok(0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(e.to_string(), "short transfer: 512 of 8192 bytes");
    }

    #[test]
    fn other_errors_end_the_transfer() {
        let mut t = Transfer::new(512);
        let e = t
            .advance(Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
}
