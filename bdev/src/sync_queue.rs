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

/// The first `len` bytes of a request's buffer (checked to hold them).
fn data(buf: Option<&mut IoBuf>, len: u64) -> std::result::Result<&mut [u8], IoError> {
    let buf = buf.ok_or(IoError::BadBuffer)?;
    Ok(&mut buf[..len as usize])
}

impl<B: SyncBackend> BdevQueue for SyncQueue<B> {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let mut req = self.done.admit(req)?;
        let result = self.execute(&req.op, req.buf.as_mut());
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::run;
    use crate::LbaRange;

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
