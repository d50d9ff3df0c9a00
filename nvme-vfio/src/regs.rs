//! NVMe controller registers (NVMe Base 2.0 §3.1.4 "Controller Properties")
//! and the queue ring arithmetic shared by the admin and I/O queues
//! (§3.3.1 "Memory-Based Transport Queue Model").

/// Controller Capabilities (64-bit).
pub(crate) const CAP: usize = 0x00;
/// Version.
pub(crate) const VS: usize = 0x08;
/// Controller Configuration.
pub(crate) const CC: usize = 0x14;
/// Controller Status.
pub(crate) const CSTS: usize = 0x1C;
/// Admin Queue Attributes.
pub(crate) const AQA: usize = 0x24;
/// Admin Submission Queue Base Address (64-bit).
pub(crate) const ASQ: usize = 0x28;
/// Admin Completion Queue Base Address (64-bit).
pub(crate) const ACQ: usize = 0x30;
/// First doorbell (SQ 0 Tail).
pub(crate) const DOORBELL_BASE: usize = 0x1000;

/// CC.EN.
pub(crate) const CC_EN: u32 = 1;
/// CC.SHN = 01b, normal shutdown.
pub(crate) const CC_SHN_NORMAL: u32 = 1 << 14;
/// CC.SHN mask.
pub(crate) const CC_SHN_MASK: u32 = 3 << 14;
/// CSTS.RDY.
pub(crate) const CSTS_RDY: u32 = 1;
/// CSTS.CFS (Controller Fatal Status).
pub(crate) const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask and "shutdown complete" value.
pub(crate) const CSTS_SHST_MASK: u32 = 3 << 2;
pub(crate) const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// CC for this driver: EN, NVM command set (CSS 0), MPS 0 (4 KiB pages),
/// round-robin arbitration, IOSQES 6 (64-byte SQEs), IOCQES 4 (16-byte CQEs).
pub(crate) const fn cc_enable() -> u32 {
    CC_EN | (6 << 16) | (4 << 20)
}

/// A register value of all ones: the device no longer answers (surprise
/// removal, or a PCIe link down).
pub(crate) fn gone(v: u32) -> bool {
    v == u32::MAX
}

/// Decoded Controller Capabilities (CAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cap {
    /// Maximum Queue Entries Supported, 1's based (MQES + 1).
    pub max_queue_entries: u32,
    /// Contiguous Queues Required.
    pub cqr: bool,
    /// Timeout in 500 ms units (worst-case time to RDY after EN changes).
    pub to: u8,
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart.
    pub dstrd: u8,
    /// NVM command set supported (CSS bit 0).
    pub css_nvm: bool,
    /// Memory Page Size Minimum: 2^(12 + mpsmin).
    pub mpsmin: u8,
    /// Memory Page Size Maximum.
    pub mpsmax: u8,
}

impl Cap {
    /// Decodes the 64-bit CAP register.
    pub fn decode(v: u64) -> Self {
        Cap {
            max_queue_entries: (v & 0xFFFF) as u32 + 1,
            cqr: v & (1 << 16) != 0,
            to: (v >> 24) as u8,
            dstrd: ((v >> 32) & 0xF) as u8,
            css_nvm: (v >> 37) & 1 != 0,
            mpsmin: ((v >> 48) & 0xF) as u8,
            mpsmax: ((v >> 52) & 0xF) as u8,
        }
    }

    /// CAP.TO as a duration (at least 500 ms: TO 0 is not meaningful).
    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(500 * u64::from(self.to.max(1)))
    }

    /// Offset in BAR0 of the Submission Queue `qid` Tail doorbell.
    pub fn sq_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + (2 * usize::from(qid)) * (4 << self.dstrd)
    }

    /// Offset in BAR0 of the Completion Queue `qid` Head doorbell.
    pub fn cq_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + (2 * usize::from(qid) + 1) * (4 << self.dstrd)
    }
}

/// Submission queue tail arithmetic: the slot to write next and the value
/// the tail doorbell takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SqRing {
    entries: u16,
    tail: u16,
}

impl SqRing {
    /// A ring of `entries` (2..=65536 as the spec allows; stored 1..=65535 here).
    pub fn new(entries: u16) -> Self {
        SqRing { entries, tail: 0 }
    }

    /// Takes the slot at the tail and advances the tail; returns the slot.
    pub fn push(&mut self) -> u16 {
        let slot = self.tail;
        self.tail = if self.tail + 1 == self.entries {
            0
        } else {
            self.tail + 1
        };
        slot
    }

    /// The current tail (the doorbell value).
    pub fn tail(&self) -> u16 {
        self.tail
    }
}

/// Completion queue head and phase arithmetic: a CQE at the head is new
/// when its phase tag equals the expected phase, which flips at each wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CqRing {
    entries: u16,
    head: u16,
    phase: bool,
}

impl CqRing {
    /// A fresh ring: head 0, expected phase 1 (the memory starts zeroed).
    pub fn new(entries: u16) -> Self {
        CqRing {
            entries,
            head: 0,
            phase: true,
        }
    }

    /// The slot to look at.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Whether a CQE status field (phase tag in bit 0) is new.
    pub fn is_new(&self, status: u16) -> bool {
        (status & 1 != 0) == self.phase
    }

    /// Consumes the CQE at the head.
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode() {
        // MQES 1023, CQR, TO 20 (10 s), DSTRD 2, CSS NVM, MPSMIN 0, MPSMAX 4.
        let v: u64 = 1023 | (1 << 16) | (20 << 24) | (2 << 32) | (1 << 37) | (4 << 52);
        let cap = Cap::decode(v);
        assert_eq!(cap.max_queue_entries, 1024);
        assert!(cap.cqr);
        assert_eq!(cap.to, 20);
        assert_eq!(cap.ready_timeout(), std::time::Duration::from_secs(10));
        assert_eq!(cap.dstrd, 2);
        assert!(cap.css_nvm);
        assert_eq!((cap.mpsmin, cap.mpsmax), (0, 4));
        assert_eq!(
            Cap::decode(0).ready_timeout(),
            std::time::Duration::from_millis(500)
        );
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
    fn sq_tail_wraps() {
        let mut sq = SqRing::new(3);
        assert_eq!((sq.push(), sq.tail()), (0, 1));
        assert_eq!((sq.push(), sq.tail()), (1, 2));
        assert_eq!((sq.push(), sq.tail()), (2, 0));
        assert_eq!(sq.push(), 0);
    }

    #[test]
    fn cq_phase_flips_at_each_wrap() {
        let mut cq = CqRing::new(2);
        assert!(cq.is_new(1) && !cq.is_new(0));
        cq.advance();
        assert_eq!(cq.head(), 1);
        assert!(cq.is_new(0xFFFF) && !cq.is_new(0xFFFE));
        cq.advance();
        assert_eq!(cq.head(), 0);
        // Second lap: the device writes phase 0; stale phase-1 entries are old.
        assert!(cq.is_new(0) && !cq.is_new(1));
        cq.advance();
        cq.advance();
        assert!(cq.is_new(1));
    }

    #[test]
    fn cc_enable_sets_entry_sizes_and_4k_pages() {
        let cc = cc_enable();
        assert_eq!(cc & 1, 1);
        assert_eq!((cc >> 16) & 0xF, 6);
        assert_eq!((cc >> 20) & 0xF, 4);
        assert_eq!((cc >> 7) & 0xF, 0); // MPS
        assert_eq!((cc >> 4) & 0x7, 0); // CSS NVM
        assert!(gone(u32::MAX) && !gone(0));
    }
}
