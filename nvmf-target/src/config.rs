//! Target configuration: built from command-line flags or read from a TOML
//! file. Every size and count here bounds memory or work at run time.

use serde::Deserialize;
use std::net::SocketAddr;

use crate::error::{Error, Result};

/// One namespace: its backend spec (`ram:1G`, `null:1T`, `file:/path[:BS]`,
/// see `unvme_bdev::from_spec`) and optional NSID (default: next free).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Backend spec.
    pub bdev: String,
    /// Namespace ID (1-based); `None` takes the next free one.
    #[serde(default)]
    pub nsid: Option<u32>,
}

/// One NVM subsystem.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number reported by Identify Controller (20 ASCII chars max).
    #[serde(default = "default_serial")]
    pub serial: String,
    /// Model number (40 ASCII chars max).
    #[serde(default = "default_model")]
    pub model: String,
    /// Host NQNs allowed to connect; empty allows any host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Namespaces.
    #[serde(default)]
    pub namespaces: Vec<NamespaceConfig>,
}

fn default_serial() -> String {
    "UNVME0000000000001".into()
}
fn default_model() -> String {
    "unvme target".into()
}

/// Default for [`TargetConfig::max_controllers_per_host`]: a Linux host
/// makes one controller per path (`nvme connect`), so 16 leaves room for
/// multipath and reconnect races while keeping one host NQN from filling
/// the subsystem's CNTLID space (neither Linux nvmet nor SPDK limits this).
pub const DEFAULT_MAX_CONTROLLERS_PER_HOST: usize = 16;

/// The whole target.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Addresses to listen on; each serves every subsystem and discovery.
    pub listen: Vec<SocketAddr>,
    /// NVM subsystems.
    pub subsystems: Vec<SubsystemConfig>,
    /// Number of reactor threads.
    pub reactors: usize,
    /// CPUs to pin reactor i to (`cpus[i % len]`); `None` leaves them unpinned.
    pub cpus: Option<Vec<usize>>,
    /// In-capsule data bytes accepted on I/O queues (admin queues take 8 KiB,
    /// as the Linux host assumes).
    pub in_capsule_data_size: u32,
    /// MAXH2CDATA advertised in ICResp.
    pub max_h2c_data: u32,
    /// Maximum data transfer size in bytes (rounded down to 4 KiB × 2^n).
    pub max_transfer_size: u32,
    /// Largest queue size (entries) a host may ask for at Connect.
    pub max_queue_size: u16,
    /// Largest number of I/O queues per controller.
    pub max_io_queues: u16,
    /// Most live controllers one host NQN may have in one subsystem (default
    /// [`DEFAULT_MAX_CONTROLLERS_PER_HOST`]); a Connect beyond it gets
    /// Connect Controller Busy.
    pub max_controllers_per_host: usize,
    /// Microseconds a reactor spins without work before sleeping in epoll.
    pub spin_us: u64,
    /// Most connections per reactor. When a new connection would exceed
    /// it, the oldest connection that has not completed Connect is closed
    /// to make room (a connected queue is never evicted).
    pub max_connections_per_reactor: usize,
    /// Data bytes one connection may hold in buffers for transfers the host
    /// has not finished: writes whose R2T is out and data not yet in, reads
    /// whose data is not yet sent. Further transfers wait, in order, until
    /// it allows (one transfer is always allowed). Default 8 MiB.
    pub max_transfer_bytes_per_connection: usize,
    /// The same, for all I/O connections of one reactor. Default 64 MiB.
    pub max_transfer_bytes_per_reactor: usize,
    /// Bytes of queued responses (PDU headers) above which a connection is
    /// not read until its host drains them (backpressure). Default 64 KiB.
    pub max_send_queue_bytes: usize,
    /// Bytes read from one connection per reactor turn before the reactor
    /// serves the others (fairness). Default 256 KiB.
    pub turn_budget_bytes: usize,
    /// Milliseconds from accept to ICReq before the socket is closed.
    /// Default 10000.
    pub icreq_timeout_ms: u64,
    /// Milliseconds from accept to a successful Connect before the socket
    /// is closed. Default 10000.
    pub connect_timeout_ms: u64,
    /// Milliseconds a connection may hold transfer budget with no data
    /// moving (no H2CData arriving, none of its queued data going out)
    /// before it is closed, so a host cannot hold the reactor's budget
    /// forever. Default 10000.
    pub transfer_timeout_ms: u64,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            listen: vec![SocketAddr::from((
                [127, 0, 0, 1],
                unvme_proto::DEFAULT_PORT,
            ))],
            subsystems: Vec::new(),
            reactors: 1,
            cpus: None,
            in_capsule_data_size: 8192,
            max_h2c_data: 128 * 1024,
            max_transfer_size: 1024 * 1024,
            max_queue_size: 128,
            max_io_queues: 64,
            max_controllers_per_host: DEFAULT_MAX_CONTROLLERS_PER_HOST,
            spin_us: 1000,
            max_connections_per_reactor: 1024,
            max_transfer_bytes_per_connection: 8 << 20,
            max_transfer_bytes_per_reactor: 64 << 20,
            max_send_queue_bytes: 64 << 10,
            turn_budget_bytes: 256 << 10,
            icreq_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            transfer_timeout_ms: 10_000,
        }
    }
}

impl TargetConfig {
    /// Reads a TOML file.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(Error::Toml)
    }

    /// The configuration `unvme target` uses with no arguments: a 1 GiB RAM
    /// namespace under [`unvme_proto::DEFAULT_SUBNQN`] on 127.0.0.1:4420.
    pub fn default_ram() -> Self {
        TargetConfig {
            subsystems: vec![SubsystemConfig {
                nqn: unvme_proto::DEFAULT_SUBNQN.into(),
                serial: default_serial(),
                model: default_model(),
                allowed_hosts: Vec::new(),
                namespaces: vec![NamespaceConfig {
                    bdev: "ram:1G".into(),
                    nsid: None,
                }],
            }],
            ..Default::default()
        }
    }

    /// Checks values that would make the target misbehave.
    pub fn validate(&self) -> Result<()> {
        if self.listen.is_empty() {
            return Err(Error::Config("no listen address".into()));
        }
        if self.in_capsule_data_size > 1024 * 1024 || !self.in_capsule_data_size.is_multiple_of(16)
        {
            return Err(Error::Config(
                "in-capsule data size must be a multiple of 16 up to 1 MiB".into(),
            ));
        }
        if self.max_h2c_data < 4096 || !self.max_h2c_data.is_multiple_of(4) {
            return Err(Error::Config(
                "MAXH2CDATA must be at least 4096 and a multiple of 4".into(),
            ));
        }
        if self.max_transfer_size < 4096 {
            return Err(Error::Config(
                "max transfer size must be at least 4096".into(),
            ));
        }
        if !(2..=1024).contains(&self.max_queue_size) {
            return Err(Error::Config("max queue size must be 2..=1024".into()));
        }
        if self.max_connections_per_reactor == 0
            || self.turn_budget_bytes == 0
            || self.max_send_queue_bytes == 0
        {
            return Err(Error::Config(
                "connection limit, turn budget and send queue bound must be positive".into(),
            ));
        }
        if self.max_io_queues == 0 {
            return Err(Error::Config("at least one I/O queue".into()));
        }
        if self.max_controllers_per_host == 0 {
            return Err(Error::Config(
                "max controllers per host must be at least 1".into(),
            ));
        }
        let mut nqns = std::collections::HashSet::new();
        for s in &self.subsystems {
            if s.nqn.is_empty()
                || s.nqn.len() > 223
                || s.nqn == unvme_proto::discovery::DISCOVERY_NQN
            {
                return Err(Error::Config(format!("invalid subsystem NQN {:?}", s.nqn)));
            }
            if !nqns.insert(&s.nqn) {
                return Err(Error::Config(format!("duplicate subsystem NQN {}", s.nqn)));
            }
            if s.serial.len() > 20
                || s.model.len() > 40
                || !s.serial.is_ascii()
                || !s.model.is_ascii()
            {
                return Err(Error::Config(
                    "serial (≤20) and model (≤40) must be short ASCII".into(),
                ));
            }
        }
        Ok(())
    }

    /// MDTS value (log2 of the transfer in 4 KiB units) for Identify.
    pub fn mdts(&self) -> u8 {
        let pages = (self.max_transfer_size / 4096).max(1);
        (31 - pages.leading_zeros()) as u8
    }

    /// The effective maximum transfer in bytes (a power-of-two multiple of 4 KiB).
    pub fn max_transfer_bytes(&self) -> u32 {
        4096u32 << self.mdts()
    }
}

/// The settings every reactor and connection reads, taken from a
/// [`TargetConfig`] once at start.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// MAXH2CDATA offered in ICResp.
    pub max_h2c_data: u32,
    /// In-capsule data an I/O queue accepts.
    pub in_capsule: u32,
    /// Largest data transfer of one command (MDTS in bytes).
    pub max_transfer: u32,
    /// Largest queue a host may connect (entries).
    pub max_queue_size: u16,
    /// I/O queues a controller may have.
    pub max_io_queues: u16,
    /// Live controllers one host NQN may have in one subsystem.
    pub max_ctrls_per_host: usize,
    /// Spin this long without work before sleeping in epoll.
    pub spin: std::time::Duration,
    /// Connections one reactor serves.
    pub max_conns: usize,
    /// Transfer bytes a connection may hold (see [`TargetConfig`]).
    pub conn_xfer_bytes: usize,
    /// Transfer bytes the I/O connections of a reactor may hold.
    pub reactor_xfer_bytes: usize,
    /// Queued response bytes above which a connection is not read.
    pub sendq_limit: usize,
    /// Bytes read from one connection per turn.
    pub turn_budget: usize,
    /// Accept to ICReq.
    pub icreq_timeout: std::time::Duration,
    /// Accept to Connect.
    pub connect_timeout: std::time::Duration,
    /// Budget held with no data moving.
    pub transfer_timeout: std::time::Duration,
}

impl Params {
    /// The settings of `c`.
    pub fn from_config(c: &TargetConfig) -> Self {
        Params {
            max_h2c_data: c.max_h2c_data,
            in_capsule: c.in_capsule_data_size,
            max_transfer: c.max_transfer_bytes(),
            max_queue_size: c.max_queue_size,
            max_io_queues: c.max_io_queues,
            max_ctrls_per_host: c.max_controllers_per_host,
            spin: std::time::Duration::from_micros(c.spin_us),
            max_conns: c.max_connections_per_reactor,
            conn_xfer_bytes: c.max_transfer_bytes_per_connection,
            reactor_xfer_bytes: c.max_transfer_bytes_per_reactor,
            sendq_limit: c.max_send_queue_bytes,
            turn_budget: c.turn_budget_bytes,
            icreq_timeout: std::time::Duration::from_millis(c.icreq_timeout_ms),
            connect_timeout: std::time::Duration::from_millis(c.connect_timeout_ms),
            transfer_timeout: std::time::Duration::from_millis(c.transfer_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_config_parses_and_rejects_unknown_keys() {
        let c = TargetConfig::from_toml(
            r#"
            listen = ["127.0.0.1:4420"]
            reactors = 2
            [[subsystems]]
            nqn = "nqn.2024-11.io.unvme:a"
            namespaces = [{ bdev = "ram:64M" }, { bdev = "null:1G", nsid = 5 }]
            "#,
        )
        .unwrap();
        assert_eq!(c.reactors, 2);
        assert_eq!(c.subsystems[0].namespaces[1].nsid, Some(5));
        assert!(c.validate().is_ok());
        assert!(TargetConfig::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn mdts_rounds_down_to_a_power_of_two() {
        let c = TargetConfig {
            max_transfer_size: 1024 * 1024,
            ..Default::default()
        };
        assert_eq!(c.mdts(), 8);
        let c = TargetConfig {
            max_transfer_size: 100_000,
            ..Default::default()
        };
        assert_eq!(c.max_transfer_bytes(), 65536);
    }
}
