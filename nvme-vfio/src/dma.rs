//! DMA memory for the VFIO NVMe driver: pinned regions mapped into the
//! IOMMU, a page allocator over a queue's data arena, a device-wide pool of
//! data buffers for the zero-copy path ([`DmaPool`]), and PRP lists (NVMe
//! Base 2.0 §4.1.1 "Physical Region Page Entry and List").
//!
//! A region is one virtually contiguous mapping (2 MiB hugepages when the
//! system has them, else anonymous memory, locked) mapped at one IOVA range,
//! so it is contiguous for the device whatever the physical pages are; the
//! IOMMU mapping pins it. A queue's arena pages are scattered, so PRPs are
//! built from a page list; a pool buffer is one contiguous IOVA range, so
//! its PRPs follow from its start address ([`contiguous_pages`]).
//!
//! The memory the device reads and writes is reached only through
//! [`DmaRegion`]'s volatile accessors (copies in and out, single words),
//! never as a `&[u8]`: the device may change it at any moment.
//!
//! The pool is per device rather than per queue: its buffers are handed to
//! the NVMe/TCP target, which may drop them on any thread, and a device's
//! queues all see the same IOMMU space, so one bounded pool
//! ([`VfioOptions::dma_pool_size`](crate::VfioOptions::dma_pool_size),
//! default 64 MiB; `0` disables zero-copy) serves
//! every namespace and reactor with lock-free free lists, and its memory
//! is taken only when a queue first asks for a buffer.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;

use super::sys::Container;
use super::Error;
use unvme_bdev::{BufOwner, IoBuf};

/// The page size of the driver: CC.MPS = 0 (4 KiB).
pub(crate) const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;
/// PRP entries in one list page.
pub(crate) const PRPS_PER_PAGE: usize = PAGE / 8;

/// A pinned, IOMMU-mapped, zeroed memory region.
#[derive(Debug)]
pub(crate) struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    iova: u64,
    /// `None` only for test regions that no IOMMU maps.
    container: Option<Arc<Container>>,
}

// SAFETY: the region is plain memory owned by this value; the raw pointer is only used through `&self`/`&mut self` methods, like a Box<[u8]>.
unsafe impl Send for DmaRegion {}
// SAFETY: through `&DmaRegion` the memory is only read (bounds-checked copies out and volatile words, which tolerate concurrent device writes) or handed out as addresses (pool buffers, each owned by one `IoBuf`); every write in this module needs `&mut DmaRegion`.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Allocates `len` bytes (rounded up to 4 KiB; to 2 MiB when hugepages
    /// are used) and maps them into the IOMMU.
    pub fn new(container: &Arc<Container>, len: usize) -> Result<Self, Error> {
        let len = len.max(PAGE).next_multiple_of(PAGE);
        let (ptr, len, huge) = match anon_map(len.next_multiple_of(HUGE_PAGE), true) {
            Some(p) => (p, len.next_multiple_of(HUGE_PAGE), true),
            None => (
                anon_map(len, false).ok_or_else(|| {
                    Error::Dma(format!(
                        "cannot allocate {len} bytes: {}",
                        std::io::Error::last_os_error()
                    ))
                })?,
                len,
                false,
            ),
        };
        if !huge {
            lock(ptr, len);
        }
        // SAFETY: `ptr..ptr+len` is a mapping of ours that stays mapped until `Drop`, which unmaps it from the IOMMU (`unmap_dma`) before unmapping it from the process.
        let iova = match unsafe { container.map_dma(ptr.as_ptr(), len) } {
            Ok(iova) => iova,
            Err(e) => {
                unmap(ptr, len);
                return Err(e);
            }
        };
        tracing::debug!(len, iova, huge, "DMA region mapped");
        Ok(DmaRegion {
            ptr,
            len,
            iova,
            container: Some(container.clone()),
        })
    }

    /// Plain anonymous memory posing as DMA memory at IOVA `iova`, mapped
    /// into no IOMMU: for unit tests of what is built on regions.
    #[cfg(test)]
    pub fn unmapped(len: usize, iova: u64) -> Self {
        let len = len.max(PAGE).next_multiple_of(PAGE);
        let ptr = anon_map(len, false).expect("anonymous test mapping");
        DmaRegion {
            ptr,
            len,
            iova,
            container: None,
        }
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Pointer to byte `off`, checked that `off..off+len` lies inside.
    fn ptr_at(&self, off: usize, len: usize) -> NonNull<u8> {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "DMA region range out of bounds"
        );
        NonNull::new(self.ptr.as_ptr().wrapping_add(off)).expect("inside a non-null mapping")
    }

    /// IOVA of byte `off`.
    pub fn iova(&self, off: usize) -> u64 {
        self.iova + off as u64
    }

    /// Asserts that `off..off+len` lies inside the region.
    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "DMA region range out of bounds"
        );
    }

    /// Copies `src` into the region at `off` (checked): write data, SQEs,
    /// PRP lists, DSM range lists. `&mut self` keeps other writers of this
    /// program out; the caller owns that part of the region (no device
    /// command in flight reads it), which the queue guarantees by slot
    /// ownership.
    pub fn write_slice(&mut self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: the destination lies inside the live mapping (checked above), which no Rust reference covers, so it cannot overlap `src`.
        unsafe { copy_to_dma(self.ptr.as_ptr().add(off), src) }
    }

    /// Copies the region's bytes at `off` (checked) into `dst`: read data
    /// and Identify pages of completed commands, which the device no longer
    /// writes.
    pub fn read_slice(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: the source lies inside the live mapping (checked above), which no Rust reference covers, so it cannot overlap `dst`.
        unsafe { copy_from_dma(self.ptr.as_ptr().add(off), dst) }
    }

    /// Sets `len` bytes at `off` (checked) to zero: a completion queue
    /// before the device is given it, the admin data page.
    pub fn zero(&mut self, off: usize, len: usize) {
        self.check(off, len);
        // SAFETY: inside the live mapping (checked above); byte writes have no alignment needs.
        unsafe { zero_dma(self.ptr.as_ptr().add(off), len) }
    }

    /// Volatile read of the aligned little-endian 32-bit word at `off`
    /// (checked): CQE dwords, which the device writes behind the
    /// compiler's back.
    pub fn read_u32(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4), "DMA region word misaligned");
        self.check(off, 4);
        // SAFETY: 4-aligned (the mapping is page-aligned and `off` is a multiple of 4) and inside the mapping (checked).
        u32::from_le(unsafe { read_dma_u32(self.ptr.as_ptr().add(off).cast()) })
    }

    /// Volatile write of the aligned little-endian 64-bit word at `off`
    /// (checked): PRP list entries.
    pub fn write_u64(&mut self, off: usize, v: u64) {
        assert!(off.is_multiple_of(8), "DMA region word misaligned");
        self.check(off, 8);
        // SAFETY: 8-aligned (the mapping is page-aligned and `off` is a multiple of 8) and inside the mapping (checked).
        unsafe { write_dma_u64(self.ptr.as_ptr().add(off).cast(), v.to_le()) }
    }
}

// The accesses to device-visible memory, after vm-memory's
// `volatile_memory.rs`: the memory is never seen as a Rust slice (the
// device may write it at any time, which a `&[u8]` would forbid); single
// words are read and written volatile, blocks copied with
// `copy_nonoverlapping` into or out of ordinary memory.

/// Copies `src` to `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and must not overlap
/// `src`.
unsafe fn copy_to_dma(dst: *mut u8, src: &[u8]) {
    // SAFETY: the caller guarantees `dst` is writable for `src.len()` bytes and disjoint from `src`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
}

/// Copies `dst.len()` bytes from `src` into `dst`.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes and must not overlap
/// `dst`.
unsafe fn copy_from_dma(src: *const u8, dst: &mut [u8]) {
    // SAFETY: the caller guarantees `src` is readable for `dst.len()` bytes and disjoint from `dst`.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
}

/// Writes `len` zero bytes at `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn zero_dma(dst: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `dst` is writable for `len` bytes.
    unsafe { std::ptr::write_bytes(dst, 0, len) }
}

/// Volatile read of the `u32` at `src`.
///
/// # Safety
/// `src` must be valid for reads and 4-byte aligned.
unsafe fn read_dma_u32(src: *const u32) -> u32 {
    // SAFETY: the caller guarantees a valid, aligned `src`; a volatile read is sound while the device writes the word.
    unsafe { std::ptr::read_volatile(src) }
}

/// Volatile write of `v` at `dst`.
///
/// # Safety
/// `dst` must be valid for writes and 8-byte aligned.
unsafe fn write_dma_u64(dst: *mut u64, v: u64) {
    // SAFETY: the caller guarantees a valid, aligned `dst`.
    unsafe { std::ptr::write_volatile(dst, v) }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            c.unmap_dma(self.iova, self.len);
        }
        unmap(self.ptr, self.len);
    }
}

fn anon_map(len: usize, huge: bool) -> Option<NonNull<u8>> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | libc::MAP_POPULATE
        | if huge { libc::MAP_HUGETLB } else { 0 };
    // SAFETY: a fresh anonymous private mapping; it aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    NonNull::new(p.cast())
}

fn lock(ptr: NonNull<u8>, len: usize) {
    // SAFETY: ptr/len describe a mapping we own; mlock changes no memory.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
        // The IOMMU mapping pins the pages anyway; mlock only keeps them
        // resident before that, so a low RLIMIT_MEMLOCK is not fatal here.
        tracing::debug!(error = %std::io::Error::last_os_error(), "mlock of DMA memory failed");
    }
}

fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: ptr/len are exactly a mapping made by `anon_map`, unmapped once.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
}

/// Fills the data pointer of a command moving `len` bytes through `pages`
/// (IOVAs in transfer order) and returns `(prp1, prp2)`.
///
/// The first entry may start anywhere in its page on a dword boundary (PRP1
/// may carry an offset); every later one must start a page. One page: PRP2
/// unused (0). Two pages: PRP2 is the second page. More: PRP2 points at
/// `list` (whose IOVA is `list_iova`), which receives the second and
/// following pages. A list of one page is enough for the transfers this
/// driver allows (`PRPS_PER_PAGE + 1` pages: 2 MiB from a page boundary,
/// or 2 MiB − 4 KiB from any offset); longer transfers are refused rather
/// than chained.
pub(crate) fn build_prps(
    pages: &[u64],
    len: usize,
    list: &mut [u64],
    list_iova: u64,
) -> Result<(u64, u64), PrpError> {
    let first_off = pages.first().map_or(0, |p| (p % PAGE as u64) as usize);
    let n = (first_off + len).div_ceil(PAGE);
    if len == 0 || pages.len() < n {
        return Err(PrpError::NotEnoughPages);
    }
    if !pages[0].is_multiple_of(4)
        || pages[1..n].iter().any(|p| !p.is_multiple_of(PAGE as u64))
        || !list_iova.is_multiple_of(8)
    {
        return Err(PrpError::Misaligned);
    }
    match n {
        1 => Ok((pages[0], 0)),
        2 => Ok((pages[0], pages[1])),
        _ if n - 1 > list.len().min(PRPS_PER_PAGE) => Err(PrpError::TooLong),
        _ => {
            for (slot, page) in list.iter_mut().zip(&pages[1..n]) {
                *slot = page.to_le();
            }
            Ok((pages[0], list_iova))
        }
    }
}

/// The PRP entries of `len` bytes of IOVA-contiguous memory starting at
/// `iova` (anywhere in a page) for [`build_prps`]: `iova` itself, then the
/// start of every further page the range touches. Fills as much of `out` as
/// the range needs and returns that count (which may exceed `out.len()`;
/// [`build_prps`] then refuses the short list).
pub(crate) fn contiguous_pages(iova: u64, len: usize, out: &mut [u64]) -> usize {
    let page0 = iova & !(PAGE as u64 - 1);
    let n = ((iova - page0) as usize + len).div_ceil(PAGE);
    for (i, e) in out.iter_mut().take(n).enumerate() {
        *e = if i == 0 {
            iova
        } else {
            page0 + (i * PAGE) as u64
        };
    }
    n
}

/// Why a PRP list could not be built (a driver bug, never device data).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PrpError {
    NotEnoughPages,
    Misaligned,
    TooLong,
}

/// A fixed set of 4 KiB pages (a queue's data arena) handed out one by one;
/// bounded, allocation-free after construction.
#[derive(Debug)]
pub(crate) struct PagePool {
    free: Vec<u32>,
}

impl PagePool {
    /// A pool of pages `0..n`.
    pub fn new(n: usize) -> Self {
        PagePool {
            free: (0..n as u32).rev().collect(),
        }
    }

    /// Free pages.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Moves `n` page indexes into `out`, or none if fewer are free.
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) -> bool {
        if self.free.len() < n {
            return false;
        }
        let at = self.free.len() - n;
        out.extend(self.free.drain(at..));
        true
    }

    /// Returns the pages in `pages` (emptied).
    pub fn give(&mut self, pages: &mut Vec<u32>) {
        self.free.append(pages);
    }
}

/// What a [`DmaPool`] needs of the device its memory serves.
pub(crate) trait PoolDevice: Send + Sync {
    /// Allocates `len` bytes of DMA memory mapped for the device (once per
    /// pool, at its first allocation).
    fn map_region(&self, len: usize) -> Result<DmaRegion, Error>;
    /// The device stopped in an unknown state (fatal status, gone, an admin
    /// command timed out): it may still write memory of commands that will
    /// never complete, so buffers released now must not be reused.
    fn failed(&self) -> bool;
}

/// Size class of a `len`-byte buffer: `PAGE << class` bytes.
pub(crate) fn class_of(len: usize) -> usize {
    len.div_ceil(PAGE)
        .max(1)
        .next_power_of_two()
        .trailing_zeros() as usize
}

/// A device's pool of DMA data buffers, handed out as [`IoBuf`]s that
/// borrow its memory, so the SSD reads write data from — and writes read
/// data to — the very bytes the NVMe/TCP socket fills or sends.
///
/// One pool per controller, shared by all its queues (every namespace and
/// reactor): the memory is the IOMMU's, not a queue's, so a buffer taken
/// on one queue may be submitted on another of the same device and dropped
/// on any thread. The memory is one region (hugepages when the system has
/// them, else locked anonymous memory, as every [`DmaRegion`]), mapped at
/// the first allocation and bounded by the size given at creation: a deep
/// queue can drain it, and then [`DmaPool::alloc`] answers `None` and the
/// caller's own buffers take the copy path. Nothing depends on the pool.
///
/// Buffers come in power-of-two size classes from 4 KiB up to the largest
/// request. Each class has a lock-free bounded free list (an MPMC
/// [`ArrayQueue`]: one compare-and-swap to take, one to give back, from any
/// thread). A class with no free buffer cuts a new one from the part of the
/// region not yet carved (a compare-and-swap on the carve offset). Carved
/// memory stays in its class, so each class holds at most as many bytes as
/// its peak of buffers in use; the region runs out only if the peaks of all
/// classes together exceed it. That trades the splitting and merging of a
/// buddy allocator (which would need a lock) for some memory kept in a
/// class the load has moved away from.
///
/// Buffers keep whatever bytes they last held (reused, never re-zeroed):
/// the caller fills a buffer before a write and the device before a read.
/// While [`PoolDevice::failed`] says so, or once [`DmaPool::poison`] was
/// called, released buffers stay out of circulation: the device may still
/// write them. The region goes back to the IOMMU (unmapped) when the pool
/// is dropped, after the last queue and buffer that reference it.
pub(crate) struct DmaPool {
    /// Set up at the first allocation; `None` inside if that failed.
    arena: OnceLock<Option<Arena>>,
    size: usize,
    classes: usize,
    /// Set when memory of the pool may still be written by the device for
    /// commands nobody waits for any more (a queue could not be deleted).
    poisoned: AtomicBool,
    // After `arena`: the region is unmapped before the device goes.
    dev: Arc<dyn PoolDevice>,
}

struct Arena {
    region: DmaRegion,
    /// Bytes of the region cut into buffers so far.
    carved: AtomicUsize,
    /// Free buffers of class `c` (`PAGE << c` bytes), as page indexes.
    free: Vec<ArrayQueue<u32>>,
}

impl std::fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaPool")
            .field("size", &self.size)
            .field("carved", &self.carved())
            .finish_non_exhaustive()
    }
}

impl DmaPool {
    /// A pool of up to `size` bytes (0: none, every allocation fails) for
    /// buffers up to `max_buf` bytes. No memory is taken until the first
    /// [`DmaPool::alloc`].
    pub fn new(dev: Arc<dyn PoolDevice>, size: usize, max_buf: usize) -> Arc<Self> {
        Arc::new(DmaPool {
            arena: OnceLock::new(),
            size,
            classes: class_of(max_buf) + 1,
            poisoned: AtomicBool::new(false),
            dev,
        })
    }

    fn arena(&self) -> Option<&Arena> {
        self.arena
            .get_or_init(|| {
                if self.size == 0 {
                    return None;
                }
                match self.dev.map_region(self.size) {
                    Ok(region) => {
                        tracing::info!(
                            bytes = region.len(),
                            "VFIO DMA buffer pool mapped (zero-copy data path)"
                        );
                        let free = (0..self.classes)
                            .map(|c| ArrayQueue::new((region.len() / (PAGE << c)).max(1)))
                            .collect();
                        Some(Arena {
                            region,
                            carved: AtomicUsize::new(0),
                            free,
                        })
                    }
                    Err(e) => {
                        tracing::warn!("no VFIO DMA buffer pool, data is copied: {e}");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Memory must not be handed out or recycled.
    fn unusable(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed) || self.dev.failed()
    }

    /// A buffer of at least `len` bytes (its capacity is the size class,
    /// its length `len`), or `None` when `len` is 0 or above the largest
    /// class, or the pool is used up, failed or was never mapped.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        let c = class_of(len);
        if len == 0 || c >= self.classes || self.unusable() {
            return None;
        }
        let arena = self.arena()?;
        let size = PAGE << c;
        let off = match arena.free[c].pop() {
            Some(page) => page as usize * PAGE,
            None => arena.carve(size)?,
        };
        let ptr = arena.region.ptr_at(off, size);
        let owner: Arc<dyn BufOwner> = self.clone();
        // SAFETY: ptr..ptr+size lies inside the region (carved there, checked by ptr_at) and is initialised (zeroed by mmap, then only written); the region lives as long as the pool, which the buffer keeps alive through `owner`; the range was just popped from the free list or freshly carved, so no other buffer has it until `release` puts it back, and the device touches it only while a queue holds the buffer.
        let mut buf = unsafe { IoBuf::from_owner(ptr, size, owner) };
        buf.set_len(len);
        Some(buf)
    }

    /// IOVA of `buf`'s first byte if `buf` is memory of this pool (by owner
    /// identity, then address range), else `None` (a heap buffer, another
    /// device's, a guest's).
    pub fn iova_of(&self, buf: &IoBuf) -> Option<u64> {
        let owner = buf.owner()?;
        if !std::ptr::addr_eq(Arc::as_ptr(owner), self as *const Self) {
            return None;
        }
        let region = &self.arena.get()?.as_ref()?.region;
        let off = (buf.as_ptr() as usize).checked_sub(region.ptr.as_ptr() as usize)?;
        (off.checked_add(buf.capacity())? <= region.len).then(|| region.iova(off))
    }

    /// Buffers released from now on are never reused: the device may still
    /// write them (a queue with commands in flight could not be deleted).
    pub fn poison(&self) {
        if !self.poisoned.swap(true, Ordering::Relaxed) {
            tracing::warn!("VFIO DMA buffer pool retired: released buffers are no longer reused");
        }
    }

    /// Bytes carved into buffers so far.
    pub fn carved(&self) -> usize {
        match self.arena.get() {
            Some(Some(a)) => a.carved.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

impl Arena {
    /// Cuts `size` bytes off the uncarved end of the region.
    fn carve(&self, size: usize) -> Option<usize> {
        let mut cur = self.carved.load(Ordering::Relaxed);
        loop {
            let end = cur.checked_add(size).filter(|&e| e <= self.region.len)?;
            match self
                .carved
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(cur),
                Err(now) => cur = now,
            }
        }
    }
}

impl BufOwner for DmaPool {
    fn release(&self, ptr: NonNull<u8>, cap: usize) {
        if self.unusable() {
            return;
        }
        let Some(Some(arena)) = self.arena.get() else {
            return;
        };
        let off = (ptr.as_ptr() as usize).wrapping_sub(arena.region.ptr.as_ptr() as usize);
        let c = class_of(cap);
        if off >= arena.region.len || PAGE << c != cap || c >= arena.free.len() {
            tracing::error!(
                cap,
                "memory released to a DMA pool it does not belong to; ignored"
            );
            return;
        }
        // Cannot be full: a class never has more than region/size buffers.
        // push/pop are release/acquire, so this thread's (and the device's,
        // seen through the CQE) writes happen before the next taker's use.
        let _ = arena.free[c].push((off / PAGE) as u32);
    }
}

/// A [`PoolDevice`] without hardware: regions of plain memory at made-up
/// IOVAs, and a failure switch.
#[cfg(test)]
pub(crate) struct FakeDevice {
    pub iova: u64,
    pub failed: AtomicBool,
    pub unmappable: bool,
}

#[cfg(test)]
impl FakeDevice {
    pub fn new(iova: u64) -> Arc<Self> {
        Arc::new(FakeDevice {
            iova,
            failed: AtomicBool::new(false),
            unmappable: false,
        })
    }
}

#[cfg(test)]
impl PoolDevice for FakeDevice {
    fn map_region(&self, len: usize) -> Result<DmaRegion, Error> {
        if self.unmappable {
            return Err(Error::Dma("no memory (test)".into()));
        }
        Ok(DmaRegion::unmapped(len, self.iova))
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| 0x1_0000_0000 + i * 0x3000).collect()
    }

    #[test]
    fn prp_one_page_uses_prp1_only() {
        let mut list = [0u64; PRPS_PER_PAGE];
        assert_eq!(
            build_prps(&pages(1), 512, &mut list, 0x9000),
            Ok((0x1_0000_0000, 0))
        );
        assert_eq!(
            build_prps(&pages(4), 4096, &mut list, 0x9000),
            Ok((0x1_0000_0000, 0))
        );
        assert!(list.iter().all(|&e| e == 0));
    }

    #[test]
    fn prp_two_pages_put_the_second_in_prp2() {
        let mut list = [0u64; PRPS_PER_PAGE];
        assert_eq!(
            build_prps(&pages(2), 4097, &mut list, 0x9000),
            Ok((0x1_0000_0000, 0x1_0000_3000))
        );
        assert!(list.iter().all(|&e| e == 0));
    }

    #[test]
    fn prp_more_pages_go_through_the_list() {
        let mut list = [0u64; PRPS_PER_PAGE];
        let p = pages(PRPS_PER_PAGE + 1);
        let (prp1, prp2) = build_prps(&p, (PRPS_PER_PAGE + 1) * PAGE, &mut list, 0x9000).unwrap();
        assert_eq!((prp1, prp2), (p[0], 0x9000));
        assert_eq!(&list[..], &p[1..]);
        let mut list = [0u64; PRPS_PER_PAGE];
        let (_, prp2) = build_prps(&p, 3 * PAGE - 1, &mut list, 0x9000).unwrap();
        assert_eq!(prp2, 0x9000);
        assert_eq!(&list[..2], &p[1..3]);
        assert!(list[2..].iter().all(|&e| e == 0));
    }

    #[test]
    fn prp_refuses_short_page_lists_misalignment_and_overlong_transfers() {
        let mut list = [0u64; PRPS_PER_PAGE];
        assert_eq!(
            build_prps(&pages(2), 3 * PAGE, &mut list, 0x9000),
            Err(PrpError::NotEnoughPages)
        );
        assert_eq!(
            build_prps(&pages(1), 0, &mut list, 0x9000),
            Err(PrpError::NotEnoughPages)
        );
        assert_eq!(
            build_prps(&[0x1202], 100, &mut list, 0x9000),
            Err(PrpError::Misaligned)
        );
        assert_eq!(
            build_prps(&[0x1000, 0x2200], 8192, &mut list, 0x9000),
            Err(PrpError::Misaligned)
        );
        let p = pages(PRPS_PER_PAGE + 2);
        assert_eq!(
            build_prps(&p, p.len() * PAGE, &mut list, 0x9000),
            Err(PrpError::TooLong)
        );
    }

    #[test]
    fn page_pool_hands_out_all_or_nothing_and_takes_back() {
        let mut pool = PagePool::new(4);
        let mut a = Vec::new();
        assert!(pool.take(3, &mut a));
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        assert!(!pool.take(2, &mut b));
        assert!(b.is_empty());
        pool.give(&mut a);
        assert!(a.is_empty());
        assert_eq!(pool.available(), 4);
        assert!(pool.take(4, &mut b));
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }

    #[test]
    fn prp_first_entry_may_start_inside_a_page() {
        let mut list = [0u64; PRPS_PER_PAGE];
        let mut pages = [0u64; PRPS_PER_PAGE + 2];
        // 8 KiB from 0x200 into a page touch three pages: PRP1 keeps the
        // offset, the list holds the next two page starts.
        let iova = 0x1_0000_0200;
        assert_eq!(contiguous_pages(iova, 8192, &mut pages), 3);
        assert_eq!(&pages[..3], &[iova, 0x1_0000_1000, 0x1_0000_2000]);
        assert_eq!(
            build_prps(&pages[..3], 8192, &mut list, 0x9000),
            Ok((iova, 0x9000))
        );
        assert_eq!(&list[..2], &[0x1_0000_1000, 0x1_0000_2000]);
        // Up to the end of its page: one entry; one byte more: two.
        assert_eq!(contiguous_pages(iova, 4096 - 0x200, &mut pages), 1);
        assert_eq!(
            build_prps(&pages[..1], 4096 - 0x200, &mut list, 0x9000),
            Ok((iova, 0))
        );
        assert_eq!(contiguous_pages(iova, 4096 - 0x1ff, &mut pages), 2);
        assert_eq!(
            build_prps(&pages[..2], 4096 - 0x1ff, &mut list, 0x9000),
            Ok((iova, 0x1_0000_1000))
        );
        // A dword offset is enough for PRP1.
        assert_eq!(contiguous_pages(0x5004, 512, &mut pages), 1);
        assert_eq!(
            build_prps(&pages[..1], 512, &mut list, 0x9000),
            Ok((0x5004, 0))
        );
    }

    #[test]
    fn prp_list_of_one_page_covers_the_driver_limit_from_any_offset() {
        let max = PRPS_PER_PAGE * PAGE; // DRIVER_MAX_TRANSFER
        let mut pages = vec![0u64; PRPS_PER_PAGE + 2];
        let mut list = [0u64; PRPS_PER_PAGE];
        // Page-aligned: 512 pages, 511 in the list.
        let n = contiguous_pages(0x4000_0000, max, &mut pages);
        assert_eq!(n, PRPS_PER_PAGE);
        assert!(build_prps(&pages[..n], max, &mut list, 0x9000).is_ok());
        // From an offset: 513 pages, a full list of 512.
        let n = contiguous_pages(0x4000_0800, max, &mut pages);
        assert_eq!(n, PRPS_PER_PAGE + 1);
        let (prp1, prp2) = build_prps(&pages[..n], max, &mut list, 0x9000).unwrap();
        assert_eq!((prp1, prp2), (0x4000_0800, 0x9000));
        assert_eq!(list[0], 0x4000_1000);
        assert_eq!(
            list[PRPS_PER_PAGE - 1],
            0x4000_0000 + (PRPS_PER_PAGE * PAGE) as u64
        );
        // One page more than a list holds is refused, not chained.
        let n = contiguous_pages(0x4000_0800, max + PAGE, &mut pages);
        assert_eq!(n, PRPS_PER_PAGE + 2);
        assert_eq!(
            build_prps(&pages[..n], max + PAGE, &mut list, 0x9000),
            Err(PrpError::TooLong)
        );
        // A scratch list too short for the range: the count says so and the
        // builder refuses the short slice.
        let mut short = [0u64; 2];
        let n = contiguous_pages(0x4000_0000, 3 * PAGE, &mut short);
        assert_eq!(n, 3);
        assert_eq!(
            build_prps(&short[..n.min(2)], 3 * PAGE, &mut list, 0x9000),
            Err(PrpError::NotEnoughPages)
        );
    }

    const BASE: u64 = 0x7_0000_0000;

    fn pool(size: usize, max_buf: usize) -> (Arc<FakeDevice>, Arc<DmaPool>) {
        let dev = FakeDevice::new(BASE);
        let pool = DmaPool::new(dev.clone(), size, max_buf);
        (dev, pool)
    }

    #[test]
    fn size_classes_round_up_to_powers_of_two_pages() {
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(4096), 0);
        assert_eq!(class_of(4097), 1);
        assert_eq!(class_of(12 << 10), 2);
        assert_eq!(class_of(1 << 20), 8);
        assert_eq!(class_of((1 << 20) + 1), 9);
        assert_eq!(class_of(4 << 20), 10);
    }

    #[test]
    fn pool_buffers_are_pool_memory_with_their_iova_and_are_reused() {
        let (_dev, pool) = pool(1 << 20, 512 << 10);
        assert_eq!(pool.carved(), 0, "no memory before the first allocation");
        let a = pool.alloc(5000).unwrap();
        assert_eq!((a.len(), a.capacity()), (5000, 8192));
        assert!(a.is_aligned());
        assert_eq!(pool.iova_of(&a), Some(BASE));
        let b = pool.alloc(4096).unwrap();
        assert_eq!(pool.iova_of(&b), Some(BASE + 8192));
        let big = pool.alloc(300 << 10).unwrap();
        assert_eq!(big.capacity(), 512 << 10);
        assert_eq!(pool.iova_of(&big), Some(BASE + 12288));
        assert_eq!(pool.carved(), 8192 + 4096 + (512 << 10));
        let a_ptr = a.as_ptr();
        drop(a);
        // Same class: the released buffer comes back, nothing new is carved.
        let c = pool.alloc(8192).unwrap();
        assert_eq!(c.as_ptr(), a_ptr);
        assert_eq!(pool.iova_of(&c), Some(BASE));
        assert_eq!(pool.carved(), 8192 + 4096 + (512 << 10));
    }

    #[test]
    fn pool_runs_dry_then_refills_and_refuses_what_it_cannot_hold() {
        let (_dev, pool) = pool(64 << 10, 1 << 20);
        let mut held: Vec<IoBuf> = (0..16).map(|_| pool.alloc(4096).unwrap()).collect();
        assert!(
            pool.alloc(4096).is_none(),
            "16 pages of 4 KiB exhaust 64 KiB"
        );
        assert!(
            pool.alloc(8192).is_none(),
            "carved memory stays in its class"
        );
        held.pop();
        assert!(pool.alloc(4096).is_some());
        assert!(pool.alloc(0).is_none());
        let (_dev, small) = self::pool(1 << 20, 64 << 10);
        assert!(
            small.alloc((64 << 10) + 1).is_none(),
            "above the largest class"
        );
        assert!(small.alloc(64 << 10).is_some());
        // A class larger than the whole pool never carves.
        let (_dev, tiny) = self::pool(16 << 10, 1 << 20);
        assert!(tiny.alloc(32 << 10).is_none());
        assert!(tiny.alloc(16 << 10).is_some());
    }

    #[test]
    fn no_pool_without_memory() {
        let (_dev, off) = pool(0, 1 << 20);
        assert!(off.alloc(4096).is_none());
        let dev = Arc::new(FakeDevice {
            iova: BASE,
            failed: AtomicBool::new(false),
            unmappable: true,
        });
        let p = DmaPool::new(dev, 1 << 20, 1 << 20);
        assert!(p.alloc(4096).is_none());
        assert!(p.alloc(4096).is_none(), "mapping is tried once");
        assert!(p.iova_of(&IoBuf::new(4096)).is_none());
    }

    #[test]
    fn foreign_buffers_are_told_apart_from_the_pools_own() {
        let (_dev, pool) = pool(1 << 20, 1 << 20);
        let (_dev2, other) = self::pool(1 << 20, 1 << 20);
        let own = pool.alloc(4096).unwrap();
        let theirs = other.alloc(4096).unwrap();
        assert_eq!(pool.iova_of(&own), Some(BASE));
        assert_eq!(other.iova_of(&theirs), Some(BASE));
        assert_eq!(pool.iova_of(&theirs), None, "another device's pool");
        assert_eq!(other.iova_of(&own), None);
        assert_eq!(pool.iova_of(&IoBuf::new(4096)), None, "heap buffer");
        // Borrowed memory of someone else (a guest's, say).
        struct Guest;
        impl BufOwner for Guest {}
        let mut mem = vec![0u8; 8192];
        let ptr = NonNull::new(mem.as_mut_ptr()).unwrap();
        // SAFETY: `mem` outlives the buffer (dropped at the end of the scope after it) and nothing else uses it meanwhile.
        let guest = unsafe { IoBuf::from_owner(ptr, 4096, Arc::new(Guest)) };
        assert_eq!(pool.iova_of(&guest), None);
        drop(guest);
        // The pool as owner, but memory outside its region: not trusted,
        // and not taken back on release.
        let owner: Arc<dyn BufOwner> = pool.clone();
        // SAFETY: as above; releasing it to the pool is a no-op because it lies outside the region.
        let fake = unsafe { IoBuf::from_owner(ptr, 4096, owner) };
        assert_eq!(pool.iova_of(&fake), None);
        let carved = pool.carved();
        drop(fake);
        let again = pool.alloc(4096).unwrap();
        assert_ne!(again.as_ptr(), ptr.as_ptr().cast_const());
        assert_eq!(pool.carved(), carved + 4096);
    }

    #[test]
    fn a_failed_device_gets_no_buffers_and_its_released_ones_stay_out() {
        let (dev, pool) = pool(1 << 20, 1 << 20);
        let a = pool.alloc(4096).unwrap();
        dev.failed.store(true, Ordering::Relaxed);
        assert!(pool.alloc(4096).is_none());
        drop(a); // the device might still write it: not recycled
        dev.failed.store(false, Ordering::Relaxed);
        let b = pool.alloc(4096).unwrap();
        assert_eq!(
            pool.iova_of(&b),
            Some(BASE + 4096),
            "a fresh buffer, not the released one"
        );
        pool.poison();
        assert!(pool.alloc(4096).is_none());
        drop(b);
        assert_eq!(pool.carved(), 8192);
    }

    #[test]
    fn buffers_taken_and_released_on_many_threads_never_overlap() {
        let (_dev, pool) = pool(256 << 10, 64 << 10);
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let mut got = 0;
                    for i in 0..2000usize {
                        let len = 4096 << (i % 3);
                        let Some(mut b) = pool.alloc(len) else {
                            continue;
                        };
                        got += 1;
                        b.fill(t);
                        std::thread::yield_now();
                        assert!(b.iter().all(|&x| x == t), "buffer shared between threads");
                        // Dropped here (or on another thread, below).
                        if i % 5 == 0 {
                            std::thread::spawn(move || drop(b)).join().unwrap();
                        }
                    }
                    got
                })
            })
            .collect();
        let got: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(got > 0);
        assert!(pool.carved() <= 256 << 10);
    }

    #[test]
    fn split_requests_on_pool_buffers_get_prps_for_their_own_part() {
        // A 1 MiB pool buffer sent as two 512 KiB commands (MDTS 512 KiB):
        // each command's PRPs cover its half of the buffer's IOVAs.
        let (_dev, pool) = pool(4 << 20, 4 << 20);
        let _before = pool.alloc(4096).unwrap(); // so the buffer is not at the region's start
        let buf = pool.alloc(1 << 20).unwrap();
        let base = pool.iova_of(&buf).unwrap();
        assert_eq!(base, BASE + 4096, "carved right after the 4 KiB buffer");
        let chunk = 512 << 10;
        let mut scratch = vec![0u64; chunk / PAGE + 1];
        for k in 0..2 {
            let mut list = [0u64; PRPS_PER_PAGE];
            let off = k * chunk;
            let n = contiguous_pages(base + off as u64, chunk, &mut scratch);
            assert_eq!(n, chunk / PAGE);
            let (prp1, prp2) = build_prps(&scratch[..n], chunk, &mut list, 0x9000).unwrap();
            assert_eq!((prp1, prp2), (base + off as u64, 0x9000));
            for (i, e) in list[..n - 1].iter().enumerate() {
                assert_eq!(*e, base + (off + (i + 1) * PAGE) as u64);
            }
        }
    }
}
