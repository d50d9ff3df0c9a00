//! The unvme NVMe/TCP host: connects to an NVMe over Fabrics controller over
//! TCP, runs its admin queue, and opens poll-mode I/O queue pairs.
//!
//! - [`Controller`]: the admin side. [`Controller::connect`] performs the
//!   connection initialization (ICReq/ICResp), Fabrics Connect, property
//!   get/set to enable the controller, Identify and Set Features (Number of
//!   Queues); the admin API is synchronous and a background thread sends
//!   Keep Alive at KATO/2.
//! - [`IoQpair`]: one I/O queue on its own TCP connection, owned by one
//!   thread, non-blocking and polled. Command slots, buffers and send queue
//!   are preallocated, so the steady-state I/O path takes no lock and does
//!   not allocate. Read data lands straight in the request's buffer.
//! - [`RemoteNamespace`]: a remote namespace as an [`unvme_bdev::Bdev`],
//!   over one path or several (multipath by ANA state, [`IoPolicy`]), that
//!   rides through faults as the Linux host does ([`Recovery`]:
//!   `ctrl_loss_tmo`, `reconnect_delay`, `fast_io_fail_tmo`): requests are
//!   held while no path can carry them and resubmitted on reconnection or
//!   on another path, a keep-alive failure or a command timeout (Abort,
//!   then a controller reset) leads to a new association, and each request
//!   completes exactly once.
//!
//! A queue pair itself does not reconnect: a vanished peer ends every
//! outstanding command as lost ([`NvmeCompletion::lost`], result
//! [`unvme_bdev::IoError::Unavailable`]) with its buffers, and the queue
//! pair reports itself closed.
//!
//! The controller is not trusted. A command completes successfully only
//! when every byte of its data moved exactly once: C2HData in order (DATAO
//! where the previous PDU ended), inside the command's length, SUCCESS only
//! on the PDU that ends the data, a successful CapsuleResp only after all of
//! it; for writes, every byte asked for by R2T and sent. The host offers
//! MAXR2T 0 (one outstanding R2T per command), and an R2T is accepted only
//! for a write moved by R2T, once the previous one's data is sent, for the
//! next bytes in order — so the send queue holds at most each outstanding
//! command's data once. A response, C2HData or R2T for a command that does
//! not exist is a protocol violation too. Each of these ends the connection
//! (H2CTermReq with the Fatal Error Status, unless a PDU is half sent, then
//! close), failing its commands with `Unavailable`, never completing one
//! with whatever was in its buffer. Command timeouts fire whatever the
//! socket does: a command past its deadline whose data the controller is
//! not reading ends the connection. One poll reads the socket at most 32
//! times (a flooding controller cannot starve sending and deadlines). Identify data, the discovery
//! log page and admin command dwords are [`unvme_proto`]'s; this crate
//! only drives them.

#![deny(missing_docs)]

mod controller;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod namespace;
mod options;
mod path;
mod qpair;
mod queue;
mod wire;

pub use controller::{Controller, DiscoveryLog, IoQpair};
pub use namespace::{IoPolicy, RemoteNamespace};
pub use options::{format_uuid, ConnectOptions, Recovery};
pub use qpair::{DataDir, NvmeCompletion, RawBusy};
pub use unvme_proto::discovery::DISCOVERY_NQN;

use unvme_bdev::IoError;
use unvme_proto::nvme::Status;

/// Errors of the initiator outside the per-I/O path.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The target address did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// `host:port` as given.
        addr: String,
        /// Resolver error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection could not be established.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port` as given.
        addr: String,
        /// Socket error.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("socket error while {what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Socket error.
        #[source]
        source: std::io::Error,
    },
    /// The connection initialization (ICReq/ICResp) was refused or malformed.
    #[error("NVMe/TCP connection initialization failed: {0}")]
    Handshake(String),
    /// The controller sent a PDU that violates the transport specification.
    #[error("NVMe/TCP protocol error: {0}")]
    Protocol(#[source] unvme_proto::pdu::FatalError),
    /// The controller ended the connection with a C2HTermReq.
    #[error("controller terminated the connection (FES {fes:#x}, FEI {fei:#x})")]
    Terminated {
        /// Fatal Error Status.
        fes: u16,
        /// Field Error Information.
        fei: u32,
    },
    /// A command completed with an NVMe error status.
    #[error("{what} failed: {status}")]
    Nvme {
        /// The command.
        what: &'static str,
        /// Its completion status.
        status: Status,
    },
    /// A command failed below NVMe (timeout, transport, closed connection).
    #[error("{what} failed: {source}")]
    Command {
        /// The command.
        what: &'static str,
        /// The failure.
        #[source]
        source: IoError,
    },
    /// The controller did not become ready (or shut down) in time.
    #[error("controller not ready: {0}")]
    NotReady(String),
    /// Every I/O queue the controller granted is in use.
    #[error("no I/O queue left (the controller granted {0})")]
    NoQueue(u16),
    /// The controller returned data this host cannot use.
    #[error("invalid data from the controller: {0}")]
    Invalid(String),
    /// The controller returned a data structure that does not decode.
    #[error("malformed {what} from the controller: {source}")]
    Decode {
        /// The data structure.
        what: &'static str,
        /// Why it does not decode.
        #[source]
        source: unvme_proto::Error,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
