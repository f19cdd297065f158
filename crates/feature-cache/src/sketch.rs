//! A count-min sketch of 4-bit counters with periodic halving (TinyLFU's
//! frequency estimate, as in Caffeine).

/// Estimates how often each key hash was seen recently.
///
/// Four rows of saturating 4-bit counters (stored one per byte for speed);
/// an estimate is the minimum over the rows. After `sample_size` recorded
/// increments every counter is halved, so that the history ages and a key
/// that was hot an hour ago does not keep its place for ever.
#[derive(Debug)]
pub(crate) struct FrequencySketch {
    table: Vec<u8>,
    mask: usize,
    additions: u64,
    sample_size: u64,
}

const SEEDS: [u64; 4] = [
    0xc3a5_c85c_97cb_3127,
    0xb492_b66f_be98_f273,
    0x9ae1_6a3b_2f90_404f,
    0xcbf2_9ce4_8422_2325,
];

impl FrequencySketch {
    /// A sketch sized for about `capacity` distinct live keys.
    pub(crate) fn new(capacity: usize) -> Self {
        let width = capacity.clamp(16, 1 << 26).next_power_of_two();
        Self {
            table: vec![0; width * 4],
            mask: width - 1,
            additions: 0,
            sample_size: 10 * width as u64,
        }
    }

    /// The number of distinct keys the sketch is sized for.
    pub(crate) fn width(&self) -> usize {
        self.mask + 1
    }

    /// How many requests make one sample period (ten times the width).
    pub(crate) fn sample_size(&self) -> u64 {
        self.sample_size
    }

    #[inline]
    fn index(&self, hash: u64, row: usize) -> usize {
        let h = (hash ^ (hash >> 29)).wrapping_mul(SEEDS[row]);
        let h = h ^ (h >> 32);
        row * (self.mask + 1) + (h as usize & self.mask)
    }

    /// The estimated recent frequency of `hash` (0–15).
    #[inline]
    pub(crate) fn frequency(&self, hash: u64) -> u8 {
        let mut f = u8::MAX;
        for row in 0..4 {
            f = f.min(self.table[self.index(hash, row)]);
        }
        f
    }

    /// Records one access of `hash`.
    #[inline]
    pub(crate) fn increment(&mut self, hash: u64) {
        let mut added = false;
        for row in 0..4 {
            let i = self.index(hash, row);
            let c = &mut self.table[i];
            if *c < 15 {
                *c += 1;
                added = true;
            }
        }
        if added {
            self.additions += 1;
            if self.additions >= self.sample_size {
                self.halve();
            }
        }
    }

    /// Widens the sketch to at least `capacity` keys, keeping the counts:
    /// a key's column in the wider table has the same low bits as before, so
    /// every new column starts from the count of the old column it came from.
    pub(crate) fn grow(&mut self, capacity: usize) {
        let width = capacity.clamp(16, 1 << 26).next_power_of_two();
        let old_width = self.width();
        if width <= old_width {
            return;
        }
        let mut table = vec![0u8; width * 4];
        for row in 0..4 {
            for j in 0..width {
                table[row * width + j] = self.table[row * old_width + (j & self.mask)];
            }
        }
        self.table = table;
        self.mask = width - 1;
        self.sample_size = 10 * width as u64;
    }

    fn halve(&mut self) {
        for c in &mut self.table {
            *c >>= 1;
        }
        self.additions /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            s.increment(crate::hash::fmix64(k));
        }
        assert!(s.frequency(42) < 15, "aged: {}", s.frequency(42));
    }
}
