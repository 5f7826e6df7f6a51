//! What a metadata commit takes from a table (dirty chunks, tagged with the
//! commit's number), what opening the metadata loads into it, and how
//! durable a bit is now.

use super::*;

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

pub(super) fn tag_of(seq: u64) -> u8 {
    seq as u8
}

impl TrackTable {
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
