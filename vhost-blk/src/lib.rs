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
//! A restarted device serves a reconnecting QEMU (`-chardev
//! socket,reconnect-ms=…`): each connection gets fresh queues, and QEMU
//! restarts the rings from their used index, so requests that were in
//! flight when the old process died are fetched again.
//!
//! Not here: `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` (vhost-user-backend 0.24
//! refuses GET/SET_INFLIGHT_FD and keeps its request handler private, so it
//! needs a handler of our own); without it a request that had completed out
//! of order before a crash may be executed a second time. And zero-copy data
//! movement: data is copied between guest memory and a per-request buffer
//! (see [`worker`]).
//!
//! [`Bdev`]: unvme_bdev::Bdev

pub mod backend;
pub mod chain;
pub mod handler;
pub mod inflight;
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
