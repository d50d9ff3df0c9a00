//! The initiator riding through target faults: a remote namespace under a
//! write-and-verify load while the target is killed and restarted, stopped
//! for longer than the keep-alive, or its connections are cut; the loss
//! timeouts; and multipath failover and failback between two target
//! processes exporting one file. The load checks every completion and, at
//! the end, that every acknowledged write reads back.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_exit, TargetProc};
use unvme_bdev::{Bdev, BdevQueue, IoBuf, IoCompletion, IoError, IoOp, IoRequest};
use unvme_initiator::{ConnectOptions, Controller, IoPolicy, Recovery, RemoteNamespace};
use unvme_proto::DEFAULT_SUBNQN;

const BS: u32 = 4096;
/// Blocks the load writes to (one 4 KiB block per request).
const SLOTS: u64 = 2048;

fn opts(port: u16, recovery: Recovery, kato_ms: u32) -> ConnectOptions {
    ConnectOptions {
        addr: "127.0.0.1".into(),
        port,
        subnqn: DEFAULT_SUBNQN.into(),
        kato_ms,
        command_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        recovery,
        ..Default::default()
    }
}

fn holding() -> Recovery {
    Recovery {
        ctrl_loss_tmo: Some(Duration::from_secs(60)),
        reconnect_delay: Duration::from_millis(200),
        fast_io_fail_tmo: None,
        max_retries: 5,
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("unvme-recovery-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn img(&self) -> PathBuf {
        self.0.join("ns.img")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_target(listen: &str, img: &Path, create: bool) -> TargetProc {
    let spec = if create {
        format!("{}:4096:create=16M", img.display())
    } else {
        format!("{}:4096", img.display())
    };
    TargetProc::start_on(listen, &["--file", &spec])
}

fn signal(t: &TargetProc, sig: i32) {
    // SAFETY: kill(2) with the pid of a child we own and a valid signal number.
    unsafe { libc::kill(t.child.id() as i32, sig) };
}

fn kill9(mut t: TargetProc) {
    let _ = t.child.kill();
    wait_exit(&mut t.child, Duration::from_secs(10));
    std::mem::forget(t);
}

/// The content of slot `lba` written with generation `gen`.
fn pattern(lba: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS as usize];
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

#[derive(Default, Debug)]
struct LoadStats {
    completed: u64,
    errors: Vec<String>,
    max_latency: Duration,
}

/// Random 4 KiB writes and verified reads at a fixed queue depth; a slot
/// is never written and read at once, so the expected content of every
/// slot is its last acknowledged write.
struct Load {
    q: Box<dyn BdevQueue>,
    rng: fastrand::Rng,
    acked: HashMap<u64, u64>,
    inflight: HashMap<u64, (u64, u64, bool, Instant)>,
    busy: std::collections::HashSet<u64>,
    next_tag: u64,
    gen: u64,
    stats: LoadStats,
}

impl Load {
    fn new(q: Box<dyn BdevQueue>) -> Load {
        Load {
            q,
            rng: fastrand::Rng::with_seed(7),
            acked: HashMap::new(),
            inflight: HashMap::new(),
            busy: Default::default(),
            next_tag: 1,
            gen: 1,
            stats: LoadStats::default(),
        }
    }

    fn expected(&self, lba: u64) -> Vec<u8> {
        match self.acked.get(&lba) {
            Some(&g) => pattern(lba, g),
            None => vec![0u8; BS as usize],
        }
    }

    fn submit_one(&mut self) -> bool {
        let lba = loop {
            let l = self.rng.u64(0..SLOTS);
            if !self.busy.contains(&l) {
                break l;
            }
        };
        let write = self.rng.bool();
        let tag = self.next_tag;
        let (op, buf, gen) = if write {
            self.gen += 1;
            let mut b = IoBuf::new(BS as usize);
            b.copy_from_slice(&pattern(lba, self.gen));
            (
                IoOp::Write {
                    lba,
                    nlb: 1,
                    fua: false,
                },
                b,
                self.gen,
            )
        } else {
            (IoOp::Read { lba, nlb: 1 }, IoBuf::new(BS as usize), 0)
        };
        match self.q.submit(IoRequest::new(tag, op, Some(buf))) {
            Ok(()) => {
                self.next_tag += 1;
                self.busy.insert(lba);
                self.inflight.insert(tag, (lba, gen, write, Instant::now()));
                true
            }
            Err(_) => false,
        }
    }

    fn complete(&mut self, c: IoCompletion) {
        let Some((lba, gen, write, t0)) = self.inflight.remove(&c.tag) else {
            self.stats
                .errors
                .push(format!("completion for unknown or finished tag {}", c.tag));
            return;
        };
        self.busy.remove(&lba);
        self.stats.max_latency = self.stats.max_latency.max(t0.elapsed());
        self.stats.completed += 1;
        match c.result {
            Ok(()) if write => {
                self.acked.insert(lba, gen);
            }
            Ok(()) => {
                if c.buf.as_deref() != Some(&self.expected(lba)[..]) {
                    self.stats
                        .errors
                        .push(format!("read of block {lba} returned wrong data"));
                }
            }
            Err(e) => self.stats.errors.push(format!(
                "{} of block {lba} failed: {e}",
                if write { "write" } else { "read" }
            )),
        }
    }

    /// Runs the load at `qd` until `until` returns true (checked between
    /// polls), for at most `limit`.
    fn run(&mut self, qd: usize, limit: Duration, mut until: impl FnMut(&LoadStats) -> bool) {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while Instant::now() < end && !until(&self.stats) {
            while self.inflight.len() < qd && self.submit_one() {}
            self.q.poll(&mut out);
            for c in out.drain(..) {
                self.complete(c);
            }
            self.wait(Duration::from_millis(500));
        }
    }

    /// Completes everything in flight (bounded).
    fn drain(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while !self.inflight.is_empty() {
            assert!(
                Instant::now() < end,
                "{} requests never completed",
                self.inflight.len()
            );
            self.q.poll(&mut out);
            for c in out.drain(..) {
                self.complete(c);
            }
            self.wait(Duration::from_millis(500));
        }
    }

    /// Sleeps on the queue's wait fd (it must wake us for every event the
    /// queue needs, reconnection timers included) for at most `max`.
    fn wait(&self, max: Duration) {
        if self.q.outstanding() == 0 {
            return;
        }
        let Some(fd) = self.q.wait_fd() else { return };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on our stack; the fd belongs to the live queue.
        unsafe { libc::poll(&mut p, 1, max.as_millis() as i32) };
    }

    /// Reads every slot back and compares with the last acknowledged write.
    fn verify_all(&mut self) {
        self.drain(Duration::from_secs(30));
        let mut out = Vec::new();
        for lba in 0..SLOTS {
            self.q
                .submit(IoRequest::new(
                    lba,
                    IoOp::Read { lba, nlb: 1 },
                    Some(IoBuf::new(BS as usize)),
                ))
                .expect("queue empty");
            let end = Instant::now() + Duration::from_secs(30);
            while out.is_empty() {
                assert!(Instant::now() < end, "verify read of {lba} hangs");
                self.q.poll(&mut out);
            }
            let c = out.pop().unwrap();
            assert_eq!(c.result, Ok(()), "verify read of block {lba}");
            assert!(
                c.buf.as_deref() == Some(&self.expected(lba)[..]),
                "block {lba}: an acknowledged write did not read back"
            );
        }
    }

    fn assert_clean(&self, what: &str) {
        assert!(
            self.stats.errors.is_empty(),
            "{what}: the client saw errors: {:?}",
            &self.stats.errors[..self.stats.errors.len().min(5)]
        );
    }
}

fn open(port: u16, recovery: Recovery, kato_ms: u32) -> (RemoteNamespace, Load) {
    let ctrl = Controller::connect(opts(port, recovery, kato_ms)).expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let q = ns.open_queue().expect("queue");
    (ns, Load::new(q))
}

#[test]
fn a_target_killed_and_restarted_under_load_costs_no_error_and_no_acknowledged_write() {
    let dir = Scratch::new("kill");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let listen = t.addr.to_string();
    let (_ns, mut load) = open(t.port(), holding(), 1000);
    load.run(16, Duration::from_secs(10), |s| s.completed >= 2000);
    let before = load.stats.completed;
    kill9(t);
    let t0 = Instant::now();
    // Requests keep being submitted against a dead target for a second.
    load.run(16, Duration::from_secs(1), |_| false);
    let t2 = file_target(&listen, &dir.img(), false);
    load.run(16, Duration::from_secs(20), |s| {
        s.completed >= before + 2000
    });
    let recovered = t0.elapsed();
    load.assert_clean("kill -9 and restart");
    assert!(
        load.stats.completed >= before + 2000,
        "I/O did not resume after the restart"
    );
    eprintln!(
        "kill -9 + restart after 1 s: longest request {:?}, back after {recovered:?}",
        load.stats.max_latency
    );
    load.verify_all();
    drop(t2);
}

#[test]
fn a_target_stopped_longer_than_the_keep_alive_is_reconnected_without_an_error() {
    let dir = Scratch::new("stop");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let (_ns, mut load) = open(t.port(), holding(), 1000);
    load.run(16, Duration::from_secs(10), |s| s.completed >= 2000);
    let before = load.stats.completed;
    signal(&t, libc::SIGSTOP);
    // Longer than KATO: the keep-alive fails, the controller is reset.
    load.run(16, Duration::from_millis(2500), |_| false);
    signal(&t, libc::SIGCONT);
    load.run(16, Duration::from_secs(20), |s| {
        s.completed >= before + 2000
    });
    load.assert_clean("SIGSTOP beyond KATO");
    assert!(load.stats.completed >= before + 2000, "I/O did not resume");
    eprintln!(
        "SIGSTOP 2.5 s: longest request {:?}",
        load.stats.max_latency
    );
    load.verify_all();
}

#[test]
fn a_command_timeout_without_keep_alive_aborts_resets_and_resubmits() {
    let dir = Scratch::new("timeout");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let ctrl = Controller::connect(ConnectOptions {
        command_timeout: Duration::from_millis(500),
        ..opts(t.port(), holding(), 0)
    })
    .expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let mut load = Load::new(ns.open_queue().expect("queue"));
    load.run(8, Duration::from_secs(10), |s| s.completed >= 500);
    let before = load.stats.completed;
    signal(&t, libc::SIGSTOP);
    // No keep-alive: only the command deadline notices.
    load.run(8, Duration::from_secs(3), |_| false);
    assert!(
        ctrl.is_failed(),
        "the timed-out commands reset the controller"
    );
    signal(&t, libc::SIGCONT);
    load.run(8, Duration::from_secs(20), |s| s.completed >= before + 500);
    load.assert_clean("command timeout");
    assert!(load.stats.completed >= before + 500, "I/O did not resume");
    load.verify_all();
}

/// A TCP proxy whose connections can be cut, counting the bytes it moves.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, b2, s2) = (conns.clone(), bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                let mut g = c2.lock().unwrap();
                g.push(down.try_clone().unwrap());
                g.push(up.try_clone().unwrap());
                drop(g);
                for (mut a, mut b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let b2 = b2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = a.read(&mut buf) {
                            if n == 0 || b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            b2.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = b.shutdown(Shutdown::Both);
                        let _ = a.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            conns,
            bytes,
            stop,
        }
    }

    /// Ends every connection through the proxy (both sides).
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

#[test]
fn cut_connections_are_reconnected_and_their_requests_resubmitted() {
    let dir = Scratch::new("cut");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let p = Proxy::start(t.addr);
    let (_ns, mut load) = open(p.port, holding(), 1000);
    for round in 0..3 {
        let before = load.stats.completed;
        load.run(16, Duration::from_secs(10), |s| {
            s.completed >= before + 1000
        });
        p.cut();
        load.assert_clean(&format!("cut {round}"));
    }
    let before = load.stats.completed;
    load.run(16, Duration::from_secs(10), |s| {
        s.completed >= before + 1000
    });
    load.assert_clean("after the cuts");
    assert!(load.stats.completed >= before + 1000, "I/O did not resume");
    load.verify_all();
}

/// Runs one request to its completion.
fn run1(q: &mut Box<dyn BdevQueue>, op: IoOp, limit: Duration) -> (IoCompletion, Duration) {
    let t0 = Instant::now();
    q.submit(IoRequest::new(1, op, Some(IoBuf::new(BS as usize))))
        .expect("accepted");
    let mut out = Vec::new();
    while out.is_empty() {
        assert!(t0.elapsed() < limit, "request neither completed nor failed");
        q.poll(&mut out);
        std::thread::sleep(Duration::from_micros(200));
    }
    (out.pop().unwrap(), t0.elapsed())
}

#[test]
fn the_loss_timeouts_fail_io_with_a_clear_error_and_service_returns_with_the_target() {
    let dir = Scratch::new("loss");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let listen = t.addr.to_string();
    let r = Recovery {
        ctrl_loss_tmo: Some(Duration::from_millis(1500)),
        reconnect_delay: Duration::from_millis(200),
        fast_io_fail_tmo: None,
        max_retries: 5,
    };
    let ctrl = Controller::connect(opts(t.port(), r, 1000)).expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let mut q = ns.open_queue().expect("queue");
    let read = IoOp::Read { lba: 3, nlb: 1 };
    assert_eq!(
        run1(&mut q, read.clone(), Duration::from_secs(5)).0.result,
        Ok(())
    );
    kill9(t);
    // Held until ctrl_loss_tmo, then failed.
    let (c, took) = run1(&mut q, read.clone(), Duration::from_secs(10));
    assert_eq!(c.result, Err(IoError::Unavailable));
    assert!(
        took >= Duration::from_millis(1200),
        "failed after {took:?}, before ctrl_loss_tmo"
    );
    // Lost: new requests fail at once.
    let (c, took) = run1(&mut q, read.clone(), Duration::from_secs(5));
    assert_eq!(c.result, Err(IoError::Unavailable));
    assert!(
        took < Duration::from_millis(500),
        "a lost controller still holds I/O ({took:?})"
    );
    // The target returns: the same queue serves again.
    let _t2 = file_target(&listen, &dir.img(), false);
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (c, _) = run1(&mut q, read.clone(), Duration::from_secs(10));
        if c.result.is_ok() {
            break;
        }
        assert!(
            Instant::now() < end,
            "service did not return: {:?}",
            c.result
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fast_io_fail_fails_held_io_early_and_fail_fast_holds_none() {
    let dir = Scratch::new("fastfail");
    let t = file_target("127.0.0.1:0", &dir.img(), true);
    let r = Recovery {
        ctrl_loss_tmo: Some(Duration::from_secs(60)),
        reconnect_delay: Duration::from_millis(200),
        fast_io_fail_tmo: Some(Duration::from_millis(600)),
        max_retries: 5,
    };
    let ctrl = Controller::connect(opts(t.port(), r, 1000)).expect("connect");
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace");
    let mut q = ns.open_queue().expect("queue");
    let ctrl2 = Controller::connect(opts(t.port(), Recovery::FAIL_FAST, 1000)).expect("connect");
    let ns2 = RemoteNamespace::open(&ctrl2, 1).expect("namespace");
    let mut q2 = ns2.open_queue().expect("queue");
    let read = IoOp::Read { lba: 3, nlb: 1 };
    assert_eq!(
        run1(&mut q, read.clone(), Duration::from_secs(5)).0.result,
        Ok(())
    );
    assert_eq!(
        run1(&mut q2, read.clone(), Duration::from_secs(5)).0.result,
        Ok(())
    );
    kill9(t);
    let (c, took) = run1(&mut q, read.clone(), Duration::from_secs(10));
    assert_eq!(c.result, Err(IoError::Unavailable));
    assert!(
        (Duration::from_millis(400)..Duration::from_secs(5)).contains(&took),
        "failed after {took:?}, expected about fast_io_fail_tmo (600 ms)"
    );
    let (c, took) = run1(&mut q2, read.clone(), Duration::from_secs(10));
    assert_eq!(c.result, Err(IoError::Unavailable));
    assert!(
        took < Duration::from_millis(500),
        "FAIL_FAST held a request for {took:?}"
    );
}

#[test]
fn two_paths_fail_over_without_an_error_and_fail_back_when_the_first_returns() {
    let dir = Scratch::new("paths");
    let a = file_target("127.0.0.1:0", &dir.img(), true);
    let b = file_target("127.0.0.1:0", &dir.img(), false);
    let listen_a = a.addr.to_string();
    let (pa, pb) = (Proxy::start(a.addr), Proxy::start(b.addr));
    let paths = [
        opts(pa.port, holding(), 1000),
        opts(pb.port, holding(), 1000),
    ];
    let ns = RemoteNamespace::open_multipath(&paths, 1, IoPolicy::Failover).expect("namespace");
    assert_eq!(ns.paths().len(), 2);
    let mut load = Load::new(ns.open_queue().expect("queue"));
    load.run(16, Duration::from_secs(10), |s| s.completed >= 1000);
    // Failover: all I/O on the first path.
    let b0 = pb.bytes();
    load.run(16, Duration::from_secs(10), |s| s.completed >= 2000);
    assert!(
        pb.bytes() - b0 < 64 * 1024,
        "failover policy used the second path"
    );
    // Kill the active path's target.
    kill9(a);
    let t0 = Instant::now();
    let before = load.stats.completed;
    let b1 = pb.bytes();
    load.run(16, Duration::from_secs(20), |s| {
        s.completed >= before + 2000
    });
    load.assert_clean("failover");
    assert!(
        load.stats.completed >= before + 2000,
        "I/O did not move to the second path"
    );
    assert!(
        pb.bytes() - b1 > 2000 * 4096,
        "the second path carried the I/O"
    );
    eprintln!(
        "failover: longest request {:?}, 2000 requests after {:?}",
        load.stats.max_latency,
        t0.elapsed()
    );
    // The first target returns (same port behind its proxy): failback.
    let _a2 = file_target(&listen_a, &dir.img(), false);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let a0 = pa.bytes();
        let before = load.stats.completed;
        load.run(16, Duration::from_secs(5), |s| s.completed >= before + 500);
        if pa.bytes() - a0 > 500 * 4096 {
            break;
        }
        assert!(Instant::now() < end, "no failback to the first path");
    }
    load.assert_clean("failback");
    load.verify_all();
    drop(b);
}

#[test]
fn round_robin_spreads_io_over_both_paths() {
    let dir = Scratch::new("rr");
    let a = file_target("127.0.0.1:0", &dir.img(), true);
    let b = file_target("127.0.0.1:0", &dir.img(), false);
    let (pa, pb) = (Proxy::start(a.addr), Proxy::start(b.addr));
    let paths = [
        opts(pa.port, holding(), 1000),
        opts(pb.port, holding(), 1000),
    ];
    let ns = RemoteNamespace::open_multipath(&paths, 1, IoPolicy::RoundRobin).expect("namespace");
    let mut load = Load::new(ns.open_queue().expect("queue"));
    // Let the second path connect, then measure.
    load.run(8, Duration::from_secs(10), |s| s.completed >= 500);
    let (a0, b0) = (pa.bytes(), pb.bytes());
    load.run(8, Duration::from_secs(10), |s| s.completed >= 2500);
    let (da, db) = (pa.bytes() - a0, pb.bytes() - b0);
    assert!(
        da > 500 * 4096 && db > 500 * 4096,
        "round-robin moved {da} and {db} bytes"
    );
    load.assert_clean("round-robin");
    load.verify_all();
}

#[test]
fn paths_to_different_namespaces_are_refused() {
    let a = TargetProc::start(&["--ram", "16M"]);
    let b = TargetProc::start(&["--ram", "16M", "--nqn", "nqn.2024-11.io.unvme:other"]);
    let mut other = opts(b.port(), holding(), 1000);
    other.subnqn = "nqn.2024-11.io.unvme:other".into();
    let e = RemoteNamespace::open_multipath(
        &[opts(a.port(), holding(), 1000), other],
        1,
        IoPolicy::Failover,
    )
    .expect_err("two different namespaces are not two paths");
    assert!(e.to_string().contains("different namespace"), "{e}");
}
