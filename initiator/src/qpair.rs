//! The queue-pair engine: one NVMe/TCP connection, its command slots, its
//! receive path and its send queue. The admin queue and every I/O queue run
//! on it.
//!
//! Receive: bytes are read from the non-blocking socket into a staging
//! buffer and fed to the [`PduDecoder`]; when the decoder is inside a
//! C2HData PDU and the staging buffer is empty, the socket is read with
//! `readv` straight into the command's buffer at the PDU's offset (and the
//! staging buffer for whatever follows), so read data is not copied.
//!
//! Send: PDUs are queued as header items (inline bytes), data items
//! (references to a slot's buffer) and digest items, and flushed with
//! `writev`. A slot whose data is still queued keeps its buffer until the
//! data is on the wire, even if its response already arrived.
//!
//! Slots are preallocated, one per queue entry, CID = slot index; a
//! free-list hands them out. Nothing here allocates in steady state.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tracing::{debug, trace, warn};
use unvme_bdev::{IoBuf, IoCompletion, IoError};
use unvme_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{
    self, digest, encode_header, CapsuleCmd, DataPdu, Event, FatalError, Framing, IcReq, IcResp,
    Limits, Pdu, PduDecoder, Role, TermReq, DGST_DATA, DGST_HDR, MAX_HEADER,
};

use crate::wire::h2c_chunks;
use crate::{ConnectOptions, Error, Result};

pub use unvme_proto::nvme::DataDir;

/// A finished command with everything the controller said about it.
#[derive(Debug)]
pub struct NvmeCompletion {
    /// The caller's tag.
    pub tag: u64,
    /// The completion queue entry; `None` when the command ended without
    /// one (timeout, data digest error after SUCCESS, closed connection).
    /// For a C2HData with the SUCCESS flag it is synthesised (status 0).
    pub cqe: Option<Cqe>,
    /// The outcome as the block layer sees it.
    pub result: std::result::Result<(), IoError>,
    /// The data buffer, handed back.
    pub buf: Option<IoBuf>,
    /// The request's further data segments ([`unvme_bdev::IoRequest::more`]),
    /// handed back with `buf` so a failed request can be submitted again as
    /// it was.
    pub more: Vec<IoBuf>,
    /// True when the command ended because its connection did, without an
    /// answer from the controller: it may or may not have been executed, and
    /// submitting it again (elsewhere) is how a block request survives it.
    pub lost: bool,
}

impl NvmeCompletion {
    /// The NVMe status, if the controller completed the command.
    pub fn status(&self) -> Option<Status> {
        self.cqe.map(|c| c.status())
    }

    /// The block layer's view of this completion.
    pub fn into_io_completion(self) -> IoCompletion {
        IoCompletion {
            tag: self.tag,
            result: self.result,
            buf: self.buf,
        }
    }

    fn ended(tag: u64, result: std::result::Result<(), IoError>, buf: Option<IoBuf>) -> Self {
        NvmeCompletion {
            tag,
            cqe: None,
            result,
            buf,
            more: Vec::new(),
            lost: false,
        }
    }
}

/// [`crate::IoQpair::submit_raw`] found no free slot; the command is handed back.
#[derive(Debug)]
pub struct RawBusy {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// Its data buffer.
    pub data: Option<IoBuf>,
}

/// What the ICResp settled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Negotiated {
    /// Framing of the PDUs we receive (our HPDA is 0).
    #[allow(dead_code)]
    pub rx: Framing,
    /// Framing of the PDUs we send (the controller's CPDA).
    pub tx: Framing,
    /// MAXH2CDATA.
    pub maxh2cdata: u32,
}

/// Opens a TCP connection to the target with TCP_NODELAY.
pub(crate) fn connect_socket(opts: &ConnectOptions) -> Result<TcpStream> {
    let name = format!("{}:{}", opts.addr, opts.port);
    let addrs = (opts.addr.as_str(), opts.port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            addr: name.clone(),
            source,
        })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, opts.connect_timeout) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|source| Error::Io {
                    what: "setting TCP_NODELAY",
                    source,
                })?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(Error::Connect {
        addr: name,
        source: last,
    })
}

/// Runs the connection initialization (ICReq/ICResp, NVMe/TCP 1.0 §3.3.1)
/// on a blocking socket.
pub(crate) fn initialize_connection(
    s: &mut TcpStream,
    opts: &ConnectOptions,
) -> Result<(Negotiated, PduDecoder)> {
    let io_err = |what| move |source| Error::Io { what, source };
    s.set_read_timeout(Some(opts.connect_timeout))
        .map_err(io_err("setting a read timeout"))?;
    let dgst =
        if opts.hdr_digest { DGST_HDR } else { 0 } | if opts.data_digest { DGST_DATA } else { 0 };
    let req = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 0,
        dgst,
        maxr2t: 0,
    });
    let mut hdr = [0u8; MAX_HEADER];
    let n = encode_header(&req, &Framing::default(), &mut hdr);
    s.write_all(&hdr[..n]).map_err(io_err("sending ICReq"))?;
    let mut dec = PduDecoder::new(
        Role::Host,
        Limits {
            max_incapsule: 0,
            max_data: u32::MAX,
        },
    );
    let resp = read_icresp(s, &mut dec)?;
    check_icresp(&resp)?;
    let hdgst = resp.dgst & DGST_HDR != 0;
    let ddgst = resp.dgst & DGST_DATA != 0;
    if (hdgst && !opts.hdr_digest) || (ddgst && !opts.data_digest) {
        debug!(
            dgst = resp.dgst,
            "controller enabled a digest we did not ask for"
        );
    }
    s.set_read_timeout(None)
        .map_err(io_err("clearing the read timeout"))?;
    s.set_nonblocking(true)
        .map_err(io_err("making the socket non-blocking"))?;
    let rx = Framing {
        hdgst,
        ddgst,
        pda: 0,
    };
    dec.set_framing(rx);
    let neg = Negotiated {
        rx,
        tx: Framing {
            hdgst,
            ddgst,
            pda: resp.cpda,
        },
        maxh2cdata: resp.maxh2cdata,
    };
    Ok((neg, dec))
}

/// Reads the controller's ICResp (or its termination request).
fn read_icresp(s: &mut TcpStream, dec: &mut PduDecoder) -> Result<IcResp> {
    let mut buf = [0u8; pdu::IC_LEN];
    Ok('outer: loop {
        // The controller sends nothing after the ICResp until we send a
        // command, so reading up to its size cannot take later bytes.
        let got = match s.read(&mut buf) {
            Ok(0) => return Err(Error::Handshake("connection closed before ICResp".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Handshake("no ICResp in time".into()))
            }
            Err(e) => {
                return Err(Error::Io {
                    what: "reading ICResp",
                    source: e,
                })
            }
        };
        let mut off = 0;
        while off < got {
            let (used, ev) = dec.decode(&buf[off..got]).map_err(Error::Protocol)?;
            off += used;
            match ev {
                Some(Event::Pdu(Pdu::IcResp(r))) => break 'outer r,
                Some(Event::Pdu(Pdu::C2hTermReq(t))) => {
                    return Err(Error::Terminated {
                        fes: t.fes,
                        fei: t.fei,
                    })
                }
                Some(_) => return Err(Error::Handshake("unexpected PDU before ICResp".into())),
                None if used == 0 => break,
                None => {}
            }
        }
    })
}

/// Checks the ICResp fields the host depends on (NVMe/TCP 1.0 §3.6.2.3).
fn check_icresp(resp: &IcResp) -> Result<()> {
    if resp.pfv != 0 {
        return Err(Error::Handshake(format!("unsupported PFV {}", resp.pfv)));
    }
    if resp.maxh2cdata < 4096 || !resp.maxh2cdata.is_multiple_of(4) {
        return Err(Error::Handshake(format!(
            "invalid MAXH2CDATA {}",
            resp.maxh2cdata
        )));
    }
    if resp.cpda > 31 {
        return Err(Error::Handshake(format!("invalid CPDA {}", resp.cpda)));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Submitted, waiting for the controller.
    Active,
    /// Completed towards the caller (timeout) but the controller may still
    /// answer; the CID is not reused until it does.
    Abandoned,
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    tag: u64,
    dir: DataDir,
    len: u32,
    /// The caller's buffer.
    buf: Option<IoBuf>,
    /// The caller's further data segments, after `buf`
    /// ([`unvme_bdev::IoRequest::more`]); dropped when the command ends.
    more: Vec<IoBuf>,
    /// The slot's own buffer (Dataset Management range list), kept across uses.
    aux: Option<IoBuf>,
    use_aux: bool,
    /// C2H bytes received so far (C2HData must arrive in order, so this is
    /// also where the next PDU must start).
    received: u32,
    /// H2C bytes the controller asked for so far with R2Ts (the command's
    /// length for in-capsule writes, which take no R2T).
    requested: u32,
    ddgst_err: bool,
    /// Data items of this slot still in the send queue.
    tx_refs: u32,
    /// A completion that waits for `tx_refs` to drop to zero.
    deferred: Option<(Option<Cqe>, std::result::Result<(), IoError>)>,
    deadline: Instant,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Slot {
            state: SlotState::Free,
            tag: 0,
            dir: DataDir::None,
            len: 0,
            buf: None,
            more: Vec::new(),
            aux: None,
            use_aux: false,
            received: 0,
            requested: 0,
            ddgst_err: false,
            tx_refs: 0,
            deferred: None,
            deadline: now,
        }
    }

    /// Number of data segments: the buffer (or `aux`), then `more`.
    fn nsegs(&self) -> usize {
        1 + self.more.len()
    }

    /// Data segment `i` (whole; the command's data is the segments back to
    /// back, its first `len` bytes).
    fn seg(&self, i: usize) -> &[u8] {
        if i == 0 {
            let b = if self.use_aux { &self.aux } else { &self.buf };
            b.as_deref().unwrap_or(&[])
        } else {
            self.more.get(i - 1).map_or(&[], |b| &b[..])
        }
    }

    fn seg_mut(&mut self, i: usize) -> &mut [u8] {
        if i == 0 {
            let b = if self.use_aux {
                &mut self.aux
            } else {
                &mut self.buf
            };
            b.as_deref_mut().unwrap_or(&mut [])
        } else {
            self.more.get_mut(i - 1).map_or(&mut [], |b| &mut b[..])
        }
    }

    /// Bytes the segments hold together.
    fn capacity(&self) -> usize {
        (0..self.nsegs()).map(|i| self.seg(i).len()).sum()
    }

    /// The segment holding data byte `off`, and the offset inside it.
    fn locate(&self, mut off: usize) -> Option<(usize, usize)> {
        for i in 0..self.nsegs() {
            let n = self.seg(i).len();
            if off < n {
                return Some((i, off));
            }
            off -= n;
        }
        None
    }

    /// `len` bytes of data from `off` as (segment, offset, length) pieces,
    /// passed to `f` in order.
    fn pieces(&self, off: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        let Some((mut i, mut so)) = self.locate(off) else {
            return;
        };
        let mut left = len;
        while left > 0 && i < self.nsegs() {
            let n = (self.seg(i).len() - so).min(left);
            if n > 0 {
                f(i, so, n);
            }
            left -= n;
            i += 1;
            so = 0;
        }
    }

    /// Lets go of the caller's buffers (the command is over for them).
    fn drop_data(&mut self) {
        self.buf = None;
        self.more.clear();
    }
}

/// One piece of the send queue. Headers are kept inline (no allocation per
/// PDU), which makes the variants unequal in size on purpose.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum TxKind {
    Header {
        b: [u8; MAX_HEADER],
        len: u16,
    },
    /// `len` bytes of data segment `seg` of `slot`, from `off` inside it.
    Data {
        slot: u16,
        seg: u16,
        off: u32,
        len: u32,
    },
    Digest([u8; 4]),
}

#[derive(Debug)]
struct TxItem {
    kind: TxKind,
    sent: usize,
}

/// Where the data of the PDU being received goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxTarget {
    None,
    Discard,
    C2h { slot: u16, off: u32, success: bool },
}

enum RxFail {
    Closed,
    Io(io::Error),
    Fatal(FatalError),
    Terminated(TermReq),
}

/// Everything but the socket and the receive buffer, so a decoded event that
/// borrows the receive buffer can be handled while this is mutated.
#[derive(Debug)]
struct Core {
    qid: u16,
    tx_framing: Framing,
    maxh2cdata: u32,
    incapsule_max: u32,
    timeout: Duration,
    slots: Vec<Slot>,
    free: Vec<u16>,
    tx: VecDeque<TxItem>,
    done: Vec<NvmeCompletion>,
    outstanding: usize,
    rx_target: RxTarget,
    /// Report commands past their deadline in `expired` instead of ending
    /// them with a timeout ([`QueuePair::set_report_timeouts`]).
    report_timeouts: bool,
    /// CIDs past their deadline, still outstanding, not yet taken.
    expired: Vec<u16>,
}

/// One NVMe/TCP queue pair; see the module documentation.
#[derive(Debug)]
pub(crate) struct QueuePair {
    stream: TcpStream,
    dec: PduDecoder,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    core: Core,
    closed: bool,
    /// Closed by [`QueuePair::reset`]: never shut down with a FIN.
    aborted: bool,
    next_timeout_check: Instant,
}

/// Staging buffer for received bytes.
const RBUF_SIZE: usize = 64 * 1024;
/// Socket reads per [`QueuePair::progress`] (each up to [`RBUF_SIZE`], or a
/// C2HData's data straight into its buffer), so a controller that floods the
/// connection cannot starve sending and deadline checks.
const RX_READS_PER_PROGRESS: usize = 32;
/// How often outstanding commands are checked for their deadline.
const TIMEOUT_TICK: Duration = Duration::from_millis(1);

impl QueuePair {
    /// A queue pair on an initialized, non-blocking connection. `qsize` is
    /// the queue's entry count (SQSIZE + 1); `qsize - 1` commands may be
    /// outstanding. Writes of up to `incapsule_max` bytes go in the capsule.
    pub(crate) fn new(
        stream: TcpStream,
        neg: Negotiated,
        dec: PduDecoder,
        qid: u16,
        qsize: u16,
        incapsule_max: u32,
        timeout: Duration,
    ) -> Self {
        let nslots = usize::from(qsize.max(2) - 1);
        let now = Instant::now();
        QueuePair {
            stream,
            dec,
            rbuf: vec![0u8; RBUF_SIZE].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            core: Core {
                qid,
                tx_framing: neg.tx,
                maxh2cdata: neg.maxh2cdata,
                incapsule_max,
                timeout,
                slots: (0..nslots).map(|_| Slot::new(now)).collect(),
                free: (0..nslots as u16).rev().collect(),
                tx: VecDeque::with_capacity(nslots * 4),
                done: Vec::with_capacity(nslots * 2),
                outstanding: 0,
                rx_target: RxTarget::None,
                report_timeouts: false,
                expired: Vec::new(),
            },
            closed: false,
            aborted: false,
            next_timeout_check: now,
        }
    }

    /// The socket (for shutdown from another thread via a clone).
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Queue ID.
    pub(crate) fn qid(&self) -> u16 {
        self.core.qid
    }

    /// Commands submitted and not yet handed back.
    pub(crate) fn outstanding(&self) -> usize {
        self.core.outstanding + self.core.done.len()
    }

    /// Commands that may be outstanding at once.
    pub(crate) fn depth(&self) -> usize {
        self.core.slots.len()
    }

    /// True once the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sets the most in-capsule data bytes for later writes.
    pub(crate) fn set_incapsule_max(&mut self, n: u32) {
        self.core.incapsule_max = n;
    }

    /// Takes a free slot, or `None` if all are in use.
    pub(crate) fn alloc_slot(&mut self) -> Option<u16> {
        self.core.free.pop()
    }

    /// The slot's own auxiliary buffer of at least `len` bytes (allocated
    /// on first use, then kept).
    pub(crate) fn aux_buf(&mut self, slot: u16, len: usize) -> &mut [u8] {
        let s = &mut self.core.slots[usize::from(slot)];
        if s.aux.as_ref().is_none_or(|b| b.capacity() < len) {
            s.aux = Some(IoBuf::new(len.max(4096)));
        }
        let b = s.aux.as_mut().expect("allocated just above");
        b.set_len(len);
        &mut b[..]
    }

    /// Gives the command about to start in `slot` further data segments
    /// after its buffer (call before [`QueuePair::start`]).
    pub(crate) fn set_more(&mut self, slot: u16, more: Vec<IoBuf>) {
        self.core.slots[usize::from(slot)].more = more;
    }

    /// Starts a command in slot `slot` (from [`QueuePair::alloc_slot`]).
    /// `use_aux` sends the slot's auxiliary buffer instead of `buf`;
    /// `force_incapsule` sends write data in the capsule whatever its size
    /// (Fabrics Connect).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &mut self,
        slot: u16,
        mut sqe: Sqe,
        buf: Option<IoBuf>,
        use_aux: bool,
        dir: DataDir,
        len: u32,
        tag: u64,
        force_incapsule: bool,
    ) {
        let core = &mut self.core;
        let now = Instant::now();
        let incapsule = dir == DataDir::HostToController
            && len > 0
            && (force_incapsule || len <= core.incapsule_max);
        {
            let s = &mut core.slots[usize::from(slot)];
            s.state = SlotState::Active;
            s.tag = tag;
            s.dir = dir;
            s.len = len;
            s.buf = buf;
            s.use_aux = use_aux;
            s.received = 0;
            s.requested = if incapsule { len } else { 0 };
            s.ddgst_err = false;
            s.tx_refs = 0;
            s.deferred = None;
            s.deadline = now + core.timeout;
        }
        core.outstanding += 1;
        if self.closed {
            core.complete_as(slot, None, Err(IoError::Unavailable), true);
            return;
        }
        sqe.cid = slot;
        let sgl = if incapsule {
            SglDescriptor::in_capsule(0, len)
        } else {
            SglDescriptor::transport(if dir == DataDir::None { 0 } else { len })
        };
        sqe.set_sgl(sgl);
        let data_len = if incapsule { len } else { 0 };
        core.push_header(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len }));
        if incapsule {
            core.push_data(slot, 0, len);
        }
        trace!(qid = core.qid, cid = slot, opc = sqe.opc, len, "submitted");
    }

    /// Reads and handles everything available, sends what is queued, and
    /// checks deadlines. Never blocks.
    pub(crate) fn progress(&mut self) {
        if self.closed {
            return;
        }
        match self.recv() {
            Ok(()) => {}
            Err(RxFail::Closed) => {
                warn!(qid = self.core.qid, "controller closed the connection");
                self.fail_all();
            }
            Err(RxFail::Io(e)) => {
                warn!(qid = self.core.qid, error = %e, "socket receive error");
                self.fail_all();
            }
            Err(RxFail::Terminated(t)) => {
                warn!(
                    qid = self.core.qid,
                    fes = t.fes,
                    fei = t.fei,
                    "controller sent C2HTermReq"
                );
                self.fail_all();
            }
            Err(RxFail::Fatal(f)) => {
                warn!(qid = self.core.qid, error = %f, "protocol error; sending H2CTermReq");
                self.send_term_req(&f);
                self.fail_all();
            }
        }
        if !self.closed {
            if let Err(e) = self.flush() {
                warn!(qid = self.core.qid, error = %e, "socket send error");
                self.fail_all();
            }
        }
        if self.core.outstanding > 0 {
            let now = Instant::now();
            if now >= self.next_timeout_check {
                self.next_timeout_check = now + TIMEOUT_TICK;
                if self.core.check_timeouts(now) && !self.closed {
                    warn!(
                        qid = self.core.qid,
                        "controller stopped reading its connection; closing it"
                    );
                    let _ = self.stream.shutdown(Shutdown::Both);
                    self.core.drop_tx_and_expire(now);
                    self.fail_all();
                }
            }
        }
    }

    /// Hands finished commands to `f`; returns how many.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(NvmeCompletion)) -> usize {
        let n = self.core.done.len();
        for c in self.core.done.drain(..) {
            f(c);
        }
        n
    }

    /// Removes and returns the finished command with `tag`, if any.
    pub(crate) fn take_done(&mut self, tag: u64) -> Option<NvmeCompletion> {
        let i = self.core.done.iter().position(|c| c.tag == tag)?;
        Some(self.core.done.remove(i))
    }

    /// Blocks (polling the socket) until the command with `tag` finishes.
    /// The slot deadline bounds the wait; `limit` is a backstop.
    pub(crate) fn wait_for(&mut self, tag: u64, limit: Duration) -> NvmeCompletion {
        let end = Instant::now() + limit;
        loop {
            self.progress();
            if let Some(c) = self.take_done(tag) {
                return c;
            }
            if Instant::now() >= end {
                // The slot stays abandoned; the command is reported as timed out.
                return NvmeCompletion::ended(tag, Err(IoError::Timeout), None);
            }
            wait_socket(&self.stream, !self.core.tx.is_empty(), 5);
        }
    }

    /// [`QueuePair::run`] with its own deadline instead of the queue's
    /// command timeout (Keep Alive: KATO).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_timed(
        &mut self,
        sqe: Sqe,
        buf: Option<IoBuf>,
        dir: DataDir,
        len: u32,
        tag: u64,
        timeout: Duration,
    ) -> NvmeCompletion {
        let normal = std::mem::replace(&mut self.core.timeout, timeout);
        let Some(slot) = self.alloc_slot() else {
            self.core.timeout = normal;
            return NvmeCompletion::ended(
                tag,
                Err(IoError::Media("no free command slot".into())),
                buf,
            );
        };
        self.start(slot, sqe, buf, false, dir, len, tag, false);
        self.core.timeout = normal;
        self.wait_for(tag, timeout + Duration::from_secs(1))
    }

    /// Runs one command to completion on this queue.
    pub(crate) fn run(
        &mut self,
        sqe: Sqe,
        buf: Option<IoBuf>,
        dir: DataDir,
        len: u32,
        tag: u64,
        force_incapsule: bool,
    ) -> NvmeCompletion {
        // Synchronous users run one command at a time; a full queue means
        // earlier commands were abandoned by timeouts.
        let Some(slot) = self.alloc_slot() else {
            return NvmeCompletion::ended(
                tag,
                Err(IoError::Media("no free command slot".into())),
                buf,
            );
        };
        self.start(slot, sqe, buf, false, dir, len, tag, force_incapsule);
        let limit = self.core.timeout + Duration::from_secs(1);
        self.wait_for(tag, limit)
    }

    /// Ends the command just started in `slot` with `e` (a request that
    /// failed before reaching the wire).
    pub(crate) fn fail_now(&mut self, slot: u16, e: IoError) {
        let core = &mut self.core;
        // Nothing was queued for a command started with DataDir::None; if
        // the connection is closed, start() completed it already.
        if core.slots[usize::from(slot)].state == SlotState::Active {
            // Drop the capsule queued by start().
            core.tx.pop_back();
            core.complete(slot, None, Err(e));
        }
    }

    /// With `on`, a command past its deadline is not ended with a timeout
    /// but reported by [`QueuePair::take_expired`] and left outstanding:
    /// its owner aborts it and resets the connection, which hands it back
    /// as lost. The check for a controller that stopped reading is the
    /// owner's then too.
    pub(crate) fn set_report_timeouts(&mut self, on: bool) {
        self.core.report_timeouts = on;
    }

    /// Moves the CIDs of the commands past their deadline into `out`
    /// (with [`QueuePair::set_report_timeouts`]), each with its tag.
    pub(crate) fn take_expired(&mut self, out: &mut Vec<(u16, u64)>) {
        let core = &mut self.core;
        for c in core.expired.drain(..) {
            let s = &core.slots[usize::from(c)];
            if s.state == SlotState::Active {
                out.push((c, s.tag));
            }
        }
    }

    /// Closes the connection at once, discarding what the controller has
    /// not read yet (an abortive close: the peer drops unread commands
    /// rather than executing them after they were handed back as lost).
    pub(crate) fn reset(&mut self) {
        set_linger_zero(&self.stream);
        // No FIN: the close when the socket is dropped sends a reset.
        self.aborted = true;
        self.fail_all();
    }

    /// Makes the eventual close of a connection that already ended abortive
    /// too (no FIN from [`QueuePair::shutdown`]).
    pub(crate) fn set_aborted(&mut self) {
        set_linger_zero(&self.stream);
        self.aborted = true;
    }

    /// Closes the connection (both directions).
    pub(crate) fn shutdown(&mut self) {
        if !self.aborted {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        self.fail_all();
    }

    fn fail_all(&mut self) {
        self.closed = true;
        let core = &mut self.core;
        core.tx.clear();
        core.rx_target = RxTarget::None;
        for i in 0..core.slots.len() {
            let s = &mut core.slots[i];
            s.tx_refs = 0;
            match s.state {
                SlotState::Free => {}
                SlotState::Abandoned => {
                    s.state = SlotState::Free;
                    s.drop_data();
                    core.free.push(i as u16);
                }
                SlotState::Active => match s.deferred.take() {
                    Some((cqe, r)) => core.complete(i as u16, cqe, r),
                    None => core.complete_as(i as u16, None, Err(IoError::Unavailable), true),
                },
            }
        }
    }

    /// Best effort: tells the controller why we end the connection.
    fn send_term_req(&mut self, f: &FatalError) {
        if self.core.tx.front().is_some_and(|t| t.sent > 0) {
            // A PDU is half sent; a TermReq now would be garbage.
            return;
        }
        let offending = self.dec.last_header();
        let t = Pdu::H2cTermReq(TermReq {
            fes: f.fes,
            fei: f.fei,
            data_len: offending.len() as u32,
        });
        let mut hdr = [0u8; MAX_HEADER];
        let n = encode_header(&t, &self.core.tx_framing, &mut hdr);
        let _ = (&self.stream).write_vectored(&[IoSlice::new(&hdr[..n]), IoSlice::new(offending)]);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn recv(&mut self) -> std::result::Result<(), RxFail> {
        // A controller that never stops sending must not keep us from
        // sending and from checking deadlines: a bounded number of reads
        // per call, the rest at the next one.
        for _ in 0..RX_READS_PER_PROGRESS {
            self.process_buffered()?;
            // The staging buffer is empty now.
            self.rpos = 0;
            self.rlen = 0;
            let rem = self.dec.data_remaining();
            let mut dst_len = 0;
            let res = match self.core.direct_target(rem) {
                Some(dst) => {
                    dst_len = dst.len();
                    let mut iov = [IoSliceMut::new(dst), IoSliceMut::new(&mut self.rbuf)];
                    (&self.stream).read_vectored(&mut iov)
                }
                None => (&self.stream).read(&mut self.rbuf),
            };
            let n = match res {
                Ok(0) => return Err(RxFail::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RxFail::Io(e)),
            };
            // The direct part ends where the segment does.
            let direct = n.min(dst_len);
            if direct > 0 {
                let dst = self.core.direct_target(rem).unwrap_or(&mut []);
                self.dec.consume_data_direct(&dst[..direct.min(dst.len())]);
                self.core.advance_direct(direct as u32);
            }
            self.rlen = n - direct;
        }
        self.process_buffered()
    }

    fn process_buffered(&mut self) -> std::result::Result<(), RxFail> {
        loop {
            let input = &self.rbuf[self.rpos..self.rlen];
            let empty = input.is_empty();
            let (n, ev) = self.dec.decode(input).map_err(RxFail::Fatal)?;
            self.rpos += n;
            match ev {
                Some(Event::Pdu(p)) => self.core.on_pdu(p)?,
                Some(Event::Data(d)) => self.core.on_data(d),
                Some(Event::DataEnd { digest_ok }) => self.core.on_data_end(digest_ok),
                None if n == 0 && empty => return Ok(()),
                None => {}
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        const IOV: usize = 64;
        while !self.core.tx.is_empty() {
            let res = {
                let mut iov = [IoSlice::new(&[]); IOV];
                let mut cnt = 0;
                for item in self.core.tx.iter().take(IOV) {
                    let b = self.core.item_bytes(item);
                    iov[cnt] = IoSlice::new(b.get(item.sent..).unwrap_or(&[]));
                    cnt += 1;
                }
                (&self.stream).write_vectored(&iov[..cnt])
            };
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.core.advance_tx(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Core {
    fn push_header(&mut self, p: &Pdu) {
        let mut b = [0u8; MAX_HEADER];
        let len = encode_header(p, &self.tx_framing, &mut b) as u16;
        self.tx.push_back(TxItem {
            kind: TxKind::Header { b, len },
            sent: 0,
        });
    }

    /// Queues `len` bytes of slot data at `off` (one item per data segment
    /// they touch), and their digest if enabled.
    fn push_data(&mut self, slot: u16, off: u32, len: u32) {
        let s = &mut self.slots[usize::from(slot)];
        let tx = &mut self.tx;
        let mut items = 0;
        s.pieces(off as usize, len as usize, |seg, so, n| {
            items += 1;
            tx.push_back(TxItem {
                // Segments are at most `u16::MAX` + 1 (the queue's limit)
                // and pieces lie inside a u32-long transfer.
                kind: TxKind::Data {
                    slot,
                    seg: seg as u16,
                    off: so as u32,
                    len: n as u32,
                },
                sent: 0,
            });
        });
        s.tx_refs += items;
        let ddgst = self.tx_framing.ddgst.then(|| {
            if items <= 1 {
                // The usual case: one segment, no allocation.
                let (mut one, o) = (&[][..], off as usize);
                s.pieces(o, len as usize, |seg, so, n| one = &s.seg(seg)[so..so + n]);
                return digest(&[one]);
            }
            let mut parts: Vec<&[u8]> = Vec::with_capacity(items as usize);
            s.pieces(off as usize, len as usize, |seg, so, n| {
                parts.push(&s.seg(seg)[so..so + n]);
            });
            digest(&parts)
        });
        if let Some(d) = ddgst {
            self.tx.push_back(TxItem {
                kind: TxKind::Digest(d),
                sent: 0,
            });
        }
    }

    fn item_bytes<'a>(&'a self, item: &'a TxItem) -> &'a [u8] {
        match &item.kind {
            TxKind::Header { b, len } => &b[..usize::from(*len)],
            TxKind::Digest(d) => d,
            TxKind::Data {
                slot,
                seg,
                off,
                len,
            } => self.slots[usize::from(*slot)]
                .seg(usize::from(*seg))
                .get(*off as usize..(*off as usize).saturating_add(*len as usize))
                .unwrap_or(&[]),
        }
    }

    fn advance_tx(&mut self, mut n: usize) {
        while let Some(item) = self.tx.front_mut() {
            let total = match &item.kind {
                TxKind::Header { len, .. } => usize::from(*len),
                TxKind::Digest(_) => 4,
                TxKind::Data { len, .. } => *len as usize,
            };
            let rem = total.saturating_sub(item.sent);
            if rem > n {
                item.sent += n;
                return;
            }
            n -= rem;
            let slot = match item.kind {
                TxKind::Data { slot, .. } => Some(slot),
                _ => None,
            };
            self.tx.pop_front();
            if let Some(slot) = slot {
                let s = &mut self.slots[usize::from(slot)];
                s.tx_refs = s.tx_refs.saturating_sub(1);
                if s.tx_refs == 0 {
                    if let Some((cqe, r)) = s.deferred.take() {
                        self.complete(slot, cqe, r);
                    }
                }
            }
        }
    }

    /// Ends a command: hands its completion out, or parks it while its data
    /// is still queued for sending.
    fn complete(&mut self, slot: u16, cqe: Option<Cqe>, result: std::result::Result<(), IoError>) {
        self.complete_as(slot, cqe, result, false);
    }

    /// [`Core::complete`]; `lost`: the command ended with its connection
    /// (its segments are handed back with it).
    fn complete_as(
        &mut self,
        slot: u16,
        cqe: Option<Cqe>,
        result: std::result::Result<(), IoError>,
        lost: bool,
    ) {
        let s = &mut self.slots[usize::from(slot)];
        // The promise of this module: no success without all the data.
        debug_assert!(
            result.is_err()
                || match s.dir {
                    DataDir::ControllerToHost => s.received == s.len,
                    DataDir::HostToController => s.requested == s.len,
                    DataDir::None => true,
                },
            "successful completion of a command whose data did not all move"
        );
        if s.tx_refs > 0 {
            s.deferred = Some((cqe, result));
            return;
        }
        let more = std::mem::take(&mut s.more);
        self.done.push(NvmeCompletion {
            tag: s.tag,
            cqe,
            result,
            buf: s.buf.take(),
            more,
            lost,
        });
        s.state = SlotState::Free;
        s.deferred = None;
        self.free.push(slot);
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Completes the commands past their deadline with a timeout. Returns
    /// true if one of them still has data in the send queue: the controller
    /// is not reading, so the connection must end (its buffer cannot be
    /// handed back while the queue points into it).
    fn check_timeouts(&mut self, now: Instant) -> bool {
        let mut stuck = false;
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.state == SlotState::Active && s.deadline <= now {
                if (s.tx_refs > 0 || s.deferred.is_some()) && !self.report_timeouts {
                    stuck = true;
                    continue;
                }
                if self.report_timeouts {
                    // The owner aborts it and resets the connection; until
                    // then the command stays where it is.
                    if !self.expired.contains(&(i as u16)) {
                        warn!(qid = self.qid, cid = i, tag = s.tag, "command timed out");
                        self.expired.push(i as u16);
                    }
                    s.deadline = now + self.timeout;
                    continue;
                }
                warn!(qid = self.qid, cid = i, tag = s.tag, "command timed out");
                self.done.push(NvmeCompletion::ended(
                    s.tag,
                    Err(IoError::Timeout),
                    s.buf.take(),
                ));
                s.more.clear();
                s.state = SlotState::Abandoned;
                self.outstanding = self.outstanding.saturating_sub(1);
            }
        }
        stuck
    }

    /// Empties the send queue (the connection is ending) and completes the
    /// commands past their deadline with a timeout, the others waiting only
    /// for their data to be sent with their deferred completion.
    fn drop_tx_and_expire(&mut self, now: Instant) {
        self.tx.clear();
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            s.tx_refs = 0;
            if s.state != SlotState::Active {
                continue;
            }
            if let Some((cqe, r)) = s.deferred.take() {
                self.complete(i as u16, cqe, r);
            } else if s.deadline <= now {
                warn!(
                    qid = self.qid,
                    cid = i,
                    tag = s.tag,
                    "command timed out with its data unsent"
                );
                self.complete(i as u16, None, Err(IoError::Timeout));
            }
        }
    }

    /// The buffer the current C2HData PDU's next bytes go to, when the
    /// decoder is inside its data.
    fn direct_target(&mut self, remaining: usize) -> Option<&mut [u8]> {
        if remaining == 0 {
            return None;
        }
        let RxTarget::C2h { slot, off, .. } = self.rx_target else {
            return None;
        };
        let s = &mut self.slots[usize::from(slot)];
        let (i, so) = s.locate(off as usize)?;
        let d = s.seg_mut(i);
        let n = (d.len() - so).min(remaining);
        d.get_mut(so..so + n)
    }

    fn advance_direct(&mut self, n: u32) {
        if let RxTarget::C2h { ref mut off, .. } = self.rx_target {
            *off += n;
        }
    }

    fn on_pdu(&mut self, p: Pdu) -> std::result::Result<(), RxFail> {
        match p {
            Pdu::CapsuleResp(r) => self.on_capsule_resp(r.cqe)?,
            Pdu::C2hData(d) => self.on_c2h(d)?,
            Pdu::R2t(r) => self.on_r2t(r)?,
            Pdu::C2hTermReq(t) => return Err(RxFail::Terminated(t)),
            _ => {
                return Err(fatal(
                    pdu::fes::INVALID_HEADER_FIELD,
                    0,
                    "unexpected PDU type",
                ))
            }
        }
        Ok(())
    }

    /// A CapsuleResp. A successful status is believed only if the command's
    /// data moved completely: every C2H byte arrived, every H2C byte was
    /// asked for and sent. Anything else from the controller (an unknown
    /// CID, success without the data) is a protocol violation that ends the
    /// connection — never a completion carrying what was in the buffer.
    fn on_capsule_resp(&mut self, cqe: Cqe) -> std::result::Result<(), RxFail> {
        let cid = cqe.cid;
        match self.slots.get(usize::from(cid)).map(|s| s.state) {
            Some(SlotState::Active) => {
                let s = &self.slots[usize::from(cid)];
                let status = cqe.status();
                if status.is_success() {
                    let moved = match s.dir {
                        DataDir::ControllerToHost => s.received == s.len,
                        DataDir::HostToController => s.requested == s.len && s.tx_refs == 0,
                        DataDir::None => true,
                    };
                    if !moved {
                        return Err(fatal(
                            pdu::fes::SEQUENCE_ERROR,
                            0,
                            "successful CapsuleResp before all of the command's data moved",
                        ));
                    }
                }
                let result = if s.ddgst_err && status.is_success() {
                    Err(IoError::Media("data digest mismatch".into()))
                } else {
                    unvme_bdev::status::from_nvme(status)
                };
                if !status.is_success() {
                    debug!(qid = self.qid, cid, %status, "command failed");
                }
                self.complete(cid, Some(cqe), result);
            }
            Some(SlotState::Abandoned) => {
                debug!(qid = self.qid, cid, "late response to a timed-out command");
                let s = &mut self.slots[usize::from(cid)];
                s.state = SlotState::Free;
                s.drop_data();
                self.free.push(cid);
            }
            _ => {
                // The CQE's CID (offset 12 in the CQE, 8 + 12 in the PDU).
                return Err(fatal(
                    pdu::fes::INVALID_HEADER_FIELD,
                    20,
                    "CapsuleResp for an unknown command",
                ));
            }
        }
        Ok(())
    }

    /// An R2T. We offer MAXR2T 0 (one outstanding R2T per command), so it is
    /// accepted only for a write moved by R2T, after the data of the previous
    /// R2T is all sent, asking for the next bytes in order (no overlap, no
    /// gap) inside the command's length. So the send queue holds at most each
    /// outstanding command's data once, whatever the controller sends.
    fn on_r2t(&mut self, r: pdu::R2t) -> std::result::Result<(), RxFail> {
        let Some(s) = self.slots.get(usize::from(r.cccid)) else {
            return Err(fatal(
                pdu::fes::INVALID_HEADER_FIELD,
                8,
                "R2T for an unknown command",
            ));
        };
        match s.state {
            SlotState::Active => {}
            SlotState::Abandoned => {
                // Allowed: we gave up on it, the controller did not yet.
                trace!(
                    qid = self.qid,
                    cid = r.cccid,
                    "R2T for a timed-out command ignored"
                );
                return Ok(());
            }
            SlotState::Free => {
                return Err(fatal(
                    pdu::fes::INVALID_HEADER_FIELD,
                    8,
                    "R2T for an unknown command",
                ))
            }
        }
        if s.dir != DataDir::HostToController || s.requested == s.len {
            return Err(fatal(
                pdu::fes::INVALID_HEADER_FIELD,
                8,
                "R2T for a command with no data left to send",
            ));
        }
        if s.tx_refs > 0 {
            return Err(fatal(
                pdu::fes::DATA_LIMIT_EXCEEDED,
                0,
                "R2T while the previous R2T's data is unsent (MAXR2T exceeded)",
            ));
        }
        if r.r2to != s.requested {
            return Err(fatal(
                pdu::fes::DATA_OUT_OF_RANGE,
                12,
                "R2T offset out of order",
            ));
        }
        if r.r2tl == 0 || r.r2to.checked_add(r.r2tl).is_none_or(|e| e > s.len) {
            return Err(fatal(
                pdu::fes::DATA_OUT_OF_RANGE,
                16,
                "R2T outside the command's data",
            ));
        }
        self.slots[usize::from(r.cccid)].requested = r.r2to + r.r2tl;
        for c in h2c_chunks(r.r2to, r.r2tl, self.maxh2cdata) {
            self.push_header(&Pdu::H2cData(DataPdu {
                cccid: r.cccid,
                ttag: r.ttag,
                datao: c.datao,
                datal: c.datal,
                last: c.last,
                success: false,
            }));
            self.push_data(r.cccid, c.datao, c.datal);
        }
        Ok(())
    }

    /// A C2HData header. Data must arrive in order (DATAO where the last PDU
    /// ended: no overlap, no gap, no duplicate), inside the command's length,
    /// and SUCCESS only on the PDU that ends the data.
    fn on_c2h(&mut self, d: DataPdu) -> std::result::Result<(), RxFail> {
        let state = self.slots.get(usize::from(d.cccid)).map(|s| s.state);
        let s = match state {
            Some(SlotState::Abandoned) => {
                self.rx_target = RxTarget::Discard;
                if d.success {
                    let s = &mut self.slots[usize::from(d.cccid)];
                    s.state = SlotState::Free;
                    s.drop_data();
                    self.free.push(d.cccid);
                }
                return Ok(());
            }
            Some(SlotState::Active) => &self.slots[usize::from(d.cccid)],
            _ => {
                return Err(fatal(
                    pdu::fes::INVALID_HEADER_FIELD,
                    8,
                    "C2HData for an unknown command",
                ))
            }
        };
        if s.dir != DataDir::ControllerToHost || s.capacity() < s.len as usize {
            return Err(fatal(
                pdu::fes::INVALID_HEADER_FIELD,
                8,
                "C2HData for a command that reads no data",
            ));
        }
        if d.datao != s.received {
            return Err(fatal(
                pdu::fes::DATA_OUT_OF_RANGE,
                12,
                "C2HData offset out of order",
            ));
        }
        let Some(end) = d.datao.checked_add(d.datal).filter(|&e| e <= s.len) else {
            return Err(fatal(
                pdu::fes::DATA_OUT_OF_RANGE,
                16,
                "C2HData beyond the command's data",
            ));
        };
        if d.success && end != s.len {
            return Err(fatal(
                pdu::fes::INVALID_HEADER_FIELD,
                1,
                "SUCCESS on a C2HData that does not end the command's data",
            ));
        }
        self.rx_target = RxTarget::C2h {
            slot: d.cccid,
            off: d.datao,
            success: d.success,
        };
        Ok(())
    }

    fn on_data(&mut self, chunk: &[u8]) {
        if let RxTarget::C2h {
            slot, ref mut off, ..
        } = self.rx_target
        {
            let o = *off as usize;
            *off += chunk.len() as u32;
            let s = &mut self.slots[usize::from(slot)];
            let mut at = 0;
            // A chunk spans few segments.
            while at < chunk.len() {
                let Some((seg, so)) = s.locate(o + at) else {
                    break;
                };
                let d = s.seg_mut(seg);
                let n = (d.len() - so).min(chunk.len() - at);
                d[so..so + n].copy_from_slice(&chunk[at..at + n]);
                at += n;
            }
        }
    }

    fn on_data_end(&mut self, digest_ok: bool) {
        let t = std::mem::replace(&mut self.rx_target, RxTarget::None);
        let RxTarget::C2h { slot, off, success } = t else {
            return;
        };
        let s = &mut self.slots[usize::from(slot)];
        s.received = off;
        // on_c2h allows SUCCESS only on the PDU that ends the data.
        debug_assert!(!success || s.received == s.len);
        if !digest_ok {
            warn!(qid = self.qid, cid = slot, "C2HData digest mismatch");
            s.ddgst_err = true;
        }
        if success {
            let cqe = Cqe {
                sqid: self.qid,
                cid: slot,
                ..Cqe::default()
            };
            let result = if s.ddgst_err {
                Err(IoError::Media("data digest mismatch".into()))
            } else {
                Ok(())
            };
            let cqe = if s.ddgst_err { None } else { Some(cqe) };
            self.complete(slot, cqe, result);
        }
    }
}

/// A transport error of the controller's that ends the connection.
fn fatal(fes: u16, fei: u32, msg: &'static str) -> RxFail {
    RxFail::Fatal(FatalError { fes, fei, msg })
}

/// Waits up to `ms` milliseconds for the socket to become readable (or
/// writable, if `want_write`).
/// SO_LINGER with a zero timeout: closing the socket sends a reset and
/// drops what is unsent, and the peer's unread data dies with the connection.
pub(crate) fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid, initialised linger on our stack; the fd is owned by `s` and open.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

pub(crate) fn wait_socket(s: &TcpStream, want_write: bool, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN | if want_write { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call, and nfds = 1 matches the single entry passed.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}
