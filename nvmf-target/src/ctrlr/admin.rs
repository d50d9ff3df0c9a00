//! The admin command set a fabrics controller serves (NVMe Base 2.0 §5):
//! Identify, Get Log Page, Get/Set Features, Keep Alive, Asynchronous
//! Event Request and Abort. A discovery controller serves the subset the
//! NVMe over Fabrics specification gives it (§5.2: Identify Controller, the
//! discovery log, Keep Alive, AER and a few features).

use std::time::Instant;

use unvme_proto::admin::{
    self, cns, fid, lid, opc, ChangedNsList, ErrorLogEntry, FirmwareSlotLog, GetLogPage, Identify,
    KeepAliveTimer, NumberOfQueues, VolatileWriteCache,
};
use unvme_proto::nvme::{Sqe, Status};

use super::{answer, discovery, identify, passthru, Completion, Controller, Outcome, MAX_AER};
use crate::namespace::ALL;
use crate::subsystem::{CtrlRegs, CtrlShared};

/// Temperature Threshold the controller reports (Kelvin: 70 °C).
const TEMP_THRESHOLD_K: u32 = 343;

impl Controller {
    pub(super) fn admin(
        &mut self,
        ctrl: &CtrlShared,
        sqe: &Sqe,
        data: Option<&mut [u8]>,
    ) -> Outcome {
        match sqe.opc {
            opc::IDENTIFY => self.identify(ctrl, sqe, data),
            opc::GET_LOG_PAGE => self.get_log_page(ctrl, sqe, data),
            opc::SET_FEATURES | opc::GET_FEATURES => self.features(ctrl, sqe),
            opc::KEEP_ALIVE => Outcome::ok(0),
            opc::ASYNC_EVENT_REQUEST => {
                if self.aers >= MAX_AER {
                    return Outcome::status(Status::AER_LIMIT_EXCEEDED);
                }
                self.aers += 1;
                Outcome::Hold
            }
            // Bit 0 of dword 0 set: the command was not aborted (allowed by the spec).
            opc::ABORT => Outcome::ok(1),
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    fn identify(&self, ctrl: &CtrlShared, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        let id = Identify::from_cdws(sqe.cdw10, sqe.cdw11);
        let subsys = &ctrl.subsys;
        let disc = subsys.is_discovery;
        let mut page = [0u8; admin::IDENTIFY_DATA_SIZE];
        match id.cns {
            cns::CTRL => {
                identify::identify_controller(&self.subsystems.cfg, ctrl).encode(&mut page)
            }
            cns::NS if !disc => match subsys.namespace(sqe.nsid) {
                Some(ns) => passthru::identify_namespace(ns, identify::identify_namespace(ns))
                    .encode(&mut page),
                // A valid NSID (1..=NN) that is not active returns zeroes
                // (NVMe Base 2.0 §5.17.2.1, CNS 00h: every such NSID is
                // unallocated here, there being no Namespace Management);
                // 0, FFFFFFFFh (no Namespace Management either) and NSIDs
                // beyond NN are invalid: Invalid Namespace or Format.
                None if sqe.nsid != 0 && sqe.nsid != ALL && sqe.nsid <= max_nsid(subsys) => {}
                None => return Outcome::status(Status::INVALID_NS),
            },
            cns::ACTIVE_NS_LIST if !disc => {
                if sqe.nsid >= 0xFFFF_FFFE {
                    return Outcome::status(Status::INVALID_NS);
                }
                let ids: Vec<u32> = subsys.namespaces.iter().map(|n| n.nsid).collect();
                admin::encode_active_ns_list(&ids, sqe.nsid, &mut page);
            }
            cns::NS_DESC_LIST if !disc => match subsys.namespace(sqe.nsid) {
                Some(ns) => {
                    let d = passthru::ns_id_descs(ns);
                    if admin::encode_ns_id_descs(&d, &mut page).is_err() {
                        return Outcome::status(Status::INTERNAL);
                    }
                }
                None => return Outcome::status(Status::INVALID_NS),
            },
            _ => return Outcome::status(Status::INVALID_FIELD),
        }
        answer(&page, data, 0)
    }

    fn get_log_page(&self, ctrl: &CtrlShared, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        let g = GetLogPage::from_cdws(sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13);
        let disc = ctrl.subsys.is_discovery;
        let page: Vec<u8> = match g.lid {
            lid::DISCOVERY if disc => discovery::discovery_log(&self.subsystems, &ctrl.hostnqn),
            // No errors recorded: one entry with Error Count 0 (invalid).
            lid::ERROR if !disc => ErrorLogEntry::default().to_bytes().to_vec(),
            // The device's log for a pass-through namespace.
            lid::SMART if !disc => match passthru::smart_log(&ctrl.subsys.namespaces, sqe.nsid) {
                Ok(p) => p,
                Err(st) => return Outcome::status(st),
            },
            lid::CHANGED_NS if !disc => ChangedNsList::default().to_bytes(),
            lid::FW_SLOT if !disc => firmware_slot_log().to_bytes(),
            lid::ANA if !disc => {
                if !g.rae {
                    ctrl.regs().events.ana_masked = false;
                }
                let rgo = g.lsp & admin::ana_lsp::RGO != 0;
                ctrl.subsys.ana_log(ctrl.port, rgo).encode()
            }
            _ => return Outcome::status(Status::INVALID_LOG_PAGE),
        };
        if !g.lpo.is_multiple_of(4) || g.lpo > page.len() as u64 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let start = g.lpo as usize;
        let want = g.len_bytes().min((page.len() - start) as u64) as usize;
        answer(&page[start..start + want], data, 0)
    }

    fn features(&self, ctrl: &CtrlShared, sqe: &Sqe) -> Outcome {
        let set = sqe.opc == opc::SET_FEATURES;
        if set && sqe.cdw10 & (1 << 31) != 0 {
            return Outcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let fid = sqe.cdw10 as u8;
        let sel = ((sqe.cdw10 >> 8) & 0x7) as u8;
        let disc = ctrl.subsys.is_discovery;
        let mut r = ctrl.regs();
        let c = match fid {
            fid::NUM_QUEUES if !disc => self.number_of_queues(&mut r, set, sel, sqe.cdw11),
            fid::KEEP_ALIVE_TIMER if set => {
                r.kato_ms = KeepAliveTimer::from_dword(sqe.cdw11).kato;
                r.last_keep_alive = Instant::now();
                Completion::ok(0)
            }
            fid::KEEP_ALIVE_TIMER => Completion::ok(KeepAliveTimer { kato: r.kato_ms }.to_dword()),
            fid::ASYNC_EVENT_CONFIG if set => {
                r.aec = sqe.cdw11;
                Completion::ok(0)
            }
            fid::ASYNC_EVENT_CONFIG => Completion::ok(r.aec),
            fid::VOLATILE_WC if !disc && set => {
                r.wce = VolatileWriteCache::from_dword(sqe.cdw11).wce;
                Completion::ok(0)
            }
            fid::VOLATILE_WC if !disc => {
                Completion::ok(VolatileWriteCache { wce: r.wce }.to_dword())
            }
            fid::ARBITRATION | fid::POWER_MGMT | fid::ERR_RECOVERY | fid::WRITE_ATOMIC if !disc => {
                if set {
                    Completion::status(Status::FEATURE_NOT_CHANGEABLE)
                } else {
                    Completion::ok(0)
                }
            }
            fid::TEMP_THRESH if !disc && !set => Completion::ok(TEMP_THRESHOLD_K),
            _ => Completion::status(Status::INVALID_FIELD),
        };
        Outcome::Complete(c)
    }

    /// Number of Queues: set once, before any I/O queue connects; the
    /// default selection reports what the target allows.
    fn number_of_queues(&self, r: &mut CtrlRegs, set: bool, sel: u8, cdw11: u32) -> Completion {
        let max = u32::from(self.params.max_io_queues);
        let granted = |n: u32| Completion::ok(NumberOfQueues::from_counts(n, n).to_dword());
        if !set {
            return granted(if sel == admin::sel::DEFAULT {
                max
            } else {
                u32::from(r.io_queues)
            });
        }
        let q = NumberOfQueues::from_dword(cdw11);
        if q.nsqr == 0xFFFF || q.ncqr == 0xFFFF {
            return Completion::status(Status::INVALID_FIELD);
        }
        if !r.connected_qids.is_empty() {
            return Completion::status(Status::COMMAND_SEQUENCE_ERROR);
        }
        let n = q.sq_count().min(q.cq_count()).min(max);
        r.io_queues = n as u16;
        granted(n)
    }
}

/// NN of Identify Controller: the largest NSID of the subsystem.
fn max_nsid(s: &crate::subsystem::Subsystem) -> u32 {
    s.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0)
}

/// The Firmware Slot Information log: slot 1 active, holding this build.
fn firmware_slot_log() -> FirmwareSlotLog {
    let mut l = FirmwareSlotLog {
        afi: 1,
        ..FirmwareSlotLog::default()
    };
    l.frs[0] = env!("CARGO_PKG_VERSION").chars().take(8).collect();
    l
}
