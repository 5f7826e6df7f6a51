//! A persistent track table: one bit per track, plus the bookkeeping that
//! tells which bits changed since the last metadata commit.
//!
//! Every change marks its bit *unsynced* and its chunk *dirty*. A metadata
//! commit takes the dirty chunks (clearing their unsynced bits) and then
//! snapshots the bits. That order matters: a change that lands after the
//! snapshot leaves its unsynced bit set, so the next commit carries it; a
//! writer that sees its bit set but unsynced knows it must wait for a commit
//! that starts later (see [`super::commit::CommitClock`]).
//!
//! # Lazy chunks: "every track" in O(chunks)
//!
//! A full restore or establish marks every track. Writing the words would
//! make the restore command's latency grow with the volume (1 MiB of words
//! per TiB, twice: bits and unsynced bits, then once more in the commit).
//! Instead [`TrackTable::fill`] marks each chunk *lazy*: all ones, words not
//! written. A chunk's state says how to read it:
//!
//! - `REAL`: the words are the truth.
//! - `ONES_UNSYNCED` / `ONES_SYNCED`: every bit is set; the words are stale.
//!   A commit writes an all-ones page for it and turns it synced, without
//!   touching its words.
//! - `FILLING`: someone is writing the words out (ones, and the unsynced
//!   bits and commit numbers the lazy state stood for). Readers treat it as
//!   ones; anyone who needs the words waits the microsecond it takes.
//!
//! The first change of a bit in a lazy chunk writes the chunk out
//! ([`TrackTable::materialize`]); after that the chunk is `REAL` for good
//! (until the next `fill`). Only `fill` makes chunks lazy, and it runs with
//! the volume's gate closed and its snapshot lock held, so no change and no
//! commit races with it.

use super::bitmap::AtomicBitmap;
use super::geometry::Track;
use std::sync::atomic::{
    AtomicU64, AtomicU8,
    Ordering::{Relaxed, SeqCst},
};

/// Words of bits per persistence chunk: one 4 KiB metadata page.
pub const CHUNK_WORDS: usize = 512;
/// Tracks per persistence chunk.
pub const CHUNK_TRACKS: u64 = CHUNK_WORDS as u64 * 64;

/// [`TrackTable::taken_by`] for a chunk taken by a commit that did not say
/// which (callers of [`TrackTable::take_dirty_chunk`]).
pub const TAKEN_UNKNOWN: u64 = u64::MAX;

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

const REAL: u8 = 0;
const ONES_UNSYNCED: u8 = 1;
const ONES_SYNCED: u8 = 2;
const FILLING: u8 = 3;

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
    /// Per chunk: `REAL`, `ONES_*` or `FILLING` (see the module comment).
    state: Box<[AtomicU8]>,
    /// Per lazy chunk, what `taken` is for all its words.
    lazy_taken: Box<[AtomicU64]>,
}

fn atomics<T>(n: usize, zero: impl Fn() -> T) -> Box<[T]> {
    (0..n).map(|_| zero()).collect()
}

impl TrackTable {
    pub fn new(tracks: u64) -> Self {
        let chunks = tracks.div_ceil(CHUNK_TRACKS) as usize;
        TrackTable {
            bits: AtomicBitmap::new(tracks),
            unsynced: AtomicBitmap::new(tracks),
            dirty_chunks: AtomicBitmap::new(chunks as u64),
            taken: atomics(tracks.div_ceil(64) as usize, || AtomicU64::new(0)),
            state: atomics(chunks, || AtomicU8::new(REAL)),
            lazy_taken: atomics(chunks, || AtomicU64::new(0)),
        }
    }

    pub fn tracks(&self) -> u64 {
        self.bits.len()
    }

    pub fn chunks(&self) -> usize {
        self.dirty_chunks.len() as usize
    }

    fn chunk_of(t: Track) -> usize {
        (t / CHUNK_TRACKS) as usize
    }

    /// The words of chunk `c`.
    fn chunk_words(&self, c: usize) -> std::ops::Range<usize> {
        let first = c * CHUNK_WORDS;
        first..(first + CHUNK_WORDS).min(self.bits.words())
    }

    /// The tracks of chunk `c`.
    fn chunk_tracks(&self, c: usize) -> std::ops::Range<Track> {
        let first = c as u64 * CHUNK_TRACKS;
        first..(first + CHUNK_TRACKS).min(self.tracks())
    }

    /// Whether chunk `c` reads as all ones without looking at its words.
    fn reads_as_ones(&self, c: usize) -> bool {
        self.state[c].load(SeqCst) != REAL
    }

    /// The state of chunk `c` once no one is writing it out.
    fn settled_state(&self, c: usize) -> u8 {
        let mut spins = 0u32;
        loop {
            match self.state[c].load(SeqCst) {
                FILLING => back_off(&mut spins),
                s => return s,
            }
        }
    }

    /// Writes lazy chunk `c` out as real words; returns once it is `REAL`.
    fn materialize(&self, c: usize) {
        let mut spins = 0u32;
        loop {
            let s = self.state[c].load(SeqCst);
            match s {
                REAL => return,
                FILLING => back_off(&mut spins),
                _ => {
                    if self.state[c]
                        .compare_exchange(s, FILLING, SeqCst, SeqCst)
                        .is_err()
                    {
                        continue;
                    }
                    let unsynced = if s == ONES_UNSYNCED { !0 } else { 0 };
                    let taken = self.lazy_taken[c].load(SeqCst);
                    // Plain stores: nobody reads these words until the
                    // state store below publishes them.
                    for w in self.chunk_words(c) {
                        self.bits.store_word_relaxed(w, !0);
                        self.unsynced.store_word_relaxed(w, unsynced);
                        self.taken[w].store(taken, Relaxed);
                    }
                    self.state[c].store(REAL, SeqCst);
                    return;
                }
            }
        }
    }

    pub fn get(&self, t: Track) -> bool {
        self.reads_as_ones(Self::chunk_of(t)) || self.bits.get(t)
    }

    fn mark_unsynced(&self, t: Track) {
        self.unsynced.set(t);
        self.dirty_chunks.set(t / CHUNK_TRACKS);
    }

    /// Sets the bit; returns whether it changed.
    pub fn set(&self, t: Track) -> bool {
        if self.reads_as_ones(Self::chunk_of(t)) {
            return false;
        }
        let changed = self.bits.set(t);
        if changed {
            self.mark_unsynced(t);
        }
        changed
    }

    /// Clears the bit; returns whether it changed.
    pub fn clear(&self, t: Track) -> bool {
        self.materialize(Self::chunk_of(t));
        let changed = self.bits.clear(t);
        if changed {
            self.mark_unsynced(t);
        }
        changed
    }

    /// Whether this track's bit may differ from the last committed one.
    pub fn is_unsynced(&self, t: Track) -> bool {
        match self.settled_state(Self::chunk_of(t)) {
            ONES_UNSYNCED => true,
            ONES_SYNCED => false,
            _ => self.unsynced.get(t),
        }
    }

    pub fn count(&self) -> u64 {
        (0..self.chunks())
            .map(|c| {
                if self.reads_as_ones(c) {
                    let r = self.chunk_tracks(c);
                    r.end - r.start
                } else {
                    self.bits.count_ones_in(self.chunk_words(c))
                }
            })
            .sum()
    }

    pub fn is_clear(&self) -> bool {
        self.next_one(0).is_none()
    }

    /// The first set bit at or after `from`, without wrapping.
    fn next_one(&self, from: Track) -> Option<Track> {
        let mut from = from;
        while from < self.tracks() {
            let c = Self::chunk_of(from);
            if self.reads_as_ones(c) {
                return Some(from);
            }
            let end = self.chunk_tracks(c).end;
            if let Some(t) = self.bits.next_one_before(from, end) {
                return Some(t);
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

    /// The current value of word `w`, lazy chunks included.
    fn word(&self, w: usize) -> u64 {
        if self.reads_as_ones(w / CHUNK_WORDS) {
            self.bits.valid_mask(w)
        } else {
            self.bits.word(w)
        }
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
        let mut ones = 0;
        for c in 0..self.chunks() {
            self.materialize(c);
            let mut changed = false;
            for w in self.chunk_words(c) {
                let new = word(w) & self.bits.valid_mask(w);
                ones += new.count_ones() as u64;
                if self.bits.word_relaxed(w) != new {
                    self.bits.store_word_relaxed(w, new);
                    // Release: a commit that swaps this word sees the new bits.
                    self.unsynced.store_word_release(w, !0);
                    changed = true;
                }
            }
            if changed {
                self.dirty_chunks.set(c as u64);
            }
        }
        std::sync::atomic::fence(SeqCst);
        ones
    }

    /// Sets every bit (lazily: O(chunks), see the module comment); returns
    /// how many that is. The gate must be closed and the snapshot lock held.
    pub fn fill(&self) -> u64 {
        for c in 0..self.chunks() {
            if self.state[c].load(SeqCst) == ONES_UNSYNCED {
                continue;
            }
            self.lazy_taken[c].store(0, SeqCst);
            self.state[c].store(ONES_UNSYNCED, SeqCst);
            self.dirty_chunks.set(c as u64);
        }
        self.tracks()
    }

    pub fn clear_all(&self) {
        self.assign_words(|_| 0);
    }

    /// `self = other`; returns the number of bits set.
    pub fn copy_from(&self, other: &TrackTable) -> u64 {
        self.assign_words(|w| other.word(w))
    }

    /// `self |= other`, word by word.
    pub fn merge_from(&self, other: &TrackTable) {
        for c in 0..self.chunks() {
            if self.reads_as_ones(c) {
                continue; // already all ones
            }
            for w in self.chunk_words(c) {
                let add = other.word(w);
                let old = self.bits.or_word(w, add);
                if old | add != old {
                    self.unsynced.or_word(w, add & !old);
                    self.dirty_chunks.set(c as u64);
                }
            }
        }
    }

    /// For a metadata commit: if chunk `c` is dirty, snapshot its words into
    /// `out` (zero-padded) and return true. Clearing the dirty flag, then the
    /// unsynced bits, then reading the bits is what makes concurrent changes
    /// either included here or carried by the next commit.
    pub fn take_dirty_chunk(&self, c: usize, out: &mut [u64]) -> bool {
        if !self.dirty_chunks.clear(c as u64) {
            return false;
        }
        self.snapshot_words(c, out, Some(TAKEN_UNKNOWN));
        true
    }

    /// [`Self::take_dirty_chunk`] by commit `seq` (from `CommitClock::begin`),
    /// which says when the chunk is all ones instead of writing them into
    /// `out` (a full restore's commit then costs O(chunks), not O(tracks)).
    pub fn take_dirty_chunk_for(&self, c: usize, out: &mut [u64], seq: u64) -> Taken {
        if !self.dirty_chunks.clear(c as u64) {
            return Taken::Clean;
        }
        if self.take_lazy(c, Some(seq)) {
            return Taken::Ones;
        }
        self.snapshot_words(c, out, Some(seq));
        Taken::Words
    }

    /// The commit that last carried a change of the word holding track `t`
    /// (0: none since load, [`TAKEN_UNKNOWN`]: one that did not say).
    pub fn taken_by(&self, t: Track) -> u64 {
        let c = Self::chunk_of(t);
        match self.settled_state(c) {
            REAL => self.taken[(t / 64) as usize].load(SeqCst),
            _ => self.lazy_taken[c].load(SeqCst),
        }
    }

    /// Copies chunk `c` into `out`; with `sync`, also marks it synced.
    pub fn snapshot_chunk(&self, c: usize, out: &mut [u64], sync: bool) {
        // Commit 0 is durable from the start: nothing to wait for later.
        self.snapshot_words(c, out, sync.then_some(0));
    }

    /// Copies chunk `c` into `out`; with `Some(seq)` it also marks each
    /// unsynced word synced, as carried by commit `seq`.
    fn snapshot_words(&self, c: usize, out: &mut [u64], sync: Option<u64>) {
        if self.take_lazy(c, sync) {
            let first = c * CHUNK_WORDS;
            for (i, slot) in out.iter_mut().enumerate().take(CHUNK_WORDS) {
                let w = first + i;
                *slot = if w < self.bits.words() {
                    self.bits.valid_mask(w)
                } else {
                    0
                };
            }
            return;
        }
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

    /// If chunk `c` is lazy, turns it synced as carried by commit `sync`
    /// (if any) and returns true. False if the chunk is `REAL` (also when it
    /// became so meanwhile).
    fn take_lazy(&self, c: usize, sync: Option<u64>) -> bool {
        loop {
            let s = self.settled_state(c);
            if s == REAL {
                return false;
            }
            if let (ONES_UNSYNCED, Some(seq)) = (s, sync) {
                // As for words: the commit number before the synced state.
                self.lazy_taken[c].fetch_max(seq, SeqCst);
                if self.state[c]
                    .compare_exchange(s, ONES_SYNCED, SeqCst, SeqCst)
                    .is_err()
                {
                    continue; // being written out: take its words instead
                }
            }
            return true;
        }
    }

    /// Loads chunk `c` from committed metadata: the bits become synced.
    pub fn load_chunk(&self, c: usize, words: &[u64]) {
        self.materialize(c);
        let first = c * CHUNK_WORDS;
        for (i, v) in words.iter().enumerate().take(CHUNK_WORDS) {
            let w = first + i;
            if w < self.bits.words() {
                self.bits.store_word(w, *v);
                self.unsynced.store_word(w, 0);
            }
        }
        self.dirty_chunks.clear(c as u64);
        for w in self.chunk_words(c) {
            self.taken[w].store(0, SeqCst);
        }
    }

    /// Loads chunk `c` as committed "all ones" (a flagged metadata page):
    /// lazy and synced, no words written.
    pub fn load_chunk_ones(&self, c: usize) {
        self.lazy_taken[c].store(0, SeqCst);
        self.state[c].store(ONES_SYNCED, SeqCst);
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

/// Waits for another thread to finish writing a chunk out (about a
/// microsecond; it may have been preempted, hence the yield).
fn back_off(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
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
        if !table.is_unsynced(t) {
            assert_eq!(
                m.committed[i], m.bits[i],
                "bit {t} synced but not committed"
            );
            assert!(
                table.taken_by(t) >= m.committed_by[i],
                "bit {t}: taken_by {} < {}",
                table.taken_by(t),
                m.committed_by[i]
            );
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
        assert_eq!(table.fill(), TRACKS);
        assert!(table.state.iter().all(|s| s.load(SeqCst) == ONES_UNSYNCED));
        assert!(!table.bits.get(8), "words not written by fill");
        let mut out = vec![0u64; CHUNK_WORDS];
        assert_eq!(table.take_dirty_chunk_for(1, &mut out, 5), Taken::Ones);
        assert!(!table.is_unsynced(CHUNK_TRACKS + 3));
        assert_eq!(table.taken_by(CHUNK_TRACKS + 3), 5);
        assert!(table.is_unsynced(3), "chunk 0 not committed yet");
        // The first change writes the chunk out, keeping what it stood for.
        assert!(table.clear(CHUNK_TRACKS + 3));
        assert_eq!(table.state[1].load(SeqCst), REAL);
        assert!(table.get(CHUNK_TRACKS + 4) && !table.is_unsynced(CHUNK_TRACKS + 200));
        assert_eq!(table.taken_by(CHUNK_TRACKS + 200), 5);
        assert!(table.is_unsynced(CHUNK_TRACKS + 3));
        assert_eq!(table.count(), TRACKS - 1);
    }
}
