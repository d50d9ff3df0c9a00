//! VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD end to end, with the `vhost`
//! crate's frontend side playing QEMU: the region GET_INFLIGHT_FD hands
//! out, what the device records in it while requests are in flight, a
//! device process killed with SIGKILL mid-flight and a fresh one that
//! resubmits what the first left behind (and nothing it had finished),
//! a repaired used-ring batch, and regions that must be refused.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoCompletion, IoOp, IoRequest, SubmitError};
use unvme_vhost_blk::{
    queue_region_size, region_size, req_type, DeviceOptions, InflightRegion, Server, ServerConfig,
    Status,
};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Address, Bytes, GuestAddress};

/// Sectors (512-byte blocks) whose writes the first device process holds
/// forever.
const HELD: [u64; 2] = [0, 16];
/// Names this process's role. Unset: the test itself. Set, the process is
/// a device the test spawned (the test binary run again, filtered to
/// [`KILL_TEST`]): `ROLE|SOCKET|FILE`, the role being [`GATED`] or
/// [`PLAIN`].
const ROLE_ENV: &str = "UNVME_VB_INFLIGHT_ROLE";
/// The test that spawns device processes, and whose body they run.
const KILL_TEST: &str =
    "requests_in_flight_when_the_device_is_killed_are_resubmitted_by_the_next_one";
/// A device process over the file that holds writes to [`HELD`].
const GATED: &str = "gated";
/// A device process over the file, nothing held.
const PLAIN: &str = "plain";
/// What a device process prints on stdout once its socket listens.
const READY: &str = "unvme-vb-device-listening";

/// A device that never completes writes to some blocks (a stalled backend);
/// everything else goes to `inner`.
struct Gated {
    inner: Arc<dyn Bdev>,
    hold: Vec<u64>,
}

struct GatedQueue {
    inner: Box<dyn BdevQueue>,
    hold: Vec<u64>,
    held: Vec<IoRequest>,
}

impl Bdev for Gated {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        Ok(Box::new(GatedQueue {
            inner: self.inner.open_queue()?,
            hold: self.hold.clone(),
            held: Vec::new(),
        }))
    }
}

impl BdevQueue for GatedQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if let IoOp::Write { lba, .. } = req.op {
            if self.hold.contains(&lba) {
                self.held.push(req);
                return Ok(());
            }
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.inner.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.held.len()
    }
}

/// The body of a device process: serves `SOCKET` from `FILE` until its
/// stdin closes (the test ends it that way, or by SIGKILL; a test that
/// died closes it too), then shuts the server down and exits 0.
fn device_process(role: &str) -> ! {
    let mut parts = role.splitn(3, '|');
    let (kind, sock, file) = match (parts.next(), parts.next(), parts.next()) {
        (Some(k), Some(s), Some(f)) => (k, s, f),
        _ => panic!("{ROLE_ENV}={role}: want ROLE|SOCKET|FILE"),
    };
    let inner = unvme_bdev::from_spec(&format!("file:{file}")).expect("file device");
    let bdev: Arc<dyn Bdev> = match kind {
        GATED => Arc::new(Gated {
            inner,
            hold: HELD.to_vec(),
        }),
        PLAIN => inner,
        _ => panic!("{ROLE_ENV}: unknown role {kind}"),
    };
    let server = Server::start(ServerConfig {
        socket: sock.into(),
        bdev,
        device: DeviceOptions::default(),
        listen: Default::default(),
    })
    .expect("server");
    // Server::start returns with the socket listening: a connect from now
    // on reaches it. Written past the harness's output capture.
    let mut out = std::io::stdout();
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .expect("stdout");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    server.shutdown().expect("device shutdown");
    std::process::exit(0);
}

/// A device process (see [`device_process`]); killed on drop, so a
/// failing test leaves no process behind.
struct DeviceProc {
    child: Child,
    /// Closing it tells the device to shut down and exit.
    stdin: Option<ChildStdin>,
}

impl DeviceProc {
    /// Starts a `kind` device on `sock` over `file` and waits (20 s at
    /// most) until it says it listens.
    fn spawn(kind: &str, sock: &Path, file: &Path) -> DeviceProc {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([KILL_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(
                ROLE_ENV,
                format!("{kind}|{}|{}", sock.display(), file.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the device process");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("device stdout");
        let mut dev = DeviceProc { child, stdin };
        // Lines of the harness and the device, to the channel.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, so the device never writes into a closed pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                // The harness's "test NAME ... " has no newline yet.
                Ok(line) if line.ends_with(READY) => return dev,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{kind} device process did not listen within 20 s")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{kind} device process ended before it listened: {:?}",
                    dev.child.wait()
                ),
            }
        }
    }

    /// SIGKILL, then reaps it; returns how it ended.
    fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("kill the device process");
        self.child.wait().expect("reap the device process")
    }

    /// Closes its stdin and waits (20 s at most) for it to shut down.
    fn stop(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for the device process") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "device process did not exit after its stdin closed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DeviceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn disk_file(tag: &str, bytes: u64) -> (PathBuf, File) {
    let path = std::env::temp_dir().join(format!("unvme-vb-{tag}-{}.img", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("disk file");
    f.set_len(bytes).expect("size disk file");
    (path, f)
}

/// A 4 KiB write of `pattern(4096, seed)` at `sector` on ring 0, posted
/// (not kicked); returns (head, status address).
fn post_write(g: &mut Guest, sector: u64, seed: u8) -> (u16, GuestAddress) {
    let h = g.put(&hdr(req_type::OUT, sector));
    let d = g.put(&pattern(4096, seed));
    let s = g.buf(1);
    g.mem.write_obj(0xffu8, s).expect("status");
    let head = g.post(0, &[(h, 16, false), (d, 4096, false), (s, 1, true)]);
    (head, s)
}

fn read_sectors(g: &mut Guest, sector: u64, len: usize) -> Vec<u8> {
    let h = g.put(&hdr(req_type::IN, sector));
    let d = g.buf(len);
    let s = g.buf(1);
    let (st, used) = g.request(0, &[(h, 16, false), (d, len as u32, true), (s, 1, true)]);
    assert_eq!((st, used), (Status::Ok as u8, len as u32 + 1));
    let mut got = vec![0u8; len];
    g.mem.read_slice(&mut got, d).expect("read back");
    got
}

fn region_of(g: &Guest) -> Arc<InflightRegion> {
    let (msg, file) = g.inflight.as_ref().expect("inflight region");
    InflightRegion::open(
        file.try_clone().expect("dup"),
        msg,
        msg.num_queues,
        msg.queue_size,
    )
    .expect("map the region")
}

#[test]
fn get_inflight_fd_hands_out_a_region_sized_for_the_queues_that_tracks_requests() {
    let (server, sock) = start("inflight-get", 2, 1 << 16);
    let mut g = Guest::connect_with(&sock, Setup::inflight(2));
    let (msg, file) = g.inflight.as_ref().expect("region");
    assert_eq!(msg.num_queues, 2);
    assert_eq!(msg.queue_size, QSIZE);
    assert_eq!(msg.mmap_offset, 0);
    assert_eq!(
        msg.mmap_size,
        2 * (16 + 16 * u64::from(QSIZE)).next_multiple_of(64)
    );
    assert_eq!(msg.mmap_size, region_size(2, QSIZE));
    assert_eq!(file.metadata().expect("meta").len(), msg.mmap_size);
    let region = region_of(&g);
    // Both rings started: headers initialised.
    for q in 0..2 {
        let qi = region.queue(q).expect("queue");
        assert_eq!((qi.version(), qi.header_desc_num()), (1, QSIZE));
    }
    // Requests on both queues leave nothing in flight and the used index
    // recorded.
    for q in 0..2 {
        for i in 0..8u64 {
            let h = g.put(&hdr(req_type::OUT, (q as u64 * 8 + i) * 8));
            let d = g.put(&pattern(4096, i as u8));
            let s = g.buf(1);
            g.post(q, &[(h, 16, false), (d, 4096, false), (s, 1, true)]);
        }
        g.kick(q);
        g.wait_used(q);
        let qi = region.queue(q).expect("queue");
        assert_eq!(qi.used_idx(), 8);
        assert!((0..QSIZE).all(|i| qi.inflight(i) == 0));
        // The last batch was the last completion.
        assert_eq!(u32::from(qi.last_batch_head()), g.used_entry(q, 7).0);
    }
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn requests_in_flight_when_the_device_is_killed_are_resubmitted_by_the_next_one() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        // This process is one of the devices the test below spawned.
        device_process(&role);
    }
    let sock = socket_path("inflight-kill");
    let (path, disk) = disk_file("inflight-kill", 4 << 20);
    let mut first = DeviceProc::spawn(GATED, &sock, &path);
    let mut g = Guest::connect_with(&sock, Setup::inflight(1));

    // Four writes; the device holds those to sectors 0 and 16 (A, C) and
    // completes 8 and 24 (B, D): out of order.
    let (a, sa) = post_write(&mut g, 0, 1);
    let (b, _) = post_write(&mut g, 8, 2);
    let (c, sc) = post_write(&mut g, 16, 3);
    let (d, _) = post_write(&mut g, 24, 4);
    g.kick(0);
    g.wait_used_idx(0, 2);
    let done: Vec<u32> = (0..2).map(|i| g.used_entry(0, i).0).collect();
    assert_eq!(done, vec![u32::from(b), u32::from(d)]);

    // The region says A and C are in flight, A taken first.
    let region = region_of(&g);
    let qi = region.queue(0).expect("queue");
    assert_eq!((qi.inflight(a), qi.inflight(c)), (1, 1));
    assert_eq!((qi.inflight(b), qi.inflight(d)), (0, 0));
    assert!(qi.counter(a) < qi.counter(c));
    assert_eq!(qi.used_idx(), 2);

    // Something else changes B's and D's blocks after they completed: a
    // device that executed them again would undo it.
    let marker = vec![0xeeu8; 4096];
    disk.write_all_at(&marker, 8 * 512).expect("marker");
    disk.write_all_at(&marker, 24 * 512).expect("marker");

    // SIGKILL mid-flight; a fresh device process on the same socket and
    // disk.
    let st = first.kill();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "first device: {st:?}");
    let mut second = DeviceProc::spawn(PLAIN, &sock, &path);
    // QEMU reconnects: same region, rings restarted at the used index (2).
    g.reconnect(&sock);
    g.wait_used_idx(0, 4);
    let resubmitted: Vec<u32> = (2..4).map(|i| g.used_entry(0, i).0).collect();
    assert_eq!(resubmitted, vec![u32::from(a), u32::from(c)]);
    for s in [sa, sc] {
        assert_eq!(g.mem.read_obj::<u8>(s).expect("status"), Status::Ok as u8);
    }
    assert!((0..QSIZE).all(|i| qi.inflight(i) == 0));
    assert_eq!(qi.used_idx(), 4);

    let disk_at = |sector: u64| {
        let mut b = vec![0u8; 4096];
        disk.read_exact_at(&mut b, sector * 512).expect("read disk");
        b
    };
    assert_eq!(disk_at(0), pattern(4096, 1), "A written by the new device");
    assert_eq!(disk_at(16), pattern(4096, 3), "C written by the new device");
    assert_eq!(disk_at(8), marker, "B executed twice");
    assert_eq!(disk_at(24), marker, "D executed twice");

    // The ring goes on from there (the restart kicks are consumed).
    g.rings[0].submitted = 4;
    let _ = g.rings[0].call.read();
    g.set_used_event(0, 4);
    assert_eq!(read_sectors(&mut g, 0, 4096), pattern(4096, 1));
    drop(g);
    let st = second.stop();
    assert!(st.success(), "restarted device: {st:?}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_interrupted_batch_is_repaired_and_the_rest_resubmitted_oldest_first() {
    // A ring of 128 entries tracked in a region of 256 per queue.
    let (server, sock) = start("inflight-batch", 1, 1 << 16);
    let setup = Setup {
        ring_size: 128,
        ..Setup::inflight(1)
    };
    let mut g = Guest::connect_with(&sock, setup);
    assert_eq!(read_sectors(&mut g, 0, 512), vec![0u8; 512]);
    g.fe.get_vring_base(0).expect("stop the ring");
    // Returns once the device has closed the connection.
    g.disconnect();
    let used0 = g.used_idx(0);
    assert_eq!(used0, 1);

    // State an earlier device would have left: X (older) and Y in flight;
    // Z put on the used ring but the region not yet told; an entry beyond
    // the ring.
    let region = region_of(&g);
    let qi = region.queue(0).expect("queue");
    let (x, sx) = {
        let h = g.put(&hdr(req_type::OUT, 64));
        let d = g.put(&pattern(512, 7));
        let s = g.buf(1);
        (
            g.write_chain(0, &[(h, 16, false), (d, 512, false), (s, 1, true)]),
            s,
        )
    };
    let (y, sy) = {
        let h = g.put(&hdr(req_type::FLUSH, 0));
        let s = g.buf(1);
        (g.write_chain(0, &[(h, 16, false), (s, 1, true)]), s)
    };
    let z = {
        let h = g.put(&hdr(req_type::OUT, 72));
        let d = g.put(&pattern(512, 9));
        let s = g.buf(1);
        g.write_chain(0, &[(h, 16, false), (d, 512, false), (s, 1, true)])
    };
    qi.mark(y, 20);
    qi.mark(x, 10);
    qi.mark(z, 30);
    qi.mark(200, 5);
    qi.begin_used(z);
    // Z reached the used ring: entry 1, used idx 2.
    let used = g.rings[0].base.unchecked_add(USED);
    g.mem
        .write_obj(u32::from(z), used.unchecked_add(4 + 8))
        .expect("used id");
    g.mem
        .write_obj(1u32, used.unchecked_add(4 + 8 + 4))
        .expect("used len");
    g.mem
        .write_obj(2u16, used.unchecked_add(2))
        .expect("used idx");
    for s in [sx, sy] {
        g.mem.write_obj(0xffu8, s).expect("status");
    }

    g.reconnect(&sock);
    g.wait_used_idx(0, 4);
    assert_eq!(g.used_entry(0, 2).0, u32::from(x));
    assert_eq!(g.used_entry(0, 3).0, u32::from(y));
    assert_eq!(g.mem.read_obj::<u8>(sx).expect("status"), Status::Ok as u8);
    assert_eq!(g.mem.read_obj::<u8>(sy).expect("status"), Status::Ok as u8);
    assert!((0..QSIZE).all(|i| qi.inflight(i) == 0));
    assert_eq!(qi.used_idx(), 4);
    // Nothing more completes: Z was not executed again. New chains are
    // taken only after every resubmitted one, so the next two requests'
    // completions are the next two used entries, and Z's block was never
    // written.
    g.rings[0].submitted = 4;
    let _ = g.rings[0].call.read();
    g.set_used_event(0, 4);
    assert_eq!(read_sectors(&mut g, 72, 512), vec![0u8; 512], "Z executed");
    assert_eq!(read_sectors(&mut g, 64, 512), pattern(512, 7));
    assert_eq!(g.used_idx(0), 6, "completions beyond the new requests");
    drop(g);
    server.shutdown().expect("shutdown");
}

/// A region file of `bytes` with queue 0's header set to (version,
/// desc_num).
fn crafted_region(bytes: u64, version: u16, desc_num: u16) -> File {
    let path = std::env::temp_dir().join(format!(
        "unvme-vb-region-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("region file");
    std::fs::remove_file(&path).expect("unlink");
    f.set_len(bytes).expect("size");
    f.write_all_at(&version.to_le_bytes(), 8).expect("version");
    f.write_all_at(&desc_num.to_le_bytes(), 10)
        .expect("desc_num");
    f
}

#[test]
fn malformed_inflight_regions_are_refused_and_the_connection_goes_on() {
    let (server, sock) = start("inflight-bad", 1, 1 << 16);
    let mut fe = negotiate(&sock, 1);
    let good = VhostUserInflight {
        mmap_size: region_size(1, QSIZE),
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    let size = good.mmap_size;
    let cases: Vec<(&str, VhostUserInflight, File)> = vec![
        (
            "size too small",
            VhostUserInflight {
                mmap_size: size - 64,
                ..good
            },
            crafted_region(size, 0, 0),
        ),
        (
            "size too large",
            VhostUserInflight {
                mmap_size: size + 4096,
                ..good
            },
            crafted_region(size + 4096, 0, 0),
        ),
        (
            "more queues than the device has",
            VhostUserInflight {
                num_queues: 2,
                mmap_size: 2 * queue_region_size(QSIZE),
                ..good
            },
            crafted_region(2 * size, 0, 0),
        ),
        (
            "queue size over the device's limit",
            VhostUserInflight {
                queue_size: 2048,
                mmap_size: region_size(1, 2048),
                ..good
            },
            crafted_region(region_size(1, 2048), 0, 0),
        ),
        (
            "file shorter than the region",
            good,
            crafted_region(size / 2, 0, 0),
        ),
        (
            "unaligned offset",
            VhostUserInflight {
                mmap_offset: 8,
                ..good
            },
            crafted_region(size + 8, 0, 0),
        ),
        ("unknown version", good, crafted_region(size, 7, QSIZE)),
        (
            "another descriptor count",
            good,
            crafted_region(size, 1, QSIZE / 2),
        ),
    ];
    for (what, msg, file) in &cases {
        assert!(
            fe.set_inflight_fd(msg, file.as_raw_fd()).is_err(),
            "accepted: {what}"
        );
        // Still connected and answering.
        assert_eq!(fe.get_queue_num().expect("queue num"), 1, "after {what}");
    }
    // A GET for a geometry the device cannot have ends the connection (the
    // reply must carry a file) rather than hanging the frontend.
    assert!(fe
        .get_inflight_fd(&VhostUserInflight {
            num_queues: 9,
            ..good
        })
        .is_err());
    drop(fe);
    // The device serves the next frontend normally.
    let mut g = Guest::connect_with(&sock, Setup::inflight(1));
    assert_eq!(read_sectors(&mut g, 0, 4096), vec![0u8; 4096]);
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn reset_device_stops_the_rings_and_the_device_can_be_set_up_again() {
    let (server, sock) = start("inflight-reset", 1, 1 << 16);
    let mut g = Guest::connect_with(&sock, Setup::inflight(1));
    let h = g.put(&hdr(req_type::OUT, 8));
    let d = g.put(&pattern(4096, 5));
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 4096, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    assert!(g
        .fe
        .get_protocol_features()
        .expect("protocol features")
        .contains(VhostUserProtocolFeatures::RESET_DEVICE));
    g.fe.reset_device().expect("RESET_DEVICE");
    // The driver reset its rings too; QEMU sets everything up again.
    for off in [AVAIL, USED] {
        g.mem
            .write_slice(&[0u8; 0x1000], g.rings[0].base.unchecked_add(off))
            .expect("clear ring");
    }
    g.rings[0].submitted = 0;
    g.rings[0].next_desc = 0;
    let features = g.fe.get_features().expect("features");
    g.fe.set_features(features).expect("features");
    let (msg, file) = g.inflight.take().expect("region");
    let (msg2, file2) = g.fe.get_inflight_fd(&msg).expect("new region");
    g.fe.set_inflight_fd(&msg2, file2.as_raw_fd())
        .expect("set region");
    g.inflight = Some((msg2, file2));
    drop(file);
    g.set_mem_table();
    let _ = g.rings[0].call.read();
    g.start_ring(0, 0);
    assert_eq!(read_sectors(&mut g, 8, 4096), pattern(4096, 5));
    drop(g);
    server.shutdown().expect("shutdown");
}
