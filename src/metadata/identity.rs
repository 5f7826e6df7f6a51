//! Who a data device is, so that the metadata can refuse a swapped,
//! renumbered or replaced disk; and whether a device already holds a
//! filesystem or a partition table, so that the first sync does not
//! overwrite one unasked.
//!
//! Block devices are named by the kernel's stable identity, read from
//! sysfs, in this order (the first that is present and non-empty):
//!
//! 1. `dm/uuid` (device-mapper: LVM, multipath, crypt set one) → `dm-uuid:…`
//! 2. `dm/name` (a device-mapper device without uuid) → `dm-name:…`
//! 3. `wwid` or `device/wwid` (SCSI/SATA/NVMe world-wide id) → `wwid:…`
//! 4. `serial` or `device/serial` (virtio with a serial, NVMe, MMC) → `serial:…`
//! 5. `loop/backing_file` (a loop device) → `loop:…`
//! 6. the hardware path of `device` under /sys/devices (the controller
//!    slot: survives renumbering by probe order, not a move to another
//!    slot) → `path:…`
//! 7. none of these: `devt:MAJOR:MINOR` (survives nothing but a reboot
//!    that numbers the disks the same way).
//!
//! A partition is its disk's identity plus `-partN`. Nothing is ever
//! written to a data device to identify it. Regular files are named by
//! `file:DEV:INODE` (the filesystem's device number and the inode): a copy
//! of the file is another file.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The identity of the device or file `meta` describes.
pub fn of(meta: &Metadata) -> String {
    if meta.file_type().is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        block(&sys).unwrap_or_else(|| format!("devt:{major}:{minor}"))
    } else {
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        format!("file:{major}:{minor}:{}", meta.ino())
    }
}

fn block(sys: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(sys).ok()?;
    if let Some(n) = attr(&dir.join("partition")) {
        let disk = dir.parent()?;
        return stable(disk).map(|id| format!("{id}-part{n}"));
    }
    stable(&dir).or_else(|| hardware_path(&dir))
}

/// The kernel identities of a whole device, by preference.
fn stable(dir: &Path) -> Option<String> {
    const SOURCES: [(&str, &str); 8] = [
        ("dm/uuid", "dm-uuid"),
        ("dm/name", "dm-name"),
        ("wwid", "wwid"),
        ("device/wwid", "wwid"),
        ("serial", "serial"),
        ("device/serial", "serial"),
        ("loop/backing_file", "loop"),
        ("md/uuid", "md-uuid"),
    ];
    SOURCES
        .iter()
        .find_map(|(file, kind)| attr(&dir.join(file)).map(|v| format!("{kind}:{v}")))
}

fn hardware_path(dir: &Path) -> Option<String> {
    let dev = std::fs::canonicalize(dir.join("device")).ok()?;
    let shown = dev.strip_prefix("/sys/devices").unwrap_or(&dev);
    Some(format!("path:{}", shown.display()))
}

/// A sysfs attribute, trimmed; None when missing or empty.
fn attr(path: &Path) -> Option<String> {
    let v = std::fs::read_to_string(path).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// What a signature at a known offset says is on a device.
struct Signature {
    offset: usize,
    magic: &'static [u8],
    what: &'static str,
}

/// Signatures found in a device's first MiB (offsets as documented by each
/// format; the same ones blkid looks at first).
const SIGNATURES: [Signature; 10] = [
    Signature {
        offset: 1080,
        magic: &[0x53, 0xef],
        what: "an ext2/3/4 filesystem",
    },
    Signature {
        offset: 0,
        magic: b"XFSB",
        what: "an XFS filesystem",
    },
    Signature {
        offset: 65600,
        magic: b"_BHRfS_M",
        what: "a btrfs filesystem",
    },
    Signature {
        offset: 512,
        magic: b"EFI PART",
        what: "a GPT partition table",
    },
    Signature {
        offset: 4096,
        magic: b"EFI PART",
        what: "a GPT partition table",
    },
    Signature {
        offset: 512,
        magic: b"LABELONE",
        what: "an LVM physical volume",
    },
    Signature {
        offset: 0,
        magic: b"LUKS\xba\xbe",
        what: "a LUKS volume",
    },
    Signature {
        offset: 4086,
        magic: b"SWAPSPACE2",
        what: "swap space",
    },
    Signature {
        offset: 4096,
        magic: &[0xfc, 0x4e, 0x2b, 0xa9],
        what: "an md RAID member",
    },
    Signature {
        offset: 3,
        magic: b"NTFS    ",
        what: "an NTFS filesystem",
    },
];

/// What `head` (a device's first bytes) says the device holds, if it looks
/// like a filesystem, volume or partition table.
pub fn signature(head: &[u8]) -> Option<&'static str> {
    let found = SIGNATURES.iter().find(|s| {
        head.get(s.offset..s.offset + s.magic.len())
            .is_some_and(|b| b == s.magic)
    });
    if let Some(s) = found {
        return Some(s.what);
    }
    // An MBR: the boot signature and at least one partition entry.
    let mbr = head.len() >= 512
        && head[510..512] == [0x55, 0xaa]
        && (0..4).any(|i| head[446 + 16 * i + 4] != 0);
    mbr.then_some("an MBR partition table")
}

/// Whether the last MiB of a device holds a signature kept at the end
/// (an md RAID 0.90/1.0 superblock, a GPT backup header).
pub fn tail_signature(tail: &[u8]) -> Option<&'static str> {
    let n = tail.len();
    if n >= 512 && &tail[n - 512..n - 504] == b"EFI PART" {
        return Some("a GPT partition table (backup header)");
    }
    // md 1.0 keeps its superblock 8 KiB from the end, 0.90 at 64 KiB
    // aligned from the end: look at every 4 KiB block of the tail.
    let md = [0xfc, 0x4e, 0x2b, 0xa9];
    let has_md = (0..n / 4096).any(|i| tail[i * 4096..i * 4096 + 4] == md);
    has_md.then_some("an md RAID member")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_common_signatures_and_not_zeros() {
        let mut head = vec![0u8; 1 << 20];
        assert_eq!(signature(&head), None);
        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(signature(&head), Some("an ext2/3/4 filesystem"));
        let mut mbr = vec![0u8; 1 << 20];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(signature(&mbr), None, "no partition entry");
        mbr[446 + 4] = 0x83;
        assert_eq!(signature(&mbr), Some("an MBR partition table"));
        let mut tail = vec![0u8; 1 << 20];
        assert_eq!(tail_signature(&tail), None);
        let n = tail.len();
        tail[n - 512..n - 504].copy_from_slice(b"EFI PART");
        assert!(tail_signature(&tail).unwrap().contains("GPT"));
    }

    #[test]
    fn a_file_is_named_by_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let id = of(&std::fs::metadata(&a).unwrap());
        assert!(id.starts_with("file:"), "{id}");
        let b = dir.path().join("b");
        std::fs::copy(&a, &b).unwrap();
        assert_ne!(of(&std::fs::metadata(&b).unwrap()), id);
        std::fs::rename(&a, dir.path().join("c")).unwrap();
        assert_eq!(of(&std::fs::metadata(dir.path().join("c")).unwrap()), id);
    }
}
