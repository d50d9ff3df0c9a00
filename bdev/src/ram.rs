//! The `ram` backend: a block device in anonymous memory.
//!
//! The device is one private anonymous mapping made with `MAP_NORESERVE`, so
//! a large device costs nothing until its blocks are written: untouched pages
//! read as zeroes from the kernel's zero page. Deallocate and WriteZeroes give
//! whole pages back with `madvise(MADV_DONTNEED)` (they read as zeroes again)
//! and zero only the partial pages at the edges. The mapping is unmapped when
//! the [`RamBdev`] and every queue opened on it are gone.
//!
//! Requests execute synchronously inside [`BdevQueue::submit`]; the completion
//! waits in the queue's preallocated completion list until
//! [`BdevQueue::poll`]. Nothing is allocated per request.
//!
//! # Concurrency
//!
//! Several queues, on several threads, access the memory at once. This module
//! treats the mapping the way `vm-memory` treats guest memory: as memory that
//! others may access concurrently, reached only through raw-pointer copies
//! (`ptr::copy_nonoverlapping`, `ptr::write_bytes`) of bounds-checked ranges.
//! No Rust reference (`&[u8]` / `&mut [u8]`) to the device memory is ever
//! created, so no aliasing guarantee is claimed that another thread could
//! break. Plain bytes have no invalid values, so whatever a racing copy
//! observes is a valid `u8`. Two overlapping commands in flight at the same
//! time therefore produce some interleaving of their data, which is exactly
//! what the NVMe specification allows (it defines no ordering between
//! overlapping outstanding commands; the host must serialise them if it cares)
//! and what a real disk does with concurrent DMA.

use std::io;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use crate::sync_queue::{IoResult, SyncBackend, SyncQueue};
use crate::{Bdev, BdevInfo, BdevQueue, Error, IoError, Result, DEFAULT_QUEUE_DEPTH};

/// Chunk size for Compare, which copies device memory to the stack before
/// comparing so that no reference to shared device memory exists.
const COMPARE_CHUNK: usize = 4096;

/// Most pages one block-status query reads from the page table (1 GiB of
/// 4 KiB pages; 2 MiB of page-table entries).
const STATUS_PAGES: usize = 1 << 18;

/// A private anonymous mapping of `len` bytes, unmapped on drop.
///
/// All access goes through the bounds-checked copy functions below; see the
/// module documentation for why concurrent access from several threads is
/// sound.
#[derive(Debug)]
struct RamMem {
    base: NonNull<u8>,
    len: usize,
    page_size: usize,
}

// SAFETY: RamMem owns its mapping; the pointer is never handed out and all access is by raw-pointer copies of checked ranges that are valid from any thread (the mapping is process-wide and lives until Drop).
unsafe impl Send for RamMem {}
// SAFETY: shared access only performs raw-pointer copies into and out of the mapping, never creates references to it; concurrent overlapping copies yield unordered but valid bytes, as argued in the module documentation.
unsafe impl Sync for RamMem {}

impl RamMem {
    /// Maps `len` bytes (`len > 0`) of zeroed, lazily committed memory.
    fn new(len: usize) -> Result<RamMem> {
        // SAFETY: sysconf only reads a system constant.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = usize::try_from(page_size)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        // SAFETY: an anonymous mapping with no address hint and no file; the kernel chooses a fresh range that overlaps nothing Rust owns. The result is checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io {
                what: format!("mmap of {len} bytes"),
                source: io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Io {
            what: "mmap returned a null mapping".into(),
            source: io::Error::from(io::ErrorKind::Other),
        })?;
        Ok(RamMem {
            base,
            len,
            page_size,
        })
    }

    /// Panics unless `offset .. offset + len` lies inside the mapping. The
    /// queue validates every request before it gets here, so a failure is a
    /// bug in this crate, not a peer's input.
    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "ram access {offset}+{len} outside a {}-byte mapping",
            self.len
        );
    }

    /// Copies device bytes at `offset` into `dst`.
    fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the source range lies inside the live mapping (checked above) and `dst` is a distinct, exclusively borrowed Rust buffer, so the ranges do not overlap. Concurrent writers to the same device range only make the copied bytes unordered (module docs).
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `src` into the device at `offset`.
    fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: the destination range lies inside the live, writable mapping (checked above); `src` is a Rust buffer outside it. No reference to the destination exists; concurrent access to it is argued in the module docs.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(offset), src.len()) }
    }

    /// Whether the device bytes at `offset` equal `data`.
    fn equals(&self, offset: usize, data: &[u8]) -> bool {
        let mut chunk = [0u8; COMPARE_CHUNK];
        data.chunks(COMPARE_CHUNK).enumerate().all(|(i, want)| {
            let got = &mut chunk[..want.len()];
            self.read(offset + i * COMPARE_CHUNK, got);
            got == want
        })
    }

    /// Sets `len` bytes at `offset` to zero, giving whole pages back to the
    /// kernel and zeroing the partial pages at either edge.
    fn zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        let end = offset + len;
        let mask = self.page_size - 1;
        let first_page = (offset + mask) & !mask;
        let last_page = end & !mask;
        if first_page < last_page && self.discard(first_page, last_page - first_page) {
            self.fill_zero(offset, first_page - offset);
            self.fill_zero(last_page, end - last_page);
        } else {
            self.fill_zero(offset, len);
        }
    }

    /// Appends `(bytes, allocated)` runs for `len` bytes at `offset`, read
    /// from this process's page table (`/proc/self/pagemap`): a page neither
    /// present nor swapped out was never written or was given back, and reads
    /// as zeroes. At most [`STATUS_PAGES`] pages per call; false if the page
    /// table cannot be read.
    fn page_status(&self, offset: usize, len: usize, out: &mut Vec<(u64, bool)>) -> bool {
        self.check(offset, len);
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return false;
        };
        let ps = self.page_size;
        let addr = self.base.as_ptr() as usize + offset;
        let first = addr / ps;
        let last = (addr + len).div_ceil(ps).min(first + STATUS_PAGES);
        let mut raw = vec![0u8; (last - first) * 8];
        use std::os::unix::fs::FileExt;
        if pagemap.read_exact_at(&mut raw, first as u64 * 8).is_err() {
            return false;
        }
        let mut pos = addr;
        let end = (addr + len).min(last * ps);
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            // Bit 63: present; bit 62: swapped.
            let allocated = entry >> 62 != 0;
            let page_end = ((first + i + 1) * ps).min(end);
            let n = (page_end - pos) as u64;
            match out.last_mut() {
                Some(last) if last.1 == allocated => last.0 += n,
                _ => out.push((n, allocated)),
            }
            pos = page_end;
        }
        true
    }

    /// Writes zeroes over `len` bytes at `offset` (already checked).
    fn fill_zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: the range lies inside the live, writable mapping (checked above); no reference to it exists (module docs).
        unsafe { ptr::write_bytes(self.base.as_ptr().add(offset), 0, len) }
    }

    /// Drops the pages of a page-aligned range so they read as zeroes;
    /// returns false if the kernel refused.
    fn discard(&self, offset: usize, len: usize) -> bool {
        self.check(offset, len);
        debug_assert!(offset.is_multiple_of(self.page_size) && len.is_multiple_of(self.page_size));
        // SAFETY: the range is page-aligned (the mapping base is, and so is `offset`) and inside our private anonymous mapping, which no Rust reference covers; MADV_DONTNEED on such a mapping only replaces the pages with zero-fill-on-demand pages.
        let rc = unsafe {
            libc::madvise(
                self.base.as_ptr().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            )
        };
        rc == 0
    }
}

impl Drop for RamMem {
    fn drop(&mut self) {
        // SAFETY: base/len describe exactly the mapping made in `new`; it is unmapped once, here, when the last owner (bdev or queue) is gone.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of ram bdev failed");
        }
    }
}

/// State shared by a [`RamBdev`] and its queues.
#[derive(Debug)]
struct RamInner {
    info: BdevInfo,
    mem: RamMem,
}

/// A block device in anonymous memory; contents are lost when it is dropped.
#[derive(Debug)]
pub struct RamBdev {
    inner: Arc<RamInner>,
    queue_depth: usize,
}

impl RamBdev {
    /// A zeroed device of `num_blocks` blocks of `block_size` bytes. Memory is
    /// reserved, not committed: pages are allocated when first written.
    ///
    /// Fails with [`Error::Config`] for a block size that is not a power of
    /// two in 512..=65536, an empty device or one larger than the address
    /// space, and with [`Error::Io`] if the mapping cannot be made.
    pub fn new(name: &str, num_blocks: u64, block_size: u32) -> Result<RamBdev> {
        let size = BdevInfo::check_geometry(block_size, num_blocks)?;
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::Config(format!("ram device of {size} bytes does not fit in memory"))
            })?;
        let mem = RamMem::new(len)?;
        let info = BdevInfo {
            name: name.to_owned(),
            block_size,
            num_blocks,
            max_transfer: 0,
            volatile_write_cache: false,
            deallocate: true,
            write_zeroes: true,
        };
        Ok(RamBdev {
            inner: Arc::new(RamInner { info, mem }),
            queue_depth: DEFAULT_QUEUE_DEPTH,
        })
    }

    /// Sets how many completions a queue opened later holds before `submit`
    /// answers [`crate::SubmitError::Busy`] (default [`DEFAULT_QUEUE_DEPTH`]).
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth.max(1);
        self
    }
}

impl Bdev for RamBdev {
    fn info(&self) -> &BdevInfo {
        &self.inner.info
    }

    fn open_queue(&self) -> Result<Box<dyn BdevQueue>> {
        let ops = RamOps {
            inner: Arc::clone(&self.inner),
        };
        Ok(Box::new(SyncQueue::new(ops, self.queue_depth)))
    }
}

/// The data operations of a queue on a [`RamBdev`]: copies into and out of
/// the mapping.
#[derive(Debug)]
struct RamOps {
    inner: Arc<RamInner>,
}

/// A byte offset or length of a validated request as a mapping index: the
/// request lies inside the device, whose size fits in `usize`
/// ([`RamBdev::new`]), so the conversion is lossless.
fn at(n: u64) -> usize {
    n as usize
}

impl SyncBackend for RamOps {
    fn info(&self) -> &BdevInfo {
        &self.inner.info
    }

    fn any_alignment(&self) -> bool {
        true
    }

    fn read(&mut self, offset: u64, dst: &mut [u8]) -> IoResult {
        self.inner.mem.read(at(offset), dst);
        Ok(())
    }

    /// Memory has no volatile cache: `fua` needs nothing more.
    fn write(&mut self, offset: u64, src: &[u8], _fua: bool) -> IoResult {
        self.inner.mem.write(at(offset), src);
        Ok(())
    }

    fn compare(&mut self, offset: u64, want: &[u8]) -> IoResult {
        if self.inner.mem.equals(at(offset), want) {
            Ok(())
        } else {
            Err(IoError::CompareFailure)
        }
    }

    fn flush(&mut self) -> IoResult {
        Ok(())
    }

    /// Gives whole pages back whether or not deallocation is allowed: they
    /// read as zeroes either way.
    fn write_zeroes(&mut self, offset: u64, len: u64, _dealloc: bool, _fua: bool) -> IoResult {
        self.inner.mem.zero(at(offset), at(len));
        Ok(())
    }

    fn deallocate(&mut self, offset: u64, len: u64) -> IoResult {
        self.inner.mem.zero(at(offset), at(len));
        Ok(())
    }

    fn byte_status(&mut self, offset: u64, len: u64, out: &mut Vec<(u64, bool)>) -> bool {
        self.inner.mem.page_status(at(offset), at(len), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, check_against_model, model_ops, pattern, read, write};
    use proptest::prelude::*;

    #[test]
    fn new_device_reads_zeroes_and_round_trips_writes() {
        let dev = RamBdev::new("ram0", 64, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        assert!(read(&mut *q, 0, 64, 512).iter().all(|&b| b == 0));
        let data = pattern(3 * 512, 9);
        assert_eq!(write(&mut *q, 5, 3, &data, true), Ok(()));
        assert_eq!(read(&mut *q, 5, 3, 512), data);
        // Another queue sees the same memory.
        let mut q2 = dev.open_queue().unwrap();
        assert_eq!(read(&mut *q2, 5, 3, 512), data);
    }

    #[test]
    fn longer_buffer_uses_only_the_transfer_length() {
        let dev = RamBdev::new("ram0", 8, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        assert_eq!(write(&mut *q, 0, 1, &[7; 4096], false), Ok(()));
        let back = read(&mut *q, 0, 2, 512);
        assert!(back[..512].iter().all(|&b| b == 7) && back[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_and_lba_overflow_are_rejected() {
        conformance::rejects_out_of_range(&RamBdev::new("ram0", 16, 512).unwrap());
    }
    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        conformance::rejects_short_or_missing_buffer(&RamBdev::new("ram0", 16, 512).unwrap());
    }
    #[test]
    fn compare_reports_match_and_mismatch() {
        conformance::compare_reports_match_and_mismatch(
            &RamBdev::new("ram0", 32, 512).unwrap(),
            20,
        );
    }
    #[test]
    fn deallocate_and_write_zeroes_read_back_zeroes_around_partial_pages() {
        // Blocks 3..21 cover bytes 1536..10752: one whole page and two partial ones.
        let dev = RamBdev::new("ram0", 64, 512).unwrap();
        conformance::zeroing_reads_back_zeroes(&mut *dev.open_queue().unwrap(), dev.info());
    }
    #[test]
    fn full_queue_is_busy_until_polled() {
        let dev = RamBdev::new("ram0", 16, 512).unwrap().with_queue_depth(2);
        conformance::full_queue_is_busy_until_polled(&dev, 2);
    }

    #[test]
    fn passes_every_conformance_check() {
        let dev = RamBdev::new("ram0", 4096, 512).unwrap().with_queue_depth(8);
        let expect = conformance::Expect {
            segments: true,
            queue_depth: Some(8),
            block_status_granularity: Some(8),
            ..Default::default()
        };
        conformance::check_all(&dev, &expect);
    }

    #[test]
    fn segmented_requests_go_segment_by_segment() {
        let dev = RamBdev::new("ram0", 64, 4096).unwrap();
        assert!(dev.open_queue().unwrap().max_segments() > 1);
        conformance::segmented_requests_match_one_buffer(&dev);
    }
    #[test]
    fn large_device_commits_no_memory_until_written() {
        fn rss_bytes() -> Option<u64> {
            let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * 4096)
        }
        let before = rss_bytes();
        let dev = RamBdev::new("ram0", 1 << 21, 512).unwrap(); // 1 GiB
        let mut q = dev.open_queue().unwrap();
        let last = dev.info().num_blocks - 1;
        assert_eq!(write(&mut *q, last, 1, &[1; 512], false), Ok(()));
        assert_eq!(read(&mut *q, last, 1, 512), vec![1; 512]);
        if let (Some(before), Some(after)) = (before, rss_bytes()) {
            assert!(
                after.saturating_sub(before) < 256 << 20,
                "RSS grew from {before} to {after}"
            );
        }
    }

    #[test]
    fn queues_on_several_threads_write_disjoint_ranges() {
        let dev = Arc::new(RamBdev::new("ram0", 4 * 256, 512).unwrap());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let dev = Arc::clone(&dev);
                std::thread::spawn(move || {
                    let mut q = dev.open_queue().unwrap();
                    for i in 0..256u64 {
                        let lba = u64::from(t) * 256 + i;
                        assert_eq!(write(&mut *q, lba, 1, &[t + 1; 512], false), Ok(()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut q = dev.open_queue().unwrap();
        let all = read(&mut *q, 0, 1024, 512);
        for (i, block) in all.chunks(512 * 256).enumerate() {
            assert!(block.iter().all(|&b| usize::from(b) == i + 1));
        }
    }

    #[test]
    fn block_status_reports_written_pages_as_data_and_the_rest_as_holes() {
        // 512-byte blocks: a 4 KiB page holds 8, so neighbours of written
        // blocks within their page count as data too.
        let dev = RamBdev::new("ram0", 4096, 512).unwrap();
        conformance::block_status_follows_writes_and_deallocation(&dev, 8);
    }

    #[test]
    fn queue_outlives_the_bdev() {
        let dev = RamBdev::new("ram0", 8, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        drop(dev);
        assert_eq!(write(&mut *q, 7, 1, &[3; 512], false), Ok(()));
        assert_eq!(read(&mut *q, 7, 1, 512), vec![3; 512]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_operations_match_a_byte_model(ops in model_ops(48)) {
            let dev = RamBdev::new("ram0", 48, 512).unwrap();
            check_against_model(&dev, 48, &ops);
        }
    }
}
