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

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use unvme_bdev::Bdev;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError, Listener};

use crate::backend::{BlkBackend, DeviceOptions, Geometry};
use crate::handler::BlkHandler;
use crate::{Error, Result};

/// What to export and where.
#[derive(Clone)]
pub struct ServerConfig {
    /// The vhost-user socket (replaced if it exists).
    pub socket: PathBuf,
    /// The device to export.
    pub bdev: Arc<dyn Bdev>,
    /// Queue, cache and polling options.
    pub device: DeviceOptions,
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
        let mut listener = Listener::new(&cfg.socket, true).map_err(|source| Error::Listen {
            socket: cfg.socket.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let socket = cfg.socket.clone();
        let (stop2, current2) = (stop.clone(), current.clone());
        let thread = std::thread::Builder::new()
            .name("vhost-blk-listen".into())
            .spawn(move || serve(&cfg, &mut listener, &stop2, &current2))
            .map_err(|e| Error::Io {
                what: "spawning the listener thread",
                source: e,
            })?;
        tracing::info!(socket = %socket.display(), "vhost-user-blk listening");
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

/// The accept loop: one connection at a time until `stop`.
fn serve(
    cfg: &ServerConfig,
    listener: &mut Listener,
    stop: &AtomicBool,
    current: &Mutex<Option<UnixStream>>,
) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        let backend = Arc::new(BlkBackend::new(&cfg.bdev, &cfg.device)?);
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => return Err(Error::Accept(e)),
        };
        if stop.load(Ordering::SeqCst) {
            // Our own wake-up connection from `Server::shutdown`.
            break;
        }
        let handler = Arc::new(Mutex::new(BlkHandler::new(backend)?));
        let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
        if let Ok(mut cur) = current.lock() {
            *cur = conn.try_clone_connection().ok();
        }
        tracing::info!("frontend connected");
        let end = loop {
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
                break e;
            }
        };
        if let Ok(mut cur) = current.lock() {
            *cur = None;
        }
        match end {
            VhostUserError::Disconnected | VhostUserError::PartialMessage => {
                tracing::info!("frontend disconnected")
            }
            VhostUserError::SocketBroken(_) if stop.load(Ordering::SeqCst) => {
                tracing::info!("frontend disconnected")
            }
            e => tracing::warn!(error = %e, "frontend connection ended"),
        }
        drop(conn);
        // Queue threads finish what is in flight and exit.
        if let Ok(mut h) = handler.lock() {
            h.shutdown();
        };
    }
    Ok(())
}
