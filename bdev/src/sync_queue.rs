//! The queue of the synchronous backends (`ram`, `null`, `file`): one
//! [`BdevQueue`] implementation that admits a request, validates it with
//! [`BdevInfo::check_request`], has the backend perform it at once and parks
//! the completion in the bounded [`Completions`] list until `poll`.
//!
//! A backend supplies only its data operations ([`SyncBackend`]), on byte
//! offsets and on buffers already cut to the transfer length, for requests
//! already known to lie inside the device. This module does no I/O itself
//! and is not for backends that complete asynchronously (the initiator).

use crate::completions::Completions;
use crate::{BdevInfo, BdevQueue, IoBuf, IoCompletion, IoError, IoOp, IoRequest, SubmitError};

/// Result of one data operation.
pub(crate) type IoResult = std::result::Result<(), IoError>;

/// The data operations of one queue of a synchronous backend.
///
/// Every call is for a request that passed [`BdevInfo::check_request`]:
/// offsets and lengths are in bytes and lie inside the device, and data
/// buffers are exactly the transfer length.
pub(crate) trait SyncBackend: Send {
    /// The device the queue belongs to.
    fn info(&self) -> &BdevInfo;
    /// Reads `dst.len()` bytes at `offset` into `dst`.
    fn read(&mut self, offset: u64, dst: &mut [u8]) -> IoResult;
    /// Writes `src` at `offset`; with `fua` the data is durable on return.
    fn write(&mut self, offset: u64, src: &[u8], fua: bool) -> IoResult;
    /// Compares the device at `offset` with `want`
    /// ([`IoError::CompareFailure`] on a difference).
    fn compare(&mut self, offset: u64, want: &[u8]) -> IoResult;
    /// Makes every completed write durable.
    fn flush(&mut self) -> IoResult;
    /// Sets `len` bytes at `offset` to zero; `deallocate` allows
    /// deallocating them instead.
    fn write_zeroes(&mut self, offset: u64, len: u64, deallocate: bool, fua: bool) -> IoResult;
    /// Deallocates `len` bytes at `offset`.
    fn deallocate(&mut self, offset: u64, len: u64) -> IoResult;
    /// Appends `(bytes, allocated)` runs describing `len` bytes from
    /// `offset` (they may cover less); false if the backend cannot tell.
    fn byte_status(&mut self, _offset: u64, _len: u64, _out: &mut Vec<(u64, bool)>) -> bool {
        false
    }
    /// Whether `read`/`write` take any byte offset and length (memory), so
    /// a request's data segments can go one by one without a bounce. A
    /// backend that says no (a file under O_DIRECT has alignment rules)
    /// gets segmented requests gathered into one buffer.
    fn any_alignment(&self) -> bool {
        false
    }
}

/// Most data segments a queue over a backend with
/// [`SyncBackend::any_alignment`] takes (virtio-blk's default seg_max is
/// 126).
const MAX_SEGMENTS: usize = 256;

/// Turns byte runs starting at `offset` (a multiple of `bs`) into block
/// runs appended to `out`, conservatively: a block counts as unallocated
/// only if all of it lies in one unallocated run. Adjacent runs of one
/// state are merged; a trailing partial block is dropped unless the runs
/// cover less than one block, which then counts as one allocated block.
pub(crate) fn byte_runs_to_extents(
    runs: &[(u64, bool)],
    offset: u64,
    bs: u32,
    out: &mut Vec<crate::Extent>,
) {
    let bs = u64::from(bs);
    let start = out.len();
    let push = |out: &mut Vec<crate::Extent>, nlb: u64, allocated: bool| {
        let mut nlb = nlb;
        while nlb > 0 {
            match out[start..].last_mut() {
                Some(last) if last.allocated == allocated && last.nlb < u32::MAX => {
                    let add = nlb.min(u64::from(u32::MAX - last.nlb));
                    last.nlb += add as u32;
                    nlb -= add;
                }
                _ => {
                    let n = nlb.min(u64::from(u32::MAX));
                    out.push(crate::Extent {
                        nlb: n as u32,
                        allocated,
                    });
                    nlb -= n;
                }
            }
        }
    };
    let mut pos = offset;
    let mut done_block = offset / bs;
    for &(len, allocated) in runs {
        let (s, e) = (pos, pos + len);
        pos = e;
        if allocated {
            continue;
        }
        let (hole_start, hole_end) = (s.div_ceil(bs), e / bs);
        if hole_end > hole_start {
            push(out, hole_start - done_block, true);
            push(out, hole_end - hole_start, false);
            done_block = hole_end;
        }
    }
    push(out, (pos / bs).saturating_sub(done_block), true);
    if out.len() == start && pos > offset {
        push(out, 1, true);
    }
}

/// A [`BdevQueue`] that executes each request inside `submit`.
#[derive(Debug)]
pub(crate) struct SyncQueue<B> {
    pub(crate) backend: B,
    done: Completions,
}

impl<B: SyncBackend> SyncQueue<B> {
    /// A queue on `backend` holding up to `depth` completions.
    pub(crate) fn new(backend: B, depth: usize) -> Self {
        SyncQueue {
            backend,
            done: Completions::new(depth),
        }
    }

    /// Validates and performs one request.
    fn execute(&mut self, op: &IoOp, buf: Option<&mut IoBuf>) -> IoResult {
        let info = self.backend.info();
        info.check_request(op, buf.as_deref())?;
        let bs = u64::from(info.block_size);
        // check_request proved every range lies inside the device, whose byte
        // size fits in u64 (check_geometry), so these products cannot
        // overflow, and the buffer holds at least the transfer length.
        let off = |lba: u64| lba * bs;
        let bytes = |nlb: u32| u64::from(nlb) * bs;
        let b = &mut self.backend;
        match *op {
            IoOp::Read { lba, nlb } => b.read(off(lba), data(buf, bytes(nlb))?),
            IoOp::Write { lba, nlb, fua } => b.write(off(lba), data(buf, bytes(nlb))?, fua),
            IoOp::Compare { lba, nlb } => b.compare(off(lba), data(buf, bytes(nlb))?),
            IoOp::Flush => b.flush(),
            IoOp::WriteZeroes {
                lba,
                nlb,
                deallocate,
                fua,
            } => b.write_zeroes(off(lba), bytes(nlb), deallocate, fua),
            IoOp::Deallocate { ref ranges } => ranges
                .iter()
                .try_for_each(|r| b.deallocate(off(r.lba), bytes(r.nlb))),
        }
    }
}

impl<B: SyncBackend> SyncQueue<B> {
    /// A read or write whose data is `first` followed by `more`: segment
    /// by segment for a backend that takes any alignment, else through one
    /// bounce buffer (correct for every backend; callers avoid it by asking
    /// [`BdevQueue::max_segments`]).
    fn execute_segments(
        &mut self,
        op: &IoOp,
        first: Option<&mut IoBuf>,
        more: &mut [IoBuf],
    ) -> IoResult {
        let (IoOp::Read { .. } | IoOp::Write { .. }) = op else {
            return Err(IoError::BadBuffer);
        };
        let info = self.backend.info();
        let len = op.data_len(info.block_size);
        let have =
            first.as_ref().map_or(0, |b| b.len()) + more.iter().map(|b| b.len()).sum::<usize>();
        info.check_request_len(op, Some(have))?;
        // The segments cut to the transfer, in order (no list is built).
        let mut left = len;
        let mut segs = first.into_iter().chain(more.iter_mut()).map(move |b| {
            let n = b.len().min(left);
            left -= n;
            &mut b[..n]
        });
        if !self.backend.any_alignment() {
            let mut bounce = IoBuf::new(len);
            let write = matches!(op, IoOp::Write { .. });
            if write {
                let mut at = 0;
                for s in segs.by_ref() {
                    bounce[at..at + s.len()].copy_from_slice(s);
                    at += s.len();
                }
            }
            self.execute(op, Some(&mut bounce))?;
            if !write {
                let mut at = 0;
                for s in segs {
                    let n = s.len();
                    s.copy_from_slice(&bounce[at..at + n]);
                    at += n;
                }
            }
            return Ok(());
        }
        let bs = u64::from(info.block_size);
        let b = &mut self.backend;
        let (IoOp::Read { lba, .. } | IoOp::Write { lba, .. }) = *op else {
            return Err(IoError::BadBuffer);
        };
        let mut off = lba * bs;
        for s in segs {
            match *op {
                IoOp::Write { fua, .. } => b.write(off, s, fua)?,
                _ => b.read(off, s)?,
            }
            off += s.len() as u64;
        }
        Ok(())
    }
}

/// The first `len` bytes of a request's buffer (checked to hold them).
fn data(buf: Option<&mut IoBuf>, len: u64) -> std::result::Result<&mut [u8], IoError> {
    let buf = buf.ok_or(IoError::BadBuffer)?;
    Ok(&mut buf[..len as usize])
}

impl<B: SyncBackend> BdevQueue for SyncQueue<B> {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let mut req = self.done.admit(req)?;
        let result = if req.more.is_empty() {
            self.execute(&req.op, req.buf.as_mut())
        } else {
            self.execute_segments(&req.op, req.buf.as_mut(), &mut req.more)
        };
        if let Err(e) = &result {
            tracing::debug!(bdev = %self.backend.info().name, tag = req.tag, error = %e,
                "bdev request failed");
        }
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

    fn max_segments(&self) -> usize {
        if self.backend.any_alignment() {
            MAX_SEGMENTS
        } else {
            1
        }
    }

    fn block_status(&mut self, lba: u64, nlb: u32, out: &mut Vec<crate::Extent>) -> bool {
        let info = self.backend.info();
        if info.check_range(lba, nlb).is_err() || nlb == 0 {
            return false;
        }
        let bs = info.block_size;
        let offset = lba * u64::from(bs);
        let mut runs = Vec::new();
        if !self
            .backend
            .byte_status(offset, u64::from(nlb) * u64::from(bs), &mut runs)
        {
            return false;
        }
        let before = out.len();
        byte_runs_to_extents(&runs, offset, bs, out);
        out.len() > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::run;
    use crate::LbaRange;

    fn ext(v: &[(u32, bool)]) -> Vec<crate::Extent> {
        v.iter()
            .map(|&(nlb, allocated)| crate::Extent { nlb, allocated })
            .collect()
    }

    fn conv(runs: &[(u64, bool)], offset: u64, bs: u32) -> Vec<crate::Extent> {
        let mut out = vec![crate::Extent {
            nlb: 7,
            allocated: false,
        }];
        byte_runs_to_extents(runs, offset, bs, &mut out);
        // What was in `out` before is left alone and never merged into.
        assert_eq!(out[0].nlb, 7);
        out.split_off(1)
    }

    #[test]
    fn byte_runs_become_block_runs_with_partly_allocated_blocks_counted_as_data() {
        // Page-sized runs on 512-byte blocks map exactly.
        assert_eq!(
            conv(&[(4096, false), (8192, true), (4096, false)], 0, 512),
            ext(&[(8, false), (16, true), (8, false)])
        );
        // 4 KiB runs on 16 KiB blocks: a block is a hole only if wholly one.
        assert_eq!(
            conv(
                &[(16384, false), (4096, true), (28672, false), (16384, false)],
                16384,
                16384
            ),
            ext(&[(1, false), (1, true), (2, false)])
        );
        // Adjacent runs of one state merge; an unaligned tail is dropped.
        assert_eq!(
            conv(
                &[(512, true), (512, true), (1024, false), (100, false)],
                0,
                512
            ),
            ext(&[(2, true), (2, false)])
        );
        // Less than one block in all: one allocated block.
        assert_eq!(conv(&[(100, false)], 0, 512), ext(&[(1, true)]));
        assert_eq!(conv(&[], 0, 512), ext(&[]));
    }

    /// Records the calls it receives.
    #[derive(Debug)]
    struct Recorder {
        info: BdevInfo,
        calls: Vec<String>,
    }

    impl SyncBackend for Recorder {
        fn info(&self) -> &BdevInfo {
            &self.info
        }
        fn read(&mut self, offset: u64, dst: &mut [u8]) -> IoResult {
            self.calls.push(format!("read {offset} {}", dst.len()));
            Ok(())
        }
        fn write(&mut self, offset: u64, src: &[u8], fua: bool) -> IoResult {
            self.calls
                .push(format!("write {offset} {} {fua}", src.len()));
            Ok(())
        }
        fn compare(&mut self, offset: u64, want: &[u8]) -> IoResult {
            self.calls.push(format!("compare {offset} {}", want.len()));
            Err(IoError::CompareFailure)
        }
        fn flush(&mut self) -> IoResult {
            self.calls.push("flush".into());
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, dealloc: bool, fua: bool) -> IoResult {
            self.calls
                .push(format!("zeroes {offset} {len} {dealloc} {fua}"));
            Ok(())
        }
        fn deallocate(&mut self, offset: u64, len: u64) -> IoResult {
            self.calls.push(format!("deallocate {offset} {len}"));
            Ok(())
        }
    }

    fn queue() -> SyncQueue<Recorder> {
        let info = BdevInfo {
            name: "rec".into(),
            block_size: 512,
            num_blocks: 100,
            max_transfer: 4096,
            volatile_write_cache: true,
            deallocate: true,
            write_zeroes: true,
        };
        SyncQueue::new(
            Recorder {
                info,
                calls: Vec::new(),
            },
            4,
        )
    }

    #[test]
    fn backend_gets_byte_offsets_and_buffers_cut_to_the_transfer() {
        let mut q = queue();
        let big = || Some(IoBuf::new(8192));
        assert_eq!(
            run(&mut q, IoOp::Read { lba: 2, nlb: 3 }, big()).result,
            Ok(())
        );
        let w = IoOp::Write {
            lba: 1,
            nlb: 1,
            fua: true,
        };
        assert_eq!(run(&mut q, w, big()).result, Ok(()));
        let c = IoOp::Compare { lba: 0, nlb: 2 };
        assert_eq!(run(&mut q, c, big()).result, Err(IoError::CompareFailure));
        assert_eq!(run(&mut q, IoOp::Flush, None).result, Ok(()));
        let z = IoOp::WriteZeroes {
            lba: 10,
            nlb: 4,
            deallocate: true,
            fua: false,
        };
        assert_eq!(run(&mut q, z, None).result, Ok(()));
        let ranges = vec![LbaRange { lba: 5, nlb: 1 }, LbaRange { lba: 99, nlb: 1 }];
        assert_eq!(
            run(&mut q, IoOp::Deallocate { ranges }, None).result,
            Ok(())
        );
        assert_eq!(
            q.backend.calls,
            [
                "read 1024 1536",
                "write 512 512 true",
                "compare 0 1024",
                "flush",
                "zeroes 5120 2048 true false",
                "deallocate 2560 512",
                "deallocate 50688 512",
            ]
        );
    }

    #[test]
    fn invalid_requests_never_reach_the_backend() {
        let mut q = queue();
        let too_large = IoOp::Read { lba: 0, nlb: 9 };
        let c = run(&mut q, too_large, Some(IoBuf::new(9 * 512)));
        assert_eq!(c.result, Err(IoError::TooLarge));
        let c = run(
            &mut q,
            IoOp::Read { lba: 99, nlb: 2 },
            Some(IoBuf::new(1024)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(&mut q, IoOp::Compare { lba: 0, nlb: 1 }, None);
        assert_eq!(c.result, Err(IoError::BadBuffer));
        assert!(q.backend.calls.is_empty());
    }
}
