//! An in-process vhost-user frontend for the device's integration tests:
//! guest memory in a shared file, split rings and eventfds set up the way
//! QEMU sets them up, through the `vhost` crate's frontend side of the
//! protocol — including the inflight region (GET/SET_INFLIGHT_FD) and a
//! reconnect that restarts the rings from their used index, as QEMU does
//! after its backend died.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::{Bdev, RamBdev};
use unvme_vhost_blk::{features as f, OutHdr};
use unvme_vhost_blk::{DeviceOptions, Server, ServerConfig, SocketOptions};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MEM: usize = 64 << 20;
pub const QSIZE: u16 = 256;
pub const W: u16 = VRING_DESC_F_WRITE as u16;
pub const N: u16 = VRING_DESC_F_NEXT as u16;
/// Offsets of the rings from a queue's base.
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

/// Guest RAM in a shared tmpfs file, as QEMU's memfd backend would be.
pub fn shared_memory() -> GuestMemoryMmap<()> {
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

pub fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("unvme-vb-{tag}-{}.sock", std::process::id()))
}

/// One split virtqueue as the driver sees it (VIRTIO 1.2, 2.7): descriptor
/// table at `base`, available ring at `base + 0x1000`, used ring at
/// `base + 0x2000` (up to 256 entries each). Descriptors are handed out
/// round robin; a test keeps at most `size` in flight.
pub struct Ring {
    pub index: usize,
    pub base: GuestAddress,
    pub size: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// Next free descriptor index (descriptors are not reused).
    pub next_desc: u16,
    pub submitted: u16,
}

/// How [`Guest::connect_with`] sets the device up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub queues: usize,
    /// Negotiate INFLIGHT_SHMFD and GET/SET the region (queue size
    /// `region_queue_size`).
    pub inflight: bool,
    pub ring_size: u16,
    pub region_queue_size: u16,
}

impl Setup {
    pub fn plain(queues: usize) -> Self {
        Setup {
            queues,
            inflight: false,
            ring_size: QSIZE,
            region_queue_size: QSIZE,
        }
    }

    pub fn inflight(queues: usize) -> Self {
        Setup {
            inflight: true,
            ..Setup::plain(queues)
        }
    }
}

pub struct Guest {
    pub mem: GuestMemoryMmap<()>,
    pub fe: Frontend,
    pub rings: Vec<Ring>,
    /// Bump allocator for data buffers.
    pub next_buf: u64,
    pub setup: Setup,
    /// The inflight region the device handed out, kept as QEMU keeps it.
    pub inflight: Option<(VhostUserInflight, File)>,
    /// A second handle on `fe`'s connection, to see the device close it.
    pub conn: UnixStream,
}

/// Connects and negotiates features the way QEMU does.
pub fn negotiate(sock: &PathBuf, queues: usize) -> Frontend {
    negotiate_conn(sock, queues).0
}

/// [`negotiate`], also returning a second handle on the connection.
///
/// The device's socket listens once `Server::start` has returned (a device
/// process says so before the test connects), so one connect suffices.
pub fn negotiate_conn(sock: &PathBuf, queues: usize) -> (Frontend, UnixStream) {
    let stream = UnixStream::connect(sock).expect("connect to the device socket");
    let conn = stream.try_clone().expect("dup the connection");
    let mut fe = Frontend::from_stream(stream, queues as u64);
    let features = fe.get_features().expect("features");
    assert_ne!(features & f::VERSION_1, 0);
    fe.set_owner().expect("set_owner");
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("protocol features");
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(proto.contains(VhostUserProtocolFeatures::MQ));
    assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    fe.set_protocol_features(proto)
        .expect("set protocol features");
    // Every request acknowledged, so a refused one fails here.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().expect("queue num"), queues as u64);
    (fe, conn)
}

/// Waits (10 s at most) until the peer has closed `conn`, discarding
/// anything it still sends.
pub fn wait_closed(conn: &mut UnixStream) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the device did not close the connection");
        conn.set_read_timeout(Some(left)).expect("read timeout");
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("waiting for the device to close the connection: {e}"),
        }
    }
}

impl Guest {
    pub fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem.get_host_address(gpa).expect("host address") as u64
    }

    pub fn connect(sock: &PathBuf, queues: usize) -> Guest {
        Guest::connect_with(sock, Setup::plain(queues))
    }

    pub fn connect_with(sock: &PathBuf, setup: Setup) -> Guest {
        let (fe, conn) = negotiate_conn(sock, setup.queues);
        let mut g = Guest {
            mem: shared_memory(),
            fe,
            rings: Vec::new(),
            next_buf: 0x100_0000,
            setup,
            inflight: None,
            conn,
        };
        if setup.inflight {
            let req = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: setup.queues as u16,
                queue_size: setup.region_queue_size,
            };
            let (msg, file) = g.fe.get_inflight_fd(&req).expect("GET_INFLIGHT_FD");
            g.fe.set_inflight_fd(&msg, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
            g.inflight = Some((msg, file));
        }
        g.set_mem_table();
        for i in 0..setup.queues {
            g.rings.push(Ring {
                index: i,
                base: GuestAddress(0x10_0000 * i as u64),
                size: setup.ring_size,
                kick: EventFd::new(EFD_NONBLOCK).expect("kick"),
                call: EventFd::new(EFD_NONBLOCK).expect("call"),
                next_desc: 0,
                submitted: 0,
            });
            g.start_ring(i, 0);
        }
        g
    }

    pub fn set_mem_table(&mut self) {
        let region = self.mem.find_region(GuestAddress(0)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        self.fe.set_mem_table(&[info]).expect("set_mem_table");
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for ring `i`.
    pub fn start_ring(&mut self, i: usize, base: u16) {
        let r = &self.rings[i];
        let cfg = VringConfigData {
            queue_max_size: r.size,
            queue_size: r.size,
            flags: 0,
            desc_table_addr: self.host_addr(r.base),
            used_ring_addr: self.host_addr(r.base.unchecked_add(USED)),
            avail_ring_addr: self.host_addr(r.base.unchecked_add(AVAIL)),
            log_addr: None,
        };
        self.fe.set_vring_num(i, r.size).expect("vring num");
        self.fe.set_vring_addr(i, &cfg).expect("vring addr");
        self.fe.set_vring_base(i, base).expect("vring base");
        self.fe.set_vring_call(i, &r.call).expect("vring call");
        self.fe.set_vring_kick(i, &r.kick).expect("vring kick");
        self.fe.set_vring_enable(i, true).expect("vring enable");
    }

    /// The device went away: connect to `sock` again and restart every
    /// ring where QEMU restarts it when GET_VRING_BASE could not be asked
    /// — at the used index — handing back the inflight region first.
    pub fn reconnect(&mut self, sock: &PathBuf) {
        self.disconnect();
        (self.fe, self.conn) = negotiate_conn(sock, self.setup.queues);
        if let Some((msg, file)) = &self.inflight {
            self.fe
                .set_inflight_fd(msg, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        self.set_mem_table();
        for i in 0..self.rings.len() {
            let base = self.used_idx(i);
            self.rings[i].kick = EventFd::new(EFD_NONBLOCK).expect("kick");
            self.rings[i].call = EventFd::new(EFD_NONBLOCK).expect("call");
            self.start_ring(i, base);
        }
    }

    /// Closes the connection (the frontend goes away) and waits until the
    /// device has closed its end too (a dead device: at once); memory and
    /// rings stay.
    pub fn disconnect(&mut self) {
        let (dead, _) = UnixStream::pair().expect("socket pair");
        drop(std::mem::replace(
            &mut self.fe,
            Frontend::from_stream(dead, self.setup.queues as u64),
        ));
        // `conn` still holds the connection open: end our direction, so the
        // device reads EOF, and see it close.
        let _ = self.conn.shutdown(Shutdown::Write);
        wait_closed(&mut self.conn);
    }

    pub fn buf(&mut self, len: usize) -> GuestAddress {
        let a = self.next_buf;
        self.next_buf += (len as u64).max(1).div_ceil(4096) * 4096;
        assert!(self.next_buf < MEM as u64, "test ran out of guest memory");
        GuestAddress(a)
    }

    pub fn put(&mut self, data: &[u8]) -> GuestAddress {
        let a = self.buf(data.len());
        self.mem.write_slice(data, a).expect("write guest memory");
        a
    }

    /// Writes a chain of (addr, len, writable) into the descriptor table of
    /// ring `q` without making it available; returns its head.
    pub fn write_chain(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) -> u16 {
        let ring = &mut self.rings[q];
        let first = ring.next_desc;
        for (i, (a, l, w)) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let flags = if *w { W } else { 0 } | if last { 0 } else { N };
            let idx = (first + i as u16) % ring.size;
            let next = (idx + 1) % ring.size;
            let desc = RawDescriptor::from(SplitDesc::new(a.0, *l, flags, next));
            self.mem
                .write_obj(desc, ring.base.unchecked_add(16 * u64::from(idx)))
                .expect("descriptor");
        }
        ring.next_desc = (first + segs.len() as u16) % ring.size;
        first
    }

    /// Makes a chain of (addr, len, writable) available on ring `q` without
    /// kicking; returns its head.
    pub fn post(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) -> u16 {
        let head = self.write_chain(q, segs);
        self.publish(q, head);
        head
    }

    /// Makes an indirect chain (VIRTIO 1.2, 2.7.5.3) of (addr, len,
    /// writable) available on ring `q` without kicking: the table in a
    /// buffer of its own, one ring descriptor pointing at it. Returns the
    /// head.
    pub fn post_indirect(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) -> u16 {
        let table = self.buf(16 * segs.len());
        for (i, (a, l, w)) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let flags = if *w { W } else { 0 } | if last { 0 } else { N };
            let desc = RawDescriptor::from(SplitDesc::new(a.0, *l, flags, i as u16 + 1));
            self.mem
                .write_obj(desc, table.unchecked_add(16 * i as u64))
                .expect("indirect descriptor");
        }
        let ring = &mut self.rings[q];
        let head = ring.next_desc;
        ring.next_desc = (head + 1) % ring.size;
        let len = u32::try_from(16 * segs.len()).expect("indirect table length");
        let desc = RawDescriptor::from(SplitDesc::new(
            table.0,
            len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        let at = ring.base.unchecked_add(16 * u64::from(head));
        self.mem.write_obj(desc, at).expect("descriptor");
        self.publish(q, head);
        head
    }

    /// Puts `head` in the next available-ring slot of ring `q` and
    /// publishes the new available index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        // avail->ring[idx % size] = head; then publish avail->idx.
        let avail = ring.base.unchecked_add(AVAIL);
        let slot = u64::from(ring.submitted % ring.size);
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        ring.submitted = ring.submitted.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(ring.submitted, avail.unchecked_add(2))
            .expect("avail idx");
    }

    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).expect("kick");
    }

    /// The used ring's index of ring `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(self.rings[q].base.unchecked_add(USED + 2))
            .expect("used idx")
    }

    /// Used-ring entry `i` (id, len) of ring `q`.
    pub fn used_entry(&self, q: usize, i: u16) -> (u32, u32) {
        let ring = &self.rings[q];
        let e = ring
            .base
            .unchecked_add(USED + 4 + 8 * u64::from(i % ring.size));
        let id: u32 = self.mem.read_obj(e).expect("used id");
        let len: u32 = self.mem.read_obj(e.unchecked_add(4)).expect("used len");
        (id, len)
    }

    /// Waits (10 s at most) until the used index of ring `q` is `n`.
    pub fn wait_used_idx(&self, q: usize, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let idx = self.used_idx(q);
            if idx == n {
                return;
            }
            assert!(Instant::now() < deadline, "ring {q}: used {idx}, want {n}");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits (10 s at most) for an interrupt on ring `q`; returns how many
    /// the device signalled since the call eventfd was last read.
    pub fn wait_call(&self, q: usize) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.rings[q].call.read() {
                Ok(n) => return n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("ring {q}: reading the call eventfd: {e}"),
            }
            assert!(Instant::now() < deadline, "ring {q}: no interrupt");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// EVENT_IDX: interrupt at the next completion after `n`.
    pub fn set_used_event(&self, q: usize, n: u16) {
        let ring = &self.rings[q];
        self.mem
            .write_obj(
                n,
                ring.base
                    .unchecked_add(AVAIL + 4 + 2 * u64::from(ring.size)),
            )
            .expect("used_event");
    }

    /// Waits until every posted chain on ring `q` is used; returns the used
    /// entries (head, len) in order.
    pub fn wait_used(&self, q: usize) -> Vec<(u32, u32)> {
        let ring = &self.rings[q];
        self.wait_used_idx(q, ring.submitted);
        // The device signals the call eventfd (at least once) after it
        // publishes the used index: wait for it, do not race it.
        self.wait_call(q);
        // EVENT_IDX: everything so far is consumed; interrupt at the next.
        self.set_used_event(q, ring.submitted);
        (0..ring.submitted).map(|i| self.used_entry(q, i)).collect()
    }

    /// Posts one request and waits for it; returns (status, used length).
    pub fn request(&mut self, q: usize, segs: &[(GuestAddress, u32, bool)]) -> (u8, u32) {
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

pub fn hdr(type_: u32, sector: u64) -> [u8; 16] {
    OutHdr {
        type_,
        reserved: 0,
        sector,
    }
    .encode()
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

pub fn start(tag: &str, queues: u16, blocks: u64) -> (Server, PathBuf) {
    start_with(
        tag,
        blocks,
        DeviceOptions {
            num_queues: queues,
            ..DeviceOptions::default()
        },
    )
}

pub fn start_with(tag: &str, blocks: u64, device: DeviceOptions) -> (Server, PathBuf) {
    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("fe-ram", blocks, 512).expect("ram"));
    start_bdev(tag, bdev, device)
}

pub fn start_bdev(tag: &str, bdev: Arc<dyn Bdev>, device: DeviceOptions) -> (Server, PathBuf) {
    start_listen(tag, bdev, device, SocketOptions::default())
}

pub fn start_listen(
    tag: &str,
    bdev: Arc<dyn Bdev>,
    device: DeviceOptions,
    listen: SocketOptions,
) -> (Server, PathBuf) {
    let sock = socket_path(tag);
    let server = Server::start(ServerConfig {
        socket: sock.clone(),
        bdev,
        device,
        listen,
    })
    .expect("server");
    (server, sock)
}
