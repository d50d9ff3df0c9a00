//! unvme's vhost-user-blk device: exports any unvme [`Bdev`] to a QEMU guest
//! as a virtio-blk disk over a vhost-user Unix socket.
//!
//! Built on the rust-vmm crates: `vhost` (the vhost-user protocol),
//! `vhost-user-backend` (the daemon and per-queue epoll threads),
//! `virtio-queue` (split virtqueues) and `vm-memory` (guest memory). Each
//! virtqueue is served by one thread that owns one device queue — for a
//! remote NVMe/TCP namespace, one queue pair — with many requests in flight.
//!
//! Layers: [`spec`] has the virtio-blk wire formats; [`request`] turns a
//! descriptor chain into a block request (or a status for bad input);
//! [`worker`] runs one virtqueue against one `BdevQueue`; [`backend`] is the
//! `VhostUserBackend`; [`server`] listens on the socket and serves one
//! frontend connection after another.
//!
//! Not here: the inflight-fd region for reconnect without losing in-flight
//! requests, and zero-copy data movement (data is copied between guest
//! memory and a per-request buffer; see [`worker`]).
//!
//! [`Bdev`]: unvme_bdev::Bdev

pub mod backend;
pub mod request;
pub mod server;
pub mod spec;
pub mod worker;

pub use backend::{BlkBackend, DeviceOptions, Geometry};
pub use server::{Server, ServerConfig};

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
    /// The vhost-user daemon failed (socket, protocol, threads).
    #[error("vhost-user: {0}")]
    VhostUser(String),
    /// An operating-system error.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
