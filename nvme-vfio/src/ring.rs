//! The queue ring arithmetic shared by the admin and I/O queues (NVMe Base
//! 2.0 §3.3.1 "Memory-Based Transport Queue Model"): where the next SQE
//! goes, and which CQE is new by its phase tag. The registers themselves
//! (CAP, CC, CSTS, doorbell offsets) are [`unvme_proto::regs`]'s.

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
}
