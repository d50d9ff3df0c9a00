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
//! It knows nothing about vhost-user: it works on a `virtio_queue::Queue` and
//! any `GuestMemory`, so unit tests drive it with virtio-queue's mock queue.
//!
//! Data currently moves by copy between guest memory and a per-request
//! [`IoBuf`] taken from a small per-queue pool (gather before a write,
//! scatter after a read). Zero copy (handing guest memory straight to the
//! backend's readv/writev) needs a bdev interface for borrowed buffers and is
//! left for later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use unvme_bdev::{BdevQueue, IoBuf, IoCompletion, IoOp, IoRequest, SubmitError};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::request::{gather, scatter, write_status, ChainInfo, Limits, Parsed, Parser};
use crate::spec::Status;

/// Most idle buffers a worker keeps for reuse.
const BUF_POOL: usize = 128;

/// One in-flight request, indexed by its chain's head descriptor.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    read: bool,
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
}

impl Worker {
    /// A worker over `bdev` for a queue of up to `max_queue_size` entries.
    pub fn new(
        bdev: Box<dyn BdevQueue>,
        lim: Arc<Limits>,
        writeback: Arc<AtomicBool>,
        max_queue_size: u16,
    ) -> Self {
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
        }
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

    /// Pops and starts every available chain (until the device queue is
    /// full). Returns how many chains were taken.
    pub fn process_avail<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> usize {
        let mut taken = 0;
        loop {
            if let Some(req) = self.pending.take() {
                if let Err(SubmitError::Busy(req)) = self.bdev.submit(req) {
                    self.pending = Some(req);
                    break;
                }
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let Some(slot) = self.slots.get_mut(usize::from(head)) else {
                // The queue rejects such heads itself; nothing to answer.
                tracing::debug!(head, "descriptor head beyond the queue");
                continue;
            };
            if slot.busy {
                // A driver bug: the head is still ours. Answering would
                // complete the earlier request twice; ignore the repeat.
                tracing::debug!(head, "chain head reused while in flight");
                continue;
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
        taken
    }

    fn start<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M, head: u16, op: IoOp) {
        let idx = usize::from(head);
        let (read, buf) = match op {
            IoOp::Read { .. } | IoOp::Write { .. } => {
                let len = self.slots[idx].chain.data_len as usize;
                let mut buf = take_buf(&mut self.bufs, len);
                let read = matches!(op, IoOp::Read { .. });
                if !read && gather(mem, &self.slots[idx].chain.segs, &mut buf).is_err() {
                    put_buf(&mut self.bufs, buf);
                    let status_addr = self.slots[idx].chain.status_addr;
                    write_status(mem, status_addr, Status::IoErr);
                    self.add_used(q, mem, head, 1);
                    return;
                }
                (read, Some(buf))
            }
            _ => (false, None),
        };
        let slot = &mut self.slots[idx];
        slot.busy = true;
        slot.read = read;
        let req = IoRequest {
            tag: u64::from(head),
            op,
            buf,
        };
        if let Err(SubmitError::Busy(req)) = self.bdev.submit(req) {
            self.pending = Some(req);
        }
    }

    /// Collects finished requests from the device queue and returns their
    /// chains to the used ring. Returns how many finished.
    pub fn poll<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        done.clear();
        let n = self.bdev.poll(&mut done);
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
            put_buf(&mut self.bufs, b);
        }
        self.add_used(q, mem, head, used_len);
    }

    fn add_used<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M, head: u16, len: u32) {
        match q.add_used(mem, head, len) {
            Ok(()) => self.used += 1,
            Err(e) => tracing::warn!(head, error = %e, "cannot add to the used ring"),
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
