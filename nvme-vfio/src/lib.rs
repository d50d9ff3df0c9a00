//! `unvme-nvme-vfio`: a user-space PCIe NVMe driver as a block device
//! ([`unvme_bdev::Bdev`]) — the NVMe SSD is driven from this process
//! through VFIO, polled, with no kernel block layer in the path (spec
//! `vfio:DDDD:BB:DD.F[:NSID]`, once [`register`] has added the kind to
//! [`unvme_bdev::from_spec`]).
//!
//! What it does: opens the device's IOMMU group and a type1 container
//! ([`sys`]), maps BAR0, resets and enables the controller with an admin
//! queue ([`ctrl`]), and gives every thread that opens a queue its own I/O
//! SQ/CQ pair with its own DMA memory ([`queue`], [`dma`]): no lock on the
//! I/O path, doorbells once per batch, completions by phase tag. Data
//! buffers come from a per-device pool of IOMMU-mapped memory
//! (`BdevQueue::alloc_buf`, sized by [`VfioOptions::dma_pool_size`]), so
//! write data goes socket → DMA buffer → SSD and read data back with no
//! copy; other buffers are copied through the queue's own DMA pages
//! ([`queue`]). Controller bring-up (enable, Identify, number of queues) is
//! [`unvme_proto::bringup`]'s, shared with the NVMe/TCP initiator; this
//! crate adds the PCIe parts: admin queue memory, MMIO, I/O queue creation.
//!
//! A controller that fails (CSTS.CFS, CSTS.RDY dropping, a command past its
//! deadline) is reset by a thread of its own, a bounded number of times
//! ([`ctrl`]): the requests its queues had outstanding fail with an
//! [`IoError`](unvme_bdev::IoError) (an NVMe/TCP host retries them), new ones
//! wait while it resets, and each queue re-creates its SQ/CQ pair on the
//! reset controller at its next use. A device that vanished (registers read
//! all ones) or that no reset brings back stays failed: every request ends
//! in an error, never a hang. [`VfioOptions::inject_disable_after`] clears
//! CC.EN on the live controller that long after it opens, to exercise that
//! path on hardware (or an emulation) that cannot be made to fail.
//!
//! This library reads no environment variables: the caller passes every
//! setting in [`VfioOptions`] (the `unvme` binary fills them from
//! `UNVME_VFIO_DMA_POOL` and `UNVME_VFIO_INJECT_DISABLE_MS`).
//!
//! Every `unsafe` that touches the kernel or the device lives in [`sys`]
//! (ioctls, BAR0 MMIO, `unsafe fn` DMA mapping) and [`dma`] (the memory the
//! device reads and writes, reached only through volatile accessors).
//!
//! Admin pass-through ([`NvmeAdmin`](unvme_bdev::NvmeAdmin)): Identify and Get
//! Log Page commands for the bdev's namespace or the whole controller are
//! run on the device's admin queue, so a target can show the real SSD's
//! Identify Namespace fields, identifiers and SMART / health log. Nothing
//! that changes the device (Format, Set Features, firmware, namespace
//! management, queue commands) is forwarded.
//!
//! When the last queue and bdev of a device are dropped, the controller is
//! shut down and disabled and the VFIO files closed, so the device can be
//! rebound to `nvme`.
//!
//! What it is not: no interrupts, no metadata/protection information,
//! no SGLs (PRPs only), no pass-through of admin commands that write or
//! change the device, no recovery of a device that was removed or whose
//! PCIe link went down (that needs a PCI-level reset and re-probe), and no
//! namespace hot-plug (a namespace resized or deleted on the device is not
//! noticed).

#![deny(missing_docs)]

mod ctrl;
mod dma;
mod queue;
mod ring;
mod sys;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use unvme_bdev::{AdminError, Bdev, BdevInfo, BdevQueue, IoOp, IoRequest, NvmeAdmin};
use unvme_proto::admin::{self, cns, lid, IdentifyController, IdentifyNamespace};
use unvme_proto::nvme::{Sqe, Status};

use ctrl::Controller;
use queue::{NsCaps, VfioQueue};

/// Default size of a device's DMA buffer pool ([`VfioOptions::dma_pool_size`]).
pub const DEFAULT_DMA_POOL_SIZE: usize = 64 << 20;

/// Settings of the driver, given by the caller (the library reads no
/// environment). They apply when a controller is opened; later opens of
/// namespaces of an already open controller share it and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioOptions {
    /// Bytes of IOMMU-mapped memory per device for the zero-copy data
    /// buffers ([`BdevQueue::alloc_buf`]); 0 turns zero-copy off, so every
    /// request's data is copied through the queue's own DMA pages.
    pub dma_pool_size: usize,
    /// Fault injection: clear CC.EN on the live controller this long after
    /// it was opened (once), so the reset path runs where no controller can
    /// be made to fail. `None`, the default, injects nothing.
    pub inject_disable_after: Option<Duration>,
}

impl Default for VfioOptions {
    fn default() -> Self {
        VfioOptions {
            dma_pool_size: DEFAULT_DMA_POOL_SIZE,
            inject_disable_after: None,
        }
    }
}

/// Errors of the VFIO NVMe backend.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The specification is malformed.
    #[error("{0}")]
    Spec(String),
    /// No such PCI device.
    #[error("PCI device {addr} not found (no /sys/bus/pci/devices/{addr}); check the address with lspci")]
    DeviceAbsent {
        /// PCI address.
        addr: String,
    },
    /// The device is bound to another driver.
    #[error("PCI device {addr} is bound to the {driver} driver, not vfio-pci; unbind and bind it to vfio-pci first (qemu-scripts/vfio-bind.sh {addr})")]
    WrongDriver {
        /// PCI address.
        addr: String,
        /// The driver it is bound to.
        driver: String,
    },
    /// The device is bound to no driver.
    #[error("PCI device {addr} is bound to no driver; bind it to vfio-pci first (qemu-scripts/vfio-bind.sh {addr})")]
    Unbound {
        /// PCI address.
        addr: String,
    },
    /// The device has no IOMMU group.
    #[error("PCI device {addr} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)")]
    NoIommuGroup {
        /// PCI address.
        addr: String,
    },
    /// A VFIO file could not be opened.
    #[error("cannot open {path}: {source}{hint}", path = path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The IOMMU group holds devices not bound to vfio-pci.
    #[error("VFIO group {group} is not viable: every device in the IOMMU group must be bound to vfio-pci (or to no driver)")]
    GroupNotViable {
        /// Group number.
        group: u32,
    },
    /// A VFIO ioctl or device access failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// DMA memory could not be set up.
    #[error("DMA memory: {0}")]
    Dma(String),
    /// The device or kernel lacks something this driver needs.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The controller did not reach the state in time.
    #[error("controller {step} timed out after {ms} ms (CAP.TO; CSTS {csts:#x})")]
    ReadyTimeout {
        /// Enable, disable or shutdown.
        step: unvme_proto::bringup::Step,
        /// The timeout.
        ms: u64,
        /// The last CSTS.
        csts: u32,
    },
    /// CSTS.CFS is set.
    #[error("controller fatal status (CSTS.CFS): the controller needs a reset")]
    Fatal,
    /// Registers read as all ones.
    #[error("the device is gone (registers read all ones: removed or link down)")]
    Gone,
    /// The controller was declared failed earlier.
    #[error("the controller failed earlier and is no longer used")]
    Failed,
    /// The controller is being reset after a failure.
    #[error("the controller is being reset after a failure")]
    Resetting,
    /// CSTS.RDY is 0 on a controller that was enabled.
    #[error("the controller is no longer ready (CSTS.RDY dropped): it needs a reset")]
    NotReady,
    /// An admin command did not complete.
    #[error("admin command {opc:#04x} timed out after {ms} ms")]
    AdminTimeout {
        /// Opcode.
        opc: u8,
        /// The timeout.
        ms: u64,
    },
    /// An admin command completed with an error status.
    #[error("admin command {opc:#04x} failed: SCT {sct:#x} SC {sc:#04x}")]
    AdminStatus {
        /// Opcode.
        opc: u8,
        /// Status Code Type.
        sct: u8,
        /// Status Code.
        sc: u8,
        /// Do Not Retry.
        dnr: bool,
    },
    /// Data the device returned does not decode.
    #[error("{what}: {source}")]
    Decode {
        /// The structure.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: unvme_proto::Error,
    },
    /// The device returned data that makes no sense.
    #[error("device: {0}")]
    Device(String),
    /// Every I/O queue the controller granted is in use.
    #[error("all {max} I/O queues of the controller are in use")]
    NoQueue {
        /// Queues granted.
        max: u32,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for unvme_bdev::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Spec(m) => unvme_bdev::Error::Config(m),
            other => unvme_bdev::Error::Backend {
                what: "vfio".into(),
                source: Box::new(other),
            },
        }
    }
}

/// Parses the part of a `vfio:` spec after `vfio:`: `DDDD:BB:DD.F[:NSID]`
/// or `BB:DD.F[:NSID]` (domain 0000). Returns the canonical address
/// (lower-case, with domain) and the NSID if given.
pub fn parse_spec(rest: &str) -> Result<(String, Option<u32>)> {
    let bad = |why: &str| {
        Error::Spec(format!(
            "vfio:{rest}: {why} (expected vfio:DDDD:BB:DD.F[:NSID], e.g. vfio:0000:00:04.0)"
        ))
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let dev_at = parts
        .iter()
        .position(|p| p.contains('.'))
        .ok_or_else(|| bad("no DD.F device/function"))?;
    let (domain, bus) = match dev_at {
        1 => ("0000", parts[0]),
        2 => (parts[0], parts[1]),
        _ => return Err(bad("malformed PCI address")),
    };
    let (dev, func) = parts[dev_at]
        .split_once('.')
        .ok_or_else(|| bad("no function"))?;
    let hex = |s: &str, width: usize, max: u32| {
        (!s.is_empty() && s.len() <= width && s.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    let (Some(d), Some(b), Some(dv), Some(f)) = (
        hex(domain, 4, 0xFFFF),
        hex(bus, 2, 0xFF),
        hex(dev, 2, 0x1F),
        hex(func, 1, 7),
    ) else {
        return Err(bad("malformed PCI address"));
    };
    let nsid = match &parts[dev_at + 1..] {
        [] => None,
        [n] => match n.parse::<u32>() {
            Ok(n) if n != 0 && n != u32::MAX => Some(n),
            _ => return Err(bad("NSID must be a number between 1 and 4294967294")),
        },
        _ => return Err(bad("unexpected text after the NSID")),
    };
    Ok((format!("{d:04x}:{b:02x}:{dv:02x}.{f:x}"), nsid))
}

/// Open controllers by PCI address, so several namespaces (specs) of one
/// device share it: a VFIO group can be opened only once.
static CONTROLLERS: Mutex<Vec<(String, Weak<Controller>)>> = Mutex::new(Vec::new());

fn controller(addr: &str, opts: &VfioOptions) -> Result<Arc<Controller>> {
    let mut all = CONTROLLERS
        .lock()
        .map_err(|_| Error::Device("controller registry poisoned".into()))?;
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some(c) = all
        .iter()
        .find(|(a, _)| a == addr)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(c);
    }
    let c = Arc::new(Controller::open(addr, opts)?);
    Controller::adopt(&c);
    all.push((addr.to_string(), Arc::downgrade(&c)));
    Ok(c)
}

/// Largest request a queue accepts; requests above the controller's MDTS
/// become several NVMe commands. Each queue's DMA arena holds two of them.
const MAX_REQUEST: u32 = 4 << 20;

/// One namespace of an NVMe controller driven through VFIO.
pub struct VfioBdev {
    info: BdevInfo,
    ns: NsCaps,
    ctrl: Arc<Controller>,
}

impl std::fmt::Debug for VfioBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioBdev")
            .field("info", &self.info)
            .field("ctrl", &self.ctrl)
            .finish()
    }
}

impl VfioBdev {
    /// Opens namespace `nsid` (default: the first active one) of the NVMe
    /// controller at PCI address `addr`, which must be bound to vfio-pci,
    /// and names the bdev `name`. `opts` applies if this opens the
    /// controller (not when another namespace of it is open already).
    pub fn open(addr: &str, nsid: Option<u32>, name: &str, opts: &VfioOptions) -> Result<Self> {
        let ctrl = controller(addr, opts)?;
        let active = ctrl.active_namespaces()?;
        let nsid = match nsid {
            Some(n) if active.contains(&n) => n,
            Some(n) => {
                return Err(Error::Spec(format!(
                    "{addr} has no active namespace {n} (active: {active:?})"
                )))
            }
            None => *active
                .first()
                .ok_or_else(|| Error::Device(format!("{addr} has no active namespace")))?,
        };
        let id = ctrl.identify_namespace(nsid)?;
        let fmt = id
            .current_lba_format()
            .ok_or_else(|| Error::Device(format!("namespace {nsid}: invalid FLBAS")))?;
        if fmt.ms != 0 {
            return Err(Error::Unsupported(format!(
                "namespace {nsid} is formatted with {} bytes of metadata per block",
                fmt.ms
            )));
        }
        let block_size = id
            .lba_size()
            .ok_or_else(|| Error::Device(format!("namespace {nsid}: unusable LBA size")))?;
        BdevInfo::check_geometry(block_size, id.nsze)
            .map_err(|e| Error::Device(format!("namespace {nsid}: {e}")))?;
        let ns = NsCaps {
            nsid,
            dsm: ctrl.id.supports_dsm(),
            write_zeroes: ctrl.id.supports_write_zeroes(),
            compare: ctrl.id.oncs & unvme_proto::admin::oncs::COMPARE != 0,
        };
        let info = BdevInfo {
            name: name.to_string(),
            block_size,
            num_blocks: id.nsze,
            // Larger requests than MDTS are split into several commands.
            max_transfer: MAX_REQUEST.max(ctrl.max_transfer),
            volatile_write_cache: ctrl.id.volatile_write_cache(),
            // DLFEAT bits 2:0 = 001b: deallocated blocks read as zeroes.
            deallocate: ns.dsm && id.dlfeat & 0x7 == 1,
            write_zeroes: ns.write_zeroes,
        };
        tracing::info!(
            addr,
            nsid,
            block_size,
            num_blocks = id.nsze,
            "VFIO NVMe namespace open"
        );
        Ok(VfioBdev { info, ns, ctrl })
    }

    /// Requests each queue of this bdev holds at once (NVMe commands, so a
    /// request split at MDTS counts as several): the I/O queue entries,
    /// CAP.MQES capped at the driver's 256, less the one an NVMe queue
    /// keeps empty. A full queue answers [`SubmitError::Busy`](unvme_bdev::SubmitError::Busy).
    pub fn queue_depth(&self) -> usize {
        usize::from(self.ctrl.io_entries) - 1
    }
}

/// Whether `sqe` may be forwarded to the device on behalf of namespace
/// `nsid`: only commands that read — Identify of that namespace (CNS 00h,
/// 03h, 05h) or of the controller (CNS 01h, 06h), Get Log Page of the
/// Error, SMART / Health and Firmware Slot logs for that namespace or the
/// whole controller — with at most one page of data.
fn passthru_allowed(sqe: &Sqe, nsid: u32) -> bool {
    let whole = sqe.nsid == 0 || sqe.nsid == u32::MAX;
    match sqe.opc {
        admin::opc::IDENTIFY => match admin::Identify::from_cdws(sqe.cdw10, sqe.cdw11).cns {
            cns::NS | cns::NS_DESC_LIST | cns::CS_NS => sqe.nsid == nsid,
            cns::CTRL | cns::CS_CTRL => sqe.nsid == 0,
            _ => false,
        },
        admin::opc::GET_LOG_PAGE => {
            let g = admin::GetLogPage::from_cdws(sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13);
            matches!(g.lid, lid::ERROR | lid::SMART | lid::FW_SLOT)
                && (whole || sqe.nsid == nsid)
                && g.len_bytes() <= dma::PAGE as u64
                && g.lpo == 0
        }
        _ => false,
    }
}

impl NvmeAdmin for VfioBdev {
    fn nsid(&self) -> u32 {
        self.ns.nsid
    }

    /// Runs the command on the controller's admin queue (serialised with
    /// queue creation and resets; answers at once while a reset runs).
    fn admin(&self, sqe: &Sqe, data: &mut [u8]) -> std::result::Result<u32, AdminError> {
        if data.len() > dma::PAGE || !passthru_allowed(sqe, self.ns.nsid) {
            return Err(AdminError::Refused);
        }
        let mut cmd = Sqe {
            opc: sqe.opc,
            nsid: sqe.nsid,
            cdw10: sqe.cdw10,
            cdw11: sqe.cdw11,
            cdw12: sqe.cdw12,
            cdw13: sqe.cdw13,
            cdw14: sqe.cdw14,
            cdw15: sqe.cdw15,
            ..Default::default()
        };
        let mut page = [0u8; dma::PAGE];
        match self.ctrl.admin(&mut cmd, Some(&mut page)) {
            Ok(cqe) => {
                let n = data.len();
                data.copy_from_slice(&page[..n]);
                Ok(cqe.dw0)
            }
            Err(Error::AdminStatus { sct, sc, dnr, .. }) => Err(AdminError::Status(Status {
                sct,
                sc,
                more: false,
                dnr,
            })),
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    }
}

impl Bdev for VfioBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn nvme_admin(&self) -> Option<&dyn NvmeAdmin> {
        Some(self)
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        Ok(Box::new(VfioQueue::open(
            self.ctrl.clone(),
            self.info.clone(),
            self.ns,
        )?))
    }

    /// Flush through a short-lived queue, bounded by the command timeout.
    fn flush_all(&self) -> unvme_bdev::Result<()> {
        match self.ctrl.epoch().state {
            ctrl::State::Ready => {}
            ctrl::State::Resetting => return Err(Error::Resetting.into()),
            ctrl::State::Failed => return Err(Error::Failed.into()),
        }
        let mut q = self.open_queue()?;
        let req = IoRequest {
            tag: 0,
            op: IoOp::Flush,
            buf: None,
            more: Vec::new(),
        };
        if q.submit(req).is_err() {
            return Err(Error::Device("flush queue busy".into()).into());
        }
        let deadline = std::time::Instant::now() + self.ctrl.cmd_timeout;
        let mut out = Vec::new();
        while out.is_empty() {
            q.poll(&mut out);
            if std::time::Instant::now() > deadline {
                return Err(Error::Device("flush timed out".into()).into());
            }
            std::thread::yield_now();
        }
        match out.pop().map(|c| c.result) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::Device(format!("flush: {e}")).into()),
            None => Ok(()),
        }
    }
}

/// Opens a `vfio:` spec (`rest` is the part after `vfio:`; the whole
/// `spec` names the bdev).
pub fn open_spec(spec: &str, rest: &str, opts: &VfioOptions) -> unvme_bdev::Result<Arc<dyn Bdev>> {
    let (addr, nsid) = parse_spec(rest)?;
    Ok(Arc::new(VfioBdev::open(&addr, nsid, spec, opts)?))
}

/// Makes [`unvme_bdev::from_spec`] open `vfio:` specifications with this
/// driver and `opts` (see [`unvme_bdev::register_backend`]).
pub fn register(opts: VfioOptions) {
    let open: unvme_bdev::SpecOpener =
        Arc::new(move |spec: &str, rest: &str| open_spec(spec, rest, &opts));
    unvme_bdev::register_backend("vfio", open).expect("`vfio` is not a built-in backend kind");
}

/// What `unvme identify --vfio` shows of a local device.
#[derive(Debug, Clone)]
pub struct DeviceIdentity {
    /// Identify Controller data.
    pub controller: IdentifyController,
    /// MDTS in bytes (0: no limit), before this driver's own cap.
    pub max_transfer: u32,
    /// CAP register (as read when the controller was opened).
    pub cap: u64,
    /// VS register.
    pub vs: u32,
    /// Active namespaces and their Identify data.
    pub namespaces: Vec<(u32, IdentifyNamespace)>,
}

/// Opens the controller at `addr` (bound to vfio-pci), reads its Identify
/// data (namespace `nsid`, or every active one) and releases it again.
pub fn identify_device(addr: &str, nsid: Option<u32>) -> Result<DeviceIdentity> {
    let (addr, _) = parse_spec(addr)?;
    let ctrl = controller(&addr, &VfioOptions::default())?;
    let nsids = match nsid {
        Some(n) => vec![n],
        None => ctrl.active_namespaces()?,
    };
    let namespaces = nsids
        .into_iter()
        .map(|n| Ok((n, ctrl.identify_namespace(n)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(DeviceIdentity {
        controller: ctrl.id.clone(),
        max_transfer: ctrl.id.max_transfer(ctrl.cap.mpsmin),
        cap: ctrl.cap_raw,
        vs: ctrl.vs,
        namespaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_accepts_full_and_short_addresses_with_optional_nsid() {
        assert_eq!(
            parse_spec("0000:00:04.0").unwrap(),
            ("0000:00:04.0".into(), None)
        );
        assert_eq!(
            parse_spec("0000:3B:00.1:2").unwrap(),
            ("0000:3b:00.1".into(), Some(2))
        );
        assert_eq!(
            parse_spec("00:04.0").unwrap(),
            ("0000:00:04.0".into(), None)
        );
        assert_eq!(
            parse_spec("00:04.0:7").unwrap(),
            ("0000:00:04.0".into(), Some(7))
        );
        assert_eq!(
            parse_spec("1:2:3.4").unwrap(),
            ("0001:02:03.4".into(), None)
        );
    }

    #[test]
    fn malformed_specs_are_spec_errors() {
        for bad in [
            "",
            "0000:00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "0000:100:04.0",
            "00000:00:04.0",
            "0000:00:04.0:0",
            "0000:00:04.0:x",
            "0000:00:04.0:1:2",
            "0000:00:04.0:4294967295",
            "0:0000:00:04.0",
            "0000:zz:04.0",
            "0000:00:.0",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(Error::Spec(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn only_reading_admin_commands_for_the_own_namespace_are_forwarded() {
        let identify = |cns: u8, nsid: u32| Sqe {
            opc: admin::opc::IDENTIFY,
            nsid,
            cdw10: u32::from(cns),
            ..Default::default()
        };
        let log = |lid: u8, nsid: u32, bytes: u32| Sqe {
            opc: admin::opc::GET_LOG_PAGE,
            nsid,
            cdw10: u32::from(lid) | ((bytes / 4 - 1) << 16),
            ..Default::default()
        };
        // Identify of the namespace and of the controller.
        assert!(passthru_allowed(&identify(cns::NS, 2), 2));
        assert!(passthru_allowed(&identify(cns::NS_DESC_LIST, 2), 2));
        assert!(passthru_allowed(&identify(cns::CTRL, 0), 2));
        // Another namespace of the device, or lists of them: not through this bdev.
        assert!(!passthru_allowed(&identify(cns::NS, 1), 2));
        assert!(!passthru_allowed(&identify(cns::NS, u32::MAX), 2));
        assert!(!passthru_allowed(&identify(cns::ACTIVE_NS_LIST, 0), 2));
        assert!(!passthru_allowed(&identify(cns::ALLOCATED_NS_LIST, 0), 2));
        // SMART / health for the namespace or the controller, within a page.
        assert!(passthru_allowed(&log(lid::SMART, 2, 512), 2));
        assert!(passthru_allowed(&log(lid::SMART, u32::MAX, 512), 2));
        assert!(passthru_allowed(&log(lid::SMART, 0, 512), 2));
        assert!(passthru_allowed(&log(lid::ERROR, u32::MAX, 4096), 2));
        assert!(!passthru_allowed(&log(lid::SMART, 1, 512), 2));
        assert!(!passthru_allowed(&log(lid::SMART, 2, 8192), 2));
        assert!(!passthru_allowed(&log(lid::TELEMETRY_HOST, 2, 512), 2));
        // Nothing that writes or changes the device.
        for opc in [
            admin::opc::SET_FEATURES,
            admin::opc::FORMAT_NVM,
            admin::opc::SANITIZE,
            admin::opc::FW_COMMIT,
            admin::opc::FW_IMAGE_DOWNLOAD,
            admin::opc::NS_MGMT,
            admin::opc::CREATE_IO_SQ,
            admin::opc::DELETE_IO_SQ,
            admin::opc::ABORT,
            admin::opc::GET_FEATURES,
            0xC0,
        ] {
            let sqe = Sqe {
                opc,
                nsid: 2,
                ..Default::default()
            };
            assert!(!passthru_allowed(&sqe, 2), "opcode {opc:#x} forwarded");
        }
    }

    #[test]
    fn an_absent_device_is_named_in_the_error() {
        let e = match open_spec("vfio:0000:ff:1f.7", "0000:ff:1f.7", &VfioOptions::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a device that should not exist"),
        };
        assert!(e.contains("0000:ff:1f.7") && e.contains("not found"), "{e}");
    }
}
