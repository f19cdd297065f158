//! Size classes: how a requested length is rounded to a buffer capacity.

/// Smallest capacity handed out; also the alignment of every buffer.
pub const MIN_CLASS: usize = 64;

/// Up to this size classes are powers of two.
pub const POW2_LIMIT: usize = 1 << 20;

/// Above [`POW2_LIMIT`] each class is 1.25× the previous, rounded up to this.
pub const LARGE_GRANULE: usize = 4096;

/// The capacity a request of `bytes` is rounded to.
///
/// * `0` stays `0` (an empty lease, no buffer);
/// * up to 64 bytes: 64;
/// * up to 1 MiB: the next power of two (128, 256, ..., 1 MiB), so at most
///   half of a buffer is rounding slack;
/// * above 1 MiB: 1 MiB × 1.25ᵏ, each step rounded up to a multiple of 4 KiB
///   (1 280 KiB, 1 600 KiB, 2 000 KiB, 2 500 KiB, 3 128 KiB, 3 912 KiB, 4 892 KiB, ...;
///   a 4 MiB request takes the 4 892 KiB class),
///   so at most a fifth of a buffer is rounding slack.
///
/// Returns `None` when the class would overflow `usize`.
///
/// ```
/// use buffer_pool::size_class;
/// assert_eq!(size_class(1), Some(64));
/// assert_eq!(size_class(4096), Some(4096));
/// assert_eq!(size_class(4097), Some(8192));
/// assert_eq!(size_class((1 << 20) + 1), Some(1_310_720));
/// ```
pub fn size_class(bytes: usize) -> Option<usize> {
    if bytes == 0 {
        return Some(0);
    }
    if bytes <= MIN_CLASS {
        return Some(MIN_CLASS);
    }
    if bytes <= POW2_LIMIT {
        return Some(bytes.next_power_of_two());
    }
    let mut class = POW2_LIMIT;
    while class < bytes {
        let next = class.checked_add(class / 4)?;
        class = next.checked_next_multiple_of(LARGE_GRANULE)?;
    }
    Some(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_requests_with_bounded_slack() {
        let mut probe = 1usize;
        while probe < (1 << 34) {
            for bytes in [probe, probe + 1, probe.saturating_sub(1).max(1)] {
                let class = size_class(bytes).unwrap();
                assert!(class >= bytes, "{bytes} -> {class}");
                assert_eq!(class % MIN_CLASS, 0, "{bytes} -> {class} not aligned");
                if bytes > MIN_CLASS && bytes <= POW2_LIMIT {
                    assert!(class < 2 * bytes, "{bytes} -> {class}");
                } else if bytes > POW2_LIMIT {
                    // 1.25x step plus at most one granule of rounding.
                    assert!(
                        class <= bytes + bytes / 4 + LARGE_GRANULE,
                        "{bytes} -> {class}"
                    );
                }
            }
            probe = probe * 3 / 2 + 1;
        }
    }

    #[test]
    fn classes_are_monotonic_and_idempotent() {
        let mut last = 0;
        for bytes in (0..(8 << 20)).step_by(4093) {
            let class = size_class(bytes).unwrap();
            assert!(class >= last);
            assert_eq!(size_class(class), Some(class));
            last = class;
        }
    }

    #[test]
    fn documented_large_classes() {
        assert_eq!(size_class(4 << 20), Some(5_009_408));
        assert_eq!(size_class(2_048_000), Some(2_048_000));
        assert_eq!(size_class(usize::MAX), None);
    }
}
