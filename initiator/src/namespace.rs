//! [`RemoteNamespace`]: a namespace of a remote controller as a block device,
//! which reconnects when its target comes back.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoCompletion, IoError, IoOp, IoRequest, SubmitError};
use unvme_proto::admin::IdentifyNamespace;

use crate::{Controller, IoQpair, Result};

/// First delay between reconnection attempts of a queue; it doubles up to
/// [`RECONNECT_MAX_BACKOFF`].
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A remote namespace. Each [`Bdev::open_queue`] opens a new I/O queue pair
/// (a new TCP connection) on the controller.
///
/// When the target goes away, the queues fail their outstanding and new
/// requests with [`IoError::Unavailable`] and try to reconnect — at most
/// once per backoff period (250 ms doubling to 5 s), each attempt logged —
/// first with a new I/O queue on the current controller, then with a new
/// controller (the target restarted). A namespace whose size or block size
/// changed meanwhile is not reattached.
#[derive(Debug)]
pub struct RemoteNamespace {
    shared: Arc<NsShared>,
    id: IdentifyNamespace,
    info: BdevInfo,
}

#[derive(Debug)]
struct NsShared {
    nsid: u32,
    block_size: u32,
    num_blocks: u64,
    ctrl: Mutex<Controller>,
}

fn lock(m: &Mutex<Controller>) -> MutexGuard<'_, Controller> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NsShared {
    /// Opens an I/O queue pair, reconnecting the controller if the old one
    /// is gone. Admin path: serialised by the controller lock.
    fn open_qpair(&self) -> Result<IoQpair> {
        let mut ctrl = lock(&self.ctrl);
        let first = match ctrl.create_io_qpair() {
            Ok(mut qp) => {
                qp.register_namespace(self.nsid, self.block_size);
                return Ok(qp);
            }
            Err(e) => e,
        };
        let opts = ctrl.options().clone();
        warn!(addr = %opts.addr, port = opts.port, subnqn = %opts.subnqn, error = %first,
            "cannot open an I/O queue; reconnecting the controller");
        let new = Controller::connect(opts)?;
        let id = new.identify_namespace(self.nsid)?;
        if id.lba_size() != Some(self.block_size) || id.nsze != self.num_blocks {
            return Err(crate::Error::Invalid(format!(
                "namespace {} changed geometry across the reconnection ({} blocks of {:?} bytes, was {} of {})",
                self.nsid,
                id.nsze,
                id.lba_size(),
                self.num_blocks,
                self.block_size
            )));
        }
        info!(
            cntlid = new.cntlid(),
            nsid = self.nsid,
            "controller reconnected"
        );
        *ctrl = new;
        let mut qp = ctrl.create_io_qpair()?;
        qp.register_namespace(self.nsid, self.block_size);
        Ok(qp)
    }
}

impl RemoteNamespace {
    /// Reads Identify Namespace for `nsid` and describes it as a bdev.
    pub fn open(ctrl: &Controller, nsid: u32) -> Result<Self> {
        let id = ctrl.identify_namespace(nsid)?;
        let block_size = match id.lba_size() {
            Some(bs) if id.nsze != 0 => bs,
            _ => {
                return Err(crate::Error::Invalid(format!(
                    "namespace {nsid} is not active or has no valid LBA format"
                )))
            }
        };
        let cid = ctrl.identify();
        let info = BdevInfo {
            name: format!("{}/ns{nsid}", ctrl.options().subnqn),
            block_size,
            num_blocks: id.nsze,
            max_transfer: ctrl.max_transfer(),
            volatile_write_cache: cid.volatile_write_cache(),
            deallocate: cid.supports_dsm(),
            write_zeroes: cid.supports_write_zeroes(),
        };
        let shared = Arc::new(NsShared {
            nsid,
            block_size,
            num_blocks: id.nsze,
            ctrl: Mutex::new(ctrl.clone()),
        });
        Ok(RemoteNamespace { shared, id, info })
    }

    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.shared.nsid
    }

    /// Identify Namespace data read at open.
    pub fn identify(&self) -> &IdentifyNamespace {
        &self.id
    }

    /// The current controller (a new one after a reconnection).
    pub fn controller(&self) -> Controller {
        lock(&self.shared.ctrl).clone()
    }

    /// Opens an I/O queue pair bound to this namespace.
    pub fn open_qpair(&self) -> Result<IoQpair> {
        self.shared.open_qpair()
    }
}

fn bdev_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> unvme_bdev::Error {
    unvme_bdev::Error::Backend {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// A [`BdevQueue`] on one [`IoQpair`], replaced by a new one after the
/// connection is lost.
///
/// Reconnecting (TCP connect, ICReq, Fabrics Connect, perhaps a whole new
/// controller) can take up to the connect timeout against a target that
/// does not answer, so it runs on a short-lived thread of its own; the queue
/// keeps failing requests fast meanwhile and picks the new queue pair up at
/// a later submit or poll.
struct RemoteQueue {
    qp: Option<IoQpair>,
    shared: Arc<NsShared>,
    /// Requests failed without reaching the target (disconnected, LBA
    /// range outside the namespace), handed out by the next poll.
    failed: Vec<IoCompletion>,
    /// The reconnection attempt under way, if any.
    attempt: Option<mpsc::Receiver<Result<IoQpair>>>,
    next_attempt: Instant,
    backoff: Duration,
}

impl RemoteQueue {
    /// Drops a closed queue pair once it has handed back everything, collects
    /// the outcome of a reconnection attempt, and starts one when the backoff
    /// allows. Never blocks.
    fn ensure_connected(&mut self) {
        if let Some(qp) = &self.qp {
            if !qp.is_closed() || qp.outstanding() > 0 {
                return;
            }
            warn!(nsid = self.shared.nsid, "NVMe/TCP I/O queue lost");
            self.qp = None;
            self.next_attempt = Instant::now();
        }
        if let Some(rx) = &self.attempt {
            let outcome = match rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => Err(crate::Error::Invalid(
                    "the reconnection thread ended without an answer".into(),
                )),
            };
            self.attempt = None;
            match outcome {
                Ok(qp) => {
                    info!(
                        nsid = self.shared.nsid,
                        qid = qp.qid(),
                        "NVMe/TCP I/O queue reconnected"
                    );
                    self.qp = Some(qp);
                    self.backoff = RECONNECT_BACKOFF;
                    return;
                }
                Err(e) => {
                    warn!(nsid = self.shared.nsid, error = %e, retry_in_ms = self.backoff.as_millis() as u64,
                        "NVMe/TCP reconnection failed");
                    self.next_attempt = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(RECONNECT_MAX_BACKOFF);
                    return;
                }
            }
        }
        if Instant::now() < self.next_attempt {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("unvme-reconnect".into())
            .spawn(move || {
                // The queue may be gone by now; then the new pair is dropped.
                let _ = tx.send(shared.open_qpair());
            });
        match spawned {
            Ok(_) => self.attempt = Some(rx),
            Err(e) => {
                warn!(nsid = self.shared.nsid, error = %e, "cannot start a reconnection thread");
                self.next_attempt = Instant::now() + self.backoff;
            }
        }
    }
}

/// Whether every LBA range of `op` lies inside a namespace of `num_blocks`
/// blocks. Checked before the request is encoded, as every bdev checks it
/// first ([`BdevInfo::check_request`]): a range past the end is
/// [`IoError::OutOfRange`] even when it is also too long for one NVMe
/// command, and a request that cannot succeed costs no round trip.
fn ranges_inside(op: &IoOp, num_blocks: u64) -> bool {
    let inside = |lba: u64, nlb: u32| {
        lba.checked_add(u64::from(nlb))
            .is_some_and(|end| end <= num_blocks)
    };
    match op {
        IoOp::Read { lba, nlb }
        | IoOp::Write { lba, nlb, .. }
        | IoOp::Compare { lba, nlb }
        | IoOp::WriteZeroes { lba, nlb, .. } => inside(*lba, *nlb),
        IoOp::Deallocate { ranges } => ranges.iter().all(|r| inside(r.lba, r.nlb)),
        IoOp::Flush => true,
    }
}

impl BdevQueue for RemoteQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        self.ensure_connected();
        let error = if !ranges_inside(&req.op, self.shared.num_blocks) {
            IoError::OutOfRange
        } else {
            match self.qp.as_mut() {
                Some(qp) if !qp.is_closed() => return qp.submit(self.shared.nsid, req),
                _ => IoError::Unavailable,
            }
        };
        // Bounded: the caller has at most its queue depth in flight.
        self.failed.push(IoCompletion {
            tag: req.tag,
            result: Err(error),
            buf: req.buf,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut n = self.failed.len();
        out.append(&mut self.failed);
        if let Some(qp) = self.qp.as_mut() {
            n += qp.poll(out);
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.failed.len() + self.qp.as_ref().map_or(0, |q| q.outstanding())
    }

    fn max_segments(&self) -> usize {
        crate::controller::MAX_SEGMENTS
    }

    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.qp {
            Some(qp) if self.failed.is_empty() => Some(std::os::fd::AsRawFd::as_raw_fd(qp)),
            _ => None,
        }
    }
}

impl Bdev for RemoteNamespace {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        let qp = self
            .open_qpair()
            .map_err(|e| bdev_err("opening an NVMe/TCP I/O queue", e))?;
        Ok(Box::new(RemoteQueue {
            qp: Some(qp),
            shared: self.shared.clone(),
            failed: Vec::new(),
            attempt: None,
            next_attempt: Instant::now(),
            backoff: RECONNECT_BACKOFF,
        }))
    }

    fn flush_all(&self) -> unvme_bdev::Result<()> {
        if !self.info.volatile_write_cache {
            return Ok(());
        }
        let mut qp = self
            .open_qpair()
            .map_err(|e| bdev_err("opening an NVMe/TCP I/O queue", e))?;
        let c = qp
            .run_sync(
                self.shared.nsid,
                IoRequest {
                    tag: 0,
                    op: IoOp::Flush,
                    buf: None,
                    more: Vec::new(),
                },
            )
            .map_err(|e| bdev_err("flush", e))?;
        c.result.map_err(|e| bdev_err("flush", e))
    }
}
