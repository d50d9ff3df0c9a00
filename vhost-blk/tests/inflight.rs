//! VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD end to end, with the `vhost`
//! crate's frontend side playing QEMU: the region GET_INFLIGHT_FD hands
//! out, what the device records in it while requests are in flight, a
//! device process killed with SIGKILL mid-flight and a fresh one that
//! resubmits what the first left behind (and nothing it had finished),
//! a repaired used-ring batch, and regions that must be refused.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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

/// Sectors (512-byte blocks) whose writes the child's device holds forever.
const HELD: [u64; 2] = [0, 16];
const CHILD_ENV: &str = "UNVME_VB_INFLIGHT_CHILD";

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

/// Not a test of its own: the body of the device process that
/// `requests_in_flight_when_the_device_is_killed_are_resubmitted_by_the_next_one`
/// starts and kills. Does nothing unless started that way.
#[test]
fn child_device_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (sock, file) = spec.split_once('|').expect("SOCKET|FILE");
    let inner = unvme_bdev::from_spec(&format!("file:{file}")).expect("file device");
    let bdev: Arc<dyn Bdev> = Arc::new(Gated {
        inner,
        hold: HELD.to_vec(),
    });
    let _server = Server::start(ServerConfig {
        socket: sock.into(),
        bdev,
        device: DeviceOptions::default(),
    })
    .expect("server");
    // Until SIGKILLed; bounded in case the test that started us died.
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(sock: &Path, file: &Path) -> ChildGuard {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_device_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}|{}", sock.display(), file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the device process");
    let g = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "device process did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    g
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
    let sock = socket_path("inflight-kill");
    let (path, disk) = disk_file("inflight-kill", 4 << 20);
    let mut child = spawn_child(&sock, &path);
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

    // SIGKILL mid-flight; a fresh device on the same socket and disk.
    child.0.kill().expect("kill");
    child.0.wait().expect("reap");
    let bdev = unvme_bdev::from_spec(&format!("file:{}", path.display())).expect("file device");
    let server = Server::start(ServerConfig {
        socket: sock.clone(),
        bdev,
        device: DeviceOptions::default(),
    })
    .expect("restarted device");
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
    server.shutdown().expect("shutdown");
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
    g.disconnect();
    // Leave the device time to drop the connection.
    std::thread::sleep(Duration::from_millis(50));
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
    // Nothing more completes: Z was not executed again.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used_idx(0), 4);
    g.rings[0].submitted = 4;
    let _ = g.rings[0].call.read();
    g.set_used_event(0, 4);
    assert_eq!(read_sectors(&mut g, 64, 512), pattern(512, 7));
    assert_eq!(read_sectors(&mut g, 72, 512), vec![0u8; 512]);
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
