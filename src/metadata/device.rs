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
    fn size(&mut self) -> io::Result<u64>;
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

    fn size(&mut self) -> io::Result<u64> {
        use std::io::Seek;
        // Seeking to the end also works for block devices, unlike metadata().
        self.file.seek(io::SeekFrom::End(0))
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
