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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use unvme_proto::admin::AsyncEvent;
use unvme_proto::ana::{AnaGroup, AnaLog, AnaState};
use unvme_proto::discovery::DISCOVERY_NQN;

use crate::config::{TargetConfig, ANA_GROUP_MAX};
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
    /// Lowest and highest CNTLID handed out.
    pub cntlid_range: (u16, u16),
    /// ANA states of this subsystem's groups on each port.
    pub ana: Ana,
    ctrls: Mutex<CtrlTable>,
}

struct CtrlTable {
    next: u16,
    live: HashMap<u16, Arc<CtrlShared>>,
}

/// The ANA state of each ANA group of one subsystem on each port (NVMe
/// Base 2.0 §8.1). The I/O path reads a state with one relaxed atomic
/// load; changes (rare: configuration, the control plane) take the lock
/// that also keeps the change counts.
pub(crate) struct Ana {
    /// `states[port][group - 1]`: an [`AnaState::code`].
    states: Vec<Box<[AtomicU8]>>,
    changes: Mutex<AnaChanges>,
}

struct AnaChanges {
    /// The log page's Change Count.
    chgcnt: u64,
    /// Per port and group: the Change Count when that group last changed.
    group_chgcnt: Vec<Vec<u64>>,
}

impl Ana {
    fn new(ports: &[Vec<AnaState>]) -> Ana {
        Ana {
            states: ports
                .iter()
                .map(|p| p.iter().map(|s| AtomicU8::new(s.code())).collect())
                .collect(),
            changes: Mutex::new(AnaChanges {
                chgcnt: 0,
                group_chgcnt: ports.iter().map(|p| vec![0; p.len()]).collect(),
            }),
        }
    }

    /// The state of `group` on `port`; an unknown port or group is
    /// inaccessible.
    #[inline]
    pub fn state(&self, port: u16, group: u32) -> AnaState {
        self.states
            .get(usize::from(port))
            .and_then(|p| p.get((group as usize).wrapping_sub(1)))
            .and_then(|s| AnaState::from_code(s.load(Ordering::Relaxed)))
            .unwrap_or(AnaState::Inaccessible)
    }

    /// Sets `group` (or every group) on `port` to `state`. Returns whether
    /// anything changed; `None` if the port or group does not exist.
    fn set(&self, port: u16, group: Option<u32>, state: AnaState) -> Option<bool> {
        let p = self.states.get(usize::from(port))?;
        let range = match group {
            Some(g) if (1..=p.len() as u32).contains(&g) => (g as usize - 1)..(g as usize),
            Some(_) => return None,
            None => 0..p.len(),
        };
        let mut c = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let next = c.chgcnt.wrapping_add(1).max(1);
        let mut changed = false;
        for i in range {
            if p[i].swap(state.code(), Ordering::Relaxed) != state.code() {
                c.group_chgcnt[usize::from(port)][i] = next;
                changed = true;
            }
        }
        if changed {
            c.chgcnt = next;
        }
        Some(changed)
    }
}

/// Outstanding asynchronous events of a controller, delivered to its held
/// Asynchronous Event Requests.
#[derive(Debug, Default)]
pub(crate) struct Events {
    /// Events not yet reported, oldest first (at most one of each kind).
    pub pending: Vec<AsyncEvent>,
    /// An ANA change was reported and its log page not read since (with
    /// RAE cleared): further ANA changes are not reported (NVMe Base 2.0
    /// §5.2, events of a type are masked until their log page is read).
    pub ana_masked: bool,
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
    /// Asynchronous events for the host.
    pub events: Events,
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
    /// The port (index into the target's listeners) the admin queue connected on.
    pub port: u16,
    /// An event waits in [`CtrlRegs::events`] (checked each reactor turn
    /// by the admin queue without taking the lock).
    pub event_pending: AtomicBool,
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

    /// Queues an ANA change notice for the host, if it enabled them (Set
    /// Features Asynchronous Event Configuration bit 11) and has read the
    /// ANA log since the last one.
    pub fn post_ana_change(&self) {
        let mut r = self.regs();
        if r.aec & unvme_proto::admin::aec::ANACN == 0 || r.events.ana_masked {
            return;
        }
        if !r.events.pending.contains(&AsyncEvent::ANA_CHANGE) {
            r.events.pending.push(AsyncEvent::ANA_CHANGE);
        }
        self.event_pending.store(true, Ordering::Release);
    }

    /// Takes the oldest pending event, masking further ANA changes when it
    /// is one.
    pub fn take_event(&self) -> Option<AsyncEvent> {
        if !self.event_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut r = self.regs();
        if r.events.pending.is_empty() {
            self.event_pending.store(false, Ordering::Release);
            return None;
        }
        let ev = r.events.pending.remove(0);
        if ev == AsyncEvent::ANA_CHANGE {
            r.events.ana_masked = true;
        }
        if r.events.pending.is_empty() {
            self.event_pending.store(false, Ordering::Release);
        }
        Some(ev)
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

    /// Creates a controller with a fresh CNTLID from the subsystem's range
    /// (dynamic controller model), on `port`. Fails when `hostnqn` already
    /// has `max_per_host` live controllers here, or every CNTLID is taken.
    #[allow(clippy::too_many_arguments)]
    pub fn create_ctrl(
        self: &Arc<Self>,
        hostnqn: &str,
        hostid: [u8; 16],
        port: u16,
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
        // CNTLIDs min..=max, within 1..=0xFFEF (0xFFF0.. are reserved).
        let (min, max) = self.cntlid_range;
        for _ in min..=max {
            let id = t.next.clamp(min, max);
            t.next = if id >= max { min } else { id + 1 };
            if let std::collections::hash_map::Entry::Vacant(slot) = t.live.entry(id) {
                let c = Arc::new(CtrlShared {
                    cntlid: id,
                    subsys: self.clone(),
                    hostnqn: hostnqn.to_string(),
                    hostid,
                    port,
                    event_pending: AtomicBool::new(false),
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
                        events: Events::default(),
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

    /// The ANA log page as a controller on `port` reports it: one
    /// descriptor per ANA group that holds namespaces, with their NSIDs
    /// unless `groups_only` (RGO).
    pub fn ana_log(&self, port: u16, groups_only: bool) -> AnaLog {
        let c = self.ana.changes.lock().unwrap_or_else(|e| e.into_inner());
        let mut groups: Vec<AnaGroup> = Vec::new();
        for ns in &self.namespaces {
            let g = match groups.iter_mut().find(|g| g.grpid == ns.ana_group) {
                Some(g) => g,
                None => {
                    groups.push(AnaGroup {
                        grpid: ns.ana_group,
                        change_count: c
                            .group_chgcnt
                            .get(usize::from(port))
                            .and_then(|p| p.get(ns.ana_group as usize - 1))
                            .copied()
                            .unwrap_or(0),
                        state: self.ana.state(port, ns.ana_group),
                        nsids: Vec::new(),
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            if !groups_only {
                g.nsids.push(ns.nsid);
            }
        }
        groups.sort_by_key(|g| g.grpid);
        AnaLog {
            change_count: c.chgcnt,
            groups,
        }
    }

    /// Sets the ANA state of `group` (or of every group) on `port`, and
    /// tells every controller on that port whose host asked for ANA change
    /// notices with an Asynchronous Event. Returns false when the port or
    /// group does not exist.
    pub fn set_ana_state(&self, port: u16, group: Option<u32>, state: AnaState) -> bool {
        match self.ana.set(port, group, state) {
            None => false,
            Some(false) => true,
            Some(true) => {
                tracing::info!(subnqn = %self.nqn, port, group = ?group, state = crate::config::ana_state_name(state), "ANA state changed");
                let ctrls: Vec<Arc<CtrlShared>> = self
                    .table()
                    .live
                    .values()
                    .filter(|c| c.port == port)
                    .cloned()
                    .collect();
                for c in ctrls {
                    c.post_ana_change();
                }
                true
            }
        }
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
        let ports: Vec<Vec<AnaState>> = cfg.ports().into_iter().map(|(_, s)| s).collect();
        debug_assert!(ports.iter().all(|p| p.len() == ANA_GROUP_MAX as usize));
        let mut list = vec![Arc::new(Subsystem {
            nqn: DISCOVERY_NQN.to_string(),
            serial: "UNVME-DISCOVERY".into(),
            model: "unvme discovery".into(),
            allowed_hosts: Vec::new(),
            namespaces: Vec::new(),
            is_discovery: true,
            flush_all: None,
            cntlid_range: (1, 0xFFEF),
            ana: Ana::new(&[]),
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
                let (nguid, uuid, eui64) = nc.ids()?;
                let mut ns = Namespace::new(&s.nqn, nsid, bdev, gidx);
                ns.ana_group = nc.ana_group;
                ns.nguid = nguid.unwrap_or(ns.nguid);
                ns.uuid = uuid.unwrap_or(ns.uuid);
                ns.eui64 = eui64.unwrap_or(ns.eui64);
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
                cntlid_range: (s.cntlid_min, s.cntlid_max),
                ana: Ana::new(&ports),
                ctrls: Mutex::new(CtrlTable {
                    next: s.cntlid_min,
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
