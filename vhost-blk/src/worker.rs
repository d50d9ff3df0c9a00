//! The per-virtqueue worker: one virtqueue, one owning thread, one
//! [`BdevQueue`] (for a remote source, one NVMe/TCP queue pair).
//!
//! The worker pops chains from the available ring, parses them
//! ([`crate::request`]), submits them to its device queue — many in flight —
//! and, as the device queue completes them, copies read data into guest
//! memory, writes the status byte and returns the chain to the used ring.
//! Whether the guest must be notified is left to the caller, which asks the
//! queue (EVENT_IDX) after each batch.
//!
//! With an inflight region ([`crate::inflight`]) the worker records every
//! chain it takes and returns, and when its ring starts
//! ([`Worker::start_ring`]) it resubmits what an earlier device instance
//! left in flight, oldest first, before taking new chains.
//!
//! It knows nothing about vhost-user: it works on a `virtio_queue::Queue` and
//! any `GuestMemory`, so unit tests drive it with virtio-queue's mock queue.
//!
//! Data moves without a copy when it can: given the guest memory as a
//! [`GuestLender`] ([`Worker::set_lender`]), a request whose data segments
//! are one run of host memory (a single segment, or segments that follow
//! each other in the mapping) gets an [`IoBuf`] that *is* that guest memory
//! ([`IoBuf::from_owner`]); the device queue reads the write data from it
//! and writes the read data into it — for a remote namespace, straight
//! between the guest's pages and the NVMe/TCP socket (writev/readv). The
//! buffer keeps the memory table it came from mapped until the request
//! finishes, even if the frontend replaces the table meanwhile. Scattered
//! segments (a multi-page request's guest pages) become one buffer each,
//! handed over together as the request's segments
//! ([`unvme_bdev::IoRequest::more`]) when the device queue takes that many
//! ([`BdevQueue::max_segments`]: an NVMe/TCP queue pair and a RAM disk do).
//! The rest (no lender, a one-segment queue such as a file under O_DIRECT,
//! a segment across two memory regions) is copied through a per-request
//! buffer from a small per-queue pool (gather before a write, scatter after
//! a read). The worker's `data_path` counts both; the count is logged when the
//! worker goes.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use unvme_bdev::{BdevQueue, BufOwner, IoBuf, IoCompletion, IoOp, IoRequest, SubmitError};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::SplitChain;
use crate::inflight::{QueueInflight, Recovery};
use crate::request::{gather, scatter, write_status, ChainInfo, Limits, Parsed, Parser, Seg};
use crate::spec::Status;

/// Most idle buffers a worker keeps for reuse.
const BUF_POOL: usize = 128;

/// One guest memory table, lent to device queues as request data buffers.
/// Every buffer made from it holds it (an `Arc`), so the table's mappings
/// outlive the buffer even when the frontend installs a new table.
pub struct GuestLender {
    mem: Arc<GuestMemoryMmap<()>>,
}

impl GuestLender {
    /// Lends `mem`.
    pub fn new(mem: Arc<GuestMemoryMmap<()>>) -> Arc<Self> {
        Arc::new(GuestLender { mem })
    }

    /// The memory at `segs` as one buffer, if the segments are one run of
    /// host memory inside one region of this table.
    fn lend(self: &Arc<Self>, segs: &[Seg], len: u32) -> Option<IoBuf> {
        let host = |s: &Seg| {
            self.mem
                .get_slice(s.addr, s.len as usize)
                .ok()
                .map(|v| v.ptr_guard_mut().as_ptr())
        };
        let first = segs.first()?;
        let start = host(first)?;
        let mut end = start.wrapping_add(first.len as usize);
        for s in &segs[1..] {
            let p = host(s)?;
            if p != end {
                return None;
            }
            end = p.wrapping_add(s.len as usize);
        }
        let ptr = NonNull::new(start)?;
        let owner: Arc<dyn BufOwner> = self.clone();
        // `get_slice` checked that every segment lies inside one mapped
        // region of `self.mem`, and the loop that the segments follow each
        // other in host memory, so `ptr..ptr+len` (len is the sum of the
        // segment lengths) is mapped, readable and writable memory of this
        // table. The buffer holds `owner`, an `Arc` of this table, and
        // regions unmap only when the table's last `Arc` goes. The bytes are
        // plain data shared with the guest, which owns them to the device
        // until the chain is returned; its writes meanwhile can only change
        // their values, the case `from_owner` allows for such a peer.
        // SAFETY: the range is mapped read/write memory of `self.mem`, kept mapped by `owner` for the buffer's life, and shared only with the guest (see above).
        Some(unsafe { IoBuf::from_owner(ptr, len as usize, owner) })
    }

    /// Each of `segs` as a buffer of its own (the first, then the rest),
    /// for a device queue that takes up to `max` segments per request.
    fn lend_each(self: &Arc<Self>, segs: &[Seg], max: usize) -> Option<(IoBuf, Vec<IoBuf>)> {
        if segs.len() < 2 || segs.len() > max {
            return None;
        }
        let first = self.lend(&segs[..1], segs[0].len)?;
        let rest = segs[1..]
            .iter()
            .map(|s| self.lend(std::slice::from_ref(s), s.len))
            .collect::<Option<Vec<_>>>()?;
        Some((first, rest))
    }
}

impl BufOwner for GuestLender {}

/// How request data moved so far (kept by each [`Worker`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DataPath {
    /// Requests whose data the device queue used in guest memory.
    pub zero_copy: u64,
    /// Requests whose data was copied through a buffer.
    pub copied: u64,
}

/// One in-flight request, indexed by its chain's head descriptor.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    read: bool,
    /// The request's buffer is guest memory: nothing to scatter.
    lent: bool,
    chain: ChainInfo,
}

/// Serves one virtqueue.
pub struct Worker {
    bdev: Box<dyn BdevQueue>,
    lim: Arc<Limits>,
    writeback: Arc<AtomicBool>,
    parser: Parser,
    slots: Vec<Slot>,
    /// A request the device queue answered Busy to; nothing more is popped
    /// from the ring until it is taken.
    pending: Option<IoRequest>,
    completions: Vec<IoCompletion>,
    bufs: Vec<IoBuf>,
    /// Chains returned to the used ring since the last [`Worker::take_used`].
    used: usize,
    /// This ring's part of the inflight region, while the ring runs.
    inflight: Option<QueueInflight>,
    /// Fetch order of the next chain taken (`DescStateSplit::counter`).
    counter: u64,
    /// Heads an earlier device instance left in flight, to be resubmitted
    /// before anything new is taken.
    resubmit: VecDeque<u16>,
    /// The guest memory data buffers are lent from, and its generation.
    lender: Option<(u64, Arc<GuestLender>)>,
    data_path: DataPath,
    /// Index of the virtqueue, for the log.
    index: usize,
    /// Data segments the device queue takes per request.
    max_segments: usize,
}

/// What [`Worker::start_ring`] did with the inflight region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RingStart {
    /// Requests queued for resubmission.
    pub resubmit: usize,
    /// The ring's next available index, if the region moved it (to the
    /// used index plus the requests in flight).
    pub next_avail: Option<u16>,
    /// The region's report.
    pub recovery: Recovery,
    /// Tracking is off for this ring start (no region, or one that cannot
    /// describe this ring); the reason.
    pub untracked: Option<&'static str>,
}

impl Worker {
    /// A worker over `bdev` for a queue of up to `max_queue_size` entries.
    pub fn new(
        bdev: Box<dyn BdevQueue>,
        lim: Arc<Limits>,
        writeback: Arc<AtomicBool>,
        max_queue_size: u16,
    ) -> Self {
        let max_segments = bdev.max_segments();
        Worker {
            bdev,
            lim,
            writeback,
            parser: Parser::new(),
            slots: (0..max_queue_size).map(|_| Slot::default()).collect(),
            pending: None,
            completions: Vec::with_capacity(usize::from(max_queue_size)),
            bufs: Vec::new(),
            used: 0,
            inflight: None,
            counter: 0,
            resubmit: VecDeque::with_capacity(usize::from(max_queue_size)),
            lender: None,
            data_path: DataPath::default(),
            index: 0,
            max_segments,
        }
    }

    /// Names the worker's virtqueue in its log.
    pub fn with_index(mut self, index: usize) -> Self {
        self.index = index;
        self
    }

    /// The memory table generation whose lender the worker holds, if any.
    pub fn lender_generation(&self) -> Option<u64> {
        self.lender.as_ref().map(|(g, _)| *g)
    }

    /// Lends data buffers from `lender` (generation `gen` of the memory
    /// table) from now on; `None` copies all data.
    pub fn set_lender(&mut self, gen: u64, lender: Option<Arc<GuestLender>>) {
        self.lender = lender.map(|l| (gen, l));
    }

    /// How request data moved so far.
    #[cfg(test)]
    pub fn data_path(&self) -> DataPath {
        self.data_path
    }

    /// The ring is starting (kick set, addresses and base known): attach
    /// this ring's part of the inflight region, if any, repair it and queue
    /// what it holds in flight for resubmission, and move the ring's next
    /// available index past everything taken before (the used index plus
    /// what is in flight; the spec's "When reconnecting").
    pub fn start_ring<M: GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        queue: usize,
        inflight: Option<QueueInflight>,
    ) -> RingStart {
        self.resubmit.clear();
        self.inflight = None;
        let mut out = RingStart::default();
        let Some(inf) = inflight else {
            out.untracked = Some("no inflight region");
            return out;
        };
        if q.size() > inf.desc_num() {
            out.untracked = Some("ring larger than the inflight region");
            return out;
        }
        let ring_used = match q.used_idx(mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(_) => {
                out.untracked = Some("used ring unreadable");
                return out;
            }
        };
        let rec = inf.recover(queue, ring_used, q.size());
        if rec.recovered {
            // `heads.len()` is below the ring size, a u16.
            let n = u16::try_from(rec.heads.len()).unwrap_or(u16::MAX);
            let next = ring_used.wrapping_add(n);
            if next != q.next_avail() {
                out.next_avail = Some(next);
                q.set_next_avail(next);
            }
        }
        self.counter = rec.next_counter;
        self.resubmit.extend(rec.heads.iter().copied());
        out.resubmit = self.resubmit.len();
        out.recovery = rec;
        self.inflight = Some(inf);
        out
    }

    /// Heads waiting to be resubmitted.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    /// Requests handed to the device queue (or waiting for it) and not yet
    /// returned to the guest.
    pub fn outstanding(&self) -> usize {
        self.bdev.outstanding() + usize::from(self.pending.is_some())
    }

    /// Chains added to the used ring since the last call; the caller
    /// notifies the guest if any were and the queue says it must.
    pub fn take_used(&mut self) -> usize {
        std::mem::take(&mut self.used)
    }

    /// Resubmits what the inflight region left in flight, then pops and
    /// starts every available chain (until the device queue is full).
    /// Returns how many chains were taken.
    pub fn process_avail<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> usize {
        let mut taken = self.process_resubmit(q, mem);
        if !self.resubmit.is_empty() {
            return taken;
        }
        loop {
            if !self.retry_pending() {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            if let Some(inf) = &self.inflight {
                if head < q.size() {
                    inf.mark(head, self.counter);
                    self.counter = self.counter.wrapping_add(1);
                }
            }
            self.take_chain(q, mem, head, chain);
        }
        taken
    }

    /// Starts the requests queued by [`Worker::start_ring`] (until the
    /// device queue is full). A stopping ring drains these too: they were
    /// taken from the guest before, so they are finished, not dropped.
    pub fn process_resubmit<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> usize {
        let mut taken = 0;
        while !self.resubmit.is_empty() && self.retry_pending() {
            let Some(head) = self.resubmit.pop_front() else {
                break;
            };
            taken += 1;
            let chain = SplitChain::new(mem, GuestAddress(q.desc_table()), q.size(), head);
            self.take_chain(q, mem, head, chain);
        }
        taken
    }

    /// Parses one chain and completes it at once or submits it.
    fn take_chain<M: GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        head: u16,
        chain: impl Iterator<Item = Descriptor>,
    ) {
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            // The queue rejects such heads itself; nothing to answer.
            tracing::debug!(head, "descriptor head beyond the queue");
            return;
        };
        if slot.busy {
            // A driver bug: the head is still ours. Answering would
            // complete the earlier request twice; ignore the repeat.
            tracing::debug!(head, "chain head reused while in flight");
            return;
        }
        let wb = self.writeback.load(Ordering::Relaxed);
        match self
            .parser
            .parse(mem, chain, &self.lim, wb, &mut slot.chain)
        {
            Parsed::NoStatus => {
                tracing::debug!(head, "chain without a reachable status byte");
                self.add_used(q, mem, head, 0);
            }
            Parsed::Complete { status, used_len } => {
                write_status(mem, slot.chain.status_addr, status);
                self.add_used(q, mem, head, used_len);
            }
            Parsed::Submit(op) => self.start(q, mem, head, op),
        }
    }

    fn start<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M, head: u16, op: IoOp) {
        let idx = usize::from(head);
        let mut more = Vec::new();
        let (read, lent, buf) = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => {
                let read = matches!(op, IoOp::Read { .. });
                let chain = &self.slots[idx].chain;
                let max_segs = self.max_segments;
                if let Some((buf, rest)) = self.lender.as_ref().and_then(|(_, l)| {
                    l.lend(&chain.segs, chain.data_len)
                        .map(|b| (b, Vec::new()))
                        .or_else(|| l.lend_each(&chain.segs, max_segs))
                }) {
                    self.data_path.zero_copy += 1;
                    more = rest;
                    (read, true, Some(buf))
                } else {
                    let len = chain.data_len as usize;
                    let mut buf = take_buf(&mut self.bufs, len);
                    if !read && gather(mem, &chain.segs, &mut buf).is_err() {
                        put_buf(&mut self.bufs, buf);
                        let status_addr = chain.status_addr;
                        write_status(mem, status_addr, Status::IoErr);
                        self.add_used(q, mem, head, 1);
                        return;
                    }
                    self.data_path.copied += 1;
                    (read, false, Some(buf))
                }
            }
            _ => (false, false, None),
        };
        let slot = &mut self.slots[idx];
        slot.busy = true;
        slot.read = read;
        slot.lent = lent;
        let req = IoRequest {
            tag: u64::from(head),
            op,
            buf,
            more,
        };
        if let Err(SubmitError::Busy(req)) = self.bdev.submit(req) {
            self.pending = Some(req);
        }
    }

    /// Submits the request the device queue last refused, if any; false if
    /// it is still refused.
    fn retry_pending(&mut self) -> bool {
        if let Some(req) = self.pending.take() {
            if let Err(SubmitError::Busy(req)) = self.bdev.submit(req) {
                self.pending = Some(req);
                return false;
            }
        }
        true
    }

    /// Collects finished requests from the device queue and returns their
    /// chains to the used ring, and retries a refused submission (so a
    /// stopping queue, which pops nothing more, still drains). Returns how
    /// many finished.
    pub fn poll<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        done.clear();
        let mut n = self.bdev.poll(&mut done);
        if self.pending.is_some() && self.retry_pending() {
            n += self.bdev.poll(&mut done);
        }
        for c in done.drain(..) {
            self.complete(q, mem, c);
        }
        self.completions = done;
        n
    }

    fn complete<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M, c: IoCompletion) {
        let Some(slot) = usize::try_from(c.tag)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            tracing::warn!(tag = c.tag, "completion for an unknown request");
            return;
        };
        slot.busy = false;
        let mut status = match &c.result {
            Ok(()) => Status::Ok,
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                Status::from(e)
            }
        };
        let mut used_len = 1;
        if slot.read && status == Status::Ok {
            match &c.buf {
                // The device queue wrote the data into guest memory.
                Some(_) if slot.lent => used_len += slot.chain.data_len,
                Some(b) if scatter(mem, &slot.chain.segs, b).is_ok() => {
                    used_len += slot.chain.data_len;
                }
                _ => status = Status::IoErr,
            }
        }
        write_status(mem, slot.chain.status_addr, status);
        // `c.tag` came from a u16 head in `start`.
        let head = u16::try_from(c.tag).unwrap_or(u16::MAX);
        if let Some(b) = c.buf {
            if b.owner().is_none() {
                put_buf(&mut self.bufs, b);
            }
        }
        self.add_used(q, mem, head, used_len);
    }

    /// Returns a chain to the guest, recording it in the inflight region
    /// around the used-ring update (a batch of one).
    fn add_used<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M, head: u16, len: u32) {
        if let Some(inf) = &self.inflight {
            inf.begin_used(head);
        }
        match q.add_used(mem, head, len) {
            Ok(()) => {
                self.used += 1;
                if let Some(inf) = &self.inflight {
                    inf.end_used(head, q.next_used());
                }
            }
            Err(e) => tracing::debug!(head, error = %e, "cannot add to the used ring"),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let d = self.data_path;
        if d.zero_copy + d.copied > 0 {
            tracing::info!(
                "vhost-blk queue {}: {} requests zero-copy, {} copied",
                self.index,
                d.zero_copy,
                d.copied
            );
        }
    }
}

fn take_buf(pool: &mut Vec<IoBuf>, len: usize) -> IoBuf {
    match pool.pop() {
        Some(mut b) if b.capacity() >= len => {
            b.set_len(len);
            b
        }
        _ => IoBuf::new(len),
    }
}

fn put_buf(pool: &mut Vec<IoBuf>, b: IoBuf) {
    if pool.len() < BUF_POOL {
        pool.push(b);
    }
}

#[cfg(test)]
mod tests {
    //! Drive the worker the way a guest driver would, with virtio-queue's
    //! mock split queue over real (anonymous) guest memory and a RAM disk.

    use super::*;
    use crate::backend::{DeviceOptions, Geometry};
    use crate::spec::{req_type, DiscardWriteZeroes, OutHdr};
    use std::sync::Arc;
    use unvme_bdev::{Bdev, RamBdev};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEM_SIZE: usize = 16 << 20;
    const QSIZE: u16 = 32;
    /// Where test data buffers live (the mock queue uses the low addresses).
    const DATA: u64 = 0x10_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDesc::new(addr, len, flags, 0))
    }

    fn hdr(type_: u32, sector: u64) -> [u8; 16] {
        OutHdr {
            type_,
            reserved: 0,
            sector,
        }
        .encode()
    }

    struct Dev {
        worker: Worker,
        geo: Geometry,
    }

    fn dev_with(blocks: u64, bs: u32, depth: usize, opts: DeviceOptions) -> Dev {
        let bdev: Arc<dyn Bdev> = Arc::new(
            RamBdev::new("ramtest", blocks, bs)
                .expect("ram bdev")
                .with_queue_depth(depth),
        );
        let geo = Geometry::new(bdev.info(), &opts).expect("geometry");
        let worker = Worker::new(
            bdev.open_queue().expect("queue"),
            Arc::new(geo.limits.clone()),
            Arc::new(AtomicBool::new(true)),
            QSIZE,
        );
        Dev { worker, geo }
    }

    fn dev() -> Dev {
        dev_with(8192, 512, 64, DeviceOptions::default())
    }

    /// Runs everything available to completion; returns the used-ring
    /// entries (id, len) added.
    fn run(
        dev: &mut Dev,
        vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
        q: &mut Queue,
        m: &GuestMemoryMmap<()>,
    ) -> Vec<(u32, u32)> {
        let before = q.next_used();
        for _ in 0..1000 {
            let taken = dev.worker.process_avail(q, m);
            dev.worker.poll(q, m);
            if taken == 0 && dev.worker.outstanding() == 0 {
                break;
            }
        }
        assert_eq!(dev.worker.outstanding(), 0, "requests left in flight");
        let mut out = Vec::new();
        let mut i = before;
        while i != q.next_used() {
            let e = vq
                .used()
                .ring()
                .ref_at(usize::from(i % QSIZE))
                .expect("used entry")
                .load();
            // VirtqUsedElem is (id: u32, len: u32), little endian.
            let raw: [u8; 8] = vm_memory::ByteValued::as_slice(&e)
                .try_into()
                .expect("8 bytes");
            out.push((
                u32::from_le_bytes(raw[0..4].try_into().expect("4")),
                u32::from_le_bytes(raw[4..8].try_into().expect("4")),
            ));
            i = i.wrapping_add(1);
        }
        out
    }

    /// Submits one chain (written at descriptor index `at`) and returns its
    /// used length.
    fn one(dev: &mut Dev, m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> u32 {
        let vq = MockSplitQueue::new(m, QSIZE);
        let mut q: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(descs).expect("chain");
        let used = run(dev, &vq, &mut q, m);
        assert_eq!(used.len(), 1, "exactly one chain returned");
        assert_eq!(used[0].0, 0);
        used[0].1
    }

    fn status(m: &GuestMemoryMmap<()>, addr: u64) -> u8 {
        m.read_obj::<u8>(GuestAddress(addr)).expect("status")
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `data` at `sector` with a classic 3-descriptor chain; returns the status.
    fn write(dev: &mut Dev, m: &GuestMemoryMmap<()>, sector: u64, data: &[u8]) -> u8 {
        m.write_slice(&hdr(req_type::OUT, sector), GuestAddress(DATA))
            .expect("hdr");
        m.write_slice(data, GuestAddress(DATA + 0x1000))
            .expect("data");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let used = one(
            dev,
            m,
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, data.len() as u32, 0),
                d(DATA + 0x800, 1, W),
            ],
        );
        assert_eq!(used, 1);
        status(m, DATA + 0x800)
    }

    /// Reads `len` bytes at `sector`; returns (status, data).
    fn read(dev: &mut Dev, m: &GuestMemoryMmap<()>, sector: u64, len: usize) -> (u8, Vec<u8>) {
        m.write_slice(&hdr(req_type::IN, sector), GuestAddress(DATA))
            .expect("hdr");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let used = one(
            dev,
            m,
            &[
                d(DATA, 16, 0),
                d(DATA + 0x10_0000, len as u32, W),
                d(DATA + 0x800, 1, W),
            ],
        );
        let st = status(m, DATA + 0x800);
        if st == Status::Ok as u8 {
            assert_eq!(used, len as u32 + 1);
        }
        let mut buf = vec![0u8; len];
        m.read_slice(&mut buf, GuestAddress(DATA + 0x10_0000))
            .expect("data");
        (st, buf)
    }

    /// Reads `len` bytes at `sector` into the segments `segs` (guest
    /// address, length); returns the status and the bytes each got.
    fn read_segs(
        dev: &mut Dev,
        m: &GuestMemoryMmap<()>,
        sector: u64,
        segs: &[(u64, u32)],
    ) -> (u8, Vec<u8>) {
        m.write_slice(&hdr(req_type::IN, sector), GuestAddress(DATA))
            .expect("hdr");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let mut descs = vec![d(DATA, 16, 0)];
        descs.extend(segs.iter().map(|&(a, l)| d(a, l, W)));
        descs.push(d(DATA + 0x800, 1, W));
        one(dev, m, &descs);
        let mut out = Vec::new();
        for &(a, l) in segs {
            let mut b = vec![0u8; l as usize];
            m.read_slice(&mut b, GuestAddress(a)).expect("data");
            out.extend(b);
        }
        (status(m, DATA + 0x800), out)
    }

    #[test]
    fn lent_guest_memory_carries_the_data_without_a_copy() {
        let m = Arc::new(mem());
        let mut dev = dev();
        dev.worker.set_lender(7, Some(GuestLender::new(m.clone())));
        assert_eq!(dev.worker.lender_generation(), Some(7));
        let data = pattern(8192, 5);
        assert_eq!(write(&mut dev, &m, 40, &data), Status::Ok as u8);
        let (st, got) = read(&mut dev, &m, 40, 8192);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
        // Two segments that follow each other in guest (and so host)
        // memory are one buffer too.
        let (st, got) = read_segs(&mut dev, &m, 40, &[(0x40_0000, 4096), (0x40_1000, 4096)]);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
        assert_eq!(dev.worker.data_path(), path(3, 0));
        // Scattered segments go as segments of one request (the RAM queue
        // takes many), and come out the same.
        let (st, got) = read_segs(&mut dev, &m, 40, &[(0x50_0000, 4096), (0x40_0000, 4096)]);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
        assert_eq!(dev.worker.data_path(), path(4, 0));
        // Without a lender everything is copied.
        dev.worker.set_lender(8, None);
        assert_eq!(write(&mut dev, &m, 48, &data), Status::Ok as u8);
        assert_eq!(dev.worker.data_path(), path(4, 1));
        let (st, got) = read(&mut dev, &m, 48, 8192);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
    }

    fn path(zero_copy: u64, copied: u64) -> DataPath {
        DataPath { zero_copy, copied }
    }

    /// A device queue that takes one data segment per request.
    struct OneSegment(Box<dyn BdevQueue>);

    impl BdevQueue for OneSegment {
        fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
            assert!(req.more.is_empty(), "segments sent to a one-segment queue");
            self.0.submit(req)
        }
        fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
            self.0.poll(out)
        }
        fn outstanding(&self) -> usize {
            self.0.outstanding()
        }
    }

    #[test]
    fn scattered_segments_are_gathered_for_a_one_segment_queue() {
        let m = Arc::new(mem());
        let mut dev = dev();
        let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("one", 8192, 512).expect("ram"));
        dev.worker = Worker::new(
            Box::new(OneSegment(bdev.open_queue().expect("queue"))),
            Arc::new(dev.geo.limits.clone()),
            Arc::new(AtomicBool::new(true)),
            QSIZE,
        );
        dev.worker.set_lender(0, Some(GuestLender::new(m.clone())));
        let data = pattern(8192, 21);
        assert_eq!(write(&mut dev, &m, 8, &data), Status::Ok as u8);
        let (st, got) = read_segs(&mut dev, &m, 8, &[(0x60_0000, 4096), (0x40_0000, 4096)]);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
        assert_eq!(dev.worker.data_path(), path(1, 1));
    }

    #[test]
    fn a_segment_across_two_memory_regions_is_copied_correctly() {
        // Two regions, adjacent in guest space but separate mappings: a
        // segment across the boundary cannot be one host buffer.
        let half = MEM_SIZE / 2;
        let m = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), half),
                (GuestAddress(half as u64), half),
            ])
            .expect("guest memory"),
        );
        let mut dev = dev();
        dev.worker.set_lender(1, Some(GuestLender::new(m.clone())));
        let data = pattern(8192, 9);
        assert_eq!(write(&mut dev, &m, 8, &data), Status::Ok as u8);
        let across = half as u64 - 4096;
        let (st, got) = read_segs(&mut dev, &m, 8, &[(across, 8192)]);
        assert_eq!((st, got == data), (Status::Ok as u8, true));
        assert_eq!(dev.worker.data_path(), path(1, 1));
    }

    #[test]
    fn a_lent_buffer_outlives_a_replaced_memory_table() {
        // The buffer holds its table: dropping every other reference (the
        // frontend installed a new table) leaves its memory usable.
        let m = Arc::new(mem());
        m.write_slice(&[0xabu8; 4096], GuestAddress(0x20_0000))
            .expect("fill");
        let lender = GuestLender::new(m.clone());
        let buf = lender
            .lend(
                &[Seg {
                    addr: GuestAddress(0x20_0000),
                    len: 4096,
                }],
                4096,
            )
            .expect("one segment is lent");
        drop(lender);
        let weak = Arc::downgrade(&m);
        drop(m);
        assert!(weak.upgrade().is_some(), "the buffer keeps the table");
        assert!(buf.iter().all(|&b| b == 0xab));
        drop(buf);
        assert!(weak.upgrade().is_none(), "the table goes with the buffer");
    }

    #[test]
    fn write_then_read_round_trips_data() {
        let (m, mut dev) = (mem(), dev());
        let data = pattern(8192, 3);
        assert_eq!(write(&mut dev, &m, 16, &data), Status::Ok as u8);
        let (st, got) = read(&mut dev, &m, 16, 8192);
        assert_eq!(st, Status::Ok as u8);
        assert_eq!(got, data);
    }

    #[test]
    fn header_split_over_descriptors_and_status_sharing_data_descriptor_is_parsed_as_a_byte_stream()
    {
        let (m, mut dev) = (mem(), dev());
        let data = pattern(4096, 9);
        // Write: header in 3 pieces (5 + 7 + 4 bytes); data in two pieces,
        // the second starting inside the third header descriptor.
        let h = hdr(req_type::OUT, 8);
        let mut stream = h.to_vec();
        stream.extend_from_slice(&data);
        m.write_slice(&stream[..5], GuestAddress(DATA)).expect("w");
        m.write_slice(&stream[5..12], GuestAddress(DATA + 0x100))
            .expect("w");
        m.write_slice(&stream[12..16 + 1000], GuestAddress(DATA + 0x1000))
            .expect("w");
        m.write_slice(&stream[16 + 1000..], GuestAddress(DATA + 0x3000))
            .expect("w");
        let used = one(
            &mut dev,
            &m,
            &[
                d(DATA, 5, 0),
                d(DATA + 0x100, 7, 0),
                d(DATA + 0x1000, 4 + 1000, 0),
                d(DATA + 0x3000, 4096 - 1000, 0),
                d(DATA + 0x800, 1, W),
            ],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&m, DATA + 0x800), Status::Ok as u8);
        // Read: header in one descriptor, data + status byte in one
        // writable descriptor of 4097 bytes.
        m.write_slice(&hdr(req_type::IN, 8), GuestAddress(DATA))
            .expect("w");
        let used = one(&mut dev, &m, &[d(DATA, 16, 0), d(DATA + 0x4_0000, 4097, W)]);
        assert_eq!(used, 4097);
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(DATA + 0x4_0000))
            .expect("r");
        assert_eq!(got, data);
        assert_eq!(status(&m, DATA + 0x4_0000 + 4096), Status::Ok as u8);
    }

    #[test]
    fn indirect_descriptor_table_is_followed() {
        let (m, mut dev) = (mem(), dev());
        let data = pattern(1024, 5);
        assert_eq!(write(&mut dev, &m, 0, &data), Status::Ok as u8);
        // An indirect table of 3 descriptors at DATA + 0x2000.
        let table = DATA + 0x2000;
        let entries = [
            SplitDesc::new(DATA, 16, VRING_DESC_F_NEXT as u16, 1),
            SplitDesc::new(
                DATA + 0x10_0000,
                1024,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                2,
            ),
            SplitDesc::new(DATA + 0x800, 1, W, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
                .expect("w");
        }
        m.write_slice(&hdr(req_type::IN, 0), GuestAddress(DATA))
            .expect("hdr");
        let used = one(&mut dev, &m, &[d(table, 48, VRING_DESC_F_INDIRECT as u16)]);
        assert_eq!(used, 1025);
        assert_eq!(status(&m, DATA + 0x800), Status::Ok as u8);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA + 0x10_0000))
            .expect("r");
        assert_eq!(got, data);
    }

    fn expect_status(descs: &[RawDescriptor], hdr_bytes: &[u8], want: Status) {
        let (m, mut dev) = (mem(), dev());
        m.write_slice(hdr_bytes, GuestAddress(DATA)).expect("hdr");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let used = one(&mut dev, &m, descs);
        assert_eq!(status(&m, DATA + 0x800), want as u8);
        assert_eq!(used, 1);
        // The device keeps serving.
        assert_eq!(write(&mut dev, &m, 0, &[7u8; 512]), Status::Ok as u8);
    }

    #[test]
    fn header_shorter_than_16_bytes_gets_ioerr() {
        expect_status(
            &[d(DATA, 12, 0), d(DATA + 0x800, 1, W)],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn unknown_request_type_gets_unsupp() {
        expect_status(
            &[d(DATA, 16, 0), d(DATA + 0x800, 1, W)],
            &hdr(99, 0),
            Status::Unsupp,
        );
    }

    #[test]
    fn read_beyond_the_disk_end_gets_ioerr() {
        // 8192 blocks of 512: sector 8191 + 2 sectors crosses the end.
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 1024, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 8191),
            Status::IoErr,
        );
    }

    #[test]
    fn sector_overflowing_u64_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 512, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, u64::MAX),
            Status::IoErr,
        );
    }

    #[test]
    fn data_outside_guest_memory_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(MEM_SIZE as u64 - 256, 512, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
        expect_status(
            &[d(DATA, 16, 0), d(1 << 40, 512, 0), d(DATA + 0x800, 1, W)],
            &hdr(req_type::OUT, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn header_outside_guest_memory_gets_ioerr() {
        expect_status(
            &[d(1 << 40, 16, 0), d(DATA + 0x800, 1, W)],
            &[],
            Status::IoErr,
        );
    }

    #[test]
    fn readable_descriptor_after_a_writable_one_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 512, W),
                d(DATA + 0x2000, 512, 0),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn write_with_device_writable_data_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 512, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::OUT, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn read_with_driver_readable_data_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 512, 0),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn transfer_that_is_not_whole_sectors_gets_ioerr() {
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 100, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn transfer_over_the_request_limit_gets_ioerr() {
        let big = crate::backend::DEFAULT_MAX_REQUEST + 512;
        expect_status(
            &[
                d(DATA, 16, 0),
                d(DATA + 0x10_0000, big, W),
                d(DATA + 0x800, 1, W),
            ],
            &hdr(req_type::IN, 0),
            Status::IoErr,
        );
    }

    #[test]
    fn chain_without_a_writable_last_byte_is_returned_with_nothing_written() {
        let (m, mut dev) = (mem(), dev());
        m.write_slice(&hdr(req_type::IN, 0), GuestAddress(DATA))
            .expect("hdr");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let used = one(&mut dev, &m, &[d(DATA, 16, 0), d(DATA + 0x800, 1, 0)]);
        assert_eq!(used, 0);
        assert_eq!(status(&m, DATA + 0x800), 0xff);
        let used = one(&mut dev, &m, &[d(DATA, 0, W)]);
        assert_eq!(used, 0);
    }

    #[test]
    fn status_byte_outside_guest_memory_returns_the_chain_with_nothing_written() {
        let (m, mut dev) = (mem(), dev());
        m.write_slice(&hdr(req_type::FLUSH, 0), GuestAddress(DATA))
            .expect("hdr");
        let used = one(&mut dev, &m, &[d(DATA, 16, 0), d(1 << 40, 1, W)]);
        assert_eq!(used, 0);
        assert_eq!(write(&mut dev, &m, 0, &[1u8; 512]), Status::Ok as u8);
    }

    #[test]
    fn looping_chain_gets_ioerr_and_the_device_keeps_serving() {
        let (m, mut dev) = (mem(), dev());
        m.write_slice(&hdr(req_type::IN, 0), GuestAddress(DATA))
            .expect("hdr");
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().expect("queue");
        // 0 -> 1 -> 0 -> ...: cut off by the queue size.
        let descs = [
            RawDescriptor::from(SplitDesc::new(DATA, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDesc::new(
                DATA + 0x800,
                1,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).expect("chain");
        let used = run(&mut dev, &vq, &mut q, &m);
        assert_eq!(used, vec![(0, 1)]);
        assert_eq!(status(&m, DATA + 0x800), Status::IoErr as u8);
    }

    #[test]
    fn flush_and_get_id_complete() {
        let (m, mut dev) = (mem(), dev());
        expect_status(
            &[d(DATA, 16, 0), d(DATA + 0x800, 1, W)],
            &hdr(req_type::FLUSH, 0),
            Status::Ok,
        );
        m.write_slice(&hdr(req_type::GET_ID, 0), GuestAddress(DATA))
            .expect("hdr");
        let used = one(
            &mut dev,
            &m,
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 20, W),
                d(DATA + 0x800, 1, W),
            ],
        );
        assert_eq!(used, 21);
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA + 0x1000))
            .expect("id");
        assert_eq!(&id[..7], b"ramtest");
        assert!(id[7..].iter().all(|&b| b == 0));
        assert_eq!(status(&m, DATA + 0x800), Status::Ok as u8);
    }

    fn dwz(dev: &mut Dev, m: &GuestMemoryMmap<()>, type_: u32, segs: &[DiscardWriteZeroes]) -> u8 {
        m.write_slice(&hdr(type_, 0), GuestAddress(DATA))
            .expect("hdr");
        for (i, s) in segs.iter().enumerate() {
            m.write_slice(&s.encode(), GuestAddress(DATA + 0x1000 + 16 * i as u64))
                .expect("seg");
        }
        m.write_obj(0xffu8, GuestAddress(DATA + 0x800))
            .expect("status");
        let used = one(
            dev,
            m,
            &[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 16 * segs.len() as u32, 0),
                d(DATA + 0x800, 1, W),
            ],
        );
        assert_eq!(used, 1);
        status(m, DATA + 0x800)
    }

    fn seg(sector: u64, num_sectors: u32, flags: u32) -> DiscardWriteZeroes {
        DiscardWriteZeroes {
            sector,
            num_sectors,
            flags,
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let (m, mut dev) = (mem(), dev());
        assert_eq!(write(&mut dev, &m, 0, &pattern(16384, 1)), Status::Ok as u8);
        // Discard sectors 2..4 and 10..12 (two segments).
        let st = dwz(
            &mut dev,
            &m,
            req_type::DISCARD,
            &[seg(2, 2, 0), seg(10, 2, 0)],
        );
        assert_eq!(st, Status::Ok as u8);
        // Write zeroes over sectors 20..24 with UNMAP.
        let st = dwz(
            &mut dev,
            &m,
            req_type::WRITE_ZEROES,
            &[seg(20, 4, DiscardWriteZeroes::FLAG_UNMAP)],
        );
        assert_eq!(st, Status::Ok as u8);
        let (st, got) = read(&mut dev, &m, 0, 16384);
        assert_eq!(st, Status::Ok as u8);
        let mut want = pattern(16384, 1);
        for r in [2..4, 10..12, 20..24] {
            want[r.start * 512..r.end * 512].fill(0);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn discard_with_the_unmap_flag_or_reserved_flags_gets_unsupp() {
        let (m, mut dev) = (mem(), dev());
        let st = dwz(
            &mut dev,
            &m,
            req_type::DISCARD,
            &[seg(0, 1, DiscardWriteZeroes::FLAG_UNMAP)],
        );
        assert_eq!(st, Status::Unsupp as u8);
        let st = dwz(&mut dev, &m, req_type::WRITE_ZEROES, &[seg(0, 1, 2)]);
        assert_eq!(st, Status::Unsupp as u8);
    }

    #[test]
    fn bad_discard_and_write_zeroes_ranges_get_ioerr() {
        let (m, mut dev) = (mem(), dev());
        // Beyond the end.
        assert_eq!(
            dwz(&mut dev, &m, req_type::DISCARD, &[seg(8190, 4, 0)]),
            Status::IoErr as u8
        );
        assert_eq!(
            dwz(&mut dev, &m, req_type::WRITE_ZEROES, &[seg(8192, 1, 0)]),
            Status::IoErr as u8
        );
        // Write zeroes allows one segment.
        assert_eq!(
            dwz(
                &mut dev,
                &m,
                req_type::WRITE_ZEROES,
                &[seg(0, 1, 0), seg(4, 1, 0)]
            ),
            Status::IoErr as u8
        );
        // Too many discard segments.
        let many: Vec<_> = (0..crate::request::MAX_DISCARD_SEG as u64 + 1)
            .map(|i| seg(i, 1, 0))
            .collect();
        assert_eq!(
            dwz(&mut dev, &m, req_type::DISCARD, &many),
            Status::IoErr as u8
        );
        // Zero sectors.
        assert_eq!(
            dwz(&mut dev, &m, req_type::DISCARD, &[seg(0, 0, 0)]),
            Status::IoErr as u8
        );
    }

    #[test]
    fn misaligned_access_on_a_4k_device_gets_ioerr() {
        let (m, mut dev) = (mem(), dev_with(1024, 4096, 64, DeviceOptions::default()));
        assert_eq!(write(&mut dev, &m, 1, &[0u8; 4096]), Status::IoErr as u8);
        assert_eq!(write(&mut dev, &m, 0, &[0u8; 512]), Status::IoErr as u8);
        assert_eq!(write(&mut dev, &m, 8, &pattern(4096, 2)), Status::Ok as u8);
        let (st, got) = read(&mut dev, &m, 8, 4096);
        assert_eq!(st, Status::Ok as u8);
        assert_eq!(got, pattern(4096, 2));
    }

    #[test]
    fn read_only_device_refuses_writes_discards_and_write_zeroes() {
        let opts = DeviceOptions {
            read_only: true,
            ..DeviceOptions::default()
        };
        let (m, mut dev) = (mem(), dev_with(8192, 512, 64, opts));
        assert_ne!(dev.geo.features & crate::spec::features::RO, 0);
        assert_eq!(write(&mut dev, &m, 0, &[1u8; 512]), Status::IoErr as u8);
        // Not offered on a read-only device.
        assert_eq!(
            dwz(&mut dev, &m, req_type::DISCARD, &[seg(0, 1, 0)]),
            Status::Unsupp as u8
        );
        let (st, _) = read(&mut dev, &m, 0, 512);
        assert_eq!(st, Status::Ok as u8);
    }

    #[test]
    fn many_requests_in_flight_beyond_the_device_queue_depth_all_complete() {
        let (m, mut dev) = (mem(), dev_with(8192, 512, 2, DeviceOptions::default()));
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().expect("queue");
        // 10 writes of 1 KiB, each its own 3-descriptor chain.
        let n = 10u64;
        let mut descs = Vec::new();
        for i in 0..n {
            let base = DATA + i * 0x1_0000;
            m.write_slice(&hdr(req_type::OUT, i * 2), GuestAddress(base))
                .expect("hdr");
            m.write_slice(&pattern(1024, i as u8), GuestAddress(base + 0x1000))
                .expect("data");
            descs.push(RawDescriptor::from(SplitDesc::new(
                base,
                16,
                VRING_DESC_F_NEXT as u16,
                (3 * i + 1) as u16,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(
                base + 0x1000,
                1024,
                VRING_DESC_F_NEXT as u16,
                (3 * i + 2) as u16,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(base + 0x800, 1, W, 0)));
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        let used = run(&mut dev, &vq, &mut q, &m);
        assert_eq!(used.len(), n as usize);
        let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..n as u32).map(|i| 3 * i).collect::<Vec<_>>());
        for i in 0..n {
            assert_eq!(status(&m, DATA + i * 0x1_0000 + 0x800), Status::Ok as u8);
            let (st, got) = read(&mut dev, &m, i * 2, 1024);
            assert_eq!(st, Status::Ok as u8);
            assert_eq!(got, pattern(1024, i as u8));
        }
    }

    #[test]
    fn a_refused_request_is_resubmitted_by_poll_so_a_stopping_queue_drains() {
        let (m, mut dev) = (mem(), dev_with(8192, 512, 1, DeviceOptions::default()));
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut descs = Vec::new();
        for i in 0..3u64 {
            let base = DATA + i * 0x1_0000;
            m.write_slice(&hdr(req_type::FLUSH, 0), GuestAddress(base))
                .expect("hdr");
            descs.push(RawDescriptor::from(SplitDesc::new(
                base,
                16,
                VRING_DESC_F_NEXT as u16,
                (2 * i + 1) as u16,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(base + 0x800, 1, W, 0)));
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        // Depth 1: the first is taken, the second refused and parked.
        dev.worker.process_avail(&mut q, &m);
        assert_eq!(dev.worker.outstanding(), 2);
        // Stopping: only poll from now on.
        for _ in 0..10 {
            dev.worker.poll(&mut q, &m);
        }
        assert_eq!(dev.worker.outstanding(), 0);
        assert_eq!(q.next_used(), 2);
        assert_eq!(dev.worker.take_used(), 2);
    }

    #[test]
    fn write_through_mode_issues_fua_writes() {
        let (m, dev) = (mem(), dev());
        dev.worker.writeback.store(false, Ordering::Relaxed);
        let mut info = ChainInfo::default();
        m.write_slice(&hdr(req_type::OUT, 0), GuestAddress(DATA))
            .expect("hdr");
        let vq = MockSplitQueue::new(&m, QSIZE);
        let chain = vq
            .build_desc_chain(&[
                d(DATA, 16, 0),
                d(DATA + 0x1000, 512, 0),
                d(DATA + 0x800, 1, W),
            ])
            .expect("chain");
        let lim = dev.geo.limits.clone();
        let parsed = Parser::new().parse(&m, chain, &lim, false, &mut info);
        assert_eq!(
            parsed,
            Parsed::Submit(IoOp::Write {
                lba: 0,
                nlb: 1,
                fua: true
            })
        );
    }

    /// A device queue that holds every request (a stopped remote target):
    /// nothing completes, nothing is written.
    struct Held {
        held: Vec<IoRequest>,
    }

    impl BdevQueue for Held {
        fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
            self.held.push(req);
            Ok(())
        }
        fn poll(&mut self, _out: &mut Vec<IoCompletion>) -> usize {
            0
        }
        fn outstanding(&self) -> usize {
            self.held.len()
        }
    }

    #[test]
    fn requests_left_in_flight_are_resubmitted_by_the_next_instance_in_fetch_order() {
        use crate::inflight::InflightRegion;
        let m = mem();
        let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("ramtest", 8192, 512).expect("ram"));
        let geo = Geometry::new(bdev.info(), &DeviceOptions::default()).expect("geometry");
        let worker = |q: Box<dyn BdevQueue>| {
            Worker::new(
                q,
                Arc::new(geo.limits.clone()),
                Arc::new(AtomicBool::new(true)),
                QSIZE,
            )
        };
        let (region, _file) = InflightRegion::create(1, QSIZE, 1, QSIZE).expect("region");
        let vq = MockSplitQueue::new(&m, QSIZE);

        // First instance: its device queue never completes.
        let mut w1 = worker(Box::new(Held { held: Vec::new() }));
        let mut q1: Queue = vq.create_queue().expect("queue");
        let rs = w1.start_ring(&mut q1, &m, 0, region.queue(0));
        assert_eq!((rs.resubmit, rs.untracked), (0, None));
        assert!(!rs.recovery.recovered);
        let mut descs = Vec::new();
        for i in 0..3u64 {
            let base = DATA + i * 0x1_0000;
            m.write_slice(&hdr(req_type::OUT, i * 8), GuestAddress(base))
                .expect("hdr");
            m.write_slice(&pattern(4096, i as u8), GuestAddress(base + 0x1000))
                .expect("data");
            m.write_obj(0xffu8, GuestAddress(base + 0x800))
                .expect("status");
            let n = VRING_DESC_F_NEXT as u16;
            descs.push(RawDescriptor::from(SplitDesc::new(
                base,
                16,
                n,
                (3 * i + 1) as u16,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(
                base + 0x1000,
                4096,
                n,
                (3 * i + 2) as u16,
            )));
            descs.push(RawDescriptor::from(SplitDesc::new(base + 0x800, 1, W, 0)));
        }
        vq.add_desc_chains(&descs, 0).expect("chains");
        assert_eq!(w1.process_avail(&mut q1, &m), 3);
        assert_eq!(w1.poll(&mut q1, &m), 0);
        let qi = region.queue(0).expect("queue region");
        assert_eq!((qi.inflight(0), qi.inflight(3), qi.inflight(6)), (1, 1, 1));
        assert!(qi.counter(0) < qi.counter(3) && qi.counter(3) < qi.counter(6));
        // The process dies: nothing was written, nothing used.
        drop(w1);
        assert_eq!(q1.next_used(), 0);

        // Second instance over the same disk; the frontend restores the
        // ring from its used index (0).
        let mut w2 = worker(bdev.open_queue().expect("queue"));
        let mut q2: Queue = vq.create_queue().expect("queue");
        let rs = w2.start_ring(&mut q2, &m, 0, region.queue(0));
        assert!(rs.recovery.recovered);
        assert_eq!(rs.resubmit, 3);
        assert_eq!(rs.next_avail, Some(3));
        assert_eq!(q2.next_avail(), 3);
        let mut d = Dev { worker: w2, geo };
        let used = run(&mut d, &vq, &mut q2, &m);
        assert_eq!(used, vec![(0, 1), (3, 1), (6, 1)]);
        assert!((0..QSIZE).all(|i| qi.inflight(i) == 0));
        assert_eq!(qi.used_idx(), 3);
        for i in 0..3u64 {
            assert_eq!(status(&m, DATA + i * 0x1_0000 + 0x800), Status::Ok as u8);
        }
        // Read back through a fresh ring of the same worker (no region).
        d.worker.start_ring(&mut q2, &m, 0, None);
        for i in 0..3u64 {
            let (st, got) = read(&mut d, &m, i * 8, 4096);
            assert_eq!(st, Status::Ok as u8);
            assert_eq!(got, pattern(4096, i as u8));
        }
    }

    #[test]
    fn a_ring_larger_than_the_inflight_region_is_served_untracked() {
        use crate::inflight::InflightRegion;
        let (m, mut dev) = (mem(), dev());
        let (region, _file) = InflightRegion::create(1, QSIZE / 2, 1, QSIZE).expect("region");
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().expect("queue");
        let rs = dev.worker.start_ring(&mut q, &m, 0, region.queue(0));
        assert_eq!(rs.untracked, Some("ring larger than the inflight region"));
        vq.build_desc_chain(&[d(DATA, 16, 0), d(DATA + 0x800, 1, W)])
            .expect("chain");
        m.write_slice(&hdr(req_type::FLUSH, 0), GuestAddress(DATA))
            .expect("hdr");
        assert_eq!(run(&mut dev, &vq, &mut q, &m).len(), 1);
        assert_eq!(region.queue(0).expect("q").version(), 0);
    }

    mod prop {
        //! Arbitrary chains never panic the device, always come back on
        //! the used ring, and leave the device serving.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct ArbDesc {
            addr: u64,
            len: u32,
            write: bool,
        }

        fn arb_desc() -> impl Strategy<Value = ArbDesc> {
            (
                prop_oneof![
                    // Inside guest memory, near its end, or far outside.
                    (0x10_0000u64..0xf0_0000),
                    Just(MEM_SIZE as u64 - 8),
                    (1u64 << 40..1u64 << 41),
                    Just(u64::MAX - 4),
                ],
                prop_oneof![Just(0u32), 1u32..32, Just(512), Just(4096), 1u32..70_000],
                any::<bool>(),
            )
                .prop_map(|(addr, len, write)| ArbDesc { addr, len, write })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn arbitrary_chains_are_answered_and_never_stop_the_device(
                descs in proptest::collection::vec(arb_desc(), 1..8),
                type_ in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
                sector in prop_oneof![0u64..16384, any::<u64>()],
                seg in any::<[u8; 16]>(),
                lend in any::<bool>(),
            ) {
                let ma = Arc::new(mem());
                let m = &*ma;
                let mut dev = dev();
                if lend {
                    dev.worker.set_lender(0, Some(GuestLender::new(ma.clone())));
                }
                // Whatever lies at the addresses: a header, then segments.
                for d in &descs {
                    if d.addr < MEM_SIZE as u64 - 32 {
                        let _ = m.write_slice(&hdr(type_, sector), GuestAddress(d.addr));
                        let _ = m.write_slice(&seg, GuestAddress(d.addr + 16));
                    }
                }
                let raw: Vec<RawDescriptor> = descs
                    .iter()
                    .map(|d| self::d(d.addr, d.len, if d.write { W } else { 0 }))
                    .collect();
                let vq = MockSplitQueue::new(m, QSIZE);
                let mut q: Queue = vq.create_queue().expect("queue");
                vq.build_desc_chain(&raw).expect("chain");
                let used = run(&mut dev, &vq, &mut q, m);
                prop_assert_eq!(used.len(), 1);
                let writable: u64 = descs.iter().filter(|d| d.write).map(|d| u64::from(d.len)).sum();
                prop_assert!(u64::from(used[0].1) <= writable);
                // The device still serves a well-formed request.
                prop_assert_eq!(write(&mut dev, m, 0, &[9u8; 512]), Status::Ok as u8);
            }
        }
    }
}
