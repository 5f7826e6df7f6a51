//! A fixed-size bitmap over atomic words, shared by every queue thread
//! without a lock. Whole-table operations work a word at a time so that
//! starting a restore on a 1 TiB volume stays in the microseconds.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};

pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        // Zeroed allocation: the OS hands out untouched pages lazily, so a
        // sparse 1 TiB volume costs nothing until its words are used.
        let words = Box::<[AtomicU64]>::new_zeroed_slice(n);
        // SAFETY: an all-zero AtomicU64 is a valid 0.
        let words = unsafe { words.assume_init() };
        AtomicBitmap { words, bits }
    }

    fn locate(bit: u64) -> (usize, u64) {
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// Sets the bit; returns whether it was clear before.
    pub fn set(&self, bit: u64) -> bool {
        let (w, m) = Self::locate(bit);
        self.words[w].fetch_or(m, SeqCst) & m == 0
    }

    pub fn get(&self, bit: u64) -> bool {
        let (w, m) = Self::locate(bit);
        self.words[w].load(SeqCst) & m != 0
    }

    /// Clears the bit; returns whether it was set before.
    pub fn clear(&self, bit: u64) -> bool {
        let (w, m) = Self::locate(bit);
        self.words[w].fetch_and(!m, SeqCst) & m != 0
    }

    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(SeqCst)
    }

    /// Sets every bit (tests).
    #[cfg(test)]
    pub fn fill(&self) {
        for (w, word) in self.words.iter().enumerate() {
            let rem = self.bits - w as u64 * 64;
            word.store(if rem >= 64 { !0 } else { (1u64 << rem) - 1 }, SeqCst);
        }
    }

    pub fn count_ones(&self) -> u64 {
        self.count_ones_in(0..self.words.len())
    }

    /// The first set bit at or after `from`, without wrapping.
    pub fn next_one(&self, from: u64) -> Option<u64> {
        self.next_one_before(from, self.bits)
    }

    /// The first set bit in `from..end`; `end` is a multiple of 64 or the
    /// length.
    pub fn next_one_before(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.bits);
        if from >= end {
            return None;
        }
        let (mut w, _) = Self::locate(from);
        let end_word = end.div_ceil(64) as usize;
        let mut word = self.word(w) & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some(w as u64 * 64 + word.trailing_zeros() as u64);
            }
            w += 1;
            if w >= end_word {
                return None;
            }
            word = self.word(w);
        }
    }

    /// Set bits in words `words`.
    pub fn count_ones_in(&self, words: std::ops::Range<usize>) -> u64 {
        self.words[words]
            .iter()
            .map(|w| w.load(Relaxed).count_ones() as u64)
            .sum()
    }

    /// The first set bit at or after `from`, wrapping around once.
    #[cfg(test)]
    pub fn next_one_wrapping(&self, from: u64) -> Option<u64> {
        self.next_one(from).or_else(|| self.next_one(0))
    }

    #[cfg(test)]
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = 0;
        std::iter::from_fn(move || {
            let bit = self.next_one(next)?;
            next = bit + 1;
            Some(bit)
        })
    }
}

impl std::fmt::Debug for AtomicBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AtomicBitmap({} of {} set)",
            self.count_ones(),
            self.bits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_respects_length() {
        let b = AtomicBitmap::new(70);
        b.fill();
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.next_one(69), Some(69));
        assert!(b.clear(3));
        assert!(!b.clear(3));
        assert_eq!(b.next_one(3), Some(4));
    }

    #[test]
    fn next_one_wraps() {
        let b = AtomicBitmap::new(200);
        b.set(5);
        b.set(130);
        assert_eq!(b.next_one_wrapping(131), Some(5));
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![5, 130]);
    }
}
