//! One NVMe/TCP connection (one queue pair) on the target side.
//!
//! A `Conn` is owned by exactly one reactor. It turns received bytes into
//! commands, runs admin and Fabrics commands itself, hands NVM I/O to the
//! reactor's bdev queues through [`Ctx`], and queues response PDUs for one
//! vectored write per turn. Data for reads is sent straight from the
//! command's buffer; data of large writes is read from the socket straight
//! into the command's buffer.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::{BdevQueue, IoBuf, IoError, IoOp, IoRequest, LbaRange, SubmitError};
use unvme_proto::admin::{self, opc as aopc};
use unvme_proto::fabrics::{self, cc, csts, fctype, prop, ConnectCmd, ConnectData, PropertyCmd};
use unvme_proto::nvme::{io_opc, sgl_type, Cqe, Sqe, Status};
use unvme_proto::pdu::{
    self, fes, CapsuleResp, DataPdu, Event, FatalError, Framing, IcResp, Limits, Pdu, PduDecoder,
    R2t, Role, TermReq, DGST_DATA, DGST_HDR, MAX_HEADER,
};

use crate::passthru;
use crate::reactor::{BufPool, Params};
use crate::subsystem::{CtrlShared, Subsystem, Subsystems};

/// Receive buffer size per connection.
const RX_BUF: usize = 64 * 1024;
/// Writes with at least this much data left are read straight into the
/// command buffer instead of through the receive buffer.
const DIRECT_READ_MIN: usize = 8192;
/// In-capsule data the admin queue accepts (the Linux host assumes 8 KiB).
const ADMIN_INCAPSULE: u32 = 8192;
/// Outstanding Asynchronous Event Requests per controller (AERL + 1).
const MAX_AER: usize = 4;

/// What the reactor lends a connection while it works.
pub(crate) struct Ctx<'a> {
    pub params: &'a Params,
    pub subsystems: &'a Arc<Subsystems>,
    pub queues: &'a mut Vec<Option<Box<dyn BdevQueue>>>,
    pub busy: &'a mut VecDeque<(usize, IoRequest)>,
    pub pool: &'a mut BufPool,
    pub conn_idx: usize,
    pub conn_gen: u32,
}

/// Builds the bdev tag that routes a completion back to a command slot.
pub(crate) fn make_tag(conn_idx: usize, gen: u32, slot: u16) -> u64 {
    ((conn_idx as u64) << 32) | (u64::from(gen & 0xffff) << 16) | u64::from(slot)
}

/// Splits a tag into (connection index, generation, slot).
pub(crate) fn split_tag(tag: u64) -> (usize, u32, u16) {
    (
        (tag >> 32) as usize,
        ((tag >> 16) & 0xffff) as u32,
        tag as u16,
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitIc,
    AwaitConnect,
    Ready,
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Receiving in-capsule data.
    InCapsule,
    /// R2T sent, receiving H2CData.
    AwaitH2c,
    /// Submitted to a bdev.
    Executing,
    /// Held (Asynchronous Event Request).
    Held,
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
}

/// Where the current PDU's data goes.
#[derive(Clone, Copy, Debug)]
enum RxTarget {
    None,
    Slot { slot: u16, off: u32 },
    Discard,
}

/// An element of the send queue.
enum Seg {
    /// Bytes in the header arena.
    Hdr { start: usize, len: usize },
    /// Bytes of a slot's data buffer.
    Data { slot: u16, off: usize, len: usize },
    /// Free the slot once everything before has been sent.
    Free(u16),
}

/// Close reasons for the log.
pub(crate) enum CloseReason {
    PeerClosed,
    Fatal(FatalError),
    Io(io::Error),
    CtrlGone,
    KeepAlive,
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "host closed the connection"),
            CloseReason::Fatal(e) => write!(f, "{e}"),
            CloseReason::Io(e) => write!(f, "socket error: {e}"),
            CloseReason::CtrlGone => write!(f, "controller was destroyed or reset"),
            CloseReason::KeepAlive => write!(f, "keep-alive timeout"),
            CloseReason::Shutdown => write!(f, "target shutting down"),
        }
    }
}

pub(crate) struct Conn {
    pub stream: mio::net::TcpStream,
    pub peer: SocketAddr,
    dec: PduDecoder,
    tx_framing: Framing,
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
    tx_hdr: Vec<u8>,
    tx_segs: VecDeque<Seg>,
    tx_off: usize,
    slots: Vec<Slot>,
    free: Vec<u16>,
    cid_busy: Box<[u64; 1024]>,
    qid: u16,
    sqsize: u16,
    sqhd: u16,
    sqflow_off: bool,
    pub ctrl: Option<Arc<CtrlShared>>,
    epoch: u32,
    subsys: Option<Arc<Subsystem>>,
    aer_slots: Vec<u16>,
    pub close: Option<CloseReason>,
    pub close_deadline: Option<Instant>,
    pub outstanding_io: usize,
}

impl Conn {
    pub fn new(stream: mio::net::TcpStream, peer: SocketAddr, params: &Params) -> Conn {
        let nslots = usize::from(params.max_queue_size) + 1;
        Conn {
            stream,
            peer,
            dec: PduDecoder::new(
                Role::Controller,
                Limits {
                    max_incapsule: ADMIN_INCAPSULE,
                    max_data: params.max_h2c_data,
                },
            ),
            tx_framing: Framing::default(),
            phase: Phase::AwaitIc,
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            rx_target: RxTarget::None,
            readable: true,
            read_closed: false,
            writable: true,
            tx_hdr: Vec::with_capacity(64 * 1024),
            tx_segs: VecDeque::with_capacity(4 * nslots),
            tx_off: 0,
            slots: (0..nslots)
                .map(|_| Slot {
                    state: SlotState::Free,
                    cid: 0,
                    sqe: Sqe::default(),
                    buf: None,
                    len: 0,
                    recvd: 0,
                    ddgst_err: false,
                })
                .collect(),
            free: (0..nslots as u16).rev().collect(),
            cid_busy: Box::new([0u64; 1024]),
            qid: 0,
            sqsize: 32,
            sqhd: 0,
            sqflow_off: false,
            ctrl: None,
            epoch: 0,
            subsys: None,
            aer_slots: Vec::new(),
            close: None,
            close_deadline: None,
            outstanding_io: 0,
        }
    }

    pub fn has_tx(&self) -> bool {
        !self.tx_segs.is_empty()
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Periodic checks: keep-alive expiry (admin queue), controller gone or
    /// reset (I/O queues).
    pub fn tick(&mut self, now: Instant) {
        if self.close.is_some() {
            return;
        }
        let Some(ctrl) = &self.ctrl else { return };
        if self.qid == 0 {
            let r = ctrl.regs();
            if r.kato_ms > 0 {
                let grace = Duration::from_millis(u64::from(r.kato_ms).min(5000));
                if now.duration_since(r.last_keep_alive)
                    > Duration::from_millis(u64::from(r.kato_ms)) + grace
                {
                    drop(r);
                    tracing::warn!(cntlid = ctrl.cntlid, peer = %self.peer, "keep-alive timeout: destroying controller");
                    self.close = Some(CloseReason::KeepAlive);
                }
            }
        } else if ctrl.dead.load(Ordering::Acquire)
            || ctrl.epoch.load(Ordering::Acquire) != self.epoch
        {
            self.close = Some(CloseReason::CtrlGone);
        }
    }

    /// Reads everything available and processes it. Returns bytes received.
    pub fn on_readable(&mut self, ctx: &mut Ctx<'_>) -> usize {
        let mut total = 0;
        loop {
            if self.close.is_some() {
                break;
            }
            // Large H2C data with an empty receive buffer: read it straight
            // into the command buffer.
            if self.rx_start == self.rx_end {
                if let RxTarget::Slot { slot, off } = self.rx_target {
                    let rem = self.dec.data_remaining();
                    if rem >= DIRECT_READ_MIN {
                        let s = &mut self.slots[usize::from(slot)];
                        let Some(buf) = s.buf.as_mut() else { break };
                        let o = off as usize;
                        match self.stream.read(&mut buf[o..o + rem]) {
                            Ok(0) => {
                                self.close = Some(CloseReason::PeerClosed);
                                break;
                            }
                            Ok(n) => {
                                self.dec.consume_data_direct(&buf[o..o + n]);
                                self.rx_target = RxTarget::Slot {
                                    slot,
                                    off: off + n as u32,
                                };
                                total += n;
                                if n < rem && !self.read_closed {
                                    self.readable = false;
                                    break;
                                }
                                // Data complete: let the decoder finish the PDU.
                                self.process(ctx);
                                continue;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                self.readable = false;
                                break;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                self.close = Some(CloseReason::Io(e));
                                break;
                            }
                        }
                    }
                }
            }
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            } else if self.rx_start > 0 && self.rx_end == self.rx.len() {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let space = self.rx.len() - self.rx_end;
            if space == 0 {
                // Processing stalled with a full buffer (cannot happen: the
                // decoder always consumes); avoid a busy loop regardless.
                self.process(ctx);
                break;
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    self.close = Some(CloseReason::PeerClosed);
                    break;
                }
                Ok(n) => {
                    self.rx_end += n;
                    total += n;
                    self.process(ctx);
                    if n < space && !self.read_closed {
                        self.readable = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close = Some(CloseReason::Io(e));
                    break;
                }
            }
        }
        total
    }

    /// Decodes buffered bytes.
    fn process(&mut self, ctx: &mut Ctx<'_>) {
        let rx = std::mem::take(&mut self.rx);
        loop {
            if self.close.is_some() || self.phase == Phase::Closing {
                break;
            }
            let input = &rx[self.rx_start..self.rx_end];
            match self.dec.decode(input) {
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
        tracing::warn!(peer = %self.peer, fes = e.fes, fei = e.fei, "fatal transport error: {}", e.msg);
        let mut hdr = [0u8; 152];
        let h = self.dec.last_header();
        let n = h.len().min(hdr.len());
        hdr[..n].copy_from_slice(&h[..n]);
        self.push_pdu(&Pdu::C2hTermReq(TermReq {
            fes: e.fes,
            fei: e.fei,
            data_len: n as u32,
        }));
        self.push_bytes(&hdr[..n]);
        self.phase = Phase::Closing;
        self.close_deadline = Some(Instant::now() + Duration::from_secs(1));
        self.close = Some(CloseReason::Fatal(e));
    }

    fn on_pdu(&mut self, p: Pdu, ctx: &mut Ctx<'_>) {
        self.rx_target = RxTarget::None;
        match p {
            Pdu::IcReq(ic) => {
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
                self.push_pdu(&Pdu::IcResp(IcResp {
                    pfv: 0,
                    cpda: 0,
                    dgst,
                    maxh2cdata: ctx.params.max_h2c_data,
                }));
                let f = Framing {
                    hdgst: dgst & DGST_HDR != 0,
                    ddgst: dgst & DGST_DATA != 0,
                    pda: 0,
                };
                self.dec.set_framing(f);
                self.tx_framing = Framing { pda: ic.hpda, ..f };
                self.phase = Phase::AwaitConnect;
                tracing::debug!(peer = %self.peer, hdgst = f.hdgst, ddgst = f.ddgst, hpda = ic.hpda, "ICReq accepted");
            }
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

    fn on_h2c(&mut self, d: DataPdu) {
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
        let si = usize::from(slot);
        let s = &mut self.slots[si];
        if !digest_ok {
            tracing::warn!(peer = %self.peer, cid = s.cid, "data digest error");
            s.ddgst_err = true;
        }
        match s.state {
            SlotState::InCapsule => {
                if s.ddgst_err {
                    return self.complete(slot, Status::TRANSIENT_TRANSPORT_ERROR, 0);
                }
                self.dispatch(slot, ctx);
            }
            SlotState::AwaitH2c => {
                s.recvd = off;
                if s.recvd == s.len {
                    if s.ddgst_err {
                        return self.complete(slot, Status::TRANSIENT_TRANSPORT_ERROR, 0);
                    }
                    self.dispatch(slot, ctx);
                }
            }
            _ => {}
        }
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

    fn on_capsule(&mut self, sqe: Sqe, data_len: u32, ctx: &mut Ctx<'_>) {
        if self.sqsize > 0 {
            self.sqhd = (self.sqhd + 1) % self.sqsize;
        }
        if self.cid_test_set(sqe.cid) {
            // Respond without disturbing the command that owns the CID.
            self.rx_target = RxTarget::Discard;
            return self.respond_raw(sqe.cid, Status::CID_CONFLICT, 0);
        }
        let Some(slot) = self.free.pop() else {
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
        debug_assert!(s.buf.is_none());
        if self.phase != Phase::Ready && !is_connect(&sqe) {
            if data_len > 0 {
                self.rx_target = RxTarget::Discard;
            }
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
        }
        let dir = data_dir(&sqe);
        let sgl = sqe.sgl();
        if data_len > 0 {
            // In-capsule data: Data Block descriptor, Offset subtype, offset 0.
            if dir != Dir::H2c || sgl.sgl_type != sgl_type::DATA_BLOCK_OFFSET {
                self.rx_target = RxTarget::Discard;
                return self.complete(slot, Status::SGL_DESCRIPTOR_TYPE_INVALID, 0);
            }
            if sgl.addr != 0 {
                self.rx_target = RxTarget::Discard;
                return self.complete(slot, Status::SGL_OFFSET_INVALID, 0);
            }
            if sgl.length != data_len {
                self.rx_target = RxTarget::Discard;
                return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID, 0);
            }
            let s = &mut self.slots[usize::from(slot)];
            s.len = data_len;
            let buf = self.data_buf(&sqe, data_len as usize, ctx);
            let s = &mut self.slots[usize::from(slot)];
            s.buf = Some(buf);
            s.state = SlotState::InCapsule;
            self.rx_target = RxTarget::Slot { slot, off: 0 };
            return;
        }
        match dir {
            Dir::None => self.dispatch(slot, ctx),
            Dir::H2c | Dir::C2h => {
                if sgl.length == 0 {
                    return self.dispatch(slot, ctx);
                }
                if sgl.sgl_type != sgl_type::TRANSPORT_DATA_BLOCK {
                    return self.complete(slot, Status::SGL_DESCRIPTOR_TYPE_INVALID, 0);
                }
                if sgl.length > ctx.params.max_transfer {
                    return self.complete(slot, Status::INVALID_FIELD, 0);
                }
                let buf = self.data_buf(&sqe, sgl.length as usize, ctx);
                let s = &mut self.slots[usize::from(slot)];
                s.len = sgl.length;
                s.buf = Some(buf);
                if dir == Dir::C2h {
                    return self.dispatch(slot, ctx);
                }
                s.state = SlotState::AwaitH2c;
                let r2t = R2t {
                    cccid: s.cid,
                    ttag: slot,
                    r2to: 0,
                    r2tl: s.len,
                };
                self.push_pdu(&Pdu::R2t(r2t));
            }
        }
    }

    /// The data buffer of a command: from its namespace's queue when that
    /// queue has memory of its own for data (a VFIO SSD's IOMMU-mapped pool:
    /// the socket then reads write data, and the SSD writes read data,
    /// straight into memory the device reaches, with no copy), else from the
    /// reactor's pool.
    fn data_buf(&self, sqe: &Sqe, len: usize, ctx: &mut Ctx<'_>) -> IoBuf {
        if self.qid != 0 {
            let ns = self.subsys.as_deref().and_then(|s| s.namespace(sqe.nsid));
            if let Some(Some(q)) = ns.and_then(|ns| ctx.queues.get_mut(ns.gidx)) {
                if let Some(mut b) = q.alloc_buf(len) {
                    b.set_len(len);
                    return b;
                }
            }
        }
        ctx.pool.get(len)
    }

    /// Runs a command whose data (if any) has arrived.
    fn dispatch(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let sqe = self.slots[usize::from(slot)].sqe;
        if sqe.opc == fabrics::OPC_FABRICS {
            return self.fabrics(slot, ctx);
        }
        // Admin queue only: I/O queues exist only while the controller is
        // ready (Connect checks it, and a reset closes them), so the I/O path
        // takes no lock here.
        if self.qid == 0 {
            if let Some(ctrl) = &self.ctrl {
                let mut r = ctrl.regs();
                r.last_keep_alive = Instant::now();
                if r.csts & csts::RDY == 0 {
                    drop(r);
                    return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
                }
            }
        }
        if self.qid == 0 {
            self.admin(slot, ctx)
        } else {
            self.io(slot, ctx)
        }
    }

    fn fabrics(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let sqe = self.slots[usize::from(slot)].sqe;
        match sqe.fctype() {
            fctype::CONNECT => self.connect(slot, ctx),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.qid == 0 && self.ctrl.is_some() => {
                let p = PropertyCmd::from_sqe(&sqe);
                if sqe.fctype() == fctype::PROPERTY_GET {
                    match self.prop_get(p, ctx) {
                        Some(v) => self.complete64(slot, Status::SUCCESS, v),
                        None => self.complete(slot, Status::INVALID_FIELD, 0),
                    }
                } else {
                    let st = self.prop_set(p);
                    self.complete(slot, st, 0)
                }
            }
            fctype::DISCONNECT => {
                self.complete(slot, Status::SUCCESS, 0);
                self.phase = Phase::Closing;
                self.close_deadline = Some(Instant::now() + Duration::from_secs(1));
                self.close = Some(CloseReason::PeerClosed);
            }
            _ => self.complete(slot, Status::INVALID_OPCODE, 0),
        }
    }

    fn connect(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let s = &self.slots[usize::from(slot)];
        let c = ConnectCmd::from_sqe(&s.sqe);
        if self.phase != Phase::AwaitConnect {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
        }
        let Some(data) = s.buf.as_ref().and_then(|b| ConnectData::decode(b).ok()) else {
            return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID, 0);
        };
        // Invalid-parameter completions carry IATTR/IPO in dword 0.
        let invalid = |this: &mut Self, in_data: bool, ipo: u16| {
            let dw0 = u32::from(in_data) | (u32::from(ipo) << 16);
            this.complete(slot, Status::CONNECT_INVALID_PARAMETERS, dw0)
        };
        if c.recfmt != 0 {
            return self.complete(slot, Status::CONNECT_INCOMPATIBLE_FORMAT, 0);
        }
        let Some(subsys) = ctx.subsystems.by_nqn(&data.subnqn).cloned() else {
            tracing::info!(peer = %self.peer, subnqn = %data.subnqn, "connect to unknown subsystem");
            return invalid(self, true, 256);
        };
        if !subsys.host_allowed(&data.hostnqn) {
            tracing::info!(peer = %self.peer, hostnqn = %data.hostnqn, subnqn = %subsys.nqn, "host not allowed");
            return self.complete(slot, Status::CONNECT_INVALID_HOST, 0);
        }
        let max_q = ctx.params.max_queue_size;
        if c.sqsize == 0 || c.sqsize >= max_q || (c.qid == 0 && c.sqsize < 31) {
            return self.complete(slot, Status::INVALID_QUEUE_SIZE, 0);
        }
        if c.qid == 0 {
            if data.cntlid != fabrics::CNTLID_DYNAMIC {
                return invalid(self, true, 16);
            }
            let Some(ctrl) =
                subsys.create_ctrl(&data.hostnqn, data.hostid, c.kato, ctx.params.max_io_queues)
            else {
                return self.complete(slot, Status::CONNECT_CTRL_BUSY, 0);
            };
            tracing::info!(peer = %self.peer, cntlid = ctrl.cntlid, subnqn = %subsys.nqn, hostnqn = %data.hostnqn, kato_ms = c.kato, "admin queue connected");
            let cntlid = ctrl.cntlid;
            self.ctrl = Some(ctrl);
            self.dec.set_limits(Limits {
                max_incapsule: ADMIN_INCAPSULE,
                max_data: ctx.params.max_h2c_data,
            });
            self.finish_connect(c, subsys);
            self.complete(slot, Status::SUCCESS, u32::from(cntlid))
        } else {
            if subsys.is_discovery {
                return invalid(self, false, 42);
            }
            let Some(ctrl) = subsys.ctrl(data.cntlid) else {
                return invalid(self, true, 16);
            };
            if ctrl.hostnqn != data.hostnqn || ctrl.hostid != data.hostid {
                return invalid(self, true, 512);
            }
            {
                let mut r = ctrl.regs();
                if r.csts & csts::RDY == 0 || c.qid > r.io_queues {
                    drop(r);
                    return invalid(self, false, 42);
                }
                if r.connected_qids.contains(&c.qid) {
                    // As Linux nvmet: a queue ID still in use (its old
                    // connection may not be torn down yet) is a sequence
                    // error, which hosts retry.
                    drop(r);
                    return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
                }
                r.connected_qids.push(c.qid);
            }
            tracing::info!(peer = %self.peer, cntlid = ctrl.cntlid, qid = c.qid, sqsize = c.sqsize + 1, hdgst = self.tx_framing.hdgst, ddgst = self.tx_framing.ddgst, "I/O queue connected");
            self.epoch = ctrl.epoch.load(Ordering::Acquire);
            let cntlid = ctrl.cntlid;
            self.ctrl = Some(ctrl);
            self.dec.set_limits(Limits {
                max_incapsule: ctx.params.in_capsule,
                max_data: ctx.params.max_h2c_data,
            });
            self.finish_connect(c, subsys);
            self.complete(slot, Status::SUCCESS, u32::from(cntlid))
        }
    }

    fn finish_connect(&mut self, c: ConnectCmd, subsys: Arc<Subsystem>) {
        self.qid = c.qid;
        self.sqsize = c.sqsize + 1;
        self.sqflow_off = c.sqflow_disabled();
        self.subsys = Some(subsys);
        self.phase = Phase::Ready;
    }

    fn prop_get(&self, p: PropertyCmd, ctx: &Ctx<'_>) -> Option<u64> {
        let ctrl = self.ctrl.as_ref()?;
        let r = ctrl.regs();
        Some(match (p.ofst, p.size8) {
            (prop::CAP, true) => fabrics::cap_value(ctx.params.max_queue_size - 1, 20),
            (prop::VS, false) => u64::from(fabrics::NVME_VERSION_2_0),
            (prop::CC, false) => u64::from(r.cc),
            (prop::CSTS, false) => u64::from(r.csts),
            _ => return None,
        })
    }

    fn prop_set(&mut self, p: PropertyCmd) -> Status {
        let Some(ctrl) = self.ctrl.clone() else {
            return Status::INVALID_FIELD;
        };
        if p.ofst != prop::CC || p.size8 {
            return Status::INVALID_FIELD;
        }
        let new = p.value as u32;
        let mut r = ctrl.regs();
        let old = r.cc;
        r.cc = new;
        if new & cc::EN != 0 && old & cc::EN == 0 {
            r.csts = csts::RDY;
            tracing::debug!(cntlid = ctrl.cntlid, "controller enabled");
        } else if new & cc::EN == 0 && old & cc::EN != 0 {
            r.csts &= !csts::RDY;
            r.connected_qids.clear();
            ctrl.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!(cntlid = ctrl.cntlid, "controller reset");
        }
        if new & cc::SHN_MASK != 0 && old & cc::SHN_MASK == 0 {
            drop(r);
            for n in &ctrl.subsys.namespaces {
                if let Err(e) = n.bdev.flush_all() {
                    tracing::error!(nsid = n.nsid, "flush at shutdown notification failed: {e}");
                }
            }
            let mut r = ctrl.regs();
            r.csts = (r.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
            tracing::info!(cntlid = ctrl.cntlid, "shutdown notification processed");
        }
        Status::SUCCESS
    }

    fn admin(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let Some(ctrl) = self.ctrl.clone() else {
            return self.complete(slot, Status::COMMAND_SEQUENCE_ERROR, 0);
        };
        let sqe = self.slots[usize::from(slot)].sqe;
        let disc = ctrl.subsys.is_discovery;
        match sqe.opc {
            aopc::IDENTIFY => {
                let id = admin::Identify::from_cdws(sqe.cdw10, sqe.cdw11);
                let mut page = [0u8; admin::IDENTIFY_DATA_SIZE];
                let st = match id.cns {
                    admin::cns::CTRL => {
                        ctx.subsystems.identify_controller(&ctrl).encode(&mut page);
                        Status::SUCCESS
                    }
                    admin::cns::NS if !disc => match ctrl.subsys.namespace(sqe.nsid) {
                        Some(ns) => {
                            let own = Subsystems::identify_namespace(ns);
                            passthru::identify_namespace(ns, own).encode(&mut page);
                            Status::SUCCESS
                        }
                        // An inactive but valid NSID returns zeroes.
                        None if sqe.nsid != 0 && sqe.nsid != 0xFFFF_FFFF => Status::SUCCESS,
                        None => Status::INVALID_NS,
                    },
                    admin::cns::ACTIVE_NS_LIST if !disc => {
                        if sqe.nsid >= 0xFFFF_FFFE {
                            Status::INVALID_NS
                        } else {
                            let ids: Vec<u32> = ctrl
                                .subsys
                                .namespaces
                                .iter()
                                .map(|n| n.nsid)
                                .filter(|&n| n > sqe.nsid)
                                .collect();
                            admin::encode_ns_list(&ids, &mut page);
                            Status::SUCCESS
                        }
                    }
                    admin::cns::NS_DESC_LIST if !disc => match ctrl.subsys.namespace(sqe.nsid) {
                        Some(ns) => {
                            let d = passthru::ns_id_descs(ns);
                            match admin::encode_ns_id_descs(&d, &mut page) {
                                Ok(_) => Status::SUCCESS,
                                Err(_) => Status::INTERNAL,
                            }
                        }
                        None => Status::INVALID_NS,
                    },
                    _ => Status::INVALID_FIELD,
                };
                self.complete_with_data(slot, st, 0, &page);
            }
            aopc::GET_LOG_PAGE => {
                let g = admin::GetLogPage::from_cdws(sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13);
                let page: Vec<u8> = match g.lid {
                    admin::lid::DISCOVERY if disc => ctx.subsystems.discovery_log(&ctrl.hostnqn),
                    admin::lid::ERROR if !disc => vec![0u8; 64],
                    // The device's log for a pass-through namespace.
                    admin::lid::SMART if !disc => {
                        match passthru::smart_log(&ctrl.subsys.namespaces, sqe.nsid) {
                            Ok(p) => p,
                            Err(st) => return self.complete(slot, st, 0),
                        }
                    }
                    admin::lid::CHANGED_NS if !disc => vec![0u8; 4096],
                    admin::lid::FW_SLOT if !disc => {
                        let mut p = vec![0u8; 512];
                        p[0] = 1;
                        let fr = env!("CARGO_PKG_VERSION").as_bytes();
                        p[8..8 + fr.len().min(8)].copy_from_slice(&fr[..fr.len().min(8)]);
                        p
                    }
                    _ => return self.complete(slot, Status::INVALID_LOG_PAGE, 0),
                };
                if !g.lpo.is_multiple_of(4) || g.lpo > page.len() as u64 {
                    return self.complete(slot, Status::INVALID_FIELD, 0);
                }
                let start = g.lpo as usize;
                let want = g.len_bytes().min((page.len() - start) as u64) as usize;
                self.complete_with_data(slot, Status::SUCCESS, 0, &page[start..start + want]);
            }
            aopc::SET_FEATURES | aopc::GET_FEATURES => {
                let set = sqe.opc == aopc::SET_FEATURES;
                let fid = sqe.cdw10 as u8;
                let sel = ((sqe.cdw10 >> 8) & 0x7) as u8;
                if set && sqe.cdw10 & (1 << 31) != 0 {
                    return self.complete(slot, Status::FEATURE_NOT_SAVEABLE, 0);
                }
                let mut r = ctrl.regs();
                let (st, dw0) = match fid {
                    admin::fid::NUM_QUEUES if !disc => {
                        let max = u32::from(ctx.params.max_io_queues);
                        if set {
                            let q = admin::NumberOfQueues::from_dword(sqe.cdw11);
                            if q.nsqr == 0xFFFF || q.ncqr == 0xFFFF {
                                (Status::INVALID_FIELD, 0)
                            } else if r.connected_qids.is_empty() {
                                let n = q.sq_count().min(q.cq_count()).min(max);
                                r.io_queues = n as u16;
                                (
                                    Status::SUCCESS,
                                    admin::NumberOfQueues::from_counts(n, n).to_dword(),
                                )
                            } else {
                                (Status::COMMAND_SEQUENCE_ERROR, 0)
                            }
                        } else {
                            let n = if sel == admin::sel::DEFAULT {
                                max
                            } else {
                                u32::from(r.io_queues)
                            };
                            (
                                Status::SUCCESS,
                                admin::NumberOfQueues::from_counts(n, n).to_dword(),
                            )
                        }
                    }
                    admin::fid::KEEP_ALIVE_TIMER => {
                        if set {
                            r.kato_ms = sqe.cdw11;
                            r.last_keep_alive = Instant::now();
                            (Status::SUCCESS, 0)
                        } else {
                            (Status::SUCCESS, r.kato_ms)
                        }
                    }
                    admin::fid::ASYNC_EVENT_CONFIG => {
                        if set {
                            r.aec = sqe.cdw11;
                            (Status::SUCCESS, 0)
                        } else {
                            (Status::SUCCESS, r.aec)
                        }
                    }
                    admin::fid::VOLATILE_WC if !disc => {
                        if set {
                            r.wce = sqe.cdw11 & 1 != 0;
                            (Status::SUCCESS, 0)
                        } else {
                            (Status::SUCCESS, u32::from(r.wce))
                        }
                    }
                    admin::fid::ARBITRATION
                    | admin::fid::POWER_MGMT
                    | admin::fid::ERR_RECOVERY
                    | admin::fid::WRITE_ATOMIC
                        if !disc =>
                    {
                        if set {
                            (Status::FEATURE_NOT_CHANGEABLE, 0)
                        } else {
                            (Status::SUCCESS, 0)
                        }
                    }
                    admin::fid::TEMP_THRESH if !disc && !set => (Status::SUCCESS, 343),
                    _ => (Status::INVALID_FIELD, 0),
                };
                drop(r);
                self.complete(slot, st, dw0);
            }
            aopc::KEEP_ALIVE => self.complete(slot, Status::SUCCESS, 0),
            aopc::ASYNC_EVENT_REQUEST => {
                if self.aer_slots.len() >= MAX_AER {
                    return self.complete(slot, Status::AER_LIMIT_EXCEEDED, 0);
                }
                self.slots[usize::from(slot)].state = SlotState::Held;
                self.aer_slots.push(slot);
            }
            aopc::ABORT => {
                // Bit 0 of dword 0 set: the command was not aborted (allowed by the spec).
                self.complete(slot, Status::SUCCESS, 1)
            }
            _ => self.complete(slot, Status::INVALID_OPCODE, 0),
        }
    }

    fn io(&mut self, slot: u16, ctx: &mut Ctx<'_>) {
        let si = usize::from(slot);
        let prepared = match self.subsys.as_deref() {
            Some(subsys) => {
                let s = &self.slots[si];
                prepare_io(subsys, &s.sqe, s.len, s.buf.as_ref())
            }
            None => Err(Status::COMMAND_SEQUENCE_ERROR),
        };
        let (gidx, op) = match prepared {
            Ok(Some(x)) => x,
            Ok(None) => return self.complete(slot, Status::SUCCESS, 0),
            Err(st) => return self.complete(slot, st, 0),
        };
        if ctx.queues[gidx].is_none() {
            let (sidx, nsid) = ctx.subsystems.all_namespaces[gidx];
            let opened = match ctx.subsystems.list[sidx].namespace(nsid) {
                Some(ns) => ns.bdev.open_queue().map_err(|e| e.to_string()),
                None => Err("namespace vanished".to_string()),
            };
            match opened {
                Ok(q) => ctx.queues[gidx] = Some(q),
                Err(e) => {
                    tracing::error!(nsid, "cannot open a bdev queue: {e}");
                    return self.complete(slot, Status::NS_NOT_READY, 0);
                }
            }
        }
        let buf = match op {
            IoOp::Read { .. } | IoOp::Write { .. } | IoOp::Compare { .. } => {
                self.slots[si].buf.take()
            }
            _ => None,
        };
        let req = IoRequest {
            tag: make_tag(ctx.conn_idx, ctx.conn_gen, slot),
            op,
            buf,
            more: Vec::new(),
        };
        self.slots[si].state = SlotState::Executing;
        self.outstanding_io += 1;
        let q = ctx.queues[gidx].as_mut().expect("queue opened above");
        if let Err(SubmitError::Busy(req)) = q.submit(req) {
            ctx.busy.push_back((gidx, req));
        }
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
            Err(e) => io_status(&e),
        };
        if st.is_success() && self.slots[si].sqe.opc == io_opc::READ {
            self.send_c2h(slot, Status::SUCCESS, 0);
        } else {
            self.complete(slot, st, 0);
        }
    }

    /// Completes a command that returns `data` (admin reads).
    fn complete_with_data(&mut self, slot: u16, st: Status, dw0: u32, data: &[u8]) {
        let si = usize::from(slot);
        let len = self.slots[si].len as usize;
        if !st.is_success() || len == 0 {
            return self.complete(slot, st, dw0);
        }
        let n = len.min(data.len());
        if let Some(buf) = self.slots[si].buf.as_mut() {
            buf[..n].copy_from_slice(&data[..n]);
            buf[n..len].fill(0);
        }
        self.send_c2h(slot, st, dw0);
    }

    /// Queues C2HData with the slot's whole buffer and the response.
    fn send_c2h(&mut self, slot: u16, st: Status, dw0: u32) {
        let si = usize::from(slot);
        let len = self.slots[si].len;
        let cid = self.slots[si].cid;
        let success = self.sqflow_off && st.is_success() && dw0 == 0;
        self.push_pdu(&Pdu::C2hData(DataPdu {
            cccid: cid,
            ttag: 0,
            datao: 0,
            datal: len,
            last: true,
            success,
        }));
        self.tx_segs.push_back(Seg::Data {
            slot,
            off: 0,
            len: len as usize,
        });
        if self.tx_framing.ddgst {
            let d = match self.slots[si].buf.as_ref() {
                Some(b) => pdu::digest(&[&b[..len as usize]]),
                None => [0; 4],
            };
            self.push_bytes(&d);
        }
        if !success {
            self.push_resp(cid, st, dw0, 0);
        }
        self.cid_clear(cid);
        self.slots[si].state = SlotState::Sending;
        self.tx_segs.push_back(Seg::Free(slot));
    }

    fn complete(&mut self, slot: u16, st: Status, dw0: u32) {
        let si = usize::from(slot);
        let cid = self.slots[si].cid;
        self.push_resp(cid, st, dw0, 0);
        self.cid_clear(cid);
        self.slots[si].state = SlotState::Sending;
        self.tx_segs.push_back(Seg::Free(slot));
    }

    fn complete64(&mut self, slot: u16, st: Status, v: u64) {
        let cid = self.slots[usize::from(slot)].cid;
        self.push_resp(cid, st, v as u32, (v >> 32) as u32);
        self.cid_clear(cid);
        self.slots[usize::from(slot)].state = SlotState::Sending;
        self.tx_segs.push_back(Seg::Free(slot));
    }

    fn respond_raw(&mut self, cid: u16, st: Status, dw0: u32) {
        self.push_resp(cid, st, dw0, 0);
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
    }

    fn push_resp(&mut self, cid: u16, st: Status, dw0: u32, dw1: u32) {
        let cqe = Cqe {
            dw0,
            dw1,
            sqhd: self.sqhd,
            sqid: self.qid,
            cid,
            status: st.to_field(),
        };
        self.push_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }));
    }

    fn push_pdu(&mut self, p: &Pdu) {
        let mut h = [0u8; MAX_HEADER];
        let n = pdu::encode_header(p, &self.tx_framing, &mut h);
        self.push_bytes(&h[..n]);
    }

    fn push_bytes(&mut self, b: &[u8]) {
        let start = self.tx_hdr.len();
        self.tx_hdr.extend_from_slice(b);
        if let Some(Seg::Hdr { start: s, len }) = self.tx_segs.back_mut() {
            if *s + *len == start {
                *len += b.len();
                return;
            }
        }
        self.tx_segs.push_back(Seg::Hdr {
            start,
            len: b.len(),
        });
    }

    /// Writes as much of the send queue as the socket takes, in vectored
    /// writes. Returns Ok(true) when everything went out.
    pub fn flush(&mut self, pool: &mut BufPool) -> io::Result<bool> {
        loop {
            while let Some(Seg::Free(slot)) = self.tx_segs.front() {
                let slot = *slot;
                self.tx_segs.pop_front();
                self.free_slot(slot, pool);
            }
            if self.tx_segs.is_empty() {
                self.tx_hdr.clear();
                self.tx_off = 0;
                return Ok(true);
            }
            let mut iov = [IoSlice::new(&[]); 64];
            let mut n = 0;
            let mut first = true;
            for seg in self.tx_segs.iter() {
                if n == iov.len() {
                    break;
                }
                let skip = if first { self.tx_off } else { 0 };
                let bytes: &[u8] = match *seg {
                    Seg::Hdr { start, len } => &self.tx_hdr[start + skip..start + len],
                    Seg::Data { slot, off, len } => {
                        match self.slots[usize::from(slot)].buf.as_ref() {
                            Some(b) => &b[off + skip..off + len],
                            None => &[],
                        }
                    }
                    Seg::Free(_) => continue,
                };
                first = false;
                iov[n] = IoSlice::new(bytes);
                n += 1;
            }
            match self.stream.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut w) => {
                    while w > 0 {
                        let Some(seg) = self.tx_segs.front() else {
                            break;
                        };
                        let len = match *seg {
                            Seg::Hdr { len, .. } | Seg::Data { len, .. } => len,
                            Seg::Free(slot) => {
                                self.tx_segs.pop_front();
                                self.free_slot(slot, pool);
                                continue;
                            }
                        };
                        let left = len - self.tx_off;
                        if w >= left {
                            w -= left;
                            self.tx_off = 0;
                            self.tx_segs.pop_front();
                        } else {
                            self.tx_off += w;
                            w = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Releases buffers at close.
    pub fn release(&mut self, pool: &mut BufPool) {
        for s in &mut self.slots {
            if let Some(b) = s.buf.take() {
                pool.put(b);
            }
        }
        if let Some(ctrl) = &self.ctrl {
            if self.qid == 0 {
                ctrl.destroy();
            } else {
                ctrl.regs().connected_qids.retain(|&q| q != self.qid);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    None,
    H2c,
    C2h,
}

fn is_connect(sqe: &Sqe) -> bool {
    sqe.opc == fabrics::OPC_FABRICS && sqe.fctype() == fctype::CONNECT
}

/// Data direction from the opcode (bits 1:0) or the Fabrics command type.
fn data_dir(sqe: &Sqe) -> Dir {
    if sqe.opc == fabrics::OPC_FABRICS {
        return match sqe.fctype() {
            fctype::CONNECT | fctype::AUTH_SEND => Dir::H2c,
            fctype::AUTH_RECV => Dir::C2h,
            _ => Dir::None,
        };
    }
    match sqe.opc & 0x3 {
        1 => Dir::H2c,
        2 => Dir::C2h,
        _ => Dir::None,
    }
}

/// Validates an NVM I/O command against its namespace and builds the bdev
/// operation: `Ok(None)` means "complete successfully without I/O" (hints).
fn prepare_io(
    subsys: &Subsystem,
    sqe: &Sqe,
    len: u32,
    buf: Option<&IoBuf>,
) -> Result<Option<(usize, IoOp)>, Status> {
    let ns = subsys.namespace(sqe.nsid).ok_or(Status::INVALID_NS)?;
    let info = ns.bdev.info();
    let range = |lba: u64, nlb: u32| {
        info.check_range(lba, nlb)
            .map_err(|_| Status::LBA_OUT_OF_RANGE)
    };
    let op = match sqe.opc {
        io_opc::READ | io_opc::WRITE | io_opc::COMPARE => {
            let (lba, nlb) = (sqe.slba(), sqe.nlb());
            range(lba, nlb)?;
            if u64::from(nlb) * u64::from(info.block_size) != u64::from(len) {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            match sqe.opc {
                io_opc::READ => IoOp::Read { lba, nlb },
                io_opc::WRITE => IoOp::Write {
                    lba,
                    nlb,
                    fua: sqe.fua(),
                },
                _ => IoOp::Compare { lba, nlb },
            }
        }
        io_opc::FLUSH => IoOp::Flush,
        io_opc::WRITE_ZEROES => {
            let (lba, nlb) = (sqe.slba(), sqe.nlb());
            range(lba, nlb)?;
            IoOp::WriteZeroes {
                lba,
                nlb,
                deallocate: sqe.cdw12 & (1 << 25) != 0,
                fua: sqe.fua(),
            }
        }
        io_opc::DSM => {
            let nr = (sqe.cdw10 & 0xff) as usize + 1;
            let buf = buf
                .filter(|_| len as usize >= nr * 16)
                .ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
            let mut ranges = Vec::with_capacity(nr);
            for r in buf[..nr * 16].chunks_exact(16) {
                let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
                let lba =
                    u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                if nlb > 0 {
                    range(lba, nlb)?;
                    ranges.push(LbaRange { lba, nlb });
                }
            }
            // Only the Deallocate attribute (AD) has an effect; the rest are hints.
            if sqe.cdw11 & (1 << 2) == 0 || !info.deallocate || ranges.is_empty() {
                return Ok(None);
            }
            IoOp::Deallocate { ranges }
        }
        _ => return Err(Status::INVALID_OPCODE),
    };
    Ok(Some((ns.gidx, op)))
}

/// Maps a bdev outcome to the NVMe status.
fn io_status(e: &IoError) -> Status {
    if let IoError::Media(m) = e {
        tracing::error!("backend I/O error: {m}");
    }
    unvme_bdev::status::to_nvme(e)
}
