//! One NVMe I/O queue pair owned by one thread: the VFIO backend's
//! [`BdevQueue`].
//!
//! Memory (one IOMMU-mapped region per queue, allocated at open):
//!
//! ```text
//! | SQ (entries × 64 B) | CQ (entries × 16 B) | PRP list page per slot | data arena (4 KiB pages) |
//! ```
//!
//! A command occupies a slot (its CID is the slot index). A request larger
//! than the controller's MDTS is split into several commands; the first
//! command's slot (the parent) holds the request and completes it when the
//! last of its commands completes.
//!
//! Data takes one of two paths, decided per request at submit:
//!
//! - **Zero-copy**, when the request's [`IoBuf`] is memory of the device's
//!   DMA buffer pool ([`DmaPool`], shared by all queues of the controller;
//!   told apart by owner identity and address range). Such buffers are what
//!   [`BdevQueue::alloc_buf`] hands out, and the NVMe/TCP target asks for
//!   one for every I/O command before it reads write data off the socket or
//!   sends read data: socket → pool buffer → SSD and back, no copy. Each
//!   command's PRPs are built straight from the buffer's IOVAs (its part of
//!   the buffer for a split request; PRP1 may start inside a page), in the
//!   slot's PRP list page when longer than two entries; at completion
//!   nothing is copied back.
//! - **Copy**, for any other buffer (the caller's heap, another device's
//!   memory, or every buffer once the pool has run dry or was disabled with
//!   a [`dma_pool_size`](crate::VfioOptions::dma_pool_size) of 0): the
//!   command takes pages of the arena, not
//!   necessarily adjacent (the PRP list gathers them); write data is copied
//!   in at submit and read data copied back at completion.
//!
//! Correctness never depends on the pool: every buffer is accepted, pool
//! memory only saves the copies. The queue counts requests of each path and
//! logs them when it closes (info: `vfio queue N: X requests zero-copy, Y
//! copied`). A zero-copy request that is abandoned (timeout, failed
//! controller) keeps its buffer with its commands until the device
//! completes them, and its caller gets a fresh heap buffer instead, so the
//! pool never reuses memory the device may still write.
//!
//! Doorbells: SQEs are written at submit and the SQ tail doorbell is rung
//! once per batch (at the next poll, or when [`DOORBELL_BATCH`] SQEs are
//! pending); poll reaps every new CQE (phase tag) and writes the CQ head
//! doorbell once. Health (CSTS) and command deadlines are checked only by
//! polls that find nothing while commands are outstanding, at most every
//! 50 ms: a dead controller or a lost command is noticed within the command
//! timeout (CAP.TO, at least 10 s) plus 50 ms, whoever polls and how often.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use unvme_proto::nvm::{encode_dsm_ranges, BuildError, IoCommand, DSM_MAX_RANGES, DSM_RANGE_SIZE};
use unvme_proto::nvme::{DataDir, Sqe, Status, CQE_SIZE, SQE_SIZE};

use super::ctrl::{read_cqe, set_prps, Controller, Epoch, Failure, State};
use super::dma::{
    build_prps, contiguous_pages, DmaPool, DmaRegion, PagePool, PoolDevice, PAGE, PRPS_PER_PAGE,
};
use super::ring::{CqRing, SqRing};
use super::Error;
use unvme_bdev::{BdevInfo, BdevQueue, IoBuf, IoCompletion, IoError, IoOp, IoRequest, SubmitError};

/// SQEs written before the doorbell is rung without waiting for a poll.
pub(crate) const DOORBELL_BATCH: usize = 32;
/// Data arena of a queue: at least this much, and at least two largest transfers.
const MIN_ARENA: usize = 8 << 20;
/// Quiet time (commands outstanding, no completion) between health checks
/// (CSTS read, command deadlines). Time-based, so a caller that polls
/// rarely still notices a dead controller within about this long.
const HEALTH_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum SlotState {
    Free,
    /// A command the device owns; its completion goes to the caller.
    Busy,
    /// Its caller got a Timeout or Unavailable; the slot and its pages stay
    /// reserved until the device completes it (maybe never).
    Abandoned,
}

/// One NVMe command. A request larger than the controller's MDTS becomes a
/// group of commands; the first one's slot (the parent) holds the
/// request's tag, buffer, outcome and count of commands still running.
#[derive(Debug)]
struct Slot {
    state: SlotState,
    /// The slot of the request this command belongs to (itself for the parent).
    parent: u16,
    /// This command reads data into the parent's buffer at `buf_off`.
    is_read: bool,
    /// Offset of this command's data in the request's buffer.
    buf_off: usize,
    /// Bytes this command moves.
    len: usize,
    pages: Vec<u32>,
    /// The request's buffer is DMA pool memory: the PRPs point into it, no
    /// arena pages, no copies.
    zero_copy: bool,
    /// An abandoned zero-copy request's buffer, kept (shared by its commands
    /// still with the device) until the last of them completes, so the pool
    /// cannot hand the memory out while the device may still write it.
    hold: Option<Arc<IoBuf>>,
    /// On the [`coarse_now`] clock.
    deadline: Duration,
    // Parent only:
    tag: u64,
    buf: Option<IoBuf>,
    /// Commands of the request not completed yet.
    remaining: u16,
    /// The parent's own command has completed (its slot waits for the rest).
    own_done: bool,
    result: Result<(), IoError>,
}

/// Capabilities of the namespace that decide which ops are sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NsCaps {
    pub nsid: u32,
    pub dsm: bool,
    pub write_zeroes: bool,
    pub compare: bool,
}

/// An I/O SQ/CQ pair of a VFIO NVMe controller.
pub(crate) struct VfioQueue {
    qid: u16,
    entries: u16,
    sq: SqRing,
    cq: CqRing,
    sq_doorbell: u64,
    cq_doorbell: u64,
    /// SQEs written since the last SQ doorbell.
    pending: usize,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    in_flight: usize,
    pool: PagePool,
    /// Completions decided at submit (invalid requests, a failed device).
    done: Vec<IoCompletion>,
    scratch: Vec<u64>,
    /// On the [`coarse_now`] clock.
    last_health: Duration,
    /// Set when the controller failed: everything completes Unavailable.
    broken: bool,
    /// The controller epoch this queue's SQ/CQ pair belongs to (see
    /// [`VfioQueue::follow_ctrl`]).
    epoch: Epoch,
    /// The device's buffer pool, for [`BdevQueue::alloc_buf`] and to tell
    /// its buffers from others at submit.
    dma_pool: Arc<DmaPool>,
    /// Data requests (read, write, compare) submitted straight from pool
    /// memory and through arena pages with copies.
    zero_copy: u64,
    copied: u64,
    /// `alloc_buf` calls the pool could not serve.
    pool_misses: u64,
    info: BdevInfo,
    ns: NsCaps,
    cq_off: usize,
    prp_off: usize,
    data_off: usize,
    region: DmaRegion,
    ctrl: Arc<Controller>,
}

impl VfioQueue {
    /// Allocates the queue's memory and creates the SQ/CQ pair on the device.
    pub fn open(ctrl: Arc<Controller>, info: BdevInfo, ns: NsCaps) -> Result<Self, Error> {
        ctrl.check_status()?;
        let epoch = ctrl.epoch();
        let entries = ctrl.io_entries;
        let n_slots = usize::from(entries) - 1;
        let max_pages = ctrl.max_transfer as usize / PAGE;
        let arena_pages = (MIN_ARENA / PAGE).max(2 * info.max_transfer as usize / PAGE);
        let sq_bytes = (usize::from(entries) * SQE_SIZE).next_multiple_of(PAGE);
        let cq_bytes = (usize::from(entries) * CQE_SIZE).next_multiple_of(PAGE);
        let cq_off = sq_bytes;
        let prp_off = cq_off + cq_bytes;
        let data_off = prp_off + n_slots * PAGE;
        let region = DmaRegion::new(&ctrl.dev.container, data_off + arena_pages * PAGE)?;
        let qid = ctrl.alloc_qid()?;
        if let Err(e) = ctrl.create_io_queues(qid, region.iova(cq_off), region.iova(0)) {
            ctrl.free_qid(qid);
            return Err(e);
        }
        let now = coarse_now();
        let dma_pool = device_pool(&ctrl, (info.max_transfer as usize).max(PAGE));
        tracing::debug!(addr = %ctrl.addr, qid, entries, arena_pages, "I/O queue pair created");
        Ok(VfioQueue {
            qid,
            entries,
            sq: SqRing::new(entries),
            cq: CqRing::new(entries),
            sq_doorbell: ctrl.cap.sq_doorbell(qid),
            cq_doorbell: ctrl.cap.cq_doorbell(qid),
            pending: 0,
            slots: (0..n_slots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    parent: 0,
                    is_read: false,
                    buf_off: 0,
                    len: 0,
                    pages: Vec::with_capacity(max_pages),
                    zero_copy: false,
                    hold: None,
                    deadline: now,
                    tag: 0,
                    buf: None,
                    remaining: 0,
                    own_done: false,
                    result: Ok(()),
                })
                .collect(),
            free_slots: (0..n_slots as u16).rev().collect(),
            in_flight: 0,
            pool: PagePool::new(arena_pages),
            done: Vec::with_capacity(n_slots),
            // One more entry than pages: a transfer from a pool buffer may
            // start inside a page.
            scratch: vec![0; max_pages.max(1) + 1],
            last_health: now,
            broken: false,
            epoch,
            dma_pool,
            zero_copy: 0,
            copied: 0,
            pool_misses: 0,
            info,
            ns,
            cq_off,
            prp_off,
            data_off,
            region,
            ctrl,
        })
    }

    fn finish_now(&mut self, req: IoRequest, result: Result<(), IoError>) {
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
    }

    /// Checks what the device will be asked against what it can do, and
    /// builds the NVM command of the whole request ([`IoCommand::build`]:
    /// opcode, LBA range, FUA/DEAC, DSM attributes, direction, length).
    fn admit(&self, req: &IoRequest) -> Result<IoCommand, IoError> {
        if !req.more.is_empty() {
            // One buffer per request (max_segments is 1).
            return Err(IoError::BadBuffer);
        }
        self.info.check_request(&req.op, req.buf.as_ref())?;
        match &req.op {
            IoOp::Compare { .. } if !self.ns.compare => return Err(IoError::Unsupported),
            IoOp::WriteZeroes { .. } if !self.ns.write_zeroes => return Err(IoError::Unsupported),
            IoOp::Deallocate { .. } if !self.ns.dsm => return Err(IoError::Unsupported),
            _ => {}
        }
        // A request above MDTS is split into commands of whole blocks
        // later; each part is smaller than the whole, so it builds too.
        // NLB above one command's 16 bits cannot happen here: the transfer
        // limit (4 MiB) is at most 8192 blocks of the smallest size.
        IoCommand::build(self.ns.nsid, &req.op, self.info.block_size).map_err(|e| match e {
            BuildError::Empty => IoError::BadBuffer,
            BuildError::TooLarge => IoError::TooLarge,
        })
    }

    /// Finishes `cmd` (the NVM command, from [`IoCommand::build`]) for slot
    /// `cid`: the CID and the data pointer. With `dma` (the IOVA of a pool
    /// buffer's first byte) the PRPs point at `buf[buf_off..]` itself;
    /// otherwise write data from `buf[buf_off..]` is staged in the slot's
    /// arena pages. A Dataset Management range list goes in the slot's PRP
    /// list page.
    fn build(
        &mut self,
        cid: u16,
        cmd: IoCommand,
        op: &IoOp,
        buf: Option<&IoBuf>,
        buf_off: usize,
        dma: Option<u64>,
    ) -> Sqe {
        let IoCommand { mut sqe, dir, len } = cmd;
        sqe.cid = cid;
        let len = len as usize;
        let list_off = self.prp_off + usize::from(cid) * PAGE;
        if let IoOp::Deallocate { ranges } = op {
            // The range list goes in the slot's PRP list page (unused by DSM).
            let mut list = [0u8; DSM_MAX_RANGES * DSM_RANGE_SIZE];
            let n = encode_dsm_ranges(ranges, &mut list);
            self.region.write_slice(list_off, &list[..n]);
            set_prps(&mut sqe, self.region.iova(list_off), 0);
            return sqe;
        }
        if dir == DataDir::None || len == 0 {
            return sqe;
        }
        let npages = match dma {
            Some(base) => contiguous_pages(base + buf_off as u64, len, &mut self.scratch)
                .min(self.scratch.len()),
            None => self.stage(cid, dir == DataDir::HostToController, buf, buf_off, len),
        };
        let mut list = [0u64; PRPS_PER_PAGE];
        // The entries were sized from `len` and max_transfer is at most one
        // list page (the scratch has room for an in-page start), so this
        // cannot fail; fall back to an invalid (zero) pointer the device
        // rejects if it ever did.
        let (prp1, prp2) = build_prps(
            &self.scratch[..npages],
            len,
            &mut list,
            self.region.iova(list_off),
        )
        .unwrap_or((0, 0));
        if npages > 2 {
            for (i, e) in list[..npages - 1].iter().enumerate() {
                self.region.write_u64(list_off + i * 8, u64::from_le(*e));
            }
        }
        set_prps(&mut sqe, prp1, prp2);
        sqe
    }

    /// The command for bytes `off..off + clen` of a Read, Write or Compare
    /// that is split at MDTS (only those are: other operations move no data
    /// and are one command).
    fn part(&self, op: &IoOp, off: usize, clen: usize) -> IoCommand {
        let bs = self.info.block_size as usize;
        let (skip, nlb) = ((off / bs) as u64, (clen / bs) as u32);
        let op = match *op {
            IoOp::Read { lba, .. } => IoOp::Read {
                lba: lba + skip,
                nlb,
            },
            IoOp::Write { lba, fua, .. } => IoOp::Write {
                lba: lba + skip,
                nlb,
                fua,
            },
            IoOp::Compare { lba, .. } => IoOp::Compare {
                lba: lba + skip,
                nlb,
            },
            ref other => other.clone(),
        };
        IoCommand::build(self.ns.nsid, &op, self.info.block_size).expect(
            "a part of an admitted request builds: at least one block, fewer than the whole",
        )
    }

    /// Puts the IOVAs of slot `cid`'s arena pages in the scratch list and,
    /// with `copy_in` (data the device reads), copies
    /// `buf[buf_off..buf_off + len]` into them; returns the number of pages.
    fn stage(
        &mut self,
        cid: u16,
        copy_in: bool,
        buf: Option<&IoBuf>,
        buf_off: usize,
        len: usize,
    ) -> usize {
        let slot = &self.slots[usize::from(cid)];
        for (i, &p) in slot.pages.iter().enumerate() {
            self.scratch[i] = self.region.iova(self.data_off + p as usize * PAGE);
        }
        if copy_in {
            if let Some(buf) = buf {
                for (i, &p) in slot.pages.iter().enumerate() {
                    let start = i * PAGE;
                    let n = PAGE.min(len - start);
                    let src = buf_off + start;
                    self.region
                        .write_slice(self.data_off + p as usize * PAGE, &buf[src..src + n]);
                }
            }
        }
        slot.pages.len()
    }

    fn ring_sq(&mut self) {
        if self.pending > 0 {
            // SQEs in memory before the doorbell makes the device fetch them.
            fence(Ordering::SeqCst);
            self.ctrl
                .dev
                .bar0
                .ring(self.sq_doorbell, u32::from(self.sq.tail()));
            self.pending = 0;
        }
    }

    /// Returns a command's pages to the arena.
    fn release_pages(&mut self, idx: usize) {
        let mut pages = std::mem::take(&mut self.slots[idx].pages);
        self.pool.give(&mut pages);
        self.slots[idx].pages = pages;
    }

    /// Returns a command's pages and its slot (and lets go of the buffer
    /// an abandoned zero-copy command kept).
    fn release(&mut self, idx: usize) {
        self.release_pages(idx);
        self.slots[idx].hold = None;
        self.slots[idx].state = SlotState::Free;
        self.free_slots.push(idx as u16);
    }

    /// Hands request `p` (a parent slot) back with `err`; its commands still
    /// with the device keep their slots and pages (the device may still
    /// touch them) until they complete. A zero-copy request's buffer is the
    /// device's target too: it stays with those commands, and the caller
    /// gets a fresh heap buffer of the same length in its place (a rare,
    /// failed request; its data means nothing).
    fn abandon(&mut self, p: usize, err: IoError, out: &mut Vec<IoCompletion>) {
        let mut buf = self.slots[p].buf.take();
        let mut hold = None;
        if self.slots[p].zero_copy {
            if let Some(b) = buf.take() {
                buf = Some(IoBuf::new(b.len()));
                hold = Some(Arc::new(b));
            }
        }
        out.push(IoCompletion {
            tag: self.slots[p].tag,
            result: Err(err),
            buf,
        });
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.state != SlotState::Busy || usize::from(s.parent) != p {
                continue;
            }
            if i == p && s.own_done {
                self.release(i);
            } else {
                s.state = SlotState::Abandoned;
                s.hold = hold.clone();
            }
        }
        self.in_flight -= 1;
    }

    fn is_parent(&self, i: usize) -> bool {
        self.slots[i].state == SlotState::Busy && usize::from(self.slots[i].parent) == i
    }

    /// Hands every request in flight back with `err`.
    fn abandon_all(&mut self, err: IoError, out: &mut Vec<IoCompletion>) -> usize {
        let mut n = 0;
        for p in 0..self.slots.len() {
            if self.is_parent(p) {
                self.abandon(p, err.clone(), out);
                n += 1;
            }
        }
        n
    }

    fn health_check(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        if self.ctrl.check_status().is_err() {
            // A failure starts a reset (or fails the controller): follow it.
            return self.follow_ctrl(out);
        }
        let now = coarse_now();
        let mut n = 0;
        for p in 0..self.slots.len() {
            if self.is_parent(p) && now > self.slots[p].deadline {
                self.abandon(p, IoError::Timeout, out);
                n += 1;
            }
        }
        if n > 0 {
            tracing::warn!(addr = %self.ctrl.addr, qid = self.qid, requests = n, timeout_ms = self.ctrl.cmd_timeout.as_millis() as u64, "NVMe commands timed out");
            self.ctrl.request_reset(Failure::Timeout);
        }
        n
    }

    /// Handles the completion of the command in slot `idx`; returns the
    /// number of requests it finished (0 or 1).
    fn complete(&mut self, idx: usize, status: Status, out: &mut Vec<IoCompletion>) -> usize {
        let p = usize::from(self.slots[idx].parent);
        let mut result = unvme_bdev::status::from_nvme(status);
        if result.is_ok() && self.slots[idx].is_read && !self.slots[idx].zero_copy {
            let (off, len) = (self.slots[idx].buf_off, self.slots[idx].len);
            let mut buf = self.slots[p].buf.take();
            match buf.as_mut() {
                Some(b) => {
                    for (i, &pg) in self.slots[idx].pages.iter().enumerate() {
                        let start = i * PAGE;
                        let n = PAGE.min(len - start);
                        self.region.read_slice(
                            self.data_off + pg as usize * PAGE,
                            &mut b[off + start..off + start + n],
                        );
                    }
                }
                None => result = Err(IoError::BadBuffer),
            }
            self.slots[p].buf = buf;
        }
        if idx == p {
            self.release_pages(idx);
            self.slots[idx].own_done = true;
        } else {
            self.release(idx);
        }
        let parent = &mut self.slots[p];
        if let Err(e) = result {
            if parent.result.is_ok() {
                parent.result = Err(e);
            }
        }
        parent.remaining -= 1;
        if parent.remaining > 0 {
            return 0;
        }
        out.push(IoCompletion {
            tag: parent.tag,
            result: std::mem::replace(&mut parent.result, Ok(())),
            buf: parent.buf.take(),
        });
        self.in_flight -= 1;
        self.slots[p].state = SlotState::Free;
        self.free_slots.push(p as u16);
        1
    }
}

/// Time since boot on `CLOCK_MONOTONIC_COARSE`: the kernel's last tick,
/// read from the vDSO without touching the clock hardware (a few ns; its
/// resolution, 1–10 ms, is plenty for 50 ms health checks and command
/// deadlines of seconds). `Instant::now()` reads the clocksource, which in a
/// VM without a stable TSC (HPET, ACPI PM timer) is an emulated device
/// access per call — too dear for every submit and idle poll.
fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec on our stack and CLOCK_MONOTONIC_COARSE is a valid clock id; the call writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl PoolDevice for Controller {
    fn map_region(&self, len: usize) -> Result<DmaRegion, Error> {
        DmaRegion::new(&self.dev.container, len)
    }

    fn failed(&self) -> bool {
        Controller::failed(self)
    }
}

/// The DMA buffer pool of each open controller, so that all its queues
/// share one (entries die with their pool).
static POOLS: Mutex<Vec<(Weak<Controller>, Weak<DmaPool>)>> = Mutex::new(Vec::new());

/// The buffer pool of `ctrl`, made (without memory yet) if it has none.
fn device_pool(ctrl: &Arc<Controller>, max_buf: usize) -> Arc<DmaPool> {
    let mut all = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(c, p)| c.strong_count() > 0 && p.strong_count() > 0);
    if let Some(p) = all
        .iter()
        .find(|(c, _)| std::ptr::eq(c.as_ptr(), Arc::as_ptr(ctrl)))
        .and_then(|(_, p)| p.upgrade())
    {
        return p;
    }
    let pool = DmaPool::new(ctrl.clone(), ctrl.opts.dma_pool_size, max_buf);
    all.push((Arc::downgrade(ctrl), Arc::downgrade(&pool)));
    pool
}

/// Bytes of one command of a split request: the controller's largest
/// transfer rounded down to whole blocks (at least one block).
pub(crate) fn chunk_bytes(max_transfer: u32, block_size: u32) -> usize {
    (max_transfer / block_size).max(1) as usize * block_size as usize
}

/// Offset and length of command `k` of a request of `len` bytes split at
/// `chunk` bytes (a request without data is one command of 0 bytes).
pub(crate) fn chunk_at(k: usize, chunk: usize, len: usize) -> (usize, usize) {
    let off = (k * chunk).min(len);
    (off, chunk.min(len - off))
}

impl BdevQueue for VfioQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.done.len() >= self.slots.len() {
            return Err(SubmitError::Busy(req));
        }
        if self.ctrl.epoch() != self.epoch {
            let mut done = std::mem::take(&mut self.done);
            self.follow_ctrl(&mut done);
            self.done = done;
        }
        if self.broken {
            self.finish_now(req, Err(IoError::Unavailable));
            return Ok(());
        }
        if self.epoch.state != State::Ready || self.ctrl.epoch() != self.epoch {
            // Being reset: held until the queue is back (bounded: the reset
            // either completes or fails the controller).
            return Err(SubmitError::Busy(req));
        }
        let whole = match self.admit(&req) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.finish_now(req, Err(e));
                return Ok(());
            }
        };
        let bs = self.info.block_size;
        let len = req.op.data_len(bs);
        // Commands needed: transfers above MDTS are split at `chunk` bytes.
        let chunk = chunk_bytes(self.ctrl.max_transfer, bs);
        let cmds = len.div_ceil(chunk).max(1);
        if cmds > self.slots.len() {
            // Only with a tiny MDTS: the request would never fit the queue.
            self.finish_now(req, Err(IoError::TooLarge));
            return Ok(());
        }
        // Pool memory goes to the device as it is; other buffers through
        // arena pages.
        let dma = match &req.buf {
            Some(b) if len > 0 => self.dma_pool.iova_of(b),
            _ => None,
        };
        if self.free_slots.len() < cmds
            || (dma.is_none() && self.pool.available() < len.div_ceil(PAGE))
        {
            return Err(SubmitError::Busy(req));
        }
        let deadline = coarse_now() + self.ctrl.cmd_timeout;
        let parent = *self.free_slots.last().expect("checked: enough free slots");
        for k in 0..cmds {
            let cid = self.free_slots.pop().expect("checked: enough free slots");
            let idx = usize::from(cid);
            let (off, clen) = chunk_at(k, chunk, len);
            let cmd = if cmds == 1 {
                whole
            } else {
                self.part(&req.op, off, clen)
            };
            if dma.is_none() {
                let mut pages = std::mem::take(&mut self.slots[idx].pages);
                let got = self.pool.take(clen.div_ceil(PAGE), &mut pages);
                debug_assert!(got, "checked: enough free pages");
                self.slots[idx].pages = pages;
            }
            let sqe = self.build(cid, cmd, &req.op, req.buf.as_ref(), off, dma);
            let at = usize::from(self.sq.push()) * SQE_SIZE;
            let mut entry = [0u8; SQE_SIZE];
            sqe.encode(&mut entry);
            self.region.write_slice(at, &entry);
            let slot = &mut self.slots[idx];
            slot.state = SlotState::Busy;
            slot.parent = parent;
            slot.is_read = cmd.dir == DataDir::ControllerToHost;
            slot.zero_copy = dma.is_some();
            slot.buf_off = off;
            slot.len = clen;
            slot.deadline = deadline;
            slot.own_done = false;
            self.pending += 1;
            if self.pending >= DOORBELL_BATCH {
                self.ring_sq();
            }
        }
        let p = &mut self.slots[usize::from(parent)];
        p.tag = req.tag;
        p.buf = req.buf;
        p.remaining = cmds as u16;
        p.result = Ok(());
        self.in_flight += 1;
        if len > 0 {
            if dma.is_some() {
                self.zero_copy += 1;
            } else {
                self.copied += 1;
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut n = 0;
        if self.ctrl.epoch() != self.epoch {
            n += self.follow_ctrl(out);
        }
        if self.broken || self.epoch.state != State::Ready {
            n += self.done.len();
            out.append(&mut self.done);
            return n;
        }
        self.ring_sq();
        n += self.done.len();
        out.append(&mut self.done);
        let mut reaped = 0usize;
        loop {
            let off = self.cq_off + usize::from(self.cq.head()) * CQE_SIZE;
            let Some(cqe) = read_cqe(&self.region, off, &self.cq) else {
                break;
            };
            self.cq.advance();
            reaped += 1;
            let idx = usize::from(cqe.cid);
            match self
                .slots
                .get(idx)
                .map(|s| (s.state, s.own_done && usize::from(s.parent) == idx))
            {
                Some((SlotState::Busy, false)) => n += self.complete(idx, cqe.status(), out),
                Some((SlotState::Abandoned, _)) => self.release(idx),
                _ => tracing::warn!(
                    qid = self.qid,
                    cid = cqe.cid,
                    "completion for no command in flight; ignored"
                ),
            }
        }
        if reaped > 0 {
            self.ctrl
                .dev
                .bar0
                .ring(self.cq_doorbell, u32::from(self.cq.head()));
        } else if self.in_flight > 0 {
            // An idle poll: a coarse clock read, and at most every
            // HEALTH_INTERVAL a CSTS read and a deadline scan.
            let now = coarse_now();
            if now.saturating_sub(self.last_health) >= HEALTH_INTERVAL {
                self.last_health = now;
                n += self.health_check(out);
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.in_flight + self.done.len()
    }

    /// A buffer of the device's DMA pool (see [`DmaPool`]); `None` above the
    /// queue's transfer limit, on a failed controller, or when the pool is
    /// used up (the caller's own buffer then takes the copy path).
    fn alloc_buf(&mut self, len: usize) -> Option<IoBuf> {
        if self.broken || len > self.info.max_transfer as usize {
            return None;
        }
        let buf = self.dma_pool.alloc(len);
        if buf.is_none() {
            self.pool_misses += 1;
        }
        buf
    }
}

impl Drop for VfioQueue {
    fn drop(&mut self) {
        if !self.ctrl.failed() && self.ctrl.epoch() == self.epoch && !self.broken {
            // Deleting the SQ aborts what it still holds; the CQ goes after it.
            if let Err(e) = self.ctrl.delete_io_queues(self.qid) {
                tracing::warn!(addr = %self.ctrl.addr, qid = self.qid, "deleting I/O queues: {e}");
                // Commands may live on in the device: the pool buffers they
                // target (still in our slots) must never be reused.
                if self.slots.iter().any(|s| s.state != SlotState::Free) {
                    self.dma_pool.poison();
                }
            }
        }
        self.ctrl.free_qid(self.qid);
        let (qid, zero_copy, copied) = (self.qid, self.zero_copy, self.copied);
        if zero_copy + copied > 0 {
            tracing::info!(addr = %self.ctrl.addr, qid, zero_copy, copied, pool_misses = self.pool_misses,
                "vfio queue {qid}: {zero_copy} requests zero-copy, {copied} copied");
        } else {
            tracing::debug!(addr = %self.ctrl.addr, qid, "vfio queue {qid}: no data requests");
        }
        tracing::debug!(addr = %self.ctrl.addr, qid = self.qid, entries = self.entries, "I/O queue pair closed");
    }
}

/// Controller resets (see [`super::ctrl`]).
impl VfioQueue {
    /// Brings the queue in line with the controller's epoch: while it is
    /// reset, fails the requests outstanding (the host retries them; their
    /// slots and pages stay reserved, the device may still write them until
    /// it is disabled); at its next generation, frees every slot (the reset
    /// ended all commands) and re-creates the SQ/CQ pair in the same memory;
    /// once it failed for good, fails everything. Returns the requests
    /// completed into `out`.
    fn follow_ctrl(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let now = self.ctrl.epoch();
        let n = self.abandon_all(IoError::Unavailable, out);
        let ctrl = self.ctrl.clone();
        let addr = &ctrl.addr;
        if n > 0 {
            tracing::warn!(addr = %addr, qid = self.qid, "vfio {addr} queue {}: controller {:?}; failing {n} outstanding requests", self.qid, now.state);
        }
        match now.state {
            State::Failed => {
                self.broken = true;
                self.epoch = now;
            }
            State::Resetting => self.epoch = now,
            State::Ready if self.broken => self.epoch = now,
            State::Ready => {
                for i in 0..self.slots.len() {
                    if self.slots[i].state == SlotState::Abandoned {
                        self.release(i);
                    }
                }
                self.sq = SqRing::new(self.entries);
                self.cq = CqRing::new(self.entries);
                self.pending = 0;
                let cq_bytes = usize::from(self.entries) * CQE_SIZE;
                self.region.zero(self.cq_off, cq_bytes);
                let (cq, sq) = (self.region.iova(self.cq_off), self.region.iova(0));
                match ctrl.create_io_queues(self.qid, cq, sq) {
                    Ok(()) => {
                        self.epoch = now;
                        tracing::info!(addr = %addr, qid = self.qid, generation = now.gen, "vfio {addr} queue {}: SQ/CQ pair re-created after the reset", self.qid);
                    }
                    // Another failure already: try again at the next use.
                    Err(Error::Resetting | Error::Failed) => {}
                    Err(e) => {
                        tracing::error!(addr = %addr, qid = self.qid, "vfio {addr} queue {}: cannot re-create the SQ/CQ pair after the reset: {e}", self.qid);
                        self.broken = true;
                        self.epoch = now;
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_above_mdts_split_into_whole_block_commands() {
        let chunk = chunk_bytes(512 << 10, 512);
        assert_eq!(chunk, 512 << 10);
        let len: usize = 1 << 20;
        assert_eq!(len.div_ceil(chunk), 2);
        assert_eq!(chunk_at(0, chunk, len), (0, 512 << 10));
        assert_eq!(chunk_at(1, chunk, len), (512 << 10, 512 << 10));
        // An uneven tail.
        let len = (512 << 10) + 4096;
        assert_eq!(chunk_at(1, chunk, len), (512 << 10, 4096));
        // MDTS not a multiple of the block size, or below one block.
        assert_eq!(chunk_bytes(6000, 4096), 4096);
        assert_eq!(chunk_bytes(2048, 4096), 4096);
        // No data: one command, no bytes.
        assert_eq!(0usize.div_ceil(chunk).max(1), 1);
        assert_eq!(chunk_at(0, chunk, 0), (0, 0));
    }
}
