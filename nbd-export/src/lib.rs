//! unvme's NBD server: exports any [`unvme_bdev::Bdev`] (a remote NVMe/TCP
//! namespace, a RAM disk, a file) to NBD clients — the Linux kernel's
//! `nbd-client`, qemu, libnbd's tools, fio's nbd engine.
//!
//! - [`proto`]: the wire formats and the request validator (pure, proptested);
//! - [`handshake`]: fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST,
//!   ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`);
//! - [`conn`]: the transmission phase of one connection — one thread, one
//!   device queue, pipelined requests answered out of order; BLOCK_STATUS
//!   reports the device's holes (RAM pages never written or trimmed, file
//!   holes) as HOLE|ZERO, so `qemu-img convert` and `nbdcopy` copy sparsely;
//! - [`server`]: TCP and Unix listeners, one thread per connection.
//!
//! It is not an NBD client, does not do TLS, and does not speak the
//! extended-headers extension (those options are answered ERR_UNSUP).

pub mod conn;
pub mod handshake;
pub mod proto;
pub mod server;

pub use conn::Limits;
pub use server::{Export, Listen, Server, ServerConfig};

/// Errors of the NBD server outside the per-request path (per-request
/// failures are NBD errnos, see [`proto::check_request`] and
/// [`proto::errno_for`]).
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A socket operation failed.
    #[error("socket error while {what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The client closed the connection during the handshake.
    #[error("client closed the connection during the handshake")]
    Closed,
    /// The client broke the handshake protocol.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Opening a device queue failed.
    #[error("block device: {0}")]
    Bdev(#[source] unvme_bdev::Error),
    /// The configuration cannot be served.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
