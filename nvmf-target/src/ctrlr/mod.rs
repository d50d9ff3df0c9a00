//! The controller model: what an NVMe over Fabrics controller does with a
//! command, apart from how the command arrived.
//!
//! A transport (here NVMe/TCP, `crate::tcp`) decodes a capsule, moves its
//! data, and hands the command to the [`Controller`] of its queue pair with
//! [`Controller::execute`]; the answer is an [`Outcome`]: a completion, data
//! for the host, an operation for the backend, or "held" (an Asynchronous
//! Event Request). The controller owns the meaning: Fabrics (Connect,
//! Property Get/Set, Disconnect), the admin command set, NVM I/O command
//! validation, discovery, keep-alive. It never sees a socket, a PDU or a
//! buffer pool, so it is unit-tested on its own (`tests.rs`), the way SPDK
//! keeps `lib/nvmf/ctrlr.c` apart from `tcp.c`.
//!
//! One [`Controller`] value exists per queue pair (one TCP connection). The
//! state the queues of one NVMe controller share — registers, keep-alive,
//! queue count — is the [`CtrlShared`] of the subsystem registry; only
//! admin commands, Connect and the periodic tick lock it, never an I/O.

mod admin;
mod discovery;
mod fabrics;
pub(crate) mod flush_all;
mod identify;
mod io;
mod passthru;
pub(crate) mod ratelimit;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::IoOp;
use unvme_proto::fabrics::{fctype, OPC_FABRICS};
use unvme_proto::nvme::{Sqe, Status};
use unvme_proto::regs::csts;

use crate::config::Params;
use crate::subsystem::{CtrlShared, Subsystem, Subsystems};

/// In-capsule data the admin queue accepts (the Linux host assumes 8 KiB);
/// also the limit before Connect, whose data is 1 KiB.
pub(crate) const ADMIN_INCAPSULE: u32 = 8192;
/// Outstanding Asynchronous Event Requests per controller (AERL + 1).
const MAX_AER: usize = 4;

/// A completion queue entry's command-specific part and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Status field.
    pub status: Status,
    /// Dword 0.
    pub dw0: u32,
    /// Dword 1.
    pub dw1: u32,
}

impl Completion {
    /// A completion with `status` and nothing else.
    pub fn status(status: Status) -> Self {
        Completion {
            status,
            dw0: 0,
            dw1: 0,
        }
    }

    /// A successful completion with dword 0.
    pub fn ok(dw0: u32) -> Self {
        Completion {
            status: Status::SUCCESS,
            dw0,
            dw1: 0,
        }
    }
}

/// What the transport does with a command the controller executed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Send this completion.
    Complete(Completion),
    /// The command's buffer holds the data for the host (all of it,
    /// zero-filled past what the controller had); send it, then this
    /// (successful) completion.
    Data(Completion),
    /// Run `op` on the backend of namespace index `gidx` (the reactor's
    /// queue table); the completion follows from its result.
    Io {
        /// Global namespace index.
        gidx: usize,
        /// The operation.
        op: IoOp,
    },
    /// Keep the command without an answer (an Asynchronous Event Request).
    Hold,
    /// Send a successful completion, then end the connection (Disconnect).
    Disconnect,
}

impl Outcome {
    fn status(status: Status) -> Self {
        Outcome::Complete(Completion::status(status))
    }

    fn ok(dw0: u32) -> Self {
        Outcome::Complete(Completion::ok(dw0))
    }
}

/// Why the controller ends its queue pair on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// No command within the Keep Alive Timeout (admin queue).
    KeepAliveExpired,
    /// The controller was destroyed or reset (I/O queues).
    ControllerGone,
}

impl std::fmt::Display for Teardown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Teardown::KeepAliveExpired => write!(f, "keep-alive timeout"),
            Teardown::ControllerGone => write!(f, "controller was destroyed or reset"),
        }
    }
}

/// The controller side of one queue pair: before Connect, a queue waiting
/// to be bound; after it, the admin queue or an I/O queue of one controller.
pub(crate) struct Controller {
    /// The host's address, for log lines.
    peer: SocketAddr,
    /// The port (listener index) the connection arrived on: which ANA
    /// states apply.
    port: u16,
    subsystems: Arc<Subsystems>,
    params: Arc<Params>,
    /// Queue ID (from Connect).
    qid: u16,
    /// Queue size in entries (1's based; from Connect).
    sqsize: u16,
    /// SQ flow control disabled (Connect CATTR bit 2).
    sqflow_off: bool,
    /// The controller this queue belongs to, once connected.
    ctrl: Option<Arc<CtrlShared>>,
    subsys: Option<Arc<Subsystem>>,
    /// The controller's reset epoch this I/O queue was connected in.
    epoch: u32,
    /// Asynchronous Event Requests held.
    aers: usize,
}

impl Controller {
    /// A queue pair's controller side before Connect, on listener `port`.
    pub fn new(
        peer: SocketAddr,
        port: u16,
        subsystems: Arc<Subsystems>,
        params: Arc<Params>,
    ) -> Controller {
        Controller {
            peer,
            port,
            subsystems,
            params,
            qid: 0,
            sqsize: 32,
            sqflow_off: false,
            ctrl: None,
            subsys: None,
            epoch: 0,
            aers: 0,
        }
    }

    /// The target's settings.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Queue ID (0 until an I/O queue is connected).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Queue size in entries (1's based).
    pub fn sqsize(&self) -> u16 {
        self.sqsize
    }

    /// Whether the host disabled SQ flow control (SQHD may be omitted, and
    /// a read's C2HData may carry the success flag instead of a response).
    pub fn sqflow_disabled(&self) -> bool {
        self.sqflow_off
    }

    /// Whether Connect succeeded on this queue.
    pub fn connected(&self) -> bool {
        self.ctrl.is_some()
    }

    /// The controller ID, once connected.
    pub fn cntlid(&self) -> Option<u16> {
        self.ctrl.as_ref().map(|c| c.cntlid)
    }

    /// In-capsule data this queue accepts.
    pub fn in_capsule_size(&self) -> u32 {
        if self.connected() && self.qid != 0 {
            self.params.in_capsule
        } else {
            ADMIN_INCAPSULE
        }
    }

    /// Whether a command may go on to have its data moved: before Connect
    /// only Connect is accepted (Command Sequence Error otherwise, with no
    /// buffer granted).
    pub fn admit(&self, sqe: &Sqe) -> Result<(), Status> {
        if self.connected() || is_connect(sqe) {
            Ok(())
        } else {
            Err(Status::COMMAND_SEQUENCE_ERROR)
        }
    }

    /// The reactor's queue index of namespace `nsid` of this I/O queue's
    /// subsystem (where a command's data buffer may come from).
    pub fn namespace_index(&self, nsid: u32) -> Option<usize> {
        if self.qid == 0 {
            return None;
        }
        Some(self.subsys.as_deref()?.namespace(nsid)?.gidx)
    }

    /// Executes a command whose data (if any) has arrived. `data` is the
    /// command's data buffer, exactly as long as the transfer: the host's
    /// data for a host-to-controller command, room for the answer
    /// otherwise.
    #[inline]
    pub fn execute(&mut self, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        if sqe.opc == OPC_FABRICS {
            return self.fabrics(sqe, data);
        }
        if self.ctrl.is_none() {
            return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
        }
        if self.qid != 0 {
            // I/O queues exist only while the controller is ready (Connect
            // checks it, and a reset closes them), so no lock here, and no
            // reference count touched either.
            return self.io(sqe, data);
        }
        let Some(ctrl) = self.ctrl.clone() else {
            return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
        };
        {
            let mut r = ctrl.regs();
            r.last_keep_alive = Instant::now();
            if r.csts & csts::RDY == 0 {
                return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
            }
        }
        self.admin(&ctrl, sqe, data)
    }

    /// Periodic checks: keep-alive expiry (admin queue), controller gone or
    /// reset (I/O queues).
    pub fn tick(&self, now: Instant) -> Option<Teardown> {
        let ctrl = self.ctrl.as_ref()?;
        if self.qid == 0 {
            let r = ctrl.regs();
            if r.kato_ms == 0 {
                return None;
            }
            let kato = Duration::from_millis(u64::from(r.kato_ms));
            let grace = kato.min(Duration::from_secs(5));
            if now.duration_since(r.last_keep_alive) > kato + grace {
                ratelimit::log_limited!(warn, cntlid = ctrl.cntlid, peer = %self.peer, "keep-alive timeout: destroying controller");
                return Some(Teardown::KeepAliveExpired);
            }
            None
        } else if ctrl.dead.load(Ordering::Acquire)
            || ctrl.epoch.load(Ordering::Acquire) != self.epoch
        {
            Some(Teardown::ControllerGone)
        } else {
            None
        }
    }

    /// Whether [`Controller::take_event`] may have an event: an admin queue
    /// holding an AER whose controller has one pending (one atomic load).
    #[inline]
    pub fn has_event(&self) -> bool {
        self.qid == 0
            && self.aers > 0
            && self
                .ctrl
                .as_ref()
                .is_some_and(|c| c.event_pending.load(Ordering::Acquire))
    }

    /// On an admin queue holding an Asynchronous Event Request: the
    /// completion of one for the oldest pending event, if any (the
    /// transport completes one of its held AERs with it).
    #[inline]
    pub fn take_event(&mut self) -> Option<Completion> {
        if !self.has_event() {
            return None;
        }
        let ev = self.ctrl.as_ref()?.take_event()?;
        self.aers -= 1;
        Some(Completion::ok(ev.to_dword()))
    }

    /// The transport dropped a held Asynchronous Event Request (its host
    /// reused the CID): one fewer is held.
    pub fn aer_dropped(&mut self) {
        self.aers = self.aers.saturating_sub(1);
    }

    /// The queue pair is gone: an admin queue takes its controller with it,
    /// an I/O queue frees its queue ID.
    pub fn release(&mut self) {
        if let Some(ctrl) = self.ctrl.take() {
            if self.qid == 0 {
                ctrl.destroy();
            } else {
                ctrl.regs().connected_qids.retain(|&q| q != self.qid);
            }
        }
    }
}

/// Whether `sqe` is a Fabrics Connect.
fn is_connect(sqe: &Sqe) -> bool {
    sqe.opc == OPC_FABRICS && sqe.fctype() == fctype::CONNECT
}

/// The data outcome of an admin command answering with `page`: as much of
/// it as the host asked for, the rest of its buffer zeroed.
fn answer(page: &[u8], data: Option<&mut [u8]>, dw0: u32) -> Outcome {
    match data {
        Some(buf) if !buf.is_empty() => {
            let n = buf.len().min(page.len());
            buf[..n].copy_from_slice(&page[..n]);
            buf[n..].fill(0);
            Outcome::Data(Completion::ok(dw0))
        }
        _ => Outcome::ok(dw0),
    }
}
