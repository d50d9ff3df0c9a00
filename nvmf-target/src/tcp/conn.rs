//! One NVMe/TCP connection (one queue pair) on the target side: the
//! transport half of a queue pair (NVMe/TCP Transport Specification 1.0).
//!
//! A `Conn` is owned by exactly one reactor. It turns received bytes into
//! PDUs, runs the connection's PDU state machine (ICReq, capsules, R2T and
//! H2CData, termination), moves each command's data, and hands the command
//! to its queue pair's [`Controller`], which says what it means. I/O the
//! controller asks for goes to the reactor's bdev queues through [`Ctx`];
//! responses go to the [`SendQueue`] for one vectored write per turn. Data
//! for reads is sent straight from the command's buffer; data of large
//! writes is read from the socket straight into the command's buffer.
//!
//! What a command means is not decided here: no admin, Fabrics or NVM
//! semantics live in this file.
//!
//! What a host may make the target hold is bounded here:
//! - a command's data buffer is taken only when its data is about to move
//!   (a write's when its R2T is sent, a read's when it is about to run), and
//!   only while the connection's and the reactor's transfer budgets allow
//!   ([`Params::conn_xfer_bytes`], [`BufPool::xfer_limit`]); transfers that
//!   do not fit wait in order;
//! - at most SQSIZE commands (the size Connect negotiated) are outstanding;
//!   one more is a fatal transport error (PDU Sequence Error), as the host
//!   broke the queue's flow control;
//! - a connection whose queued responses exceed [`Params::sendq_limit`] is
//!   not read until its host drains them, and one turn reads at most
//!   [`Params::turn_budget`] bytes of one connection;
//! - a connection that has not sent ICReq, or completed Connect, within its
//!   deadline is closed.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::{IoBuf, IoError, IoOp, IoRequest};
use unvme_proto::nvme::{io_opc, sgl_type, Cqe, DataDir, Sqe, Status};
use unvme_proto::pdu::{
    self, fes, CapsuleResp, DataPdu, Event, FatalError, Framing, IcReq, IcResp, Limits, Pdu,
    PduDecoder, R2t, Role, TermReq, DGST_DATA, DGST_HDR,
};

use super::sendq::SendQueue;
use crate::config::Params;
use crate::ctrlr::{Completion, Controller, Outcome, Teardown, ADMIN_INCAPSULE};
use crate::pool::BufPool;
use crate::queues::BdevQueues;
use crate::subsystem::Subsystems;

/// Receive buffer size per connection.
const RX_BUF: usize = 64 * 1024;
/// Writes with at least this much data left are read straight into the
/// command buffer instead of through the receive buffer.
const DIRECT_READ_MIN: usize = 8192;
/// How long a closing connection may take to send what it has queued.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the reactor lends a connection while it works.
pub(crate) struct Ctx<'a> {
    /// The reactor's queue on every namespace.
    pub queues: &'a mut BdevQueues,
    /// The reactor's free data buffers.
    pub pool: &'a mut BufPool,
    /// The bdev tag of this connection's slot 0; a slot's tag adds its
    /// number (see the reactor's tag layout).
    pub tag_base: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitIc,
    Established,
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Receiving in-capsule data.
    InCapsule,
    /// R2T sent, receiving H2CData.
    AwaitH2c,
    /// Being executed (or submitted to a bdev).
    Executing,
    /// Held by the controller (Asynchronous Event Request).
    Held,
    /// Waiting for the transfer budget to allow its data buffer (and R2T).
    AwaitBudget,
    /// Response queued; the buffer is still referenced by the send queue.
    Sending,
}

struct Slot {
    state: SlotState,
    cid: u16,
    sqe: Sqe,
    buf: Option<IoBuf>,
    /// Bytes to transfer (data length of the command).
    len: u32,
    /// H2C bytes received so far.
    recvd: u32,
    /// A data digest error was seen on this command's data.
    ddgst_err: bool,
    /// Transfer-budget bytes this command holds.
    charged: u32,
}

/// Where the current PDU's data goes.
#[derive(Clone, Copy, Debug)]
enum RxTarget {
    None,
    Slot { slot: u16, off: u32 },
    Discard,
}

/// Why a connection closes, for the log.
pub(crate) enum CloseReason {
    PeerClosed,
    Fatal(FatalError),
    Io(io::Error),
    Controller(Teardown),
    Shutdown,
    /// No ICReq, or no Connect, within its deadline.
    Deadline(&'static str),
    /// Closed to make room for a new connection before it connected.
    Evicted,
}

impl CloseReason {
    /// Whether the close is worth a warning (the host misbehaved or the
    /// socket failed) rather than an ordinary end.
    pub fn is_abnormal(&self) -> bool {
        !matches!(self, CloseReason::PeerClosed | CloseReason::Shutdown)
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "host closed the connection"),
            CloseReason::Fatal(e) => write!(f, "{e}"),
            CloseReason::Io(e) => write!(f, "socket error: {e}"),
            CloseReason::Controller(t) => write!(f, "{t}"),
            CloseReason::Shutdown => write!(f, "target shutting down"),
            CloseReason::Deadline(what) => write!(f, "deadline passed: {what}"),
            CloseReason::Evicted => {
                write!(
                    f,
                    "evicted before Connect to make room for a new connection"
                )
            }
        }
    }
}

/// A connection over `S`: a `mio` TCP stream in the target, any
/// non-blocking `Read + Write` (an in-memory one in the fuzz target).
pub(crate) struct Conn<S = mio::net::TcpStream> {
    pub stream: S,
    pub peer: SocketAddr,
    dec: PduDecoder,
    phase: Phase,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    rx_target: RxTarget,
    pub readable: bool,
    /// The peer's FIN (or an error) was reported: read until EOF, not just
    /// until a short read.
    pub read_closed: bool,
    pub writable: bool,
    tx: SendQueue,
    /// Slots the last flush released (reused buffer).
    freed: Vec<u16>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    cid_busy: Box<[u64; 1024]>,
    sqhd: u16,
    ctrl: Controller,
    pub close: Option<CloseReason>,
    pub close_deadline: Option<Instant>,
    pub outstanding_io: usize,
    /// When the socket was accepted (ICReq and Connect deadlines, eviction
    /// order).
    pub accepted: Instant,
    /// Transfer-budget bytes the slots hold.
    xfer_held: usize,
    /// Slots waiting for the transfer budget, in arrival order.
    xfer_wait: std::collections::VecDeque<u16>,
    /// A data digest error was already logged on this connection.
    digest_warned: bool,
    /// Data moved (H2CData arrived, or queued bytes went out) since the
    /// last tick.
    xfer_progress: bool,
    /// When the transfer budget this connection holds last saw progress.
    xfer_stalled_since: Option<Instant>,
}

impl<S: Read + std::io::Write> Conn<S> {
    pub fn new(
        stream: S,
        peer: SocketAddr,
        port: u16,
        subsystems: Arc<Subsystems>,
        params: Arc<Params>,
    ) -> Self {
        let nslots = usize::from(params.max_queue_size) + 1;
        let limits = Limits {
            max_incapsule: ADMIN_INCAPSULE,
            max_data: params.max_h2c_data,
        };
        Conn {
            stream,
            peer,
            dec: PduDecoder::new(Role::Controller, limits),
            phase: Phase::AwaitIc,
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            rx_target: RxTarget::None,
            readable: true,
            read_closed: false,
            writable: true,
            tx: SendQueue::new(nslots),
            freed: Vec::with_capacity(nslots),
            slots: (0..nslots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    cid: 0,
                    sqe: Sqe::default(),
                    buf: None,
                    len: 0,
                    recvd: 0,
                    ddgst_err: false,
                    charged: 0,
                })
                .collect(),
            free: (0..nslots as u16).rev().collect(),
            cid_busy: Box::new([0u64; 1024]),
            sqhd: 0,
            ctrl: Controller::new(peer, port, subsystems, params),
            close: None,
            close_deadline: None,
            outstanding_io: 0,
            accepted: Instant::now(),
            xfer_held: 0,
            xfer_wait: std::collections::VecDeque::with_capacity(nslots),
            digest_warned: false,
            xfer_progress: false,
            xfer_stalled_since: None,
        }
    }

    /// Whether Connect succeeded on this connection.
    pub fn connected(&self) -> bool {
        self.ctrl.connected()
    }

    /// Whether transfers wait for the budget.
    pub fn has_waiting(&self) -> bool {
        !self.xfer_wait.is_empty()
    }

    pub fn has_tx(&self) -> bool {
        !self.tx.is_empty()
    }

    pub fn qid(&self) -> u16 {
        self.ctrl.qid()
    }

    /// Periodic checks: the ICReq and Connect deadlines, the controller's
    /// own (keep-alive, reset).
    pub fn tick(&mut self, now: Instant) {
        if self.close.is_some() {
            return;
        }
        if !self.ctrl.connected() {
            let age = now.saturating_duration_since(self.accepted);
            let p = self.ctrl.params();
            let late = match self.phase {
                Phase::AwaitIc if age > p.icreq_timeout => Some("no ICReq"),
                Phase::Established if age > p.connect_timeout => Some("no Connect"),
                _ => None,
            };
            if let Some(what) = late {
                self.close = Some(CloseReason::Deadline(what));
            }
            return;
        }
        // Budget held with no data moving: a host that asked for transfers
        // and neither sends the write data nor reads the read data would
        // hold the reactor's budget (and every other host's transfers).
        if self.xfer_held == 0 || std::mem::take(&mut self.xfer_progress) {
            self.xfer_stalled_since = None;
        } else {
            let since = *self.xfer_stalled_since.get_or_insert(now);
            if now.saturating_duration_since(since) > self.ctrl.params().transfer_timeout {
                self.close = Some(CloseReason::Deadline(
                    "no data moved for the transfers it holds",
                ));
                return;
            }
        }
        if let Some(t) = self.ctrl.tick(now) {
            self.close = Some(CloseReason::Controller(t));
        }
    }

    /// Completes held Asynchronous Event Requests with the controller's
    /// pending events (admin queue; one atomic load when there are none).
    #[inline]
    pub fn deliver_events(&mut self) {
        if self.close.is_some() || !self.ctrl.has_event() {
            return;
        }
        while let Some(si) = self.slots.iter().position(|s| s.state == SlotState::Held) {
            let Some(c) = self.ctrl.take_event() else {
                return;
            };
            tracing::debug!(peer = %self.peer, dw0 = c.dw0, "asynchronous event");
            self.complete(si as u16, c);
        }
    }

    /// Starts closing: what is queued may still go out for a while.
    fn close_after_send(&mut self, reason: CloseReason) {
        self.phase = Phase::Closing;
        self.close_deadline = Some(Instant::now() + CLOSE_LINGER);
        self.close = Some(reason);
    }

    /// Reads everything available and processes it. Returns bytes received.
    /// Stops early, leaving the connection readable, when its queued
    /// responses exceed the send-queue bound (until its host drains them)
    /// or when this turn's budget is spent (other connections go first).
    pub fn on_readable(&mut self, ctx: &mut Ctx<'_>) -> usize {
        let mut total = 0;
        let (sendq_limit, budget) = {
            let p = self.ctrl.params();
            (p.sendq_limit, p.turn_budget)
        };
        while self.close.is_none() {
            if self.tx.queued_bytes() > sendq_limit || total >= budget {
                break;
            }
            // Large H2C data with an empty receive buffer: read it straight
            // into the command buffer.
            if self.rx_start == self.rx_end && self.dec.data_remaining() >= DIRECT_READ_MIN {
                if let RxTarget::Slot { slot, off } = self.rx_target {
                    match self.read_direct(slot, off) {
                        Some(0) => break,
                        Some(n) => {
                            total += n;
                            if self.dec.data_remaining() > 0 && !self.read_closed {
                                self.readable = false;
                                break;
                            }
                            // Data complete: let the decoder finish the PDU.
                            self.process(ctx);
                            continue;
                        }
                        None => continue,
                    }
                }
            }
            match self.read_buffered() {
                Some(0) => break,
                Some(n) => {
                    total += n;
                    let full = self.rx_end == self.rx.len();
                    self.process(ctx);
                    if !full && !self.read_closed {
                        self.readable = false;
                        break;
                    }
                }
                None => continue,
            }
        }
        total
    }

    /// Reads H2C data straight into `slot`'s buffer at `off`. Returns the
    /// bytes read, `Some(0)` when reading must stop (would block, closed,
    /// error: `readable`/`close` say which), `None` to try again.
    fn read_direct(&mut self, slot: u16, off: u32) -> Option<usize> {
        let rem = self.dec.data_remaining();
        let s = &mut self.slots[usize::from(slot)];
        let Some(buf) = s.buf.as_mut() else {
            return Some(0);
        };
        let o = off as usize;
        match self.stream.read(&mut buf[o..o + rem]) {
            Ok(0) => {
                self.close = Some(CloseReason::PeerClosed);
                Some(0)
            }
            Ok(n) => {
                self.dec.consume_data_direct(&buf[o..o + n]);
                self.rx_target = RxTarget::Slot {
                    slot,
                    off: off + n as u32,
                };
                Some(n)
            }
            Err(e) => self.read_error(e),
        }
    }

    /// Reads into the receive buffer (compacting it first). Same returns as
    /// [`Conn::read_direct`].
    fn read_buffered(&mut self) -> Option<usize> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && self.rx_end == self.rx.len() {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.rx_end == self.rx.len() {
            // The decoder always consumes what it is given, so a full
            // buffer cannot happen; stop this turn's reading if it did.
            return Some(0);
        }
        match self.stream.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                self.close = Some(CloseReason::PeerClosed);
                Some(0)
            }
            Ok(n) => {
                self.rx_end += n;
                Some(n)
            }
            Err(e) => self.read_error(e),
        }
    }

    fn read_error(&mut self, e: io::Error) -> Option<usize> {
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                self.readable = false;
                Some(0)
            }
            io::ErrorKind::Interrupted => None,
            _ => {
                self.close = Some(CloseReason::Io(e));
                Some(0)
            }
        }
    }

    /// Decodes buffered bytes.
    fn process(&mut self, ctx: &mut Ctx<'_>) {
        let rx = std::mem::take(&mut self.rx);
        while self.close.is_none() && self.phase != Phase::Closing {
            match self.dec.decode(&rx[self.rx_start..self.rx_end]) {
                Err(e) => {
                    self.fatal(e);
                    break;
                }
                Ok((n, ev)) => {
                    self.rx_start += n;
                    match ev {
                        None if n == 0 => break,
                        None => {}
                        Some(Event::Pdu(p)) => self.on_pdu(p, ctx),
                        Some(Event::Data(d)) => self.on_data(d),
                        Some(Event::DataEnd { digest_ok }) => self.on_data_end(digest_ok, ctx),
                    }
                }
            }
        }
        self.rx = rx;
    }

    /// Sends a C2HTermReq and closes once it is out.
    fn fatal(&mut self, e: FatalError) {
        // The reactor logs the close (rate-limited) with the error.
        tracing::debug!(peer = %self.peer, fes = e.fes, fei = e.fei, "fatal transport error: {}", e.msg);
        let mut hdr = [0u8; 152];
        let h = self.dec.last_header();
        let n = h.len().min(hdr.len());
        hdr[..n].copy_from_slice(&h[..n]);
        self.tx.push_pdu(&Pdu::C2hTermReq(TermReq {
            fes: e.fes,
            fei: e.fei,
            data_len: n as u32,
        }));
        self.tx.push_bytes(&hdr[..n]);
        self.close_after_send(CloseReason::Fatal(e));
    }

    fn on_pdu(&mut self, p: Pdu, ctx: &mut Ctx<'_>) {
        self.rx_target = RxTarget::None;
        match p {
            Pdu::IcReq(ic) => self.on_icreq(ic),
            Pdu::H2cTermReq(t) => {
                tracing::info!(peer = %self.peer, fes = t.fes, fei = t.fei, "host terminated the connection");
                self.rx_target = RxTarget::Discard;
                self.close = Some(CloseReason::PeerClosed);
            }
            Pdu::CapsuleCmd(c) => self.on_capsule(c.sqe, c.data_len, ctx),
            Pdu::H2cData(d) => self.on_h2c(d),
            // The decoder only yields host-to-controller PDUs in this role.
            _ => self.fatal(FatalError {
                fes: fes::INVALID_HEADER_FIELD,
                fei: 0,
                msg: "unexpected PDU",
            }),
        }
    }

    fn on_icreq(&mut self, ic: IcReq) {
        if ic.pfv != 0 {
            return self.fatal(FatalError {
                fes: fes::INVALID_HEADER_FIELD,
                fei: 8,
                msg: "unsupported PFV",
            });
        }
        if ic.hpda > 31 {
            return self.fatal(FatalError {
                fes: fes::INVALID_HEADER_FIELD,
                fei: 10,
                msg: "HPDA out of range",
            });
        }
        let dgst = ic.dgst & (DGST_HDR | DGST_DATA);
        self.tx.push_pdu(&Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            dgst,
            maxh2cdata: self.ctrl.params().max_h2c_data,
        }));
        let f = Framing {
            hdgst: dgst & DGST_HDR != 0,
            ddgst: dgst & DGST_DATA != 0,
            pda: 0,
        };
        self.dec.set_framing(f);
        self.tx.set_framing(Framing { pda: ic.hpda, ..f });
        self.phase = Phase::Established;
        tracing::debug!(peer = %self.peer, hdgst = f.hdgst, ddgst = f.ddgst, hpda = ic.hpda, "ICReq accepted");
    }

    fn on_h2c(&mut self, d: DataPdu) {
        self.xfer_progress = true;
        let si = usize::from(d.ttag);
        let ok = self
            .slots
            .get(si)
            .is_some_and(|s| s.state == SlotState::AwaitH2c);
        if !ok {
            return self.fatal(FatalError {
                fes: fes::INVALID_HEADER_FIELD,
                fei: 10,
                msg: "H2CData with unknown TTAG",
            });
        }
        let s = &self.slots[si];
        if s.cid != d.cccid {
            return self.fatal(FatalError {
                fes: fes::INVALID_HEADER_FIELD,
                fei: 8,
                msg: "H2CData CCCID does not match the TTAG",
            });
        }
        if d.datao != s.recvd || u64::from(d.datao) + u64::from(d.datal) > u64::from(s.len) {
            return self.fatal(FatalError {
                fes: fes::DATA_OUT_OF_RANGE,
                fei: 0,
                msg: "H2CData outside the R2T window",
            });
        }
        self.rx_target = RxTarget::Slot {
            slot: d.ttag,
            off: d.datao,
        };
    }

    fn on_data(&mut self, d: &[u8]) {
        if let RxTarget::Slot { slot, off } = self.rx_target {
            let s = &mut self.slots[usize::from(slot)];
            if let Some(buf) = s.buf.as_mut() {
                let o = off as usize;
                buf[o..o + d.len()].copy_from_slice(d);
            }
            self.rx_target = RxTarget::Slot {
                slot,
                off: off + d.len() as u32,
            };
        }
    }

    fn on_data_end(&mut self, digest_ok: bool, ctx: &mut Ctx<'_>) {
        let RxTarget::Slot { slot, off } = std::mem::replace(&mut self.rx_target, RxTarget::None)
        else {
            return;
        };
        let s = &mut self.slots[usize::from(slot)];
        if !digest_ok {
            if !self.digest_warned {
                self.digest_warned = true;
                tracing::warn!(peer = %self.peer, cid = s.cid, "data digest error (further ones on this connection are logged at debug)");
            } else {
                tracing::debug!(peer = %self.peer, cid = s.cid, "data digest error");
            }
            s.ddgst_err = true;
        }
        let (complete, r2t) = match s.state {
            SlotState::InCapsule => (true, false),
            SlotState::AwaitH2c => {
                s.recvd = off;
                (s.recvd == s.len, true)
            }
            _ => (false, false),
        };
        if !complete {
            return;
        }
        if r2t {
            // The data is in: its bytes no longer wait on the host.
            self.uncharge(slot, ctx.pool);
        }
        if self.slots[usize::from(slot)].ddgst_err {
            self.complete(slot, Completion::status(Status::TRANSIENT_TRANSPORT_ERROR));
        } else {
            self.dispatch(slot, ctx);
        }
        if r2t && !self.xfer_wait.is_empty() {
            self.grant_transfers(ctx);
        }
    }

    /// Gives the transfer budget back for `slot`'s data.
    fn uncharge(&mut self, slot: u16, pool: &mut BufPool) {
        let c = std::mem::take(&mut self.slots[usize::from(slot)].charged) as usize;
        if c > 0 {
            self.xfer_held = self.xfer_held.saturating_sub(c);
            if self.ctrl.qid() != 0 {
                pool.xfer_used = pool.xfer_used.saturating_sub(c);
            }
        }
    }

    /// Starts the waiting transfers, in order, while the budgets allow
    /// (see [`Conn::try_grant`]).
    pub fn grant_transfers(&mut self, ctx: &mut Ctx<'_>) {
        while let Some(&slot) = self.xfer_wait.front() {
            if self.close.is_some() || self.phase == Phase::Closing || !self.try_grant(slot, ctx) {
                return;
            }
            self.xfer_wait.pop_front();
        }
    }

    /// Starts `slot`'s transfer if the connection's and (for an I/O queue)
    /// the reactor's transfer budget allow it; a connection holding nothing
    /// may always start one, so every queue makes progress. A write gets
    /// its buffer and R2T, a read its buffer and runs. Returns whether it
    /// started.
    #[inline]
    fn try_grant(&mut self, slot: u16, ctx: &mut Ctx<'_>) -> bool {
        let si = usize::from(slot);
        let len = self.slots[si].len as usize;
        let shared = self.ctrl.qid() != 0;
        let conn_ok =
            self.xfer_held == 0 || self.xfer_held + len <= self.ctrl.params().conn_xfer_bytes;
        let pool = &mut *ctx.pool;
        let reactor_ok = !shared || pool.xfer_used == 0 || pool.xfer_used + len <= pool.xfer_limit;
        if !(conn_ok && reactor_ok) {
            return false;
        }
        self.xfer_held += len;
        if shared {
            pool.xfer_used += len;
        }
        let sqe = self.slots[si].sqe;
        let buf = self.data_buf(&sqe, len, ctx);
        let s = &mut self.slots[si];
        s.charged = len as u32;
        s.buf = Some(buf);
        if sqe.data_dir() == DataDir::ControllerToHost {
            s.state = SlotState::Executing;
            self.dispatch(slot, ctx);
        } else {
            s.state = SlotState::AwaitH2c;
            let r2t = R2t {
                cccid: s.cid,
                ttag: slot,
                r2to: 0,
                r2tl: s.len,
            };
            self.tx.push_pdu(&Pdu::R2t(r2t));
        }
        true
    }

    fn cid_test_set(&mut self, cid: u16) -> bool {
        let (w, b) = (usize::from(cid / 64), cid % 64);
        let was = self.cid_busy[w] & (1 << b) != 0;
        self.cid_busy[w] |= 1 << b;
        was
    }

    fn cid_clear(&mut self, cid: u16) {
        self.cid_busy[usize::from(cid / 64)] &= !(1 << (cid % 64));
    }

    /// A command capsule: claims a slot, then either receives its
    /// in-capsule data, asks for its data with an R2T, or runs it.
    fn on_capsule(&mut self, sqe: Sqe, data_len: u32, ctx: &mut Ctx<'_>) {
        let sqsize = self.ctrl.sqsize();
        if sqsize > 0 {
            self.sqhd = (self.sqhd + 1) % sqsize;
        }
        if self.cid_test_set(sqe.cid) && !self.drop_held_aer(sqe.cid) {
            // Respond without disturbing the command that owns the CID.
            self.rx_target = RxTarget::Discard;
            return self.push_resp(sqe.cid, Completion::status(Status::CID_CONFLICT));
        }
        // SQSIZE is the most commands the host may have outstanding (held
        // AERs included); the slots beyond it exist only for the largest
        // queue a host may connect.
        let outstanding = self.slots.len() - self.free.len();
        let slot = if outstanding < usize::from(self.ctrl.sqsize()) {
            self.free.pop()
        } else {
            None
        };
        let Some(slot) = slot else {
            self.cid_clear(sqe.cid);
            return self.fatal(FatalError {
                fes: fes::SEQUENCE_ERROR,
                fei: 0,
                msg: "host exceeded the queue size",
            });
        };
        let s = &mut self.slots[usize::from(slot)];
        s.state = SlotState::Executing;
        s.cid = sqe.cid;
        s.sqe = sqe;
        s.len = 0;
        s.recvd = 0;
        s.ddgst_err = false;
        s.charged = 0;
        debug_assert!(s.buf.is_none());
        let admitted = if self.phase == Phase::AwaitIc {
            Err(Status::COMMAND_SEQUENCE_ERROR)
        } else {
            self.ctrl.admit(&sqe)
        };
        if let Err(st) = admitted {
            if data_len > 0 {
                self.rx_target = RxTarget::Discard;
            }
            return self.complete(slot, Completion::status(st));
        }
        if data_len > 0 {
            return self.start_in_capsule(slot, data_len, ctx);
        }
        match sqe.data_dir() {
            DataDir::None => self.dispatch(slot, ctx),
            _ => self.start_transfer(slot, ctx),
        }
    }

    /// A host that gave up on an Asynchronous Event Request may reuse its
    /// CID (SPDK's does, for the Property Get at shutdown): the held AER
    /// is dropped silently and its slot freed. Returns whether `cid` was
    /// such an AER.
    #[cold]
    fn drop_held_aer(&mut self, cid: u16) -> bool {
        let Some(si) = self
            .slots
            .iter()
            .position(|s| s.state == SlotState::Held && s.cid == cid)
        else {
            return false;
        };
        tracing::debug!(peer = %self.peer, cid, "CID of a held AER reused: dropping the AER");
        self.slots[si].state = SlotState::Free;
        self.free.push(si as u16);
        self.ctrl.aer_dropped();
        true
    }

    /// In-capsule data: an SGL Data Block descriptor with the Offset
    /// subtype at offset 0, as long as the data (NVMe/TCP 1.0 §3.3.2).
    fn start_in_capsule(&mut self, slot: u16, data_len: u32, ctx: &mut Ctx<'_>) {
        let sqe = self.slots[usize::from(slot)].sqe;
        let sgl = sqe.sgl();
        let invalid = if sqe.data_dir() != DataDir::HostToController
            || sgl.sgl_type != sgl_type::DATA_BLOCK_OFFSET
        {
            Some(Status::SGL_DESCRIPTOR_TYPE_INVALID)
        } else if sgl.addr != 0 {
            Some(Status::SGL_OFFSET_INVALID)
        } else if sgl.length != data_len {
            Some(Status::DATA_SGL_LENGTH_INVALID)
        } else {
            None
        };
        if let Some(st) = invalid {
            self.rx_target = RxTarget::Discard;
            return self.complete(slot, Completion::status(st));
        }
        let buf = self.data_buf(&sqe, data_len as usize, ctx);
        let s = &mut self.slots[usize::from(slot)];
        s.len = data_len;
        s.buf = Some(buf);
        s.state = SlotState::InCapsule;
        self.rx_target = RxTarget::Slot { slot, off: 0 };
    }

    /// Data moved outside the capsule (Transport SGL Data Block): once the
    /// transfer budget allows, a read runs and answers with C2HData, a
    /// write asks for its data with an R2T (see
    /// [`Conn::grant_transfers`]).
    fn start_transfer(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let sqe = self.slots[usize::from(slot)].sqe;
        let sgl = sqe.sgl();
        if sgl.length == 0 {
            return self.dispatch(slot, ctx);
        }
        if sgl.sgl_type != sgl_type::TRANSPORT_DATA_BLOCK {
            return self.complete(
                slot,
                Completion::status(Status::SGL_DESCRIPTOR_TYPE_INVALID),
            );
        }
        if sgl.length > self.ctrl.params().max_transfer {
            return self.complete(slot, Completion::status(Status::INVALID_FIELD));
        }
        self.slots[usize::from(slot)].len = sgl.length;
        // Transfers start in arrival order: one may start now only if none
        // waits.
        if self.xfer_wait.is_empty() && self.try_grant(slot, ctx) {
            return;
        }
        self.slots[usize::from(slot)].state = SlotState::AwaitBudget;
        self.xfer_wait.push_back(slot);
    }

    /// The data buffer of a command: from its namespace's queue when that
    /// queue has memory of its own for data (no copy to reach the device),
    /// else from the reactor's pool.
    fn data_buf(&self, sqe: &Sqe, len: usize, ctx: &mut Ctx<'_>) -> IoBuf {
        self.ctrl
            .namespace_index(sqe.nsid)
            .and_then(|g| ctx.queues.alloc_buf(g, len))
            .unwrap_or_else(|| ctx.pool.get(len))
    }

    /// Runs a command whose data (if any) has arrived.
    fn dispatch(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let si = usize::from(slot);
        let s = &mut self.slots[si];
        let len = s.len as usize;
        let data = s.buf.as_deref_mut().map(|b| &mut b[..len]);
        let was_connected = self.ctrl.connected();
        match self.ctrl.execute(&s.sqe, data) {
            Outcome::Complete(c) => self.complete(slot, c),
            Outcome::Data(c) => self.send_c2h(slot, c),
            Outcome::Io { gidx, op } => self.submit_io(slot, gidx, op, ctx),
            Outcome::Hold => self.slots[si].state = SlotState::Held,
            Outcome::Disconnect => {
                self.complete(slot, Completion::ok(0));
                self.close_after_send(CloseReason::PeerClosed);
            }
        }
        if !was_connected && self.ctrl.connected() {
            self.on_connected();
        }
    }

    /// Connect succeeded: the queue's own in-capsule limit applies from the
    /// next capsule on.
    fn on_connected(&mut self) {
        self.dec.set_limits(Limits {
            max_incapsule: self.ctrl.in_capsule_size(),
            max_data: self.ctrl.params().max_h2c_data,
        });
        if self.ctrl.qid() != 0 {
            let f = self.tx.framing();
            let cntlid = self.ctrl.cntlid().unwrap_or_default();
            tracing::info!(peer = %self.peer, cntlid, qid = self.ctrl.qid(), sqsize = self.ctrl.sqsize(), hdgst = f.hdgst, ddgst = f.ddgst, "I/O queue connected");
        }
    }

    fn submit_io(&mut self, slot: u16, gidx: usize, op: IoOp, ctx: &mut Ctx<'_>) {
        let si = usize::from(slot);
        let buf = match op {
            IoOp::Read { .. } | IoOp::Write { .. } | IoOp::Compare { .. } => {
                self.slots[si].buf.take()
            }
            _ => None,
        };
        let req = IoRequest {
            tag: ctx.tag_base | u64::from(slot),
            op,
            buf,
            more: Vec::new(),
        };
        self.slots[si].state = SlotState::Executing;
        if ctx.queues.submit(gidx, req).is_err() {
            return self.complete(slot, Completion::status(Status::NS_NOT_READY));
        }
        self.outstanding_io += 1;
    }

    /// A bdev completion for one of this connection's slots.
    pub fn io_done(
        &mut self,
        slot: u16,
        result: Result<(), IoError>,
        buf: Option<IoBuf>,
        pool: &mut BufPool,
    ) {
        self.outstanding_io = self.outstanding_io.saturating_sub(1);
        let si = usize::from(slot);
        if self.slots.get(si).map(|s| s.state) != Some(SlotState::Executing) {
            if let Some(b) = buf {
                pool.put(b);
            }
            return;
        }
        if let Some(b) = buf {
            if let Some(old) = self.slots[si].buf.replace(b) {
                pool.put(old);
            }
        }
        let st = match result {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                if let IoError::Media(m) = &e {
                    tracing::error!("backend I/O error: {m}");
                }
                unvme_bdev::status::to_nvme(&e)
            }
        };
        if st.is_success() && self.slots[si].sqe.opc == io_opc::READ {
            self.send_c2h(slot, Completion::ok(0));
        } else {
            self.complete(slot, Completion::status(st));
        }
    }

    /// Queues C2HData with the slot's whole buffer and the response (which
    /// a read with SQ flow control disabled may fold into the data PDU's
    /// SUCCESS flag).
    fn send_c2h(&mut self, slot: u16, c: Completion) {
        let si = usize::from(slot);
        let len = self.slots[si].len;
        let cid = self.slots[si].cid;
        let success = self.ctrl.sqflow_disabled() && c.status.is_success() && c.dw0 == 0;
        self.tx.push_pdu(&Pdu::C2hData(DataPdu {
            cccid: cid,
            ttag: 0,
            datao: 0,
            datal: len,
            last: true,
            success,
        }));
        self.tx.push_data(slot, 0, len as usize);
        if self.tx.framing().ddgst {
            let d = match self.slots[si].buf.as_ref() {
                Some(b) => pdu::digest(&[&b[..len as usize]]),
                None => [0; 4],
            };
            self.tx.push_bytes(&d);
        }
        if !success {
            self.push_resp(cid, c);
        }
        self.finish(slot);
    }

    fn complete(&mut self, slot: u16, c: Completion) {
        let cid = self.slots[usize::from(slot)].cid;
        self.push_resp(cid, c);
        self.finish(slot);
    }

    /// The slot's answer is queued: its CID is free for the host again, the
    /// slot once the answer is out.
    fn finish(&mut self, slot: u16) {
        let cid = self.slots[usize::from(slot)].cid;
        self.cid_clear(cid);
        self.slots[usize::from(slot)].state = SlotState::Sending;
        self.tx.push_free(slot);
    }

    fn free_slot(&mut self, slot: u16, pool: &mut BufPool) {
        let s = &mut self.slots[usize::from(slot)];
        if s.state == SlotState::Free {
            return;
        }
        s.state = SlotState::Free;
        if let Some(b) = s.buf.take() {
            pool.put(b);
        }
        self.free.push(slot);
        self.uncharge(slot, pool);
    }

    fn push_resp(&mut self, cid: u16, c: Completion) {
        let cqe = Cqe {
            dw0: c.dw0,
            dw1: c.dw1,
            sqhd: self.sqhd,
            sqid: self.ctrl.qid(),
            cid,
            status: c.status.to_field(),
        };
        self.tx.push_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }));
    }

    /// Writes as much of the send queue as the socket takes. Returns
    /// Ok(true) when everything went out.
    pub fn flush(&mut self, pool: &mut BufPool) -> io::Result<bool> {
        let slots = &self.slots;
        let r = self.tx.flush(
            &mut self.stream,
            |slot| slots[usize::from(slot)].buf.as_deref(),
            &mut self.freed,
        );
        let mut freed = std::mem::take(&mut self.freed);
        if !freed.is_empty() {
            // A command's answer went out in full.
            self.xfer_progress = true;
        }
        for slot in freed.drain(..) {
            self.free_slot(slot, pool);
        }
        self.freed = freed;
        match r {
            Ok(false) => self.writable = false,
            Ok(true) => self.xfer_progress = true,
            Err(_) => {}
        }
        r
    }

    /// Releases buffers and the controller's hold on this queue at close.
    pub fn release(&mut self, pool: &mut BufPool) {
        for slot in 0..self.slots.len() {
            if let Some(b) = self.slots[slot].buf.take() {
                pool.put(b);
            }
            self.uncharge(slot as u16, pool);
        }
        self.xfer_wait.clear();
        self.ctrl.release();
    }
}
