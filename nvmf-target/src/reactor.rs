//! Reactors: poll-mode threads that each own a set of connections and one
//! bdev queue per namespace.
//!
//! A turn of the loop: `epoll_wait` (zero timeout while spinning), read and
//! decode every readable connection, submit I/O, poll every bdev queue with
//! work outstanding, then flush each connection's responses with one
//! vectored write. After `spin_us` without work the reactor blocks in
//! `epoll_wait` (up to 100 ms, for timers), so an idle target sleeps.
//!
//! A reactor serves at most `max_connections_per_reactor` connections; a
//! new one beyond that evicts the oldest connection that has not completed
//! Connect (a connected queue is never evicted, so a host that connects is
//! served while idle sockets come and go). Warnings about misbehaving
//! connections are rate-limited per reactor.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use unvme_bdev::IoCompletion;

use crate::config::Params;
use crate::error::{io_err, Result};
use crate::pool::BufPool;
use crate::queues::BdevQueues;
use crate::subsystem::Subsystems;
use crate::tcp::{CloseReason, Conn, Ctx};

const WAKER: Token = Token(usize::MAX);

/// The bdev tag of slot 0 of connection `conn_idx` in generation `gen`:
/// connection index in bits 63:32, generation (low 16 bits) in 31:16, and
/// the slot in 15:0, so a completion finds its command and a completion
/// for a closed connection's reused index is recognised as stale.
fn tag_base(conn_idx: usize, gen: u32) -> u64 {
    ((conn_idx as u64) << 32) | (u64::from(gen & 0xffff) << 16)
}

/// Splits a tag into (connection index, generation, slot).
fn split_tag(tag: u64) -> (usize, u32, u16) {
    (
        (tag >> 32) as usize,
        ((tag >> 16) & 0xffff) as u32,
        tag as u16,
    )
}

pub(crate) struct Reactor {
    id: usize,
    params: Arc<Params>,
    subsystems: Arc<Subsystems>,
    stop: Arc<AtomicBool>,
    poll: Poll,
    inbox: Receiver<(std::net::TcpStream, u16)>,
    conns: Vec<Option<Conn>>,
    gens: Vec<u32>,
    queues: BdevQueues,
    pool: BufPool,
    warn_limit: WarnLimit,
}

/// At most [`WarnLimit::BURST`] warnings per second; the rest are counted
/// and their number logged with the next one allowed.
struct WarnLimit {
    window: Instant,
    in_window: u32,
    suppressed: u64,
}

impl WarnLimit {
    const BURST: u32 = 20;

    fn new() -> Self {
        WarnLimit {
            window: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether a warning may be logged now; `Some(n)` with the number
    /// suppressed since the last one logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window >= Self::BURST {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Reactor {
    pub fn new(
        id: usize,
        params: Arc<Params>,
        subsystems: Arc<Subsystems>,
        stop: Arc<AtomicBool>,
    ) -> Result<(Reactor, Inbox, Arc<Waker>)> {
        let poll = Poll::new().map_err(io_err("epoll"))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_err("waker"))?);
        let (tx, rx) = channel();
        Ok((
            Reactor {
                id,
                subsystems: subsystems.clone(),
                stop,
                poll,
                inbox: rx,
                conns: Vec::new(),
                gens: Vec::new(),
                queues: BdevQueues::new(subsystems.clone()),
                pool: BufPool::new(64 << 20, params.reactor_xfer_bytes),
                params,
                warn_limit: WarnLimit::new(),
            },
            tx,
            waker,
        ))
    }

    fn adopt(&mut self, s: std::net::TcpStream, port: u16) {
        let peer = match s.peer_addr() {
            Ok(p) => p,
            Err(_) => return,
        };
        let live = self.conns.iter().filter(|c| c.is_some()).count();
        if live >= self.params.max_conns && !self.evict_one() {
            if let Some(n) = self.warn_limit.allow(Instant::now()) {
                tracing::warn!(%peer, suppressed = n, "connection limit reached and every connection is connected; refusing");
            }
            return;
        }
        if s.set_nonblocking(true).is_err() || s.set_nodelay(true).is_err() {
            return;
        }
        let mut stream = mio::net::TcpStream::from_std(s);
        let idx = match self.conns.iter().position(|c| c.is_none()) {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%peer, "cannot register connection: {e}");
            return;
        }
        self.gens[idx] = self.gens[idx].wrapping_add(1);
        tracing::info!(%peer, reactor = self.id, port, "connection accepted");
        self.conns[idx] = Some(Conn::new(
            stream,
            peer,
            port,
            self.subsystems.clone(),
            self.params.clone(),
        ));
    }

    /// Closes the oldest connection that has not completed Connect, to
    /// make room for a new one. Returns false if every one is connected.
    fn evict_one(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| !c.connected())
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i);
        let Some(idx) = oldest else {
            return false;
        };
        if let Some(c) = self.conns[idx].as_mut() {
            c.close = Some(CloseReason::Evicted);
        }
        self.close(idx);
        true
    }

    fn close(&mut self, idx: usize) {
        if let Some(mut c) = self.conns[idx].take() {
            let reason = c.close.take().unwrap_or(CloseReason::Shutdown);
            if !reason.is_abnormal() {
                tracing::info!(peer = %c.peer, qid = c.qid(), "connection closed: {reason}")
            } else if let Some(n) = self.warn_limit.allow(Instant::now()) {
                tracing::warn!(peer = %c.peer, qid = c.qid(), suppressed = n, "connection closed: {reason}")
            }
            let _ = self.poll.registry().deregister(&mut c.stream);
            c.release(&mut self.pool);
            self.gens[idx] = self.gens[idx].wrapping_add(1);
        }
    }

    /// Runs turns until the stop flag is set, then closes every
    /// connection and drains the backends briefly.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut comps: Vec<IoCompletion> = Vec::with_capacity(256);
        let mut last_work = Instant::now();
        let mut last_tick = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            // Never sleep while a backend holds I/O: a polled device (VFIO)
            // has no descriptor to wake epoll with.
            let spinning = self.queues.pending() || last_work.elapsed() < self.params.spin;
            let timeout = if spinning {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("epoll failed: {e}");
                    break;
                }
            }
            self.note_events(&events);
            let mut work = self.receive();
            work |= self.complete_io(&mut comps);
            let now = Instant::now();
            let tick = now.duration_since(last_tick) >= Duration::from_millis(100);
            if tick {
                last_tick = now;
            }
            work |= self.send_and_reap(now, tick);
            if work {
                last_work = Instant::now();
            } else if spinning {
                // An idle spinning turn gives the CPU to any other runnable
                // thread on it (a bridge or initiator sharing the core)
                // instead of holding it for a whole scheduler slice; with
                // nothing else runnable sched_yield returns at once.
                std::thread::yield_now();
            }
        }
        self.shut_down(&mut comps);
    }

    /// Adopts handed-over connections and marks sockets readable/writable.
    fn note_events(&mut self, events: &Events) {
        for ev in events.iter() {
            if ev.token() == WAKER {
                while let Ok((s, port)) = self.inbox.try_recv() {
                    self.adopt(s, port);
                }
                continue;
            }
            if let Some(Some(c)) = self.conns.get_mut(ev.token().0) {
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    c.readable = true;
                }
                if ev.is_read_closed() || ev.is_error() {
                    c.read_closed = true;
                }
                if ev.is_writable() {
                    c.writable = true;
                }
            }
        }
    }

    /// Reads and runs the commands of every readable connection. Returns
    /// whether anything arrived.
    fn receive(&mut self) -> bool {
        let mut work = false;
        for idx in 0..self.conns.len() {
            let Some(c) = self.conns[idx].as_mut() else {
                continue;
            };
            let waiting = c.has_waiting();
            if (waiting || c.readable) && c.close.is_none() {
                let mut ctx = Ctx {
                    queues: &mut self.queues,
                    pool: &mut self.pool,
                    tag_base: tag_base(idx, self.gens[idx]),
                };
                if waiting {
                    // Budget freed since (a flush sent read data, another
                    // connection's write data arrived or it closed).
                    c.grant_transfers(&mut ctx);
                }
                if c.readable {
                    work |= c.on_readable(&mut ctx) > 0;
                }
            }
        }
        work
    }

    /// Retries refused submissions and hands every backend completion to
    /// its connection (a stale one's buffer goes back to the pool).
    /// Returns whether anything completed.
    fn complete_io(&mut self, comps: &mut Vec<IoCompletion>) -> bool {
        self.queues.retry();
        self.queues.poll(comps);
        let work = !comps.is_empty();
        for comp in comps.drain(..) {
            let (idx, gen, slot) = split_tag(comp.tag);
            match self.conns.get_mut(idx).and_then(|c| c.as_mut()) {
                Some(c) if self.gens[idx] & 0xffff == gen => {
                    c.io_done(slot, comp.result, comp.buf, &mut self.pool)
                }
                _ => {
                    if let Some(b) = comp.buf {
                        self.pool.put(b);
                    }
                }
            }
        }
        work
    }

    /// Flushes every connection's responses, runs the periodic checks on
    /// `tick`, and closes connections that are done. Returns whether
    /// anything was sent.
    fn send_and_reap(&mut self, now: Instant, tick: bool) -> bool {
        let mut work = false;
        for idx in 0..self.conns.len() {
            let Some(c) = self.conns[idx].as_mut() else {
                continue;
            };
            c.deliver_events();
            if c.has_tx() && c.writable {
                match c.flush(&mut self.pool) {
                    Ok(_) => work = true,
                    Err(e) => {
                        if c.close.is_none() {
                            c.close = Some(CloseReason::Io(e));
                        }
                        c.close_deadline = None;
                    }
                }
            }
            if tick {
                c.tick(now);
            }
            if c.close.is_some() {
                let drained = !c.has_tx() || c.close_deadline.is_none_or(|d| now >= d);
                if drained && c.outstanding_io == 0 || c.close_deadline.is_some_and(|d| now >= d) {
                    self.close(idx);
                } else if c.close_deadline.is_none() {
                    c.close_deadline = Some(now + Duration::from_secs(1));
                }
            }
        }
        work
    }

    /// Shutdown: closes every connection, then drains outstanding bdev
    /// I/O for up to two seconds.
    fn shut_down(&mut self, comps: &mut Vec<IoCompletion>) {
        for idx in 0..self.conns.len() {
            if let Some(c) = self.conns[idx].as_mut() {
                c.close.get_or_insert(CloseReason::Shutdown);
            }
            self.close(idx);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.queues.pending() && Instant::now() < deadline {
            self.queues.poll(comps);
            comps.clear();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A reactor's inbox: a new connection and the port it arrived on.
pub(crate) type Inbox = Sender<(std::net::TcpStream, u16)>;
/// Every reactor's inbox and waker.
pub(crate) type Inboxes = Arc<Vec<(Inbox, Arc<Waker>)>>;

/// Accepts connections on port `port` and hands them to reactors round-robin.
pub(crate) fn accept_loop(l: TcpListener, port: u16, inboxes: Inboxes, stop: Arc<AtomicBool>) {
    let mut listener = mio::net::TcpListener::from_std(l);
    let Ok(mut poll) = Poll::new() else {
        tracing::error!("acceptor: cannot create epoll");
        return;
    };
    if poll
        .registry()
        .register(&mut listener, Token(0), Interest::READABLE)
        .is_err()
    {
        tracing::error!("acceptor: cannot register listener");
        return;
    }
    let mut events = Events::with_capacity(16);
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(100)))
            .is_err()
        {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    // SAFETY: into_raw_fd transfers ownership of a valid, open socket descriptor to the std stream, which closes it.
                    let std_stream = unsafe {
                        <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(
                            std::os::fd::IntoRawFd::into_raw_fd(s),
                        )
                    };
                    let (tx, waker) = &inboxes[next % inboxes.len()];
                    next += 1;
                    if tx.send((std_stream, port)).is_ok() {
                        let _ = waker.wake();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Pins the calling thread to one CPU.
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is bounds-checked by the macro against CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 means the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::warn!(
            cpu,
            "cannot pin reactor: {}",
            std::io::Error::last_os_error()
        );
    } else {
        tracing::info!(cpu, "reactor pinned");
    }
}
