//! Entry points for the cargo-fuzz targets (feature `fuzzing`): the real
//! descriptor-chain walk, request parser and queue worker over guest memory
//! holding a split virtqueue, with the invariants a fuzzer checks after
//! every input.
//!
//! The rings are laid out here, 4 KiB apart, not by virtio-queue's
//! `MockSplitQueue`: in virtio-queue 0.18 it places the used ring at the
//! available ring's start plus its *entry count* (not its byte size), so
//! the used index overwrites available-ring entries (found by this target).
//!
//! Not an API: the shapes here follow what the fuzz targets need.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use unvme_bdev::{Bdev, RamBdev};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{DeviceOptions, Geometry};
use crate::chain::SplitChain;
use crate::spec::{req_type, OutHdr, Status};
use crate::worker::{GuestLender, Worker};

/// Guest memory of the fuzzed queue.
const MEM_SIZE: usize = 1 << 20;
/// Where [`FuzzRing::data`] is copied (headers, segments, payload).
const DATA: u64 = 0x1_0000;
/// Where [`FuzzRing::indirect`] is written.
const INDIRECT: u64 = 0x8_0000;
/// A known-good request's buffers, after everything the fuzzer writes.
const GOOD: u64 = 0xf_0000;

/// The descriptor table, available and used rings (each fits 4 KiB for up
/// to 256 entries).
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// A ready split queue of `size` entries at the fixed ring addresses.
fn queue(size: u16) -> Queue {
    let mut q = Queue::new(size).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q
}

/// Below this the rings live; the fuzzer's buffers are kept above it so a
/// device write cannot rewrite the rings the checks read back.
const RINGS_END: u64 = 0x1_0000;

/// One descriptor as the fuzzer makes it.
#[derive(Clone, Copy, Debug)]
pub struct FuzzDesc {
    /// Guest address: below 2^31 taken modulo the memory size (kept clear
    /// of the rings), above it far outside guest memory.
    pub addr: u32,
    /// Length in bytes.
    pub len: u32,
    /// Raw flags (NEXT, WRITE, INDIRECT, anything else).
    pub flags: u16,
    /// Raw next index.
    pub next: u16,
}

/// One fuzz case: a descriptor table, an indirect table, the heads made
/// available and the bytes the descriptors point at.
#[derive(Clone, Debug, Default)]
pub struct FuzzRing {
    /// Queue size is `1 << (queue_size_log2 % 9)` (1 to 256).
    pub queue_size_log2: u8,
    /// The descriptor table (cut to the queue size).
    pub table: Vec<FuzzDesc>,
    /// A table an INDIRECT descriptor may point at (written at a fixed
    /// address; an INDIRECT descriptor's address is redirected there).
    pub indirect: Vec<FuzzDesc>,
    /// Heads put in the available ring.
    pub heads: Vec<u16>,
    /// Extra available index beyond `heads.len()` (a driver lying about
    /// how many are available).
    pub avail_extra: u16,
    /// Bytes at [`DATA`]: headers, discard segments, data.
    pub data: Vec<u8>,
    /// Lend guest pages to the device queue (zero copy) instead of copying.
    pub lend: bool,
}

fn addr(a: u32) -> u64 {
    if a & (1 << 31) == 0 {
        (u64::from(a) % MEM_SIZE as u64).max(RINGS_END)
    } else {
        (1u64 << 40) + u64::from(a)
    }
}

fn raw(d: &FuzzDesc, indirect_target: bool) -> RawDescriptor {
    let a = if indirect_target
        && d.flags & virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16 != 0
    {
        INDIRECT
    } else {
        addr(d.addr)
    };
    RawDescriptor::from(Descriptor::new(a, d.len, d.flags, d.next))
}

fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().raw_value(), d.len(), d.flags(), d.next())
}

/// Runs one case through the real device worker over a RAM disk and checks:
/// no panic; the resubmission walker sees every chain exactly as
/// virtio-queue does; every chain taken (with a head inside the table) comes back on the used ring with a
/// used length within the transfer limit; nothing stays in flight;
/// and a well-formed write and read-back then still succeed.
pub fn run_chains(case: &FuzzRing) {
    let qsize: u16 = 1 << (case.queue_size_log2 % 9);
    let m = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"),
    );
    let mut q = queue(qsize);
    let table = GuestAddress(q.desc_table());
    for (i, d) in case.table.iter().take(usize::from(qsize)).enumerate() {
        m.write_obj(raw(d, true), table.unchecked_add(16 * i as u64))
            .expect("descriptor");
    }
    for (i, d) in case.indirect.iter().take(4096).enumerate() {
        let _ = m.write_obj(raw(d, false), GuestAddress(INDIRECT + 16 * i as u64));
    }
    let data = &case.data[..case.data.len().min(0x7_0000 - DATA as usize)];
    m.write_slice(data, GuestAddress(DATA)).expect("data");
    let avail = GuestAddress(q.avail_ring());
    let heads = &case.heads[..case.heads.len().min(usize::from(qsize))];
    for (i, h) in heads.iter().enumerate() {
        m.write_obj(*h, avail.unchecked_add(4 + 2 * i as u64))
            .expect("avail ring");
    }
    let avail_idx = (heads.len() as u16).wrapping_add(case.avail_extra);
    m.write_obj(avail_idx, avail.unchecked_add(2))
        .expect("avail idx");

    // The resubmission walker agrees with virtio-queue on every chain.
    let mut q2: Queue = queue(qsize);
    let mut expected = 0usize;
    if let Ok(chains) = q2.iter(&*m) {
        for chain in chains {
            let head = chain.head_index();
            let want: Vec<_> = chain.map(|d| key(&d)).collect();
            let got: Vec<_> = SplitChain::new(&*m, table, qsize, head)
                .map(|d| key(&d))
                .collect();
            assert_eq!(got, want, "head {head}");
            // A head outside the table cannot be returned (no used id for
            // it); the device drops it.
            expected += usize::from(head < qsize);
        }
    }

    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("fuzz", 2048, 512).expect("ram"));
    let geo = Geometry::new(bdev.info(), &DeviceOptions::default()).expect("geometry");
    let mut worker = Worker::new(
        bdev.open_queue().expect("queue"),
        Arc::new(geo.limits.clone()),
        Arc::new(AtomicBool::new(true)),
        qsize,
    );
    if case.lend {
        worker.set_lender(0, Some(GuestLender::new(m.clone())));
    }
    let used = drain(&mut worker, &mut q, &m);
    assert_eq!(used, expected, "every chain taken comes back");
    let used_ring = GuestAddress(q.used_ring());
    for i in 0..used {
        let e = used_ring.unchecked_add(4 + 8 * (i % usize::from(qsize)) as u64);
        let id: u32 = m.read_obj(e).expect("used id");
        let len: u32 = m.read_obj(e.unchecked_add(4)).expect("used len");
        assert!(id < u32::from(qsize), "used id {id}");
        // The status byte at most, and data never beyond the disk's limit.
        assert!(len <= geo.limits.max_request + 1, "used len {len}");
    }

    // A well-formed write, then a read of it, still succeed.
    if qsize < 4 {
        // Too small for a three-descriptor chain.
        return;
    }
    let n = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    for (type_, flags) in [(req_type::OUT, n), (req_type::IN, n | w)] {
        let hdr = OutHdr {
            type_,
            reserved: 0,
            sector: 8,
        }
        .encode();
        m.write_slice(&hdr, GuestAddress(GOOD)).expect("hdr");
        if type_ == req_type::OUT {
            m.write_slice(&[0xa5; 512], GuestAddress(GOOD + 0x1000))
                .expect("data");
        } else {
            m.write_slice(&[0; 512], GuestAddress(GOOD + 0x1000))
                .expect("data");
        }
        m.write_obj(0xffu8, GuestAddress(GOOD + 0x2000))
            .expect("status");
        let descs = [
            RawDescriptor::from(Descriptor::new(GOOD, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(GOOD + 0x1000, 512, flags, 2)),
            RawDescriptor::from(Descriptor::new(GOOD + 0x2000, 1, w, 0)),
        ];
        for (i, d) in descs.iter().enumerate() {
            m.write_obj(*d, table.unchecked_add(16 * i as u64))
                .expect("descriptor");
        }
        m.write_obj(0u16, avail.unchecked_add(4)).expect("avail");
        m.write_obj(1u16, avail.unchecked_add(2))
            .expect("avail idx");
        m.write_obj(0u16, used_ring.unchecked_add(2))
            .expect("used idx");
        // A fresh ring state, as after a driver reset.
        let mut q: Queue = queue(qsize);
        assert_eq!(drain(&mut worker, &mut q, &m), 1);
        let status: u8 = m.read_obj(GuestAddress(GOOD + 0x2000)).expect("status");
        assert_eq!(status, Status::Ok as u8, "good request type {type_}");
    }
    let mut got = [0u8; 512];
    m.read_slice(&mut got, GuestAddress(GOOD + 0x1000))
        .expect("read back");
    assert_eq!(got, [0xa5; 512], "data read back");
}

/// Runs the worker until nothing is available or in flight; returns how
/// many chains came back on the used ring.
fn drain(worker: &mut Worker, q: &mut Queue, m: &GuestMemoryMmap<()>) -> usize {
    let before = q.next_used();
    for _ in 0..10_000 {
        let taken = worker.process_avail(q, m);
        worker.poll(q, m);
        if taken == 0 && worker.outstanding() == 0 {
            break;
        }
    }
    assert_eq!(worker.outstanding(), 0, "requests left in flight");
    usize::from(q.next_used().wrapping_sub(before))
}

/// Runs a stream of frontend messages through the real vhost-user request
/// handler (the `vhost` crate's `BackendReqHandler` driving this device's
/// handler) over a socket pair, after a valid SET_MEM_TABLE of 1 MiB of
/// memfd-backed guest memory when `with_memory` (so ring addresses can be
/// accepted). `stream` is raw bytes: headers and payloads as the fuzz
/// target lays them out; no descriptors are attached. Checks: no panic, the
/// connection ends (EOF) instead of hanging, and the handler shuts down.
pub fn run_messages(stream: &[u8], with_memory: bool) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use vhost::vhost_user::{BackendReqHandler, Frontend};
    use vhost::VhostBackend;
    use vhost::VhostUserMemoryRegionInfo;
    use vm_memory::{FileOffset, GuestMemoryBackend};

    use crate::backend::BlkBackend;
    use crate::handler::BlkHandler;

    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("fuzz", 2048, 512).expect("ram"));
    let opts = DeviceOptions {
        num_queues: 2,
        max_queue_size: 256,
        ..DeviceOptions::default()
    };
    let backend = Arc::new(BlkBackend::new(&bdev, &opts).expect("backend"));
    let handler = Arc::new(Mutex::new(BlkHandler::new(backend).expect("handler")));
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let mut raw = ours.try_clone().expect("dup");
    let fe = Frontend::from_stream(ours, 2);
    let _mem = with_memory.then(|| {
        // SAFETY: a constant NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"unvme-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).expect("size memfd");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let region = mem.find_region(GuestAddress(0)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
        mem
    });
    // Bounded so every reply fits the socket buffer (nobody reads them).
    let stream = &stream[..stream.len().min(16 * 1024)];
    raw.write_all(stream).expect("messages");
    raw.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut conn = BackendReqHandler::from_stream(theirs, handler.clone());
    for _ in 0..100_000 {
        if conn.handle_request().is_err() {
            let refused = handler
                .lock()
                .map(|mut h| h.take_refused())
                .unwrap_or(false);
            if !refused {
                break;
            }
        }
    }
    drop(conn);
    handler.lock().expect("handler").shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_outside_the_table_are_dropped_and_the_rest_answered() {
        run_chains(&FuzzRing {
            queue_size_log2: 3,
            heads: vec![65535, 0, 65535, 65421, 5631, 65320],
            ..FuzzRing::default()
        });
    }

    #[test]
    fn message_stream_runs_to_its_end() {
        // GET_FEATURES, SET_OWNER, a truncated SET_VRING_NUM.
        let mut s = Vec::new();
        for (req, body) in [(1u32, &[][..]), (3, &[]), (8, &[0, 0, 0, 0, 0][..])] {
            s.extend_from_slice(&req.to_le_bytes());
            s.extend_from_slice(&1u32.to_le_bytes());
            s.extend_from_slice(&(body.len() as u32).to_le_bytes());
            s.extend_from_slice(body);
        }
        run_messages(&s, true);
        run_messages(&s, false);
    }
}
