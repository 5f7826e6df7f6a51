//! The data devices: opening the primary and the secondary for direct I/O,
//! their sizes, and the layout checks that catch a wrong config before any
//! byte is written (the same device twice, a secondary too small, metadata
//! on a data device).

use crate::core::{Dev, DevSet};
use crate::edge::config::Config;
use crate::error::{Error, Result};
use crate::metadata::Binding;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, nix::request_code_none!(0x12, 104), libc::c_int);

/// What a path names, so that two paths to one device compare equal
/// whatever symlinks or device nodes lead to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Block(u64),
    File {
        dev: u64,
        ino: u64,
    },
    /// A secondary that could not be opened (see [`DataDev::missing`]).
    Missing,
}

fn identity(meta: &std::fs::Metadata) -> Option<Identity> {
    let ft = meta.file_type();
    if ft.is_block_device() {
        Some(Identity::Block(meta.rdev()))
    } else if ft.is_file() {
        Some(Identity::File {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    } else {
        None
    }
}

/// One opened data device.
pub struct DataDev {
    pub role: &'static str,
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    /// The device's logical block size: the smallest direct I/O it takes.
    pub logical_block: u32,
    /// Who the device is, as the metadata records it
    /// ([`crate::metadata::identity`]).
    pub stable_id: String,
    /// Whether the device zeroes ranges without writing them.
    pub zeroing: Zeroing,
    identity: Identity,
}

/// What a device can do to zero a range without writing it (see
/// [`crate::backend::zero`] for how a range is zeroed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Zeroing {
    /// A discard that reads back as zeros: a block device with both
    /// discard and write-zeroes (the kernel's hole punch on a block device
    /// is a write-zeroes allowed to unmap), or a file whose filesystem
    /// punches holes.
    pub discard: bool,
    /// Write-zeroes: a block device with write-zeroes, or a file whose
    /// filesystem punches holes.
    pub write_zeroes: bool,
    /// The device's discard granularity in bytes (0: none stated).
    pub granularity: u32,
}

impl Zeroing {
    /// What both devices can do.
    pub fn both(self, o: Zeroing) -> Zeroing {
        Zeroing {
            discard: self.discard && o.discard,
            write_zeroes: self.write_zeroes && o.write_zeroes,
            granularity: self.granularity.max(o.granularity),
        }
    }

    /// A block device's, from its queue limits in sysfs.
    fn of_block(meta: &std::fs::Metadata) -> Zeroing {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        // A partition has no queue of its own: its disk's applies.
        let queue = [dev.join("queue"), dev.join("../queue")]
            .into_iter()
            .find(|q| q.is_dir());
        let limit = |name: &str| -> u64 {
            queue
                .as_ref()
                .and_then(|q| std::fs::read_to_string(q.join(name)).ok())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let write_zeroes = limit("write_zeroes_max_bytes") > 0;
        Zeroing {
            discard: write_zeroes && limit("discard_max_bytes") > 0,
            write_zeroes,
            granularity: limit("discard_granularity").min(u64::from(u32::MAX)) as u32,
        }
    }

    /// A regular file's: whether its filesystem punches holes, tried past
    /// its end (where no data is) with its size kept.
    fn of_file(file: &File, size: u64) -> Zeroing {
        let past_end = size.next_multiple_of(4096) as libc::off_t;
        // SAFETY: plain syscall on an open fd; KEEP_SIZE past the end
        // changes neither the size nor any data.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                crate::backend::zero::PUNCH_HOLE,
                past_end,
                4096,
            )
        };
        let holes = r == 0;
        Zeroing {
            discard: holes,
            write_zeroes: holes,
            granularity: 4096,
        }
    }
}

impl DataDev {
    /// Opens a data device for direct I/O (block devices O_EXCL).
    pub fn open(role: &'static str, path: &Path) -> Result<DataDev> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::config(format!(
                "{role} {shown} does not exist; check the {role} path in the config"
            )),
            _ => Error::config(format!("cannot stat {role} {shown}: {e}")),
        })?;
        let identity = identity(&meta).ok_or_else(|| {
            Error::config(format!(
                "{role} {shown} is neither a block device nor a regular file"
            ))
        })?;
        let is_block = matches!(identity, Identity::Block(_));
        let mut flags = libc::O_DIRECT;
        if is_block {
            // O_EXCL on a block device: no mounted filesystem, no other
            // server, no md/dm holder may write under us.
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => Error::runtime(format!(
                    "{role} {shown} is in use by another opener (mounted, or another server?); release it first"
                )),
                Some(libc::EINVAL) => Error::config(format!(
                    "{role} {shown} does not support direct I/O (O_DIRECT); use a block device or a file on a filesystem that does"
                )),
                _ => Error::runtime(format!("cannot open {role} {shown}: {e}")),
            })?;
        let (size, logical_block) = if is_block {
            let mut size = 0u64;
            let mut lbs: libc::c_int = 0;
            // SAFETY: both ioctls write one integer of the given type.
            unsafe {
                blk_getsize64(file.as_raw_fd(), &mut size)
                    .map_err(|e| Error::runtime(format!("{role} {shown}: BLKGETSIZE64: {e}")))?;
                blk_sszget(file.as_raw_fd(), &mut lbs)
                    .map_err(|e| Error::runtime(format!("{role} {shown}: BLKSSZGET: {e}")))?;
            }
            (size, lbs.max(512) as u32)
        } else {
            (meta.len(), 512)
        };
        let zeroing = if is_block {
            Zeroing::of_block(&meta)
        } else {
            Zeroing::of_file(&file, size)
        };
        Ok(DataDev {
            role,
            path: path.to_path_buf(),
            file,
            size,
            logical_block,
            stable_id: crate::metadata::identity::of(&meta),
            zeroing,
            identity,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Stands in for a secondary that is missing: an fd on `/dev/null`,
    /// read-only, so a read gives 0 bytes and a write fails, should anything
    /// ever reach it (nothing does: the volume is `degraded` with the
    /// secondary out). It has the primary's size and block size, so the
    /// volume is shaped by the primary alone.
    pub fn missing(path: &Path, primary: &DataDev) -> Result<DataDev> {
        Ok(DataDev {
            role: "secondary",
            path: path.to_path_buf(),
            file: placeholder()?,
            size: primary.size,
            logical_block: primary.logical_block,
            stable_id: String::new(),
            // The device offers what the primary can do: the secondary
            // attached later zeroes by writing zero buffers if it must.
            zeroing: primary.zeroing,
            identity: Identity::Missing,
        })
    }

    pub fn is_missing(&self) -> bool {
        self.identity == Identity::Missing
    }
}

fn placeholder() -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")
        .map_err(|e| Error::runtime(format!("cannot open /dev/null: {e}")))
}

/// Whether an open failure of the secondary means "missing" (the device is
/// gone or does not answer) rather than a mistake in the config (a path
/// that is neither a device nor a file, a device in use by someone else).
fn is_missing_error(e: &Error, path: &Path) -> bool {
    let text = e.to_string();
    !path.exists()
        || !(text.contains("in use by another opener")
            || text.contains("neither a block device")
            || text.contains("direct I/O"))
}

/// The primary and the secondary, open and checked against each other.
pub struct Devices {
    pub primary: DataDev,
    pub secondary: DataDev,
}

impl Devices {
    /// Opens both data devices (O_DIRECT; block devices O_EXCL) and checks
    /// the layout (see [`check_layout`]).
    pub fn open(cfg: &Config) -> Result<Devices> {
        let primary = DataDev::open("primary", &cfg.primary)?;
        let secondary = DataDev::open("secondary", &cfg.secondary)?;
        let devs = Devices { primary, secondary };
        check_layout(cfg, &devs)?;
        Ok(devs)
    }

    /// As [`Devices::open`], but a secondary that is absent or cannot be
    /// opened is replaced by a stand-in ([`DataDev::missing`]) instead of
    /// failing; the second value says why it is missing.
    pub fn open_allow_missing(cfg: &Config) -> Result<(Devices, Option<String>)> {
        let primary = DataDev::open("primary", &cfg.primary)?;
        let (secondary, why) = match DataDev::open("secondary", &cfg.secondary) {
            Ok(s) => (s, None),
            Err(e) if is_missing_error(&e, &cfg.secondary) => (
                DataDev::missing(&cfg.secondary, &primary)?,
                Some(e.to_string()),
            ),
            Err(e) => return Err(e),
        };
        let devs = Devices { primary, secondary };
        check_layout(cfg, &devs)?;
        Ok((devs, why))
    }

    /// Puts `new` in the place of the secondary while the server runs: its
    /// file takes over the secondary's fd number (every executor holds that
    /// number, not the file), and the old file is closed. The volume must
    /// not be writing the secondary (degraded, secondary out).
    pub fn swap_secondary(&self, new: File) -> io::Result<()> {
        // SAFETY: both fds are open and owned by files that outlive the
        // call; dup3 atomically makes the secondary's number refer to
        // `new`'s open file (with close-on-exec, as every fd here), and
        // `new` is dropped afterwards, closing its own number only.
        let r = unsafe { libc::dup3(new.as_raw_fd(), self.secondary.fd(), libc::O_CLOEXEC) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Checks a secondary opened while the server runs: not the primary,
    /// large enough, and able to take direct I/O of the device's
    /// `block_size` (fixed when the ublk device was created).
    pub fn check_secondary(&self, new: &DataDev, block_size: u32) -> Result<()> {
        let (p, shown) = (&self.primary, new.path.display());
        if new.identity == p.identity {
            return Err(Error::config(format!(
                "secondary {shown} is the primary device {}; give another device",
                p.path.display()
            )));
        }
        if new.size < p.size {
            return Err(Error::config(format!(
                "secondary {shown} ({} bytes) is smaller than primary {} ({} bytes); use a \
                 secondary at least as large",
                new.size,
                p.path.display(),
                p.size
            )));
        }
        if new.logical_block > block_size {
            return Err(Error::config(format!(
                "secondary {shown} has {}-byte blocks, the volume's device was created with \
                 {block_size}-byte blocks; use a device with {block_size}-byte blocks, or \
                 restart the server with this one",
                new.logical_block
            )));
        }
        Ok(())
    }

    /// Lets go of the secondary (closes its file; the stand-in takes its fd
    /// number), so that its path can be opened again, O_EXCL included.
    pub fn release_secondary(&self) -> Result<()> {
        self.swap_secondary(placeholder()?)
            .map_err(|e| Error::runtime(format!("cannot release the secondary: {e}")))
    }

    /// The raw fds of both devices, for the io_uring backends.
    pub fn fds(&self) -> crate::backend::DevFds {
        crate::backend::DevFds::new(self.primary.fd(), self.secondary.fd())
    }

    pub fn get(&self, dev: Dev) -> &DataDev {
        match dev {
            Dev::Primary => &self.primary,
            Dev::Secondary => &self.secondary,
        }
    }

    /// The volume presents the primary's bytes; a larger secondary's tail
    /// is unused.
    pub fn volume_size(&self) -> u64 {
        self.primary.size
    }

    /// What both devices can zero without writing: the volume offers
    /// discard and write-zeroes only where both can (a discard that had to
    /// write zeros would make `fstrim` rewrite all free space).
    pub fn zeroing(&self) -> Zeroing {
        self.primary.zeroing.both(self.secondary.zeroing)
    }

    /// The smallest direct I/O both devices take.
    pub fn logical_block(&self) -> u32 {
        self.primary.logical_block.max(self.secondary.logical_block)
    }

    pub fn binding(&self, track_size: u64) -> Binding {
        Binding {
            volume_size: self.volume_size(),
            track_size,
            primary_size: self.primary.size,
            secondary_size: self.secondary.size,
            primary_id: self.primary.stable_id.clone(),
            secondary_id: self.secondary.stable_id.clone(),
            primary_path: self.primary.path.display().to_string(),
            secondary_path: self.secondary.path.display().to_string(),
        }
    }

    /// Makes the writes already completed on `set` durable.
    pub fn sync(&self, set: DevSet) -> io::Result<()> {
        for dev in set.devs() {
            self.get(dev).file.sync_data()?;
        }
        Ok(())
    }
}

/// Checks that the devices can form a volume: two different devices, the
/// secondary at least as large as the primary, the metadata on neither.
pub fn check_layout(cfg: &Config, devs: &Devices) -> Result<()> {
    let (p, s) = (&devs.primary, &devs.secondary);
    if p.identity == s.identity {
        return Err(Error::config(format!(
            "primary {} and secondary {} are the same device; give two different devices",
            p.path.display(),
            s.path.display()
        )));
    }
    // A metadata file that does not exist yet (before `format`) cannot alias.
    if let Some(m) = std::fs::metadata(&cfg.metadata)
        .ok()
        .and_then(|m| identity(&m))
    {
        for d in [p, s] {
            if m == d.identity {
                return Err(Error::config(format!(
                    "metadata {} is the {} device {}; put the metadata on a separate file or device",
                    cfg.metadata.display(),
                    d.role,
                    d.path.display()
                )));
            }
        }
    }
    if p.size == 0 {
        return Err(Error::config(format!(
            "primary {} is empty; give a device or file with data space",
            p.path.display()
        )));
    }
    // A missing secondary's stand-in has the primary's size.
    if s.size < p.size {
        return Err(Error::config(format!(
            "secondary {} ({} bytes) is smaller than primary {} ({} bytes); use a secondary at least as large",
            s.path.display(),
            s.size,
            p.path.display(),
            p.size
        )));
    }
    let lbs = u64::from(devs.logical_block());
    if p.size % lbs != 0 {
        return Err(Error::config(format!(
            "primary {} size {} is not a multiple of its {lbs}-byte block size; resize it",
            p.path.display(),
            p.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn cfg(dir: &Path, p: &Path, s: &Path) -> Config {
        Config::new("t", p, s, dir.join("meta"))
    }

    /// `Devices::open` needs O_DIRECT, which tmpfs refuses on older
    /// kernels: such a temp dir fails the test with the way out, rather
    /// than passing it unchecked.
    fn require_direct(dir: &Path) {
        let p = file(dir, "probe", 4096);
        if let Err(e) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)
        {
            panic!(
                "{} does not support O_DIRECT ({e}): run the tests with TMPDIR on a filesystem that does",
                dir.display()
            );
        }
    }

    #[test]
    fn layout_checks() {
        let d = tempfile::tempdir().unwrap();
        require_direct(d.path());
        let p = file(d.path(), "p", 1 << 20);
        let s = file(d.path(), "s", 1 << 20);
        let small = file(d.path(), "small", 1 << 19);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();

        let devs = Devices::open(&cfg(d.path(), &p, &s)).unwrap();
        assert_eq!(devs.volume_size(), 1 << 20);
        // Files on a filesystem that punches holes (ext4, xfs, tmpfs):
        // discard and write-zeroes are offered; the probe past the end
        // left the files as they were.
        let z = devs.zeroing();
        assert!(z.discard && z.write_zeroes, "{z:?}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        assert_eq!(devs.binding(65536).secondary_size, 1 << 20);

        let e = Devices::open(&cfg(d.path(), &p, &link)).err().unwrap();
        assert!(e.to_string().contains("same device"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = Devices::open(&cfg(d.path(), &p, &small)).err().unwrap();
        assert!(e.to_string().contains("smaller"), "{e}");
        let e = Devices::open(&cfg(d.path(), &p, &d.path().join("nope")))
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let mut c = cfg(d.path(), &p, &s);
        c.metadata = link;
        let e = Devices::open(&c).err().unwrap();
        assert!(e.to_string().contains("metadata"), "{e}");
    }
}
