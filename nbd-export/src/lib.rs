//! unvme's NBD server: exports any [`unvme_bdev::Bdev`] (a remote NVMe/TCP
//! namespace, a RAM disk, a file) to NBD clients — the Linux kernel's
//! `nbd-client`, qemu, libnbd's tools, fio's nbd engine.
//!
//! Its parts (private modules; the crate root re-exports what a user needs):
//! - `proto`: the wire formats and the request validator (pure, proptested);
//! - `handshake`: fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST,
//!   ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`);
//! - `conn`: the transmission phase of one connection — one thread, one
//!   device queue, pipelined requests answered out of order; BLOCK_STATUS
//!   reports the device's holes (RAM pages never written or trimmed, file
//!   holes) as HOLE|ZERO, so `qemu-img convert` and `nbdcopy` copy sparsely;
//! - `server`: TCP and Unix listeners, one thread per connection.
//!
//! A user starts a [`Server`] with a [`ServerConfig`] of [`Export`]s and
//! [`Listen`] addresses. A client written against the server (the
//! integration tests) speaks the wire formats re-exported here: the
//! constant groups ([`cmd`], [`opt`], [`rep`], [`errno`], …) and the
//! messages ([`NbdRequest`], [`OptionHeader`], [`ReplyHeader`], …).
//!
//! It is not an NBD client, does not do TLS, and does not speak the
//! extended-headers extension (those options are answered ERR_UNSUP).

#![deny(missing_docs)]

mod conn;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod handshake;
mod proto;
mod server;

pub use conn::{Budget, Limits};
pub use proto::{
    cmd, cmdflag, errno, info, opt, rep, reply, tflag, BadOptionMagic, BadRequestMagic,
    InfoRequest, MetaContextRequest, NbdRequest, OptionHeader, OptionReply, ReplyHeader,
    BASE_ALLOCATION,
};
pub use server::{Export, Listen, Server, ServerConfig, ServerDefaults};

/// Errors of the NBD server outside the per-request path (per-request
/// failures are NBD errnos, chosen in one place by the request validator).
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
    /// The client sent flags this server does not know (the protocol
    /// requires closing the connection).
    #[error("handshake failed: unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option header without the `IHAVEOPT` magic.
    #[error("handshake failed: {0}")]
    BadOptionMagic(#[source] BadOptionMagic),
    /// An option whose data is too long to skip, or an `EXPORT_NAME` too
    /// long to answer.
    #[error("handshake failed: option {option} with {length} bytes of data")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its data length.
        length: u32,
    },
    /// The export the client chose with `NBD_OPT_EXPORT_NAME` cannot be
    /// opened (that option has no error reply: the connection ends).
    #[error("handshake failed: cannot open the device: {0}")]
    OpenExport(#[source] unvme_bdev::Error),
    /// Every negotiated-connection slot is taken (the client may retry).
    #[error("server busy: {0} NBD connections are already being served")]
    Busy(usize),
    /// The handshake took longer than the server allows.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The configuration cannot be served.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
