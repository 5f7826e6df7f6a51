//! A persistent track table: one bit per track, plus the bookkeeping that
//! tells which bits changed since the last metadata commit.
//!
//! # Chunks: memory only where the bits are mixed
//!
//! The table is cut into chunks of 32768 tracks, one 4 KiB metadata page
//! each. A chunk is `Zeros`, `Ones`, or a `Page` of words. Only a chunk
//! with both set and clear bits has a page, so a table costs at most one
//! bit per track plus a fixed ~100 bytes per chunk, and nothing per track
//! while it is all clear or all set: `fill` (a full restore or establish)
//! costs O(chunks), loading a clear table at open allocates nothing, and a
//! chunk a restore has finished copying gives its page back at the commit
//! that records it.
//!
//! # Not yet durable: per word, in the chunk
//!
//! Every change marks its *word* (64 tracks) unsynced in its chunk's small
//! per-word mask, and its chunk dirty. A metadata commit takes each dirty
//! chunk: it tags each unsynced word with the commit's number, clears the
//! marks and copies the words. A writer that finds its bit synced waits only
//! for the commit that carried its word (the tag), not for every commit
//! that takes the chunk: during a restore commits run back to back and take
//! the same chunks again and again, and waiting on each would put a flush
//! into the latency of writes whose bits were durable long ago. Tags keep
//! the low 8 bits of the commit number; [`taken_seq`] turns one back into
//! the latest commit it can stand for, which is never earlier than the
//! real one, so a short tag costs at most a needless wait, never a missed
//! one.
//!
//! # One atomic step for a bit and its mark
//!
//! Each chunk has a reader-writer lock. Changing a bit (dirty, mark, then
//! bit) and reading a bit's durability hold it shared; a commit's
//! take, and any change of a chunk's shape (page ↔ all ones / all clear),
//! hold it exclusive. So a reader that sees a bit set also sees its word
//! unsynced until a commit has taken it, and no commit can take a chunk
//! between a bit's change and its mark: with several queue threads, a
//! second writer that finds the first one's bit set cannot be acknowledged
//! before that bit is durable. Exclusive holds last a 4 KiB copy at most.
//!
//! # The parts
//!
//! This file owns `TrackTable` and its bit API (get, set, clear, count,
//! scans, whole-table changes). `chunk.rs` holds the chunk storage (zeros,
//! ones or a page) and the changes of a chunk's shape; `commit.rs` what a
//! metadata commit takes and loads, and a bit's durability.

mod chunk;
mod commit;
#[cfg(test)]
mod tests;

/// The table against a plain model, with chunks made lazy by `fill` and
/// written out by whatever touches them first.
#[cfg(test)]
mod model;

use super::bitmap::AtomicBitmap;
use super::geometry::Track;
use chunk::{Bits, Chunk, Page};
pub use commit::{taken_seq, Durability, Taken};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Words of bits per persistence chunk: one 4 KiB metadata page.
pub const CHUNK_WORDS: usize = 512;
/// Tracks per persistence chunk.
pub const CHUNK_TRACKS: u64 = CHUNK_WORDS as u64 * 64;
/// Words of the per-word unsynced mask of a chunk.
const MARK_WORDS: usize = CHUNK_WORDS / 64;

pub struct TrackTable {
    tracks: u64,
    chunks: Box<[RwLock<Chunk>]>,
    dirty_chunks: AtomicBitmap,
}

/// Position of track `t`: chunk, word in the chunk, bit mask.
fn locate(t: Track) -> (usize, usize, u64) {
    (
        (t / CHUNK_TRACKS) as usize,
        ((t % CHUNK_TRACKS) / 64) as usize,
        1u64 << (t % 64),
    )
}

impl TrackTable {
    pub fn new(tracks: u64) -> Self {
        let chunks = tracks.div_ceil(CHUNK_TRACKS) as usize;
        TrackTable {
            tracks,
            chunks: (0..chunks).map(|_| RwLock::new(Chunk::new())).collect(),
            dirty_chunks: AtomicBitmap::new(chunks as u64),
        }
    }

    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    // A panic under a chunk lock leaves the chunk whole (each change is a
    // single store or swap), so poison is ignored.
    fn read(&self, c: usize) -> RwLockReadGuard<'_, Chunk> {
        self.chunks[c].read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, c: usize) -> RwLockWriteGuard<'_, Chunk> {
        self.chunks[c].write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, t: Track) -> bool {
        let (c, w, m) = locate(t);
        match &self.read(c).bits {
            Bits::Zeros => false,
            Bits::Ones => true,
            Bits::Page(p) => p.words[w].load(SeqCst) & m != 0,
        }
    }

    /// Sets the bit; returns whether it changed.
    pub fn set(&self, t: Track) -> bool {
        self.change(t, true)
    }

    /// Clears the bit; returns whether it changed.
    pub fn clear(&self, t: Track) -> bool {
        self.change(t, false)
    }

    fn change(&self, t: Track, value: bool) -> bool {
        let (c, w, m) = locate(t);
        self.change_mask(c, w, m, value)
    }

    /// Sets the bits of every track in `t`'s word (64 tracks: a write
    /// intent region); returns whether any changed. One mark, one commit
    /// word, as for a single bit.
    pub fn set_word(&self, t: Track) -> bool {
        let (c, w, _) = locate(t);
        let first = t - t % 64;
        let n = (self.tracks - first).min(64);
        let mask = if n == 64 { !0 } else { (1u64 << n) - 1 };
        self.change_mask(c, w, mask, true)
    }

    fn change_mask(&self, c: usize, w: usize, m: u64, value: bool) -> bool {
        loop {
            {
                let chunk = self.read(c);
                match &chunk.bits {
                    Bits::Ones if value => return false,
                    Bits::Zeros if !value => return false,
                    Bits::Page(p) => {
                        let now = p.words[w].load(SeqCst) & m;
                        if (value && now == m) || (!value && now == 0) {
                            return false;
                        }
                        // Dirty, mark, then bit, under the shared lock:
                        // whoever sees the new bit sees the mark, and a
                        // commit that starts after it saw them finds the
                        // chunk dirty (it clears the flag before it takes
                        // the lock, so it cannot miss this change).
                        self.dirty_chunks.set(c as u64);
                        chunk.mark(w);
                        let old = if value {
                            p.words[w].fetch_or(m, SeqCst)
                        } else {
                            p.words[w].fetch_and(!m, SeqCst)
                        };
                        // Two writers racing for one bit both mark it; the
                        // loser's mark only costs the next commit a word.
                        return if value { old & m != m } else { old & m != 0 };
                    }
                    _ => {}
                }
            }
            // The first change in a lazy chunk gives it a page.
            self.materialize(c, &mut self.write(c));
        }
    }

    pub fn count(&self) -> u64 {
        (0..self.chunks())
            .map(|c| match &self.read(c).bits {
                Bits::Zeros => 0,
                Bits::Ones => {
                    let r = self.chunk_tracks(c);
                    r.end - r.start
                }
                Bits::Page(p) => p
                    .words
                    .iter()
                    .map(|w| w.load(SeqCst).count_ones() as u64)
                    .sum(),
            })
            .sum()
    }

    pub fn is_clear(&self) -> bool {
        self.next_one(0).is_none()
    }

    /// The first set bit at or after `from`, without wrapping.
    fn next_one(&self, from: Track) -> Option<Track> {
        let mut from = from;
        while from < self.tracks {
            let (c, first_word, _) = locate(from);
            let end = self.chunk_tracks(c).end;
            let base = c as u64 * CHUNK_TRACKS;
            match &self.read(c).bits {
                Bits::Zeros => {}
                Bits::Ones => return Some(from),
                Bits::Page(p) => {
                    let mut word = p.words[first_word].load(SeqCst) & (!0u64 << (from % 64));
                    let mut w = first_word;
                    loop {
                        if word != 0 {
                            let t = base + w as u64 * 64 + word.trailing_zeros() as u64;
                            return (t < self.tracks).then_some(t);
                        }
                        w += 1;
                        if w >= CHUNK_WORDS {
                            break;
                        }
                        word = p.words[w].load(SeqCst);
                    }
                }
            }
            from = end;
        }
        None
    }

    pub fn next_set(&self, from: Track) -> Option<Track> {
        self.next_one(from).or_else(|| self.next_one(0))
    }

    pub fn iter_set(&self) -> impl Iterator<Item = Track> + '_ {
        let mut next = 0;
        std::iter::from_fn(move || {
            let t = self.next_one(next)?;
            next = t + 1;
            Some(t)
        })
    }

    /// Replaces every chunk's words, chunk by chunk (never a loop over
    /// tracks). Only chunks whose words changed become dirty, so the commit
    /// that follows a restore or establish start carries just the tables
    /// that changed. Callers hold the volume's gate closed (or, in
    /// `degrade`, only race with copies clearing bits, which the chunk
    /// locks order).
    ///
    /// `chunk_words` fills in a chunk's new words and says whether any may
    /// be set. Returns the number of bits now set, counted in the same pass.
    fn assign_chunks(&self, chunk_words: impl Fn(usize, &mut [u64; CHUNK_WORDS]) -> bool) -> u64 {
        let mut new = [0u64; CHUNK_WORDS];
        let mut ones = 0;
        for c in 0..self.chunks() {
            if !chunk_words(c, &mut new) {
                // All clear: nothing to count, nothing to do if already so
                // (a clear table is neither read nor written word by word).
                let mut chunk = self.write(c);
                if !matches!(chunk.bits, Bits::Zeros) {
                    self.assign_chunk(c, &mut chunk, &new);
                }
                continue;
            }
            for (w, v) in new.iter_mut().enumerate() {
                *v &= self.valid_mask(c, w);
                ones += v.count_ones() as u64;
            }
            self.assign_chunk(c, &mut self.write(c), &new);
        }
        ones
    }

    /// Sets every bit (lazily: O(chunks), see the module header); returns
    /// how many that is. The gate must be closed and the snapshot lock held.
    pub fn fill(&self) -> u64 {
        for c in 0..self.chunks() {
            let mut chunk = self.write(c);
            chunk.bits = Bits::Ones;
            chunk.mark_all();
            self.dirty_chunks.set(c as u64);
        }
        self.tracks
    }

    pub fn clear_all(&self) {
        self.assign_chunks(|_, out| {
            out.fill(0);
            false
        });
    }

    /// `self = other`; returns the number of bits set.
    pub fn copy_from(&self, other: &TrackTable) -> u64 {
        self.assign_chunks(|c, out| {
            let theirs = other.read(c);
            other.words_into(c, &theirs, out);
            !matches!(theirs.bits, Bits::Zeros)
        })
    }

    /// `self |= other`, chunk by chunk.
    pub fn merge_from(&self, other: &TrackTable) {
        let mut add = [0u64; CHUNK_WORDS];
        let mut new = [0u64; CHUNK_WORDS];
        for c in 0..self.chunks() {
            {
                let theirs = other.read(c);
                if matches!(theirs.bits, Bits::Zeros) {
                    continue;
                }
                other.words_into(c, &theirs, &mut add);
            }
            let mut chunk = self.write(c);
            self.words_into(c, &chunk, &mut new);
            new.iter_mut().zip(&add).for_each(|(n, a)| *n |= a);
            self.assign_chunk(c, &mut chunk, &new);
        }
    }
}

impl std::fmt::Debug for TrackTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrackTable({} of {})", self.count(), self.tracks())
    }
}
