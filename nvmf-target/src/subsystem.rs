//! Subsystems and the controllers hosts create in them: the target's
//! registry, shared between reactors.
//!
//! It is read-mostly: the namespace table is fixed at start, and the
//! per-controller state ([`CtrlShared`]) is touched by admin commands,
//! Connect and periodic checks only — never per I/O. What a controller
//! answers from this state is the controller model's (`ctrlr`); this module
//! only keeps it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use unvme_proto::discovery::DISCOVERY_NQN;

use crate::config::TargetConfig;
use crate::ctrlr::flush_all::FlushAllBdev;
use crate::error::{Error, Result};
use crate::namespace::{Namespace, ALL};
use unvme_bdev::Bdev;

/// An NVM subsystem (or the discovery subsystem).
pub(crate) struct Subsystem {
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
    /// With several namespaces: the global index and device of the
    /// broadcast Flush (NSID FFFFFFFFh), which flushes them all.
    pub flush_all: Option<(usize, Arc<dyn Bdev>)>,
    ctrls: Mutex<CtrlTable>,
}

struct CtrlTable {
    next: u16,
    live: HashMap<u16, Arc<CtrlShared>>,
}

/// Why [`Subsystem::create_ctrl`] made no controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CreateCtrlError {
    /// The host already has this many live controllers (the limit).
    HostLimit(usize),
    /// Every CNTLID of the subsystem is in use.
    NoCntlid,
}

/// Mutable controller registers and settings.
#[derive(Debug)]
pub(crate) struct CtrlRegs {
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
    /// A shutdown flush is running on its helper thread.
    pub shn_running: bool,
    /// Another shutdown notification came while it ran: flush once more.
    pub shn_again: bool,
}

/// One controller: created by an admin-queue Connect, shared by that
/// connection and the controller's I/O queue connections.
pub(crate) struct CtrlShared {
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
    /// Fails when `hostnqn` already has `max_per_host` live controllers
    /// here, or every CNTLID is taken.
    pub fn create_ctrl(
        self: &Arc<Self>,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        max_io_queues: u16,
        max_per_host: usize,
    ) -> std::result::Result<Arc<CtrlShared>, CreateCtrlError> {
        let mut t = self.table();
        // Connect only, never per I/O: a scan of this subsystem's controllers.
        let of_host = t.live.values().filter(|c| c.hostnqn == hostnqn).count();
        if of_host >= max_per_host {
            return Err(CreateCtrlError::HostLimit(of_host));
        }
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
                        shn_running: false,
                        shn_again: false,
                    }),
                });
                slot.insert(c.clone());
                return Ok(c);
            }
        }
        Err(CreateCtrlError::NoCntlid)
    }

    /// Looks up a live controller.
    pub fn ctrl(&self, cntlid: u16) -> Option<Arc<CtrlShared>> {
        self.table().live.get(&cntlid).cloned()
    }

    /// Looks up a namespace.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The device a reactor opens a queue on for an entry of
    /// [`Subsystems::all_namespaces`]: namespace `nsid`'s, or for
    /// FFFFFFFFh the broadcast-flush device.
    pub fn queue_bdev(&self, nsid: u32) -> Option<&Arc<dyn Bdev>> {
        match (nsid, &self.flush_all) {
            (ALL, Some((_, dev))) => Some(dev),
            _ => self.namespace(nsid).map(|n| &n.bdev),
        }
    }
}

/// All subsystems of a target, including discovery.
pub(crate) struct Subsystems {
    /// Subsystems; index 0 is discovery.
    pub list: Vec<Arc<Subsystem>>,
    /// Every namespace, by global index (for reactors' queue tables), as
    /// (subsystem index, NSID); NSID FFFFFFFFh is a subsystem's broadcast
    /// flush ([`Subsystem::queue_bdev`]).
    pub all_namespaces: Vec<(usize, u32)>,
    listen: Mutex<Vec<SocketAddr>>,
    /// Target-wide settings the controllers report.
    pub cfg: TargetConfig,
}

impl Subsystems {
    /// Opens every namespace's backend.
    pub fn from_config(cfg: &TargetConfig) -> Result<Self> {
        Self::from_config_with(cfg, unvme_bdev::from_spec)
    }

    /// Like [`Subsystems::from_config`], with `open` turning a namespace's
    /// backend spec into a device (tests put their own devices behind a spec).
    pub fn from_config_with(
        cfg: &TargetConfig,
        open: impl Fn(&str) -> unvme_bdev::Result<Arc<dyn unvme_bdev::Bdev>>,
    ) -> Result<Self> {
        let mut list = vec![Arc::new(Subsystem {
            nqn: DISCOVERY_NQN.to_string(),
            serial: "UNVME-DISCOVERY".into(),
            model: "unvme discovery".into(),
            allowed_hosts: Vec::new(),
            namespaces: Vec::new(),
            is_discovery: true,
            flush_all: None,
            ctrls: Mutex::new(CtrlTable {
                next: 1,
                live: HashMap::new(),
            }),
        })];
        let mut all = Vec::new();
        for (si, s) in cfg.subsystems.iter().enumerate() {
            let mut namespaces: Vec<Namespace> = Vec::new();
            for nc in &s.namespaces {
                let bdev = open(&nc.bdev).map_err(|source| Error::Bdev {
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
                let ns = Namespace::new(&s.nqn, nsid, bdev, gidx);
                namespaces.push(ns);
            }
            namespaces.sort_by_key(|n| n.nsid);
            let flush_all = (namespaces.len() > 1).then(|| {
                let gidx = all.len();
                all.push((si + 1, ALL));
                let members = namespaces.iter().map(|n| n.bdev.clone()).collect();
                let dev: Arc<dyn Bdev> = Arc::new(FlushAllBdev::new(&s.nqn, members));
                (gidx, dev)
            });
            list.push(Arc::new(Subsystem {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allowed_hosts: s.allowed_hosts.clone(),
                namespaces,
                is_discovery: false,
                flush_all,
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

    /// The bound addresses, for discovery log entries.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
}
