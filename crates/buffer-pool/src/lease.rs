//! `Lease`: a buffer on loan from a pool, returned when dropped.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::pool::Shared;
use crate::raw::{RawBuf, ALIGN};

/// Owns a leased buffer and gives it back to its pool when dropped.
pub(crate) struct Holder {
    buf: Option<RawBuf>,
    /// Bytes asked for; the rest of the capacity is rounding loss.
    requested: usize,
    /// Bytes from the start that a lease may have written.
    dirty: usize,
    pool: Arc<Shared>,
    idx: usize,
}

impl Holder {
    pub(crate) fn new(pool: Arc<Shared>, idx: usize, buf: RawBuf, requested: usize) -> Self {
        Self {
            buf: Some(buf),
            requested,
            dirty: requested,
            pool,
            idx,
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.release(self.idx, buf, self.requested, self.dirty);
        }
    }
}

enum Owner {
    /// A zero-length lease holding no buffer.
    Empty,
    /// The whole buffer, starting at `Lease::ptr`.
    Whole(Holder),
    /// One of several disjoint pieces of a buffer made by `split_off`; the
    /// buffer goes back when the last piece is dropped.
    Split(Arc<Holder>),
}

/// A buffer on loan from a [`BufferPool`](crate::BufferPool).
///
/// Dereferences to `[u8]` of the requested length; [`as_slice_f32`](Self::as_slice_f32)
/// and [`as_mut_slice_f32`](Self::as_mut_slice_f32) view it as `f32`s (every
/// lease starts on a 64-byte boundary). The buffer goes back to its pool when
/// the lease is dropped, including while a panic unwinds, so a lease cannot
/// leak budget. A fresh buffer is zeroed; a reused one holds its previous
/// user's bytes unless the pool zeroes on release.
pub struct Lease {
    /// Start of this lease's bytes; 64-byte aligned; valid for `len` bytes.
    ptr: NonNull<u8>,
    len: usize,
    owner: Owner,
}

// SAFETY: a Lease has exclusive access to its `len` bytes at `ptr` (pieces made
// by `split_off` are disjoint) and everything else it holds (`Holder`, `Arc`)
// is Send + Sync; it behaves like `Box<[u8]>`.
unsafe impl Send for Lease {}
// SAFETY: `&Lease` only gives shared (read) access to the bytes.
unsafe impl Sync for Lease {}

#[repr(align(64))]
struct Align64;

impl Lease {
    pub(crate) fn new(holder: Holder, len: usize) -> Self {
        let ptr = holder.buf.as_ref().map_or(NonNull::dangling(), RawBuf::ptr);
        Self {
            ptr,
            len,
            owner: Owner::Whole(holder),
        }
    }

    /// A lease of zero bytes that holds no buffer.
    pub fn empty() -> Self {
        Self {
            ptr: NonNull::<Align64>::dangling().cast(),
            len: 0,
            owner: Owner::Empty,
        }
    }

    /// Length in bytes (what was asked for, or less after `shrink`/`split_off`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the lease has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity of the underlying buffer (its size class), shared by all the
    /// pieces of a split lease; 0 for an empty lease.
    pub fn buffer_capacity(&self) -> usize {
        let holder = match &self.owner {
            Owner::Empty => return 0,
            Owner::Whole(h) => h,
            Owner::Split(h) => &**h,
        };
        holder.buf.as_ref().map_or(0, RawBuf::cap)
    }

    /// Name of the pool the buffer came from (`None` for an empty lease).
    pub fn pool_name(&self) -> Option<&str> {
        match &self.owner {
            Owner::Empty => None,
            Owner::Whole(h) => Some(h.pool.pool_name(h.idx)),
            Owner::Split(h) => Some(h.pool.pool_name(h.idx)),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` initialised bytes (buffers
        // start zeroed and are only written through slices like this one) for
        // as long as the lease lives, and no `&mut` to them exists while `self`
        // is borrowed; `u8` needs no alignment.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the lease is the only owner of these
        // bytes (split pieces are disjoint), borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len / 4 * 4` bytes viewed as `f32`s.
    pub fn as_slice_f32(&self) -> &[f32] {
        // SAFETY: `ptr` is 64-byte aligned (buffers are allocated with that
        // alignment and split only at multiples of it), so it is aligned for
        // f32; `len / 4` f32s fit in the `len` initialised bytes; every bit
        // pattern is a valid f32; borrowing rules as in `as_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<f32>(), self.len / 4) }
    }

    /// The first `len / 4 * 4` bytes viewed as writable `f32`s.
    pub fn as_mut_slice_f32(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice_f32` and `as_mut_slice`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<f32>(), self.len / 4) }
    }

    /// Sets every byte of the lease to zero.
    pub fn fill_zero(&mut self) {
        self.as_mut_slice().fill(0);
    }

    /// Splits the lease in two: `self` keeps bytes `[0, at)` and the returned
    /// lease gets `[at, len)`. Both pieces share the buffer, which goes back to
    /// the pool when both are dropped. `at` must be a multiple of 64 so that
    /// both pieces stay aligned for typed views.
    pub fn split_off(&mut self, at: usize) -> Result<Lease> {
        if at > self.len {
            return Err(Error::SplitOutOfRange { at, len: self.len });
        }
        if !at.is_multiple_of(ALIGN) {
            return Err(Error::SplitMisaligned { at, align: ALIGN });
        }
        let owner = match std::mem::replace(&mut self.owner, Owner::Empty) {
            Owner::Empty => {
                // Only `at == 0` gets here (len is 0).
                return Ok(Lease::empty());
            }
            Owner::Whole(h) => Arc::new(h),
            Owner::Split(h) => h,
        };
        self.owner = Owner::Split(Arc::clone(&owner));
        // SAFETY: `at <= len`, so `ptr + at` stays within (or one past the end
        // of) this lease's bytes.
        let tail = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(at)) };
        let rest = Lease {
            ptr: tail,
            len: self.len - at,
            owner: Owner::Split(owner),
        };
        self.len = at;
        Ok(rest)
    }

    /// Shortens the lease to `new_len` bytes. When the lease is a whole
    /// buffer and `new_len` falls in a smaller size class, the buffer itself
    /// is shrunk (`realloc`, which may move it; the first `new_len` bytes are
    /// kept) and the difference returns to the budget at once. Shrinking to 0
    /// gives the buffer back to the pool's cache and leaves an empty lease.
    pub fn shrink(&mut self, new_len: usize) -> Result<()> {
        if new_len > self.len {
            return Err(Error::ShrinkBeyondLength {
                new_len,
                len: self.len,
            });
        }
        if new_len == 0 {
            if let Owner::Whole(_) = self.owner {
                // Dropping the holder returns the buffer.
                *self = Lease::empty();
                return Ok(());
            }
        }
        if let Owner::Whole(h) = &mut self.owner {
            if let (Ok(class), Some(buf)) = (h.pool.class_for(h.idx, new_len), h.buf.as_mut()) {
                let old_cap = buf.cap();
                if class < old_cap && buf.shrink(class) {
                    self.ptr = buf.ptr();
                    let old_requested = h.requested;
                    h.requested = new_len;
                    h.dirty = h.dirty.min(class);
                    h.pool.shrunk(h.idx, old_cap, class, old_requested, new_len);
                }
            }
        }
        self.len = new_len;
        Ok(())
    }
}

impl Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for Lease {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool_name())
            .field("len", &self.len)
            .field("buffer_capacity", &self.buffer_capacity())
            .field("split", &matches!(self.owner, Owner::Split(_)))
            .finish()
    }
}
