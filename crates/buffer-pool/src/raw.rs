//! The one place with `unsafe` allocation code: an owned, zero-initialised,
//! 64-byte-aligned block of bytes.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: a cache line, enough for any SIMD load of `f32`.
pub(crate) const ALIGN: usize = 64;

/// An owned heap block of `cap > 0` bytes aligned to [`ALIGN`].
///
/// Invariant: every byte of the block is initialised (it starts zeroed, and
/// all later writes go through safe slices or `write_bytes`), so it may be
/// viewed as `[u8]` or, the pointer being 64-aligned, as `[f32]`.
pub(crate) struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a RawBuf owns its block exclusively, like `Box<[u8]>`; nothing in it
// is tied to a thread.
unsafe impl Send for RawBuf {}
// SAFETY: shared references to a RawBuf give no access to the bytes (only to
// the pointer value and capacity), so sharing it between threads is harmless.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    fn layout(cap: usize) -> Option<Layout> {
        Layout::from_size_align(cap, ALIGN).ok()
    }

    /// A fresh zeroed block of `cap` bytes, or `None` when `cap` is zero, too
    /// large for a layout, or the allocator fails.
    pub(crate) fn zeroed(cap: usize) -> Option<Self> {
        if cap == 0 {
            return None;
        }
        let layout = Self::layout(cap)?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| Self { ptr, cap })
    }

    /// Capacity in bytes.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Start of the block.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Sets the first `len` bytes (at most the capacity) to zero.
    pub(crate) fn zero_prefix(&mut self, len: usize) {
        let len = len.min(self.cap);
        // SAFETY: the block is valid for writes of `cap >= len` bytes and we
        // hold it exclusively (`&mut self`).
        unsafe { self.ptr.as_ptr().write_bytes(0, len) };
    }

    /// Shrinks the block to `new_cap` bytes (`0 < new_cap <= cap`), keeping
    /// its first `new_cap` bytes. Returns `false`, leaving the block as it
    /// was, when the allocator fails or the arguments are out of range.
    pub(crate) fn shrink(&mut self, new_cap: usize) -> bool {
        if new_cap == 0 || new_cap > self.cap {
            return false;
        }
        if new_cap == self.cap {
            return true;
        }
        let Some(old) = Self::layout(self.cap) else {
            return false;
        };
        // SAFETY: `ptr` was allocated by the global allocator with `old`
        // (same size and alignment); `new_cap` is non-zero and, being smaller
        // than a size that already formed a valid layout, cannot overflow
        // `isize` when rounded up to the alignment. `realloc` keeps the first
        // `new_cap` bytes, which were initialised, so the invariant holds.
        let ptr = unsafe { alloc::realloc(self.ptr.as_ptr(), old, new_cap) };
        match NonNull::new(ptr) {
            Some(ptr) => {
                self.ptr = ptr;
                self.cap = new_cap;
                true
            }
            None => false,
        }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.cap) {
            // SAFETY: `ptr` was allocated by the global allocator with exactly
            // this layout (constructors and `shrink` keep `cap` in step) and is
            // freed only here, once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for RawBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBuf")
            .field("ptr", &self.ptr)
            .field("cap", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_shrinkable() {
        let mut b = RawBuf::zeroed(10_000).unwrap();
        assert_eq!(b.ptr().as_ptr() as usize % ALIGN, 0);
        // SAFETY: test reads initialised bytes of a live block it owns.
        let all_zero = unsafe { std::slice::from_raw_parts(b.ptr().as_ptr(), b.cap()) }
            .iter()
            .all(|&x| x == 0);
        assert!(all_zero);
        // SAFETY: the block holds 10_000 bytes.
        unsafe { b.ptr().as_ptr().write_bytes(7, 10_000) };
        assert!(b.shrink(128));
        assert_eq!(b.cap(), 128);
        assert_eq!(b.ptr().as_ptr() as usize % ALIGN, 0);
        // SAFETY: as above, 128 bytes remain.
        let kept = unsafe { std::slice::from_raw_parts(b.ptr().as_ptr(), 128) };
        assert!(kept.iter().all(|&x| x == 7));
        b.zero_prefix(1_000_000);
        // SAFETY: as above.
        let kept = unsafe { std::slice::from_raw_parts(b.ptr().as_ptr(), 128) };
        assert!(kept.iter().all(|&x| x == 0));
        assert!(!b.shrink(0));
        assert!(!b.shrink(129));
        assert!(RawBuf::zeroed(0).is_none());
        assert!(RawBuf::zeroed(usize::MAX).is_none());
    }
}
