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

use crate::completions::Completions;
use crate::{
    Bdev, BdevInfo, BdevQueue, Error, IoBuf, IoCompletion, IoError, IoOp, IoRequest, Result,
    SubmitError, DEFAULT_QUEUE_DEPTH,
};

/// Chunk size for Compare, which copies device memory to the stack before
/// comparing so that no reference to shared device memory exists.
const COMPARE_CHUNK: usize = 4096;

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

// SAFETY: RamMem owns its mapping; the pointer is never handed out and all
// access is by raw-pointer copies of checked ranges that are valid from any
// thread (the mapping is process-wide and lives until Drop).
unsafe impl Send for RamMem {}
// SAFETY: shared access only performs raw-pointer copies into and out of the
// mapping, never creates references to it; concurrent overlapping copies
// yield unordered but valid bytes, as argued in the module documentation.
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
        // SAFETY: an anonymous mapping with no address hint and no file; the
        // kernel chooses a fresh range that overlaps nothing Rust owns. The
        // result is checked for MAP_FAILED before use.
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
        // SAFETY: the source range lies inside the live mapping (checked
        // above) and `dst` is a distinct, exclusively borrowed Rust buffer,
        // so the ranges do not overlap. Concurrent writers to the same device
        // range only make the copied bytes unordered (module docs).
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `src` into the device at `offset`.
    fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: the destination range lies inside the live, writable
        // mapping (checked above); `src` is a Rust buffer outside it. No
        // reference to the destination exists; concurrent access to it is
        // argued in the module docs.
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

    /// Writes zeroes over `len` bytes at `offset` (already checked).
    fn fill_zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: the range lies inside the live, writable mapping (checked
        // above); no reference to it exists (module docs).
        unsafe { ptr::write_bytes(self.base.as_ptr().add(offset), 0, len) }
    }

    /// Drops the pages of a page-aligned range so they read as zeroes;
    /// returns false if the kernel refused.
    fn discard(&self, offset: usize, len: usize) -> bool {
        self.check(offset, len);
        debug_assert!(offset % self.page_size == 0 && len % self.page_size == 0);
        // SAFETY: the range is page-aligned (the mapping base is, and so is
        // `offset`) and inside our private anonymous mapping, which no Rust
        // reference covers; MADV_DONTNEED on such a mapping only replaces
        // the pages with zero-fill-on-demand pages.
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
        // SAFETY: base/len describe exactly the mapping made in `new`; it is
        // unmapped once, here, when the last owner (bdev or queue) is gone.
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
    /// answers [`SubmitError::Busy`] (default [`DEFAULT_QUEUE_DEPTH`]).
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
        Ok(Box::new(RamQueue {
            inner: Arc::clone(&self.inner),
            done: Completions::new(self.queue_depth),
        }))
    }
}

/// A queue on a [`RamBdev`]; executes each request inside `submit`.
#[derive(Debug)]
struct RamQueue {
    inner: Arc<RamInner>,
    done: Completions,
}

impl RamQueue {
    /// Validates and performs one request.
    fn execute(&self, op: &IoOp, buf: Option<&mut IoBuf>) -> std::result::Result<(), IoError> {
        let info = &self.inner.info;
        info.check_request(op, buf.as_deref())?;
        let mem = &self.inner.mem;
        let bs = info.block_size as usize;
        // check_request proved every range lies inside the device, whose byte
        // size fits in usize, so these products cannot overflow.
        let off = |lba: u64| lba as usize * bs;
        let len = |nlb: u32| nlb as usize * bs;
        match *op {
            IoOp::Read { lba, nlb } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                mem.read(off(lba), &mut buf[..len(nlb)]);
            }
            IoOp::Write { lba, nlb, .. } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                mem.write(off(lba), &buf[..len(nlb)]);
            }
            IoOp::Compare { lba, nlb } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                if !mem.equals(off(lba), &buf[..len(nlb)]) {
                    return Err(IoError::CompareFailure);
                }
            }
            IoOp::Flush => {}
            IoOp::WriteZeroes { lba, nlb, .. } => mem.zero(off(lba), len(nlb)),
            IoOp::Deallocate { ref ranges } => {
                for r in ranges {
                    mem.zero(off(r.lba), len(r.nlb));
                }
            }
        }
        Ok(())
    }
}

impl BdevQueue for RamQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let mut req = self.done.admit(req)?;
        let result = self.execute(&req.op, req.buf.as_mut());
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.done.drain_into(out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::LbaRange;
    use proptest::prelude::*;

    fn run(q: &mut dyn BdevQueue, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
        q.submit(IoRequest { tag: 1, op, buf })
            .expect("queue has room");
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 1);
        out.pop().expect("one completion")
    }

    fn read(q: &mut dyn BdevQueue, lba: u64, nlb: u32, bs: usize) -> Vec<u8> {
        let c = run(
            q,
            IoOp::Read { lba, nlb },
            Some(IoBuf::new(nlb as usize * bs)),
        );
        assert_eq!(c.result, Ok(()));
        c.buf.expect("buffer handed back").to_vec()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn new_device_reads_zeroes_and_round_trips_writes() {
        let dev = RamBdev::new("ram0", 64, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        assert!(read(&mut *q, 0, 64, 512).iter().all(|&b| b == 0));
        let data = pattern(3 * 512, 9);
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 5,
                nlb: 3,
                fua: true,
            },
            Some(IoBuf::from_slice(&data)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(read(&mut *q, 5, 3, 512), data);
        // Another queue sees the same memory.
        let mut q2 = dev.open_queue().unwrap();
        assert_eq!(read(&mut *q2, 5, 3, 512), data);
    }

    #[test]
    fn longer_buffer_uses_only_the_transfer_length() {
        let dev = RamBdev::new("ram0", 8, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 1,
                fua: false,
            },
            Some(IoBuf::from_slice(&[7; 4096])),
        );
        assert_eq!(c.result, Ok(()));
        let back = read(&mut *q, 0, 2, 512);
        assert!(back[..512].iter().all(|&b| b == 7) && back[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_and_lba_overflow_are_rejected() {
        let dev = RamBdev::new("ram0", 16, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Read { lba: 15, nlb: 2 },
            Some(IoBuf::new(1024)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: u64::MAX,
                nlb: 2,
                fua: false,
            },
            Some(IoBuf::new(1024)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(
            &mut *q,
            IoOp::Compare { lba: 16, nlb: 1 },
            Some(IoBuf::new(512)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let op = IoOp::WriteZeroes {
            lba: u64::MAX - 1,
            nlb: u32::MAX,
            deallocate: true,
            fua: false,
        };
        assert_eq!(run(&mut *q, op, None).result, Err(IoError::OutOfRange));
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 0, nlb: 17 }],
        };
        assert_eq!(run(&mut *q, op, None).result, Err(IoError::OutOfRange));
    }

    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        let dev = RamBdev::new("ram0", 16, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let mut short = IoBuf::new(4096);
        short.set_len(1000);
        let c = run(&mut *q, IoOp::Read { lba: 0, nlb: 2 }, Some(short));
        assert_eq!(c.result, Err(IoError::BadBuffer));
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 1,
                fua: false,
            },
            None,
        );
        assert_eq!(c.result, Err(IoError::BadBuffer));
    }

    #[test]
    fn compare_reports_match_and_mismatch() {
        let dev = RamBdev::new("ram0", 32, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let data = pattern(20 * 512, 3);
        run(
            &mut *q,
            IoOp::Write {
                lba: 4,
                nlb: 20,
                fua: false,
            },
            Some(IoBuf::from_slice(&data)),
        );
        let c = run(
            &mut *q,
            IoOp::Compare { lba: 4, nlb: 20 },
            Some(IoBuf::from_slice(&data)),
        );
        assert_eq!(c.result, Ok(()));
        let mut other = data.clone();
        other[19 * 512 + 100] ^= 0xff;
        let c = run(
            &mut *q,
            IoOp::Compare { lba: 4, nlb: 20 },
            Some(IoBuf::from_slice(&other)),
        );
        assert_eq!(c.result, Err(IoError::CompareFailure));
    }

    #[test]
    fn deallocate_and_write_zeroes_read_back_zeroes_around_partial_pages() {
        let bs = 512;
        let dev = RamBdev::new("ram0", 64, bs as u32).unwrap();
        let mut q = dev.open_queue().unwrap();
        let data = pattern(64 * bs, 5);
        run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 64,
                fua: false,
            },
            Some(IoBuf::from_slice(&data)),
        );
        // Blocks 3..21 cover bytes 1536..10752: one whole page and two partial ones.
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 3, nlb: 18 }, LbaRange { lba: 40, nlb: 1 }],
        };
        assert_eq!(run(&mut *q, op, None).result, Ok(()));
        let op = IoOp::WriteZeroes {
            lba: 48,
            nlb: 16,
            deallocate: false,
            fua: true,
        };
        assert_eq!(run(&mut *q, op, None).result, Ok(()));
        let mut want = data;
        want[3 * bs..21 * bs].fill(0);
        want[40 * bs..41 * bs].fill(0);
        want[48 * bs..].fill(0);
        assert_eq!(read(&mut *q, 0, 64, bs), want);
    }

    #[test]
    fn full_queue_is_busy_until_polled() {
        let dev = RamBdev::new("ram0", 16, 512).unwrap().with_queue_depth(2);
        let mut q = dev.open_queue().unwrap();
        q.submit(IoRequest {
            tag: 1,
            op: IoOp::Flush,
            buf: None,
        })
        .unwrap();
        q.submit(IoRequest {
            tag: 2,
            op: IoOp::Read { lba: 0, nlb: 1 },
            buf: Some(IoBuf::new(512)),
        })
        .unwrap();
        let busy = q.submit(IoRequest {
            tag: 3,
            op: IoOp::Read { lba: 0, nlb: 1 },
            buf: Some(IoBuf::new(512)),
        });
        let Err(SubmitError::Busy(req)) = busy else {
            panic!("a full queue accepted a request")
        };
        assert_eq!(req.tag, 3);
        assert!(req.buf.is_some(), "the request comes back untouched");
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 2);
        assert_eq!(q.outstanding(), 0);
        q.submit(req).unwrap();
        assert_eq!(q.outstanding(), 1);
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
        run(
            &mut *q,
            IoOp::Write {
                lba: last,
                nlb: 1,
                fua: false,
            },
            Some(IoBuf::from_slice(&[1; 512])),
        );
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
                        let op = IoOp::Write {
                            lba: u64::from(t) * 256 + i,
                            nlb: 1,
                            fua: false,
                        };
                        assert_eq!(
                            run(&mut *q, op, Some(IoBuf::from_slice(&[t + 1; 512]))).result,
                            Ok(())
                        );
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
    fn queue_outlives_the_bdev() {
        let dev = RamBdev::new("ram0", 8, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        drop(dev);
        run(
            &mut *q,
            IoOp::Write {
                lba: 7,
                nlb: 1,
                fua: false,
            },
            Some(IoBuf::from_slice(&[3; 512])),
        );
        assert_eq!(read(&mut *q, 7, 1, 512), vec![3; 512]);
    }

    /// One step of the model test.
    #[derive(Clone, Debug)]
    pub(crate) enum ModelOp {
        Write {
            lba: u64,
            nlb: u32,
            seed: u8,
        },
        WriteZeroes {
            lba: u64,
            nlb: u32,
            deallocate: bool,
        },
        Deallocate {
            lba: u64,
            nlb: u32,
        },
        Read {
            lba: u64,
            nlb: u32,
        },
    }

    /// Random operations on a device of `blocks` blocks.
    pub(crate) fn model_ops(blocks: u64) -> impl Strategy<Value = Vec<ModelOp>> {
        let range = (0..blocks).prop_flat_map(move |lba| (Just(lba), 1..=(blocks - lba) as u32));
        let op = prop_oneof![
            3 => (range.clone(), any::<u8>()).prop_map(|((lba, nlb), seed)| ModelOp::Write { lba, nlb, seed }),
            1 => (range.clone(), any::<bool>())
                .prop_map(|((lba, nlb), deallocate)| ModelOp::WriteZeroes { lba, nlb, deallocate }),
            1 => range.clone().prop_map(|(lba, nlb)| ModelOp::Deallocate { lba, nlb }),
            2 => range.prop_map(|(lba, nlb)| ModelOp::Read { lba, nlb }),
        ];
        proptest::collection::vec(op, 1..40)
    }

    /// Applies `ops` to the device and to a `Vec<u8>` model; every read and a
    /// final full read must match the model.
    pub(crate) fn check_against_model(dev: &dyn Bdev, ops: &[ModelOp]) {
        let bs = dev.info().block_size as usize;
        let blocks = dev.info().num_blocks;
        let mut q = dev.open_queue().unwrap();
        let mut model = read(&mut *q, 0, blocks as u32, bs);
        for op in ops {
            match *op {
                ModelOp::Write { lba, nlb, seed } => {
                    let data = pattern(nlb as usize * bs, seed);
                    let c = run(
                        &mut *q,
                        IoOp::Write {
                            lba,
                            nlb,
                            fua: seed % 2 == 0,
                        },
                        Some(IoBuf::from_slice(&data)),
                    );
                    assert_eq!(c.result, Ok(()));
                    model[lba as usize * bs..][..data.len()].copy_from_slice(&data);
                }
                ModelOp::WriteZeroes {
                    lba,
                    nlb,
                    deallocate,
                } => {
                    let c = run(
                        &mut *q,
                        IoOp::WriteZeroes {
                            lba,
                            nlb,
                            deallocate,
                            fua: false,
                        },
                        None,
                    );
                    assert_eq!(c.result, Ok(()));
                    model[lba as usize * bs..][..nlb as usize * bs].fill(0);
                }
                ModelOp::Deallocate { lba, nlb } => {
                    let c = run(
                        &mut *q,
                        IoOp::Deallocate {
                            ranges: vec![LbaRange { lba, nlb }],
                        },
                        None,
                    );
                    assert_eq!(c.result, Ok(()));
                    model[lba as usize * bs..][..nlb as usize * bs].fill(0);
                }
                ModelOp::Read { lba, nlb } => {
                    let got = read(&mut *q, lba, nlb, bs);
                    assert_eq!(
                        got,
                        model[lba as usize * bs..][..nlb as usize * bs],
                        "read {lba}+{nlb}"
                    );
                }
            }
        }
        assert_eq!(read(&mut *q, 0, blocks as u32, bs), model);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_operations_match_a_byte_model(ops in model_ops(48)) {
            let dev = RamBdev::new("ram0", 48, 512).unwrap();
            check_against_model(&dev, &ops);
        }
    }
}
