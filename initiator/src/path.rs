//! One path to a remote namespace: a target address, the controller
//! currently associated through it (replaced when it fails), and the ANA
//! state the namespace has there.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};
use unvme_proto::admin::{lid, IdentifyNamespace};
use unvme_proto::ana::{AnaLog, AnaState, ANA_GROUP_HEADER, ANA_LOG_HEADER};

use crate::{ConnectOptions, Controller, Error, IoQpair, Result};

/// CMIC bit 3: the controller reports ANA.
const CMIC_ANA: u8 = 1 << 3;
/// Most ANA group descriptors and NSIDs accepted from one log page.
const MAX_ANA_GROUPS: usize = 1024;
const MAX_ANA_NSIDS: usize = 64 * 1024;
/// ANA state code kept when the controller does not report ANA (or its
/// state is not known yet): the path counts as optimized.
const ANA_NONE: u8 = 0;

/// What a queue needs to know about the namespace to check a path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NsKey {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
}

/// A path as its queues share it.
#[derive(Debug)]
pub(crate) struct PathShared {
    opts: ConnectOptions,
    /// `addr:port`, for logs.
    pub label: String,
    ctrl: Mutex<Option<Controller>>,
    /// [`AnaState::code`] of the namespace on this path, or [`ANA_NONE`].
    ana: AtomicU8,
    /// An ANA refresh is running.
    refreshing: AtomicBool,
}

fn lock(m: &Mutex<Option<Controller>>) -> MutexGuard<'_, Option<Controller>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PathShared {
    /// A path with no controller yet (it connects on first use).
    pub fn new(opts: ConnectOptions) -> Arc<Self> {
        Arc::new(PathShared {
            label: format!("{}:{}", opts.addr, opts.port),
            opts,
            ctrl: Mutex::new(None),
            ana: AtomicU8::new(ANA_NONE),
            refreshing: AtomicBool::new(false),
        })
    }

    /// The controller of this path, if one is associated and not failed.
    pub fn controller(&self) -> Option<Controller> {
        lock(&self.ctrl).clone().filter(|c| !c.is_failed())
    }

    /// The namespace's ANA state on this path (`None`: not reported).
    pub fn ana_state(&self) -> Option<AnaState> {
        AnaState::from_code(self.ana.load(Ordering::Relaxed))
    }

    /// Whether I/O may go this way as far as ANA knows.
    pub fn ana_usable(&self) -> bool {
        self.ana_state().is_none_or(AnaState::usable)
    }

    /// Sets the state the ANA log reports for the namespace on `ctrl`.
    fn read_ana(&self, ctrl: &Controller, nsid: u32, id: &IdentifyNamespace) -> Result<()> {
        if ctrl.identify().cmic & CMIC_ANA == 0 || id.anagrpid == 0 {
            self.ana.store(ANA_NONE, Ordering::Relaxed);
            return Ok(());
        }
        let log = read_ana_log(ctrl)?;
        let state = log.state_of(id.anagrpid).ok_or_else(|| {
            Error::Invalid(format!(
                "the ANA log does not list group {} of namespace {}",
                id.anagrpid, nsid
            ))
        })?;
        let old = self.ana.swap(state.code(), Ordering::Relaxed);
        if old != state.code() {
            info!(path = %self.label, grpid = id.anagrpid, state = %state, "ANA state");
        }
        Ok(())
    }

    /// Re-reads the ANA state on the current controller (after an ANA
    /// status or change notice), on a thread of its own: it never blocks
    /// the I/O path. One refresh at a time.
    pub fn refresh_ana(self: &Arc<Self>, nsid: u32) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("unvme-ana".into())
            .spawn(move || {
                if let Some(c) = me.controller() {
                    let r = c
                        .identify_namespace(nsid)
                        .and_then(|id| me.read_ana(&c, nsid, &id));
                    if let Err(e) = r {
                        debug!(path = %me.label, error = %e, "ANA refresh failed");
                    }
                }
                me.refreshing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.refreshing.store(false, Ordering::Release);
        }
    }

    /// Opens an I/O queue pair for the namespace, on the current controller
    /// or, when it failed or is gone, on a new one (a target restart). The
    /// namespace must have kept its block size and size. Blocking (admin
    /// path): callers run it on a thread of their own.
    pub fn open_qpair(&self, ns: NsKey) -> Result<IoQpair> {
        let mut guard = lock(&self.ctrl);
        if let Some(c) = guard.as_ref().filter(|c| !c.is_failed()) {
            match c.create_io_qpair() {
                Ok(mut qp) => {
                    qp.register_namespace(ns.nsid, ns.block_size);
                    qp.set_report_timeouts(true);
                    return Ok(qp);
                }
                Err(e) => {
                    warn!(path = %self.label, error = %e,
                        "cannot open an I/O queue; connecting a new controller");
                    // A controller that answered (no queue left, an NVMe
                    // status) still serves its other queues.
                    if !matches!(e, Error::NoQueue(_) | Error::Nvme { .. }) {
                        c.fail("an I/O queue could not be opened");
                    }
                }
            }
        }
        let new = Controller::connect(self.opts.clone())?;
        let id = new.identify_namespace(ns.nsid)?;
        if id.lba_size() != Some(ns.block_size) || id.nsze != ns.num_blocks {
            return Err(Error::Invalid(format!(
                "namespace {} changed geometry across the reconnection ({} blocks of {:?} bytes, was {} of {})",
                ns.nsid,
                id.nsze,
                id.lba_size(),
                ns.num_blocks,
                ns.block_size
            )));
        }
        self.read_ana(&new, ns.nsid, &id)?;
        info!(path = %self.label, cntlid = new.cntlid(), nsid = ns.nsid, "controller connected");
        *guard = Some(new.clone());
        drop(guard);
        let mut qp = new.create_io_qpair()?;
        qp.register_namespace(ns.nsid, ns.block_size);
        qp.set_report_timeouts(true);
        Ok(qp)
    }

    /// Records `ctrl` (just connected by the caller) and its ANA state.
    pub fn adopt(&self, ctrl: Controller, nsid: u32, id: &IdentifyNamespace) -> Result<()> {
        self.read_ana(&ctrl, nsid, id)?;
        *lock(&self.ctrl) = Some(ctrl);
        Ok(())
    }
}

/// Reads the whole ANA log page: the header and every group descriptor
/// with its NSID list, bounded.
pub(crate) fn read_ana_log(ctrl: &Controller) -> Result<AnaLog> {
    let head = ctrl.get_log_page(lid::ANA, 0, ANA_LOG_HEADER)?;
    let ngroups = usize::from(u16::from_le_bytes([head[8], head[9]])).min(MAX_ANA_GROUPS);
    // NANAGRPID bounds the groups; each group lists at most every NSID.
    let nn = (ctrl.identify().nn as usize).min(MAX_ANA_NSIDS);
    let len = ANA_LOG_HEADER + ngroups * ANA_GROUP_HEADER + nn * 4;
    let page = ctrl.get_log_page(lid::ANA, 0, len)?;
    AnaLog::decode(&page, MAX_ANA_GROUPS, MAX_ANA_NSIDS).map_err(|source| Error::Decode {
        what: "ANA log page",
        source,
    })
}
