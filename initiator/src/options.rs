//! [`ConnectOptions`]: where and how to connect, and the host's identity.

use std::io::Read;
use std::sync::OnceLock;
use std::time::Duration;

/// How to reach a controller and what to ask of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Target host name or address.
    pub addr: String,
    /// Target TCP port.
    pub port: u16,
    /// Subsystem NQN to connect to.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host Identifier (the UUID in the host NQN by default).
    pub hostid: [u8; 16],
    /// Ask for header digests.
    pub hdr_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Keep Alive Timeout in milliseconds (0: no keep-alive).
    pub kato_ms: u32,
    /// Entries per I/O queue (SQSIZE + 1); one less may be outstanding.
    pub io_queue_size: u16,
    /// I/O queues to ask for with Set Features (Number of Queues).
    pub num_io_queues: u16,
    /// Time after which a command completes with a timeout.
    pub command_timeout: Duration,
    /// Time allowed for the TCP connect and the connection initialization.
    pub connect_timeout: Duration,
    /// How a [`crate::RemoteNamespace`] rides through a lost controller.
    pub recovery: Recovery,
}

/// What a [`crate::RemoteNamespace`] does when its connection or controller
/// is lost, with the meaning of the Linux host's `nvme connect` options of
/// the same names.
///
/// While no path can carry I/O, requests are held (in flight ones and new
/// ones) and resubmitted once a connection is back. They fail only once
/// `fast_io_fail_tmo` has passed since the loss (if set) or the controller
/// is declared lost after `ctrl_loss_tmo`; after that, new requests fail at
/// once while reconnection goes on every `reconnect_delay`, so service comes
/// back with the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Time after which a controller that cannot be reconnected is declared
    /// lost (`None`: never). Linux: `ctrl_loss_tmo`, default 600 s.
    pub ctrl_loss_tmo: Option<Duration>,
    /// Time between reconnection attempts (the first is immediate). Linux:
    /// `reconnect_delay`, default 10 s; ours 1 s, so a bridge's stall after
    /// a target restart stays near the restart time.
    pub reconnect_delay: Duration,
    /// Time after a loss from which held requests fail (`None`: hold until
    /// the controller is lost). Linux: `fast_io_fail_tmo`, default off.
    pub fast_io_fail_tmo: Option<Duration>,
    /// Times one request is retried after an NVMe status that allows a retry
    /// (DNR clear: path errors, aborts, transient errors). Linux:
    /// `nvme_core.max_retries`, default 5.
    pub max_retries: u32,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            ctrl_loss_tmo: Some(Duration::from_secs(600)),
            reconnect_delay: Duration::from_secs(1),
            fast_io_fail_tmo: None,
            max_retries: 5,
        }
    }
}

impl Recovery {
    /// Fails requests as soon as their connection is lost, holding none:
    /// the behaviour of a tool that must not wait for a target.
    pub const FAIL_FAST: Recovery = Recovery {
        ctrl_loss_tmo: Some(Duration::ZERO),
        reconnect_delay: Duration::from_millis(250),
        fast_io_fail_tmo: Some(Duration::ZERO),
        max_retries: 0,
    };
}

/// The process-wide host UUID, generated once like nvme-cli's `hostnqn`.
fn host_uuid() -> [u8; 16] {
    static UUID: OnceLock<[u8; 16]> = OnceLock::new();
    *UUID.get_or_init(random_uuid_v4)
}

/// A random (version 4, variant 1) UUID from /dev/urandom, or from fastrand
/// if /dev/urandom cannot be read.
pub(crate) fn random_uuid_v4() -> [u8; 16] {
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .is_ok();
    if !ok {
        u = fastrand::u128(..).to_le_bytes();
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Formats a UUID as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The host NQN nvme-cli derives from a UUID.
pub fn uuid_hostnqn(u: &[u8; 16]) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{}", format_uuid(u))
}

impl Default for ConnectOptions {
    fn default() -> Self {
        let uuid = host_uuid();
        ConnectOptions {
            addr: "127.0.0.1".into(),
            port: unvme_proto::DEFAULT_PORT,
            subnqn: unvme_proto::DEFAULT_SUBNQN.into(),
            hostnqn: uuid_hostnqn(&uuid),
            hostid: uuid,
            hdr_digest: false,
            data_digest: false,
            kato_ms: 5000,
            io_queue_size: 128,
            num_io_queues: 8,
            command_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            recovery: Recovery::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_hostnqn_is_an_nvme_cli_style_uuid_nqn_matching_hostid() {
        let o = ConnectOptions::default();
        let uuid = o
            .hostnqn
            .strip_prefix("nqn.2014-08.org.nvmexpress:uuid:")
            .expect("uuid NQN prefix");
        assert_eq!(uuid, format_uuid(&o.hostid));
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4", "version 4");
        assert!(matches!(&uuid[19..20], "8" | "9" | "a" | "b"), "variant 1");
    }
}
