//! Hostile hosts against the real `unvme target` binary (issue #11): each
//! test plays an attacker over a real socket and asserts what the target
//! promises instead: bounded memory (VmRSS from /proc), other hosts still
//! served, limits answered as the spec says, and no socket held forever.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{spawn_listening, RawHost, Rx, TargetProc, HOSTNQN};
use unvme_proto::admin;
use unvme_proto::fabrics::PropertyCmd;
use unvme_proto::nvme::{io_opc, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{self, fes, CapsuleCmd, DataPdu, Pdu};
use unvme_proto::DEFAULT_SUBNQN;

const MIB: usize = 1 << 20;

/// Resident set of process `pid`, bytes.
fn rss(pid: u32) -> usize {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// A TOML file with `body`, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(name: &str, body: &str) -> TempConfig {
        let p =
            std::env::temp_dir().join(format!("unvme-hostile-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, body).expect("write config");
        TempConfig(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A target with one reactor and the limits of `toml` (empty: defaults).
fn target_1r(name: &str, toml: &str) -> (TargetProc, TempConfig) {
    let cfg = TempConfig::new(name, toml);
    let (child, addr) = spawn_listening(&[
        "target",
        "--listen",
        "127.0.0.1:0",
        "--reactors",
        "1",
        "--config",
        cfg.path(),
    ]);
    (TargetProc { child, addr }, cfg)
}

fn rw_sqe(opc: u8, cid: u16, lba: u64, len: u32) -> Sqe {
    let mut s = Sqe {
        opc,
        cid,
        nsid: 1,
        ..Default::default()
    };
    s.set_lba_range(lba, len / 512);
    s.set_sgl(SglDescriptor::transport(len));
    s
}

fn capsule(h: &mut RawHost, sqe: Sqe) {
    h.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len: 0 }), &[]);
}

/// An I/O queue `qid` of controller `cntlid` with `entries` entries.
fn io_queue(addr: SocketAddr, cntlid: u16, qid: u16, entries: u16) -> RawHost {
    let mut h = RawHost::connect(addr);
    h.ic(false, false);
    let c = h.fabrics_connect(qid, DEFAULT_SUBNQN, HOSTNQN, cntlid, entries);
    assert!(c.status().is_success(), "io connect: {}", c.status());
    h.cntlid = cntlid;
    h
}

/// Sends the H2CData answering an R2T for `cid`/`ttag` of `len` bytes.
fn send_h2c(h: &mut RawHost, cid: u16, ttag: u16, len: usize, byte: u8) {
    let data = vec![byte; len];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(h.maxh2cdata as usize);
        let dp = DataPdu {
            cccid: cid,
            ttag,
            datao: off as u32,
            datal: n as u32,
            last: off + n == len,
            success: false,
        };
        h.send(&Pdu::H2cData(dp), &data[off..off + n]);
        off += n;
    }
}

/// Sends a Flush with `cid` and collects every R2T (cccid, ttag) received
/// before its response, which comes once everything sent before it has
/// been decoded.
fn r2ts_before_flush(h: &mut RawHost, cid: u16) -> Vec<(u16, u16)> {
    let s = Sqe {
        opc: io_opc::FLUSH,
        cid,
        nsid: 1,
        ..Default::default()
    };
    capsule(h, s);
    let mut r2ts = Vec::new();
    loop {
        match h.recv_pdu().0 {
            Pdu::R2t(r) => {
                assert_eq!(r.r2to, 0);
                r2ts.push((r.cccid, r.ttag));
            }
            Pdu::CapsuleResp(r) if r.cqe.cid == cid => {
                assert!(r.cqe.status().is_success(), "flush: {}", r.cqe.status());
                return r2ts;
            }
            other => panic!("unexpected PDU {other:?}"),
        }
    }
}

/// A normal host still gets its data written and read back.
fn served(addr: SocketAddr, cntlid: u16, qid: u16) {
    let mut h = io_queue(addr, cntlid, qid, 32);
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    capsule(&mut h, rw_sqe(io_opc::WRITE, 1, 4096, data.len() as u32));
    let c = h.wait_resp(1, &data).0;
    assert!(c.status().is_success(), "write: {}", c.status());
    capsule(&mut h, rw_sqe(io_opc::READ, 2, 4096, data.len() as u32));
    let (c, back) = h.wait_resp(2, &[]);
    assert!(c.status().is_success(), "read: {}", c.status());
    assert!(back == data, "read-back differs");
}

#[test]
fn write_capsules_without_data_hold_bounded_memory() {
    // The attack: Connect, then 120 write capsules of 1 MiB with transport
    // SGLs on each of 4 queues, never sending H2CData. It used to make the
    // target allocate every buffer (~120 MiB a queue); now a queue holds at
    // most its transfer budget (8 MiB by default) and the rest wait.
    let t = TargetProc::start(&["--ram", "512M"]);
    let admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let pid = t.child.id();
    let before = rss(pid);
    let mut queues = Vec::new();
    for qid in 1..=4u16 {
        let mut h = io_queue(t.addr, admin_q.cntlid, qid, 128);
        for cid in 0..120u16 {
            capsule(
                &mut h,
                rw_sqe(io_opc::WRITE, cid, u64::from(cid) * 2048, MIB as u32),
            );
        }
        let r2ts = r2ts_before_flush(&mut h, 1000);
        let cids: Vec<u16> = r2ts.iter().map(|r| r.0).collect();
        assert_eq!(
            cids,
            (0..8).collect::<Vec<_>>(),
            "R2Ts only within the 8 MiB budget, in order"
        );
        queues.push((h, r2ts));
    }
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 64 * MIB,
        "target RSS grew by {} MiB under 4×120 MiB of unanswered writes",
        grown / MIB
    );
    // The budget frees as data arrives, and the waiting R2Ts follow in order.
    let (h, r2ts) = &mut queues[0];
    for &(cid, ttag) in r2ts.iter() {
        send_h2c(h, cid, ttag, MIB, cid as u8);
    }
    let mut done = 0;
    let mut next = Vec::new();
    while done < 8 || next.len() < 8 {
        match h.recv_pdu().0 {
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.cid < 8 && r.cqe.status().is_success());
                done += 1;
            }
            Pdu::R2t(r) => next.push(r.cccid),
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    assert_eq!(next, (8..16).collect::<Vec<_>>());
    // Another host is served meanwhile.
    served(t.addr, admin_q.cntlid, 5);
    drop(queues);
    drop(admin_q);
    assert!(t.stop().success());
}

#[test]
fn the_reactor_budget_holds_across_connections_and_frees_on_close() {
    let (t, _cfg) = target_1r(
        "reactor-budget",
        "max_transfer_bytes_per_connection = 2097152\nmax_transfer_bytes_per_reactor = 4194304\n",
    );
    let admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut a = io_queue(t.addr, admin_q.cntlid, 1, 32);
    let mut b = io_queue(t.addr, admin_q.cntlid, 2, 32);
    let mut c = io_queue(t.addr, admin_q.cntlid, 3, 32);
    for h in [&mut a, &mut b, &mut c] {
        for cid in 0..4u16 {
            capsule(
                h,
                rw_sqe(io_opc::WRITE, cid, u64::from(cid) * 2048, MIB as u32),
            );
        }
    }
    assert_eq!(
        r2ts_before_flush(&mut a, 100).len(),
        2,
        "per-connection cap"
    );
    assert_eq!(
        r2ts_before_flush(&mut b, 100).len(),
        2,
        "per-connection cap"
    );
    assert!(
        r2ts_before_flush(&mut c, 100).is_empty(),
        "the reactor budget is spent"
    );
    // B goes away without sending data: its budget returns and C's first
    // writes get their R2Ts, which C answers.
    drop(b);
    let mut got = Vec::new();
    while got.len() < 2 {
        match c.recv_pdu().0 {
            Pdu::R2t(r) => got.push((r.cccid, r.ttag)),
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1]);
    for &(cid, ttag) in &got {
        send_h2c(&mut c, cid, ttag, MIB, 0x5a);
    }
    let mut ok = 0;
    while ok < 2 {
        match c.recv_pdu().0 {
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.status().is_success());
                ok += 1;
            }
            Pdu::R2t(_) => {}
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    drop((a, c, admin_q));
    assert!(t.stop().success());
}

#[test]
fn a_host_holding_the_reactor_budget_without_sending_data_is_closed() {
    // A connected host takes the whole reactor budget with writes whose
    // data never comes; once no data has moved for the transfer deadline
    // it is closed and another host's write gets its R2T.
    let (t, _cfg) = target_1r(
        "transfer-timeout",
        "max_transfer_bytes_per_connection = 2097152\nmax_transfer_bytes_per_reactor = 2097152\ntransfer_timeout_ms = 500\n",
    );
    let admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut hog = io_queue(t.addr, admin_q.cntlid, 1, 32);
    for cid in 0..2u16 {
        capsule(&mut hog, rw_sqe(io_opc::WRITE, cid, 0, MIB as u32));
    }
    assert_eq!(r2ts_before_flush(&mut hog, 100).len(), 2);
    let mut other = io_queue(t.addr, admin_q.cntlid, 2, 32);
    capsule(&mut other, rw_sqe(io_opc::WRITE, 7, 0, MIB as u32));
    assert!(
        r2ts_before_flush(&mut other, 101).is_empty(),
        "the reactor budget is held"
    );
    let t0 = Instant::now();
    assert!(
        closed_within(&mut hog.s, Duration::from_secs(5)),
        "the stalled host stays connected"
    );
    let (p, _) = other.recv_pdu();
    let Pdu::R2t(r) = p else {
        panic!("expected the R2T, got {p:?}")
    };
    assert_eq!(r.cccid, 7);
    assert!(t0.elapsed() < Duration::from_secs(5));
    send_h2c(&mut other, 7, r.ttag, MIB, 0x33);
    match other.recv_pdu().0 {
        Pdu::CapsuleResp(c) => assert!(c.cqe.status().is_success()),
        p => panic!("unexpected PDU {p:?}"),
    }
    drop((other, admin_q));
    assert!(t.stop().success());
}

#[test]
fn a_host_exceeding_its_queue_size_gets_a_sequence_error() {
    // A 4-entry queue takes 4 outstanding commands; the 5th breaks the
    // queue's flow control: fatal transport error, PDU Sequence Error.
    let t = TargetProc::start(&[]);
    let admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut h = io_queue(t.addr, admin_q.cntlid, 1, 4);
    for cid in 0..4u16 {
        capsule(&mut h, rw_sqe(io_opc::WRITE, cid, 0, 4096 * 4));
    }
    let mut r2ts = 0;
    while r2ts < 4 {
        match h.recv_pdu().0 {
            Pdu::R2t(_) => r2ts += 1,
            other => panic!("expected R2T, got {other:?}"),
        }
    }
    capsule(&mut h, rw_sqe(io_opc::WRITE, 4, 0, 4096 * 4));
    let (f, _) = h.expect_term();
    assert_eq!(f, fes::SEQUENCE_ERROR);
    served(t.addr, admin_q.cntlid, 2);
    drop(admin_q);
    assert!(t.stop().success());
}

/// Writes `chunk` to `s` again and again for up to `limit`, until the
/// target stops taking it for 300 ms or closes; returns bytes written.
fn flood(s: &mut TcpStream, chunk: &[u8], limit: Duration) -> usize {
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let end = Instant::now() + limit;
    let mut sent = 0;
    while Instant::now() < end {
        match s.write(chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

#[test]
fn unread_responses_stop_reading_instead_of_growing_memory() {
    // One command stays outstanding (a write waiting for its data) and the
    // host floods capsules reusing its CID: each earns a 24-byte CID
    // Conflict response the host never reads. The target stops reading the
    // connection once its send queue passes its bound.
    let t = TargetProc::start(&[]);
    let admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let pid = t.child.id();
    let before = rss(pid);
    let mut h = io_queue(t.addr, admin_q.cntlid, 1, 32);
    capsule(&mut h, rw_sqe(io_opc::WRITE, 5, 0, 65536));
    assert!(matches!(h.recv_pdu().0, Pdu::R2t(_)));
    let mut one = [0u8; 72];
    let s = Sqe {
        opc: io_opc::FLUSH,
        cid: 5,
        nsid: 1,
        ..Default::default()
    };
    let n = pdu::encode_header(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &h.tx,
        &mut one,
    );
    let chunk: Vec<u8> = one[..n].repeat(1000);
    let sent = flood(&mut h.s, &chunk, Duration::from_secs(3));
    assert!(
        sent < 256 * MIB,
        "the target kept reading ({} MiB) although nothing was drained",
        sent / MIB
    );
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 32 * MIB,
        "RSS grew by {} MiB while responses were not read",
        grown / MIB
    );
    served(t.addr, admin_q.cntlid, 2);
    // Reading resumes as the host drains: the responses are CID Conflicts.
    h.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..100 {
        match h.recv_pdu().0 {
            Pdu::CapsuleResp(r) => {
                assert_eq!(r.cqe.cid, 5);
                assert_eq!(r.cqe.status(), Status::CID_CONFLICT);
            }
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    drop((h, admin_q));
    assert!(t.stop().success());
}

/// Keep Alive round trips on `h`: the slowest of `n`.
fn worst_keep_alive(h: &mut RawHost, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let s = Sqe {
            opc: admin::opc::KEEP_ALIVE,
            cid: 0x100 + i as u16,
            ..Default::default()
        };
        let t0 = Instant::now();
        let c = h.cmd(s, &[]).0;
        assert!(c.status().is_success());
        worst = worst.max(t0.elapsed());
    }
    worst
}

/// A connection flooding CID Conflict capsules (one write stays
/// outstanding on `cid` 5) and draining its answers, so backpressure never
/// stops it: only the per-turn budget keeps its reactor fair. Returns the
/// threads (writer's result: bytes sent).
fn flooder(
    addr: SocketAddr,
    cntlid: u16,
    qid: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (std::thread::JoinHandle<()>, std::thread::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let mut h = io_queue(addr, cntlid, qid, 32);
    capsule(&mut h, rw_sqe(io_opc::WRITE, 5, 0, 65536));
    assert!(matches!(h.recv_pdu().0, Pdu::R2t(_)));
    let mut rd = h.s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 16];
        while matches!(rd.read(&mut b), Ok(n) if n > 0) {}
    });
    let mut one = [0u8; 72];
    let s = Sqe {
        opc: io_opc::FLUSH,
        cid: 5,
        nsid: 1,
        ..Default::default()
    };
    let n = pdu::encode_header(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &h.tx,
        &mut one,
    );
    let chunk: Vec<u8> = one[..n].repeat(4000);
    let writer = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match h.s.write(&chunk) {
                Ok(n) => {
                    sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
        let _ = h.s.shutdown(std::net::Shutdown::Both);
    });
    (writer, drain)
}

#[test]
fn a_flooding_connection_does_not_stall_keep_alive_on_its_reactor() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (t, _cfg) = target_1r("fairness", "");
    let mut admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (1..=2)
        .map(|q| flooder(t.addr, admin_q.cntlid, q, stop.clone(), sent.clone()))
        .collect();
    // Keep Alive while the flood runs, for a second.
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(1) {
        worst = worst.max(worst_keep_alive(&mut admin_q, 1));
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for (w, d) in threads {
        w.join().unwrap();
        d.join().unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "flood sent {} MiB, {rounds} keep-alives, worst {worst:?}",
        sent / MIB
    );
    assert!(sent > 4 * MIB, "the flood ran ({sent} bytes)");
    assert!(
        worst < Duration::from_millis(200),
        "Keep Alive took {worst:?} beside flooding connections"
    );
    drop(admin_q);
    assert!(t.stop().success());
}

/// Whether the target closes `s` within `limit` (EOF or reset).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn idle_and_stalled_sockets_neither_lock_hosts_out_nor_stay_forever() {
    let (t, _cfg) = target_1r(
        "lockout",
        "max_connections_per_reactor = 8\nicreq_timeout_ms = 500\nconnect_timeout_ms = 1500\n",
    );
    let mut admin_q = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    // 24 idle sockets against a limit of 8: each new one evicts the oldest
    // socket that has not connected, never the connected admin queue.
    let mut idle: Vec<TcpStream> = (0..24)
        .map(|_| TcpStream::connect(t.addr).expect("connect"))
        .collect();
    // A host that connects now is served, and so is the connected one.
    let fresh = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    assert!(worst_keep_alive(&mut admin_q, 3) < Duration::from_secs(1));
    let t0 = Instant::now();
    // The first idle sockets were evicted; every idle one is closed by the
    // ICReq deadline at the latest.
    for s in idle.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "idle socket kept open"
        );
    }
    // A socket that sends ICReq and half a capsule header, then stalls,
    // is closed by the Connect deadline.
    let mut stalled = RawHost::connect(t.addr);
    stalled.ic(false, false);
    stalled.send_raw(&[0x04, 0x00, 72, 0, 72, 0, 0, 0, 0, 0]);
    assert!(closed_within(&mut stalled.s, Duration::from_secs(5)));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "deadlines took {:?}",
        t0.elapsed()
    );
    drop(fresh);
    assert!(worst_keep_alive(&mut admin_q, 3) < Duration::from_secs(1));
    drop(admin_q);
    assert!(t.stop().success());
}

#[test]
fn a_new_command_may_reuse_the_cid_of_a_held_aer() {
    let t = TargetProc::start(&[]);
    let mut h = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    for cid in 10..14u16 {
        let s = Sqe {
            opc: admin::opc::ASYNC_EVENT_REQUEST,
            cid,
            ..Default::default()
        };
        capsule(&mut h, s);
    }
    // SPDK's host at shutdown: a Property Get with the CID of an AER it
    // gave up on. It is served, and the AER is dropped.
    let mut s = Sqe {
        cid: 10,
        ..Default::default()
    };
    PropertyCmd {
        size8: false,
        ofst: unvme_proto::regs::CSTS,
        value: 0,
    }
    .to_sqe(false, &mut s);
    let c = h.cmd(s, &[]).0;
    assert!(c.status().is_success(), "property get: {}", c.status());
    assert_eq!(c.dw0 & 1, 1, "CSTS.RDY");
    // One AER slot is free again: a new AER is held, the one after exceeds
    // the limit (4).
    for cid in [14u16, 15] {
        let s = Sqe {
            opc: admin::opc::ASYNC_EVENT_REQUEST,
            cid,
            ..Default::default()
        };
        capsule(&mut h, s);
    }
    match h.recv() {
        Rx::Pdu(Pdu::CapsuleResp(r), _, _) => {
            assert_eq!(r.cqe.cid, 15);
            assert_eq!(r.cqe.status(), Status::AER_LIMIT_EXCEEDED);
        }
        other => panic!("expected the response to CID 15, got {other:?}"),
    }
    drop(h);
    assert!(t.stop().success());
}
