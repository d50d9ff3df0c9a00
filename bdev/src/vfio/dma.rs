//! DMA memory for the VFIO NVMe driver: pinned regions mapped into the
//! IOMMU, a page allocator over a queue's data arena, and PRP lists (NVMe
//! Base 2.0 §4.1.1 "Physical Region Page Entry and List").
//!
//! A region is one virtually contiguous mapping (2 MiB hugepages when the
//! system has them, else anonymous memory, locked) mapped at one IOVA range,
//! so it is contiguous for the device whatever the physical pages are; the
//! IOMMU mapping pins it.

use std::sync::Arc;

use super::sys::Container;
use super::Error;

/// The page size of the driver: CC.MPS = 0 (4 KiB).
pub(crate) const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;
/// PRP entries in one list page.
pub(crate) const PRPS_PER_PAGE: usize = PAGE / 8;

/// A pinned, IOMMU-mapped, zeroed memory region.
#[derive(Debug)]
pub(crate) struct DmaRegion {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    iova: u64,
    container: Arc<Container>,
}

// SAFETY: the region is plain memory owned by this value; the raw pointer is only used through `&self`/`&mut self` methods, like a Box<[u8]>.
unsafe impl Send for DmaRegion {}
// SAFETY: `&DmaRegion` gives out only raw pointers/addresses; reads and writes through them are done by the single owner of each part (a queue).
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
        let iova = match container.map_dma(ptr.as_ptr(), len) {
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
            container: container.clone(),
        })
    }

    /// IOVA of byte `off`.
    pub fn iova(&self, off: usize) -> u64 {
        self.iova + off as u64
    }

    /// The bytes `off..off+len` (checked) as a slice, for copies in and out.
    ///
    /// The caller must own that part of the region (no device access in
    /// flight to it), which the queue guarantees by slot ownership.
    pub fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "DMA region range out of bounds"
        );
        // SAFETY: the range lies inside the mapping (checked above), the memory is initialised (zeroed by mmap), and `&mut self` excludes other Rust accesses for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl DmaRegion {
    /// The bytes `off..off+len` (checked) as a shared slice, for copying out
    /// data the device has finished writing (a completed command's pages).
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "DMA region range out of bounds"
        );
        // SAFETY: in bounds (checked), initialised, and the caller reads only memory no device command in flight targets, so nothing writes it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// Volatile read of the aligned 32-bit word at `off` (checked): CQE
    /// dwords, which the device writes behind the compiler's back.
    pub fn read_volatile_u32(&self, off: usize) -> u32 {
        assert!(
            off.is_multiple_of(4) && off.checked_add(4).is_some_and(|e| e <= self.len),
            "DMA region word out of bounds"
        );
        // SAFETY: 4-aligned and inside the mapping (checked); a volatile read is sound even while the device writes the word.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        self.container.unmap_dma(self.iova, self.len);
        unmap(self.ptr, self.len);
    }
}

fn anon_map(len: usize, huge: bool) -> Option<std::ptr::NonNull<u8>> {
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
    std::ptr::NonNull::new(p.cast())
}

fn lock(ptr: std::ptr::NonNull<u8>, len: usize) {
    // SAFETY: ptr/len describe a mapping we own; mlock changes no memory.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
        // The IOMMU mapping pins the pages anyway; mlock only keeps them
        // resident before that, so a low RLIMIT_MEMLOCK is not fatal here.
        tracing::debug!(error = %std::io::Error::last_os_error(), "mlock of DMA memory failed");
    }
}

fn unmap(ptr: std::ptr::NonNull<u8>, len: usize) {
    // SAFETY: ptr/len are exactly a mapping made by `anon_map`, unmapped once.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
}

/// Fills the data pointer of a command moving `len` bytes through `pages`
/// (IOVAs of 4 KiB pages, page-aligned, in transfer order) and returns
/// `(prp1, prp2)`.
///
/// One page: PRP2 unused (0). Two pages: PRP2 is the second page. More:
/// PRP2 points at `list` (whose IOVA is `list_iova`), which receives the
/// second and following pages. A list of one page is enough for the
/// transfers this driver allows (`PRPS_PER_PAGE + 1` pages, 2 MiB + 4 KiB);
/// longer transfers are refused rather than chained.
pub(crate) fn build_prps(
    pages: &[u64],
    len: usize,
    list: &mut [u64],
    list_iova: u64,
) -> Result<(u64, u64), PrpError> {
    let n = len.div_ceil(PAGE);
    if n == 0 || pages.len() < n {
        return Err(PrpError::NotEnoughPages);
    }
    if pages[..n].iter().any(|p| !p.is_multiple_of(PAGE as u64)) || !list_iova.is_multiple_of(8) {
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
            build_prps(&[0x1200], 100, &mut list, 0x9000),
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
}
