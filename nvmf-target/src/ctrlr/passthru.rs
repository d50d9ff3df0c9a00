//! Admin pass-through for namespaces whose backend is an NVMe controller
//! ([`unvme_bdev::NvmeAdmin`]: a VFIO-driven SSD): what a host sees of the
//! real device through the target.
//!
//! Shaped like SPDK's nvmf handling of an NVMe bdev (its custom Identify
//! handler builds the target's own Identify data and then takes the
//! device's fields it can vouch for): the target answers every admin
//! command itself and asks the device only for what describes the device.
//!
//! - **Identify Namespace (CNS 00h)**: the target's own data, with the
//!   device's capacity and utilisation (NCAP, NUSE, NVMCAP), LBA formats and
//!   FLBAS (when the format in use is the one served), NSFEAT bits that
//!   describe those fields, the atomic write fields (NAWUN … NABSPF, with
//!   NSFEAT.NSABP), NOIOB and the optimal-performance fields (NPWG … NOWS,
//!   with NSFEAT.OPTPERF). The target keeps its own NSZE (what it serves),
//!   NMIC (its controllers share the namespace), reservations, ANA group,
//!   write protection, NVM set and endurance group (it exposes none of the
//!   device's), DLFEAT and data protection (what its own Write Zeroes and
//!   DSM do, and it serves no metadata), and NSFEAT.DAE (it has no DULBE).
//! - **Identifiers** (Identify Namespace NGUID/EUI64 and the Namespace
//!   Identification Descriptor list, CNS 03h): the device's NGUID, EUI-64
//!   and UUID, read once at start so they never change under a host (Linux
//!   drops a namespace whose identifiers change); the target's own generated
//!   NGUID and UUID only if the device reports none.
//! - **SMART / Health Information (log 02h)** for such a namespace, or for
//!   NSID 0/FFFFFFFFh when it is the subsystem's only namespace: the
//!   device's log (per namespace if the device supports that, else its
//!   controller-wide one). Other namespaces and subsystems keep the
//!   target's own page.
//!
//! A device that cannot be asked (being reset) answers Identify from the
//! last data it gave and SMART with Namespace Not Ready (a transient,
//! retryable status); a device error status is passed to the host as is.

use unvme_bdev::{AdminError, NvmeAdmin};
use unvme_proto::admin::{lid, IdentifyNamespace, NsIdDescriptor, SmartLog};
use unvme_proto::nvm;
use unvme_proto::nvme::{sct, Sqe, Status};

use crate::namespace::{device_identify_ns, Namespace, ALL};

/// NSFEAT bits taken from the device: THINP (NCAP/NUSE meaningful), NSABP
/// (the atomic fields), UIDREUSE, OPTPERF (NPWG … NOWS). Not DAE: that
/// reports Deallocated or Unwritten Logical Block errors, a feature the
/// target does not implement.
pub(crate) const NSFEAT_FROM_DEVICE: u8 = 0x01 | 0x02 | 0x08 | 0x10;
const NSFEAT_NSABP: u8 = 0x02;
const NSFEAT_OPTPERF: u8 = 0x10;
/// FLBAS bits the target keeps from the device: the format index (bits 3:0
/// and 6:5); not bit 4 (metadata at the end of the LBA): it serves none.
const FLBAS_INDEX: u8 = 0x6F;

/// Identify Namespace data that shows the device `dev` through the
/// target's own `own` (see the module documentation for the fields).
pub(crate) fn merge_identify_ns(
    own: &IdentifyNamespace,
    dev: &IdentifyNamespace,
) -> IdentifyNamespace {
    let mut id = own.clone();
    id.ncap = dev.ncap.min(own.nsze);
    id.nuse = dev.nuse.min(id.ncap);
    id.nvmcap = dev.nvmcap;
    id.nsfeat = (own.nsfeat & !NSFEAT_FROM_DEVICE) | (dev.nsfeat & NSFEAT_FROM_DEVICE);
    // The device's formats, if the one in use is the one served.
    let served = own.current_lba_format();
    if let (Some(d), Some(o)) = (dev.current_lba_format(), served) {
        if d.ms == 0 && d.lbads == o.lbads {
            id.nlbaf = dev.nlbaf;
            id.lbaf = dev.lbaf;
            id.flbas = dev.flbas & FLBAS_INDEX;
        }
    }
    if dev.nsfeat & NSFEAT_NSABP != 0 {
        id.nawun = dev.nawun;
        id.nawupf = dev.nawupf;
        id.nacwu = dev.nacwu;
        id.nabsn = dev.nabsn;
        id.nabo = dev.nabo;
        id.nabspf = dev.nabspf;
    }
    id.noiob = dev.noiob;
    if dev.nsfeat & NSFEAT_OPTPERF != 0 {
        id.npwg = dev.npwg;
        id.npwa = dev.npwa;
        id.npdg = dev.npdg;
        id.npda = dev.npda;
        id.nows = dev.nows;
    }
    id
}

/// Identify Namespace data for `ns` as a host sees it: `own` (the target's
/// data for it) merged with the device's, live, or the last the device gave
/// while it cannot be asked.
pub(crate) fn identify_namespace(ns: &Namespace, own: IdentifyNamespace) -> IdentifyNamespace {
    let Some(a) = ns.bdev.nvme_admin() else {
        return own;
    };
    let mut cache = ns.dev_ident.lock().unwrap_or_else(|p| p.into_inner());
    match device_identify_ns(a) {
        Ok(dev) => *cache = Some(dev),
        Err(e) => tracing::warn!(
            nsid = ns.nsid,
            "device Identify Namespace: {e}; answering from the last data it gave"
        ),
    }
    match cache.as_ref() {
        Some(dev) => merge_identify_ns(&own, dev),
        None => own,
    }
}

/// The Namespace Identification Descriptor list of `ns`: its non-zero
/// identifiers and the NVM command set.
pub(crate) fn ns_id_descs(ns: &Namespace) -> Vec<NsIdDescriptor> {
    let mut d = Vec::with_capacity(4);
    if ns.eui64 != [0; 8] {
        d.push(NsIdDescriptor::Eui64(ns.eui64));
    }
    if ns.nguid != [0; 16] {
        d.push(NsIdDescriptor::Nguid(ns.nguid));
    }
    if ns.uuid != [0; 16] {
        d.push(NsIdDescriptor::Uuid(ns.uuid));
    }
    d.push(NsIdDescriptor::Csi(0));
    d
}

/// Where the SMART / Health log of a Get Log Page with `nsid` comes from.
pub(crate) enum SmartSource<'a> {
    /// The device, asked with this NSID (its own, or FFFFFFFFh).
    Device(&'a dyn NvmeAdmin, u32),
    /// The target's own page.
    Own,
}

/// Routes a SMART / Health request: a namespace backed by a device with
/// pass-through gets the device's log; so does the whole controller (NSID 0
/// or FFFFFFFFh) when that namespace is the subsystem's only one.
/// Everything else keeps the target's own page.
pub(crate) fn smart_source(namespaces: &[Namespace], nsid: u32) -> SmartSource<'_> {
    if nsid == 0 || nsid == ALL {
        return match namespaces {
            [only] => match only.bdev.nvme_admin() {
                Some(a) => SmartSource::Device(a, ALL),
                None => SmartSource::Own,
            },
            _ => SmartSource::Own,
        };
    }
    match namespaces
        .iter()
        .find(|n| n.nsid == nsid)
        .and_then(|n| n.bdev.nvme_admin())
    {
        Some(a) => SmartSource::Device(a, a.nsid()),
        None => SmartSource::Own,
    }
}

/// The target's own SMART / Health page (a device with nothing to report).
pub(crate) fn own_smart_log() -> Vec<u8> {
    SmartLog {
        temperature: 300,
        avail_spare: 100,
        spare_thresh: 10,
        ..Default::default()
    }
    .to_bytes()
    .to_vec()
}

/// Get Log Page of the device's SMART / Health log for `nsid`.
fn smart_cmd(nsid: u32) -> Sqe {
    nvm::get_log_page(lid::SMART, nsid, 0, SmartLog::SIZE as u32)
}

/// The SMART / Health page (512 bytes) for a Get Log Page with `nsid`, or
/// the status to answer.
pub(crate) fn smart_log(namespaces: &[Namespace], nsid: u32) -> Result<Vec<u8>, Status> {
    let (a, dev_nsid) = match smart_source(namespaces, nsid) {
        SmartSource::Own => return Ok(own_smart_log()),
        SmartSource::Device(a, n) => (a, n),
    };
    let mut page = vec![0u8; SmartLog::SIZE];
    let mut r = a.admin(&smart_cmd(dev_nsid), &mut page);
    if dev_nsid != ALL {
        if let Err(AdminError::Status(st)) = &r {
            if st.sct == sct::GENERIC && st.sc == Status::INVALID_FIELD.sc {
                // No per-namespace log on this device: its controller-wide
                // one is the health of the SSD that holds the namespace.
                r = a.admin(&smart_cmd(ALL), &mut page);
            }
        }
    }
    match r {
        Ok(_) => Ok(page),
        Err(AdminError::Status(st)) => Err(st),
        Err(AdminError::Refused) => Ok(own_smart_log()),
        Err(AdminError::Unavailable(m)) => {
            tracing::warn!(nsid, "device SMART / Health log: {m}");
            Err(Status::NS_NOT_READY)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::device_ids;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use unvme_bdev::{Bdev, BdevInfo, BdevQueue, RamBdev};
    use unvme_proto::admin::LbaFormat;
    use unvme_proto::admin::{self, cns};

    /// A bdev whose "device" answers Identify and SMART from fixed data and
    /// records the NSIDs it was asked for.
    struct FakeSsd {
        info: BdevInfo,
        nsid: u32,
        ident: IdentifyNamespace,
        descs: Vec<NsIdDescriptor>,
        smart: SmartLog,
        per_ns_smart: bool,
        unavailable: std::sync::atomic::AtomicBool,
        smart_asked: Mutex<Vec<u32>>,
        calls: AtomicU32,
    }

    impl Bdev for FakeSsd {
        fn info(&self) -> &BdevInfo {
            &self.info
        }
        fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
            unreachable!("no I/O in these tests")
        }
        fn nvme_admin(&self) -> Option<&dyn NvmeAdmin> {
            Some(self)
        }
    }

    impl NvmeAdmin for FakeSsd {
        fn nsid(&self) -> u32 {
            self.nsid
        }
        fn admin(&self, sqe: &Sqe, data: &mut [u8]) -> Result<u32, AdminError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.unavailable.load(Ordering::Relaxed) {
                return Err(AdminError::Unavailable("being reset".into()));
            }
            match sqe.opc {
                admin::opc::IDENTIFY if sqe.cdw10 as u8 == cns::NS => {
                    assert_eq!(sqe.nsid, self.nsid, "asked for the device's own NSID");
                    self.ident.encode(data);
                }
                admin::opc::IDENTIFY if sqe.cdw10 as u8 == cns::NS_DESC_LIST => {
                    admin::encode_ns_id_descs(&self.descs, data).unwrap();
                }
                admin::opc::GET_LOG_PAGE if sqe.cdw10 as u8 == lid::SMART => {
                    self.smart_asked.lock().unwrap().push(sqe.nsid);
                    if sqe.nsid != ALL && !self.per_ns_smart {
                        return Err(AdminError::Status(Status::INVALID_FIELD));
                    }
                    self.smart.encode(data);
                }
                _ => return Err(AdminError::Refused),
            }
            Ok(0)
        }
    }

    fn qemu_like_ident() -> IdentifyNamespace {
        // What QEMU's emulated NVMe reports: 8 formats, 4 KiB ones at 4..,
        // DULBE and OPTPERF, EUI-64 but no NGUID.
        let mut id = IdentifyNamespace {
            nsze: 65536,
            ncap: 65536,
            nuse: 4096,
            nsfeat: 0x04 | 0x10 | 0x02,
            flbas: 4 | 0x10,
            mc: 0x3,
            dpc: 0x1f,
            dps: 1,
            nmic: 0,
            rescap: 0xff,
            dlfeat: 0x09,
            nawun: 7,
            nawupf: 3,
            nacwu: 1,
            noiob: 256,
            nvmcap: 65536 * 4096,
            npwg: 7,
            npwa: 7,
            npdg: 7,
            npda: 7,
            nows: 31,
            anagrpid: 9,
            nsattr: 1,
            nvmsetid: 2,
            endgid: 3,
            eui64: [0x52, 0x54, 0, 0, 0, 0, 0, 1],
            ..Default::default()
        };
        let f = |ms, lbads| LbaFormat { ms, lbads, rp: 0 };
        id.set_lba_formats(&[
            f(0, 9),
            f(8, 9),
            f(16, 9),
            f(64, 9),
            f(0, 12),
            f(8, 12),
            f(16, 12),
            f(64, 12),
        ]);
        id
    }

    fn fake(per_ns_smart: bool) -> Arc<FakeSsd> {
        let info = RamBdev::new("r", 65536, 4096).unwrap().info().clone();
        Arc::new(FakeSsd {
            info,
            nsid: 2,
            ident: qemu_like_ident(),
            descs: vec![
                NsIdDescriptor::Eui64([0x52, 0x54, 0, 0, 0, 0, 0, 1]),
                NsIdDescriptor::Uuid([0xab; 16]),
                NsIdDescriptor::Csi(0),
            ],
            smart: SmartLog {
                temperature: 323,
                power_on_hours: 5,
                host_writes: 42,
                ..Default::default()
            },
            per_ns_smart,
            unavailable: Default::default(),
            smart_asked: Mutex::new(Vec::new()),
            calls: AtomicU32::new(0),
        })
    }

    /// Composite Temperature and Host Write Commands of a SMART page.
    fn temp(p: &[u8]) -> u16 {
        u16::from_le_bytes([p[1], p[2]])
    }
    fn host_writes(p: &[u8]) -> u128 {
        u128::from_le_bytes(p[80..96].try_into().unwrap())
    }

    fn ns(nsid: u32, bdev: Arc<dyn Bdev>) -> Namespace {
        Namespace {
            nsid,
            bdev,
            gidx: 0,
            nguid: [0x11; 16],
            uuid: [0x22; 16],
            eui64: [0; 8],
            ana_group: 1,
            dev_ident: Mutex::new(None),
        }
    }

    fn own(nsze: u64, lbads: u8) -> IdentifyNamespace {
        let mut id = IdentifyNamespace {
            nsze,
            ncap: nsze,
            nuse: nsze,
            nmic: 1,
            dlfeat: 0x9,
            nguid: [0x11; 16],
            ..Default::default()
        };
        id.set_lba_formats(&[LbaFormat::with_lbads(lbads)]);
        id
    }

    #[test]
    fn identify_takes_the_devices_description_and_keeps_the_targets_contract() {
        let dev = qemu_like_ident();
        let m = merge_identify_ns(&own(65536, 12), &dev);
        // From the device: utilisation, formats (index 4, no metadata bit),
        // atomic and optimal-I/O fields, the NSFEAT bits describing them.
        assert_eq!((m.ncap, m.nuse, m.nvmcap), (65536, 4096, 65536 * 4096));
        assert_eq!(m.nlbaf, 7);
        assert_eq!(m.lbaf, dev.lbaf);
        assert_eq!(m.flbas, 4);
        assert_eq!(m.lba_size(), Some(4096));
        assert_eq!((m.nawun, m.nawupf, m.nacwu), (7, 3, 1));
        assert_eq!(m.noiob, 256);
        assert_eq!((m.npwg, m.npwa, m.npdg, m.npda, m.nows), (7, 7, 7, 7, 31));
        assert_eq!(
            m.nsfeat,
            0x10 | 0x02,
            "DAE (0x04) is not the target's to claim"
        );
        // The target's own: size served, sharing, no reservations / ANA /
        // write protect / sets, its DLFEAT, no metadata or protection.
        assert_eq!(m.nsze, 65536);
        assert_eq!(m.nmic, 1);
        assert_eq!(
            (m.rescap, m.anagrpid, m.nsattr, m.nvmsetid, m.endgid),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(m.dlfeat, 0x9);
        assert_eq!((m.mc, m.dpc, m.dps), (0, 0, 0));
        // Identifiers are the namespace's (decided at start), not re-read.
        assert_eq!(m.nguid, [0x11; 16]);
        assert_eq!(m.eui64, [0; 8]);
    }

    #[test]
    fn identify_keeps_the_targets_format_when_the_device_serves_another() {
        let dev = qemu_like_ident(); // 4 KiB in use
        let m = merge_identify_ns(&own(65536 * 8, 9), &dev);
        assert_eq!((m.nlbaf, m.flbas), (0, 0));
        assert_eq!(m.lba_size(), Some(512));
        // Capacity never exceeds the size the target serves.
        let mut big = qemu_like_ident();
        big.ncap = u64::MAX;
        big.nuse = u64::MAX;
        let m = merge_identify_ns(&own(1000, 12), &big);
        assert_eq!((m.nsze, m.ncap, m.nuse), (1000, 1000, 1000));
    }

    #[test]
    fn identify_without_nsabp_or_optperf_keeps_those_fields_zero() {
        let mut dev = qemu_like_ident();
        dev.nsfeat = 0;
        let m = merge_identify_ns(&own(65536, 12), &dev);
        assert_eq!(
            (m.nawun, m.nawupf, m.nacwu, m.npwg, m.nows),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(m.nsfeat, 0);
    }

    #[test]
    fn identify_is_live_and_falls_back_to_the_last_device_data() {
        let f = fake(true);
        let n = ns(1, f.clone());
        let m = identify_namespace(&n, own(65536, 12));
        assert_eq!(m.nlbaf, 7);
        f.unavailable.store(true, Ordering::Relaxed);
        let m2 = identify_namespace(&n, own(65536, 12));
        assert_eq!(m, m2, "same answer while the device is being reset");
        // A namespace without pass-through is the target's own data.
        let ram: Arc<dyn Bdev> = Arc::new(RamBdev::new("r", 16, 4096).unwrap());
        let plain = ns(3, ram);
        assert_eq!(identify_namespace(&plain, own(16, 12)), own(16, 12));
    }

    #[test]
    fn device_identifiers_come_from_identify_and_the_descriptor_list() {
        let f = fake(true);
        let (id, ids) = device_ids(&*f);
        assert_eq!(id.unwrap().nlbaf, 7);
        assert_eq!(ids.eui64, [0x52, 0x54, 0, 0, 0, 0, 0, 1]);
        assert_eq!(ids.uuid, [0xab; 16]);
        assert_eq!(ids.nguid, [0; 16]);
        assert!(ids.any());
        let mut n = ns(1, f);
        n.eui64 = ids.eui64;
        n.uuid = ids.uuid;
        n.nguid = ids.nguid;
        assert_eq!(
            ns_id_descs(&n),
            vec![
                NsIdDescriptor::Eui64([0x52, 0x54, 0, 0, 0, 0, 0, 1]),
                NsIdDescriptor::Uuid([0xab; 16]),
                NsIdDescriptor::Csi(0)
            ]
        );
    }

    #[test]
    fn smart_of_a_passthrough_namespace_or_its_only_controller_is_the_devices() {
        let f = fake(true);
        let only = [ns(1, f.clone())];
        let page = smart_log(&only, 1).unwrap();
        assert_eq!(temp(&page), 323);
        for all in [0, ALL] {
            let page = smart_log(&only, all).unwrap();
            assert_eq!(host_writes(&page), 42);
        }
        // The device's own NSID for the namespace, FFFFFFFFh for the controller.
        assert_eq!(*f.smart_asked.lock().unwrap(), [2, ALL, ALL]);
    }

    #[test]
    fn smart_of_other_namespaces_or_a_mixed_controller_is_the_targets() {
        let f = fake(true);
        let ram: Arc<dyn Bdev> = Arc::new(RamBdev::new("r", 16, 4096).unwrap());
        let mixed = [ns(1, f.clone()), ns(2, ram)];
        let own_temp = |p: Vec<u8>| temp(&p);
        assert_eq!(own_temp(smart_log(&mixed, 2).unwrap()), 300);
        assert_eq!(own_temp(smart_log(&mixed, ALL).unwrap()), 300);
        assert_eq!(own_temp(smart_log(&mixed, 0).unwrap()), 300);
        assert_eq!(own_temp(smart_log(&mixed, 7).unwrap()), 300);
        assert_eq!(own_temp(smart_log(&mixed, 1).unwrap()), 323);
        assert_eq!(*f.smart_asked.lock().unwrap(), [2]);
    }

    #[test]
    fn smart_falls_back_to_the_controller_log_and_reports_an_unreachable_device() {
        let f = fake(false); // no per-namespace log
        let only = [ns(1, f.clone())];
        assert_eq!(temp(&smart_log(&only, 1).unwrap()), 323);
        assert_eq!(*f.smart_asked.lock().unwrap(), [2, ALL]);
        f.unavailable.store(true, Ordering::Relaxed);
        assert_eq!(smart_log(&only, 1), Err(Status::NS_NOT_READY));
    }
}
