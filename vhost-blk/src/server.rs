//! The listening side: one Unix socket, one frontend (QEMU) at a time, one
//! connection after another.
//!
//! Each accepted connection gets a fresh [`BlkBackend`] (fresh device queues)
//! and a fresh [`BlkHandler`] (fresh queue threads), driven by the `vhost`
//! crate's `BackendReqHandler` on this thread; when the frontend goes away
//! (guest shut down, QEMU restarted or reconnecting) the device waits for
//! the next one. [`Server::shutdown`] ends the current connection and the
//! accept loop.
//!
//! A frontend that reconnects after this process was restarted hands back
//! its inflight region (SET_INFLIGHT_FD), and the new process resubmits what
//! the old one left in flight (see [`crate::inflight`]).
//!
//! Whoever can connect to the socket drives the disk, so the socket is
//! created with [`SocketOptions::mode`] (default 0600: the owner only) and
//! optionally handed to a group, before it listens (no window with the
//! process umask's permissions). Only one frontend is served at a time, so
//! a peer that connects and says nothing would keep QEMU out: the first
//! message must arrive within [`SocketOptions::first_message_timeout`]
//! (default 10 s), whole, or the peer is logged (pid, uid, gid from
//! SO_PEERCRED) and dropped. After that a frontend may stay silent between
//! messages as long as it likes (QEMU does, until the guest driver starts
//! the device), but a message once begun must arrive whole within the same
//! timeout. So a peer that speaks and then falls silent between messages
//! still holds the socket until it goes away; that cannot be told apart
//! from an idle QEMU.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unvme_bdev::Bdev;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

use crate::backend::{BlkBackend, DeviceOptions, Geometry};
use crate::handler::BlkHandler;
use crate::{Error, Result};

/// Default permission bits of the socket: the owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Default deadline for a new connection's first message.
pub const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may connect to the socket, and how long a connection may say
/// nothing before it is dropped.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// Permission bits of the socket file; connecting needs write
    /// permission, and whoever connects has the whole disk. Default
    /// [`DEFAULT_SOCKET_MODE`] (0600).
    pub mode: u32,
    /// Group the socket file is given (so a QEMU running as another user
    /// in that group can connect with mode 0660). Default: the process's.
    pub group: Option<u32>,
    /// How long a connection has to send its first message before it is
    /// dropped (it would keep every other frontend out), and how long any
    /// later message may take to arrive whole once begun. Default
    /// [`DEFAULT_FIRST_MESSAGE_TIMEOUT`] (10 s).
    pub first_message_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            mode: DEFAULT_SOCKET_MODE,
            group: None,
            first_message_timeout: DEFAULT_FIRST_MESSAGE_TIMEOUT,
        }
    }
}

/// What to export and where.
#[derive(Clone)]
pub struct ServerConfig {
    /// The vhost-user socket (replaced if it exists).
    pub socket: PathBuf,
    /// The device to export.
    pub bdev: Arc<dyn Bdev>,
    /// Queue, cache and polling options.
    pub device: DeviceOptions,
    /// Socket permissions and the first-message deadline.
    pub listen: SocketOptions,
}

/// A running device; see the module documentation.
pub struct Server {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// The current connection, to shut it down from another thread.
    current: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<Result<()>>>,
    geometry: Geometry,
}

impl Server {
    /// Binds the socket and starts serving connections on a thread.
    pub fn start(cfg: ServerConfig) -> Result<Server> {
        let geometry = Geometry::new(cfg.bdev.info(), &cfg.device)?;
        let cfg_mode = cfg.listen.mode;
        let listener = listen(&cfg.socket, &cfg.listen).map_err(|source| Error::Listen {
            socket: cfg.socket.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let socket = cfg.socket.clone();
        let (stop2, current2) = (stop.clone(), current.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-blk-listen".into())
            .spawn(move || serve(&cfg, &listener, &stop2, &current2))
            .map_err(|e| Error::Io {
                what: "spawning the listener thread",
                source: e,
            })?;
        tracing::info!(
            socket = %socket.display(),
            mode = format_args!("{:#o}", cfg_mode),
            "vhost-user-blk listening"
        );
        Ok(Server {
            socket,
            stop,
            current,
            thread: Some(thread),
            geometry,
        })
    }

    /// The features, configuration space and limits offered.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// True once the serving thread has ended (an error, or shutdown).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Ends the current connection and the accept loop, and waits for the
    /// queue threads to finish what is in flight.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(cur) = self.current.lock() {
            if let Some(c) = cur.as_ref() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        // Wake a blocking accept() with a connection of our own; it sees EOF
        // at once and the loop then sees `stop`.
        let _ = UnixStream::connect(&self.socket);
        let r = match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(Error::ListenerPanicked)),
            None => Ok(()),
        };
        let _ = std::fs::remove_file(&self.socket);
        r
    }
}

/// Creates the listening socket at `path` (replacing what is there) with
/// `opts`' permissions and group, set before it listens: until `listen`
/// a connect is refused, so no peer gets in under the umask's permissions.
fn listen(path: &Path, opts: &SocketOptions) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or not a C string",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, initialised sockaddr_un of `len` bytes.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let set = || -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode & 0o777))?;
        if let Some(gid) = opts.group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        Ok(())
    };
    if let Err(e) = set() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: `fd` is a bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Who is on the other end of `s` (SO_PEERCRED): pid, uid, gid.
fn peer_cred(s: &UnixStream) -> Option<(i32, u32, u32)> {
    // SAFETY: ucred is plain old data; all zeroes is a valid value.
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a writable ucred of `len` bytes; the kernel writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut c).cast(),
            &mut len,
        )
    };
    (r == 0).then_some((c.pid, c.uid, c.gid))
}

/// vhost-user message header: request (u32), flags (u32), size (u32).
const HDR_LEN: usize = 12;
/// Largest message waited for whole (the vhost-user limit on a payload);
/// anything larger is left to the vhost crate to refuse.
const MSG_MAX: usize = HDR_LEN + 0x1000;

/// Waits until `s` holds a whole message (or EOF, or our own shutdown).
/// Its first byte must arrive by `first_byte` (`None`: no limit; a
/// frontend may stay silent between messages), the whole message within
/// `timeout` of that (and by `first_byte` too). False if a deadline passed
/// first. The bytes are only peeked at: the vhost crate reads them (an
/// honest frontend sends each message, descriptors included, in one
/// `sendmsg`, which one peek sees whole).
///
/// While a message is partial the socket stays readable, so between peeks
/// the wait sleeps in short steps (a hostile peer's half message costs a
/// wake-up every 10 ms, and only until the deadline).
fn message_before(
    s: &UnixStream,
    first_byte: Option<Instant>,
    timeout: Duration,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut deadline = first_byte;
    loop {
        let ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        // SAFETY: `buf` is writable for its length; MSG_PEEK leaves the bytes (and any attached descriptors) queued.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            // EOF (or our shutdown): let the connection see it.
            return Ok(true);
        }
        if n >= HDR_LEN {
            let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
            if n >= HDR_LEN.saturating_add(size) || n == buf.len() {
                return Ok(true);
            }
        }
        // Part of a message is here: the rest is due within `timeout`.
        let rest = Instant::now() + timeout;
        let d = deadline.map_or(rest, |d| d.min(rest));
        deadline = Some(d);
        std::thread::sleep(
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(10)),
        );
    }
}

/// The accept loop: one connection at a time until `stop`.
fn serve(
    cfg: &ServerConfig,
    listener: &UnixListener,
    stop: &AtomicBool,
    current: &Mutex<Option<UnixStream>>,
) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        let backend = Arc::new(BlkBackend::new(&cfg.bdev, &cfg.device)?);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Accept(e)),
        };
        if stop.load(Ordering::SeqCst) {
            // Our own wake-up connection from `Server::shutdown`.
            break;
        }
        let (pid, uid, gid) = peer_cred(&stream).unwrap_or((-1, u32::MAX, u32::MAX));
        // Registered at once, so a shutdown also ends the wait below.
        if let Ok(mut cur) = current.lock() {
            *cur = stream.try_clone().ok();
        }
        let timeout = cfg.listen.first_message_timeout;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; MSG_MAX];
        match message_before(&stream, Some(deadline), timeout, &mut buf) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    pid,
                    uid,
                    gid,
                    timeout_ms = timeout.as_millis() as u64,
                    "vhost-user peer sent no whole message before the first-message deadline; dropped"
                );
                clear(current);
                continue;
            }
            Err(e) => {
                tracing::warn!(pid, uid, gid, error = %e, "vhost-user peer: poll");
                clear(current);
                continue;
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let peek = stream.try_clone().map_err(|source| Error::Io {
            what: "dup of the frontend connection",
            source,
        })?;
        let handler = Arc::new(Mutex::new(BlkHandler::new(backend)?));
        let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
        tracing::info!(pid, uid, gid, "frontend connected");
        let mut first = true;
        // None: the frontend stalled in the middle of a message (logged).
        let end = loop {
            // Silent between messages as long as it likes; each message,
            // once begun, whole within the timeout.
            if !std::mem::take(&mut first) {
                match message_before(&peek, None, timeout, &mut buf) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            pid,
                            uid,
                            gid,
                            timeout_ms = timeout.as_millis() as u64,
                            "frontend stalled in the middle of a message; dropped"
                        );
                        break None;
                    }
                    Err(e) => break Some(VhostUserError::SocketError(e)),
                }
            }
            let Err(e) = conn.handle_request() else {
                continue;
            };
            // A request the handler refused has been answered (REPLY_ACK)
            // and logged; anything else ends the connection.
            let refused = handler
                .lock()
                .map(|mut h| h.take_refused())
                .unwrap_or(false);
            if !refused || stop.load(Ordering::SeqCst) {
                break Some(e);
            }
        };
        clear(current);
        match end {
            None => {}
            Some(VhostUserError::Disconnected | VhostUserError::PartialMessage) => {
                tracing::info!(pid, uid, "frontend disconnected")
            }
            Some(VhostUserError::SocketBroken(_)) if stop.load(Ordering::SeqCst) => {
                tracing::info!(pid, uid, "frontend disconnected")
            }
            Some(e) => tracing::warn!(pid, uid, error = %e, "frontend connection ended"),
        }
        drop(conn);
        drop(peek);
        // Queue threads finish what is in flight and exit.
        if let Ok(mut h) = handler.lock() {
            h.shutdown();
        };
    }
    Ok(())
}

/// The connection is over: nothing for `Server::shutdown` to end.
fn clear(current: &Mutex<Option<UnixStream>>) {
    if let Ok(mut cur) = current.lock() {
        *cur = None;
    }
}
