//! [`IoBuf`]: an owned data buffer, page-aligned on the heap or borrowed
//! from memory a device or a guest provides.
//!
//! Alignment matters for O_DIRECT file I/O and for DMA, so every buffer
//! unvme allocates itself ([`IoBuf::new`]) starts on a 4 KiB boundary. The
//! buffer has a capacity fixed at allocation and a length that may be set
//! anywhere up to it, so one buffer can be reused for transfers of different
//! sizes without reallocating.
//!
//! A buffer can also stand for memory that belongs to someone else
//! ([`IoBuf::from_owner`]): pages of a VFIO device's IOMMU-mapped pool (so
//! the SSD reads and writes the very bytes the socket delivered), or a
//! segment of a vhost-user guest's memory (so data moves between the guest
//! and the NVMe/TCP socket without a copy). Such a buffer keeps its
//! [`BufOwner`] alive and hands the memory back to it when dropped. Its
//! alignment is whatever the owner gives; [`IoBuf::is_aligned`] tells.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every [`IoBuf`] allocated by [`IoBuf::new`].
pub const IOBUF_ALIGN: usize = 4096;

/// The owner of memory an [`IoBuf`] borrows (see [`IoBuf::from_owner`]).
pub trait BufOwner: Send + Sync {
    /// Called exactly once, when the buffer made from `ptr`/`cap` is dropped;
    /// the memory is the owner's again. The default keeps nothing to return
    /// (the buffer only kept the owner alive).
    fn release(&self, _ptr: NonNull<u8>, _cap: usize) {}
}

/// An owned byte buffer: zero-initialised and 4 KiB-aligned on the heap, or
/// borrowed from a [`BufOwner`].
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    /// `None`: a heap allocation of `layout(cap)` this buffer frees.
    owner: Option<Arc<dyn BufOwner>>,
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
        IoBuf {
            ptr,
            cap,
            len,
            owner: None,
        }
    }

    /// A buffer of `cap` bytes at `ptr` that belongs to `owner`; its length
    /// starts at `cap`. When the buffer is dropped, `owner.release(ptr, cap)`
    /// is called and the owner (an `Arc`) is dropped.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `cap` initialised bytes
    /// until `owner.release` is called for it (keeping `owner` alive must be
    /// enough to keep the memory mapped), and no other `IoBuf` or reference
    /// may use those bytes meanwhile — except a peer that shares the memory
    /// by design (a guest), whose concurrent writes can only change the
    /// bytes' values.
    pub unsafe fn from_owner(ptr: NonNull<u8>, cap: usize, owner: Arc<dyn BufOwner>) -> Self {
        IoBuf {
            ptr,
            cap,
            len: cap,
            owner: Some(owner),
        }
    }

    /// The owner of the memory, for a buffer made by [`IoBuf::from_owner`].
    /// A backend recognises its own memory with [`Arc::ptr_eq`] or by
    /// address range.
    pub fn owner(&self) -> Option<&Arc<dyn BufOwner>> {
        self.owner.as_ref()
    }

    /// Whether the buffer starts on an [`IOBUF_ALIGN`] boundary (always so
    /// for [`IoBuf::new`]).
    pub fn is_aligned(&self) -> bool {
        (self.ptr.as_ptr() as usize).is_multiple_of(IOBUF_ALIGN)
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
        // SAFETY: ptr is valid for `cap` initialised bytes (allocated zeroed, or promised by `from_owner`'s caller), len <= cap, and the borrow of self keeps the memory alive.
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
        match self.owner.take() {
            Some(owner) => owner.release(self.ptr, self.cap),
            // SAFETY: without an owner, ptr was allocated in `new` with exactly this layout and is freed only here, once.
            None => unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) },
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("borrowed", &self.owner.is_some())
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
        assert!(c.owner().is_none());
    }

    struct Counting {
        released: std::sync::Mutex<Vec<(usize, usize)>>,
    }

    impl BufOwner for Counting {
        fn release(&self, ptr: NonNull<u8>, cap: usize) {
            self.released
                .lock()
                .unwrap()
                .push((ptr.as_ptr() as usize, cap));
        }
    }

    #[test]
    fn borrowed_buffer_uses_the_owners_memory_and_returns_it_once() {
        let mut backing = vec![0u8; 8192];
        let owner = Arc::new(Counting {
            released: Default::default(),
        });
        let base = NonNull::new(backing[100..].as_mut_ptr()).unwrap();
        // SAFETY: `backing` outlives the buffer (dropped below before it) and nothing else touches bytes 100..4196 meanwhile.
        let mut b = unsafe { IoBuf::from_owner(base, 4096, owner.clone()) };
        assert_eq!(b.len(), 4096);
        assert!(!b.is_aligned());
        assert!(b.owner().is_some());
        b[..3].copy_from_slice(b"abc");
        b.set_len(10);
        let copy = b.clone();
        assert!(copy.owner().is_none() && copy.is_aligned());
        drop(b);
        assert_eq!(&backing[100..103], b"abc");
        assert_eq!(
            *owner.released.lock().unwrap(),
            vec![(base.as_ptr() as usize, 4096)]
        );
    }
}
