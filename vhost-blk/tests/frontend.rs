//! An in-process vhost-user frontend against the real device: shared
//! memory, rings and eventfds set up the way QEMU sets them up (through the
//! `vhost` crate's frontend side of the protocol), then virtio-blk requests
//! of every type on the rings, checking data, status and used lengths.
//! Runs without QEMU.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::{Bdev, RamBdev};
use unvme_vhost_blk::spec::{features as f, req_type, DiscardWriteZeroes, OutHdr, Status};
use unvme_vhost_blk::{DeviceOptions, Server, ServerConfig};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 64 << 20;
const QSIZE: u16 = 256;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
/// Offsets of the rings from a queue's base.
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// Guest RAM in a shared tmpfs file, as QEMU's memfd backend would be.
fn shared_memory() -> GuestMemoryMmap<()> {
    let path = std::env::temp_dir().join(format!(
        "unvme-vb-frontend-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("memory file");
    std::fs::remove_file(&path).expect("unlink memory file");
    file.set_len(MEM as u64).expect("size memory file");
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("map guest memory")
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("unvme-vb-{tag}-{}.sock", std::process::id()))
}

/// One split virtqueue as the driver sees it (VIRTIO 1.2, 2.7): descriptor
/// table at `base`, available ring at `base + 0x1000`, used ring at
/// `base + 0x2000` (256 entries each). Descriptors are handed out round
/// robin; a test keeps at most 256 in flight.
struct Ring {
    index: usize,
    base: GuestAddress,
    kick: EventFd,
    call: EventFd,
    /// Next free descriptor index (descriptors are not reused).
    next_desc: u16,
    submitted: u16,
}

struct Guest {
    mem: GuestMemoryMmap<()>,
    fe: Frontend,
    rings: Vec<Ring>,
    /// Bump allocator for data buffers.
    next_buf: u64,
}

impl Guest {
    fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem.get_host_address(gpa).expect("host address") as u64
    }

    fn connect(sock: &PathBuf, queues: usize) -> Guest {
        let mem = shared_memory();
        let mut fe = Frontend::connect(sock, queues as u64).expect("connect");
        let features = fe.get_features().expect("features");
        assert_ne!(features & f::VERSION_1, 0);
        fe.set_owner().expect("set_owner");
        fe.set_features(features).expect("set_features");
        let proto = fe.get_protocol_features().expect("protocol features");
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(proto.contains(VhostUserProtocolFeatures::MQ));
        assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_protocol_features(proto)
            .expect("set protocol features");
        // Every request acknowledged, so a refused one fails here.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(fe.get_queue_num().expect("queue num"), queues as u64);

        let region = mem.find_region(GuestAddress(0)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        fe.set_mem_table(&[info]).expect("set_mem_table");

        let mut g = Guest {
            mem,
            fe,
            rings: Vec::new(),
            next_buf: 0x100_0000,
        };
        for i in 0..queues {
            let base = GuestAddress(0x10_0000 * i as u64);
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: g.host_addr(base),
                used_ring_addr: g.host_addr(base.unchecked_add(USED)),
                avail_ring_addr: g.host_addr(base.unchecked_add(AVAIL)),
                log_addr: None,
            };
            let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
            let call = EventFd::new(EFD_NONBLOCK).expect("call");
            g.fe.set_vring_num(i, QSIZE).expect("vring num");
            g.fe.set_vring_addr(i, &cfg).expect("vring addr");
            g.fe.set_vring_base(i, 0).expect("vring base");
            g.fe.set_vring_call(i, &call).expect("vring call");
            g.fe.set_vring_kick(i, &kick).expect("vring kick");
            g.fe.set_vring_enable(i, true).expect("vring enable");
            g.rings.push(Ring {
                index: i,
                base,
                kick,
                call,
                next_desc: 0,
                submitted: 0,
            });
        }
        g
    }

    fn buf(&mut self, len: usize) -> GuestAddress {
        let a = self.next_buf;
        self.next_buf += (len as u64).max(1).div_ceil(4096) * 4096;
        assert!(self.next_buf < MEM as u64, "test ran out of guest memory");
        GuestAddress(a)
    }

    fn put(&mut self, data: &[u8]) -> GuestAddress {
        let a = self.buf(data.len());
        self.mem.write_slice(data, a).expect("write guest memory");
        a
    }

    /// Makes a chain of (addr, len, writable) available on ring `q` without
    /// kicking; returns its status address.
    fn post(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) {
        let ring = &mut self.rings[q];
        let first = ring.next_desc;
        for (i, (a, l, w)) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let flags = if *w { W } else { 0 } | if last { 0 } else { N };
            let idx = (first + i as u16) % QSIZE;
            let next = (idx + 1) % QSIZE;
            let desc = RawDescriptor::from(SplitDesc::new(a.0, *l, flags, next));
            self.mem
                .write_obj(desc, ring.base.unchecked_add(16 * u64::from(idx)))
                .expect("descriptor");
        }
        ring.next_desc = (first + segs.len() as u16) % QSIZE;
        // avail->ring[idx % size] = head; then publish avail->idx.
        let avail = ring.base.unchecked_add(AVAIL);
        let slot = u64::from(ring.submitted % QSIZE);
        self.mem
            .write_obj(first, avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        ring.submitted = ring.submitted.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(ring.submitted, avail.unchecked_add(2))
            .expect("avail idx");
    }

    fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).expect("kick");
    }

    /// Waits until every posted chain on ring `q` is used; returns the used
    /// entries (head, len) in order.
    fn wait_used(&self, q: usize) -> Vec<(u32, u32)> {
        let ring = &self.rings[q];
        let used = ring.base.unchecked_add(USED);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).expect("used idx");
            if idx == ring.submitted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ring {q}: used {idx} of {}",
                ring.submitted
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        // The device signalled the call eventfd at least once.
        assert!(
            ring.call.read().is_ok(),
            "no interrupt on ring {}",
            ring.index
        );
        // EVENT_IDX: everything so far is consumed; interrupt at the next.
        self.mem
            .write_obj(
                ring.submitted,
                ring.base.unchecked_add(AVAIL + 4 + 2 * u64::from(QSIZE)),
            )
            .expect("used_event");
        (0..ring.submitted)
            .map(|i| {
                let e = used.unchecked_add(4 + 8 * u64::from(i % QSIZE));
                let id: u32 = self.mem.read_obj(e).expect("used id");
                let len: u32 = self.mem.read_obj(e.unchecked_add(4)).expect("used len");
                (id, len)
            })
            .collect()
    }

    /// Posts one request and waits for it; returns (status, used length).
    fn request(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) -> (u8, u32) {
        let status = segs.last().expect("segments").0 .0 + u64::from(segs.last().expect("s").1) - 1;
        self.mem
            .write_obj(0xffu8, GuestAddress(status))
            .expect("status");
        self.post(q, segs);
        self.kick(q);
        let used = self.wait_used(q);
        let last = *used.last().expect("used");
        (
            self.mem
                .read_obj::<u8>(GuestAddress(status))
                .expect("status"),
            last.1,
        )
    }
}

fn hdr(type_: u32, sector: u64) -> [u8; 16] {
    OutHdr {
        type_,
        reserved: 0,
        sector,
    }
    .encode()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn start(tag: &str, queues: u16, blocks: u64) -> (Server, PathBuf) {
    start_with(
        tag,
        blocks,
        DeviceOptions {
            num_queues: queues,
            ..DeviceOptions::default()
        },
    )
}

fn start_with(tag: &str, blocks: u64, device: DeviceOptions) -> (Server, PathBuf) {
    let sock = socket_path(tag);
    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("fe-ram", blocks, 512).expect("ram"));
    let server = Server::start(ServerConfig {
        socket: sock.clone(),
        bdev,
        device,
    })
    .expect("server");
    (server, sock)
}

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
    let h = g.put(&hdr(req_type::FLUSH, 0));
    let s = g.buf(1);
    g.post(0, &[(h, 16, false), (s, 1, true)]);
    g.kick(0);
    let used = g.rings[0].base.unchecked_add(USED + 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.mem.read_obj::<u16>(used).expect("used idx") != 1 {
        assert!(Instant::now() < deadline, "flush not completed");
        std::thread::sleep(Duration::from_micros(100));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        g.rings[0].call.read().is_err(),
        "interrupt the driver did not ask for"
    );
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
