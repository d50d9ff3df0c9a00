//! [`Server`]: listens on TCP addresses and Unix sockets and serves each
//! NBD connection on its own thread with its own device queue (for a remote
//! namespace, its own NVMe/TCP queue pair), so connections share no lock.
//!
//! Connections still negotiating and negotiated ones have separate limits
//! ([`ServerConfig::max_handshakes`], [`ServerConfig::max_connections`]): a
//! flood of silent sockets evicts the oldest of its own kind and never
//! takes a slot from a client that finished the handshake. The handshake
//! has one total deadline. Slots are held by guards, so a connection thread
//! that panics gives its slot back while unwinding.
//!
//! It is not a process supervisor: signals, logging setup and the choice of
//! devices belong to the caller (`unvme nbd`).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use unvme_bdev::Bdev;

use crate::conn::{Budget, Conn, Limits, Stream};
use crate::handshake::{self, ExportMeta};
use crate::proto::{tflag, BlockSizes, ExportView};
use crate::{Error, Result};

/// One export: a device and the names it answers to.
#[derive(Clone)]
pub struct Export {
    /// The name `NBD_OPT_LIST` shows.
    pub name: String,
    /// Further names (the first export also answers to `""`).
    pub aliases: Vec<String>,
    /// Description.
    pub description: String,
    /// The device.
    pub bdev: Arc<dyn Bdev>,
    /// Refuse writes (EPERM) and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("aliases", &self.aliases)
            .field("read_only", &self.read_only)
            .field("bdev", &self.bdev.info().name)
            .finish()
    }
}

impl Export {
    /// Transmission flags (without `SEND_DF`, which depends on the session).
    pub fn tflags(&self) -> u16 {
        let i = self.bdev.info();
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_CACHE
            | tflag::CAN_MULTI_CONN;
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            if i.deallocate {
                f |= tflag::SEND_TRIM;
            }
            if i.write_zeroes {
                f |= tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
            }
        }
        f
    }

    pub(crate) fn meta(&self) -> ExportMeta {
        let i = self.bdev.info();
        let mut names = vec![self.name.clone()];
        names.extend(self.aliases.iter().cloned());
        ExportMeta {
            names,
            description: self.description.clone(),
            size: i.size_bytes(),
            sizes: BlockSizes::for_block_size(i.block_size),
            tflags: self.tflags(),
        }
    }
}

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (port 0 picks one; see [`Server::local_addrs`]).
    Tcp(SocketAddr),
    /// A Unix socket path (an existing socket file is replaced).
    Unix(PathBuf),
}

/// What to serve and how.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Listeners.
    pub listen: Vec<Listen>,
    /// Exports; the first is the default (`""`).
    pub exports: Vec<Export>,
    /// Per-connection bounds.
    pub limits: Limits,
    /// Negotiated connections served at once (default 64). A client that
    /// completes the handshake when all are taken gets
    /// `NBD_REP_ERR_SHUTDOWN` (GO) or is closed (EXPORT_NAME).
    pub max_connections: usize,
    /// Connections still in the handshake at once (default 16); these
    /// never take a negotiated slot. A new connection beyond this evicts
    /// the oldest one still negotiating.
    pub max_handshakes: usize,
    /// Time a client has for the whole handshake (default 30 s).
    pub handshake_timeout: Duration,
    /// Bytes of data buffers all connections together may hold (default
    /// 512 MiB); a connection that would exceed it waits. Memory stays
    /// under this plus 1 MiB and 64 KiB of input buffer per connection.
    pub max_buffer_bytes: usize,
}

/// The server-wide limits' defaults, in one place (the per-connection ones
/// are [`Limits::default`]); see the fields of [`ServerConfig`].
#[derive(Clone, Copy, Debug)]
pub struct ServerDefaults {
    /// [`ServerConfig::max_connections`]: 64.
    pub max_connections: usize,
    /// [`ServerConfig::max_handshakes`]: 16.
    pub max_handshakes: usize,
    /// [`ServerConfig::handshake_timeout`]: 30 s.
    pub handshake_timeout: Duration,
    /// [`ServerConfig::max_buffer_bytes`]: 512 MiB.
    pub max_buffer_bytes: usize,
}

impl ServerDefaults {
    /// The defaults.
    pub const fn new() -> Self {
        ServerDefaults {
            max_connections: 64,
            max_handshakes: 16,
            handshake_timeout: Duration::from_secs(30),
            max_buffer_bytes: 512 << 20,
        }
    }
}

impl Default for ServerDefaults {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerConfig {
    /// A configuration with default limits.
    pub fn new(listen: Vec<Listen>, exports: Vec<Export>) -> Self {
        let d = ServerDefaults::new();
        ServerConfig {
            listen,
            exports,
            limits: Limits::default(),
            max_connections: d.max_connections,
            max_handshakes: d.max_handshakes,
            handshake_timeout: d.handshake_timeout,
            max_buffer_bytes: d.max_buffer_bytes,
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

struct Shared {
    exports: Vec<Export>,
    metas: Vec<ExportMeta>,
    limits: Limits,
    max_connections: usize,
    max_handshakes: usize,
    handshake_timeout: Duration,
    stop: Arc<AtomicBool>,
    /// Negotiated connections.
    connections: AtomicUsize,
    /// Connections in the handshake, oldest first: an id and a duplicate
    /// of the socket to shut down when evicting it.
    handshakes: Mutex<VecDeque<(u64, OwnedFd)>>,
    budget: Budget,
}

/// A running NBD server.
pub struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    local: Vec<Listen>,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds every listener and starts accepting connections.
    pub fn start(cfg: ServerConfig) -> Result<Server> {
        if cfg.exports.is_empty() {
            return Err(Error::Config("no export".into()));
        }
        if cfg.listen.is_empty() {
            return Err(Error::Config("nothing to listen on".into()));
        }
        let mut listeners = Vec::new();
        let mut local = Vec::new();
        for l in &cfg.listen {
            match l {
                Listen::Tcp(a) => {
                    let t = TcpListener::bind(a).map_err(|source| Error::Io {
                        what: "binding the TCP listener",
                        source,
                    })?;
                    let la = t.local_addr().map_err(|source| Error::Io {
                        what: "reading the listen address",
                        source,
                    })?;
                    info!(la = %la, "listening");
                    local.push(Listen::Tcp(la));
                    listeners.push(Listener::Tcp(t));
                }
                Listen::Unix(p) => {
                    if std::fs::symlink_metadata(p)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    {
                        let _ = std::fs::remove_file(p);
                    }
                    let u = UnixListener::bind(p).map_err(|source| Error::Io {
                        what: "binding the Unix socket",
                        source,
                    })?;
                    info!(path = %p.display(), "listening");
                    local.push(Listen::Unix(p.clone()));
                    listeners.push(Listener::Unix(u, p.clone()));
                }
            }
        }
        for l in &listeners {
            let r = match l {
                Listener::Tcp(t) => t.set_nonblocking(true),
                Listener::Unix(u, _) => u.set_nonblocking(true),
            };
            r.map_err(|source| Error::Io {
                what: "configuring a listener",
                source,
            })?;
        }
        for e in &cfg.exports {
            let i = e.bdev.info();
            info!(
                export = %e.name,
                size = i.size_bytes(),
                block_size = i.block_size,
                read_only = e.read_only,
                "export"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            metas: cfg.exports.iter().map(Export::meta).collect(),
            exports: cfg.exports,
            limits: cfg.limits,
            max_connections: cfg.max_connections.max(1),
            max_handshakes: cfg.max_handshakes.max(1),
            handshake_timeout: cfg.handshake_timeout,
            stop: stop.clone(),
            connections: AtomicUsize::new(0),
            handshakes: Mutex::new(VecDeque::new()),
            budget: Budget::new(cfg.max_buffer_bytes),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listeners, sh))
            .map_err(|source| Error::Io {
                what: "spawning the accept thread",
                source,
            })?;
        Ok(Server {
            stop,
            acceptor: Some(acceptor),
            local,
            shared,
        })
    }

    /// The bound listeners (TCP ports resolved).
    pub fn local_addrs(&self) -> &[Listen] {
        &self.local
    }

    /// Bytes of data buffers the connections hold now (against
    /// [`ServerConfig::max_buffer_bytes`]).
    pub fn buffer_bytes(&self) -> usize {
        self.shared.budget.used()
    }

    /// Connections negotiated and being served now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The flag that stops the server (set it from a signal handler).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits until the stop flag is set and every connection has ended.
    pub fn wait(mut self) {
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    /// Records a new connection as negotiating, evicting the oldest
    /// negotiating one when there are `max_handshakes` already. False if
    /// the socket cannot be tracked (it is then closed).
    fn register_handshake(&self, id: u64, s: &Conn2, peer: &str) -> bool {
        let dup = match s {
            Conn2::Tcp(s) => s.try_clone().map(OwnedFd::from),
            Conn2::Unix(s) => s.try_clone().map(OwnedFd::from),
        };
        let dup = match dup {
            Ok(d) => d,
            Err(e) => {
                warn!(%peer, error = %e, "cannot track an NBD connection; closing it");
                return false;
            }
        };
        let mut hs = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        while hs.len() >= self.max_handshakes {
            let Some((_, old)) = hs.pop_front() else {
                break;
            };
            warn!(%peer, "too many NBD connections negotiating; evicting the oldest");
            // SAFETY: `old` is an open socket descriptor we own; shutdown(2) only changes the socket's state, and the connection thread sees EOF/EPIPE.
            unsafe {
                libc::shutdown(old.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        hs.push_back((id, dup));
        true
    }

    /// The connection `id` left the handshake (or ended).
    fn unregister_handshake(&self, id: u64) {
        let mut hs = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = hs.iter().position(|(x, _)| *x == id) {
            hs.remove(i);
        }
    }

    /// Takes a negotiated slot, if one is free.
    fn take_slot(&self) -> Result<SlotGuard<'_>> {
        let old = self.connections.fetch_add(1, Ordering::Relaxed);
        if old >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Busy(self.max_connections));
        }
        Ok(SlotGuard(self))
    }
}

/// A connection in the handshake; leaving it (or the thread) drops it.
struct HandshakeGuard<'a> {
    id: u64,
    sh: &'a Shared,
}

impl Drop for HandshakeGuard<'_> {
    fn drop(&mut self) {
        self.sh.unregister_handshake(self.id);
    }
}

/// A negotiated slot, released on drop (a panic included).
struct SlotGuard<'a>(&'a Shared);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn accept_loop(listeners: Vec<Listener>, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    let mut pfds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: match l {
                Listener::Tcp(t) => t.as_raw_fd(),
                Listener::Unix(u, _) => u.as_raw_fd(),
            },
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !shared.stop.load(Ordering::Relaxed) {
        // SAFETY: `pfds` is a live, exclusively borrowed array of `pfds.len()` pollfd entries whose fds are owned by `listeners`.
        unsafe {
            libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100);
        }
        conns.retain(|h| !h.is_finished());
        for l in &listeners {
            loop {
                let accepted = match l {
                    Listener::Tcp(t) => t.accept().map(|(s, peer)| {
                        let _ = s.set_nodelay(true);
                        (Conn2::Tcp(s), peer.to_string())
                    }),
                    Listener::Unix(u, p) => u
                        .accept()
                        .map(|(s, _)| (Conn2::Unix(s), p.display().to_string())),
                };
                match accepted {
                    Ok((s, peer)) => {
                        next_id += 1;
                        let id = next_id;
                        if !shared.register_handshake(id, &s, &peer) {
                            continue;
                        }
                        let sh = shared.clone();
                        let h =
                            std::thread::Builder::new()
                                .name("nbd-conn".into())
                                .spawn(move || {
                                    // Dropped however the thread ends, a
                                    // panic included: the slot is never leaked.
                                    let hs = HandshakeGuard { id, sh: &sh };
                                    match s {
                                        Conn2::Tcp(s) => serve(s, &peer, &sh, hs),
                                        Conn2::Unix(s) => serve(s, &peer, &sh, hs),
                                    }
                                });
                        match h {
                            Ok(h) => conns.push(h),
                            Err(e) => {
                                warn!(error = %e, "cannot spawn an NBD connection thread");
                                shared.unregister_handshake(id);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        break;
                    }
                }
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
    for l in listeners {
        if let Listener::Unix(_, p) = l {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Conn2 {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

trait Timeouts {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl Timeouts for std::net::TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, d)
    }
}

impl Timeouts for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, d)
    }
}

/// A stream whose reads and writes all share one deadline: a client that
/// sends a byte at a time cannot stretch the handshake past it.
struct Deadline<'a, S> {
    s: &'a mut S,
    until: Instant,
    total: Duration,
}

impl<S: Timeouts> Deadline<'_, S> {
    fn arm(&self, write: bool) -> std::io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                Error::HandshakeTimeout(self.total),
            ));
        }
        if write {
            self.s.set_write_timeout(Some(left))
        } else {
            self.s.set_read_timeout(Some(left))
        }
    }
}

impl<S: Read + Timeouts> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(false)?;
        self.s.read(buf)
    }
}

impl<S: Write + Timeouts> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(true)?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Handshake, then transmission, on one connection.
fn serve<S: Stream + Timeouts>(mut s: S, peer: &str, sh: &Shared, hs: HandshakeGuard<'_>) {
    if s.set_nonblocking(false).is_err() {
        return;
    }
    let mut d = Deadline {
        s: &mut s,
        until: Instant::now() + sh.handshake_timeout,
        total: sh.handshake_timeout,
    };
    let opened = handshake::negotiate(&mut d, &sh.metas, |x| {
        let slot = sh.take_slot().inspect_err(|e| {
            warn!(%peer, error = %e, "refusing an NBD client");
        })?;
        let q = sh.exports[x].bdev.open_queue().map_err(|e| {
            warn!(export = %sh.exports[x].name, error = %e, "cannot open a device queue");
            Error::OpenExport(e)
        })?;
        Ok((slot, q))
    });
    drop(hs);
    let (sess, (_slot, q)) = match opened {
        Ok(Some(x)) => x,
        Ok(None) => {
            debug!(%peer, "NBD client ended the negotiation");
            return;
        }
        Err(e) => {
            debug!(%peer, error = %e, "NBD handshake ended");
            return;
        }
    };
    let _ = s.set_read_timeout(None);
    let _ = s.set_write_timeout(None);
    let e = &sh.exports[sess.export];
    let meta = &sh.metas[sess.export];
    let info = e.bdev.info();
    let view = ExportView {
        size: meta.size,
        tflags: sess.tflags,
        sizes: meta.sizes,
        structured: sess.structured,
        base_allocation: sess.base_allocation,
        fast_zero: info.write_zeroes,
    };
    info!(%peer, export = %e.name, structured = sess.structured, "NBD client connected");
    match Conn::new(s, q, info, view, sh.limits, &sh.stop, &sh.budget) {
        Ok(c) => {
            let st = c.run();
            info!(%peer, requests = st.requests, errors = st.errors, "NBD client disconnected");
        }
        Err(e) => warn!(%peer, error = %e, "cannot set up the NBD connection"),
    }
}
