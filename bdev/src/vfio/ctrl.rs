//! The NVMe controller behind VFIO: bring-up (reset, admin queue, enable),
//! admin commands (Identify, Set Features, I/O queue creation/deletion) and
//! shutdown (NVMe Base 2.0 §3.5.1 "Memory-based Controller Initialization",
//! §3.6 "Shutdown Processing").
//!
//! The admin queue sits behind a mutex: it is used at start, when a reactor
//! opens or closes its queue, and at shutdown, never on the I/O path.
//! Admin commands are polled with a deadline; CSTS is checked while waiting
//! so a fatal controller or a vanished device ends the wait with an error.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use unvme_proto::admin::{self, cns, fid, IdentifyController, IdentifyNamespace, NumberOfQueues};
use unvme_proto::nvme::{Cqe, Sqe, CQE_SIZE, SQE_SIZE};

use super::dma::{DmaRegion, PAGE, PRPS_PER_PAGE};
use super::regs::{self, Cap, CqRing, SqRing};
use super::sys::{probe_pci, VfioDevice};
use super::Error;

/// Admin queue entries (both queues), bounded by CAP.MQES.
const ADMIN_ENTRIES: u32 = 32;
/// I/O queue entries, bounded by CAP.MQES.
pub(crate) const IO_ENTRIES: u32 = 256;
/// I/O queues asked for in Set Features Number of Queues.
const WANT_IO_QUEUES: u32 = 64;
/// Largest transfer this driver issues: what one PRP list page describes.
pub(crate) const DRIVER_MAX_TRANSFER: u32 = (PRPS_PER_PAGE * PAGE) as u32;
/// Floor of the command timeout (CAP.TO is meant for enable/disable, but it
/// is the controller's own statement of its worst case, so it also bounds
/// commands from below).
const MIN_CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the CQE at byte `off` of `region` if its phase tag says it is new.
pub(crate) fn read_cqe(region: &DmaRegion, off: usize, cq: &CqRing) -> Option<Cqe> {
    let dw3 = region.read_volatile_u32(off + 12);
    if !cq.is_new((dw3 >> 16) as u16) {
        return None;
    }
    // The phase tag is written last by the device: read the rest after it.
    fence(Ordering::Acquire);
    let dw2 = region.read_volatile_u32(off + 8);
    Some(Cqe {
        dw0: region.read_volatile_u32(off),
        dw1: region.read_volatile_u32(off + 4),
        sqhd: dw2 as u16,
        sqid: (dw2 >> 16) as u16,
        cid: dw3 as u16,
        status: (dw3 >> 16) as u16,
    })
}

/// Puts PRP1/PRP2 into an SQE's data pointer.
pub(crate) fn set_prps(sqe: &mut Sqe, prp1: u64, prp2: u64) {
    sqe.dptr[..8].copy_from_slice(&prp1.to_le_bytes());
    sqe.dptr[8..].copy_from_slice(&prp2.to_le_bytes());
}

struct AdminQueue {
    /// Page 0: ASQ, page 1: ACQ, page 2: data buffer.
    region: DmaRegion,
    sq: SqRing,
    cq: CqRing,
    next_cid: u16,
}

const ADMIN_SQ_OFF: usize = 0;
const ADMIN_CQ_OFF: usize = PAGE;
const ADMIN_DATA_OFF: usize = 2 * PAGE;

/// One NVMe controller driven through VFIO.
pub(crate) struct Controller {
    /// The PCI address.
    pub addr: String,
    /// Decoded CAP.
    pub cap: Cap,
    /// VS register.
    pub vs: u32,
    /// Identify Controller data.
    pub id: IdentifyController,
    /// Largest transfer: MDTS, capped at [`DRIVER_MAX_TRANSFER`].
    pub max_transfer: u32,
    /// Entries of each I/O queue.
    pub io_entries: u16,
    /// Command timeout.
    pub cmd_timeout: Duration,
    /// Set once the controller is unusable (CFS, gone, admin timeout).
    failed: AtomicBool,
    /// I/O queue IDs in use (index qid - 1).
    qids: Mutex<Vec<bool>>,
    // Dropped before `dev`: the admin queue's DMA memory is unmapped while
    // the container still has its group.
    admin: Mutex<AdminQueue>,
    /// The VFIO device (BAR0, container).
    pub dev: VfioDevice,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.addr)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Opens `addr` and brings the controller up: reset, admin queue,
    /// enable, Identify Controller, Set Features Number of Queues.
    pub fn open(addr: &str) -> Result<Self, Error> {
        let pci = probe_pci(addr)?;
        let dev = VfioDevice::open(&pci)?;
        dev.enable_bus_master()?;
        let bar = &dev.bar0;
        let cap_raw = bar.read64(regs::CAP);
        if cap_raw == u64::MAX {
            return Err(Error::Gone);
        }
        let cap = Cap::decode(cap_raw);
        if !cap.css_nvm {
            return Err(Error::Unsupported(
                "controller does not support the NVM command set".into(),
            ));
        }
        if cap.mpsmin != 0 {
            return Err(Error::Unsupported(format!(
                "controller's smallest memory page is {} KiB; this driver uses 4 KiB",
                4u32 << cap.mpsmin
            )));
        }
        let vs = bar.read32(regs::VS);
        disable(&dev, &cap)?;

        let admin_entries = ADMIN_ENTRIES.min(cap.max_queue_entries) as u16;
        let region = DmaRegion::new(&dev.container, 3 * PAGE)?;
        let aqa = u32::from(admin_entries - 1) | (u32::from(admin_entries - 1) << 16);
        bar.write32(regs::AQA, aqa);
        bar.write64(regs::ASQ, region.iova(ADMIN_SQ_OFF));
        bar.write64(regs::ACQ, region.iova(ADMIN_CQ_OFF));
        bar.write32(regs::CC, regs::cc_enable());
        wait_csts(&dev, &cap, "enable", |csts| csts & regs::CSTS_RDY != 0)?;
        tracing::info!(
            addr,
            vs = format_args!("{:#x}", vs),
            mqes = cap.max_queue_entries,
            dstrd = cap.dstrd,
            to = cap.to,
            "NVMe controller enabled"
        );

        let mut ctrl = Controller {
            addr: addr.into(),
            cap,
            vs,
            id: IdentifyController::default(),
            max_transfer: DRIVER_MAX_TRANSFER,
            io_entries: IO_ENTRIES.min(cap.max_queue_entries) as u16,
            cmd_timeout: cap.ready_timeout().max(MIN_CMD_TIMEOUT),
            failed: AtomicBool::new(false),
            qids: Mutex::new(Vec::new()),
            admin: Mutex::new(AdminQueue {
                region,
                sq: SqRing::new(admin_entries),
                cq: CqRing::new(admin_entries),
                next_cid: 0,
            }),
            dev,
        };
        let mut data = [0u8; PAGE];
        ctrl.identify(cns::CTRL, 0, &mut data)?;
        ctrl.id = IdentifyController::decode(&data)
            .map_err(|e| Error::Device(format!("Identify Controller: {e}")))?;
        ctrl.max_transfer = match ctrl.id.max_transfer(cap.mpsmin) {
            0 => DRIVER_MAX_TRANSFER,
            m => m.min(DRIVER_MAX_TRANSFER),
        };
        let mut sqe = Sqe {
            opc: admin::opc::SET_FEATURES,
            cdw10: u32::from(fid::NUM_QUEUES),
            cdw11: NumberOfQueues::from_counts(WANT_IO_QUEUES, WANT_IO_QUEUES).to_dword(),
            ..Default::default()
        };
        let cqe = ctrl.admin(&mut sqe, None)?;
        let nq = NumberOfQueues::from_dword(cqe.dw0);
        let queues = nq.sq_count().min(nq.cq_count()).min(WANT_IO_QUEUES) as usize;
        ctrl.qids = Mutex::new(vec![false; queues]);
        tracing::info!(
            addr,
            mn = %ctrl.id.mn.trim(),
            sn = %ctrl.id.sn.trim(),
            mdts = ctrl.id.mdts,
            max_transfer = ctrl.max_transfer,
            io_queues = queues,
            "NVMe controller identified"
        );
        Ok(ctrl)
    }

    /// Whether the controller has been declared unusable.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Checks CSTS: a vanished device or a fatal status marks the controller
    /// failed and is returned as an error.
    pub fn check_status(&self) -> Result<(), Error> {
        let csts = self.dev.bar0.read32(regs::CSTS);
        let err = if regs::gone(csts) {
            Error::Gone
        } else if csts & regs::CSTS_CFS != 0 {
            Error::Fatal
        } else if self.failed() {
            Error::Failed
        } else {
            return Ok(());
        };
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(addr = %self.addr, csts = format_args!("{csts:#x}"), "NVMe controller unusable: {err}");
        }
        Err(err)
    }

    fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Runs one admin command to completion. `data`, if given, is a 4 KiB
    /// buffer the command reads from the controller (PRP1 = the admin data
    /// page). Fails on a non-success status, on CSTS.CFS, on a device that
    /// is gone and after the command timeout.
    pub fn admin(&self, sqe: &mut Sqe, data: Option<&mut [u8; PAGE]>) -> Result<Cqe, Error> {
        let mut guard = self
            .admin
            .lock()
            .map_err(|_| Error::Device("admin queue mutex poisoned".into()))?;
        let q = &mut *guard;
        self.check_status()?;
        let cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        sqe.cid = cid;
        if data.is_some() {
            set_prps(sqe, q.region.iova(ADMIN_DATA_OFF), 0);
            q.region.slice_mut(ADMIN_DATA_OFF, PAGE).fill(0);
        }
        let slot = usize::from(q.sq.push());
        sqe.encode(q.region.slice_mut(ADMIN_SQ_OFF + slot * SQE_SIZE, SQE_SIZE));
        fence(Ordering::SeqCst);
        let bar = &self.dev.bar0;
        bar.write32(self.cap.sq_doorbell(0), u32::from(q.sq.tail()));
        let deadline = Instant::now() + self.cmd_timeout;
        let mut spins = 0u32;
        loop {
            let off = ADMIN_CQ_OFF + usize::from(q.cq.head()) * CQE_SIZE;
            if let Some(cqe) = read_cqe(&q.region, off, &q.cq) {
                q.cq.advance();
                bar.write32(self.cap.cq_doorbell(0), u32::from(q.cq.head()));
                if cqe.cid != cid {
                    tracing::warn!(cid = cqe.cid, want = cid, "stray admin completion");
                    continue;
                }
                let status = cqe.status();
                if !status.is_success() {
                    return Err(Error::AdminStatus {
                        opc: sqe.opc,
                        sct: status.sct,
                        sc: status.sc,
                    });
                }
                if let Some(d) = data {
                    d.copy_from_slice(q.region.slice(ADMIN_DATA_OFF, PAGE));
                }
                return Ok(cqe);
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::sleep(Duration::from_micros(100));
            self.check_status()?;
            if Instant::now() > deadline {
                self.mark_failed();
                return Err(Error::AdminTimeout {
                    opc: sqe.opc,
                    ms: self.cmd_timeout.as_millis() as u64,
                });
            }
        }
    }

    /// Identify with CNS `cns` for `nsid` into `data`.
    pub fn identify(&self, cns: u8, nsid: u32, data: &mut [u8; PAGE]) -> Result<(), Error> {
        let ident = admin::Identify {
            cns,
            ..Default::default()
        };
        let [cdw10, cdw11] = ident.to_cdws();
        let mut sqe = Sqe {
            opc: admin::opc::IDENTIFY,
            nsid,
            cdw10,
            cdw11,
            ..Default::default()
        };
        self.admin(&mut sqe, Some(data)).map(|_| ())
    }

    /// The active namespace IDs (Identify CNS 02h; 1..=NN if the controller
    /// predates that list).
    pub fn active_namespaces(&self) -> Result<Vec<u32>, Error> {
        let mut data = [0u8; PAGE];
        match self.identify(cns::ACTIVE_NS_LIST, 0, &mut data) {
            Ok(()) => Ok(admin::decode_ns_list(&data)),
            Err(Error::AdminStatus { .. }) => Ok((1..=self.id.nn.min(1024)).collect()),
            Err(e) => Err(e),
        }
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, Error> {
        let mut data = [0u8; PAGE];
        self.identify(cns::NS, nsid, &mut data)?;
        IdentifyNamespace::decode(&data)
            .map_err(|e| Error::Device(format!("Identify Namespace {nsid}: {e}")))
    }

    /// Reserves a free I/O queue ID.
    pub fn alloc_qid(&self) -> Result<u16, Error> {
        let mut q = self
            .qids
            .lock()
            .map_err(|_| Error::Device("queue ID mutex poisoned".into()))?;
        let i = q.iter().position(|u| !u).ok_or(Error::NoQueue {
            max: q.len() as u32,
        })?;
        q[i] = true;
        Ok(i as u16 + 1)
    }

    /// Releases an I/O queue ID.
    pub fn free_qid(&self, qid: u16) {
        if let Ok(mut q) = self.qids.lock() {
            if let Some(u) = q.get_mut(usize::from(qid) - 1) {
                *u = false;
            }
        }
    }

    /// Creates I/O CQ `qid` (physically contiguous for the device, no
    /// interrupts) at `cq_iova` and I/O SQ `qid` on it at `sq_iova`.
    pub fn create_io_queues(&self, qid: u16, cq_iova: u64, sq_iova: u64) -> Result<(), Error> {
        let qsize = u32::from(self.io_entries - 1) << 16;
        let mut cq = Sqe {
            opc: admin::opc::CREATE_IO_CQ,
            cdw10: qsize | u32::from(qid),
            cdw11: 1, // PC=1, IEN=0
            ..Default::default()
        };
        set_prps(&mut cq, cq_iova, 0);
        self.admin(&mut cq, None)?;
        let mut sq = Sqe {
            opc: admin::opc::CREATE_IO_SQ,
            cdw10: qsize | u32::from(qid),
            cdw11: (u32::from(qid) << 16) | 1, // CQID, QPRIO 0, PC=1
            ..Default::default()
        };
        set_prps(&mut sq, sq_iova, 0);
        if let Err(e) = self.admin(&mut sq, None) {
            let _ = self.delete_queue(admin::opc::DELETE_IO_CQ, qid);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes I/O SQ then CQ `qid`.
    pub fn delete_io_queues(&self, qid: u16) -> Result<(), Error> {
        self.delete_queue(admin::opc::DELETE_IO_SQ, qid)?;
        self.delete_queue(admin::opc::DELETE_IO_CQ, qid)
    }

    fn delete_queue(&self, opc: u8, qid: u16) -> Result<(), Error> {
        let mut sqe = Sqe {
            opc,
            cdw10: u32::from(qid),
            ..Default::default()
        };
        self.admin(&mut sqe, None).map(|_| ())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let bar = &self.dev.bar0;
        if regs::gone(bar.read32(regs::CSTS)) {
            tracing::warn!(addr = %self.addr, "NVMe device gone; releasing it");
            return;
        }
        // Normal shutdown so a real SSD flushes its cache, then disable.
        let cc = bar.read32(regs::CC);
        bar.write32(regs::CC, (cc & !regs::CC_SHN_MASK) | regs::CC_SHN_NORMAL);
        let shutdown = wait_csts(&self.dev, &self.cap, "shutdown", |c| {
            c & regs::CSTS_SHST_MASK == regs::CSTS_SHST_COMPLETE
        });
        if let Err(e) = shutdown {
            tracing::warn!(addr = %self.addr, "NVMe shutdown: {e}");
        }
        if let Err(e) = disable(&self.dev, &self.cap) {
            tracing::warn!(addr = %self.addr, "NVMe disable: {e}");
        }
        tracing::info!(addr = %self.addr, "NVMe controller shut down and released");
    }
}

/// CC.EN = 0 and waits for CSTS.RDY = 0 (within CAP.TO).
fn disable(dev: &VfioDevice, cap: &Cap) -> Result<(), Error> {
    let bar = &dev.bar0;
    let cc = bar.read32(regs::CC);
    if regs::gone(cc) {
        return Err(Error::Gone);
    }
    bar.write32(regs::CC, cc & !regs::CC_EN & !regs::CC_SHN_MASK);
    // CFS may be set on a controller being reset; only RDY matters here.
    wait_csts(dev, cap, "disable", |csts| csts & regs::CSTS_RDY == 0)
}

/// Polls CSTS until `done` (or all ones: gone; or CFS while enabling) within CAP.TO.
fn wait_csts(
    dev: &VfioDevice,
    cap: &Cap,
    what: &'static str,
    done: impl Fn(u32) -> bool,
) -> Result<(), Error> {
    let timeout = cap.ready_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        let csts = dev.bar0.read32(regs::CSTS);
        if regs::gone(csts) {
            return Err(Error::Gone);
        }
        if done(csts) {
            return Ok(());
        }
        if what == "enable" && csts & regs::CSTS_CFS != 0 {
            return Err(Error::Fatal);
        }
        if Instant::now() > deadline {
            return Err(Error::ReadyTimeout {
                what,
                ms: timeout.as_millis() as u64,
                csts,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
