//! The `null` backend: a device of any size that stores nothing.
//!
//! Like SPDK's null bdev it exists to measure the stack above it: every
//! request is validated exactly as the real backends validate it (range,
//! buffer, transfer size) and then completes at once, inside
//! [`BdevQueue::submit`]. Writes are discarded, **reads leave the caller's
//! buffer untouched** (whatever it held is what the reader gets), Compare
//! always succeeds, Flush, WriteZeroes and Deallocate do nothing. It is not a
//! zero device: use `ram` for that.

use std::sync::Arc;

use crate::completions::Completions;
use crate::{
    Bdev, BdevInfo, BdevQueue, IoCompletion, IoRequest, Result, SubmitError, DEFAULT_QUEUE_DEPTH,
};

/// A block device that discards writes and leaves read buffers untouched.
#[derive(Debug)]
pub struct NullBdev {
    info: Arc<BdevInfo>,
    queue_depth: usize,
}

impl NullBdev {
    /// A null device of `num_blocks` blocks of `block_size` bytes.
    ///
    /// Fails with [`crate::Error::Config`] unless `block_size` is a power of
    /// two in 512..=65536 and the device has at least one block.
    pub fn new(name: &str, num_blocks: u64, block_size: u32) -> Result<NullBdev> {
        BdevInfo::check_geometry(block_size, num_blocks)?;
        let info = BdevInfo {
            name: name.to_owned(),
            block_size,
            num_blocks,
            max_transfer: 0,
            volatile_write_cache: false,
            // Reads of deallocated blocks do not return zeroes here, so
            // deallocation is not advertised (it still succeeds if asked).
            deallocate: false,
            write_zeroes: true,
        };
        Ok(NullBdev {
            info: Arc::new(info),
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

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_queue(&self) -> Result<Box<dyn BdevQueue>> {
        Ok(Box::new(NullQueue {
            info: Arc::clone(&self.info),
            done: Completions::new(self.queue_depth),
        }))
    }
}

/// A queue on a [`NullBdev`].
#[derive(Debug)]
struct NullQueue {
    info: Arc<BdevInfo>,
    done: Completions,
}

impl BdevQueue for NullQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let req = self.done.admit(req)?;
        let result = self.info.check_request(&req.op, req.buf.as_ref());
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
    use crate::{IoBuf, IoError, IoOp, LbaRange};

    fn run(q: &mut dyn BdevQueue, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
        q.submit(IoRequest { tag: 7, op, buf })
            .expect("queue has room");
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 1);
        out.pop().expect("one completion")
    }

    #[test]
    fn write_then_read_leaves_read_buffer_untouched() {
        let dev = NullBdev::new("null0", 1024, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 2,
                fua: true,
            },
            Some(IoBuf::from_slice(&[0xaa; 1024])),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.tag, 7);
        let c = run(
            &mut *q,
            IoOp::Read { lba: 0, nlb: 2 },
            Some(IoBuf::from_slice(&[0x55; 1024])),
        );
        assert_eq!(c.result, Ok(()));
        assert!(c.buf.unwrap().iter().all(|&b| b == 0x55));
    }

    #[test]
    fn out_of_range_and_lba_overflow_are_rejected() {
        let dev = NullBdev::new("null0", 1024, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Read { lba: 1023, nlb: 2 },
            Some(IoBuf::new(1024)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: u64::MAX,
                nlb: 1,
                fua: false,
            },
            Some(IoBuf::new(512)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(
            &mut *q,
            IoOp::WriteZeroes {
                lba: 1024,
                nlb: 1,
                deallocate: false,
                fua: false,
            },
            None,
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let ranges = vec![
            LbaRange { lba: 0, nlb: 1 },
            LbaRange {
                lba: u64::MAX - 1,
                nlb: 4,
            },
        ];
        let c = run(&mut *q, IoOp::Deallocate { ranges }, None);
        assert_eq!(c.result, Err(IoError::OutOfRange));
    }

    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        let dev = NullBdev::new("null0", 1024, 4096).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 2,
                fua: false,
            },
            Some(IoBuf::new(4096)),
        );
        assert_eq!(c.result, Err(IoError::BadBuffer));
        assert!(c.buf.is_some(), "the buffer is handed back even on failure");
        let c = run(&mut *q, IoOp::Read { lba: 0, nlb: 1 }, None);
        assert_eq!(c.result, Err(IoError::BadBuffer));
    }

    #[test]
    fn compare_flush_zeroes_and_deallocate_succeed() {
        let dev = NullBdev::new("null0", 16, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        assert_eq!(
            run(
                &mut *q,
                IoOp::Compare { lba: 0, nlb: 1 },
                Some(IoBuf::from_slice(&[1; 512]))
            )
            .result,
            Ok(())
        );
        assert_eq!(run(&mut *q, IoOp::Flush, None).result, Ok(()));
        let op = IoOp::WriteZeroes {
            lba: 0,
            nlb: 16,
            deallocate: true,
            fua: false,
        };
        assert_eq!(run(&mut *q, op, None).result, Ok(()));
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 3, nlb: 13 }],
        };
        assert_eq!(run(&mut *q, op, None).result, Ok(()));
    }

    #[test]
    fn full_queue_is_busy_until_polled() {
        let dev = NullBdev::new("null0", 16, 512).unwrap().with_queue_depth(4);
        let mut q = dev.open_queue().unwrap();
        for tag in 0..4 {
            q.submit(IoRequest {
                tag,
                op: IoOp::Flush,
                buf: None,
            })
            .unwrap();
        }
        assert_eq!(q.outstanding(), 4);
        match q.submit(IoRequest {
            tag: 99,
            op: IoOp::Flush,
            buf: None,
        }) {
            Err(SubmitError::Busy(req)) => assert_eq!(req.tag, 99),
            Ok(()) => panic!("a full queue accepted a request"),
        }
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 4);
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(q.outstanding(), 0);
        q.submit(IoRequest {
            tag: 99,
            op: IoOp::Flush,
            buf: None,
        })
        .unwrap();
    }

    #[test]
    fn bad_geometry_is_a_config_error() {
        assert!(matches!(
            NullBdev::new("n", 0, 512),
            Err(crate::Error::Config(_))
        ));
        assert!(matches!(
            NullBdev::new("n", 8, 1000),
            Err(crate::Error::Config(_))
        ));
        assert!(matches!(
            NullBdev::new("n", 8, 256),
            Err(crate::Error::Config(_))
        ));
        assert!(matches!(
            NullBdev::new("n", u64::MAX, 4096),
            Err(crate::Error::Config(_))
        ));
    }
}
