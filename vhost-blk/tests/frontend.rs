//! An in-process vhost-user frontend against the real device: shared
//! memory, rings and eventfds set up the way QEMU sets them up (through the
//! `vhost` crate's frontend side of the protocol), then virtio-blk requests
//! of every type on the rings, checking data, status and used lengths.
//! Runs without QEMU.

mod common;

use common::*;
use unvme_vhost_blk::{req_type, DeviceOptions, DiscardWriteZeroes, Status};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Address, Bytes, GuestAddress};

#[test]
fn frontend_sees_the_config_space_and_every_request_type_completes() {
    let (server, sock) = start("types", 1, 16384);
    let mut g = Guest::connect(&sock, 1);

    let (_, cfg) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("get_config");
    assert_eq!(&cfg[0..8], &16384u64.to_le_bytes());
    assert_eq!(&cfg[20..24], &512u32.to_le_bytes());
    assert_eq!(&cfg[34..36], &1u16.to_le_bytes());

    // OUT then IN.
    let data = pattern(64 << 10, 1);
    let h = g.put(&hdr(req_type::OUT, 128));
    let d = g.put(&data);
    let s = g.buf(1);
    assert_eq!(
        g.request(
            0,
            &[(h, 16, false), (d, data.len() as u32, false), (s, 1, true)]
        ),
        (Status::Ok as u8, 1)
    );
    let h = g.put(&hdr(req_type::IN, 128));
    let d = g.buf(data.len());
    let s = g.buf(1);
    let (st, used) = g.request(
        0,
        &[(h, 16, false), (d, data.len() as u32, true), (s, 1, true)],
    );
    assert_eq!((st, used), (Status::Ok as u8, data.len() as u32 + 1));
    let mut got = vec![0u8; data.len()];
    g.mem.read_slice(&mut got, d).expect("read back");
    assert_eq!(got, data);

    // FLUSH, GET_ID.
    let h = g.put(&hdr(req_type::FLUSH, 0));
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (s, 1, true)]).0,
        Status::Ok as u8
    );
    let h = g.put(&hdr(req_type::GET_ID, 0));
    let id = g.buf(20);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (id, 20, true), (s, 1, true)]),
        (Status::Ok as u8, 21)
    );
    let mut idb = [0u8; 20];
    g.mem.read_slice(&mut idb, id).expect("id");
    assert_eq!(&idb[..6], b"fe-ram");

    // DISCARD and WRITE_ZEROES zero their ranges.
    let h = g.put(&hdr(req_type::DISCARD, 0));
    let seg = g.put(
        &DiscardWriteZeroes {
            sector: 128,
            num_sectors: 8,
            flags: 0,
        }
        .encode(),
    );
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (seg, 16, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    let h = g.put(&hdr(req_type::WRITE_ZEROES, 0));
    let seg = g.put(
        &DiscardWriteZeroes {
            sector: 144,
            num_sectors: 8,
            flags: DiscardWriteZeroes::FLAG_UNMAP,
        }
        .encode(),
    );
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (seg, 16, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    let h = g.put(&hdr(req_type::IN, 128));
    let d = g.buf(12288);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 12288, true), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    let mut got = vec![0u8; 12288];
    g.mem.read_slice(&mut got, d).expect("read back");
    let mut want = data[..12288].to_vec();
    want[..4096].fill(0);
    want[8192..].fill(0);
    assert_eq!(got, want);

    // Bad requests get statuses and the device keeps serving.
    let h = g.put(&hdr(77, 0));
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (s, 1, true)]).0,
        Status::Unsupp as u8
    );
    let h = g.put(&hdr(req_type::IN, 0));
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 8, false), (s, 1, true)]).0,
        Status::IoErr as u8
    );
    let h = g.put(&hdr(req_type::IN, 16383));
    let d = g.buf(1024);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 1024, true), (s, 1, true)])
            .0,
        Status::IoErr as u8
    );
    let h = g.put(&hdr(req_type::IN, 0));
    let s = g.buf(1);
    assert_eq!(
        g.request(
            0,
            &[
                (h, 16, false),
                (GuestAddress(1 << 40), 512, true),
                (s, 1, true)
            ]
        )
        .0,
        Status::IoErr as u8
    );
    let h = g.put(&hdr(req_type::FLUSH, 0));
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (s, 1, true)]).0,
        Status::Ok as u8
    );

    // Stop the ring the way QEMU does: the base covers every request.
    let base = g.fe.get_vring_base(0).expect("get_vring_base");
    assert_eq!(base, u32::from(g.rings[0].submitted));
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn two_queues_serve_many_requests_in_flight_at_once() {
    let (server, sock) = start("mq", 2, 1 << 16);
    let mut g = Guest::connect(&sock, 2);
    // 32 writes of 4 KiB per queue, all posted before one kick.
    for q in 0..2 {
        for i in 0..32u64 {
            let sector = (q as u64 * 32 + i) * 8;
            let h = g.put(&hdr(req_type::OUT, sector));
            let d = g.put(&pattern(4096, (q as u64 * 32 + i) as u8));
            let s = g.buf(1);
            g.post(q, &[(h, 16, false), (d, 4096, false), (s, 1, true)]);
        }
        g.kick(q);
    }
    for q in 0..2 {
        let used = g.wait_used(q);
        assert_eq!(used.len(), 32);
        assert!(used.iter().all(|u| u.1 == 1));
    }
    // Read all 64 back through queue 1 in one batch.
    let mut reads = Vec::new();
    for n in 0..64u64 {
        let h = g.put(&hdr(req_type::IN, n * 8));
        let d = g.buf(4096);
        let s = g.buf(1);
        g.mem.write_obj(0xffu8, s).expect("status");
        g.post(1, &[(h, 16, false), (d, 4096, true), (s, 1, true)]);
        reads.push((n, d, s));
    }
    g.kick(1);
    let used = g.wait_used(1);
    assert_eq!(used.len(), 96);
    for (n, d, s) in reads {
        assert_eq!(g.mem.read_obj::<u8>(s).expect("status"), Status::Ok as u8);
        let mut got = vec![0u8; 4096];
        g.mem.read_slice(&mut got, d).expect("read back");
        assert_eq!(got, pattern(4096, n as u8), "block {n}");
    }
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn device_accepts_a_new_frontend_after_the_first_disconnects() {
    let (server, sock) = start("reconnect", 1, 4096);
    for round in 0..2u8 {
        let mut g = Guest::connect(&sock, 1);
        let h = g.put(&hdr(req_type::OUT, 0));
        let d = g.put(&[round; 512]);
        let s = g.buf(1);
        assert_eq!(
            g.request(0, &[(h, 16, false), (d, 512, false), (s, 1, true)])
                .0,
            Status::Ok as u8
        );
        drop(g);
    }
    // Data written by the first connection is still there for the next.
    let mut g = Guest::connect(&sock, 1);
    let h = g.put(&hdr(req_type::IN, 0));
    let d = g.buf(512);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 512, true), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    let mut got = [0u8; 512];
    g.mem.read_slice(&mut got, d).expect("read back");
    assert_eq!(got, [1u8; 512]);
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let (server, sock) = start("eventidx", 1, 4096);
    let mut g = Guest::connect(&sock, 1);
    // Ask for an interrupt only after the 100th completion.
    g.mem
        .write_obj(
            99u16,
            g.rings[0]
                .base
                .unchecked_add(AVAIL + 4 + 2 * u64::from(QSIZE)),
        )
        .expect("used_event");
    let flush = |g: &mut Guest| {
        let h = g.put(&hdr(req_type::FLUSH, 0));
        let s = g.buf(1);
        g.post(0, &[(h, 16, false), (s, 1, true)]);
        g.kick(0);
    };
    flush(&mut g);
    g.wait_used_idx(0, 1);
    // A queue decides whether to interrupt right after it puts a batch on
    // the used ring, before it takes more chains: once the flush posted
    // after the first one has completed, that decision has been made.
    flush(&mut g);
    g.wait_used_idx(0, 2);
    assert!(
        g.rings[0].call.read().is_err(),
        "interrupt the driver did not ask for"
    );
    // The interrupt it does ask for comes, alone.
    g.set_used_event(0, 2);
    flush(&mut g);
    assert_eq!(g.wait_call(0), 1, "interrupts for the third completion");
    assert_eq!(g.used_idx(0), 3);
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn poll_mode_serves_requests_and_stops_with_the_connection() {
    let opts = DeviceOptions {
        num_queues: 2,
        poll: true,
        ..DeviceOptions::default()
    };
    let (server, sock) = start_with("poll", 4096, opts);
    let mut g = Guest::connect(&sock, 2);
    for q in 0..2 {
        let data = pattern(4096, q as u8);
        let h = g.put(&hdr(req_type::OUT, 8 * q as u64));
        let d = g.put(&data);
        let s = g.buf(1);
        assert_eq!(
            g.request(q, &[(h, 16, false), (d, 4096, false), (s, 1, true)])
                .0,
            Status::Ok as u8
        );
        let h = g.put(&hdr(req_type::IN, 8 * q as u64));
        let d = g.buf(4096);
        let s = g.buf(1);
        assert_eq!(
            g.request(q, &[(h, 16, false), (d, 4096, true), (s, 1, true)]),
            (Status::Ok as u8, 4097)
        );
        let mut got = vec![0u8; 4096];
        g.mem.read_slice(&mut got, d).expect("read back");
        assert_eq!(got, data);
    }
    // QEMU stops rings with GET_VRING_BASE: a spinning queue must let go.
    assert_eq!(g.fe.get_vring_base(0).expect("stop ring 0"), 2);
    drop(g);
    // The spinning queue threads end with the connection.
    server.shutdown().expect("shutdown");
}
