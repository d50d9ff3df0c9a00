//! Walking a split-virtqueue descriptor chain from a known head index
//! (VIRTIO 1.2, 2.7.5 "The Virtqueue Descriptor Table", 2.7.5.3 "Indirect
//! Descriptors").
//!
//! `virtio-queue` only hands out chains whose head it read from the
//! available ring. A request resubmitted from the inflight region has only
//! its head index — its available-ring slot may long have been reused — so
//! [`SplitChain`] walks the descriptor table from that head with the same
//! rules as `virtio_queue::DescriptorChain`: at most the table size
//! descriptors, one level of indirection (a table of whole 16-byte
//! descriptors), no more than 4 GiB in total. A chain cut short ends on a
//! descriptor that still has `NEXT` set, which the request parser reports as
//! malformed.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Size of one split descriptor.
const DESC_SIZE: u64 = 16;

/// The descriptors of one chain, read lazily from guest memory.
pub struct SplitChain<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory> SplitChain<'a, M> {
    /// The chain starting at `head` in the descriptor table at
    /// `desc_table` of a queue of `queue_size` entries.
    pub fn new(mem: &'a M, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        SplitChain {
            mem,
            table: desc_table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory> Iterator for SplitChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let addr = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
            let desc: Descriptor = self.mem.read_obj(addr).ok()?;
            if desc.refers_to_indirect_table() {
                // Only one level, whole descriptors, at most 2^16 - 1.
                let n = desc.len() / DESC_SIZE as u32;
                if self.indirect
                    || !desc.len().is_multiple_of(DESC_SIZE as u32)
                    || n > u32::from(u16::MAX)
                {
                    self.ttl = 0;
                    return None;
                }
                self.table = desc.addr();
                self.table_len = n as u16;
                self.ttl = self.table_len;
                self.next = 0;
                self.indirect = true;
                continue;
            }
            // Drivers must not make a chain longer than 2^32 bytes (2.7.5.2).
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The walker must see exactly what virtio-queue's own chain iterator
    //! sees, for well-formed and malformed tables alike.

    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestMemoryMmap};

    const QSIZE: u16 = 16;
    const INDIRECT_TABLE: u64 = 0x8_0000;

    fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().raw_value(), d.len(), d.flags(), d.next())
    }

    #[derive(Debug, Clone)]
    struct ArbDesc {
        len: u32,
        flags: u16,
        next: u16,
    }

    fn arb_desc() -> impl Strategy<Value = ArbDesc> {
        (
            prop_oneof![
                Just(0u32),
                1u32..4096,
                Just(16 * 4),
                Just(u32::MAX),
                any::<u32>()
            ],
            prop_oneof![
                Just(0u16),
                Just(VRING_DESC_F_NEXT as u16),
                Just(VRING_DESC_F_WRITE as u16),
                Just((VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16),
                Just(VRING_DESC_F_INDIRECT as u16),
                any::<u16>(),
            ],
            prop_oneof![0u16..QSIZE, any::<u16>()],
        )
            .prop_map(|(len, flags, next)| ArbDesc { len, flags, next })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn walker_matches_virtio_queue(
            table in proptest::collection::vec(arb_desc(), QSIZE as usize),
            indirect in proptest::collection::vec(arb_desc(), 0..8),
            head in 0u16..QSIZE + 2,
        ) {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
            let vq = MockSplitQueue::new(&m, QSIZE);
            let mut q: Queue = vq.create_queue().expect("queue");
            let desc_table = GuestAddress(q.desc_table());
            for (i, d) in table.iter().enumerate() {
                // Indirect descriptors point at the one indirect table.
                let addr = if d.flags & VRING_DESC_F_INDIRECT as u16 != 0 { INDIRECT_TABLE } else { 0x1000 * i as u64 };
                let raw = RawDescriptor::from(Descriptor::new(addr, d.len, d.flags, d.next));
                m.write_obj(raw, desc_table.unchecked_add(16 * i as u64)).expect("desc");
            }
            for (i, d) in indirect.iter().enumerate() {
                let raw = RawDescriptor::from(Descriptor::new(0x2000 * i as u64, d.len, d.flags, d.next));
                m.write_obj(raw, GuestAddress(INDIRECT_TABLE + 16 * i as u64)).expect("indirect desc");
            }
            // Publish `head` in the available ring and let virtio-queue walk it.
            let avail = GuestAddress(q.avail_ring());
            m.write_obj(head, avail.unchecked_add(4)).expect("avail ring");
            m.write_obj(1u16, avail.unchecked_add(2)).expect("avail idx");
            let chain = q.iter(&m).expect("iter").next().expect("one chain");
            let want: Vec<_> = chain.map(|d| key(&d)).collect();
            let got: Vec<_> = SplitChain::new(&m, desc_table, QSIZE, head).map(|d| key(&d)).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn chain_through_an_indirect_table_is_followed() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let n = VRING_DESC_F_NEXT as u16;
        let table = GuestAddress(0x1000);
        let put = |at: GuestAddress, i: u64, d: Descriptor| {
            m.write_obj(RawDescriptor::from(d), at.unchecked_add(16 * i))
                .expect("desc")
        };
        put(table, 3, Descriptor::new(0x10, 16, n, 5));
        put(
            table,
            5,
            Descriptor::new(INDIRECT_TABLE, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(
            GuestAddress(INDIRECT_TABLE),
            0,
            Descriptor::new(0x20, 512, n, 1),
        );
        put(
            GuestAddress(INDIRECT_TABLE),
            1,
            Descriptor::new(0x30, 1, VRING_DESC_F_WRITE as u16, 0),
        );
        let got: Vec<_> = SplitChain::new(&m, table, 8, 3).map(|d| key(&d)).collect();
        assert_eq!(
            got,
            vec![
                (0x10, 16, n, 5),
                (0x20, 512, n, 1),
                (0x30, 1, VRING_DESC_F_WRITE as u16, 0)
            ]
        );
        // A head beyond the table yields nothing.
        assert_eq!(SplitChain::new(&m, table, 8, 8).count(), 0);
    }
}
