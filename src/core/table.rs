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

use super::bitmap::AtomicBitmap;
use super::geometry::Track;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Words of bits per persistence chunk: one 4 KiB metadata page.
pub const CHUNK_WORDS: usize = 512;
/// Tracks per persistence chunk.
pub const CHUNK_TRACKS: u64 = CHUNK_WORDS as u64 * 64;
/// Words of the per-word unsynced mask of a chunk.
const MARK_WORDS: usize = CHUNK_WORDS / 64;

/// What [`TrackTable::take_dirty_chunk_for`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The chunk was not dirty: nothing to write.
    Clean,
    /// The chunk's words are in `out`.
    Words,
    /// Every bit of the chunk is set; `out` is untouched.
    Ones,
}

/// Whether a track's bit is durable as it is now, per [`TrackTable::durability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Changed since a commit last took its chunk: the next commit carries it.
    Unsynced,
    /// Carried by the commit whose number ends in this tag (see [`taken_seq`]).
    Taken(u8),
    /// Carried by a commit that did not say which (format's first write).
    TakenUnknown,
}

/// The latest commit number not after `started` whose tag is `tag`: the
/// commit that carried a word tagged `tag` is this one or an earlier one.
pub fn taken_seq(tag: u8, started: u64) -> u64 {
    started.saturating_sub(started.wrapping_sub(tag as u64) & 0xff)
}

fn tag_of(seq: u64) -> u8 {
    seq as u8
}

/// A mixed chunk's words and their commit tags.
struct Page {
    words: [AtomicU64; CHUNK_WORDS],
    /// Per word, the tag of the commit that last carried a change of it.
    /// Written only under the chunk's exclusive lock.
    tags: [u8; CHUNK_WORDS],
}

impl Page {
    fn new(words: &[u64; CHUNK_WORDS], tag: u8) -> Box<Page> {
        Box::new(Page {
            words: std::array::from_fn(|i| AtomicU64::new(words[i])),
            tags: [tag; CHUNK_WORDS],
        })
    }
}

enum Bits {
    Zeros,
    Ones,
    Page(Box<Page>),
}

struct Chunk {
    bits: Bits,
    /// Per word: changed since a commit last took this chunk.
    unsynced: [AtomicU64; MARK_WORDS],
    /// The tag of every word while the chunk has no page.
    lazy_tag: u8,
    /// Taken by a commit that did not say which: conservative from then on.
    unknown: bool,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            bits: Bits::Zeros,
            unsynced: Default::default(),
            lazy_tag: 0,
            unknown: false,
        }
    }

    fn mark(&self, w: usize) {
        self.unsynced[w / 64].fetch_or(1 << (w % 64), SeqCst);
    }

    fn marked(&self, w: usize) -> bool {
        self.unsynced[w / 64].load(SeqCst) & (1 << (w % 64)) != 0
    }

    fn mark_all(&self) {
        self.unsynced.iter().for_each(|m| m.store(!0, SeqCst));
    }

    fn any_marked(&self) -> bool {
        self.unsynced.iter().any(|m| m.load(SeqCst) != 0)
    }

    fn tag(&self, w: usize) -> u8 {
        match &self.bits {
            Bits::Page(p) => p.tags[w],
            _ => self.lazy_tag,
        }
    }
}

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

    /// The tracks of chunk `c`.
    fn chunk_tracks(&self, c: usize) -> std::ops::Range<Track> {
        let first = c as u64 * CHUNK_TRACKS;
        first..(first + CHUNK_TRACKS).min(self.tracks)
    }

    /// The valid bits of word `w` of chunk `c` (0 past the table's end).
    fn valid_mask(&self, c: usize, w: usize) -> u64 {
        let first = c as u64 * CHUNK_TRACKS + w as u64 * 64;
        match self.tracks.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => !0,
            n => (1u64 << n) - 1,
        }
    }

    /// Chunk `c`'s words, lazy chunks included, into `out`.
    fn words_into(&self, c: usize, chunk: &Chunk, out: &mut [u64; CHUNK_WORDS]) {
        for (w, slot) in out.iter_mut().enumerate() {
            *slot = match &chunk.bits {
                Bits::Zeros => 0,
                Bits::Ones => self.valid_mask(c, w),
                Bits::Page(p) => p.words[w].load(SeqCst),
            };
        }
    }

    /// Gives chunk `c` a page (from its lazy value) if it has none.
    fn materialize(&self, c: usize, chunk: &mut Chunk) {
        if matches!(chunk.bits, Bits::Page(_)) {
            return;
        }
        let mut words = [0u64; CHUNK_WORDS];
        self.words_into(c, chunk, &mut words);
        chunk.bits = Bits::Page(Page::new(&words, chunk.lazy_tag));
    }

    /// Stores `new` as chunk `c`'s words, marking the words that change
    /// and dropping the page if the chunk turns all clear or all set.
    /// Returns whether anything changed. Exclusive lock held.
    fn assign_chunk(&self, c: usize, chunk: &mut Chunk, new: &[u64; CHUNK_WORDS]) -> bool {
        let mut old = [0u64; CHUNK_WORDS];
        self.words_into(c, chunk, &mut old);
        let mut changed = false;
        for w in 0..CHUNK_WORDS {
            if old[w] != new[w] {
                chunk.mark(w);
                changed = true;
            }
        }
        if !changed {
            return false;
        }
        match self.uniform(c, new) {
            Some(ones) => {
                if matches!(chunk.bits, Bits::Page(_)) {
                    // The unchanged words' tags go with the page: treat the
                    // whole chunk as unsynced until the next commit takes it.
                    chunk.mark_all();
                }
                chunk.bits = if ones { Bits::Ones } else { Bits::Zeros };
            }
            None => {
                self.materialize(c, chunk);
                if let Bits::Page(p) = &chunk.bits {
                    for (slot, v) in p.words.iter().zip(new) {
                        slot.store(*v, SeqCst);
                    }
                }
            }
        }
        self.dirty_chunks.set(c as u64);
        true
    }

    /// `Some(false)` if `words` are all clear, `Some(true)` if every valid
    /// bit is set, `None` if mixed.
    fn uniform(&self, c: usize, words: &[u64; CHUNK_WORDS]) -> Option<bool> {
        if words.iter().all(|w| *w == 0) {
            return Some(false);
        }
        (0..CHUNK_WORDS)
            .all(|w| words[w] == self.valid_mask(c, w))
            .then_some(true)
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
        loop {
            {
                let chunk = self.read(c);
                match &chunk.bits {
                    Bits::Ones if value => return false,
                    Bits::Zeros if !value => return false,
                    Bits::Page(p) => {
                        if (p.words[w].load(SeqCst) & m != 0) == value {
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
                        return (old & m != 0) != value;
                    }
                    _ => {}
                }
            }
            // The first change in a lazy chunk gives it a page.
            self.materialize(c, &mut self.write(c));
        }
    }

    /// Whether this track's bit may differ from the last committed one.
    pub fn is_unsynced(&self, t: Track) -> bool {
        self.durability(t) == Durability::Unsynced
    }

    /// Whether track `t`'s bit as it is now is durable, or which commit
    /// carries it (one consistent look: see the module header).
    pub fn durability(&self, t: Track) -> Durability {
        let (c, w, _) = locate(t);
        let chunk = self.read(c);
        if chunk.marked(w) {
            Durability::Unsynced
        } else if chunk.unknown {
            Durability::TakenUnknown
        } else {
            Durability::Taken(chunk.tag(w))
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

    /// For a metadata commit: if chunk `c` is dirty, snapshot its words into
    /// `out` (zero-padded) and return true. Such a commit does not say which
    /// it is, so writers waiting on this chunk wait for any commit in flight.
    pub fn take_dirty_chunk(&self, c: usize, out: &mut [u64]) -> bool {
        if !self.dirty_chunks.clear(c as u64) {
            return false;
        }
        self.take(c, out, None, false);
        true
    }

    /// [`Self::take_dirty_chunk`] by commit `seq` (from `CommitClock::begin`),
    /// which says when the chunk is all ones instead of writing them into
    /// `out` (a full restore's commit then costs O(chunks), not O(tracks)).
    pub fn take_dirty_chunk_for(&self, c: usize, out: &mut [u64], seq: u64) -> Taken {
        // Clearing the dirty flag before taking the lock: a change that sets
        // it again after this either is in the snapshot (it finished before
        // the exclusive lock) or keeps its mark for the next commit.
        if !self.dirty_chunks.clear(c as u64) {
            return Taken::Clean;
        }
        self.take(c, out, Some(seq), true)
    }

    /// Copies chunk `c` into `out` (unless `ones_flag` and it is all ones:
    /// then returns [`Taken::Ones`]) and marks its words synced, as carried
    /// by commit `seq` (`None`: a commit that does not say which). A chunk
    /// found all clear or all set gives its page back.
    fn take(&self, c: usize, out: &mut [u64], seq: Option<u64>, ones_flag: bool) -> Taken {
        let mut guard = self.write(c);
        let chunk = &mut *guard;
        let tag = tag_of(seq.unwrap_or(0));
        // Conservative from now on: unmarked words may have been carried
        // by a commit in flight that did not say which.
        chunk.unknown |= seq.is_none();
        if chunk.any_marked() {
            if let Bits::Page(p) = &mut chunk.bits {
                for w in 0..CHUNK_WORDS {
                    if chunk.unsynced[w / 64].load(SeqCst) & (1 << (w % 64)) != 0 {
                        p.tags[w] = tag;
                    }
                }
            } else {
                chunk.lazy_tag = tag;
            }
            chunk.unsynced.iter().for_each(|m| m.store(0, SeqCst));
        }
        // An all-ones chunk (a full restore's) costs O(1), not a page read.
        if ones_flag && matches!(chunk.bits, Bits::Ones) {
            return Taken::Ones;
        }
        let mut words = [0u64; CHUNK_WORDS];
        self.words_into(c, chunk, &mut words);
        // Commit 0 (format's snapshot) is not later than the tags it would
        // stand for, so it keeps the page.
        if seq != Some(0) && matches!(chunk.bits, Bits::Page(_)) {
            if let Some(ones) = self.uniform(c, &words) {
                // No longer mixed: the page goes. Its words' tags are all
                // this commit's or older ones, so this commit's tag stands
                // for each of them (waits it implies are never too short).
                chunk.bits = if ones { Bits::Ones } else { Bits::Zeros };
                chunk.lazy_tag = tag;
            }
        }
        if ones_flag && matches!(chunk.bits, Bits::Ones) {
            return Taken::Ones;
        }
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = words.get(i).copied().unwrap_or(0);
        }
        Taken::Words
    }

    /// Copies chunk `c` into `out`; with `sync`, also marks it synced (as
    /// commit 0, durable from the start).
    pub fn snapshot_chunk(&self, c: usize, out: &mut [u64], sync: bool) {
        if sync {
            self.take(c, out, Some(0), false);
            return;
        }
        let mut words = [0u64; CHUNK_WORDS];
        self.words_into(c, &self.read(c), &mut words);
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = words.get(i).copied().unwrap_or(0);
        }
    }

    /// Loads chunk `c` from committed metadata: the bits become synced.
    /// An all-clear or all-set page allocates nothing.
    pub fn load_chunk(&self, c: usize, words: &[u64]) {
        let mut new = [0u64; CHUNK_WORDS];
        for (w, v) in new.iter_mut().enumerate() {
            *v = words.get(w).copied().unwrap_or(0) & self.valid_mask(c, w);
        }
        let mut chunk = self.write(c);
        *chunk = Chunk::new();
        chunk.bits = match self.uniform(c, &new) {
            Some(false) => Bits::Zeros,
            Some(true) => Bits::Ones,
            None => Bits::Page(Page::new(&new, 0)),
        };
        self.dirty_chunks.clear(c as u64);
    }

    /// Loads chunk `c` as committed "all ones" (a flagged metadata page).
    pub fn load_chunk_ones(&self, c: usize) {
        let mut chunk = self.write(c);
        *chunk = Chunk::new();
        chunk.bits = Bits::Ones;
        self.dirty_chunks.clear(c as u64);
    }

    /// Marks chunk `c` dirty again: a commit that took it failed, so the
    /// next one must write it (its bits are re-read then, so nothing is lost).
    pub fn mark_chunk_dirty(&self, c: usize) {
        self.dirty_chunks.set(c as u64);
    }

    pub fn has_dirty_chunks(&self) -> bool {
        self.dirty_chunks.next_one(0).is_some()
    }

    /// Chunks that hold a page of words now (the rest cost no memory per
    /// track).
    pub fn pages(&self) -> usize {
        (0..self.chunks())
            .filter(|&c| matches!(self.read(c).bits, Bits::Page(_)))
            .count()
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

/// The table against a plain model, with chunks made lazy by `fill` and
/// written out by whatever touches them first.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;

    const TRACKS: u64 = 3 * CHUNK_TRACKS + 100;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64),
        Clear(u64),
        Fill,
        ClearAll,
        Commit(usize),
        Read(u64),
        /// On a second table: set a bit, or fill it.
        OtherSet(u64),
        OtherFill,
        MergeFromOther,
        CopyFromOther,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Tracks near chunk and word edges, where off-by-ones live.
        let track = prop_oneof![
            0..TRACKS,
            (0..4u64, 0..3u64).prop_map(|(c, d)| (c * CHUNK_TRACKS + d).min(TRACKS - 1)),
            (1..4u64).prop_map(|c| (c * CHUNK_TRACKS - 1).min(TRACKS - 1)),
        ];
        prop_oneof![
            4 => track.clone().prop_map(Op::Set),
            4 => track.clone().prop_map(Op::Clear),
            1 => Just(Op::Fill),
            1 => Just(Op::ClearAll),
            3 => (0..4usize).prop_map(Op::Commit),
            3 => track.clone().prop_map(Op::Read),
            2 => track.prop_map(Op::OtherSet),
            1 => Just(Op::OtherFill),
            1 => Just(Op::MergeFromOther),
            1 => Just(Op::CopyFromOther),
        ]
    }

    struct Model {
        bits: Vec<bool>,
        /// What the last commit of each track's chunk wrote.
        committed: Vec<bool>,
        /// The commit that wrote a track's current committed value.
        committed_by: Vec<u64>,
        seq: u64,
    }

    fn check(table: &TrackTable, m: &Model, t: u64) {
        let i = t as usize;
        assert_eq!(table.get(t), m.bits[i], "bit {t}");
        match table.durability(t) {
            Durability::Unsynced => {}
            Durability::TakenUnknown => panic!("bit {t}: every commit here says which it is"),
            Durability::Taken(tag) => {
                assert_eq!(
                    m.committed[i], m.bits[i],
                    "bit {t} synced but not committed"
                );
                let seq = taken_seq(tag, m.seq);
                assert!(
                    seq >= m.committed_by[i],
                    "bit {t}: taken by {seq} < {}",
                    m.committed_by[i]
                );
            }
        }
        let next = (t..TRACKS).chain(0..t).find(|&u| m.bits[u as usize]);
        assert_eq!(table.next_set(t), next, "next_set({t})");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn lazy_chunks_behave_like_written_words(ops in proptest::collection::vec(op(), 1..60)) {
            let table = TrackTable::new(TRACKS);
            let other = TrackTable::new(TRACKS);
            let n = TRACKS as usize;
            let mut other_bits = vec![false; n];
            let mut m = Model { bits: vec![false; n], committed: vec![false; n], committed_by: vec![0; n], seq: 0 };
            let mut out = vec![0u64; CHUNK_WORDS];
            for op in ops {
                match op {
                    Op::Set(t) => assert_eq!(table.set(t), !std::mem::replace(&mut m.bits[t as usize], true)),
                    Op::Clear(t) => assert_eq!(table.clear(t), std::mem::replace(&mut m.bits[t as usize], false)),
                    Op::Fill => {
                        assert_eq!(table.fill(), TRACKS);
                        m.bits.iter_mut().for_each(|b| *b = true);
                    }
                    Op::ClearAll => {
                        table.clear_all();
                        m.bits.iter_mut().for_each(|b| *b = false);
                    }
                    Op::Commit(c) => {
                        m.seq += 1;
                        let range = c as u64 * CHUNK_TRACKS..((c as u64 + 1) * CHUNK_TRACKS).min(TRACKS);
                        let differs = range.clone().any(|t| m.bits[t as usize] != m.committed[t as usize]);
                        let took = table.take_dirty_chunk_for(c, &mut out, m.seq);
                        assert!(took != Taken::Clean || !differs, "chunk {c} changed but not dirty");
                        if took == Taken::Ones {
                            out.iter_mut().for_each(|w| *w = !0);
                        }
                        if took != Taken::Clean {
                            for t in range {
                                let i = t as usize;
                                let w = ((t - c as u64 * CHUNK_TRACKS) / 64) as usize;
                                let bit = out[w] >> (t % 64) & 1 == 1;
                                assert_eq!(bit, m.bits[i], "page bit {t}");
                                if m.committed[i] != bit {
                                    m.committed[i] = bit;
                                    m.committed_by[i] = m.seq;
                                }
                            }
                        }
                    }
                    Op::Read(t) => check(&table, &m, t),
                    Op::OtherSet(t) => {
                        other.set(t);
                        other_bits[t as usize] = true;
                    }
                    Op::OtherFill => {
                        other.fill();
                        other_bits.iter_mut().for_each(|b| *b = true);
                    }
                    Op::MergeFromOther => {
                        table.merge_from(&other);
                        m.bits.iter_mut().zip(&other_bits).for_each(|(b, o)| *b |= o);
                    }
                    Op::CopyFromOther => {
                        let ones = table.copy_from(&other);
                        m.bits.clone_from(&other_bits);
                        assert_eq!(ones, m.bits.iter().filter(|b| **b).count() as u64);
                    }
                }
            }
            assert_eq!(table.count(), m.bits.iter().filter(|b| **b).count() as u64);
            assert_eq!(table.is_clear(), !m.bits.iter().any(|b| *b));
            for t in [0, 63, 64, CHUNK_TRACKS - 1, CHUNK_TRACKS, 2 * CHUNK_TRACKS + 5, TRACKS - 1] {
                check(&table, &m, t);
            }
        }
    }

    #[test]
    fn fill_is_lazy_and_a_commit_of_it_leaves_the_words_alone() {
        let table = TrackTable::new(TRACKS);
        table.set(7);
        assert_eq!(table.pages(), 1);
        assert_eq!(table.fill(), TRACKS);
        assert_eq!(table.pages(), 0, "fill gives the pages back");
        let mut out = vec![0u64; CHUNK_WORDS];
        assert_eq!(table.take_dirty_chunk_for(1, &mut out, 5), Taken::Ones);
        assert_eq!(table.durability(CHUNK_TRACKS + 3), Durability::Taken(5));
        assert!(table.is_unsynced(3), "chunk 0 not committed yet");
        // The first change gives the chunk a page, keeping what it stood for.
        assert!(table.clear(CHUNK_TRACKS + 3));
        assert_eq!(table.pages(), 1);
        assert!(table.get(CHUNK_TRACKS + 4) && !table.is_unsynced(CHUNK_TRACKS + 200));
        assert_eq!(table.durability(CHUNK_TRACKS + 200), Durability::Taken(5));
        assert!(table.is_unsynced(CHUNK_TRACKS + 3));
        assert_eq!(table.count(), TRACKS - 1);
    }

    #[test]
    fn a_chunk_keeps_a_page_only_while_its_bits_are_mixed() {
        let table = TrackTable::new(TRACKS);
        let mut out = vec![0u64; CHUNK_WORDS];
        for t in (0..CHUNK_TRACKS).step_by(997) {
            table.set(CHUNK_TRACKS + t);
        }
        assert_eq!(table.pages(), 1);
        assert_eq!(table.take_dirty_chunk_for(1, &mut out, 1), Taken::Words);
        assert_eq!(table.pages(), 1, "mixed: the page stays");
        for t in (0..CHUNK_TRACKS).step_by(997) {
            table.clear(CHUNK_TRACKS + t);
        }
        assert_eq!(table.take_dirty_chunk_for(1, &mut out, 2), Taken::Words);
        assert!(out.iter().all(|w| *w == 0));
        assert_eq!(
            table.pages(),
            0,
            "all clear again: the commit gives it back"
        );
        assert_eq!(
            table.durability(CHUNK_TRACKS + 997),
            Durability::Taken(2),
            "the commit that carried the clears"
        );
        // Loading clear and full pages allocates nothing either.
        let other = TrackTable::new(TRACKS);
        other.load_chunk(0, &[0; CHUNK_WORDS]);
        other.load_chunk(1, &[!0; CHUNK_WORDS]);
        other.load_chunk(3, &[!0; CHUNK_WORDS]);
        assert_eq!(other.pages(), 0);
        assert_eq!(other.count(), CHUNK_TRACKS + 100);
        other.load_chunk(2, &[1; CHUNK_WORDS]);
        assert_eq!(other.pages(), 1);
        // Copying and merging keep to the same rule.
        table.copy_from(&other);
        assert_eq!(table.pages(), 1);
        assert_eq!(table.count(), other.count());
        table.clear_all();
        assert_eq!(table.pages(), 0);
    }
}
