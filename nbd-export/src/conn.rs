//! The transmission phase of one NBD connection, driven by one thread that
//! owns the socket and its own [`BdevQueue`].
//!
//! Requests are pipelined: every pass reads all requests available on the
//! (non-blocking) socket, submits them to the device, polls completions and
//! sends replies in completion order with one `writev` for as many replies
//! as are ready. READ data is sent straight from the buffers the device
//! filled; WRITE payload is read straight into the buffers handed to the
//! device when it is large. Requests larger than what the device takes at
//! once are split into chunks and answered when the last chunk completes.
//!
//! Memory is bounded: at most [`Limits::max_inflight`] requests and about
//! [`Limits::max_inflight_bytes`] of data per connection; beyond that the
//! connection stops reading (and stops polling for input: it sleeps until
//! the socket takes replies) until replies are sent. A WRITE takes a
//! buffer for a chunk only when that chunk's first payload bytes are
//! here, so a header costs nothing but a slot. Every buffer is drawn
//! against the server's [`Budget`]; a connection that finds it spent
//! waits. Idle buffers are pooled up to [`Limits::pool_bytes`] and given
//! back after [`Limits::pool_idle`] with nothing in flight. A client that
//! leaves the replies unread for [`Limits::send_timeout`] is closed. A request header with a
//! bad magic, or a connection that ends in the middle of a request, ends
//! this connection only (after the requests already taken complete, so an
//! acknowledged — or merely submitted — write is never cut short).
//!
//! This module does not speak the handshake and does not listen.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, trace};
use unvme_bdev::{
    BdevInfo, BdevQueue, IoBuf, IoCompletion, IoOp, IoRequest, LbaRange, SubmitError,
};

use crate::proto::{self, cmd, cmdflag, reply, ExportView, NbdRequest, REQUEST_LEN};

/// Per-connection bounds and the idle policy. The defaults are the ones
/// `unvme nbd --help` shows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests in flight (taken from the socket, not yet fully replied).
    /// Default 256.
    pub max_inflight: usize,
    /// Data bytes of READ/WRITE requests in flight (one request larger than
    /// this is still admitted when nothing else is in flight). Default
    /// 64 MiB. This counts declared lengths; memory is taken only as WRITE
    /// payload arrives (1 MiB chunks) or when a READ is started.
    pub max_inflight_bytes: usize,
    /// Bytes of idle data buffers a connection keeps for reuse. Default
    /// 8 MiB.
    pub pool_bytes: usize,
    /// A connection with nothing in flight for this long returns its whole
    /// buffer pool. Default 1 s.
    pub pool_idle: Duration,
    /// A connection whose replies the client does not read for this long
    /// (the socket stays full) is closed. Default 60 s.
    pub send_timeout: Duration,
    /// How long the connection spins on an idle socket before sleeping in
    /// poll(2). Default 50 µs.
    pub spin: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 256,
            max_inflight_bytes: 64 << 20,
            pool_bytes: 8 << 20,
            pool_idle: Duration::from_secs(1),
            send_timeout: Duration::from_secs(60),
            spin: Duration::from_micros(50),
        }
    }
}

/// The data-buffer memory every connection of a server draws from: a
/// counter of the bytes of buffers held (in flight or pooled). A
/// connection asks before it allocates; a request is admitted while the
/// total is below the budget, so the total stays under the budget plus one
/// chunk per connection.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        let old = self.used.fetch_add(n, Ordering::Relaxed);
        if old >= self.max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Largest chunk the server hands the device in one request.
const MAX_CHUNK: usize = 1 << 20;
/// Largest block count of one Write Zeroes (NVMe NLB is 16 bits).
const MAX_ZERO_BLOCKS: u64 = 1 << 16;
/// Bits of a bdev tag that hold the chunk index.
const CHUNK_BITS: u32 = 20;
/// Bytes of socket input buffered at once.
const RX_BUF: usize = 64 << 10;
/// Remaining payload at or above which WRITE data is read directly into the
/// device buffer instead of through the input buffer.
const DIRECT_READ_MIN: usize = 16 << 10;
/// Room for the largest fixed reply header (chunk header + block status).
const HDR_MAX: usize = 40;
/// iovecs per writev.
const MAX_IOV: usize = 64;
/// Smallest pooled buffer.
const POOL_MIN: usize = 4096;
/// Size classes of the buffer pool (4 KiB .. 1 MiB).
const POOL_CLASSES: usize = 9;
/// Chunks of the largest request.
const MAX_PAYLOAD_CHUNKS: usize = (proto::BlockSizes::MAX_PAYLOAD as usize).div_ceil(MAX_CHUNK);

/// A transport the connection can drive: a TCP or Unix stream.
pub trait Stream: Read + Write + AsRawFd + Send {
    /// Switches the socket to non-blocking mode.
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

impl Stream for std::net::TcpStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, on)
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_nonblocking(self, on)
    }
}

/// One request taken from the socket.
#[derive(Debug, Default)]
struct Slot {
    req: Option<NbdRequest>,
    /// Data chunks of READ/WRITE, in order.
    bufs: Vec<Option<IoBuf>>,
    /// Device requests not yet completed.
    pending: u32,
    /// First failure.
    error: Option<(u32, Cow<'static, str>)>,
    /// Bytes accounted against `max_inflight_bytes`.
    bytes: usize,
}

/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;

/// A reply waiting to be sent.
#[derive(Debug)]
struct Reply {
    hdr: [u8; HDR_MAX],
    hdr_len: usize,
    /// Bytes sent after the header: an ERROR chunk's message, or a
    /// BLOCK_STATUS chunk's extents.
    extra: Option<Cow<'static, [u8]>>,
    /// The slot whose buffers carry the data (READ), freed once sent.
    slot: usize,
    data_len: usize,
    sent: usize,
}

impl Reply {
    fn total(&self) -> usize {
        self.hdr_len + self.extra.as_ref().map_or(0, |m| m.len()) + self.data_len
    }
}

/// Where the input parser is.
#[derive(Debug, Clone, Copy)]
enum RxState {
    /// Waiting for a 28-byte request header.
    Header,
    /// Reading WRITE payload into `slot`'s chunk `chunk` at `off`.
    Payload {
        slot: usize,
        chunk: usize,
        off: usize,
    },
    /// Skipping `left` bytes of payload of a refused WRITE in `slot`.
    Discard { slot: usize, left: u64 },
}

/// Why the connection stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Still reading.
    Open,
    /// NBD_CMD_DISC, EOF between requests, or server shutdown.
    Clean,
    /// Garbage or a truncated request.
    Broken,
}

/// Counters reported when the connection ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnStats {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// The transmission phase of one connection.
pub struct Conn<'a, S: Stream> {
    s: S,
    q: Box<dyn BdevQueue>,
    view: ExportView,
    block_size: u32,
    /// The device supports write-zeroes (used for TRIM with FUA).
    write_zeroes: bool,
    chunk: usize,
    limits: Limits,
    stop: &'a AtomicBool,
    /// The server's data-buffer budget.
    budget: &'a Budget,
    /// Bytes of buffers this connection holds against `budget`.
    held: usize,
    /// Input stopped for lack of room (slots, bytes or budget): do not
    /// wait for the socket to turn readable.
    rx_full: bool,
    /// Input stopped because the server's budget is spent: retry soon.
    wait_budget: bool,
    /// Since when the socket has taken none of the queued replies.
    tx_stalled_since: Option<Instant>,
    /// Buffers of a READ taken before it is admitted.
    prealloc: Vec<IoBuf>,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rstate: RxState,
    ending: Ending,
    tx_dead: bool,
    slots: Vec<Slot>,
    free: Vec<usize>,
    inflight_bytes: usize,
    to_submit: VecDeque<IoRequest>,
    tx: VecDeque<Reply>,
    comps: Vec<IoCompletion>,
    pool: [Vec<IoBuf>; POOL_CLASSES],
    pooled_bytes: usize,
    stats: ConnStats,
}

impl<'a, S: Stream> Conn<'a, S> {
    /// A connection on `s` (switched to non-blocking) serving the export
    /// described by `view` through `q`. `info` is the device behind it.
    pub fn new(
        s: S,
        q: Box<dyn BdevQueue>,
        info: &BdevInfo,
        view: ExportView,
        limits: Limits,
        stop: &'a AtomicBool,
        budget: &'a Budget,
    ) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        let bs = info.block_size.max(1) as usize;
        let mut chunk = MAX_CHUNK;
        if info.max_transfer != 0 {
            chunk = chunk.min(info.max_transfer as usize);
        }
        chunk = chunk.min(MAX_ZERO_BLOCKS as usize * bs);
        chunk = (chunk / bs * bs).max(bs);
        let max_inflight = limits.max_inflight.clamp(1, 1 << (63 - CHUNK_BITS));
        let mut slots = Vec::with_capacity(max_inflight);
        slots.resize_with(max_inflight, Slot::default);
        Ok(Conn {
            s,
            q,
            view,
            block_size: info.block_size,
            write_zeroes: info.write_zeroes,
            chunk,
            limits,
            stop,
            budget,
            held: 0,
            rx_full: false,
            wait_budget: false,
            tx_stalled_since: None,
            prealloc: Vec::with_capacity(MAX_PAYLOAD_CHUNKS),
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rstate: RxState::Header,
            ending: Ending::Open,
            tx_dead: false,
            slots,
            free: (0..max_inflight).rev().collect(),
            inflight_bytes: 0,
            to_submit: VecDeque::with_capacity(max_inflight),
            tx: VecDeque::with_capacity(max_inflight),
            comps: Vec::with_capacity(max_inflight),
            pool: Default::default(),
            pooled_bytes: 0,
            stats: ConnStats::default(),
        })
    }

    /// Serves requests until the client disconnects (or sends DISC, or
    /// garbage) and every request taken has completed, or `stop` is set.
    pub fn run(mut self) -> ConnStats {
        let mut idle_since: Option<Instant> = None;
        loop {
            let mut progress = false;
            if self.ending == Ending::Open {
                if self.stop.load(Ordering::Relaxed) {
                    // A WRITE whose payload is still coming would hold
                    // the shutdown forever: drop it unanswered.
                    self.ending = Ending::Clean;
                    self.abandon_partial();
                } else {
                    progress |= self.read_requests();
                }
            }
            progress |= self.submit_pending();
            progress |= self.poll_device();
            progress |= self.send_replies();
            if self.ending != Ending::Open && self.in_flight() == 0 && self.tx.is_empty() {
                break;
            }
            if progress {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            let idle = since.elapsed();
            if self.q.outstanding() > 0 || !self.to_submit.is_empty() {
                // The device will complete something: keep polling it, but
                // give the CPU away (a bridged target may share it). Only a
                // device silent for long (a lost target timing out) sleeps.
                if idle < self.limits.spin {
                    std::hint::spin_loop();
                } else {
                    // Sleep on the client socket and the device's own
                    // descriptor together: spinning (or sched_yield) here
                    // starves a target or initiator sharing this CPU.
                    self.wait_socket(100);
                }
            } else if idle >= self.limits.spin {
                if idle >= self.limits.pool_idle && self.pooled_bytes != 0 {
                    self.drain_pool();
                }
                self.wait_socket(50);
            } else {
                std::hint::spin_loop();
            }
        }
        let _ = self.s.flush();
        debug!(
            requests = self.stats.requests,
            errors = self.stats.errors,
            broken = self.ending == Ending::Broken,
            "NBD connection done"
        );
        self.stats
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Sleeps until the socket is readable (when we want input) or writable
    /// (when replies wait), the device queue may have completions, or `ms`
    /// passes.
    fn wait_socket(&self, ms: i32) {
        let mut events = 0;
        let mut ms = ms;
        if self.ending == Ending::Open && !self.free.is_empty() && !self.rx_full {
            events |= libc::POLLIN;
        }
        if self.wait_budget {
            // Nothing wakes us when another connection returns memory.
            ms = ms.min(10);
        }
        if !self.tx.is_empty() && !self.tx_dead {
            events |= libc::POLLOUT;
        }
        let mut pfds = [
            libc::pollfd {
                fd: self.s.as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if self.q.outstanding() > 0 {
            match self.q.wait_fd() {
                Some(fd) => pfds[1].fd = fd,
                // The device completes without outside events: don't sleep.
                None => ms = 0,
            }
        }
        // SAFETY: `pfds` is a valid array of two pollfds on our stack for the duration of the call; the first fd is owned by `self.s` and the second (or -1, which poll ignores) by the device queue `self.q`, both open while `self` lives.
        unsafe {
            libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms);
        }
    }

    // ---- input -------------------------------------------------------

    /// Reads and handles every request available. Returns whether anything
    /// was consumed.
    fn read_requests(&mut self) -> bool {
        let mut progress = false;
        self.rx_full = false;
        self.wait_budget = false;
        for _ in 0..1024 {
            if self.ending != Ending::Open {
                break;
            }
            match self.rstate {
                RxState::Header => {
                    if self.rx_end - self.rx_start < REQUEST_LEN {
                        match self.fill_rx() {
                            Some(true) => continue,
                            Some(false) => break,
                            None => {
                                progress = true;
                                break;
                            }
                        }
                    }
                    match self.take_header() {
                        Some(true) => progress = true,
                        Some(false) => {
                            // No room: wait for replies.
                            self.rx_full = true;
                            break;
                        }
                        None => {
                            progress = true;
                            break;
                        }
                    }
                }
                RxState::Payload { slot, chunk, off } => {
                    match self.read_payload(slot, chunk, off) {
                        Some(p) => progress |= p,
                        None => {
                            progress = true;
                            break;
                        }
                    }
                    if matches!(self.rstate, RxState::Payload { slot: s2, chunk: c2, off: o2 } if s2 == slot && c2 == chunk && o2 == off)
                    {
                        break; // would block
                    }
                }
                RxState::Discard { slot, left } => {
                    if self.rx_start == self.rx_end {
                        match self.fill_rx() {
                            Some(true) => {}
                            Some(false) => break,
                            None => {
                                progress = true;
                                break;
                            }
                        }
                    }
                    let n = ((self.rx_end - self.rx_start) as u64).min(left);
                    self.rx_start += n as usize;
                    progress = true;
                    if n == left {
                        self.rstate = RxState::Header;
                        self.finish_if_done(slot);
                    } else {
                        self.rstate = RxState::Discard {
                            slot,
                            left: left - n,
                        };
                    }
                }
            }
        }
        progress
    }

    /// Reads more input into the buffer. `Some(true)`: got bytes;
    /// `Some(false)`: would block; `None`: the stream ended or failed (the
    /// connection is now ending).
    fn fill_rx(&mut self) -> Option<bool> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_end == self.rx.len() || self.rx_start > self.rx.len() / 2 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        match self.s.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                self.end_of_input();
                None
            }
            Ok(n) => {
                self.rx_end += n;
                Some(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Some(true),
            Err(e) => {
                debug!(error = %e, "NBD socket read failed");
                self.ending = Ending::Broken;
                None
            }
        }
    }

    fn end_of_input(&mut self) {
        let clean = matches!(self.rstate, RxState::Header) && self.rx_start == self.rx_end;
        if clean {
            debug!("NBD client closed the connection");
            self.ending = Ending::Clean;
        } else {
            debug!("NBD connection ended in the middle of a request");
            self.ending = Ending::Broken;
            self.abandon_partial();
        }
    }

    /// A request whose payload never arrived: release its slot unanswered.
    fn abandon_partial(&mut self) {
        if let RxState::Payload { slot, .. } | RxState::Discard { slot, .. } = self.rstate {
            self.release_slot(slot);
        }
        self.rstate = RxState::Header;
    }

    /// Takes one request header from the buffer. `Some(true)`: handled;
    /// `Some(false)`: no room in flight, left in the buffer; `None`: garbage.
    fn take_header(&mut self) -> Option<bool> {
        let mut hb = [0u8; REQUEST_LEN];
        hb.copy_from_slice(&self.rx[self.rx_start..self.rx_start + REQUEST_LEN]);
        let r = match NbdRequest::decode(&hb) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "garbage on the NBD connection; closing it");
                self.ending = Ending::Broken;
                return None;
            }
        };
        if r.typ == cmd::DISC {
            self.rx_start += REQUEST_LEN;
            debug!("NBD_CMD_DISC");
            self.ending = Ending::Clean;
            return Some(true);
        }
        let data = if matches!(r.typ, cmd::READ | cmd::WRITE) && r.length <= self.view.sizes.max {
            r.length as usize
        } else {
            0
        };
        let Some(&slot) = self.free.last() else {
            return Some(false);
        };
        if self.inflight_bytes != 0 && self.inflight_bytes + data > self.limits.max_inflight_bytes {
            return Some(false);
        }
        let refused = proto::check_request(&r, &self.view).err();
        if refused.is_none() && r.typ == cmd::READ && !self.prealloc_read(r.length as usize) {
            self.wait_budget = true;
            return Some(false);
        }
        self.free.pop();
        self.rx_start += REQUEST_LEN;
        trace!(
            typ = r.typ,
            cookie = r.cookie,
            offset = r.offset,
            len = r.length,
            "NBD request"
        );
        let s = &mut self.slots[slot];
        s.req = Some(r);
        s.pending = 0;
        s.error = None;
        s.bytes = 0;
        if let Some(refusal) = refused {
            s.error = Some((refusal.errno, Cow::Borrowed(refusal.message)));
            if r.payload_len() > 0 {
                self.rstate = RxState::Discard {
                    slot,
                    left: u64::from(r.payload_len()),
                };
            } else {
                self.finish_if_done(slot);
            }
            return Some(true);
        }
        s.bytes = data;
        self.inflight_bytes += data;
        self.start(slot, r);
        Some(true)
    }

    /// Starts a validated request.
    fn start(&mut self, slot: usize, r: NbdRequest) {
        let bs = u64::from(self.block_size);
        let lba = r.offset / bs;
        match r.typ {
            cmd::READ | cmd::WRITE if r.length > 0 => {
                let len = r.length as usize;
                let n = len.div_ceil(self.chunk);
                if r.typ == cmd::READ {
                    // take_header took the buffers (prealloc_read).
                    let mut bufs = std::mem::take(&mut self.prealloc);
                    for (i, b) in bufs.drain(..).enumerate() {
                        self.slots[slot].bufs.push(None);
                        let clen = b.len();
                        let buf = Some(b);
                        let op = IoOp::Read {
                            lba: lba + (i * self.chunk) as u64 / bs,
                            nlb: (clen as u64 / bs) as u32,
                        };
                        self.push_op(slot, i, op, buf);
                    }
                    self.prealloc = bufs;
                } else {
                    // Buffers are taken chunk by chunk as the payload
                    // arrives (read_payload), never for bytes not sent.
                    self.slots[slot].bufs.resize_with(n, || None);
                    self.rstate = RxState::Payload {
                        slot,
                        chunk: 0,
                        off: 0,
                    };
                }
            }
            cmd::FLUSH => self.push_op(slot, 0, IoOp::Flush, None),
            // TRIM with FUA must be durable when answered. A deallocation
            // has no FUA of its own and a Flush sent beside it would not be
            // ordered after it, so it becomes a write-zeroes that may
            // deallocate, with FUA: the blocks are trimmed (and read back as
            // zeroes, which TRIM allows) and durable at completion.
            cmd::TRIM if r.length > 0 && (r.flags & cmdflag::FUA == 0 || !self.write_zeroes) => {
                let nlb = (u64::from(r.length) / bs) as u32;
                let op = IoOp::Deallocate {
                    ranges: vec![LbaRange { lba, nlb }],
                };
                self.push_op(slot, 0, op, None);
            }
            cmd::TRIM | cmd::WRITE_ZEROES if r.length > 0 => {
                let total = u64::from(r.length) / bs;
                let mut done = 0u64;
                let mut i = 0;
                while done < total {
                    let nlb = (total - done).min(MAX_ZERO_BLOCKS);
                    let op = IoOp::WriteZeroes {
                        lba: lba + done,
                        nlb: nlb as u32,
                        deallocate: r.typ == cmd::TRIM || r.flags & cmdflag::NO_HOLE == 0,
                        fua: r.flags & cmdflag::FUA != 0,
                    };
                    self.push_op(slot, i, op, None);
                    done += nlb;
                    i += 1;
                }
            }
            // CACHE is advice; BLOCK_STATUS is answered from what we know;
            // zero-length READ/WRITE/TRIM/WRITE_ZEROES are no-ops.
            _ => self.finish_if_done(slot),
        }
    }

    /// Queues one device request for `slot`'s chunk `chunk`.
    fn push_op(&mut self, slot: usize, chunk: usize, op: IoOp, buf: Option<IoBuf>) {
        self.slots[slot].pending += 1;
        self.to_submit.push_back(IoRequest {
            tag: ((slot as u64) << CHUNK_BITS) | chunk as u64,
            op,
            buf,
            more: Vec::new(),
        });
    }

    /// Reads WRITE payload. `None` if the stream ended.
    fn read_payload(&mut self, slot: usize, mut chunk: usize, mut off: usize) -> Option<bool> {
        let mut progress = false;
        loop {
            let nchunks = self.slots[slot].bufs.len();
            if chunk == nchunks {
                self.rstate = RxState::Header;
                self.submit_write(slot);
                return Some(true);
            }
            if self.slots[slot].bufs[chunk].is_none() {
                // Take this chunk's buffer only once its first bytes are
                // here.
                if self.rx_end == self.rx_start {
                    self.rstate = RxState::Payload { slot, chunk, off };
                    match self.fill_rx() {
                        Some(true) => {
                            progress = true;
                            continue;
                        }
                        Some(false) => return Some(progress),
                        None => return None,
                    }
                }
                let len = self.slots[slot].req.map_or(0, |r| r.length as usize);
                let clen = (len - chunk * self.chunk).min(self.chunk);
                let Some(b) = self.get_buf(clen) else {
                    self.rstate = RxState::Payload { slot, chunk, off };
                    self.rx_full = true;
                    self.wait_budget = true;
                    return Some(progress);
                };
                self.slots[slot].bufs[chunk] = Some(b);
            }
            let avail = self.rx_end - self.rx_start;
            let Some(buf) = self.slots[slot].bufs[chunk].as_mut() else {
                unreachable!("the chunk's buffer was just taken")
            };
            let want = buf.len() - off;
            if avail > 0 {
                let n = avail.min(want);
                buf[off..off + n].copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
                self.rx_start += n;
                off += n;
                progress = true;
            } else if want >= DIRECT_READ_MIN {
                match self.s.read(&mut buf[off..]) {
                    Ok(0) => {
                        self.rstate = RxState::Payload { slot, chunk, off };
                        self.end_of_input();
                        return None;
                    }
                    Ok(n) => {
                        off += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rstate = RxState::Payload { slot, chunk, off };
                        return Some(progress);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        debug!(error = %e, "NBD socket read failed");
                        self.rstate = RxState::Payload { slot, chunk, off };
                        self.ending = Ending::Broken;
                        self.abandon_partial();
                        return None;
                    }
                }
            } else {
                self.rstate = RxState::Payload { slot, chunk, off };
                match self.fill_rx() {
                    Some(true) => progress = true,
                    Some(false) => return Some(progress),
                    None => return None,
                }
            }
            if off == self.slots[slot].bufs[chunk].as_ref().map_or(0, |b| b.len()) {
                chunk += 1;
                off = 0;
            }
            self.rstate = RxState::Payload { slot, chunk, off };
        }
    }

    /// The payload of a WRITE is complete: hand its chunks to the device.
    fn submit_write(&mut self, slot: usize) {
        let Some(r) = self.slots[slot].req else {
            return;
        };
        let bs = u64::from(self.block_size);
        let lba = r.offset / bs;
        for i in 0..self.slots[slot].bufs.len() {
            let buf = self.slots[slot].bufs[i].take();
            let clen = buf.as_ref().map_or(0, |b| b.len());
            let op = IoOp::Write {
                lba: lba + (i * self.chunk) as u64 / bs,
                nlb: (clen as u64 / bs) as u32,
                fua: r.flags & cmdflag::FUA != 0,
            };
            self.push_op(slot, i, op, buf);
        }
    }

    // ---- device ------------------------------------------------------

    fn submit_pending(&mut self) -> bool {
        let mut progress = false;
        while let Some(req) = self.to_submit.pop_front() {
            match self.q.submit(req) {
                Ok(()) => progress = true,
                Err(SubmitError::Busy(req)) => {
                    self.to_submit.push_front(req);
                    break;
                }
            }
        }
        progress
    }

    fn poll_device(&mut self) -> bool {
        if self.q.outstanding() == 0 {
            return false;
        }
        let mut comps = std::mem::take(&mut self.comps);
        self.q.poll(&mut comps);
        let progress = !comps.is_empty();
        for c in comps.drain(..) {
            let slot = (c.tag >> CHUNK_BITS) as usize;
            let chunk = (c.tag & ((1 << CHUNK_BITS) - 1)) as usize;
            let Some(s) = self.slots.get_mut(slot) else {
                continue;
            };
            if let Some(b) = c.buf {
                if let Some(place) = s.bufs.get_mut(chunk) {
                    *place = Some(b);
                }
            }
            if let Err(e) = c.result {
                if s.error.is_none() {
                    let typ = s.req.map_or(cmd::READ, |r| r.typ);
                    debug!(error = %e, slot, "device request failed");
                    s.error = Some((proto::errno_for(&e, typ), Cow::Owned(e.to_string())));
                }
            }
            s.pending = s.pending.saturating_sub(1);
            self.finish_if_done(slot);
        }
        self.comps = comps;
        progress
    }

    /// Queues the reply of `slot` once nothing of it is pending.
    fn finish_if_done(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.pending != 0 {
            return;
        }
        if matches!(self.rstate, RxState::Payload { slot: p, .. } | RxState::Discard { slot: p, .. } if p == slot)
        {
            return;
        }
        let Some(r) = s.req else { return };
        let structured = self.view.structured;
        let mut rep = Reply {
            hdr: [0u8; HDR_MAX],
            hdr_len: 0,
            extra: None,
            slot,
            data_len: 0,
            sent: 0,
        };
        self.stats.requests += 1;
        if let Some((e, msg)) = s.error.take() {
            self.stats.errors += 1;
            if structured {
                let msg = if msg.len() > proto::MAX_STRING {
                    Cow::Borrowed("error")
                } else {
                    msg
                };
                let h = proto::chunk_header(
                    reply::FLAG_DONE,
                    reply::ERROR,
                    r.cookie,
                    6 + msg.len() as u32,
                );
                rep.hdr[..20].copy_from_slice(&h);
                rep.hdr[20..24].copy_from_slice(&e.to_be_bytes());
                rep.hdr[24..26].copy_from_slice(&(msg.len() as u16).to_be_bytes());
                rep.hdr_len = 26;
                rep.extra = Some(match msg {
                    Cow::Borrowed(m) => Cow::Borrowed(m.as_bytes()),
                    Cow::Owned(m) => Cow::Owned(m.into_bytes()),
                });
            } else {
                rep.hdr[..16].copy_from_slice(&proto::simple_reply(e, r.cookie));
                rep.hdr_len = 16;
            }
        } else if r.typ == cmd::READ {
            let len = r.length as usize;
            rep.data_len = len;
            if structured && len > 0 {
                let h = proto::chunk_header(
                    reply::FLAG_DONE,
                    reply::OFFSET_DATA,
                    r.cookie,
                    8 + r.length,
                );
                rep.hdr[..20].copy_from_slice(&h);
                rep.hdr[20..28].copy_from_slice(&r.offset.to_be_bytes());
                rep.hdr_len = 28;
            } else if structured {
                let h = proto::chunk_header(reply::FLAG_DONE, reply::NONE, r.cookie, 0);
                rep.hdr[..20].copy_from_slice(&h);
                rep.hdr_len = 20;
            } else {
                rep.hdr[..16].copy_from_slice(&proto::simple_reply(0, r.cookie));
                rep.hdr_len = 16;
            }
        } else if r.typ == cmd::BLOCK_STATUS {
            let payload = self.block_status(&r);
            let h = proto::chunk_header(
                reply::FLAG_DONE,
                reply::BLOCK_STATUS,
                r.cookie,
                payload.len() as u32,
            );
            rep.hdr[..20].copy_from_slice(&h);
            rep.hdr_len = 20;
            rep.extra = Some(Cow::Owned(payload));
        } else {
            rep.hdr[..16].copy_from_slice(&proto::simple_reply(0, r.cookie));
            rep.hdr_len = 16;
        }
        if self.tx_dead {
            self.release_slot(slot);
        } else {
            self.tx.push_back(rep);
        }
    }

    /// The payload of a `base:allocation` BLOCK_STATUS reply for `r` (a
    /// request already checked against the export): the device's allocation
    /// runs as extents, unallocated ones flagged HOLE|ZERO (they read as
    /// zeroes), at most [`MAX_EXTENTS`] of them (one with REQ_ONE); the
    /// reply may cover less than asked, as the protocol allows. A device
    /// that cannot tell answers one allocated-data extent for the range.
    fn block_status(&mut self, r: &NbdRequest) -> Vec<u8> {
        let bs = u64::from(self.block_size);
        let (lba, nlb) = (r.offset / bs, (u64::from(r.length) / bs) as u32);
        let mut ext = Vec::new();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        if nlb > 0 && self.q.block_status(lba, nlb, &mut ext) {
            for e in &ext {
                let flags = if e.allocated {
                    0
                } else {
                    proto::state::HOLE | proto::state::ZERO
                };
                // Lengths are bytes in a u32: split runs that overflow it.
                let mut left = u64::from(e.nlb) * bs;
                while left > 0 {
                    let n = left.min(u64::from(u32::MAX) / bs * bs);
                    runs.push((n as u32, flags));
                    left -= n;
                }
            }
        }
        if runs.is_empty() {
            runs.push((r.length, 0));
        }
        let keep = if r.flags & cmdflag::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        runs.truncate(keep);
        let mut payload = Vec::with_capacity(4 + 8 * runs.len());
        payload.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in runs {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        payload
    }

    /// Frees a slot and returns its buffers to the pool.
    fn release_slot(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        self.inflight_bytes -= s.bytes;
        s.bytes = 0;
        s.req = None;
        s.error = None;
        let mut bufs = std::mem::take(&mut s.bufs);
        for b in bufs.drain(..).flatten() {
            self.put_buf(b);
        }
        self.slots[slot].bufs = bufs;
        self.free.push(slot);
    }

    // ---- output ------------------------------------------------------

    /// Sends as many queued replies as the socket takes.
    fn send_replies(&mut self) -> bool {
        let mut progress = false;
        while !self.tx.is_empty() && !self.tx_dead {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            'fill: for rep in self.tx.iter() {
                let mut skip = rep.sent;
                let parts_hdr = &rep.hdr[..rep.hdr_len];
                let extra = rep.extra.as_deref().unwrap_or(&[]);
                for part in [parts_hdr, extra] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if n == MAX_IOV {
                        break 'fill;
                    }
                    iov[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
                let mut left = rep.data_len;
                for b in self.slots[rep.slot].bufs.iter().flatten() {
                    if left == 0 {
                        break;
                    }
                    let part = &b[..b.len().min(left)];
                    left -= part.len();
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if n == MAX_IOV {
                        break 'fill;
                    }
                    iov[n] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    n += 1;
                }
            }
            let written = match self.s.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.kill_tx();
                    return true;
                }
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if progress {
                        self.tx_stalled_since = None;
                    } else {
                        let since = *self.tx_stalled_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.limits.send_timeout {
                            debug!("NBD client reads no replies; closing the connection");
                            self.kill_tx();
                            return true;
                        }
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "NBD socket write failed");
                    self.kill_tx();
                    return true;
                }
            };
            progress = true;
            self.tx_stalled_since = None;
            let mut w = written;
            while w > 0 {
                let Some(rep) = self.tx.front_mut() else {
                    break;
                };
                let left = rep.total() - rep.sent;
                if w >= left {
                    w -= left;
                    let slot = rep.slot;
                    self.tx.pop_front();
                    self.release_slot(slot);
                } else {
                    rep.sent += w;
                    w = 0;
                }
            }
        }
        progress
    }

    /// The client is gone: drop every queued reply and stop reading.
    fn kill_tx(&mut self) {
        self.tx_dead = true;
        if self.ending == Ending::Open {
            self.ending = Ending::Broken;
            self.abandon_partial();
        }
        while let Some(rep) = self.tx.pop_front() {
            self.release_slot(rep.slot);
        }
    }

    // ---- buffers -----------------------------------------------------

    fn class_of(cap: usize) -> usize {
        let pages = cap.div_ceil(POOL_MIN).max(1);
        (pages.next_power_of_two().trailing_zeros() as usize).min(POOL_CLASSES - 1)
    }

    /// A buffer of `len` bytes from the pool, or a new one if the server's
    /// budget allows.
    fn get_buf(&mut self, len: usize) -> Option<IoBuf> {
        let k = Self::class_of(len);
        let mut b = match self.pool[k].pop() {
            Some(b) => {
                self.pooled_bytes -= b.capacity();
                b
            }
            None => {
                // IoBuf rounds up to whole pages: account what it holds.
                let cap = (POOL_MIN << k).max(len).next_multiple_of(POOL_MIN);
                if !self.budget.take(cap) {
                    // Our own idle buffers of other sizes may be what
                    // spends the budget: return them and ask once more.
                    if self.pooled_bytes == 0 {
                        return None;
                    }
                    self.drain_pool();
                    if !self.budget.take(cap) {
                        return None;
                    }
                }
                self.held += cap;
                IoBuf::new(cap)
            }
        };
        b.set_len(len.min(b.capacity()));
        Some(b)
    }

    /// Takes the buffers of a READ of `len` bytes into `prealloc`, all or
    /// none (a request never holds part of its memory while it waits).
    fn prealloc_read(&mut self, len: usize) -> bool {
        let n = len.div_ceil(self.chunk);
        for i in 0..n {
            let clen = (len - i * self.chunk).min(self.chunk);
            match self.get_buf(clen) {
                Some(b) => self.prealloc.push(b),
                None => {
                    let mut v = std::mem::take(&mut self.prealloc);
                    for b in v.drain(..) {
                        self.put_buf(b);
                    }
                    self.prealloc = v;
                    return false;
                }
            }
        }
        true
    }

    fn put_buf(&mut self, b: IoBuf) {
        let cap = b.capacity();
        let k = Self::class_of(cap);
        if cap == POOL_MIN << k && self.pooled_bytes + cap <= self.limits.pool_bytes {
            self.pooled_bytes += cap;
            self.pool[k].push(b);
        } else {
            self.held -= cap;
            self.budget.give(cap);
        }
    }

    /// Returns every pooled buffer (the connection is idle).
    fn drain_pool(&mut self) {
        for class in &mut self.pool {
            for b in class.drain(..) {
                self.held -= b.capacity();
                self.budget.give(b.capacity());
            }
            class.shrink_to_fit();
        }
        self.pooled_bytes = 0;
    }
}

impl<S: Stream> Drop for Conn<'_, S> {
    fn drop(&mut self) {
        // Buffers still in slots, the pool or the device queue are freed
        // with the connection (also when its thread panics).
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{tflag, BlockSizes, REQUEST_MAGIC};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use unvme_bdev::{IoCompletion, SubmitError};

    /// A device queue that records every operation and completes it at once.
    struct Recorder {
        ops: Arc<Mutex<Vec<IoOp>>>,
        done: Vec<IoCompletion>,
    }

    impl BdevQueue for Recorder {
        fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
            self.ops.lock().unwrap().push(req.op.clone());
            self.done.push(IoCompletion {
                tag: req.tag,
                result: Ok(()),
                buf: req.buf,
            });
            Ok(())
        }
        fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
            let n = self.done.len();
            out.append(&mut self.done);
            n
        }
        fn outstanding(&self) -> usize {
            self.done.len()
        }
    }

    /// Sends TRIM requests with the given flags on a connection over a device
    /// that does (or does not) support write-zeroes; returns what it did.
    fn trims(write_zeroes: bool, flags: &[u16]) -> Vec<IoOp> {
        let info = BdevInfo {
            name: "rec".into(),
            block_size: 512,
            num_blocks: 1 << 16,
            max_transfer: 0,
            volatile_write_cache: true,
            deallocate: true,
            write_zeroes,
        };
        let ops = Arc::new(Mutex::new(Vec::new()));
        let q = Box::new(Recorder {
            ops: ops.clone(),
            done: Vec::new(),
        });
        let view = ExportView {
            size: info.size_bytes(),
            tflags: tflag::HAS_FLAGS | tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_FLUSH,
            sizes: BlockSizes {
                min: 512,
                preferred: 4096,
                max: 1 << 20,
            },
            structured: false,
            base_allocation: false,
            fast_zero: false,
        };
        let (mut client, server) = UnixStream::pair().unwrap();
        let stop = AtomicBool::new(false);
        let budget = Budget::new(1 << 30);
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| {
                Conn::new(server, q, &info, view, Limits::default(), &stop, &budget)
                    .unwrap()
                    .run()
            });
            for (i, &f) in flags.iter().enumerate() {
                let mut r = Vec::new();
                r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                r.extend_from_slice(&f.to_be_bytes());
                r.extend_from_slice(&cmd::TRIM.to_be_bytes());
                r.extend_from_slice(&(i as u64).to_be_bytes());
                r.extend_from_slice(&4096u64.to_be_bytes());
                r.extend_from_slice(&(64u32 << 10).to_be_bytes());
                client.write_all(&r).unwrap();
                let mut reply = [0u8; 16];
                client.read_exact(&mut reply).unwrap();
                assert_eq!(&reply[4..8], &[0; 4], "TRIM flags {f:#x} failed");
            }
            drop(client);
            srv.join().unwrap();
        });
        let v = ops.lock().unwrap().clone();
        v
    }

    #[test]
    fn trim_with_fua_is_a_durable_deallocating_write_zeroes() {
        let lba = 4096 / 512;
        let nlb = (64 << 10) / 512;
        assert_eq!(
            trims(true, &[0, cmdflag::FUA]),
            vec![
                IoOp::Deallocate {
                    ranges: vec![LbaRange { lba, nlb }]
                },
                IoOp::WriteZeroes {
                    lba,
                    nlb,
                    deallocate: true,
                    fua: true
                },
            ]
        );
        // Without write-zeroes on the device it stays a deallocation.
        assert_eq!(
            trims(false, &[cmdflag::FUA]),
            vec![IoOp::Deallocate {
                ranges: vec![LbaRange { lba, nlb }]
            }]
        );
    }
}
