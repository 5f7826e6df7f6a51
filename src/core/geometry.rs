//! Geometry: how a volume of `size` bytes divides into tracks.

use crate::error::{Error, Result};

/// Index of a track: the unit of tracking, locking and copying.
pub type Track = u64;

pub const MIN_TRACK_SIZE: u64 = 4096;
pub const MAX_TRACK_SIZE: u64 = 16 << 20;
/// Host I/O and every device offset are aligned to this many bytes.
pub const SECTOR: u64 = 512;

/// The volume's size and track size; the last track may be short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    track_shift: u32,
}

/// The part of one track that a host request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackSpan {
    pub track: Track,
    /// Absolute byte offset on the volume.
    pub offset: u64,
    pub len: u64,
    /// Offset of this span inside the request's buffer.
    pub buf_offset: u64,
    /// The span covers the whole track (claim 5 applies to full spans).
    pub full: bool,
}

impl Geometry {
    pub fn new(size: u64, track_size: u64) -> Result<Self> {
        if !track_size.is_power_of_two() || !(MIN_TRACK_SIZE..=MAX_TRACK_SIZE).contains(&track_size)
        {
            return Err(Error::config(format!(
                "track_size {track_size} must be a power of two between 4KiB and 16MiB"
            )));
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(Error::config(format!(
                "volume size {size} must be a non-zero multiple of 512 bytes"
            )));
        }
        Ok(Geometry {
            size,
            track_shift: track_size.trailing_zeros(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn track_size(&self) -> u64 {
        1 << self.track_shift
    }

    pub fn tracks(&self) -> u64 {
        self.size.div_ceil(self.track_size())
    }

    pub fn track_of(&self, offset: u64) -> Track {
        offset >> self.track_shift
    }

    /// Byte offset and length of a track (the last one may be short).
    pub fn track_extent(&self, track: Track) -> (u64, u64) {
        let start = track << self.track_shift;
        (start, self.track_size().min(self.size - start))
    }

    /// Whether `offset..offset+len` lies inside the volume.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The tracks a request touches, in order, each marked full or partial.
    pub fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = TrackSpan> + '_ {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let track = self.track_of(pos);
            let (tstart, tlen) = self.track_extent(track);
            let span_end = end.min(tstart + tlen);
            let span = TrackSpan {
                track,
                offset: pos,
                len: span_end - pos,
                buf_offset: pos - offset,
                full: pos == tstart && span_end == tstart + tlen,
            };
            pos = span_end;
            Some(span)
        })
    }

    /// First and last track a request touches (inclusive).
    pub fn track_range(&self, offset: u64, len: u64) -> (Track, Track) {
        (self.track_of(offset), self.track_of(offset + len - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_track_may_be_short() {
        let g = Geometry::new(10 * 4096 + 1024, 8192).unwrap();
        assert_eq!(g.tracks(), 6);
        assert_eq!(g.track_extent(5), (40960, 1024));
    }

    #[test]
    fn spans_mark_full_and_partial() {
        let g = Geometry::new(1 << 20, 65536).unwrap();
        let s: Vec<_> = g.spans(65536 - 512, 65536 + 1024).collect();
        assert_eq!(s.len(), 3);
        assert!(!s[0].full && s[1].full && !s[2].full);
        assert_eq!(s[1].buf_offset, 512);
        assert_eq!(s.iter().map(|x| x.len).sum::<u64>(), 65536 + 1024);
    }

    #[test]
    fn rejects_bad_track_sizes() {
        assert!(Geometry::new(1 << 20, 3 * 4096).is_err());
        assert!(Geometry::new(1 << 20, 2048).is_err());
        assert!(Geometry::new(1 << 30, 32 << 20).is_err());
    }
}
