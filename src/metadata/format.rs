//! The on-disk layout: superblock (and its backup), two header slots, two
//! page slots per (table, chunk), two restore log slots. Every field is little-endian; see
//! docs/design.md, "Metadata format", for the byte map. Encoding and
//! decoding only: no I/O.

use super::Binding;
use crate::core::table::CHUNK_WORDS;
use crate::core::{Operation, OperationKind, VolumeState};

pub const BLOCK: u64 = 4096;
pub const SUPER_MAGIC: [u8; 8] = *b"SPLITMIR";
pub const HEADER_MAGIC: [u8; 8] = *b"SMHEADER";
/// 2: headers gained the per-page "all ones" flags. 3: the superblock
/// records each device's identity and has a backup at the end; headers
/// carry "all clear" flags, a crc32c per page and a checksum per 512-byte
/// sector.
pub const VERSION: u32 = 3;
/// Bytes of a header before its page selectors (then the "all ones" flags,
/// the "all clear" flags, the page crcs, then the crc of it all).
const HEADER_FIXED: usize = 48;
/// Headers are framed in sectors, the unit a device writes whole: each
/// sector carries its generation and its own crc32c, so that a torn header
/// write (whole sectors of two generations) can be told from a damaged
/// header (a sector that fails its crc).
pub const SECTOR: usize = 512;
const SECTOR_PAYLOAD: usize = SECTOR - 12;
/// Bytes of one device identity in the superblock.
pub const ID_BYTES: usize = 1024;
const ID_AT: [usize; 2] = [128, 128 + ID_BYTES];

/// Where everything lives, derived from the track count alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub tracks: u64,
    pub tables: u32,
    pub chunks: u32,
    /// Bytes of one header slot (a multiple of 4 KiB).
    pub header_bytes: u64,
}

impl Layout {
    pub fn new(tracks: u64, tables: u32) -> Self {
        let chunks = tracks.div_ceil(crate::core::table::CHUNK_TRACKS) as u32;
        let pages = tables as u64 * chunks as u64;
        let logical = header_logical_len(pages as usize) as u64;
        let sectors = logical.div_ceil(SECTOR_PAYLOAD as u64);
        let header_bytes = (sectors * SECTOR as u64).next_multiple_of(BLOCK);
        Layout {
            tracks,
            tables,
            chunks,
            header_bytes,
        }
    }

    pub fn pages(&self) -> usize {
        self.tables as usize * self.chunks as usize
    }

    pub fn page_index(&self, table: usize, chunk: usize) -> usize {
        table * self.chunks as usize + chunk
    }

    pub fn header_offset(&self, slot: u64) -> u64 {
        BLOCK + slot * self.header_bytes
    }

    pub fn pages_offset(&self) -> u64 {
        BLOCK + 2 * self.header_bytes
    }

    /// Offset of copy `slot` (0 or 1) of page `index`.
    pub fn page_offset(&self, index: usize, slot: bool) -> u64 {
        self.pages_offset() + (2 * index as u64 + slot as u64) * BLOCK
    }

    fn pages_end(&self) -> u64 {
        self.pages_offset() + 2 * self.pages() as u64 * BLOCK
    }

    /// Offset of restore log slot `slot` (0 or 1), after the pages.
    pub fn log_offset(&self, slot: u64) -> u64 {
        self.pages_end() + slot * LOG_SLOT_BYTES
    }

    /// The last block of the metadata area: the backup superblock.
    pub fn backup_offset(&self) -> u64 {
        self.log_offset(2)
    }

    pub fn total_bytes(&self) -> u64 {
        self.backup_offset() + BLOCK
    }

    /// What metadata made before the restore log needs: the area without
    /// the log slots (open grows such a file, or runs without the log).
    pub fn total_bytes_without_log(&self) -> u64 {
        self.pages_end() + BLOCK
    }
}

/// Bytes of one restore log slot; a record fills whole blocks of it.
pub const LOG_SLOT_BYTES: u64 = 16 * BLOCK;
pub const LOG_MAGIC: [u8; 8] = *b"SMRESTLG";
/// Bytes of a record before its tracks.
const LOG_FIXED: usize = 64;

/// One record of the restore log (see `core::restore_log`): the tracks
/// that host writes restored and no durable commit recorded yet, valid in
/// the boot that wrote it. Magic, uuid, boot id, number, track count, the
/// crc32c of it all (with the crc field zero), then the tracks as u64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRecord {
    pub boot: [u8; 16],
    pub seq: u64,
    pub tracks: Vec<u64>,
}

impl RestoreRecord {
    /// Tracks one record can carry.
    pub fn capacity() -> usize {
        (LOG_SLOT_BYTES as usize - LOG_FIXED) / 8
    }

    /// Bytes the record takes: whole blocks.
    pub fn encoded_len(&self) -> usize {
        (LOG_FIXED + 8 * self.tracks.len()).next_multiple_of(BLOCK as usize)
    }

    /// Encodes into `b` (at least [`RestoreRecord::encoded_len`] bytes).
    pub fn encode(&self, uuid: &[u8; 16], b: &mut [u8]) {
        let end = LOG_FIXED + 8 * self.tracks.len();
        b[..self.encoded_len()].fill(0);
        b[0..8].copy_from_slice(&LOG_MAGIC);
        b[8..24].copy_from_slice(uuid);
        b[24..40].copy_from_slice(&self.boot);
        put_u64(b, 40, self.seq);
        put_u64(b, 48, self.tracks.len() as u64);
        for (i, &t) in self.tracks.iter().enumerate() {
            put_u64(b, LOG_FIXED + 8 * i, t);
        }
        let crc = crc32c::crc32c(&b[..end]);
        put_u32(b, 56, crc);
    }

    /// A slot's record, if it holds a complete one of this volume.
    pub fn decode(b: &[u8], uuid: &[u8; 16]) -> Option<RestoreRecord> {
        if b.len() < LOG_FIXED || b[0..8] != LOG_MAGIC || b[8..24] != *uuid {
            return None;
        }
        let count = get_u64(b, 48);
        if count > Self::capacity() as u64 {
            return None;
        }
        let end = LOG_FIXED + 8 * count as usize;
        if end > b.len() {
            return None;
        }
        // The crc of the record with its own field read as zeros.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..56]), &[0; 4]);
        if crc32c::crc32c_append(crc, &b[60..end]) != get_u32(b, 56) {
            return None;
        }
        Some(RestoreRecord {
            boot: b[24..40].try_into().unwrap(),
            seq: get_u64(b, 40),
            tracks: (0..count as usize)
                .map(|i| get_u64(b, LOG_FIXED + 8 * i))
                .collect(),
        })
    }
}

/// The logical bytes of a header with `pages` pages (before sector framing).
/// Bit arrays of one bit per page after the fixed part: selectors, "all
/// ones", "all clear".
const FLAG_ARRAYS: usize = 3;

fn header_logical_len(pages: usize) -> usize {
    HEADER_FIXED + FLAG_ARRAYS * pages.div_ceil(8) + 4 * pages + 4
}

/// The identity block at offset 0 (and its backup in the last block),
/// written by `format` and `replace-secondary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub binding: Binding,
    pub layout: Layout,
}

/// Why a block does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Magic,
    Crc,
    Version(u32),
    Field,
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

/// Stores the crc32c of everything before the last 4 bytes in them.
fn seal(b: &mut [u8]) {
    let end = b.len() - 4;
    let crc = crc32c::crc32c(&b[..end]);
    put_u32(b, end, crc);
}

fn sealed(b: &[u8]) -> bool {
    let end = b.len() - 4;
    crc32c::crc32c(&b[..end]) == get_u32(b, end)
}

/// An identity cut to what the superblock holds (at a character boundary).
pub fn fit_identity(id: &str) -> String {
    let mut end = id.len().min(ID_BYTES);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].to_string()
}

impl Superblock {
    /// Encodes into a zeroed 4 KiB block.
    pub fn encode(&self, b: &mut [u8]) {
        b.fill(0);
        b[0..8].copy_from_slice(&SUPER_MAGIC);
        put_u32(b, 8, VERSION);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(b, 32, self.binding.volume_size);
        put_u64(b, 40, self.binding.track_size);
        put_u64(b, 48, self.binding.primary_size);
        put_u64(b, 56, self.binding.secondary_size);
        put_u64(b, 64, self.layout.tracks);
        put_u32(b, 72, self.layout.tables);
        put_u32(b, 76, self.layout.chunks);
        put_u64(b, 80, self.layout.header_bytes);
        put_u64(b, 88, self.layout.pages_offset());
        let ids = [&self.binding.primary_id, &self.binding.secondary_id];
        for (i, id) in ids.into_iter().enumerate() {
            let id = fit_identity(id);
            put_u16(b, 96 + 2 * i, id.len() as u16);
            b[ID_AT[i]..ID_AT[i] + id.len()].copy_from_slice(id.as_bytes());
        }
        seal(&mut b[..BLOCK as usize]);
    }

    pub fn decode(b: &[u8]) -> Result<Self, Bad> {
        let b = &b[..BLOCK as usize];
        if b[0..8] != SUPER_MAGIC {
            return Err(Bad::Magic);
        }
        if !sealed(b) {
            return Err(Bad::Crc);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return Err(Bad::Version(version));
        }
        let layout = Layout::new(get_u64(b, 64), get_u32(b, 72));
        let consistent = layout.chunks == get_u32(b, 76)
            && layout.header_bytes == get_u64(b, 80)
            && layout.pages_offset() == get_u64(b, 88);
        if !consistent {
            return Err(Bad::Field);
        }
        let id = |i: usize| -> Result<String, Bad> {
            let len = get_u16(b, 96 + 2 * i) as usize;
            if len > ID_BYTES {
                return Err(Bad::Field);
            }
            let raw = &b[ID_AT[i]..ID_AT[i] + len];
            String::from_utf8(raw.to_vec()).map_err(|_| Bad::Field)
        };
        Ok(Superblock {
            uuid: b[16..32].try_into().unwrap(),
            binding: Binding {
                volume_size: get_u64(b, 32),
                track_size: get_u64(b, 40),
                primary_size: get_u64(b, 48),
                secondary_size: get_u64(b, 56),
                primary_id: id(0)?,
                secondary_id: id(1)?,
                ..Binding::default()
            },
            layout,
        })
    }
}

/// One committed version: state, operation, and which copy of each page
/// is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub state: VolumeState,
    pub operation: Option<Operation>,
    /// Per page (table-major): whether copy 1 (else copy 0) is current.
    pub selectors: Vec<bool>,
    /// Per page: every bit is set, and neither copy is read. A full restore
    /// or establish sets whole tables; with these flags its commit writes
    /// one header instead of a page per 4 GiB of tracks, so the restore
    /// command returns as fast at 1 TiB as at 1 GiB.
    pub ones: Vec<bool>,
    /// Per page: no bit is set, and neither copy is read. Most pages of a
    /// large volume are clear most of the time (nothing changed there since
    /// the split, nothing pending, nothing stale): opening it then reads the
    /// pages that hold something, not one per 4 GiB of every table.
    pub zeros: Vec<bool>,
    /// Per page: the crc32c of its current copy (0 for an "all ones" or
    /// "all clear" page), checked when the page is loaded.
    pub crcs: Vec<u32>,
}

/// What a header slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// A complete header of this format.
    Valid(Header),
    /// Nothing of this format: zeros (after `format`) or another format's
    /// leftovers.
    Empty,
    /// Every sector is intact but they belong to different generations: a
    /// header write cut short by a crash. That commit was never
    /// acknowledged (acknowledgement waits for the header's flush).
    Torn,
    /// A sector fails its checksum: damage, not an interrupted write.
    /// `generation` is the one sector 0 names, if sector 0 is intact.
    Damaged {
        sector: usize,
        generation: Option<u64>,
    },
}

/// A sector's trailer: the generation of the header it belongs to, then a
/// crc32c of the sector's first 508 bytes.
fn seal_sector(s: &mut [u8], generation: u64) {
    put_u64(s, SECTOR_PAYLOAD, generation);
    seal(s);
}

impl Header {
    /// The header slot this generation is written to: generations
    /// alternate, so a commit never overwrites the header it replaces.
    pub fn slot(generation: u64) -> u64 {
        generation % 2
    }

    fn logical(&self, uuid: &[u8; 16]) -> Vec<u8> {
        let pages = self.selectors.len();
        let mut b = vec![0u8; header_logical_len(pages)];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..24].copy_from_slice(uuid);
        put_u64(&mut b, 24, self.generation);
        b[32] = self.state.code();
        if let Some(op) = self.operation {
            b[33] = 1;
            b[34] = op.kind.code();
            b[35] = op.incremental as u8;
            b[36] = op.protect as u8;
            put_u64(&mut b, 40, op.total);
        }
        let flags = pages.div_ceil(8);
        for i in 0..pages {
            b[HEADER_FIXED + i / 8] |= (self.selectors[i] as u8) << (i % 8);
            b[HEADER_FIXED + flags + i / 8] |= (self.ones[i] as u8) << (i % 8);
            b[HEADER_FIXED + 2 * flags + i / 8] |= (self.zeros[i] as u8) << (i % 8);
        }
        let crcs_at = HEADER_FIXED + FLAG_ARRAYS * flags;
        for (i, &c) in self.crcs.iter().enumerate() {
            put_u32(&mut b, crcs_at + 4 * i, c);
        }
        seal(&mut b);
        b
    }

    /// Encodes into a buffer of `layout.header_bytes`: the logical header
    /// cut into sectors of 500 bytes, each sealed with its trailer; the
    /// padding sectors are sealed too, so that a torn write shows there.
    pub fn encode(&self, uuid: &[u8; 16], b: &mut [u8]) {
        b.fill(0);
        let logical = self.logical(uuid);
        for (i, s) in b.chunks_mut(SECTOR).enumerate() {
            let from = (i * SECTOR_PAYLOAD).min(logical.len());
            let to = (from + SECTOR_PAYLOAD).min(logical.len());
            s[..to - from].copy_from_slice(&logical[from..to]);
            seal_sector(s, self.generation);
        }
    }

    /// Classifies a header slot. Headers of another format (other uuid)
    /// count as empty.
    pub fn decode(b: &[u8], uuid: &[u8; 16], pages: usize) -> Slot {
        let sectors: Vec<&[u8]> = b.chunks(SECTOR).collect();
        let first_ok = sealed(sectors[0]);
        if !first_ok && sectors[0].iter().all(|&x| x == 0) {
            return Slot::Empty;
        }
        if first_ok && (sectors[0][0..8] != HEADER_MAGIC || sectors[0][8..24] != *uuid) {
            return Slot::Empty;
        }
        let generation = first_ok.then(|| get_u64(sectors[0], SECTOR_PAYLOAD));
        if let Some(sector) = sectors.iter().position(|s| !sealed(s)) {
            return Slot::Damaged { sector, generation };
        }
        if sectors
            .iter()
            .any(|s| Some(get_u64(s, SECTOR_PAYLOAD)) != generation)
        {
            return Slot::Torn;
        }
        let mut logical = Vec::with_capacity(sectors.len() * SECTOR_PAYLOAD);
        for s in &sectors {
            logical.extend_from_slice(&s[..SECTOR_PAYLOAD]);
        }
        logical.truncate(header_logical_len(pages));
        match Self::decode_logical(&logical, pages) {
            Some(h) if h.generation == generation.unwrap_or(0) => Slot::Valid(h),
            _ => Slot::Damaged {
                sector: 0,
                generation,
            },
        }
    }

    fn decode_logical(b: &[u8], pages: usize) -> Option<Self> {
        if b.len() < header_logical_len(pages) || !sealed(b) {
            return None;
        }
        let state = VolumeState::from_code(b[32])?;
        let operation = match b[33] {
            0 => None,
            1 => Some(Operation {
                kind: OperationKind::from_code(b[34])?,
                incremental: b[35] != 0,
                protect: b[36] != 0,
                total: get_u64(b, 40),
            }),
            _ => return None,
        };
        let bit = |at: usize, i: usize| b[at + i / 8] & (1 << (i % 8)) != 0;
        let flags = pages.div_ceil(8);
        let crcs_at = HEADER_FIXED + FLAG_ARRAYS * flags;
        let ones: Vec<bool> = (0..pages).map(|i| bit(HEADER_FIXED + flags, i)).collect();
        let zeros: Vec<bool> = (0..pages)
            .map(|i| bit(HEADER_FIXED + 2 * flags, i))
            .collect();
        if ones.iter().zip(&zeros).any(|(&o, &z)| o && z) {
            return None; // a page cannot be all ones and all clear
        }
        Some(Header {
            generation: get_u64(b, 24),
            state,
            operation,
            selectors: (0..pages).map(|i| bit(HEADER_FIXED, i)).collect(),
            ones,
            zeros,
            crcs: (0..pages).map(|i| get_u32(b, crcs_at + 4 * i)).collect(),
        })
    }
}

/// A page: one chunk of a table, 512 little-endian words.
pub fn encode_page(words: &[u64], b: &mut [u8]) {
    for (i, w) in words.iter().enumerate().take(CHUNK_WORDS) {
        put_u64(b, i * 8, *w);
    }
}

pub fn decode_page(b: &[u8], words: &mut [u64]) {
    for (i, w) in words.iter_mut().enumerate().take(CHUNK_WORDS) {
        *w = get_u64(b, i * 8);
    }
}

/// The crc32c a header records for a page.
pub fn page_crc(b: &[u8]) -> u32 {
    crc32c::crc32c(&b[..BLOCK as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            volume_size: 1 << 30,
            track_size: 1 << 17,
            primary_size: 1 << 30,
            secondary_size: 2 << 30,
            primary_id: "wwid:naa.600a0b80".into(),
            secondary_id: "serial:S3Z9NB0K".into(),
            ..Binding::default()
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock {
            uuid: [7; 16],
            binding: binding(),
            layout: Layout::new(8192, 4),
        };
        let mut b = vec![0u8; 4096];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b), Ok(sb));
        b[40] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(Bad::Crc));
        b[0] = 0;
        assert_eq!(Superblock::decode(&b), Err(Bad::Magic));
    }

    #[test]
    fn long_identities_are_cut_to_fit() {
        let long = "é".repeat(ID_BYTES);
        let cut = fit_identity(&long);
        assert!(cut.len() <= ID_BYTES && long.starts_with(&cut));
        let mut bd = binding();
        bd.primary_id = cut;
        let sb = Superblock {
            uuid: [1; 16],
            binding: bd,
            layout: Layout::new(8192, 4),
        };
        let mut b = vec![0u8; 4096];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b), Ok(sb));
    }

    fn header(layout: &Layout, generation: u64) -> Header {
        Header {
            generation,
            state: VolumeState::Restoring,
            operation: Some(Operation {
                kind: OperationKind::Restore,
                incremental: true,
                protect: true,
                total: 42,
            }),
            selectors: (0..layout.pages()).map(|i| i % 3 == 0).collect(),
            ones: (0..layout.pages()).map(|i| i % 5 == 1).collect(),
            zeros: (0..layout.pages()).map(|i| i % 5 == 2).collect(),
            crcs: (0..layout.pages()).map(|i| i as u32 * 7).collect(),
        }
    }

    #[test]
    fn header_round_trips_and_rejects_foreign_uuid() {
        let layout = Layout::new(100_000_000, 4);
        assert!(layout.header_bytes > 4096, "spans several blocks");
        let h = header(&layout, 9);
        let mut b = vec![0u8; layout.header_bytes as usize];
        h.encode(&[1; 16], &mut b);
        assert_eq!(Header::decode(&b, &[1; 16], layout.pages()), Slot::Valid(h));
        assert_eq!(Header::decode(&b, &[2; 16], layout.pages()), Slot::Empty);
        let zero = vec![0u8; layout.header_bytes as usize];
        assert_eq!(Header::decode(&zero, &[1; 16], layout.pages()), Slot::Empty);
    }

    #[test]
    fn a_torn_header_is_told_from_a_damaged_one() {
        let layout = Layout::new(100_000_000, 4);
        let pages = layout.pages();
        let mut old = vec![0u8; layout.header_bytes as usize];
        header(&layout, 7).encode(&[1; 16], &mut old);
        let mut new = vec![0u8; layout.header_bytes as usize];
        header(&layout, 9).encode(&[1; 16], &mut new);
        // Whole sectors of two generations: an interrupted write.
        let mut torn = new.clone();
        torn[3 * SECTOR..].copy_from_slice(&old[3 * SECTOR..]);
        assert_eq!(Header::decode(&torn, &[1; 16], pages), Slot::Torn);
        // A flipped bit: damage, whichever sector it is in.
        let mut bad = new.clone();
        bad[2 * SECTOR + 17] ^= 4;
        assert_eq!(
            Header::decode(&bad, &[1; 16], pages),
            Slot::Damaged {
                sector: 2,
                generation: Some(9)
            }
        );
        bad[40] ^= 1;
        assert_eq!(
            Header::decode(&bad, &[1; 16], pages),
            Slot::Damaged {
                sector: 0,
                generation: None
            }
        );
    }

    #[test]
    fn a_restore_record_round_trips_and_refuses_damage() {
        let r = RestoreRecord {
            boot: [7; 16],
            seq: 42,
            tracks: (0..600).collect(),
        };
        assert_eq!(r.encoded_len(), 2 * BLOCK as usize);
        let mut b = vec![0u8; LOG_SLOT_BYTES as usize];
        r.encode(&[1; 16], &mut b);
        assert_eq!(RestoreRecord::decode(&b, &[1; 16]), Some(r.clone()));
        assert_eq!(RestoreRecord::decode(&b, &[2; 16]), None, "another volume");
        b[LOG_FIXED + 8 * 599] ^= 1;
        assert_eq!(RestoreRecord::decode(&b, &[1; 16]), None, "a damaged track");
        assert_eq!(RestoreRecord::decode(&[0; 4096], &[1; 16]), None, "zeros");
    }

    #[test]
    fn layout_grows_the_header_with_the_page_count() {
        let small = Layout::new(64, 4);
        assert_eq!(small.chunks, 1);
        assert_eq!(small.total_bytes(), 4096 * 3 + 8 * 4096 + 32 * 4096 + 4096);
        assert_eq!(small.total_bytes_without_log(), 4096 * 3 + 8 * 4096 + 4096);
        assert_eq!(small.backup_offset(), small.total_bytes() - 4096);
        assert_eq!(small.log_offset(1), small.log_offset(0) + LOG_SLOT_BYTES);
        // 1 TiB in 128 KiB tracks: 1024 pages, their crcs fit in 2 blocks.
        let tib = Layout::new(8 << 20, 4);
        assert_eq!(tib.header_bytes, 4096 * 2);
    }
}
