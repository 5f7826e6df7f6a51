//! Zeroing a range of a data device: what discard and write-zeroes do to
//! the primary and the secondary.
//!
//! Both must leave the range reading back as zeros, on every device, so
//! that a mirror stays byte-identical (a plain discard may leave anything
//! behind, and two devices may leave different things). `fallocate(2)`
//! does that without moving data:
//!
//! - `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` deallocates: on a file a
//!   hole; on a block device (the kernel's `blkdev_fallocate`) a
//!   write-zeroes that may unmap, with no fallback (`EOPNOTSUPP` when the
//!   device has no write-zeroes);
//! - `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE` keeps the range
//!   allocated: on a file unwritten extents; on a block device a
//!   write-zeroes that must not unmap, which the kernel falls back to
//!   writing zero pages for a device without write-zeroes.
//!
//! A discard (`unmap`) tries the hole first, then the zero range; a
//! write-zeroes with NOUNMAP only the zero range. Where neither is
//! supported (`EOPNOTSUPP`, e.g. a tmpfs file has no zero range) the range
//! is written with zero buffers.

use super::buf::AlignedBuf;
use super::Backend;
use crate::core::Dev;
use std::io;

/// Deallocates the range; it reads back as zeros.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zeroes the range and keeps it allocated.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// The `fallocate` modes tried, in order, to zero a range.
pub fn modes(unmap: bool) -> &'static [i32] {
    if unmap {
        &[PUNCH_HOLE, ZERO_RANGE]
    } else {
        &[ZERO_RANGE]
    }
}

/// The largest zero buffer the write fallback uses at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Zeroes `offset..offset+len` of `dev` through `b`: `fallocate` in the
/// modes above, else zero-buffer writes. `fua`: durable on return.
pub async fn zero<B: Backend + ?Sized>(
    b: &B,
    dev: Dev,
    offset: u64,
    len: u64,
    unmap: bool,
    fua: bool,
) -> io::Result<()> {
    for &mode in modes(unmap) {
        match b.fallocate(dev, mode, offset, len).await {
            Ok(()) if fua => return b.flush(dev).await,
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    write_zeros(b, dev, offset, len, fua).await
}

/// The fallback: zero buffers written over the range.
async fn write_zeros<B: Backend + ?Sized>(
    b: &B,
    dev: Dev,
    offset: u64,
    len: u64,
    fua: bool,
) -> io::Result<()> {
    let zeros = AlignedBuf::new(len.min(ZERO_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK) as usize;
        b.write(dev, offset + done, &zeros[..n], fua).await?;
        done += n as u64;
    }
    Ok(())
}

/// Whether `e` says the device or filesystem lacks that `fallocate` mode.
pub fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}
