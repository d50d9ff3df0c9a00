//! A namespace: an NSID bound to a backend, with the identifiers a host
//! recognises it by.
//!
//! The identifiers (NGUID, UUID, EUI-64) are fixed when the namespace is
//! opened and never change under a connected host (Linux drops a namespace
//! whose identifiers change): a device with admin pass-through (a VFIO SSD)
//! is asked once for its own; other backends get identifiers derived from
//! the subsystem NQN and NSID, stable across restarts and the same in every
//! target process that exports that NQN and NSID (multipath). Identifiers
//! given in the configuration replace either (`Subsystems::from_config`).
//! What the controller answers from these is in `ctrlr`; this module only
//! holds them, with the namespace's ANA group.

use std::sync::{Arc, Mutex};

use unvme_bdev::{AdminError, Bdev, NvmeAdmin};
use unvme_proto::admin::{self, cns, IdentifyNamespace, NsIdDescriptor};
use unvme_proto::nvm;

/// NSID meaning every namespace of the controller.
pub(crate) const ALL: u32 = 0xFFFF_FFFF;

/// A namespace: an NSID bound to a backend.
pub(crate) struct Namespace {
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
    /// ANA Group ID (1..=ANAGRPMAX).
    pub ana_group: u32,
    /// For a backend with admin pass-through: the device's Identify
    /// Namespace data last read, for answers while it cannot be asked.
    pub dev_ident: Mutex<Option<IdentifyNamespace>>,
}

impl Namespace {
    /// Binds `nsid` of subsystem `nqn` to `bdev` at global index `gidx`, with
    /// the device's identifiers when it has admin pass-through and reports
    /// any, else identifiers derived from `nqn` and `nsid`.
    pub fn new(nqn: &str, nsid: u32, bdev: Arc<dyn Bdev>, gidx: usize) -> Namespace {
        let id = stable_id(nqn, nsid);
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
            ana_group: 1,
            dev_ident: Mutex::new(None),
        };
        if let Some(a) = ns.bdev.nvme_admin() {
            let (ident, ids) = device_ids(a);
            if ids.any() {
                (ns.nguid, ns.eui64, ns.uuid) = (ids.nguid, ids.eui64, ids.uuid);
            }
            tracing::info!(
                nsid,
                subnqn = %nqn,
                device_nsid = a.nsid(),
                device_ids = ids.any(),
                "namespace {nsid}: admin pass-through to its NVMe device (Identify Namespace fields, identifiers, SMART / health log)"
            );
            ns.dev_ident = Mutex::new(ident);
        }
        ns
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

/// The identifiers of a namespace as its device reports them (zero: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeviceIds {
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
}

impl DeviceIds {
    /// Whether the device reports any identifier.
    pub fn any(&self) -> bool {
        self.nguid != [0; 16] || self.eui64 != [0; 8] || self.uuid != [0; 16]
    }
}

/// The device's Identify Namespace data for its namespace.
pub(crate) fn device_identify_ns(a: &dyn NvmeAdmin) -> Result<IdentifyNamespace, AdminError> {
    let mut page = [0u8; admin::IDENTIFY_DATA_SIZE];
    a.admin(&nvm::identify(cns::NS, a.nsid(), 0), &mut page)?;
    IdentifyNamespace::decode(&page)
        .map_err(|e| AdminError::Unavailable(format!("Identify Namespace: {e}")))
}

/// Reads the device's Identify Namespace data and identifiers (Identify
/// Namespace NGUID/EUI64, then the descriptor list for what it adds: the
/// UUID). Called once, when the target opens the namespace.
pub(crate) fn device_ids(a: &dyn NvmeAdmin) -> (Option<IdentifyNamespace>, DeviceIds) {
    let mut ids = DeviceIds::default();
    let id = match device_identify_ns(a) {
        Ok(id) => {
            ids.nguid = id.nguid;
            ids.eui64 = id.eui64;
            Some(id)
        }
        Err(e) => {
            tracing::warn!(nsid = a.nsid(), "device Identify Namespace: {e}");
            None
        }
    };
    let mut page = [0u8; admin::IDENTIFY_DATA_SIZE];
    match a.admin(&nvm::identify(cns::NS_DESC_LIST, a.nsid(), 0), &mut page) {
        Ok(_) => {
            // A malformed list from the device still yields what parsed.
            for d in admin::decode_ns_id_descs(&page).unwrap_or_default() {
                match d {
                    NsIdDescriptor::Nguid(v) if ids.nguid == [0; 16] => ids.nguid = v,
                    NsIdDescriptor::Eui64(v) if ids.eui64 == [0; 8] => ids.eui64 = v,
                    NsIdDescriptor::Uuid(v) => ids.uuid = v,
                    _ => {}
                }
            }
        }
        // Devices before NVMe 1.3 have no descriptor list.
        Err(e) => tracing::debug!(
            nsid = a.nsid(),
            "device Namespace Identification Descriptors: {e}"
        ),
    }
    (id, ids)
}
