//! The on-disk layout: superblock, two header slots, two page slots per
//! (table, chunk). Every field is little-endian; see docs/design.md,
//! "Metadata format", for the byte map. Encoding and decoding only: no I/O.

use super::Binding;
use crate::core::table::CHUNK_WORDS;
use crate::core::{Operation, OperationKind, VolumeState};

pub const BLOCK: u64 = 4096;
pub const SUPER_MAGIC: [u8; 8] = *b"SPLITMIR";
pub const HEADER_MAGIC: [u8; 8] = *b"SMHEADER";
/// 2: headers gained the per-page "all ones" flags.
pub const VERSION: u32 = 2;
/// Bytes of a header before its page selectors (then the "all ones" flags,
/// then the crc).
const HEADER_FIXED: usize = 48;

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
        let flag_bytes = (tables as u64 * chunks as u64).div_ceil(8);
        let header_bytes = (HEADER_FIXED as u64 + 2 * flag_bytes + 4).next_multiple_of(BLOCK);
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

    pub fn total_bytes(&self) -> u64 {
        self.pages_offset() + 2 * self.pages() as u64 * BLOCK
    }
}

/// The identity block at offset 0, written once by `format`.
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
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
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
        Ok(Superblock {
            uuid: b[16..32].try_into().unwrap(),
            binding: Binding {
                volume_size: get_u64(b, 32),
                track_size: get_u64(b, 40),
                primary_size: get_u64(b, 48),
                secondary_size: get_u64(b, 56),
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
}

fn kind_code(k: OperationKind) -> u8 {
    match k {
        OperationKind::Establish => 0,
        OperationKind::Restore => 1,
        OperationKind::Resync => 2,
    }
}

fn kind_from(c: u8) -> Option<OperationKind> {
    [
        OperationKind::Establish,
        OperationKind::Restore,
        OperationKind::Resync,
    ]
    .get(c as usize)
    .copied()
}

impl Header {
    /// The header slot this generation is written to: generations
    /// alternate, so a commit never overwrites the header it replaces.
    pub fn slot(generation: u64) -> u64 {
        generation % 2
    }

    /// Encodes into a zeroed buffer of `layout.header_bytes`.
    pub fn encode(&self, uuid: &[u8; 16], b: &mut [u8]) {
        b.fill(0);
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..24].copy_from_slice(uuid);
        put_u64(b, 24, self.generation);
        b[32] = self.state.code();
        if let Some(op) = self.operation {
            b[33] = 1;
            b[34] = kind_code(op.kind);
            b[35] = op.incremental as u8;
            b[36] = op.protect as u8;
            put_u64(b, 40, op.total);
        }
        let flags = self.selectors.len().div_ceil(8);
        for (i, (&s, &o)) in self.selectors.iter().zip(&self.ones).enumerate() {
            b[HEADER_FIXED + i / 8] |= (s as u8) << (i % 8);
            b[HEADER_FIXED + flags + i / 8] |= (o as u8) << (i % 8);
        }
        seal(b);
    }

    /// Decodes a header slot; headers of another format (other uuid) are
    /// as invalid as torn ones.
    pub fn decode(b: &[u8], uuid: &[u8; 16], pages: usize) -> Result<Self, Bad> {
        if b[0..8] != HEADER_MAGIC || b[8..24] != *uuid {
            return Err(Bad::Magic);
        }
        if !sealed(b) {
            return Err(Bad::Crc);
        }
        let state = VolumeState::from_code(b[32]).ok_or(Bad::Field)?;
        let operation = match b[33] {
            0 => None,
            1 => Some(Operation {
                kind: kind_from(b[34]).ok_or(Bad::Field)?,
                incremental: b[35] != 0,
                protect: b[36] != 0,
                total: get_u64(b, 40),
            }),
            _ => return Err(Bad::Field),
        };
        let bit = |at: usize, i: usize| b[at + i / 8] & (1 << (i % 8)) != 0;
        let flags = pages.div_ceil(8);
        Ok(Header {
            generation: get_u64(b, 24),
            state,
            operation,
            selectors: (0..pages).map(|i| bit(HEADER_FIXED, i)).collect(),
            ones: (0..pages).map(|i| bit(HEADER_FIXED + flags, i)).collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            volume_size: 1 << 30,
            track_size: 1 << 17,
            primary_size: 1 << 30,
            secondary_size: 2 << 30,
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
    fn header_round_trips_and_rejects_foreign_uuid() {
        let layout = Layout::new(100_000, 4);
        let h = Header {
            generation: 9,
            state: VolumeState::Restoring,
            operation: Some(Operation {
                kind: OperationKind::Restore,
                incremental: true,
                protect: true,
                total: 42,
            }),
            selectors: (0..layout.pages()).map(|i| i % 3 == 0).collect(),
            ones: (0..layout.pages()).map(|i| i % 5 == 1).collect(),
        };
        let mut b = vec![0u8; layout.header_bytes as usize];
        h.encode(&[1; 16], &mut b);
        assert_eq!(Header::decode(&b, &[1; 16], layout.pages()), Ok(h));
        assert_eq!(
            Header::decode(&b, &[2; 16], layout.pages()),
            Err(Bad::Magic)
        );
    }

    #[test]
    fn layout_grows_the_header_with_the_page_count() {
        let small = Layout::new(64, 4);
        assert_eq!(small.chunks, 1);
        assert_eq!(small.total_bytes(), 4096 * 3 + 8 * 4096);
        let huge = Layout::new(1 << 32, 4);
        assert_eq!(huge.header_bytes, 4096 * 33);
    }
}
