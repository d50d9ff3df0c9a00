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

use crate::sync_queue::{IoResult, SyncBackend, SyncQueue};
use crate::{Bdev, BdevInfo, BdevQueue, Result, DEFAULT_QUEUE_DEPTH};

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
    /// answers [`crate::SubmitError::Busy`] (default [`DEFAULT_QUEUE_DEPTH`]).
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
        let ops = NullOps {
            info: Arc::clone(&self.info),
        };
        Ok(Box::new(SyncQueue::new(ops, self.queue_depth)))
    }
}

/// The data operations of a queue on a [`NullBdev`]: none, every validated
/// request succeeds.
#[derive(Debug)]
struct NullOps {
    info: Arc<BdevInfo>,
}

impl SyncBackend for NullOps {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    /// Leaves `dst` as the caller filled it.
    fn read(&mut self, _offset: u64, _dst: &mut [u8]) -> IoResult {
        Ok(())
    }

    fn write(&mut self, _offset: u64, _src: &[u8], _fua: bool) -> IoResult {
        Ok(())
    }

    fn compare(&mut self, _offset: u64, _want: &[u8]) -> IoResult {
        Ok(())
    }

    fn flush(&mut self) -> IoResult {
        Ok(())
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64, _dealloc: bool, _fua: bool) -> IoResult {
        Ok(())
    }

    fn deallocate(&mut self, _offset: u64, _len: u64) -> IoResult {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, run, write, TAG};
    use crate::{IoBuf, IoOp, LbaRange};

    #[test]
    fn write_then_read_leaves_read_buffer_untouched() {
        let dev = NullBdev::new("null0", 1024, 512).unwrap();
        let mut q = dev.open_queue().unwrap();
        assert_eq!(write(&mut *q, 0, 2, &[0xaa; 1024], true), Ok(()));
        let c = run(
            &mut *q,
            IoOp::Read { lba: 0, nlb: 2 },
            Some(IoBuf::from_slice(&[0x55; 1024])),
        );
        assert_eq!((c.tag, c.result), (TAG, Ok(())));
        assert!(c.buf.unwrap().iter().all(|&b| b == 0x55));
    }

    #[test]
    fn out_of_range_and_lba_overflow_are_rejected() {
        conformance::rejects_out_of_range(&NullBdev::new("null0", 1024, 512).unwrap());
    }

    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        conformance::rejects_short_or_missing_buffer(&NullBdev::new("null0", 1024, 4096).unwrap());
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
    fn passes_every_conformance_check_that_applies_to_a_device_without_data() {
        let dev = NullBdev::new("null0", 1024, 512)
            .unwrap()
            .with_queue_depth(5);
        let expect = conformance::Expect {
            stores_data: false,
            queue_depth: Some(5),
            ..Default::default()
        };
        conformance::check_all(&dev, &expect);
    }

    #[test]
    fn full_queue_is_busy_until_polled() {
        let dev = NullBdev::new("null0", 16, 512).unwrap().with_queue_depth(4);
        conformance::full_queue_is_busy_until_polled(&dev, 4);
    }

    #[test]
    fn bad_geometry_is_a_config_error() {
        for (blocks, bs) in [(0, 512), (8, 1000), (8, 256), (u64::MAX, 4096)] {
            assert!(
                matches!(NullBdev::new("n", blocks, bs), Err(crate::Error::Config(_))),
                "{blocks} blocks of {bs}"
            );
        }
    }
}
