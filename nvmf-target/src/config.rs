//! Target configuration: built from command-line flags or read from a TOML
//! file. Every size and count here bounds memory or work at run time.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;

use unvme_proto::ana::AnaState;

use crate::error::{Error, Result};

/// Largest ANA Group ID (ANAGRPMAX in Identify Controller); also the
/// number of ANA groups each subsystem supports (NANAGRPID).
pub const ANA_GROUP_MAX: u32 = 128;
/// Lowest controller ID a controller may get.
pub const CNTLID_MIN: u16 = 1;
/// Highest controller ID a controller may get (FFF0h.. are reserved).
pub const CNTLID_MAX: u16 = 0xFFEF;

/// One namespace: its backend spec (`ram:1G`, `null:1T`, `file:/path[:BS]`,
/// see `unvme_bdev::from_spec`), optional NSID (default: next free), ANA
/// group, and identifiers.
///
/// The identifiers default to values derived from the subsystem NQN and
/// NSID (the same in every process that exports that NQN and NSID), or for
/// a pass-through device to the device's own; one given here replaces its
/// default, so two target processes exporting one namespace (multipath)
/// can show hosts the very same NGUID/UUID/EUI-64.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Backend spec.
    pub bdev: String,
    /// Namespace ID (1-based); `None` takes the next free one.
    #[serde(default)]
    pub nsid: Option<u32>,
    /// ANA Group ID the namespace belongs to (1..=[`ANA_GROUP_MAX`], default 1).
    #[serde(default = "default_ana_group")]
    pub ana_group: u32,
    /// NGUID: 32 hex digits (dashes or colons between them are ignored).
    #[serde(default)]
    pub nguid: Option<String>,
    /// UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (or 32 hex digits).
    #[serde(default)]
    pub uuid: Option<String>,
    /// EUI-64: 16 hex digits.
    #[serde(default)]
    pub eui64: Option<String>,
}

impl NamespaceConfig {
    /// A namespace of backend `bdev` with every other setting at its default.
    pub fn new(bdev: impl Into<String>) -> Self {
        NamespaceConfig {
            bdev: bdev.into(),
            nsid: None,
            ana_group: default_ana_group(),
            nguid: None,
            uuid: None,
            eui64: None,
        }
    }

    /// The configured identifiers, parsed: (NGUID, UUID, EUI-64).
    pub(crate) fn ids(&self) -> Result<NsIds> {
        Ok((
            self.nguid.as_deref().map(parse_hex::<16>).transpose()?,
            self.uuid.as_deref().map(parse_hex::<16>).transpose()?,
            self.eui64.as_deref().map(parse_hex::<8>).transpose()?,
        ))
    }
}

/// Configured namespace identifiers: NGUID, UUID, EUI-64.
pub(crate) type NsIds = (Option<[u8; 16]>, Option<[u8; 16]>, Option<[u8; 8]>);

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig::new(String::new())
    }
}

fn default_ana_group() -> u32 {
    1
}

/// Parses an identifier of `N` bytes written as hex digits, ignoring `-`
/// and `:` between them; all zero is refused (it means "no identifier").
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N]> {
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b'-' && *b != b':').collect();
    let bad = || Error::Config(format!("{s:?}: expected {} hex digits", 2 * N));
    if digits.len() != 2 * N {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        let txt = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(txt, 16).map_err(|_| bad())?;
    }
    if out == [0u8; N] {
        return Err(Error::Config(format!(
            "{s:?}: an all-zero identifier means none"
        )));
    }
    Ok(out)
}

/// Parses an ANA state name: `optimized`, `non-optimized`, `inaccessible`,
/// `persistent-loss` or `change`.
pub fn parse_ana_state(s: &str) -> Result<AnaState> {
    Ok(match s {
        "optimized" => AnaState::Optimized,
        "non-optimized" => AnaState::NonOptimized,
        "inaccessible" => AnaState::Inaccessible,
        "persistent-loss" => AnaState::PersistentLoss,
        "change" => AnaState::Change,
        _ => {
            return Err(Error::Config(format!(
                "ANA state {s:?}: expected optimized, non-optimized, inaccessible, persistent-loss or change"
            )))
        }
    })
}

/// The name [`parse_ana_state`] reads for `s`.
pub fn ana_state_name(s: AnaState) -> &'static str {
    s.name()
}

fn de_ana_state<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<AnaState, D::Error> {
    let s = String::deserialize(d)?;
    parse_ana_state(&s).map_err(serde::de::Error::custom)
}

fn de_opt_ana_state<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<AnaState>, D::Error> {
    de_ana_state(d).map(Some)
}

fn default_ana_state() -> AnaState {
    AnaState::Optimized
}

/// The ANA state of one ANA group on a listener, overriding the listener's.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnaGroupState {
    /// ANA Group ID.
    pub group: u32,
    /// Its state on this listener.
    #[serde(deserialize_with = "de_ana_state")]
    pub state: AnaState,
}

/// A listen address with its own ANA settings (in addition to the plain
/// `listen` list, whose addresses take the target-wide `ana_state`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// The state of every ANA group on this listener (default: the
    /// target-wide `ana_state`).
    #[serde(default, deserialize_with = "de_opt_ana_state")]
    pub ana_state: Option<AnaState>,
    /// Per-group states that replace `ana_state` for those groups.
    #[serde(default)]
    pub ana_groups: Vec<AnaGroupState>,
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
    /// Lowest controller ID this target hands out in this subsystem
    /// (default 1). Two target processes exporting one subsystem NQN
    /// (multipath) need disjoint ranges: a host refuses a second
    /// controller with a CNTLID it already has in that subsystem.
    #[serde(default = "default_cntlid_min")]
    pub cntlid_min: u16,
    /// Highest controller ID (default FFEFh).
    #[serde(default = "default_cntlid_max")]
    pub cntlid_max: u16,
}

impl SubsystemConfig {
    /// A subsystem `nqn` with the default serial, model and CNTLID range,
    /// any host allowed, and no namespaces.
    pub fn new(nqn: impl Into<String>) -> Self {
        SubsystemConfig {
            nqn: nqn.into(),
            serial: default_serial(),
            model: default_model(),
            allowed_hosts: Vec::new(),
            namespaces: Vec::new(),
            cntlid_min: CNTLID_MIN,
            cntlid_max: CNTLID_MAX,
        }
    }
}

impl Default for SubsystemConfig {
    fn default() -> Self {
        SubsystemConfig::new(String::new())
    }
}

fn default_cntlid_min() -> u16 {
    CNTLID_MIN
}
fn default_cntlid_max() -> u16 {
    CNTLID_MAX
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
    /// Addresses to listen on; each serves every subsystem and discovery,
    /// with every ANA group in state `ana_state`.
    pub listen: Vec<SocketAddr>,
    /// Further listen addresses, each with its own ANA states. The ports
    /// of the target are `listen` then `listeners`, in order.
    pub listeners: Vec<ListenerConfig>,
    /// The ANA state of every ANA group on a listener that sets none
    /// (default optimized).
    #[serde(deserialize_with = "de_ana_state")]
    pub ana_state: AnaState,
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
            listeners: Vec::new(),
            ana_state: default_ana_state(),
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
                namespaces: vec![NamespaceConfig::new("ram:1G")],
                ..SubsystemConfig::new(unvme_proto::DEFAULT_SUBNQN)
            }],
            ..Default::default()
        }
    }

    /// Every port of the target: its address and the ANA state of each
    /// ANA group on it (index `group - 1`), `listen` first, then
    /// `listeners`.
    pub fn ports(&self) -> Vec<(SocketAddr, Vec<AnaState>)> {
        let n = ANA_GROUP_MAX as usize;
        let mut out: Vec<(SocketAddr, Vec<AnaState>)> = self
            .listen
            .iter()
            .map(|a| (*a, vec![self.ana_state; n]))
            .collect();
        for l in &self.listeners {
            let mut states = vec![l.ana_state.unwrap_or(self.ana_state); n];
            for g in &l.ana_groups {
                if let Some(s) = (g.group as usize)
                    .checked_sub(1)
                    .and_then(|i| states.get_mut(i))
                {
                    *s = g.state;
                }
            }
            out.push((l.addr, states));
        }
        out
    }

    /// Checks values that would make the target misbehave.
    pub fn validate(&self) -> Result<()> {
        if self.listen.is_empty() && self.listeners.is_empty() {
            return Err(Error::Config("no listen address".into()));
        }
        let mut addrs = std::collections::HashSet::new();
        for a in self
            .listen
            .iter()
            .chain(self.listeners.iter().map(|l| &l.addr))
        {
            if a.port() != 0 && !addrs.insert(*a) {
                return Err(Error::Config(format!("listen address {a} given twice")));
            }
        }
        for l in &self.listeners {
            for g in &l.ana_groups {
                if !(1..=ANA_GROUP_MAX).contains(&g.group) {
                    return Err(Error::Config(format!(
                        "listener {}: ANA group {} outside 1..={ANA_GROUP_MAX}",
                        l.addr, g.group
                    )));
                }
            }
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
            if s.cntlid_min < CNTLID_MIN || s.cntlid_max > CNTLID_MAX || s.cntlid_min > s.cntlid_max
            {
                return Err(Error::Config(format!(
                    "{}: CNTLID range {}..={} must lie in 1..=65519 (FFEFh) with min <= max",
                    s.nqn, s.cntlid_min, s.cntlid_max
                )));
            }
            for n in &s.namespaces {
                if !(1..=ANA_GROUP_MAX).contains(&n.ana_group) {
                    return Err(Error::Config(format!(
                        "{}: namespace {}: ANA group {} outside 1..={ANA_GROUP_MAX}",
                        s.nqn, n.bdev, n.ana_group
                    )));
                }
                n.ids()
                    .map_err(|e| Error::Config(format!("{}: namespace {}: {e}", s.nqn, n.bdev)))?;
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
    fn ana_listeners_cntlid_ranges_and_namespace_ids_parse() {
        let c = TargetConfig::from_toml(
            r#"
            listen = ["127.0.0.1:4420"]
            ana_state = "non-optimized"
            [[listeners]]
            addr = "127.0.0.1:4421"
            ana_groups = [{ group = 3, state = "persistent-loss" }]
            [[listeners]]
            addr = "127.0.0.1:4422"
            ana_state = "change"
            [[subsystems]]
            nqn = "nqn.2024-11.io.unvme:a"
            cntlid_min = 10
            cntlid_max = 20
            namespaces = [{ bdev = "ram:64M", ana_group = 3, nguid = "00112233-4455-6677-8899-aabbccddeeff", uuid = "5f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", eui64 = "0011223344556677" }]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let s = &c.subsystems[0];
        assert_eq!((s.cntlid_min, s.cntlid_max), (10, 20));
        let ns = &s.namespaces[0];
        assert_eq!(ns.ana_group, 3);
        let (nguid, uuid, eui) = ns.ids().unwrap();
        assert_eq!(nguid.unwrap()[15], 0xff);
        assert_eq!(uuid.unwrap()[0], 0x5f);
        assert_eq!(eui.unwrap(), [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
        let ports = c.ports();
        assert_eq!(ports.len(), 3);
        assert!(ports[0].1.iter().all(|s| *s == AnaState::NonOptimized));
        assert_eq!(ports[1].1[2], AnaState::PersistentLoss);
        assert_eq!(ports[1].1[0], AnaState::NonOptimized, "target-wide default");
        assert!(ports[2].1.iter().all(|s| *s == AnaState::Change));
        // Defaults.
        let d = TargetConfig::from_toml(
            "[[subsystems]]\nnqn = \"n\"\nnamespaces = [{ bdev = \"ram:1M\" }]",
        )
        .unwrap();
        assert_eq!(d.ana_state, AnaState::Optimized);
        assert_eq!(
            (d.subsystems[0].cntlid_min, d.subsystems[0].cntlid_max),
            (1, 0xFFEF)
        );
        assert_eq!(d.subsystems[0].namespaces[0].ana_group, 1);
        assert!(TargetConfig::from_toml("ana_state = \"bogus\"").is_err());
    }

    #[test]
    fn invalid_cntlid_ranges_ana_groups_and_identifiers_are_refused() {
        let with = |f: &dyn Fn(&mut SubsystemConfig)| {
            let mut c = TargetConfig::default_ram();
            f(&mut c.subsystems[0]);
            c.validate()
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|s| s.cntlid_min = 0).is_err());
        assert!(with(&|s| s.cntlid_max = 0xFFF0).is_err());
        assert!(with(&|s| (s.cntlid_min, s.cntlid_max) = (9, 8)).is_err());
        assert!(with(&|s| (s.cntlid_min, s.cntlid_max) = (7, 7)).is_ok());
        assert!(with(&|s| s.namespaces[0].ana_group = 0).is_err());
        assert!(with(&|s| s.namespaces[0].ana_group = ANA_GROUP_MAX + 1).is_err());
        assert!(with(&|s| s.namespaces[0].nguid = Some("0123".into())).is_err());
        assert!(with(&|s| s.namespaces[0].nguid = Some("zz".repeat(16))).is_err());
        assert!(with(&|s| s.namespaces[0].uuid = Some("0".repeat(32))).is_err());
        assert!(with(&|s| s.namespaces[0].eui64 = Some("0011223344556677".into())).is_ok());
        let mut c = TargetConfig::default_ram();
        c.listeners.push(ListenerConfig {
            addr: c.listen[0],
            ana_state: None,
            ana_groups: Vec::new(),
        });
        assert!(c.validate().is_err(), "one address twice");
        c.listeners[0].addr.set_port(4421);
        c.listeners[0].ana_groups.push(AnaGroupState {
            group: 0,
            state: AnaState::Optimized,
        });
        assert!(c.validate().is_err(), "group 0");
    }

    #[test]
    fn the_readme_example_configuration_parses_and_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("a TOML example") + 8;
        let len = readme[start..].find("```").expect("its end");
        let c = TargetConfig::from_toml(&readme[start..start + len]).expect("it parses");
        c.validate().expect("it is valid");
        assert_eq!(c.ports().len(), 2);
        assert_eq!(c.subsystems[0].namespaces[1].ana_group, 2);
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
