//! The NVMe controller registers (NVMe Base 2.0 §3.1.4 "Controller
//! Properties"): their offsets, and CAP, CC and CSTS decoded and encoded.
//!
//! One definition for every transport: a PCIe controller has them in BAR0
//! (MMIO), a Fabrics controller as properties read and written with
//! Property Get / Set (NVMe over Fabrics 1.1 §3.5), and the target serves
//! them to its hosts. Only the pure register layout lives here; reading and
//! writing them is the transport's business ([`crate::bringup`] runs the
//! sequence over either).

use std::time::Duration;

/// Controller Capabilities (8 bytes).
pub const CAP: u32 = 0x00;
/// Version.
pub const VS: u32 = 0x08;
/// Interrupt Mask Set (PCIe only).
pub const INTMS: u32 = 0x0C;
/// Interrupt Mask Clear (PCIe only).
pub const INTMC: u32 = 0x10;
/// Controller Configuration.
pub const CC: u32 = 0x14;
/// Controller Status.
pub const CSTS: u32 = 0x1C;
/// NVM Subsystem Reset.
pub const NSSR: u32 = 0x20;
/// Admin Queue Attributes (memory-based transports).
pub const AQA: u32 = 0x24;
/// Admin Submission Queue Base Address (8 bytes; memory-based transports).
pub const ASQ: u32 = 0x28;
/// Admin Completion Queue Base Address (8 bytes; memory-based transports).
pub const ACQ: u32 = 0x30;
/// Submission Queue 0 Tail Doorbell, the first doorbell (PCIe, §3.1.4.21).
pub const DOORBELL_BASE: u64 = 0x1000;

/// NVMe version value for 2.0.0 (VS register / Identify VER).
pub const NVME_VERSION_2_0: u32 = 0x0002_0000;

/// Whether a register read as all ones: the device no longer answers
/// (surprise removal, or a PCIe link down).
pub fn gone(v: u32) -> bool {
    v == u32::MAX
}

/// Controller Capabilities, CAP (NVMe Base 2.0 Figure 36). Fields keep the
/// specification's encoding (MQES 0's based, TO in 500 ms units, …); the
/// methods give the derived values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    /// Maximum Queue Entries Supported, 0's based (bits 15:00).
    pub mqes: u16,
    /// Contiguous Queues Required (bit 16).
    pub cqr: bool,
    /// Arbitration Mechanism Supported (bits 18:17).
    pub ams: u8,
    /// Timeout in 500 ms units: worst-case time to CSTS.RDY after CC.EN
    /// changes (bits 31:24).
    pub to: u8,
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart (bits 35:32).
    pub dstrd: u8,
    /// NVM Subsystem Reset Supported (bit 36).
    pub nssrs: bool,
    /// Command Sets Supported (bits 44:37; bit 0 of the field: NVM).
    pub css: u8,
    /// Boot Partition Support (bit 45).
    pub bps: bool,
    /// Memory Page Size Minimum: 2^(12 + mpsmin) bytes (bits 51:48).
    pub mpsmin: u8,
    /// Memory Page Size Maximum: 2^(12 + mpsmax) bytes (bits 55:52).
    pub mpsmax: u8,
}

impl Cap {
    /// Decodes the 64-bit CAP value (fields this type does not name are
    /// dropped).
    pub fn decode(v: u64) -> Self {
        Cap {
            mqes: v as u16,
            cqr: v & (1 << 16) != 0,
            ams: ((v >> 17) & 0x3) as u8,
            to: (v >> 24) as u8,
            dstrd: ((v >> 32) & 0xF) as u8,
            nssrs: v & (1 << 36) != 0,
            css: (v >> 37) as u8,
            bps: v & (1 << 45) != 0,
            mpsmin: ((v >> 48) & 0xF) as u8,
            mpsmax: ((v >> 52) & 0xF) as u8,
        }
    }

    /// The 64-bit CAP value (each field masked to its width).
    pub fn encode(&self) -> u64 {
        u64::from(self.mqes)
            | u64::from(self.cqr) << 16
            | u64::from(self.ams & 0x3) << 17
            | u64::from(self.to) << 24
            | u64::from(self.dstrd & 0xF) << 32
            | u64::from(self.nssrs) << 36
            | u64::from(self.css) << 37
            | u64::from(self.bps) << 45
            | u64::from(self.mpsmin & 0xF) << 48
            | u64::from(self.mpsmax & 0xF) << 52
    }

    /// Maximum queue entries, 1's based (MQES + 1).
    pub fn max_queue_entries(&self) -> u32 {
        u32::from(self.mqes) + 1
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub fn css_nvm(&self) -> bool {
        self.css & 1 != 0
    }

    /// CAP.TO as a duration (at least 500 ms: TO 0 is not meaningful).
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(500 * u64::from(self.to.max(1)))
    }

    /// Offset of the Submission Queue `qid` Tail doorbell (PCIe).
    pub fn sq_doorbell(&self, qid: u16) -> u64 {
        DOORBELL_BASE + (2 * u64::from(qid)) * (4 << self.dstrd)
    }

    /// Offset of the Completion Queue `qid` Head doorbell (PCIe).
    pub fn cq_doorbell(&self, qid: u16) -> u64 {
        DOORBELL_BASE + (2 * u64::from(qid) + 1) * (4 << self.dstrd)
    }
}

/// Builds the CAP a target serves: MQES (0's based), CQR, TO (500 ms
/// units), DSTRD 0, CSS NVM, MPSMIN/MPSMAX 4 KiB.
pub fn cap_value(mqes: u16, timeout_500ms: u8) -> u64 {
    Cap {
        mqes,
        cqr: true,
        to: timeout_500ms,
        css: 1,
        ..Cap::default()
    }
    .encode()
}

/// CC bit positions and values (NVMe Base 2.0 Figure 41).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected shift (bits 06:04).
    pub const CSS_SHIFT: u32 = 4;
    /// Memory Page Size shift (bits 10:07).
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected shift (bits 13:11).
    pub const AMS_SHIFT: u32 = 11;
    /// Shutdown Notification field shift (bits 15:14).
    pub const SHN_SHIFT: u32 = 14;
    /// Shutdown Notification mask.
    pub const SHN_MASK: u32 = 0x3 << SHN_SHIFT;
    /// Shutdown Notification: normal shutdown (01b).
    pub const SHN_NORMAL: u32 = 0x1 << SHN_SHIFT;
    /// Shutdown Notification: abrupt shutdown (10b).
    pub const SHN_ABRUPT: u32 = 0x2 << SHN_SHIFT;
    /// I/O Submission Queue Entry Size shift (bits 19:16).
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size shift (bits 23:20).
    pub const IOCQES_SHIFT: u32 = 20;
}

/// Controller Configuration, CC (NVMe Base 2.0 Figure 41).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cc {
    /// Enable (bit 0).
    pub en: bool,
    /// I/O Command Set Selected (bits 06:04; 000b: NVM).
    pub css: u8,
    /// Memory Page Size: 2^(12 + mps) bytes (bits 10:07).
    pub mps: u8,
    /// Arbitration Mechanism Selected (bits 13:11; 000b: round robin).
    pub ams: u8,
    /// Shutdown Notification (bits 15:14; 01b normal, 10b abrupt).
    pub shn: u8,
    /// I/O Submission Queue Entry Size, log2 bytes (bits 19:16).
    pub iosqes: u8,
    /// I/O Completion Queue Entry Size, log2 bytes (bits 23:20).
    pub iocqes: u8,
}

impl Cc {
    /// The CC a host writes to enable a controller for the NVM command
    /// set: EN, CSS NVM, MPS 0 (4 KiB pages), round-robin arbitration, no
    /// shutdown, 64-byte SQEs (IOSQES 6) and 16-byte CQEs (IOCQES 4).
    pub fn nvm_enable() -> Self {
        Cc {
            en: true,
            iosqes: 6,
            iocqes: 4,
            ..Cc::default()
        }
    }

    /// Decodes a CC value.
    pub fn decode(v: u32) -> Self {
        Cc {
            en: v & cc::EN != 0,
            css: ((v >> cc::CSS_SHIFT) & 0x7) as u8,
            mps: ((v >> cc::MPS_SHIFT) & 0xF) as u8,
            ams: ((v >> cc::AMS_SHIFT) & 0x7) as u8,
            shn: ((v >> cc::SHN_SHIFT) & 0x3) as u8,
            iosqes: ((v >> cc::IOSQES_SHIFT) & 0xF) as u8,
            iocqes: ((v >> cc::IOCQES_SHIFT) & 0xF) as u8,
        }
    }

    /// The CC value (each field masked to its width).
    pub fn encode(&self) -> u32 {
        u32::from(self.en)
            | u32::from(self.css & 0x7) << cc::CSS_SHIFT
            | u32::from(self.mps & 0xF) << cc::MPS_SHIFT
            | u32::from(self.ams & 0x7) << cc::AMS_SHIFT
            | u32::from(self.shn & 0x3) << cc::SHN_SHIFT
            | u32::from(self.iosqes & 0xF) << cc::IOSQES_SHIFT
            | u32::from(self.iocqes & 0xF) << cc::IOCQES_SHIFT
    }
}

/// CSTS bits (NVMe Base 2.0 Figure 42).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status mask (bits 03:02).
    pub const SHST_MASK: u32 = 0x3 << 2;
    /// Shutdown Status: shutdown processing occurring (01b).
    pub const SHST_OCCURRING: u32 = 0x1 << 2;
    /// Shutdown Status: shutdown processing complete (10b).
    pub const SHST_COMPLETE: u32 = 0x2 << 2;
    /// NVM Subsystem Reset Occurred.
    pub const NSSRO: u32 = 1 << 4;
    /// Processing Paused.
    pub const PP: u32 = 1 << 5;
}

/// Controller Status, CSTS (NVMe Base 2.0 Figure 42).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Csts {
    /// Ready (bit 0).
    pub rdy: bool,
    /// Controller Fatal Status (bit 1).
    pub cfs: bool,
    /// Shutdown Status (bits 03:02; 10b: complete).
    pub shst: u8,
    /// NVM Subsystem Reset Occurred (bit 4).
    pub nssro: bool,
    /// Processing Paused (bit 5).
    pub pp: bool,
}

impl Csts {
    /// Decodes a CSTS value.
    pub fn decode(v: u32) -> Self {
        Csts {
            rdy: v & csts::RDY != 0,
            cfs: v & csts::CFS != 0,
            shst: ((v & csts::SHST_MASK) >> 2) as u8,
            nssro: v & csts::NSSRO != 0,
            pp: v & csts::PP != 0,
        }
    }

    /// The CSTS value (SHST masked to its width).
    pub fn encode(&self) -> u32 {
        u32::from(self.rdy)
            | u32::from(self.cfs) << 1
            | u32::from(self.shst & 0x3) << 2
            | u32::from(self.nssro) << 4
            | u32::from(self.pp) << 5
    }

    /// Shutdown processing is complete (SHST = 10b).
    pub fn shutdown_complete(&self) -> bool {
        self.shst == 2
    }
}

/// AQA for admin queues of `sq_entries` and `cq_entries` (1's based,
/// 2..=4096): ASQS in bits 11:00, ACQS in bits 27:16, both 0's based.
pub fn aqa_value(sq_entries: u16, cq_entries: u16) -> u32 {
    u32::from(sq_entries.saturating_sub(1) & 0xFFF)
        | u32::from(cq_entries.saturating_sub(1) & 0xFFF) << 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cap_fields_decode() {
        // MQES 1023, CQR, TO 20 (10 s), DSTRD 2, CSS NVM, MPSMIN 0, MPSMAX 4.
        let v: u64 = 1023 | (1 << 16) | (20 << 24) | (2 << 32) | (1 << 37) | (4 << 52);
        let cap = Cap::decode(v);
        assert_eq!(cap.max_queue_entries(), 1024);
        assert!(cap.cqr);
        assert_eq!(cap.to, 20);
        assert_eq!(cap.ready_timeout(), Duration::from_secs(10));
        assert_eq!(cap.dstrd, 2);
        assert!(cap.css_nvm());
        assert_eq!((cap.mpsmin, cap.mpsmax), (0, 4));
        assert_eq!(cap.encode(), v);
        assert_eq!(Cap::decode(0).ready_timeout(), Duration::from_millis(500));
    }

    #[test]
    fn the_served_cap_is_what_the_target_always_sent() {
        assert_eq!(cap_value(127, 20), 127 | (1 << 16) | (20 << 24) | (1 << 37));
        let cap = Cap::decode(cap_value(127, 1));
        assert_eq!((cap.max_queue_entries(), cap.to), (128, 1));
        assert!(cap.css_nvm() && cap.cqr && cap.dstrd == 0 && cap.mpsmin == 0);
    }

    #[test]
    fn doorbells_honour_the_stride() {
        let cap = Cap::decode(0);
        assert_eq!(cap.sq_doorbell(0), 0x1000);
        assert_eq!(cap.cq_doorbell(0), 0x1004);
        assert_eq!(cap.sq_doorbell(1), 0x1008);
        assert_eq!(cap.cq_doorbell(1), 0x100C);
        let cap = Cap::decode(3 << 32); // DSTRD 3: 32-byte stride
        assert_eq!(cap.sq_doorbell(0), 0x1000);
        assert_eq!(cap.cq_doorbell(0), 0x1020);
        assert_eq!(cap.sq_doorbell(2), 0x1080);
        assert_eq!(cap.cq_doorbell(2), 0x10A0);
        let cap = Cap::decode(0xF << 32);
        assert_eq!(cap.cq_doorbell(65535), 0x1000 + 131071 * (4 << 15));
    }

    #[test]
    fn the_enable_value_selects_nvm_4k_pages_and_entry_sizes() {
        let v = Cc::nvm_enable().encode();
        assert_eq!(v, 1 | (6 << 16) | (4 << 20));
        assert_eq!(v & cc::EN, cc::EN);
        assert_eq!((v >> cc::MPS_SHIFT) & 0xF, 0);
        assert_eq!((v >> cc::CSS_SHIFT) & 0x7, 0);
        assert_eq!(v & cc::SHN_MASK, 0);
        let shut = Cc {
            shn: 1,
            ..Cc::nvm_enable()
        };
        assert_eq!(shut.encode() & cc::SHN_MASK, cc::SHN_NORMAL);
    }

    #[test]
    fn csts_bits_and_register_helpers() {
        let c = Csts::decode(csts::RDY | csts::SHST_COMPLETE);
        assert!(c.rdy && !c.cfs && c.shutdown_complete());
        assert!(!Csts::decode(csts::SHST_OCCURRING).shutdown_complete());
        assert!(Csts::decode(csts::CFS).cfs);
        assert!(gone(u32::MAX) && !gone(0));
        assert_eq!(aqa_value(32, 32), 31 | (31 << 16));
    }

    proptest! {
        #[test]
        fn cap_round_trips(mqes: u16, cqr: bool, ams in 0u8..4, to: u8, dstrd in 0u8..16,
                           nssrs: bool, css: u8, bps: bool, mpsmin in 0u8..16, mpsmax in 0u8..16) {
            let cap = Cap { mqes, cqr, ams, to, dstrd, nssrs, css, bps, mpsmin, mpsmax };
            prop_assert_eq!(Cap::decode(cap.encode()), cap);
        }

        #[test]
        fn cap_decode_keeps_every_named_bit(v: u64) {
            let known: u64 = 0xFFFF | 1 << 16 | 0x3 << 17 | 0xFF << 24 | 0xF << 32 | 1 << 36
                | 0xFF << 37 | 1 << 45 | 0xF << 48 | 0xF << 52;
            prop_assert_eq!(Cap::decode(v).encode(), v & known);
        }

        #[test]
        fn cc_round_trips(en: bool, css in 0u8..8, mps in 0u8..16, ams in 0u8..8, shn in 0u8..4,
                          iosqes in 0u8..16, iocqes in 0u8..16) {
            let c = Cc { en, css, mps, ams, shn, iosqes, iocqes };
            prop_assert_eq!(Cc::decode(c.encode()), c);
        }

        #[test]
        fn cc_decode_keeps_every_named_bit(v: u32) {
            prop_assert_eq!(Cc::decode(v).encode(), v & 0x00FF_FFF1);
        }

        #[test]
        fn csts_round_trips(rdy: bool, cfs: bool, shst in 0u8..4, nssro: bool, pp: bool) {
            let c = Csts { rdy, cfs, shst, nssro, pp };
            prop_assert_eq!(Csts::decode(c.encode()), c);
        }
    }
}
