//! [`IoBuf`]: an owned, page-aligned data buffer.
//!
//! Alignment matters for O_DIRECT file I/O and for DMA, so every data buffer
//! in unvme starts on a 4 KiB boundary. The buffer has a capacity fixed at
//! allocation and a length that may be set anywhere up to it, so one buffer
//! can be reused for transfers of different sizes without reallocating.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`].
pub const IOBUF_ALIGN: usize = 4096;

/// An owned, zero-initialised, 4 KiB-aligned byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); nothing else holds its pointer, so moving it to another thread is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads through `Deref`, as for Vec<u8>.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zeroed buffer of `len` bytes (capacity rounded up to 4 KiB).
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).div_ceil(IOBUF_ALIGN) * IOBUF_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size (cap >= 4096) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        IoBuf { ptr, cap, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, IOBUF_ALIGN)
            .expect("capacity is a multiple of 4096 and fits isize")
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length. Panics if `len` exceeds the capacity (a caller bug,
    /// never a peer's input: callers check against `capacity()` first).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Raw pointer to the start of the buffer, for DMA mapping and FFI.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable raw pointer to the start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `cap` initialised bytes (allocated zeroed), len <= cap, and the borrow of self keeps the allocation alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_aligned_zeroed_and_resizable() {
        let mut b = IoBuf::new(5000);
        assert_eq!(b.as_ptr() as usize % IOBUF_ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 7;
        b.set_len(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(b[4999], 7);
        let c = b.clone();
        assert_eq!(&c[..], &b[..]);
    }
}
