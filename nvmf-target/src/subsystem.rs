//! Subsystems, namespaces and the controllers hosts create in them.
//!
//! This is the state shared between reactors. It is read-mostly: the
//! namespace table is fixed at start, and the per-controller state
//! ([`CtrlShared`]) is touched by admin commands, Connect and periodic
//! checks only — never per I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use unvme_bdev::Bdev;
use unvme_proto::admin::{IdentifyController, IdentifyNamespace, LbaFormat, PowerStateDescriptor};
use unvme_proto::discovery::{self, DiscoveryLogEntry, DISCOVERY_NQN};

use crate::config::TargetConfig;
use crate::{Error, Result};

/// A namespace: an NSID bound to a backend.
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// Backend.
    pub bdev: Arc<dyn Bdev>,
    /// Index across all subsystems; reactors keep one bdev queue per index.
    pub gidx: usize,
    /// Namespace Globally Unique Identifier (zero: none).
    pub nguid: [u8; 16],
    /// Namespace UUID (zero: none).
    pub uuid: [u8; 16],
    /// IEEE Extended Unique Identifier (zero: none).
    pub eui64: [u8; 8],
    /// For a backend with admin pass-through: the device's Identify
    /// Namespace data last read, for answers while it cannot be asked.
    pub dev_ident: Mutex<Option<IdentifyNamespace>>,
}

/// An NVM subsystem (or the discovery subsystem).
pub struct Subsystem {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Allowed host NQNs (empty = any).
    pub allowed_hosts: Vec<String>,
    /// Namespaces ordered by NSID.
    pub namespaces: Vec<Namespace>,
    /// True for the discovery subsystem.
    pub is_discovery: bool,
    ctrls: Mutex<CtrlTable>,
}

struct CtrlTable {
    next: u16,
    live: HashMap<u16, Arc<CtrlShared>>,
}

/// Mutable controller registers and settings.
#[derive(Debug)]
pub struct CtrlRegs {
    /// Controller Configuration.
    pub cc: u32,
    /// Controller Status.
    pub csts: u32,
    /// Keep Alive Timeout in ms (0 = disabled).
    pub kato_ms: u32,
    /// Last keep-alive (or admin command).
    pub last_keep_alive: Instant,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues: u16,
    /// Connected I/O queue IDs.
    pub connected_qids: Vec<u16>,
    /// Asynchronous Event Configuration.
    pub aec: u32,
    /// Volatile write cache enabled.
    pub wce: bool,
}

/// One controller: created by an admin-queue Connect, shared by that
/// connection and the controller's I/O queue connections.
pub struct CtrlShared {
    /// Controller ID.
    pub cntlid: u16,
    /// Owning subsystem.
    pub subsys: Arc<Subsystem>,
    /// Host NQN from Connect.
    pub hostnqn: String,
    /// Host ID from Connect.
    pub hostid: [u8; 16],
    /// Set when the controller is torn down; its I/O connections close.
    pub dead: AtomicBool,
    /// Bumped on controller reset (CC.EN 1→0); I/O queues of an older epoch close.
    pub epoch: AtomicU32,
    regs: Mutex<CtrlRegs>,
}

impl CtrlShared {
    /// Locks the registers (admin path only). A poisoned lock is recovered:
    /// the registers are plain values that stay consistent.
    pub fn regs(&self) -> MutexGuard<'_, CtrlRegs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tears the controller down: removes it from its subsystem and tells
    /// its I/O connections to close.
    pub fn destroy(&self) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            self.subsys.table().live.remove(&self.cntlid);
            tracing::info!(cntlid = self.cntlid, subnqn = %self.subsys.nqn, hostnqn = %self.hostnqn, "controller destroyed");
        }
    }
}

impl Subsystem {
    fn table(&self) -> MutexGuard<'_, CtrlTable> {
        self.ctrls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allowed_hosts.is_empty() || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    /// Creates a controller with a fresh CNTLID (dynamic controller model).
    pub fn create_ctrl(
        self: &Arc<Self>,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        max_io_queues: u16,
    ) -> Option<Arc<CtrlShared>> {
        let mut t = self.table();
        // CNTLIDs 1..=0xFFEF; 0xFFF0.. are reserved.
        for _ in 0..0xFFEF {
            let id = t.next;
            t.next = if t.next >= 0xFFEF { 1 } else { t.next + 1 };
            if let std::collections::hash_map::Entry::Vacant(slot) = t.live.entry(id) {
                let c = Arc::new(CtrlShared {
                    cntlid: id,
                    subsys: self.clone(),
                    hostnqn: hostnqn.to_string(),
                    hostid,
                    dead: AtomicBool::new(false),
                    epoch: AtomicU32::new(0),
                    regs: Mutex::new(CtrlRegs {
                        cc: 0,
                        csts: 0,
                        kato_ms,
                        last_keep_alive: Instant::now(),
                        io_queues: max_io_queues,
                        connected_qids: Vec::new(),
                        aec: 0,
                        wce: true,
                    }),
                });
                slot.insert(c.clone());
                return Some(c);
            }
        }
        None
    }

    /// Looks up a live controller.
    pub fn ctrl(&self, cntlid: u16) -> Option<Arc<CtrlShared>> {
        self.table().live.get(&cntlid).cloned()
    }

    /// Looks up a namespace.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }
}

/// All subsystems of a target, including discovery.
pub struct Subsystems {
    /// Subsystems; index 0 is discovery.
    pub list: Vec<Arc<Subsystem>>,
    /// Every namespace, by global index (for reactors' queue tables).
    pub all_namespaces: Vec<(usize, u32)>,
    listen: Mutex<Vec<SocketAddr>>,
    /// Target-wide settings the controllers report.
    pub cfg: TargetConfig,
}

impl Subsystems {
    /// Opens every namespace's backend.
    pub fn from_config(cfg: &TargetConfig) -> Result<Self> {
        let mut list = vec![Arc::new(Subsystem {
            nqn: DISCOVERY_NQN.to_string(),
            serial: "UNVME-DISCOVERY".into(),
            model: "unvme discovery".into(),
            allowed_hosts: Vec::new(),
            namespaces: Vec::new(),
            is_discovery: true,
            ctrls: Mutex::new(CtrlTable {
                next: 1,
                live: HashMap::new(),
            }),
        })];
        let mut all = Vec::new();
        for (si, s) in cfg.subsystems.iter().enumerate() {
            let mut namespaces: Vec<Namespace> = Vec::new();
            for nc in &s.namespaces {
                let bdev = unvme_bdev::from_spec(&nc.bdev).map_err(|source| Error::Bdev {
                    spec: nc.bdev.clone(),
                    source,
                })?;
                let nsid = match nc.nsid {
                    Some(0) | Some(0xFFFF_FFFF) => {
                        return Err(Error::Config(format!("invalid NSID for {}", nc.bdev)))
                    }
                    Some(n) => n,
                    None => (1..)
                        .find(|n| namespaces.iter().all(|x| x.nsid != *n))
                        .unwrap_or(1),
                };
                if namespaces.iter().any(|x| x.nsid == nsid) {
                    return Err(Error::Config(format!("duplicate NSID {nsid} in {}", s.nqn)));
                }
                let gidx = all.len();
                all.push((si + 1, nsid));
                let id = stable_id(&s.nqn, nsid);
                let mut uuid = id;
                uuid[6] = (uuid[6] & 0x0f) | 0x40; // RFC 4122 version 4 layout
                uuid[8] = (uuid[8] & 0x3f) | 0x80;
                let mut ns = Namespace {
                    nsid,
                    bdev,
                    gidx,
                    nguid: id,
                    uuid,
                    eui64: [0; 8],
                    dev_ident: Mutex::new(None),
                };
                if let Some(a) = ns.bdev.nvme_admin() {
                    // The device's identifiers, read once so they never
                    // change under a host; the target's only if it has none.
                    let (ident, ids) = crate::passthru::device_ids(a);
                    if ids.any() {
                        (ns.nguid, ns.eui64, ns.uuid) = (ids.nguid, ids.eui64, ids.uuid);
                    }
                    tracing::info!(
                        nsid,
                        subnqn = %s.nqn,
                        device_nsid = a.nsid(),
                        device_ids = ids.any(),
                        "namespace {nsid}: admin pass-through to its NVMe device (Identify Namespace fields, identifiers, SMART / health log)"
                    );
                    ns.dev_ident = Mutex::new(ident);
                }
                namespaces.push(ns);
            }
            namespaces.sort_by_key(|n| n.nsid);
            list.push(Arc::new(Subsystem {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allowed_hosts: s.allowed_hosts.clone(),
                namespaces,
                is_discovery: false,
                ctrls: Mutex::new(CtrlTable {
                    next: 1,
                    live: HashMap::new(),
                }),
            }));
        }
        Ok(Subsystems {
            list,
            all_namespaces: all,
            listen: Mutex::new(Vec::new()),
            cfg: cfg.clone(),
        })
    }

    /// Records the bound addresses for discovery log entries.
    pub fn set_listen_addrs(&self, addrs: &[SocketAddr]) {
        *self.listen.lock().unwrap_or_else(|p| p.into_inner()) = addrs.to_vec();
    }

    /// Finds a subsystem by NQN.
    pub fn by_nqn(&self, nqn: &str) -> Option<&Arc<Subsystem>> {
        self.list.iter().find(|s| s.nqn == nqn)
    }

    /// Flushes every backend (shutdown).
    pub fn flush_all(&self) {
        for s in &self.list {
            for n in &s.namespaces {
                if let Err(e) = n.bdev.flush_all() {
                    tracing::error!(nsid = n.nsid, subnqn = %s.nqn, "flush at shutdown failed: {e}");
                }
            }
        }
    }

    /// The discovery log page: one entry per NVM subsystem per listener,
    /// plus the discovery subsystem itself, visible to `hostnqn`.
    pub fn discovery_log(&self, hostnqn: &str) -> Vec<u8> {
        let listen = self
            .listen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut entries = Vec::new();
        for (portid, addr) in listen.iter().enumerate() {
            for s in &self.list {
                if !s.is_discovery && !s.host_allowed(hostnqn) {
                    continue;
                }
                entries.push(DiscoveryLogEntry {
                    trtype: discovery::TRTYPE_TCP,
                    adrfam: if addr.is_ipv4() {
                        discovery::ADRFAM_IPV4
                    } else {
                        discovery::ADRFAM_IPV6
                    },
                    subtype: if s.is_discovery {
                        discovery::SUBTYPE_CURRENT_DISCOVERY
                    } else {
                        discovery::SUBTYPE_NVME
                    },
                    treq: discovery::TREQ_NOT_REQUIRED,
                    portid: portid as u16 + 1,
                    cntlid: 0xFFFF,
                    asqsz: 32,
                    trsvcid: addr.port().to_string(),
                    subnqn: s.nqn.clone(),
                    traddr: addr.ip().to_string(),
                    ..Default::default()
                });
            }
        }
        discovery::encode_log(1, &entries)
    }

    /// Identify Controller data for `ctrl`.
    pub fn identify_controller(&self, ctrl: &CtrlShared) -> IdentifyController {
        let s = &ctrl.subsys;
        let cfg = &self.cfg;
        let mut id = IdentifyController {
            vid: 0x1b36, // the vendor id QEMU uses for emulated devices; unvme has none of its own
            ssvid: 0x1b36,
            sn: s.serial.clone(),
            mn: s.model.clone(),
            fr: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
            rab: 6,
            cmic: 0x2, // may have several controllers
            mdts: mdts_for(s, cfg),
            cntlid: ctrl.cntlid,
            ver: unvme_proto::fabrics::NVME_VERSION_2_0,
            oaes: if s.is_discovery { 0 } else { 1 << 8 },
            cntrltype: if s.is_discovery { 2 } else { 1 },
            acl: 3,
            aerl: 3,
            frmw: 0x3,
            // Extended data for Get Log Page; no Commands Supported and
            // Effects log; SMART per namespace where a device gives it.
            lpa: 0x4 | u8::from(s.namespaces.iter().any(|n| n.bdev.nvme_admin().is_some())),
            elpe: 0,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: cfg.max_queue_size,
            nn: s.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0),
            // Compare, Write Zeroes, Dataset Management.
            oncs: if s.is_discovery { 0 } else { 0x1 | 0x4 | 0x8 },
            vwc: if s.is_discovery { 0 } else { 0x7 },
            awun: 0,
            awupf: 0,
            // SGLs supported; Offset addressing (in-capsule data) supported. No
            // keyed SGLs: those are for RDMA.
            sgls: 0x1 | (1 << 20),
            subnqn: s.nqn.clone(),
            ioccsz: (64 + cfg.in_capsule_data_size) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
            kas: 10, // 100 ms granularity
            ..Default::default()
        };
        id.psd[0] = PowerStateDescriptor {
            mp: 100,
            ..Default::default()
        };
        id
    }

    /// Identify Namespace data.
    pub fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
        let info = ns.bdev.info();
        let lbads = info.block_size.trailing_zeros() as u8;
        let mut id = IdentifyNamespace {
            nsze: info.num_blocks,
            ncap: info.num_blocks,
            nuse: info.num_blocks,
            nsfeat: 0,
            nmic: 1,
            dlfeat: if info.deallocate { 0x1 | 0x8 } else { 0 }, // deallocated blocks read as zeroes; DEAC in Write Zeroes
            nguid: ns.nguid,
            eui64: ns.eui64,
            ..Default::default()
        };
        id.set_lba_formats(&[LbaFormat::with_lbads(lbads)]);
        id.flbas = 0;
        id
    }
}

/// A stable 16-byte identifier derived from the subsystem NQN and NSID, so a
/// host sees the same NGUID/UUID across target restarts.
fn stable_id(nqn: &str, nsid: u32) -> [u8; 16] {
    let a = crc32c::crc32c(nqn.as_bytes());
    let b = crc32c::crc32c_append(a, &nsid.to_le_bytes());
    let c = crc32c::crc32c_append(b, b"unvme-ns");
    let d = crc32c::crc32c_append(c, nqn.as_bytes());
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&a.to_be_bytes());
    out[4..8].copy_from_slice(&b.to_be_bytes());
    out[8..12].copy_from_slice(&c.to_be_bytes());
    out[12..16].copy_from_slice(&d.to_be_bytes());
    out
}

/// MDTS for a subsystem: the target's own limit, lowered to the smallest
/// `max_transfer` any of its namespaces' backends declares.
fn mdts_for(s: &Subsystem, cfg: &TargetConfig) -> u8 {
    let mut bytes = cfg.max_transfer_bytes();
    for n in &s.namespaces {
        let m = n.bdev.info().max_transfer;
        if m != 0 {
            bytes = bytes.min(m);
        }
    }
    let pages = (bytes / 4096).max(1);
    (31 - pages.leading_zeros()) as u8
}
