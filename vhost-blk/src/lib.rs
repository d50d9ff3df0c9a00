//! unvme's vhost-user-blk device: exports any unvme [`Bdev`] to a QEMU guest
//! as a virtio-blk disk over a vhost-user Unix socket.
//!
//! Built on the rust-vmm crates: `vhost` (the vhost-user protocol and its
//! message loop), `vhost-user-backend` (the ring state, `VringRwLock`),
//! `virtio-queue` (split virtqueues) and `vm-memory` (guest memory). Each
//! virtqueue is served by one thread that owns one device queue — for a
//! remote NVMe/TCP namespace, one queue pair — with many requests in flight.
//!
//! Layers (private modules; the crate root re-exports what a user needs):
//! `spec` has the virtio-blk wire formats; `request` turns a descriptor
//! chain into a block request (or a status for bad input); `worker` runs
//! one virtqueue against one `BdevQueue`; `backend` holds the device
//! (features, configuration space, memory, workers) and runs a queue;
//! `handler` answers the vhost-user messages and owns the queue threads;
//! `inflight` is the shared in-flight region and `chain` walks a chain from
//! its head; `server` listens on the socket and serves one frontend
//! connection after another. A user starts a [`Server`] with a
//! [`ServerConfig`]; a frontend written against the device (a test, a
//! benchmark driver) speaks the wire formats re-exported here
//! ([`OutHdr`], [`req_type`], [`Status`], [`features`], …).
//!
//! With the `test-utils` feature the inflight region's layout is exported
//! too (`InflightRegion` and its per-queue view, `QueueInflight`), so a
//! test can play QEMU's part: inspect what the device records and craft the
//! state a dead device would have left.
//!
//! A restarted device serves a reconnecting QEMU (`-chardev
//! socket,reconnect-ms=…`) without losing or repeating requests:
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` is offered, the device records
//! in the region QEMU keeps (GET/SET_INFLIGHT_FD) every chain it takes and
//! returns, and the next process resubmits what the dead one had taken and
//! not returned, oldest first, before taking new chains; so neither the
//! requests still in flight nor those that had completed out of order
//! around them are lost or executed twice. It logs `queue N: resubmitting K
//! in-flight requests`.
//!
//! Data is not copied: the device queue gets the guest's pages themselves
//! as the request's buffers (one run of host memory as one buffer,
//! scattered pages as the request's segments), so a remote namespace sends
//! and receives them on the NVMe/TCP socket directly (see `worker`). Only
//! a device queue that takes one buffer per request (a file under O_DIRECT)
//! gets scattered data gathered into a buffer.
//!
//! Not here: packed virtqueues (not offered, so only the split-ring inflight
//! layout), CONFIGURE_MEM_SLOTS, dirty-page logging (LOG_ALL is not offered,
//! so no live migration of the guest while attached).
//!
//! [`Bdev`]: unvme_bdev::Bdev

#![deny(missing_docs)]

mod backend;
mod chain;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handler;
mod inflight;
mod request;
mod server;
mod spec;
mod worker;

pub use backend::{DeviceOptions, Geometry};
pub use server::{
    Server, ServerConfig, SocketOptions, DEFAULT_FIRST_MESSAGE_TIMEOUT, DEFAULT_SOCKET_MODE,
};
pub use spec::{features, req_type, DiscardWriteZeroes, OutHdr, Status};

#[cfg(feature = "test-utils")]
pub use inflight::{queue_region_size, region_size, InflightError, InflightRegion, QueueInflight};

/// Errors setting up or running the vhost-user-blk device (per-request
/// failures are virtio-blk statuses, not errors).
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The device cannot be exported with these options.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The block device failed (opening a queue).
    #[error("block device: {0}")]
    Bdev(#[source] unvme_bdev::Error),
    /// The vhost-user socket cannot be listened on.
    #[error("vhost-user: listen on {}: {source}", socket.display())]
    Listen {
        /// The socket path.
        socket: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a frontend connection failed.
    #[error("vhost-user: accept: {0}")]
    Accept(#[source] std::io::Error),
    /// A virtqueue's ring state cannot be created.
    #[error("vhost-user: virtqueue {queue}: {source}")]
    Virtqueue {
        /// The queue index.
        queue: usize,
        /// The underlying error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The thread serving the socket panicked.
    #[error("vhost-user: listener thread panicked")]
    ListenerPanicked,
    /// An operating-system error.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
