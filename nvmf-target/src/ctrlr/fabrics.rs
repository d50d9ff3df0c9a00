//! Fabrics commands (NVMe over Fabrics 1.1 §3.3, opcode 7Fh): Connect,
//! which binds a queue pair to a new or existing controller, Property
//! Get/Set, the controller registers a fabrics host reaches instead of
//! MMIO, and Disconnect.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use unvme_proto::fabrics::{self, fctype, ConnectCmd, ConnectData, PropertyCmd};
use unvme_proto::nvme::{Sqe, Status};
use unvme_proto::regs::{self, cc, csts};

use super::ratelimit::log_limited;
use super::{Completion, Controller, Outcome};
use crate::subsystem::{CreateCtrlError, CtrlShared, Subsystem};

/// Controller ready timeout reported in CAP.TO, in 500 ms units.
const CAP_TIMEOUT: u8 = 20;

/// A Connect with invalid parameters: IATTR (bit 0: the parameter is in the
/// Connect data) and IPO (the parameter's byte offset) in dword 0.
fn invalid_parameter(in_data: bool, ipo: u16) -> Outcome {
    Outcome::Complete(Completion {
        status: Status::CONNECT_INVALID_PARAMETERS,
        dw0: u32::from(in_data) | (u32::from(ipo) << 16),
        dw1: 0,
    })
}

impl Controller {
    pub(super) fn fabrics(&mut self, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        let admin_connected = self.qid == 0 && self.ctrl.is_some();
        match sqe.fctype() {
            fctype::CONNECT => self.connect(sqe, data.as_deref()),
            fctype::PROPERTY_GET if admin_connected => {
                match self.prop_get(PropertyCmd::from_sqe(sqe)) {
                    Some(v) => Outcome::Complete(Completion {
                        status: Status::SUCCESS,
                        dw0: v as u32,
                        dw1: (v >> 32) as u32,
                    }),
                    None => Outcome::status(Status::INVALID_FIELD),
                }
            }
            fctype::PROPERTY_SET if admin_connected => {
                Outcome::status(self.prop_set(PropertyCmd::from_sqe(sqe)))
            }
            fctype::DISCONNECT => Outcome::Disconnect,
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    fn connect(&mut self, sqe: &Sqe, data: Option<&[u8]>) -> Outcome {
        let c = ConnectCmd::from_sqe(sqe);
        if self.connected() {
            return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
        }
        let Some(data) = data.and_then(|b| ConnectData::decode(b).ok()) else {
            return Outcome::status(Status::DATA_SGL_LENGTH_INVALID);
        };
        if c.recfmt != 0 {
            return Outcome::status(Status::CONNECT_INCOMPATIBLE_FORMAT);
        }
        let Some(subsys) = self.subsystems.by_nqn(&data.subnqn).cloned() else {
            log_limited!(info, peer = %self.peer, subnqn = %data.subnqn, "connect to unknown subsystem");
            return invalid_parameter(true, 256);
        };
        if !subsys.host_allowed(&data.hostnqn) {
            log_limited!(info, peer = %self.peer, hostnqn = %data.hostnqn, subnqn = %subsys.nqn, "host not allowed");
            return Outcome::status(Status::CONNECT_INVALID_HOST);
        }
        let max_q = self.params.max_queue_size;
        if c.sqsize == 0 || c.sqsize >= max_q || (c.qid == 0 && c.sqsize < 31) {
            return Outcome::status(Status::INVALID_QUEUE_SIZE);
        }
        if c.qid == 0 {
            self.connect_admin(c, &data, subsys)
        } else {
            self.connect_io(c, &data, subsys)
        }
    }

    /// Connect on the admin queue: a new controller (dynamic model).
    fn connect_admin(
        &mut self,
        c: ConnectCmd,
        data: &ConnectData,
        subsys: Arc<Subsystem>,
    ) -> Outcome {
        if data.cntlid != fabrics::CNTLID_DYNAMIC {
            return invalid_parameter(true, 16);
        }
        let ctrl = match subsys.create_ctrl(
            &data.hostnqn,
            data.hostid,
            self.port,
            c.kato,
            self.params.max_io_queues,
            self.params.max_ctrls_per_host,
        ) {
            Ok(ctrl) => ctrl,
            Err(e) => {
                // NVMe over Fabrics 1.1 §3.3 (Figure 21): Connect Controller
                // Busy, "the controller is already associated with a host"
                // / cannot be allocated; Linux hosts retry it later.
                match e {
                    CreateCtrlError::HostLimit(n) => {
                        log_limited!(warn, peer = %self.peer, hostnqn = %data.hostnqn, subnqn = %subsys.nqn, controllers = n, "host has its limit of controllers: Connect Controller Busy")
                    }
                    CreateCtrlError::NoCntlid => {
                        log_limited!(warn, peer = %self.peer, subnqn = %subsys.nqn, "no free CNTLID: Connect Controller Busy")
                    }
                }
                return Outcome::status(Status::CONNECT_CTRL_BUSY);
            }
        };
        tracing::info!(peer = %self.peer, cntlid = ctrl.cntlid, subnqn = %subsys.nqn, hostnqn = %data.hostnqn, kato_ms = c.kato, "admin queue connected");
        self.bind(c, ctrl, subsys)
    }

    /// Connect on an I/O queue: joins the host's existing controller.
    fn connect_io(&mut self, c: ConnectCmd, data: &ConnectData, subsys: Arc<Subsystem>) -> Outcome {
        if subsys.is_discovery {
            return invalid_parameter(false, 42);
        }
        let Some(ctrl) = subsys.ctrl(data.cntlid) else {
            return invalid_parameter(true, 16);
        };
        if ctrl.hostnqn != data.hostnqn || ctrl.hostid != data.hostid {
            return invalid_parameter(true, 512);
        }
        {
            let mut r = ctrl.regs();
            if r.csts & csts::RDY == 0 || c.qid > r.io_queues {
                return invalid_parameter(false, 42);
            }
            if r.connected_qids.contains(&c.qid) {
                // As Linux nvmet: a queue ID still in use (its old
                // connection may not be torn down yet) is a sequence
                // error, which hosts retry.
                return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
            }
            r.connected_qids.push(c.qid);
        }
        self.epoch = ctrl.epoch.load(Ordering::Acquire);
        self.bind(c, ctrl, subsys)
    }

    fn bind(&mut self, c: ConnectCmd, ctrl: Arc<CtrlShared>, subsys: Arc<Subsystem>) -> Outcome {
        let cntlid = ctrl.cntlid;
        self.ctrl = Some(ctrl);
        self.qid = c.qid;
        self.sqsize = c.sqsize + 1;
        self.sqflow_off = c.sqflow_disabled();
        self.subsys = Some(subsys);
        Outcome::ok(u32::from(cntlid))
    }

    fn prop_get(&self, p: PropertyCmd) -> Option<u64> {
        let ctrl = self.ctrl.as_ref()?;
        let r = ctrl.regs();
        Some(match (p.ofst, p.size8) {
            (regs::CAP, true) => regs::cap_value(self.params.max_queue_size - 1, CAP_TIMEOUT),
            (regs::VS, false) => u64::from(regs::NVME_VERSION_2_0),
            (regs::CC, false) => u64::from(r.cc),
            (regs::CSTS, false) => u64::from(r.csts),
            _ => return None,
        })
    }

    /// Property Set: only CC is writable. EN 0→1 makes the controller ready,
    /// 1→0 resets it (its I/O queues close), a shutdown notification flushes
    /// every namespace off the reactor ([`start_shutdown_flush`]) before
    /// SHST reports completion.
    fn prop_set(&mut self, p: PropertyCmd) -> Status {
        let Some(ctrl) = self.ctrl.clone() else {
            return Status::INVALID_FIELD;
        };
        if p.ofst != regs::CC || p.size8 {
            return Status::INVALID_FIELD;
        }
        let new = p.value as u32;
        let mut r = ctrl.regs();
        let old = r.cc;
        r.cc = new;
        if new & cc::EN != 0 && old & cc::EN == 0 {
            r.csts = csts::RDY;
            tracing::debug!(cntlid = ctrl.cntlid, "controller enabled");
        } else if new & cc::EN == 0 && old & cc::EN != 0 {
            r.csts &= !csts::RDY;
            r.connected_qids.clear();
            ctrl.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!(cntlid = ctrl.cntlid, "controller reset");
        }
        if new & cc::SHN_MASK != 0 && old & cc::SHN_MASK == 0 {
            r.csts = (r.csts & !csts::SHST_MASK) | csts::SHST_OCCURRING;
            if r.shn_running {
                r.shn_again = true;
            } else {
                r.shn_running = true;
                drop(r);
                start_shutdown_flush(ctrl);
            }
        }
        Status::SUCCESS
    }
}

/// Runs a shutdown notification's flush of every namespace on a helper
/// thread, so a slow backend (a file's fsync) stalls no reactor; CSTS.SHST
/// stays "processing occurring" (01b) until it is done, then "complete"
/// (10b). Should no thread start, the flush runs here instead.
fn start_shutdown_flush(ctrl: Arc<CtrlShared>) {
    let c = ctrl.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("unvme-shn-{}", ctrl.cntlid))
        .spawn(move || shutdown_flush(&c));
    if let Err(e) = spawned {
        tracing::warn!(
            cntlid = ctrl.cntlid,
            "no thread for the shutdown flush, flushing inline: {e}"
        );
        shutdown_flush(&ctrl);
    }
}

/// Flushes every namespace of `ctrl`'s subsystem (again while more
/// shutdown notifications arrived meanwhile), then reports SHST complete
/// (if CC.SHN is still set).
fn shutdown_flush(ctrl: &CtrlShared) {
    loop {
        for n in &ctrl.subsys.namespaces {
            if let Err(e) = n.bdev.flush_all() {
                tracing::error!(nsid = n.nsid, "flush at shutdown notification failed: {e}");
            }
        }
        let mut r = ctrl.regs();
        if std::mem::take(&mut r.shn_again) {
            continue;
        }
        r.shn_running = false;
        // A host that took its notification back (CC.SHN cleared) meanwhile
        // sees normal operation (SHST 00b), not a shutdown it cancelled.
        let shst = if r.cc & cc::SHN_MASK != 0 {
            csts::SHST_COMPLETE
        } else {
            0
        };
        r.csts = (r.csts & !csts::SHST_MASK) | shst;
        tracing::info!(cntlid = ctrl.cntlid, "shutdown notification processed");
        return;
    }
}
