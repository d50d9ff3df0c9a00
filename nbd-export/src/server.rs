//! [`Server`]: listens on TCP addresses and Unix sockets and serves each
//! NBD connection on its own thread with its own device queue (for a remote
//! namespace, its own NVMe/TCP queue pair), so connections share no lock.
//!
//! It is not a process supervisor: signals, logging setup and the choice of
//! devices belong to the caller (`unvme nbd`).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};
use unvme_bdev::Bdev;

use crate::conn::{Conn, Limits, Stream};
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

    fn meta(&self) -> ExportMeta {
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
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Time a client has for each handshake read.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    /// A configuration with default limits.
    pub fn new(listen: Vec<Listen>, exports: Vec<Export>) -> Self {
        ServerConfig {
            listen,
            exports,
            limits: Limits::default(),
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
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
    handshake_timeout: Duration,
    stop: Arc<AtomicBool>,
    connections: AtomicUsize,
}

/// A running NBD server.
pub struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    local: Vec<Listen>,
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
            handshake_timeout: cfg.handshake_timeout,
            stop: stop.clone(),
            connections: AtomicUsize::new(0),
        });
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listeners, shared))
            .map_err(|source| Error::Io {
                what: "spawning the accept thread",
                source,
            })?;
        Ok(Server {
            stop,
            acceptor: Some(acceptor),
            local,
        })
    }

    /// The bound listeners (TCP ports resolved).
    pub fn local_addrs(&self) -> &[Listen] {
        &self.local
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

fn accept_loop(listeners: Vec<Listener>, shared: Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
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
                        if shared.connections.load(Ordering::Relaxed) >= shared.max_connections {
                            warn!(%peer, "too many NBD connections; refusing one");
                            continue;
                        }
                        shared.connections.fetch_add(1, Ordering::Relaxed);
                        let sh = shared.clone();
                        let h =
                            std::thread::Builder::new()
                                .name("nbd-conn".into())
                                .spawn(move || {
                                    match s {
                                        Conn2::Tcp(s) => serve(s, &peer, &sh),
                                        Conn2::Unix(s) => serve(s, &peer, &sh),
                                    }
                                    sh.connections.fetch_sub(1, Ordering::Relaxed);
                                });
                        match h {
                            Ok(h) => conns.push(h),
                            Err(e) => {
                                warn!(error = %e, "cannot spawn an NBD connection thread");
                                shared.connections.fetch_sub(1, Ordering::Relaxed);
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

/// Handshake, then transmission, on one connection.
fn serve<S: Stream + Timeouts>(mut s: S, peer: &str, sh: &Shared) {
    let t = Some(sh.handshake_timeout);
    if s.set_nonblocking(false).is_err()
        || s.set_read_timeout(t).is_err()
        || s.set_write_timeout(t).is_err()
    {
        return;
    }
    let opened = handshake::negotiate(&mut s, &sh.metas, |x| {
        sh.exports[x].bdev.open_queue().inspect_err(|e| {
            warn!(export = %sh.exports[x].name, error = %e, "cannot open a device queue");
        })
    });
    let (sess, q) = match opened {
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
    match Conn::new(s, q, info, view, sh.limits, &sh.stop) {
        Ok(c) => {
            let st = c.run();
            info!(%peer, requests = st.requests, errors = st.errors, "NBD client disconnected");
        }
        Err(e) => warn!(%peer, error = %e, "cannot set up the NBD connection"),
    }
}
