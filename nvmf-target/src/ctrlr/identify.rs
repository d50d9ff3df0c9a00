//! Identify data the controller serves (NVMe Base 2.0 §5.17.2): Identify
//! Controller from the subsystem and the target's limits, Identify
//! Namespace from the backend's geometry and capabilities, built with
//! `unvme_proto::admin`'s structures.

use unvme_proto::admin::{
    aec, IdentifyController, IdentifyNamespace, LbaFormat, PowerStateDescriptor,
};

use crate::config::{TargetConfig, ANA_GROUP_MAX};

/// ANA Transition Time reported (seconds): the longest a group stays in
/// the ANA Change state before a host gives up on it. States here change
/// at once; the control plane that sets Change must leave it within this.
pub(crate) const ANATT_S: u8 = 10;
use crate::namespace::Namespace;
use crate::subsystem::{CtrlShared, Subsystem};

/// Identify Controller data for `ctrl`.
pub(crate) fn identify_controller(cfg: &TargetConfig, ctrl: &CtrlShared) -> IdentifyController {
    let s = &ctrl.subsys;
    let mut id = IdentifyController {
        vid: 0x1b36, // the vendor id QEMU uses for emulated devices; unvme has none of its own
        ssvid: 0x1b36,
        sn: s.serial.clone(),
        mn: s.model.clone(),
        fr: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
        rab: 6,
        // Several ports (bit 0), several controllers (bit 1), ANA reporting
        // (bit 3): what a host's native multipath looks for.
        cmic: if s.is_discovery { 0x2 } else { 0x1 | 0x2 | 0x8 },
        mdts: mdts_for(s, cfg),
        cntlid: ctrl.cntlid,
        ver: unvme_proto::regs::NVME_VERSION_2_0,
        // Namespace Attribute and ANA Change Notices.
        oaes: if s.is_discovery {
            0
        } else {
            aec::NAN | aec::ANACN
        },
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
        // A volatile write cache; VWC.FB (bits 2:1) 11b: a Flush with NSID
        // FFFFFFFFh flushes every namespace (`io::broadcast_flush`).
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
        // ANA: every state reported (bits 4:0); a namespace's ANAGRPID
        // never changes while it is attached (bit 6).
        anatt: if s.is_discovery { 0 } else { ANATT_S },
        anacap: if s.is_discovery { 0 } else { 0x1F | 0x40 },
        anagrpmax: if s.is_discovery { 0 } else { ANA_GROUP_MAX },
        nanagrpid: if s.is_discovery { 0 } else { ANA_GROUP_MAX },
        // A host sizes its ANA log buffer by MNAN: every NSID must fit.
        mnan: s.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0),
        ..Default::default()
    };
    id.psd[0] = PowerStateDescriptor {
        mp: 100,
        ..Default::default()
    };
    id
}

/// Identify Namespace data.
pub(crate) fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
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
        anagrpid: ns.ana_group,
        ..Default::default()
    };
    id.set_lba_formats(&[LbaFormat::with_lbads(lbads)]);
    id.flbas = 0;
    id
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
