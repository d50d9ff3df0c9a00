//! End to end: our initiator library against the real `unvme target`
//! binary over loopback — random writes and read-back across sizes and
//! paths, digests, several I/O queues on several threads, many commands in
//! flight, and flush / write-zeroes / deallocate semantics on the ram and
//! file backends, and a remote namespace that reconnects without ever
//! blocking its I/O thread.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::TargetProc;
use unvme_bdev::{Bdev, IoBuf, IoCompletion, IoOp, IoRequest, LbaRange};
use unvme_initiator::{ConnectOptions, Controller, IoQpair, RemoteNamespace};
use unvme_proto::nvme::Status;
use unvme_proto::DEFAULT_SUBNQN;

fn opts(t: &TargetProc, hdr: bool, data: bool, queues: u16) -> ConnectOptions {
    ConnectOptions {
        addr: "127.0.0.1".into(),
        port: t.port(),
        subnqn: DEFAULT_SUBNQN.into(),
        hdr_digest: hdr,
        data_digest: data,
        num_io_queues: queues,
        command_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// A deterministic pattern for (lba, generation).
fn fill(buf: &mut [u8], lba: u64, gen: u64) {
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

fn sync(q: &mut IoQpair, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
    let c = q
        .run_sync(
            1,
            IoRequest {
                tag: 0,
                op,
                buf,
                more: Vec::new(),
            },
        )
        .expect("command runs");
    assert!(c.result.is_ok(), "command failed: {:?}", c.result);
    c
}

#[test]
fn random_writes_read_back_across_sizes_digests_and_queues() {
    let t = TargetProc::start(&["--ram", "256M"]);
    for (hdr, data, queues) in [
        (false, false, 1u16),
        (true, true, 4),
        (true, false, 2),
        (false, true, 1),
    ] {
        let ctrl = Controller::connect(opts(&t, hdr, data, queues)).expect("connect");
        assert!(ctrl.num_io_queues() >= queues);
        std::thread::scope(|s| {
            for qi in 0..queues {
                let ctrl = &ctrl;
                s.spawn(move || {
                    let mut q = ctrl.create_io_qpair().expect("I/O queue");
                    // Each thread owns a disjoint 32 MiB region.
                    let base = u64::from(qi) * 65536;
                    let sizes = [1u32, 8, 16, 17, 64, 255, 256, 1024, 2048];
                    let mut rng = fastrand::Rng::with_seed(u64::from(qi) + 7);
                    let mut lba = base;
                    let mut written = Vec::new();
                    for round in 0..3u64 {
                        for &nlb in &sizes {
                            let mut b = IoBuf::new(nlb as usize * 512);
                            fill(&mut b, lba, round);
                            sync(
                                &mut q,
                                IoOp::Write {
                                    lba,
                                    nlb,
                                    fua: rng.bool(),
                                },
                                Some(b),
                            );
                            written.push((lba, nlb, round));
                            lba += u64::from(nlb) + u64::from(rng.u32(0..8));
                        }
                    }
                    for (lba, nlb, gen) in written {
                        let c = sync(
                            &mut q,
                            IoOp::Read { lba, nlb },
                            Some(IoBuf::new(nlb as usize * 512)),
                        );
                        let mut want = vec![0u8; nlb as usize * 512];
                        fill(&mut want, lba, gen);
                        assert!(
                            c.buf.as_deref() == Some(&want[..]),
                            "lba {lba} nlb {nlb}: read-back differs (q{qi})"
                        );
                    }
                });
            }
        });
        ctrl.disconnect().expect("disconnect");
    }
}

/// An owner with nothing to take back: test buffers borrowed from a `Vec`.
struct Borrowed;
impl unvme_bdev::BufOwner for Borrowed {}

/// Splits `mem` into borrowed segments of random byte lengths (some
/// empty): the first and the rest, as an `IoRequest` takes them.
///
/// # Safety
/// `mem` must outlive the buffers and stay untouched while they live.
unsafe fn split(mem: &mut [u8], rng: &mut fastrand::Rng) -> (IoBuf, Vec<IoBuf>) {
    let owner: std::sync::Arc<dyn unvme_bdev::BufOwner> = std::sync::Arc::new(Borrowed);
    let mut cuts: Vec<usize> = (0..rng.usize(0..7))
        .map(|_| rng.usize(0..=mem.len()))
        .collect();
    cuts.push(0);
    cuts.push(mem.len());
    cuts.sort_unstable();
    let base = mem.as_mut_ptr();
    let mut segs: Vec<IoBuf> = cuts
        .windows(2)
        .map(|w| {
            let ptr = std::ptr::NonNull::new(base.wrapping_add(w[0])).expect("non-null");
            // SAFETY: `w[0]..w[1]` lies inside `mem`, pieces do not overlap, and the caller keeps `mem` alive and untouched meanwhile.
            unsafe { IoBuf::from_owner(ptr, w[1] - w[0], owner.clone()) }
        })
        .collect();
    let first = segs.remove(0);
    (first, segs)
}

#[test]
fn scattered_data_segments_go_out_and_come_back_in_place() {
    let t = TargetProc::start(&["--ram", "64M"]);
    for (hdr, data) in [(false, false), (true, true)] {
        let ctrl = Controller::connect(opts(&t, hdr, data, 1)).expect("connect");
        let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
        assert!(ns.open_queue().expect("queue").max_segments() >= 64);
        let mut q = ctrl.create_io_qpair().expect("queue");
        let mut rng = fastrand::Rng::with_seed(11);
        let mut lba = 0u64;
        // In-capsule (<= 8 KiB) and R2T sizes, one past several boundaries.
        for nlb in [1u32, 9, 16, 17, 64, 300, 2048] {
            for round in 0..4u64 {
                let len = nlb as usize * 512;
                let mut want = vec![0u8; len];
                fill(&mut want, lba, round);
                let mut src = want.clone();
                // SAFETY: `src` outlives the request (run_sync returns after its completion, which drops the segments) and is untouched meanwhile.
                let (first, more) = unsafe { split(&mut src, &mut rng) };
                let op = IoOp::Write {
                    lba,
                    nlb,
                    fua: false,
                };
                let c = q
                    .run_sync(
                        1,
                        IoRequest {
                            tag: 1,
                            op,
                            buf: Some(first),
                            more,
                        },
                    )
                    .expect("write runs");
                assert_eq!(c.result, Ok(()), "write nlb {nlb}");
                drop(c);
                let mut dst = vec![0u8; len];
                // SAFETY: as for `src`.
                let (first, more) = unsafe { split(&mut dst, &mut rng) };
                let c = q
                    .run_sync(
                        1,
                        IoRequest {
                            tag: 2,
                            op: IoOp::Read { lba, nlb },
                            buf: Some(first),
                            more,
                        },
                    )
                    .expect("read runs");
                assert_eq!(c.result, Ok(()), "read nlb {nlb}");
                drop(c);
                assert!(
                    dst == want,
                    "nlb {nlb} round {round}: scattered read-back differs"
                );
                // And a contiguous read agrees.
                let c = sync(&mut q, IoOp::Read { lba, nlb }, Some(IoBuf::new(len)));
                assert!(
                    c.buf.as_deref() == Some(&want[..]),
                    "nlb {nlb}: contiguous read-back differs"
                );
                lba += u64::from(nlb);
            }
        }
        // Segments holding less than the transfer: refused, nothing sent.
        let c = q
            .run_sync(
                1,
                IoRequest {
                    tag: 3,
                    op: IoOp::Read { lba: 0, nlb: 4 },
                    buf: Some(IoBuf::new(1024)),
                    more: vec![IoBuf::new(512)],
                },
            )
            .expect("completes");
        assert_eq!(c.result, Err(unvme_bdev::IoError::BadBuffer));
        // More segments than the queue takes: refused too.
        let max = ns.open_queue().expect("queue").max_segments();
        let c = q
            .run_sync(
                1,
                IoRequest {
                    tag: 4,
                    op: IoOp::Read { lba: 0, nlb: 1 },
                    buf: Some(IoBuf::new(512)),
                    more: (0..max).map(|_| IoBuf::new(0)).collect(),
                },
            )
            .expect("completes");
        assert_eq!(c.result, Err(unvme_bdev::IoError::BadBuffer));
        drop(ns);
        ctrl.disconnect().expect("disconnect");
    }
}

#[test]
fn many_commands_in_flight_complete_out_of_order_with_the_right_data() {
    let t = TargetProc::start(&["--ram", "64M", "--queue-size", "128"]);
    let ctrl = Controller::connect(ConnectOptions {
        io_queue_size: 128,
        ..opts(&t, false, false, 1)
    })
    .expect("connect");
    let mut q = ctrl.create_io_qpair().expect("queue");
    let depth = q.depth().min(127);
    assert!(depth >= 64, "queue depth {depth}");
    // Phase 1: `depth` writes in flight at once, mixed sizes (in-capsule and R2T).
    let mut expect: HashMap<u64, (u64, u32)> = HashMap::new();
    for i in 0..depth as u64 {
        let nlb = if i % 3 == 0 { 64 } else { 8 };
        let lba = i * 128;
        let mut b = IoBuf::new(nlb as usize * 512);
        fill(&mut b, lba, 1);
        q.submit(
            1,
            IoRequest {
                tag: i,
                op: IoOp::Write {
                    lba,
                    nlb,
                    fua: false,
                },
                buf: Some(b),
                more: Vec::new(),
            },
        )
        .expect("slot free");
        expect.insert(i, (lba, nlb));
    }
    let mut comps = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while comps.len() < depth {
        q.poll(&mut comps);
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not complete"
        );
    }
    assert!(comps.iter().all(|c| c.result.is_ok()));
    // Phase 2: the same with reads.
    comps.clear();
    for (&tag, &(lba, nlb)) in &expect {
        q.submit(
            1,
            IoRequest {
                tag,
                op: IoOp::Read { lba, nlb },
                buf: Some(IoBuf::new(nlb as usize * 512)),
                more: Vec::new(),
            },
        )
        .expect("slot free");
    }
    while comps.len() < depth {
        q.poll(&mut comps);
        assert!(
            std::time::Instant::now() < deadline,
            "reads did not complete"
        );
    }
    for c in comps {
        let (lba, nlb) = expect[&c.tag];
        let mut want = vec![0u8; nlb as usize * 512];
        fill(&mut want, lba, 1);
        assert!(c.result.is_ok());
        assert!(
            c.buf.as_deref() == Some(&want[..]),
            "tag {} read-back differs",
            c.tag
        );
    }
}

fn semantics(t: &TargetProc) {
    let ctrl = Controller::connect(opts(t, false, false, 1)).expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let info = ns.info().clone();
    assert_eq!(info.block_size, 512);
    // A remote queue gives callers its socket to sleep on; local ones need none.
    assert!(ns.open_queue().expect("bdev queue").wait_fd().is_some());
    assert!(unvme_bdev::from_spec("ram:1M")
        .unwrap()
        .open_queue()
        .unwrap()
        .wait_fd()
        .is_none());
    let mut q = ctrl.create_io_qpair().expect("queue");
    let mut b = IoBuf::new(64 * 512);
    fill(&mut b, 0, 5);
    let data = b.to_vec();
    sync(
        &mut q,
        IoOp::Write {
            lba: 0,
            nlb: 64,
            fua: false,
        },
        Some(b),
    );
    sync(&mut q, IoOp::Flush, None);
    // Write zeroes over blocks 8..16, deallocate 32..48.
    sync(
        &mut q,
        IoOp::WriteZeroes {
            lba: 8,
            nlb: 8,
            deallocate: false,
            fua: false,
        },
        None,
    );
    sync(
        &mut q,
        IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 32, nlb: 16 }],
        },
        None,
    );
    let c = sync(
        &mut q,
        IoOp::Read { lba: 0, nlb: 64 },
        Some(IoBuf::new(64 * 512)),
    );
    let got = c.buf.expect("buffer back");
    for blk in 0..64usize {
        let g = &got[blk * 512..(blk + 1) * 512];
        if (8..16).contains(&blk) || (32..48).contains(&blk) {
            assert!(g.iter().all(|&x| x == 0), "block {blk} should read zeroes");
        } else {
            assert_eq!(
                g,
                &data[blk * 512..(blk + 1) * 512],
                "block {blk} must be untouched"
            );
        }
    }
    // A read past the end: "LBA Out of Range (80h): the command references
    // an LBA that exceeds the size of the namespace" (NVMe Base 1.4,
    // Generic Command Status Values, NVM Command Set), on every backend:
    // not Capacity Exceeded (81h, Linux nvmet on a file), which is about
    // NUSE exceeding NCAP.
    let read_past_end = IoRequest::new(
        1,
        IoOp::Read {
            lba: info.num_blocks,
            nlb: 1,
        },
        Some(IoBuf::new(512)),
    );
    q.submit(1, read_past_end).expect("an idle queue has room");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while q.poll_nvme(&mut out) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a read past the end neither completed nor failed"
        );
        q.wait(100);
    }
    let c = out.pop().expect("one completion");
    let st = c.status().expect("the target answered with a CQE");
    assert!(st.same_code(Status::LBA_OUT_OF_RANGE), "{st}");
    assert!(st.dnr, "retrying cannot help: DNR is set");
    assert_eq!(c.result, Err(unvme_bdev::IoError::OutOfRange));
    ctrl.disconnect().expect("disconnect");
}

#[test]
fn flush_write_zeroes_and_deallocate_semantics_on_ram() {
    let t = TargetProc::start(&["--ram", "16M"]);
    semantics(&t);
}

#[test]
fn flush_write_zeroes_and_deallocate_semantics_on_file_and_data_survives_restart() {
    let dir = std::env::temp_dir().join(format!("unvme-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("ns.img");
    let spec = format!("{}:512:create=16M", img.display());
    let t = TargetProc::start(&["--file", &spec]);
    semantics(&t);
    // Write, then restart the target: the acknowledged (flushed) data is there.
    let ctrl = Controller::connect(opts(&t, false, false, 1)).expect("connect");
    let mut q = ctrl.create_io_qpair().expect("queue");
    let mut b = IoBuf::new(4096);
    fill(&mut b, 1000, 9);
    let want = b.to_vec();
    sync(
        &mut q,
        IoOp::Write {
            lba: 1000,
            nlb: 8,
            fua: true,
        },
        Some(b),
    );
    drop(q);
    ctrl.disconnect().expect("disconnect");
    assert!(t.stop().success());
    let t = TargetProc::start(&["--file", &format!("{}:512", img.display())]);
    let ctrl = Controller::connect(opts(&t, false, false, 1)).expect("reconnect");
    let mut q = ctrl.create_io_qpair().expect("queue");
    let c = sync(
        &mut q,
        IoOp::Read { lba: 1000, nlb: 8 },
        Some(IoBuf::new(4096)),
    );
    assert!(
        c.buf.as_deref() == Some(&want[..]),
        "data lost across a target restart"
    );
    drop(q);
    drop(ctrl);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn target_vanishing_mid_io_fails_commands_instead_of_hanging() {
    let t = TargetProc::start(&["--ram", "16M"]);
    let ctrl = Controller::connect(ConnectOptions {
        command_timeout: Duration::from_secs(5),
        ..opts(&t, false, false, 1)
    })
    .expect("connect");
    let mut q = ctrl.create_io_qpair().expect("queue");
    for i in 0..16 {
        q.submit(
            1,
            IoRequest {
                tag: i,
                op: IoOp::Read { lba: i * 8, nlb: 8 },
                buf: Some(IoBuf::new(4096)),
                more: Vec::new(),
            },
        )
        .unwrap();
    }
    drop(t); // SIGKILL
    let mut comps = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while comps.len() < 16 && std::time::Instant::now() < deadline {
        q.poll(&mut comps);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        comps.len(),
        16,
        "every command completes (successfully or not)"
    );
    let res = q.run_sync(
        1,
        IoRequest {
            tag: 99,
            op: IoOp::Flush,
            buf: None,
            more: Vec::new(),
        },
    );
    // Not refused (the queue has room) but completed at once with
    // Unavailable, as IoQpair::is_closed promises.
    assert!(q.is_closed(), "the queue pair knows its connection ended");
    let c = res.expect("a closed queue still takes commands");
    assert_eq!(
        c.result,
        Err(unvme_bdev::IoError::Unavailable),
        "a dead queue fails new commands"
    );
}

#[test]
fn remote_namespace_with_fail_fast_recovery_fails_while_the_target_is_down_and_reconnects_when_it_returns(
) {
    let dir = std::env::temp_dir().join(format!("unvme-e2e-rc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("ns.img");
    let t = TargetProc::start(&["--file", &format!("{}:512:create=8M", img.display())]);
    let listen = t.addr.to_string();
    let ctrl = Controller::connect(ConnectOptions {
        command_timeout: Duration::from_secs(5),
        kato_ms: 0,
        recovery: unvme_initiator::Recovery::FAIL_FAST,
        ..opts(&t, false, false, 2)
    })
    .expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let mut q = ns.open_queue().expect("queue");
    let run =
        |q: &mut Box<dyn unvme_bdev::BdevQueue>, op: IoOp, buf: Option<IoBuf>| -> IoCompletion {
            q.submit(IoRequest {
                tag: 1,
                op,
                buf,
                more: Vec::new(),
            })
            .expect("accepted");
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while out.is_empty() {
                q.poll(&mut out);
                assert!(
                    std::time::Instant::now() < deadline,
                    "request neither completed nor failed"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
            out.pop().unwrap()
        };
    let mut b = IoBuf::new(4096);
    fill(&mut b, 7, 7);
    let want = b.to_vec();
    assert!(run(
        &mut q,
        IoOp::Write {
            lba: 7,
            nlb: 8,
            fua: true
        },
        Some(b)
    )
    .result
    .is_ok());
    assert!(t.stop().success());
    // Target down: requests fail (Unavailable) instead of hanging.
    let c = run(
        &mut q,
        IoOp::Read { lba: 7, nlb: 8 },
        Some(IoBuf::new(4096)),
    );
    assert_eq!(
        c.result,
        Err(unvme_bdev::IoError::Unavailable),
        "read with the target down must fail"
    );
    let c = run(
        &mut q,
        IoOp::Read { lba: 7, nlb: 8 },
        Some(IoBuf::new(4096)),
    );
    assert_eq!(c.result, Err(unvme_bdev::IoError::Unavailable));
    // Target back on the same address: the same queue object recovers.
    let t2 = TargetProc::start_on(&listen, &["--file", &format!("{}:512", img.display())]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c = run(
            &mut q,
            IoOp::Read { lba: 7, nlb: 8 },
            Some(IoBuf::new(4096)),
        );
        if c.result.is_ok() {
            assert!(
                c.buf.as_deref() == Some(&want[..]),
                "data read after reconnection differs"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queue did not reconnect: {:?}",
            c.result
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(q);
    drop(ns);
    drop(ctrl);
    drop(t2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn remote_namespace_never_blocks_io_while_reconnecting_to_a_silent_target() {
    let t = TargetProc::start(&["--ram", "8M"]);
    let listen = t.addr;
    let ctrl = Controller::connect(ConnectOptions {
        command_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(3),
        kato_ms: 0,
        recovery: unvme_initiator::Recovery::FAIL_FAST,
        ..opts(&t, false, false, 1)
    })
    .expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let mut q = ns.open_queue().expect("queue");
    assert!(t.stop().success());
    // The address now accepts TCP connections but never answers ICReq: a
    // reconnection attempt there takes the whole connect timeout (3 s).
    let silent = std::net::TcpListener::bind(listen).expect("rebind the target's address");
    silent.set_nonblocking(true).unwrap();
    let mut held = Vec::new();
    let start = std::time::Instant::now();
    let mut failed = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok((s, _)) = silent.accept() {
            held.push(s);
        }
        let t0 = std::time::Instant::now();
        q.submit(IoRequest {
            tag: 9,
            op: IoOp::Read { lba: 0, nlb: 8 },
            buf: Some(IoBuf::new(4096)),
            more: Vec::new(),
        })
        .expect("accepted");
        let mut out = Vec::new();
        while out.is_empty() {
            q.poll(&mut out);
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "a request waited on the reconnection to a silent target"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out[0].result, Err(unvme_bdev::IoError::Unavailable));
        failed += 1;
    }
    assert!(
        !held.is_empty(),
        "no reconnection attempt reached the silent target"
    );
    assert!(failed > 50, "only {failed} requests completed in 2 s");
}
