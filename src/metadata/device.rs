//! Where the metadata lives: a regular file or a block device (or, in the
//! simulation, an in-memory disk with a volatile cache).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Block I/O on the metadata. Offsets and lengths are multiples of 4 KiB
/// and buffers are 4096-aligned (`AlignedBuf`), as O_DIRECT needs.
pub trait MetaDevice {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The write may sit in a volatile cache until [`MetaDevice::flush`].
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// A write that is durable when it returns (FUA), without flushing
    /// anything else: a commit's last write, its header. Without a FUA
    /// path: the write, then a flush.
    fn write_at_durable(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }
    fn size(&mut self) -> io::Result<u64>;
    /// The running kernel's boot id: restore log records are valid only in
    /// the boot that wrote them (see `core::restore_log`). `None`: unknown,
    /// and the log is not used.
    fn boot_id(&self) -> Option<[u8; 16]> {
        let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(id)
    }
    /// A second handle to the same device for the restore log's writer
    /// (it runs on its own thread). A record only has to outlive the
    /// process, not the machine (`core::restore_log`), so the handle may
    /// write through the kernel's page cache. Devices that cannot give one
    /// have no restore log.
    fn log_handle(&self) -> io::Result<Self>
    where
        Self: Sized,
    {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Grows the device to `bytes`; block devices cannot.
    fn grow(&mut self, bytes: u64) -> io::Result<()>;
    /// For messages: the path, or what the device is.
    fn describe(&self) -> String;
}

/// A metadata file or block device, with O_DIRECT where it is accepted.
pub struct FileMeta {
    file: File,
    path: String,
    block_device: bool,
}

impl FileMeta {
    /// Opens `path`; with `create`, a missing regular file is created.
    pub fn open(path: &Path, create: bool) -> io::Result<FileMeta> {
        let block_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        // O_EXCL on a block device: no mount or other opener meanwhile.
        let excl = if block_device { libc::O_EXCL } else { 0 };
        // O_CREAT with O_EXCL means "must not exist": only for files.
        let create = create && !block_device;
        let file = match open_file(path, create, libc::O_DIRECT | excl) {
            // tmpfs and some filesystems refuse O_DIRECT: buffered I/O plus
            // fdatasync is just as crash-safe, only slower.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open_file(path, create, excl)?,
            r => r?,
        };
        lock(&file)?;
        let mut meta = FileMeta {
            file,
            path: path.display().to_string(),
            block_device,
        };
        if !meta.accepts_direct_io() {
            meta.file = open_file(path, create, excl)?;
            lock(&meta.file)?;
        }
        Ok(meta)
    }

    /// Some filesystems accept O_DIRECT at open and refuse the I/O.
    fn accepts_direct_io(&self) -> bool {
        let mut probe = crate::backend::buf::AlignedBuf::new(4096);
        match self.file.read_at(&mut probe, 0) {
            Err(e) => e.raw_os_error() != Some(libc::EINVAL),
            Ok(_) => true,
        }
    }
}

/// Two servers (or a `format --force` under a running server) on one
/// metadata would overwrite each other's commits: the first holds an
/// exclusive lock until it closes the file.
fn lock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    // EWOULDBLOCK means another holder; the store words the message.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

fn open_file(path: &Path, create: bool, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .custom_flags(flags)
        .open(path)
}

impl MetaDevice for FileMeta {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        // fdatasync: on a block device it also flushes the drive's cache.
        self.file.sync_data()
    }

    /// `pwritev2(RWF_DSYNC)`: on a block device opened O_DIRECT the kernel
    /// sends one FUA write (or the write and a flush, where the device has
    /// no FUA), not a flush of the whole cache; on a file, whatever the
    /// filesystem needs to make that range durable (an O_DIRECT overwrite
    /// of allocated blocks can be a FUA write alone).
    fn write_at_durable(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over a live slice; the fd is ours.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // A kernel or file without the flag: write, then flush.
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) if done == 0 => {
                        self.write_at(buf, offset)?;
                        return self.flush();
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        use std::io::Seek;
        // Seeking to the end also works for block devices, unlike metadata().
        self.file.seek(io::SeekFrom::End(0))
    }

    /// The same file opened again, buffered: a record's write then ends in
    /// the page cache, which a killed process leaves behind, instead of
    /// queueing on a device the copy keeps busy (a merge waits for it).
    /// Direct I/O on the main handle stays coherent with it: the kernel
    /// writes a range's dirty pages back before a direct read or write of
    /// that range, and every record is whole 4 KiB pages of its own slot.
    /// Reopened through `/proc/self/fd`, so it is the same file even if the
    /// path changed, without `O_EXCL` (which the main handle holds) and
    /// without a second lock. Where that fails: a dup of the main handle.
    fn log_handle(&self) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = match open_file(Path::new(&proc_path), false, 0) {
            Ok(f) => f,
            Err(e) => {
                log::debug!(
                    "{}: no buffered handle for the restore log ({e})",
                    self.path
                );
                self.file.try_clone()?
            }
        };
        Ok(FileMeta {
            file,
            path: self.path.clone(),
            block_device: self.block_device,
        })
    }

    fn grow(&mut self, bytes: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::other("a block device cannot grow"));
        }
        self.file.set_len(bytes)?;
        // The new size is metadata of the file: make it durable as well.
        self.file.sync_all()
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::buf::AlignedBuf;

    fn flags(m: &FileMeta) -> i32 {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on a descriptor the FileMeta owns.
        unsafe { libc::fcntl(m.file.as_raw_fd(), libc::F_GETFL) }
    }

    /// The restore log's handle writes through the page cache, and the
    /// main (O_DIRECT) handle sees its records, and it the main handle's
    /// clearing: a restart after a kill reads the records the killed
    /// process left in the page cache.
    #[test]
    fn the_log_handle_is_buffered_and_coherent_with_the_direct_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        let mut main = FileMeta::open(&path, false).unwrap();
        let mut log = main.log_handle().unwrap();
        assert_eq!(
            flags(&log) & libc::O_DIRECT,
            0,
            "the log handle is buffered"
        );

        let mut record = AlignedBuf::new(8192);
        record.fill(0xa5);
        log.write_at(&record, 16384).unwrap();
        let mut seen = AlignedBuf::new(8192);
        main.read_at(&mut seen, 16384).unwrap();
        assert!(
            seen.iter().all(|&b| b == 0xa5),
            "the direct handle reads the record"
        );

        let zero = AlignedBuf::new(8192);
        main.write_at(&zero, 16384).unwrap();
        log.read_at(&mut seen, 16384).unwrap();
        assert!(
            seen.iter().all(|&b| b == 0),
            "the log handle sees the clearing"
        );

        // The main handle keeps its lock; the log handle took none.
        assert!(
            FileMeta::open(&path, false).is_err(),
            "still locked by the main handle"
        );
        drop(main);
        assert!(
            FileMeta::open(&path, false).is_ok(),
            "the log handle holds no lock"
        );
    }
}
