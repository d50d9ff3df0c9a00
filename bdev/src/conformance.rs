//! The bdev conformance kit: checks that a [`Bdev`] and its queues keep the
//! contract of `docs/core.md`, so every backend (ram, null, file, a remote
//! NVMe/TCP namespace, a VFIO SSD) is held to the same behaviour.
//!
//! Built only with the `test-utils` feature (and for this crate's own unit
//! tests), as virtio-queue's `mock` module is; normal builds do not carry it
//! or its `proptest` dependency. Each check is a function that takes the
//! device (or one of its queues) plus what the caller knows the device does
//! beyond the core contract ([`Expect`]), drives it through the public
//! traits only, and panics with a message naming what broke, so it is
//! called from a `#[test]`. [`check_all`] runs every check that applies.
//!
//! The checks write and read the device: give them a scratch device of at
//! least 64 blocks (512 for [`block_status_follows_writes_and_deallocation`]).
//! They wait for completions the way a real caller would, never by sleeping:
//! on [`BdevQueue::wait_fd`] when the queue has one, by polling otherwise,
//! and give up with a panic after [`DEADLINE`]. So a remote or device-backed
//! queue, whose completions arrive later, is checked exactly like a local
//! one.
//!
//! This is not a benchmark and not a fault injector: it checks outcomes of
//! requests a well-behaved caller sends (plus the malformed ones the
//! contract says must fail cleanly), on a device that stays up.

#![deny(missing_docs)]

use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::{
    Bdev, BdevInfo, BdevQueue, BufOwner, Extent, IoBuf, IoCompletion, IoError, IoOp, IoRequest,
    LbaRange, SubmitError,
};

/// Tag of the requests [`run`] submits.
pub const TAG: u64 = 7;

/// How long a check waits for the completions it expects before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What the device under test does beyond the core contract, for
/// [`check_all`]. Deallocate and Write Zeroes support come from the
/// device's own [`BdevInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Data written reads back (false for a null device, which discards it).
    pub stores_data: bool,
    /// Compare checks the data (NVMe: ONCS bit 0); false skips the check.
    pub compare: bool,
    /// Requests with several data segments ([`IoRequest::more`]) are
    /// executed, natively ([`BdevQueue::max_segments`] > 1) or by bouncing.
    pub segments: bool,
    /// The depth the device's queues were built with; `Some` runs
    /// [`full_queue_is_busy_until_polled`].
    pub queue_depth: Option<usize>,
    /// [`BdevQueue::block_status`] answers, with this granularity in blocks;
    /// `Some` runs [`block_status_follows_writes_and_deallocation`].
    pub block_status_granularity: Option<u64>,
    /// Cases of the random-operations model test (0 skips it).
    pub model_cases: u32,
}

impl Default for Expect {
    /// A storing device with Compare, one data segment per request, and
    /// nothing else known; 16 model cases.
    fn default() -> Self {
        Expect {
            stores_data: true,
            compare: true,
            segments: false,
            queue_depth: None,
            block_status_granularity: None,
            model_cases: 16,
        }
    }
}

/// Runs every check that applies to `dev` as `expect` and its
/// [`BdevInfo`] describe it, on a fresh device (nothing written yet).
pub fn check_all(dev: &dyn Bdev, expect: &Expect) {
    if let Some(gran) = expect.block_status_granularity {
        // First: it starts from a device nothing was written to.
        block_status_follows_writes_and_deallocation(dev, gran);
    }
    rejects_out_of_range(dev);
    rejects_short_or_missing_buffer(dev);
    rejects_transfer_above_max_transfer(dev);
    flush_and_fua_complete(dev);
    if let Some(depth) = expect.queue_depth {
        full_queue_is_busy_until_polled(dev, depth as u64);
    }
    if !expect.stores_data {
        return;
    }
    writes_are_seen_by_other_queues(dev);
    longer_buffer_uses_only_the_transfer_length(dev);
    if expect.compare {
        compare_reports_match_and_mismatch(dev, 2);
    }
    let mut q = open(dev);
    zeroing_reads_back_zeroes(&mut *q, dev.info());
    drop(q);
    if expect.segments {
        segmented_requests_match_one_buffer(dev);
    }
    if expect.model_cases > 0 {
        random_operations_match_a_model(dev, 48, expect.model_cases);
    }
}

fn open(dev: &dyn Bdev) -> Box<dyn BdevQueue> {
    match dev.open_queue() {
        Ok(q) => q,
        Err(e) => panic!("cannot open a queue on {}: {e}", dev.info().name),
    }
}

/// Waits until `q` may make progress: on its [`BdevQueue::wait_fd`] up to
/// `until`, or (no descriptor) just yields the CPU before the next poll.
fn wait_for_progress(q: &dyn BdevQueue, until: Instant) {
    let Some(fd) = q.wait_fd() else {
        std::thread::yield_now();
        return;
    };
    let left = until.saturating_duration_since(Instant::now());
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one initialised pollfd that lives on the stack for the whole call, and the count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert!(
        rc >= 0 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted,
        "poll(2) on the queue's wait_fd {fd} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Polls `q` until at least `n` completions were appended to `out`, waiting
/// in between as a caller would (see the module docs); panics after
/// [`DEADLINE`]. Checks on the way that [`BdevQueue::poll`] returns the
/// number of completions it appended.
pub fn poll_until(q: &mut dyn BdevQueue, out: &mut Vec<IoCompletion>, n: usize) {
    let until = Instant::now() + DEADLINE;
    let mut got = 0;
    loop {
        let before = out.len();
        let polled = q.poll(out);
        assert_eq!(
            polled,
            out.len() - before,
            "poll returned a count other than what it appended"
        );
        got += polled;
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "{got} of {n} completions after {DEADLINE:?} ({} requests outstanding)",
            q.outstanding()
        );
        wait_for_progress(q, until);
    }
}

/// Submits one request on an idle queue, waits for its completion and
/// returns it.
pub fn run(q: &mut dyn BdevQueue, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
    if q.submit(IoRequest::new(TAG, op, buf)).is_err() {
        panic!("an idle queue answered Busy");
    }
    let mut out = Vec::new();
    poll_until(q, &mut out, 1);
    assert_eq!(out.len(), 1, "one request, one completion: {out:?}");
    let c = out.pop().expect("one completion");
    assert_eq!(c.tag, TAG, "the completion carries the request's tag");
    assert_eq!(
        q.outstanding(),
        0,
        "nothing outstanding after its completion"
    );
    c
}

/// Reads `nlb` blocks of `bs` bytes at `lba`, which must succeed.
pub fn read(q: &mut dyn BdevQueue, lba: u64, nlb: u32, bs: usize) -> Vec<u8> {
    let c = run(
        q,
        IoOp::Read { lba, nlb },
        Some(IoBuf::new(nlb as usize * bs)),
    );
    assert_eq!(c.result, Ok(()), "read {lba}+{nlb}");
    c.buf.expect("buffer handed back").to_vec()
}

/// Writes `data` (`nlb` blocks) at `lba` and returns the outcome.
pub fn write(
    q: &mut dyn BdevQueue,
    lba: u64,
    nlb: u32,
    data: &[u8],
    fua: bool,
) -> Result<(), IoError> {
    let op = IoOp::Write { lba, nlb, fua };
    run(q, op, Some(IoBuf::from_slice(data))).result
}

/// `len` bytes of a pattern that depends on `seed` and contains no zero.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Every LBA range reaching past the end of `dev`, or overflowing, fails
/// with [`IoError::OutOfRange`], whatever the operation (even one the
/// device would refuse for its size as well).
pub fn rejects_out_of_range(dev: &dyn Bdev) {
    let n = dev.info().num_blocks;
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    let ops = [
        (IoOp::Read { lba: n - 1, nlb: 2 }, 2),
        (
            IoOp::Write {
                lba: u64::MAX,
                nlb: 1,
                fua: false,
            },
            1,
        ),
        (IoOp::Compare { lba: n, nlb: 1 }, 1),
        (
            IoOp::WriteZeroes {
                lba: n,
                nlb: 1,
                deallocate: false,
                fua: false,
            },
            0,
        ),
        (
            IoOp::WriteZeroes {
                lba: u64::MAX - 1,
                nlb: u32::MAX,
                deallocate: true,
                fua: false,
            },
            0,
        ),
        (
            IoOp::Deallocate {
                ranges: vec![
                    LbaRange { lba: 0, nlb: 1 },
                    LbaRange {
                        lba: u64::MAX - 1,
                        nlb: 4,
                    },
                ],
            },
            0,
        ),
        (
            IoOp::Deallocate {
                ranges: vec![LbaRange { lba: n - 1, nlb: 2 }],
            },
            0,
        ),
    ];
    for (op, blocks) in ops {
        let buf = (blocks > 0).then(|| IoBuf::new(blocks * bs));
        let c = run(&mut *q, op.clone(), buf);
        assert_eq!(c.result, Err(IoError::OutOfRange), "{op:?}");
    }
}

/// A data transfer without a buffer, or with one shorter than the transfer,
/// fails with [`IoError::BadBuffer`] and hands the buffer back.
pub fn rejects_short_or_missing_buffer(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    let c = run(&mut *q, IoOp::Read { lba: 0, nlb: 2 }, Some(IoBuf::new(bs)));
    assert_eq!(c.result, Err(IoError::BadBuffer));
    assert!(c.buf.is_some(), "the buffer is handed back even on failure");
    let mut short = IoBuf::new(2 * bs);
    short.set_len(bs + 1);
    let write = IoOp::Write {
        lba: 0,
        nlb: 2,
        fua: false,
    };
    assert_eq!(
        run(&mut *q, write.clone(), Some(short)).result,
        Err(IoError::BadBuffer)
    );
    for op in [
        IoOp::Read { lba: 0, nlb: 1 },
        write,
        IoOp::Compare { lba: 0, nlb: 1 },
    ] {
        assert_eq!(
            run(&mut *q, op.clone(), None).result,
            Err(IoError::BadBuffer),
            "{op:?}"
        );
    }
}

/// On a device with a `max_transfer`, a read or write of one block more
/// fails with [`IoError::TooLarge`] and one of exactly `max_transfer`
/// bytes succeeds. Nothing to check when the device has no limit of its
/// own or is too small for a transfer that large.
pub fn rejects_transfer_above_max_transfer(dev: &dyn Bdev) {
    let info = dev.info();
    let bs = info.block_size;
    let max = info.max_transfer;
    if max == 0 || max < bs || u64::from(max / bs) + 1 > info.num_blocks {
        return;
    }
    let nlb = max / bs;
    let mut q = open(dev);
    let len = (nlb as usize + 1) * bs as usize;
    let ops = [
        IoOp::Read {
            lba: 0,
            nlb: nlb + 1,
        },
        IoOp::Write {
            lba: 0,
            nlb: nlb + 1,
            fua: false,
        },
    ];
    for op in ops {
        let c = run(&mut *q, op.clone(), Some(IoBuf::new(len)));
        assert_eq!(c.result, Err(IoError::TooLarge), "{op:?}");
    }
    let c = run(&mut *q, IoOp::Read { lba: 0, nlb }, Some(IoBuf::new(len)));
    assert_eq!(c.result, Ok(()), "a read of max_transfer bytes");
}

/// Flush, and writes with and without FUA, complete successfully.
pub fn flush_and_fua_complete(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    assert_eq!(run(&mut *q, IoOp::Flush, None).result, Ok(()), "flush");
    for fua in [false, true] {
        assert_eq!(
            write(&mut *q, 1, 1, &pattern(bs, 4), fua),
            Ok(()),
            "write, fua {fua}"
        );
    }
    assert_eq!(run(&mut *q, IoOp::Flush, None).result, Ok(()), "flush");
}

/// A queue of `dev`, which must have been built with a queue depth of
/// `depth`, answers Busy with the request untouched once `depth`
/// requests are outstanding, and takes requests again once their
/// completions were polled. Every request completes, each once (in any
/// order).
pub fn full_queue_is_busy_until_polled(dev: &dyn Bdev, depth: u64) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    for tag in 0..depth {
        if q.submit(IoRequest::new(tag, IoOp::Flush, None)).is_err() {
            panic!("Busy at request {tag} of a queue of depth {depth}");
        }
    }
    assert_eq!(q.outstanding(), depth as usize);
    let busy = q.submit(IoRequest::new(
        depth,
        IoOp::Read { lba: 0, nlb: 1 },
        Some(IoBuf::new(bs)),
    ));
    let Err(SubmitError::Busy(req)) = busy else {
        panic!("a full queue of depth {depth} accepted a request")
    };
    assert_eq!(req.tag, depth);
    assert!(req.buf.is_some(), "the request comes back untouched");
    let mut out = Vec::new();
    poll_until(&mut *q, &mut out, depth as usize);
    assert_eq!(out.len(), depth as usize, "no completion twice");
    assert_eq!(q.outstanding(), 0);
    if q.submit(req).is_err() {
        panic!("a drained queue answered Busy");
    }
    assert_eq!(q.outstanding(), 1);
    poll_until(&mut *q, &mut out, 1);
    let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..=depth).collect::<Vec<_>>());
    for c in &out {
        assert_eq!(c.result, Ok(()), "request {}", c.tag);
    }
}

/// Data written through one queue reads back through another queue of the
/// same device once the write completed.
pub fn writes_are_seen_by_other_queues(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut a = open(dev);
    let mut b = open(dev);
    let data = pattern(3 * bs, 9);
    assert_eq!(write(&mut *a, 5, 3, &data, false), Ok(()));
    assert_eq!(read(&mut *b, 5, 3, bs), data);
    let other = pattern(bs, 10);
    assert_eq!(write(&mut *b, 6, 1, &other, true), Ok(()));
    let mut want = data;
    want[bs..2 * bs].copy_from_slice(&other);
    assert_eq!(read(&mut *a, 5, 3, bs), want);
}

/// A buffer longer than the transfer: a write uses only its first
/// `nlb * block_size` bytes, a read fills only those.
pub fn longer_buffer_uses_only_the_transfer_length(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    assert_eq!(write(&mut *q, 9, 1, &vec![0; 2 * bs], false), Ok(()));
    assert_eq!(write(&mut *q, 8, 1, &vec![7; 2 * bs], false), Ok(()));
    let back = read(&mut *q, 8, 2, bs);
    assert!(back[..bs].iter().all(|&b| b == 7), "block 8 written");
    assert!(back[bs..].iter().all(|&b| b == 0), "block 9 untouched");
    let c = run(
        &mut *q,
        IoOp::Read { lba: 8, nlb: 1 },
        Some(IoBuf::from_slice(&vec![0x55; 2 * bs])),
    );
    assert_eq!(c.result, Ok(()));
    let buf = c.buf.expect("buffer handed back");
    assert!(buf[..bs].iter().all(|&b| b == 7), "read data");
    assert!(
        buf[bs..].iter().all(|&b| b == 0x55),
        "bytes past the transfer untouched"
    );
}

/// Compare of `nlb` blocks at LBA 4 succeeds on the data written there and
/// fails with [`IoError::CompareFailure`] when the last block differs.
pub fn compare_reports_match_and_mismatch(dev: &dyn Bdev, nlb: u32) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    let data = pattern(nlb as usize * bs, 3);
    assert_eq!(write(&mut *q, 4, nlb, &data, false), Ok(()));
    let compare = IoOp::Compare { lba: 4, nlb };
    let c = run(&mut *q, compare.clone(), Some(IoBuf::from_slice(&data)));
    assert_eq!(c.result, Ok(()));
    let mut other = data;
    other[(nlb as usize - 1) * bs + 100] ^= 0xff;
    let c = run(&mut *q, compare, Some(IoBuf::from_slice(&other)));
    assert_eq!(c.result, Err(IoError::CompareFailure));
}

/// Writes a pattern over the first 64 blocks, deallocates and zeroes parts
/// of it through `q` (a queue of the device `info` describes) and checks
/// what reads back. Deallocation is checked only where `info.deallocate`
/// says deallocated blocks read back as zeroes, Write Zeroes only where
/// `info.write_zeroes` says it is supported.
pub fn zeroing_reads_back_zeroes(q: &mut dyn BdevQueue, info: &BdevInfo) {
    let bs = info.block_size as usize;
    let data = pattern(64 * bs, 6);
    assert_eq!(write(q, 0, 64, &data, false), Ok(()));
    let mut want = data;
    if info.deallocate {
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 3, nlb: 18 }, LbaRange { lba: 40, nlb: 1 }],
        };
        assert_eq!(run(q, op, None).result, Ok(()), "deallocate");
        want[3 * bs..21 * bs].fill(0);
        want[40 * bs..41 * bs].fill(0);
    }
    if info.write_zeroes {
        let zeroing = [
            IoOp::WriteZeroes {
                lba: 48,
                nlb: 16,
                deallocate: false,
                fua: true,
            },
            IoOp::WriteZeroes {
                lba: 30,
                nlb: 2,
                deallocate: true,
                fua: false,
            },
        ];
        for op in zeroing {
            assert_eq!(run(q, op.clone(), None).result, Ok(()), "{op:?}");
        }
        want[30 * bs..32 * bs].fill(0);
        want[48 * bs..].fill(0);
    }
    assert_eq!(read(q, 0, 64, bs), want);
}

/// One step of the model test ([`model_ops`], [`check_against_model`]).
#[derive(Clone, Debug)]
pub enum ModelOp {
    /// Write `nlb` blocks at `lba` of [`pattern`]`(_, seed)` (FUA when the seed is even).
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
        /// Pattern seed.
        seed: u8,
    },
    /// Write Zeroes over `nlb` blocks at `lba`.
    WriteZeroes {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
        /// Allow deallocation instead of writing zeroes.
        deallocate: bool,
    },
    /// Deallocate `nlb` blocks at `lba`.
    Deallocate {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
    },
    /// Read `nlb` blocks at `lba` and compare with the model.
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
    },
}

/// Random operations on the first `blocks` blocks of a device.
pub fn model_ops(blocks: u64) -> impl Strategy<Value = Vec<ModelOp>> {
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

/// Applies `ops` to the first `blocks` blocks of the device and to a
/// `Vec<u8>` model; every read and a final read of the whole region must
/// match the model. Operations the device's [`BdevInfo`] does not promise
/// (Deallocate reading back zeroes, Write Zeroes) are left out.
pub fn check_against_model(dev: &dyn Bdev, blocks: u64, ops: &[ModelOp]) {
    let info = dev.info();
    let bs = info.block_size as usize;
    assert!(
        blocks <= info.num_blocks,
        "the model is larger than the device"
    );
    let mut q = open(dev);
    let mut model = read(&mut *q, 0, blocks as u32, bs);
    for op in ops {
        let (io, zeroed) = match *op {
            ModelOp::Write { lba, nlb, seed } => {
                let data = pattern(nlb as usize * bs, seed);
                assert_eq!(write(&mut *q, lba, nlb, &data, seed % 2 == 0), Ok(()));
                model[lba as usize * bs..][..data.len()].copy_from_slice(&data);
                continue;
            }
            ModelOp::Read { lba, nlb } => {
                let got = read(&mut *q, lba, nlb, bs);
                assert_eq!(
                    got,
                    model[lba as usize * bs..][..nlb as usize * bs],
                    "read {lba}+{nlb}"
                );
                continue;
            }
            ModelOp::WriteZeroes { .. } if !info.write_zeroes => continue,
            ModelOp::Deallocate { .. } if !info.deallocate => continue,
            ModelOp::WriteZeroes {
                lba,
                nlb,
                deallocate,
            } => (
                IoOp::WriteZeroes {
                    lba,
                    nlb,
                    deallocate,
                    fua: false,
                },
                (lba, nlb),
            ),
            ModelOp::Deallocate { lba, nlb } => (
                IoOp::Deallocate {
                    ranges: vec![LbaRange { lba, nlb }],
                },
                (lba, nlb),
            ),
        };
        assert_eq!(run(&mut *q, io.clone(), None).result, Ok(()), "{io:?}");
        let (lba, nlb) = zeroed;
        model[lba as usize * bs..][..nlb as usize * bs].fill(0);
    }
    assert_eq!(read(&mut *q, 0, blocks as u32, bs), model);
}

/// [`check_against_model`] on `cases` random sequences of [`model_ops`]
/// over the first `blocks` blocks of `dev` (which keeps its contents
/// between cases); a failure is shrunk to a minimal sequence and reported
/// in the panic message.
pub fn random_operations_match_a_model(dev: &dyn Bdev, blocks: u64, cases: u32) {
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let outcome = runner.run(&model_ops(blocks), |ops| {
        check_against_model(dev, blocks, &ops);
        Ok(())
    });
    if let Err(e) = outcome {
        panic!(
            "{}: random operations diverged from the model: {e}",
            dev.info().name
        );
    }
}

/// Block status of a fresh device: everything unallocated; after writing
/// blocks 64..72 and 200..201 those (and only those, up to the
/// backend's granularity `gran` blocks) are allocated; deallocating them
/// again brings the holes back. Runs always cover the asked range in order.
pub fn block_status_follows_writes_and_deallocation(dev: &dyn Bdev, gran: u64) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    let status = |q: &mut dyn BdevQueue, lba: u64, nlb: u32| -> Vec<Extent> {
        let mut out = Vec::new();
        assert!(q.block_status(lba, nlb, &mut out), "backend cannot tell");
        let covered: u64 = out.iter().map(|e| u64::from(e.nlb)).sum();
        assert!(covered >= 1 && covered <= u64::from(nlb), "{out:?}");
        out
    };
    let allocated = |ext: &[Extent], lba0: u64, lba: u64| -> bool {
        let mut at = lba0;
        for e in ext {
            if lba < at + u64::from(e.nlb) {
                return e.allocated;
            }
            at += u64::from(e.nlb);
        }
        panic!("lba {lba} not covered by {ext:?}");
    };
    assert_eq!(
        status(&mut *q, 0, 512),
        vec![Extent {
            nlb: 512,
            allocated: false
        }]
    );
    assert_eq!(write(&mut *q, 64, 8, &pattern(8 * bs, 1), false), Ok(()));
    assert_eq!(write(&mut *q, 200, 1, &pattern(bs, 2), false), Ok(()));
    let ext = status(&mut *q, 0, 512);
    for lba in (64..72).chain(200..201) {
        assert!(allocated(&ext, 0, lba), "lba {lba} written: {ext:?}");
    }
    for lba in [0, 63 - gran, 72 + gran, 199 - gran, 201 + gran, 511] {
        assert!(!allocated(&ext, 0, lba), "lba {lba} never written: {ext:?}");
    }
    // A query starting inside a run starts its first run there.
    let ext = status(&mut *q, 66, 10);
    assert!(ext[0].allocated && ext[0].nlb >= 6, "{ext:?}");
    let ranges = vec![
        LbaRange { lba: 0, nlb: 128 },
        LbaRange { lba: 192, nlb: 64 },
    ];
    assert_eq!(
        run(&mut *q, IoOp::Deallocate { ranges }, None).result,
        Ok(())
    );
    assert_eq!(
        status(&mut *q, 0, 512),
        vec![Extent {
            nlb: 512,
            allocated: false
        }]
    );
}

/// Splits `data` into segments of the given sizes (the last takes the rest).
fn segments(data: &[u8], sizes: &[usize]) -> (IoBuf, Vec<IoBuf>) {
    let mut bufs = Vec::new();
    let mut at = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let n = if i + 1 == sizes.len() {
            data.len() - at
        } else {
            n
        };
        bufs.push(IoBuf::from_slice(&data[at..at + n]));
        at += n;
    }
    let first = bufs.remove(0);
    (first, bufs)
}

/// Requests whose data is several segments (`IoRequest::more`) move the
/// same bytes as one buffer would, whether the queue takes them one by one
/// or bounces them; short segments and segments on other operations are
/// refused with `BadBuffer`; the completion hands back the first segment.
pub fn segmented_requests_match_one_buffer(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = open(dev);
    let nlb = 4u32;
    let len = nlb as usize * bs;
    let data = pattern(len, 91);
    // Written in uneven pieces (multiples of 512, not of the block size).
    let (first, more) = segments(&data, &[512, len / 2 - 512, 0]);
    q.submit(IoRequest {
        tag: 1,
        op: IoOp::Write {
            lba: 2,
            nlb,
            fua: true,
        },
        buf: Some(first),
        more,
    })
    .expect("queue has room");
    let mut out = Vec::new();
    poll_until(&mut *q, &mut out, 1);
    assert_eq!(out.pop().map(|c| c.result), Some(Ok(())));
    assert_eq!(read(&mut *q, 2, nlb, bs), data);
    // Read back into other pieces of one backing buffer, borrowed, so what
    // went into the later segments (dropped at completion) can be seen.
    let mut backing = vec![0u8; len];
    let base = backing.as_mut_ptr();
    let piece = |off: usize, n: usize| {
        let ptr = std::ptr::NonNull::new(base.wrapping_add(off)).expect("non-null");
        let owner: std::sync::Arc<dyn BufOwner> = std::sync::Arc::new(NoRelease);
        // SAFETY: `off + n <= len` puts the piece inside `backing`, which outlives the pieces (dropped at the completion below) and is untouched meanwhile; pieces do not overlap.
        unsafe { IoBuf::from_owner(ptr, n, owner) }
    };
    q.submit(IoRequest {
        tag: 2,
        op: IoOp::Read { lba: 2, nlb },
        buf: Some(piece(0, len - 1024)),
        more: vec![piece(len - 1024, 512), piece(len - 512, 512)],
    })
    .expect("queue has room");
    poll_until(&mut *q, &mut out, 1);
    let c = out.pop().expect("completion");
    assert_eq!(c.result, Ok(()));
    assert_eq!(
        c.buf.map(|b| b.len()),
        Some(len - 1024),
        "first segment handed back"
    );
    assert_eq!(backing, data);
    // Too little data in all the segments, and segments on a flush.
    let (first, more) = segments(&data[..len - 512], &[512, 0]);
    q.submit(IoRequest {
        tag: 3,
        op: IoOp::Write {
            lba: 2,
            nlb,
            fua: false,
        },
        buf: Some(first),
        more,
    })
    .expect("queue has room");
    q.submit(IoRequest {
        tag: 4,
        op: IoOp::Flush,
        buf: None,
        more: vec![IoBuf::new(512)],
    })
    .expect("queue has room");
    poll_until(&mut *q, &mut out, 2);
    let mut results: Vec<_> = out.drain(..).map(|c| (c.tag, c.result)).collect();
    results.sort_by_key(|r| r.0);
    assert_eq!(
        results,
        vec![(3, Err(IoError::BadBuffer)), (4, Err(IoError::BadBuffer))]
    );
    assert_eq!(
        read(&mut *q, 2, nlb, bs),
        data,
        "refused writes changed nothing"
    );
}

/// An owner with nothing to take back.
struct NoRelease;
impl BufOwner for NoRelease {}
