//! A chunk's storage: all clear, all set, or a page of words with their
//! commit tags, and the changes of a chunk's shape (a page is made when
//! the bits become mixed and given back when they are uniform again).

use super::*;

/// A mixed chunk's words and their commit tags.
pub(super) struct Page {
    pub(super) words: [AtomicU64; CHUNK_WORDS],
    /// Per word, the tag of the commit that last carried a change of it.
    /// Written only under the chunk's exclusive lock.
    pub(super) tags: [u8; CHUNK_WORDS],
}

impl Page {
    pub(super) fn new(words: &[u64; CHUNK_WORDS], tag: u8) -> Box<Page> {
        Box::new(Page {
            words: std::array::from_fn(|i| AtomicU64::new(words[i])),
            tags: [tag; CHUNK_WORDS],
        })
    }
}

pub(super) enum Bits {
    Zeros,
    Ones,
    Page(Box<Page>),
}

pub(super) struct Chunk {
    pub(super) bits: Bits,
    /// Per word: changed since a commit last took this chunk.
    pub(super) unsynced: [AtomicU64; MARK_WORDS],
    /// The tag of every word while the chunk has no page.
    pub(super) lazy_tag: u8,
    /// Taken by a commit that did not say which: conservative from then on.
    pub(super) unknown: bool,
}

impl Chunk {
    pub(super) fn new() -> Self {
        Chunk {
            bits: Bits::Zeros,
            unsynced: Default::default(),
            lazy_tag: 0,
            unknown: false,
        }
    }

    pub(super) fn mark(&self, w: usize) {
        self.unsynced[w / 64].fetch_or(1 << (w % 64), SeqCst);
    }

    pub(super) fn marked(&self, w: usize) -> bool {
        self.unsynced[w / 64].load(SeqCst) & (1 << (w % 64)) != 0
    }

    pub(super) fn mark_all(&self) {
        self.unsynced.iter().for_each(|m| m.store(!0, SeqCst));
    }

    pub(super) fn any_marked(&self) -> bool {
        self.unsynced.iter().any(|m| m.load(SeqCst) != 0)
    }

    pub(super) fn tag(&self, w: usize) -> u8 {
        match &self.bits {
            Bits::Page(p) => p.tags[w],
            _ => self.lazy_tag,
        }
    }
}

impl TrackTable {
    /// The tracks of chunk `c`.
    pub(super) fn chunk_tracks(&self, c: usize) -> std::ops::Range<Track> {
        let first = c as u64 * CHUNK_TRACKS;
        first..(first + CHUNK_TRACKS).min(self.tracks)
    }

    /// The valid bits of word `w` of chunk `c` (0 past the table's end).
    pub(super) fn valid_mask(&self, c: usize, w: usize) -> u64 {
        let first = c as u64 * CHUNK_TRACKS + w as u64 * 64;
        match self.tracks.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => !0,
            n => (1u64 << n) - 1,
        }
    }

    /// Chunk `c`'s words, lazy chunks included, into `out`.
    pub(super) fn words_into(&self, c: usize, chunk: &Chunk, out: &mut [u64; CHUNK_WORDS]) {
        for (w, slot) in out.iter_mut().enumerate() {
            *slot = match &chunk.bits {
                Bits::Zeros => 0,
                Bits::Ones => self.valid_mask(c, w),
                Bits::Page(p) => p.words[w].load(SeqCst),
            };
        }
    }

    /// Gives chunk `c` a page (from its lazy value) if it has none.
    pub(super) fn materialize(&self, c: usize, chunk: &mut Chunk) {
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
    pub(super) fn assign_chunk(
        &self,
        c: usize,
        chunk: &mut Chunk,
        new: &[u64; CHUNK_WORDS],
    ) -> bool {
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
    pub(super) fn uniform(&self, c: usize, words: &[u64; CHUNK_WORDS]) -> Option<bool> {
        if words.iter().all(|w| *w == 0) {
            return Some(false);
        }
        (0..CHUNK_WORDS)
            .all(|w| words[w] == self.valid_mask(c, w))
            .then_some(true)
    }
}
