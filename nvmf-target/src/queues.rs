//! A reactor's bdev queues: one per namespace of the target, opened the
//! first time one of the reactor's connections does I/O on it, plus the
//! requests a full queue refused, retried every turn.
//!
//! Owned by one reactor thread, so submitting takes no lock.

use std::collections::VecDeque;
use std::sync::Arc;

use unvme_bdev::{BdevQueue, IoBuf, IoCompletion, IoRequest, SubmitError};

use crate::subsystem::Subsystems;

/// The reactor's queue on every namespace, by global namespace index.
pub(crate) struct BdevQueues {
    subsystems: Arc<Subsystems>,
    queues: Vec<Option<Box<dyn BdevQueue>>>,
    /// Requests a full queue refused, in order.
    busy: VecDeque<(usize, IoRequest)>,
}

/// A namespace's queue could not be opened.
#[derive(Debug)]
pub(crate) struct QueueUnavailable;

impl BdevQueues {
    /// No queue opened yet.
    pub fn new(subsystems: Arc<Subsystems>) -> Self {
        let n = subsystems.all_namespaces.len();
        BdevQueues {
            subsystems,
            queues: (0..n).map(|_| None).collect(),
            busy: VecDeque::new(),
        }
    }

    /// The queue of namespace `gidx`, opened on first use.
    #[inline]
    fn queue(&mut self, gidx: usize) -> Result<&mut Box<dyn BdevQueue>, QueueUnavailable> {
        if !matches!(self.queues.get(gidx), Some(Some(_))) {
            self.open(gidx)?;
        }
        self.queues[gidx].as_mut().ok_or(QueueUnavailable)
    }

    /// Opens namespace `gidx`'s queue (the first I/O on it).
    #[cold]
    fn open(&mut self, gidx: usize) -> Result<(), QueueUnavailable> {
        let slot = self.queues.get_mut(gidx).ok_or(QueueUnavailable)?;
        let (sidx, nsid) = self.subsystems.all_namespaces[gidx];
        let opened = match self.subsystems.list[sidx].queue_bdev(nsid) {
            Some(bdev) => bdev.open_queue().map_err(|e| e.to_string()),
            None => Err("namespace vanished".to_string()),
        };
        match opened {
            Ok(q) => {
                *slot = Some(q);
                Ok(())
            }
            Err(e) => {
                tracing::error!(nsid, "cannot open a bdev queue: {e}");
                Err(QueueUnavailable)
            }
        }
    }

    /// Submits `req` to namespace `gidx`; a full queue keeps it for
    /// [`BdevQueues::retry`].
    #[inline]
    pub fn submit(&mut self, gidx: usize, req: IoRequest) -> Result<(), QueueUnavailable> {
        if let Err(SubmitError::Busy(req)) = self.queue(gidx)?.submit(req) {
            self.busy.push_back((gidx, req));
        }
        Ok(())
    }

    /// A data buffer of `len` bytes from namespace `gidx`'s queue, when that
    /// queue has memory of its own for data (a VFIO SSD's IOMMU-mapped
    /// pool: the socket then reads write data, and the SSD writes read
    /// data, straight into memory the device reaches).
    #[inline]
    pub fn alloc_buf(&mut self, gidx: usize, len: usize) -> Option<IoBuf> {
        let mut b = self.queue(gidx).ok()?.alloc_buf(len)?;
        b.set_len(len);
        Some(b)
    }

    /// Retries the submissions a full queue refused, in order.
    pub fn retry(&mut self) {
        for _ in 0..self.busy.len() {
            let Some((g, req)) = self.busy.pop_front() else {
                break;
            };
            if let Some(q) = self.queues[g].as_mut() {
                if let Err(SubmitError::Busy(r)) = q.submit(req) {
                    self.busy.push_front((g, r));
                    break;
                }
            }
        }
    }

    /// Whether any request is outstanding (submitted or waiting to be).
    pub fn pending(&self) -> bool {
        !self.busy.is_empty() || self.queues.iter().flatten().any(|q| q.outstanding() > 0)
    }

    /// Collects the completions of every queue with work outstanding.
    pub fn poll(&mut self, out: &mut Vec<IoCompletion>) {
        for q in self.queues.iter_mut().flatten() {
            if q.outstanding() > 0 {
                q.poll(out);
            }
        }
    }
}
