//! The on-disk format of a dm-log-writes log, as the kernel writes it
//! (Documentation/admin-guide/device-mapper/log-writes.rst and
//! drivers/md/dm-log-writes.c), and replaying it onto a device.
//!
//! Layout, all little-endian, in units of the log's `sectorsize` (the data
//! device's logical block size, recorded in the super block):
//!
//! ```text
//! byte 0:           super  { magic u64, version u64, nr_entries u64, sectorsize u32 }
//! sector 1:         entry 0 header { sector u64, nr_sectors u64, flags u64, data_len u64 }
//!                   (a MARK keeps its name right after the header, data_len bytes)
//! next nr_sectors:  entry 0's data (none for a DISCARD or a MARK)
//! then:             entry 1 header, its data, ...
//! ```
//!
//! `sector` and `nr_sectors` of an entry are in `sectorsize` units too. The
//! kernel logs a write only once a FLUSH covering it completed (or at once
//! for a FUA write), so replaying entries `0..=N` rebuilds the device as a
//! power cut right after entry N could have left it.

use std::fmt;
use std::io;

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
/// Bytes of an entry header before a mark's name.
pub const ENTRY_HEADER_LEN: usize = 32;
const SUPER_LEN: usize = 28;

/// An entry's flags (`LOG_*_FLAG` in the kernel).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Flags(pub u64);

impl Flags {
    pub const FLUSH: u64 = 1 << 0;
    pub const FUA: u64 = 1 << 1;
    pub const DISCARD: u64 = 1 << 2;
    pub const MARK: u64 = 1 << 3;
    pub const METADATA: u64 = 1 << 4;
    const NAMES: [(u64, &'static str); 5] = [
        (Self::FLUSH, "FLUSH"),
        (Self::FUA, "FUA"),
        (Self::DISCARD, "DISCARD"),
        (Self::MARK, "MARK"),
        (Self::METADATA, "META"),
    ];

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }

    /// A point a power cut is worth checking at: the device promised
    /// durability (FLUSH, FUA) or the test recorded an event (MARK).
    pub fn is_point(self) -> bool {
        self.0 & (Self::FLUSH | Self::FUA | Self::MARK) != 0
    }
}

impl fmt::Display for Flags {
    /// `FLUSH|FUA`, `-` for none; unknown bits as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Self::NAMES
            .iter()
            .filter(|(bit, _)| self.has(*bit))
            .map(|(_, name)| (*name).to_string())
            .collect();
        let known = Self::NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
        if self.0 & !known != 0 {
            parts.push(format!("{:#x}", self.0 & !known));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join("|"))
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Super {
    pub nr_entries: u64,
    pub sectorsize: u32,
}

/// One logged entry.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    pub index: u64,
    /// First sector written, in the log's sectorsize units.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: Flags,
    pub mark: Option<String>,
    /// Byte offset of the entry's data in the log.
    pub data_offset: u64,
}

impl Entry {
    /// Bytes of data following the header in the log.
    pub fn logged_data_len(&self, sectorsize: u32) -> u64 {
        if self.flags.has(Flags::DISCARD) || self.flags.has(Flags::MARK) {
            0
        } else {
            self.nr_sectors * u64::from(sectorsize)
        }
    }
}

/// A log that is not in the kernel's format, or is cut short.
#[derive(Debug)]
pub enum LogError {
    Format(String),
    Io(io::Error),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Format(m) => f.write_str(m),
            LogError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> Self {
        LogError::Io(e)
    }
}

fn format_err(msg: impl Into<String>) -> LogError {
    LogError::Format(msg.into())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses the super block (the first bytes of the log).
pub fn parse_super(buf: &[u8]) -> Result<Super, LogError> {
    if buf.len() < SUPER_LEN {
        return Err(format_err("the log is shorter than its super block"));
    }
    let magic = le64(buf, 0);
    if magic != MAGIC {
        return Err(format_err(format!(
            "not a dm-log-writes log: magic {magic:#x}, expected {MAGIC:#x}"
        )));
    }
    let version = le64(buf, 8);
    if version != VERSION {
        return Err(format_err(format!(
            "dm-log-writes log version {version} is not supported (only {VERSION})"
        )));
    }
    let sectorsize = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if !sectorsize.is_power_of_two() || sectorsize < 512 {
        return Err(format_err(format!(
            "log sector size {sectorsize} is not a power of two >= 512"
        )));
    }
    Ok(Super {
        nr_entries: le64(buf, 16),
        sectorsize,
    })
}

/// Parses entry `index` from its header sector, which sits at byte
/// `offset` of the log.
pub fn parse_entry(index: u64, sector_buf: &[u8], offset: u64) -> Result<Entry, LogError> {
    let at = |what: &str| format!("entry {index} (log byte {offset}): {what}");
    let flags = Flags(le64(sector_buf, 16));
    let data_len = le64(sector_buf, 24);
    let mark = if flags.has(Flags::MARK) {
        let room = (sector_buf.len() - ENTRY_HEADER_LEN) as u64;
        if data_len > room {
            return Err(format_err(at(&format!(
                "mark name of {data_len} bytes does not fit in its sector"
            ))));
        }
        let raw = &sector_buf[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + data_len as usize];
        Some(String::from_utf8_lossy(raw).into_owned())
    } else {
        if data_len != 0 {
            // Inline data (older kernels' DAX path) is laid out differently.
            return Err(format_err(at(&format!(
                "{data_len} bytes of inline data; only bio data is supported"
            ))));
        }
        None
    };
    let sector = le64(sector_buf, 0);
    let nr_sectors = le64(sector_buf, 8);
    if flags.has(Flags::DISCARD) && flags.has(Flags::MARK) {
        return Err(format_err(at("both DISCARD and MARK")));
    }
    Ok(Entry {
        index,
        sector,
        nr_sectors,
        flags,
        mark,
        data_offset: offset + sector_buf.len() as u64,
    })
}

/// Positional reads of the log (a file or device, or bytes in tests).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        if end > <[u8]>::len(self) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

/// Walks a log's entries in order, reading headers only.
pub struct Log<'a, R: ReadAt + ?Sized> {
    src: &'a R,
    pub sup: Super,
    len: u64,
}

impl<'a, R: ReadAt + ?Sized> Log<'a, R> {
    pub fn open(src: &'a R) -> Result<Self, LogError> {
        let len = src.len()?;
        let mut buf = [0u8; SUPER_LEN];
        src.read_exact_at(&mut buf, 0)
            .map_err(|_| format_err("the log is shorter than its super block"))?;
        let sup = parse_super(&buf)?;
        Ok(Log { src, sup, len })
    }

    /// Every entry, in log order; stops at the first error.
    pub fn entries(&self) -> Entries<'_, 'a, R> {
        Entries {
            log: self,
            index: 0,
            offset: u64::from(self.sup.sectorsize),
            failed: false,
        }
    }
}

pub struct Entries<'l, 'a, R: ReadAt + ?Sized> {
    log: &'l Log<'a, R>,
    index: u64,
    offset: u64,
    failed: bool,
}

impl<R: ReadAt + ?Sized> Entries<'_, '_, R> {
    fn read_next(&mut self) -> Result<Entry, LogError> {
        let ss = self.log.sup.sectorsize;
        let short = |what: &str| {
            format_err(format!(
                "entry {} {what} runs past the end of the log ({} bytes); the super block promises {} entries",
                self.index, self.log.len, self.log.sup.nr_entries
            ))
        };
        if self.offset + u64::from(ss) > self.log.len {
            return Err(short("header"));
        }
        let mut sector = vec![0u8; ss as usize];
        self.log.src.read_exact_at(&mut sector, self.offset)?;
        let entry = parse_entry(self.index, &sector, self.offset)?;
        let end = entry
            .data_offset
            .checked_add(entry.logged_data_len(ss))
            .filter(|&e| e <= self.log.len)
            .ok_or_else(|| short("data"))?;
        self.offset = end;
        self.index += 1;
        Ok(entry)
    }
}

impl<R: ReadAt + ?Sized> Iterator for Entries<'_, '_, R> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= self.log.sup.nr_entries {
            return None;
        }
        let r = self.read_next();
        self.failed = r.is_err();
        Some(r)
    }
}

/// Where replayed entries go.
pub trait WriteAt {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl WriteAt for Vec<u8> {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset as usize + buf.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
}

/// What a replay did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReplayStats {
    pub entries: u64,
    pub writes: u64,
    pub discards: u64,
    pub bytes: u64,
}

const CHUNK: u64 = 1 << 20;

/// Applies entries `from..=to` of the log to `target`: writes copy their
/// data, discards write zeros (a discarded range then reads as zeros, the
/// one content every later check can rely on), flushes and marks change
/// nothing. `target_len` bounds the writes.
pub fn replay<R: ReadAt + ?Sized, W: WriteAt>(
    log: &Log<'_, R>,
    target: &mut W,
    target_len: u64,
    from: u64,
    to: u64,
) -> Result<ReplayStats, LogError> {
    let ss = u64::from(log.sup.sectorsize);
    let mut stats = ReplayStats::default();
    let mut buf = vec![0u8; CHUNK as usize];
    for entry in log.entries() {
        let entry = entry?;
        if entry.index > to {
            break;
        }
        if entry.index < from || entry.flags.has(Flags::MARK) || entry.nr_sectors == 0 {
            continue;
        }
        let start = entry.sector * ss;
        let len = entry.nr_sectors * ss;
        if start + len > target_len {
            return Err(format_err(format!(
                "entry {} writes bytes {start}..{} but the target has only {target_len}",
                entry.index,
                start + len
            )));
        }
        let discard = entry.flags.has(Flags::DISCARD);
        if discard {
            buf.fill(0);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            if !discard {
                log.src
                    .read_exact_at(&mut buf[..n], entry.data_offset + done)?;
            }
            target.write_all_at(&buf[..n], start + done)?;
            done += n as u64;
        }
        stats.entries += 1;
        stats.bytes += len;
        if discard {
            stats.discards += 1;
        } else {
            stats.writes += 1;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: usize = 512;

    /// Builds a log image the way the kernel lays it out.
    struct Builder {
        img: Vec<u8>,
        entries: u64,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                img: vec![0u8; SS],
                entries: 0,
            }
        }
        fn entry(mut self, sector: u64, nr: u64, flags: u64, name: &[u8], data: &[u8]) -> Self {
            let mut h = vec![0u8; SS];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(name.len() as u64).to_le_bytes());
            h[32..32 + name.len()].copy_from_slice(name);
            self.img.extend_from_slice(&h);
            self.img.extend_from_slice(data);
            self.entries += 1;
            self
        }
        fn write(self, sector: u64, fill: u8, nr: u64, flags: u64) -> Self {
            let data = vec![fill; nr as usize * SS];
            self.entry(sector, nr, flags, b"", &data)
        }
        fn finish(mut self) -> Vec<u8> {
            let n = self.entries;
            self.img[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            self.img[8..16].copy_from_slice(&VERSION.to_le_bytes());
            self.img[16..24].copy_from_slice(&n.to_le_bytes());
            self.img[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
            self.img
        }
    }

    /// write A at 0 (2 sectors), FLUSH, write B at 4 with FUA, discard 0..1,
    /// mark "m1", write C at 1 (1 sector)
    fn sample() -> Vec<u8> {
        Builder::new()
            .write(0, 0xaa, 2, 0)
            .entry(0, 0, Flags::FLUSH, b"", b"")
            .write(4, 0xbb, 1, Flags::FUA)
            .entry(0, 1, Flags::DISCARD, b"", b"")
            .entry(0, 0, Flags::MARK, b"m1", b"")
            .write(1, 0xcc, 1, 0)
            .finish()
    }

    fn all(img: &[u8]) -> Vec<Entry> {
        Log::open(img)
            .unwrap()
            .entries()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn parses_every_kind_of_entry_in_order() {
        let img = sample();
        let log = Log::open(&img[..]).unwrap();
        assert_eq!(
            log.sup,
            Super {
                nr_entries: 6,
                sectorsize: 512
            }
        );
        let e = all(&img);
        let summary: Vec<(u64, String, u64, u64, Option<&str>)> = e
            .iter()
            .map(|e| {
                (
                    e.index,
                    e.flags.to_string(),
                    e.sector,
                    e.nr_sectors,
                    e.mark.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "-".into(), 0, 2, None),
                (1, "FLUSH".into(), 0, 0, None),
                (2, "FUA".into(), 4, 1, None),
                (3, "DISCARD".into(), 0, 1, None),
                (4, "MARK".into(), 0, 0, Some("m1")),
                (5, "-".into(), 1, 1, None),
            ]
        );
        // the super takes sector 0; each header one sector, its data right
        // after: entry 0 header 1, data 2-3; flush header 4; entry 2 header
        // 5, data 6; discard header 7 and no data; mark 8; entry 5 header 9
        assert_eq!(e[0].data_offset, 2 * 512);
        assert_eq!(e[2].data_offset, 6 * 512);
        assert_eq!(e[3].data_offset, 8 * 512);
        assert_eq!(e[4].data_offset, 9 * 512);
        assert_eq!(e[5].data_offset, 10 * 512);
    }

    #[test]
    fn replay_applies_writes_and_discards_up_to_an_entry() {
        let img = sample();
        let log = Log::open(&img[..]).unwrap();
        let mut t = vec![0x11u8; 8 * SS];
        let s = replay(&log, &mut t, 8 * 512, 0, 2).unwrap();
        assert_eq!((s.writes, s.discards, s.bytes), (2, 0, 3 * 512));
        assert!(t[..2 * SS].iter().all(|&b| b == 0xaa));
        assert!(t[2 * SS..4 * SS].iter().all(|&b| b == 0x11));
        assert!(t[4 * SS..5 * SS].iter().all(|&b| b == 0xbb));
        // on top of that state, 3..=5: the discard zeroes sector 0, then C
        let s = replay(&log, &mut t, 8 * 512, 3, 5).unwrap();
        assert_eq!((s.writes, s.discards), (1, 1));
        assert!(t[..SS].iter().all(|&b| b == 0));
        assert!(t[SS..2 * SS].iter().all(|&b| b == 0xcc));
        // incremental == from scratch
        let mut fresh = vec![0x11u8; 8 * SS];
        replay(&log, &mut fresh, 8 * 512, 0, 5).unwrap();
        assert_eq!(t, fresh);
    }

    #[test]
    fn replay_refuses_writes_past_the_target() {
        let img = sample();
        let log = Log::open(&img[..]).unwrap();
        let mut t = vec![0u8; 4 * SS];
        let e = replay(&log, &mut t, 4 * 512, 0, 2).unwrap_err();
        assert!(
            e.to_string().contains("entry 2 writes bytes 2048..2560"),
            "{e}"
        );
    }

    #[test]
    fn stops_at_nr_entries_of_the_super() {
        let mut img = sample();
        img[16..24].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(all(&img).len(), 3);
    }

    #[test]
    fn bad_magic_version_and_truncation_are_errors() {
        let mut img = sample();
        img[0] ^= 1;
        let e = Log::open(&img[..]).err().unwrap();
        assert!(e.to_string().starts_with("not a dm-log-writes log"), "{e}");

        let mut img = sample();
        img[8] = 2;
        assert!(Log::open(&img[..])
            .err()
            .unwrap()
            .to_string()
            .contains("version 2"));

        // cut inside entry 2's data
        let img = sample();
        let cut = &img[..6 * 512 + 100];
        let log = Log::open(cut).unwrap();
        let r: Vec<_> = log.entries().collect();
        assert_eq!(r.len(), 3);
        let e = r[2].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("entry 2 data runs past the end of the log"),
            "{e}"
        );
    }

    #[test]
    fn mark_name_longer_than_its_sector_is_an_error() {
        let mut img = sample();
        // entry 4 (the mark) header is at sector 8
        let at = 8 * 512 + 24;
        img[at..at + 8].copy_from_slice(&600u64.to_le_bytes());
        let e = all_err(&img);
        assert!(e.contains("entry 4") && e.contains("does not fit"), "{e}");
    }

    fn all_err(img: &[u8]) -> String {
        Log::open(img)
            .unwrap()
            .entries()
            .find_map(|r| r.err())
            .unwrap()
            .to_string()
    }

    #[test]
    fn flags_print_and_classify() {
        assert_eq!(Flags(Flags::FLUSH | Flags::FUA).to_string(), "FLUSH|FUA");
        assert_eq!(Flags(Flags::METADATA | 1 << 9).to_string(), "META|0x200");
        assert!(Flags(Flags::MARK).is_point());
        assert!(Flags(Flags::FUA).is_point());
        assert!(!Flags(Flags::DISCARD).is_point());
        assert!(!Flags(0).is_point());
    }
}
