//! A count-min sketch of 4-bit counters with conservative update and
//! periodic halving: TinyLFU's frequency estimate, laid out as in Caffeine.

/// Estimates how often each key hash was seen recently.
///
/// The table holds 16 four-bit counters per `u64` word, one word per expected
/// entry (rounded up to a power of two). A key owns one counter in each of
/// four words (the words picked by four seeded hashes, the counter within a
/// word by the key's low bits and the row), and its estimate is the minimum of
/// the four. An increment raises only the counters that equal that minimum
/// (conservative update), so keys that share a counter with a hot key are not
/// inflated by it. After `sample_size` (by default ten times the expected
/// entry count) increments every counter is halved, so that the history ages and a key
/// that was hot an hour ago does not keep its place for ever.
#[derive(Debug)]
pub(crate) struct FrequencySketch {
    table: Vec<u64>,
    mask: usize,
    expected: usize,
    additions: u64,
    aging: f64,
    sample_size: u64,
}

/// The default aging period, in multiples of the expected entry count
/// (Caffeine's).
pub(crate) const DEFAULT_AGING: f64 = 10.0;

const SEEDS: [u64; 4] = [
    0xc3a5_c85c_97cb_3127,
    0xb492_b66f_be98_f273,
    0x9ae1_6a3b_2f90_404f,
    0xcbf2_9ce4_8422_2325,
];
const RESET_MASK: u64 = 0x7777_7777_7777_7777;
const ONE_MASK: u64 = 0x1111_1111_1111_1111;
/// The largest expected entry count honoured (a 512 MiB table).
const MAX_EXPECTED: usize = 1 << 26;

impl FrequencySketch {
    /// A sketch sized for about `expected` distinct live keys.
    pub(crate) fn new(expected: usize) -> Self {
        let expected = expected.clamp(16, MAX_EXPECTED);
        let words = expected.next_power_of_two();
        Self {
            table: vec![0; words],
            mask: words - 1,
            expected,
            additions: 0,
            aging: DEFAULT_AGING,
            sample_size: (DEFAULT_AGING * expected as f64) as u64,
        }
    }

    /// Sets the aging period to `multiple` × the expected entry count
    /// (at least one increment).
    pub(crate) fn set_aging(&mut self, multiple: f64) {
        self.aging = multiple;
        self.sample_size = ((multiple * self.expected as f64) as u64).max(1);
    }

    /// The number of distinct keys the sketch is sized for.
    pub(crate) fn expected(&self) -> usize {
        self.expected
    }

    /// How many increments make one aging period (by default ten times the
    /// expected entry count); the hill climber samples the hit rate over as
    /// many requests.
    pub(crate) fn sample_size(&self) -> u64 {
        self.sample_size
    }

    /// The word and the bit offset of `hash`'s counter in row `row`.
    #[inline]
    fn slot(&self, hash: u64, row: usize) -> (usize, u32) {
        let h = hash.wrapping_add(SEEDS[row]).wrapping_mul(SEEDS[row]);
        let h = h.wrapping_add(h >> 32);
        let counter = ((hash & 3) << 2) as u32 + row as u32;
        (h as usize & self.mask, counter << 2)
    }

    #[inline]
    fn counters(&self, hash: u64) -> [(usize, u32, u8); 4] {
        let mut out = [(0, 0, 0); 4];
        for (row, o) in out.iter_mut().enumerate() {
            let (word, shift) = self.slot(hash, row);
            *o = (word, shift, ((self.table[word] >> shift) & 0xF) as u8);
        }
        out
    }

    /// The estimated recent frequency of `hash` (0–15).
    #[inline]
    pub(crate) fn frequency(&self, hash: u64) -> u8 {
        self.counters(hash)
            .iter()
            .map(|&(_, _, c)| c)
            .min()
            .unwrap_or(0)
    }

    /// Records one access of `hash`.
    #[inline]
    pub(crate) fn increment(&mut self, hash: u64) {
        let counters = self.counters(hash);
        let min = counters.iter().map(|&(_, _, c)| c).min().unwrap_or(0);
        if min >= 15 {
            return;
        }
        for (word, shift, c) in counters {
            // Two rows may share a word but never a counter (their offsets
            // differ by the row), so each raise is independent.
            if c == min {
                self.table[word] += 1 << shift;
            }
        }
        self.additions += 1;
        if self.additions >= self.sample_size {
            self.halve();
        }
    }

    /// Widens the sketch to about `expected` keys, keeping the counts: a
    /// key's word in the wider table has the same low bits as before (and
    /// the same counter within it), so every new word starts as a copy of
    /// the old word it came from.
    pub(crate) fn grow(&mut self, expected: usize) {
        let expected = expected.clamp(16, MAX_EXPECTED);
        if expected <= self.expected {
            return;
        }
        let words = expected.next_power_of_two();
        if words > self.table.len() {
            let old_mask = self.mask;
            self.table = (0..words).map(|j| self.table[j & old_mask]).collect();
            self.mask = words - 1;
        }
        self.expected = expected;
        self.set_aging(self.aging);
    }

    /// Halves every counter; the odd ones lose their half unit, which the
    /// addition count accounts for.
    fn halve(&mut self) {
        let mut odd = 0u64;
        for w in &mut self.table {
            odd += u64::from((*w & ONE_MASK).count_ones());
            *w = (*w >> 1) & RESET_MASK;
        }
        self.additions = (self.additions / 2).saturating_sub(odd / 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::fmix64;

    #[test]
    fn counts_and_ages() {
        let mut s = FrequencySketch::new(64);
        for _ in 0..5 {
            s.increment(42);
        }
        assert!(s.frequency(42) >= 5);
        assert!(s.frequency(7) <= 1);
        for _ in 0..100 {
            s.increment(42);
        }
        assert_eq!(s.frequency(42), 15, "saturates at 15");
        // Drive the sketch through a sample period: the old key's count halves.
        for k in 1000..(1000 + s.sample_size()) {
            s.increment(fmix64(k));
        }
        assert!(s.frequency(42) < 15, "aged: {}", s.frequency(42));
    }

    #[test]
    fn conservative_update_spares_neighbours() {
        // A hot key raised 15 times must not lift a cold key above what it
        // was actually seen, beyond the rows they happen to share.
        let mut s = FrequencySketch::new(1024);
        let hot = fmix64(1);
        for _ in 0..15 {
            s.increment(hot);
        }
        let mut over = 0;
        for k in 2..2000u64 {
            let h = fmix64(k);
            s.increment(h);
            if s.frequency(h) > 1 {
                over += 1;
            }
        }
        // With 1024 words × 16 counters, a cold key is over-counted only when
        // all four of its counters collide with others: rare.
        assert!(over < 200, "{over} of 1998 cold keys over-counted");
    }

    #[test]
    fn grow_keeps_counts() {
        let mut s = FrequencySketch::new(64);
        let keys: Vec<u64> = (0..40).map(fmix64).collect();
        for (i, &h) in keys.iter().enumerate() {
            for _ in 0..(i % 7 + 1) {
                s.increment(h);
            }
        }
        let before: Vec<u8> = keys.iter().map(|&h| s.frequency(h)).collect();
        s.grow(4096);
        assert_eq!(s.expected(), 4096);
        assert_eq!(s.sample_size(), 40_960);
        let after: Vec<u8> = keys.iter().map(|&h| s.frequency(h)).collect();
        assert_eq!(before, after);
        // Growing to a smaller size is a no-op.
        s.grow(100);
        assert_eq!(s.expected(), 4096);
    }

    #[test]
    fn halving_halves_every_counter() {
        let mut s = FrequencySketch::new(1024);
        let a = fmix64(u64::MAX);
        for _ in 0..8 {
            s.increment(a);
        }
        assert_eq!(s.frequency(a), 8);
        // Other keys until the period ends (the addition count drops).
        let mut k = 0u64;
        loop {
            let before = s.additions;
            s.increment(fmix64(k));
            k += 1;
            if s.additions < before {
                break;
            }
            assert!(k < 100_000, "no halving after {k} increments");
        }
        assert!(k <= s.sample_size(), "halved after {k} increments");
        assert_eq!(s.frequency(a), 4, "8 halves to 4");
    }
}
