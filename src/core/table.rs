//! A persistent track table: one bit per track, plus the bookkeeping that
//! tells which bits changed since the last metadata commit.
//!
//! Every change marks its bit *unsynced* and its chunk *dirty*. A metadata
//! commit takes the dirty chunks (clearing their unsynced bits) and then
//! snapshots the bits. That order matters: a change that lands after the
//! snapshot leaves its unsynced bit set, so the next commit carries it; a
//! writer that sees its bit set but unsynced knows it must wait for a commit
//! that starts later (see [`super::commit::CommitClock`]).

use super::bitmap::AtomicBitmap;
use super::geometry::Track;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Words of bits per persistence chunk: one 4 KiB metadata page.
pub const CHUNK_WORDS: usize = 512;
/// Tracks per persistence chunk.
pub const CHUNK_TRACKS: u64 = CHUNK_WORDS as u64 * 64;

/// [`TrackTable::taken_by`] for a chunk taken by a commit that did not say
/// which (callers of [`TrackTable::take_dirty_chunk`]).
pub const TAKEN_UNKNOWN: u64 = u64::MAX;

pub struct TrackTable {
    bits: AtomicBitmap,
    unsynced: AtomicBitmap,
    dirty_chunks: AtomicBitmap,
    /// Per word of bits, the commit that last carried a change of it (0:
    /// none since load). Lets a writer whose bit is synced wait only for the
    /// commit that carries that bit, not for every commit that takes its
    /// chunk: during a restore (or while new tracks are first written)
    /// commits run back to back and take the same chunks again and again,
    /// and waiting on each would put a metadata commit (a flush) into the
    /// latency of writes whose bits were durable long ago. Per word, not per
    /// bit: 64 tracks share an entry, which costs at most a needless wait.
    taken: Box<[AtomicU64]>,
}

impl TrackTable {
    pub fn new(tracks: u64) -> Self {
        TrackTable {
            bits: AtomicBitmap::new(tracks),
            unsynced: AtomicBitmap::new(tracks),
            dirty_chunks: AtomicBitmap::new(tracks.div_ceil(CHUNK_TRACKS)),
            taken: (0..tracks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    pub fn tracks(&self) -> u64 {
        self.bits.len()
    }

    pub fn chunks(&self) -> usize {
        self.dirty_chunks.len() as usize
    }

    pub fn get(&self, t: Track) -> bool {
        self.bits.get(t)
    }

    fn mark_unsynced(&self, t: Track) {
        self.unsynced.set(t);
        self.dirty_chunks.set(t / CHUNK_TRACKS);
    }

    /// Sets the bit; returns whether it changed.
    pub fn set(&self, t: Track) -> bool {
        let changed = self.bits.set(t);
        if changed {
            self.mark_unsynced(t);
        }
        changed
    }

    /// Clears the bit; returns whether it changed.
    pub fn clear(&self, t: Track) -> bool {
        let changed = self.bits.clear(t);
        if changed {
            self.mark_unsynced(t);
        }
        changed
    }

    /// Whether this track's bit may differ from the last committed one.
    pub fn is_unsynced(&self, t: Track) -> bool {
        self.unsynced.get(t)
    }

    pub fn count(&self) -> u64 {
        self.bits.count_ones()
    }

    pub fn is_clear(&self) -> bool {
        self.bits.next_one(0).is_none()
    }

    pub fn next_set(&self, from: Track) -> Option<Track> {
        self.bits.next_one_wrapping(from)
    }

    pub fn iter_set(&self) -> impl Iterator<Item = Track> + '_ {
        self.bits.iter_ones()
    }

    /// Replaces every word, word by word (never a loop over tracks). Only
    /// chunks whose words changed become dirty, so the commit that follows
    /// a restore or establish start carries just the tables that changed.
    ///
    /// Callers hold the volume's gate closed (or, in `degrade`, only race
    /// with copies clearing bits), so a load and a plain store cannot lose
    /// a concurrent change; the fence publishes the pass as a whole.
    ///
    /// Returns the number of bits now set, counted in the same pass (a
    /// restore start needs it, and a second pass over 1 MiB costs).
    fn assign_words(&self, word: impl Fn(usize) -> u64) -> u64 {
        let mut last_chunk = usize::MAX;
        let mut ones = 0;
        for w in 0..self.bits.words() {
            let new = word(w) & self.bits.valid_mask(w);
            ones += new.count_ones() as u64;
            if self.bits.word_relaxed(w) != new {
                self.bits.store_word_relaxed(w, new);
                // Release: a commit that swaps this word sees the new bits.
                self.unsynced.store_word_release(w, !0);
                if w / CHUNK_WORDS != last_chunk {
                    last_chunk = w / CHUNK_WORDS;
                    self.dirty_chunks.set(last_chunk as u64);
                }
            }
        }
        std::sync::atomic::fence(SeqCst);
        ones
    }

    /// Sets every bit; returns how many that is.
    pub fn fill(&self) -> u64 {
        self.assign_words(|_| !0)
    }

    pub fn clear_all(&self) {
        self.assign_words(|_| 0);
    }

    /// `self = other`; returns the number of bits set.
    pub fn copy_from(&self, other: &TrackTable) -> u64 {
        self.assign_words(|w| other.bits.word_relaxed(w))
    }

    /// `self |= other`, word by word.
    pub fn merge_from(&self, other: &TrackTable) {
        for w in 0..self.bits.words() {
            let add = other.bits.word(w);
            let old = self.bits.or_word(w, add);
            if old | add != old {
                self.unsynced.or_word(w, add & !old);
                self.dirty_chunks.set((w / CHUNK_WORDS) as u64);
            }
        }
    }

    /// For a metadata commit: if chunk `c` is dirty, snapshot its words into
    /// `out` (zero-padded) and return true. Clearing the dirty flag, then the
    /// unsynced bits, then reading the bits is what makes concurrent changes
    /// either included here or carried by the next commit.
    pub fn take_dirty_chunk(&self, c: usize, out: &mut [u64]) -> bool {
        self.take_dirty_chunk_for(c, out, TAKEN_UNKNOWN)
    }

    /// [`Self::take_dirty_chunk`] by commit `seq` (from `CommitClock::begin`).
    pub fn take_dirty_chunk_for(&self, c: usize, out: &mut [u64], seq: u64) -> bool {
        if !self.dirty_chunks.clear(c as u64) {
            return false;
        }
        self.snapshot_words(c, out, Some(seq));
        true
    }

    /// The commit that last carried a change of the word holding track `t`
    /// (0: none since load, [`TAKEN_UNKNOWN`]: one that did not say).
    pub fn taken_by(&self, t: Track) -> u64 {
        self.taken[(t / 64) as usize].load(SeqCst)
    }

    /// Copies chunk `c` into `out`; with `sync`, also marks it synced.
    pub fn snapshot_chunk(&self, c: usize, out: &mut [u64], sync: bool) {
        // Commit 0 is durable from the start: nothing to wait for later.
        self.snapshot_words(c, out, sync.then_some(0));
    }

    /// Copies chunk `c` into `out`; with `Some(seq)` it also marks each
    /// unsynced word synced, as carried by commit `seq`.
    fn snapshot_words(&self, c: usize, out: &mut [u64], sync: Option<u64>) {
        let first = c * CHUNK_WORDS;
        for (i, slot) in out.iter_mut().enumerate().take(CHUNK_WORDS) {
            let w = first + i;
            if w >= self.bits.words() {
                *slot = 0;
                continue;
            }
            if let Some(seq) = sync {
                // `taken` before the unsynced bits are cleared: a writer
                // that sees its bit synced must also see which commit took
                // it. A word that turns unsynced after this load keeps its
                // unsynced bit, so the next commit carries it.
                if self.unsynced.word(w) != 0 {
                    self.taken[w].fetch_max(seq, SeqCst);
                    self.unsynced.swap_word(w, 0);
                }
            }
            *slot = self.bits.word(w);
        }
    }

    /// Loads chunk `c` from committed metadata: the bits become synced.
    pub fn load_chunk(&self, c: usize, words: &[u64]) {
        let first = c * CHUNK_WORDS;
        for (i, v) in words.iter().enumerate().take(CHUNK_WORDS) {
            let w = first + i;
            if w < self.bits.words() {
                self.bits.store_word(w, *v);
                self.unsynced.store_word(w, 0);
            }
        }
        self.dirty_chunks.clear(c as u64);
        let words = first..(first + CHUNK_WORDS).min(self.bits.words());
        for w in words {
            self.taken[w].store(0, SeqCst);
        }
    }

    /// Marks chunk `c` dirty again: a commit that took it failed, so the
    /// next one must write it (its bits are re-read then, so nothing is lost).
    pub fn mark_chunk_dirty(&self, c: usize) {
        self.dirty_chunks.set(c as u64);
    }

    pub fn has_dirty_chunks(&self) -> bool {
        self.dirty_chunks.next_one(0).is_some()
    }

    /// A plain copy of the bits, for status, tests and verification.
    pub fn snapshot(&self) -> bitvec::vec::BitVec<u64> {
        let mut v = bitvec::vec::BitVec::<u64>::with_capacity(self.tracks() as usize);
        v.resize(self.tracks() as usize, false);
        for t in self.iter_set() {
            v.set(t as usize, true);
        }
        v
    }
}

impl std::fmt::Debug for TrackTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrackTable({} of {})", self.count(), self.tracks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_unsynced_until_a_commit_takes_them() {
        let t = TrackTable::new(100_000);
        assert!(t.set(40_000));
        assert!(t.is_unsynced(40_000));
        let mut buf = vec![0u64; CHUNK_WORDS];
        assert!(!t.take_dirty_chunk(0, &mut buf));
        assert!(t.take_dirty_chunk(1, &mut buf));
        assert!(!t.is_unsynced(40_000));
        assert_eq!(
            buf[(40_000 - CHUNK_TRACKS as usize) / 64],
            1 << (40_000 % 64)
        );
        assert!(!t.set(40_000), "setting a set bit changes nothing");
        assert!(!t.has_dirty_chunks());
    }

    #[test]
    fn fill_and_merge_are_wordwise_and_dirty() {
        let a = TrackTable::new(130);
        let b = TrackTable::new(130);
        b.set(129);
        a.merge_from(&b);
        assert!(a.get(129) && a.is_unsynced(129));
        a.fill();
        assert_eq!(a.count(), 130);
        a.clear_all();
        assert!(a.is_clear() && a.has_dirty_chunks());
        let mut buf = vec![0u64; CHUNK_WORDS];
        assert!(a.take_dirty_chunk(0, &mut buf));
        a.clear_all();
        assert!(
            !a.has_dirty_chunks(),
            "clearing a clear table dirties nothing"
        );
    }
}
