//! Test support shared by the backends' unit tests: running one request,
//! data patterns, the checks every built-in backend must pass (validation,
//! a bounded queue) and the random-operations model test.

use proptest::prelude::*;

use crate::{
    Bdev, BdevQueue, IoBuf, IoCompletion, IoError, IoOp, IoRequest, LbaRange, SubmitError,
};

/// Tag of the requests [`run`] submits.
pub(crate) const TAG: u64 = 7;

/// Submits one request, polls once and returns its completion.
pub(crate) fn run(q: &mut dyn BdevQueue, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
    q.submit(IoRequest {
        tag: TAG,
        op,
        buf,
        more: Vec::new(),
    })
    .expect("queue has room");
    let mut out = Vec::new();
    assert_eq!(q.poll(&mut out), 1);
    out.pop().expect("one completion")
}

/// Reads `nlb` blocks of `bs` bytes at `lba`, which must succeed.
pub(crate) fn read(q: &mut dyn BdevQueue, lba: u64, nlb: u32, bs: usize) -> Vec<u8> {
    let c = run(
        q,
        IoOp::Read { lba, nlb },
        Some(IoBuf::new(nlb as usize * bs)),
    );
    assert_eq!(c.result, Ok(()));
    c.buf.expect("buffer handed back").to_vec()
}

/// Writes `data` (`nlb` blocks) at `lba` and returns the outcome.
pub(crate) fn write(
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
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Every LBA range reaching past the end of `dev`, or overflowing, fails
/// with [`IoError::OutOfRange`], whatever the operation.
pub(crate) fn rejects_out_of_range(dev: &dyn Bdev) {
    let n = dev.info().num_blocks;
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().unwrap();
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
                ranges: vec![LbaRange {
                    lba: 0,
                    nlb: n as u32 + 1,
                }],
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
pub(crate) fn rejects_short_or_missing_buffer(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().unwrap();
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
        assert_eq!(run(&mut *q, op, None).result, Err(IoError::BadBuffer));
    }
}

/// A queue of `dev`, which must have been built with a queue depth of
/// `depth`, answers Busy with the request untouched once `depth`
/// completions wait, and takes requests again after a poll.
pub(crate) fn full_queue_is_busy_until_polled(dev: &dyn Bdev, depth: u64) {
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().unwrap();
    for tag in 0..depth {
        q.submit(IoRequest {
            tag,
            op: IoOp::Flush,
            buf: None,
            more: Vec::new(),
        })
        .unwrap();
    }
    assert_eq!(q.outstanding(), depth as usize);
    let busy = q.submit(IoRequest {
        tag: depth,
        op: IoOp::Read { lba: 0, nlb: 1 },
        buf: Some(IoBuf::new(bs)),
        more: Vec::new(),
    });
    let Err(SubmitError::Busy(req)) = busy else {
        panic!("a full queue accepted a request")
    };
    assert_eq!(req.tag, depth);
    assert!(req.buf.is_some(), "the request comes back untouched");
    let mut out = Vec::new();
    assert_eq!(q.poll(&mut out), depth as usize);
    assert_eq!(q.outstanding(), 0);
    q.submit(req).unwrap();
    assert_eq!(q.outstanding(), 1);
    assert_eq!(q.poll(&mut out), 1);
    let tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    assert_eq!(tags, (0..=depth).collect::<Vec<_>>());
}

/// Compare of `nlb` blocks at LBA 4 succeeds on the data written there and
/// fails with [`IoError::CompareFailure`] when the last block differs.
pub(crate) fn compare_reports_match_and_mismatch(dev: &dyn Bdev, nlb: u32) {
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().unwrap();
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

/// Writes a pattern over the first 64 blocks of 512 bytes, deallocates and
/// zeroes parts of it through `q`, and checks what reads back.
pub(crate) fn zeroing_reads_back_zeroes(q: &mut dyn BdevQueue) {
    let data = pattern(64 * 512, 6);
    assert_eq!(write(q, 0, 64, &data, false), Ok(()));
    let zeroing = [
        IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 3, nlb: 18 }, LbaRange { lba: 40, nlb: 1 }],
        },
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
        assert_eq!(run(q, op, None).result, Ok(()));
    }
    let mut want = data;
    want[3 * 512..21 * 512].fill(0);
    want[30 * 512..32 * 512].fill(0);
    want[40 * 512..41 * 512].fill(0);
    want[48 * 512..].fill(0);
    assert_eq!(read(q, 0, 64, 512), want);
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
        assert_eq!(run(&mut *q, io, None).result, Ok(()));
        let (lba, nlb) = zeroed;
        model[lba as usize * bs..][..nlb as usize * bs].fill(0);
    }
    assert_eq!(read(&mut *q, 0, blocks as u32, bs), model);
}

/// Block status of a fresh device: everything unallocated; after writing
/// blocks 64..72 and 200..201 those (and only those, up to the
/// backend's granularity `gran` blocks) are allocated; deallocating them
/// again brings the holes back. Runs always cover the asked range in order.
pub(crate) fn block_status_follows_writes_and_deallocation(dev: &dyn Bdev, gran: u64) {
    use crate::Extent;
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().unwrap();
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
        crate::LbaRange { lba: 0, nlb: 128 },
        crate::LbaRange { lba: 192, nlb: 64 },
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
pub(crate) fn segmented_requests_match_one_buffer(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().expect("queue");
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
    q.poll(&mut out);
    assert_eq!(out.pop().map(|c| c.result), Some(Ok(())));
    assert_eq!(read(&mut *q, 2, nlb, bs), data);
    // Read back into other pieces of one backing buffer, borrowed, so what
    // went into the later segments (dropped at completion) can be seen.
    let mut backing = vec![0u8; len];
    let base = backing.as_mut_ptr();
    let piece = |off: usize, n: usize| {
        let ptr = std::ptr::NonNull::new(base.wrapping_add(off)).expect("non-null");
        let owner: std::sync::Arc<dyn crate::BufOwner> = std::sync::Arc::new(NoRelease);
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
    q.poll(&mut out);
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
    q.poll(&mut out);
    let results: Vec<_> = out.drain(..).map(|c| (c.tag, c.result)).collect();
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
impl crate::BufOwner for NoRelease {}
