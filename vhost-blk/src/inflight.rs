//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: the shared region in which the
//! device records which requests it has taken from each split virtqueue and
//! not yet returned, so that a restarted device can resubmit them (QEMU
//! `docs/interop/vhost-user.rst`, "Inflight I/O tracking").
//!
//! The device creates the region (GET_INFLIGHT_FD: a zeroed memfd), the
//! frontend keeps it and hands it to every later device instance
//! (SET_INFLIGHT_FD), also after the device process died. Layout: one
//! [`queue_region_size`]-byte region per virtqueue, each a `QueueRegionSplit`
//! header followed by one `DescStateSplit` per descriptor index:
//!
//! ```text
//! QueueRegionSplit { features: u64, version: u16, desc_num: u16,
//!                    last_batch_head: u16, used_idx: u16, desc: [DescStateSplit] }
//! DescStateSplit   { inflight: u8, padding: [u8; 5], next: u16, counter: u64 }
//! ```
//!
//! Per request the queue worker calls [`QueueInflight::mark`] when it pops
//! the chain, [`QueueInflight::begin_used`] before it puts the chain on the
//! used ring and [`QueueInflight::end_used`] after. When a ring starts,
//! [`QueueInflight::recover`] repairs a batch the old process was cut off in
//! and lists the heads still in flight, oldest first.
//!
//! Every access is a bounds- and alignment-checked atomic load or store
//! through `vm-memory` (the frontend maps the same pages); nothing here
//! trusts the region's contents: a header that does not fit the queue, an
//! entry beyond the ring or a broken batch list is logged and ignored.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// The only region version defined; 0 means "not yet initialised".
pub const INFLIGHT_VERSION: u16 = 1;

/// Queue regions start on this alignment (as in libvhost-user and DPDK, so
/// a region from either has the same layout).
const QUEUE_ALIGN: u64 = 64;
/// `QueueRegionSplit` header: features, version, desc_num,
/// last_batch_head, used_idx.
const HDR_LEN: u64 = 16;
const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
/// One `DescStateSplit`: inflight, 5 bytes padding, next, counter.
const DESC_LEN: u64 = 16;
const DESC_OFF_INFLIGHT: u64 = 0;
const DESC_OFF_NEXT: u64 = 6;
const DESC_OFF_COUNTER: u64 = 8;
/// Mapping offsets must be page aligned for mmap.
const PAGE: u64 = 4096;

/// Why an inflight region cannot be created or used.
#[derive(thiserror::Error, Debug)]
pub enum InflightError {
    /// More queues, or larger queues, than the device offers (or zero).
    #[error(
        "{num_queues} queues of {queue_size} descriptors requested; \
         the device has 1..={max_queues} queues of 1..={max_queue_size}"
    )]
    Geometry {
        /// Queues requested.
        num_queues: u16,
        /// Queue size requested.
        queue_size: u16,
        /// Queues the device has.
        max_queues: u16,
        /// Largest queue size the device accepts.
        max_queue_size: u16,
    },
    /// `mmap_size` is not what this many queues of this size take.
    #[error("region of {got} bytes, but {num_queues} queues of {queue_size} take {want}")]
    Size {
        /// Size given.
        got: u64,
        /// Size the layout needs.
        want: u64,
        /// Queues.
        num_queues: u16,
        /// Queue size.
        queue_size: u16,
    },
    /// `mmap_offset` cannot be mapped.
    #[error("offset {0:#x} is not page aligned")]
    Offset(u64),
    /// The file ends before the region does (touching it would SIGBUS).
    #[error("file of {file} bytes cannot hold {size} bytes at offset {offset}")]
    FileTooSmall {
        /// File size.
        file: u64,
        /// Region offset.
        offset: u64,
        /// Region size.
        size: u64,
    },
    /// A queue header that belongs to another layout.
    #[error(
        "queue {queue}: header has version {version} and {desc_num} descriptors \
         (version {INFLIGHT_VERSION} or 0 with {queue_size} expected)"
    )]
    Header {
        /// Queue index.
        queue: u16,
        /// Version found.
        version: u16,
        /// Descriptor count found.
        desc_num: u16,
        /// Descriptor count expected.
        queue_size: u16,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Bytes one queue's region takes: header plus `queue_size` descriptor
/// states, rounded up to 64.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HDR_LEN + DESC_LEN * u64::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes the whole region takes.
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size)
}

/// One mapped inflight region (all queues).
#[derive(Debug)]
pub struct InflightRegion {
    map: GuestRegionMmap<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of
    /// `queue_size`, mapped here; returns it and the file to hand the
    /// frontend. The memfd is sealed against resizing, so no one can make
    /// the mapping fault.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<(Arc<Self>, File), InflightError> {
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let size = region_size(num_queues, queue_size);
        let file = sealed_memfd(size)?;
        let send = file.try_clone().map_err(|e| InflightError::Os {
            what: "duplicating the inflight memfd",
            source: e,
        })?;
        let region = Self::mmap(file, 0, size, num_queues, queue_size)?;
        Ok((Arc::new(region), send))
    }

    /// SET_INFLIGHT_FD: maps a region the frontend hands back, after
    /// checking that it has exactly this device's layout for the queues
    /// and queue size it names, that the file really holds it, and that
    /// each queue header is either uninitialised or ours.
    pub fn open(
        file: File,
        msg: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<Arc<Self>, InflightError> {
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let want = region_size(num_queues, queue_size);
        if msg.mmap_size != want {
            return Err(InflightError::Size {
                got: msg.mmap_size,
                want,
                num_queues,
                queue_size,
            });
        }
        if !msg.mmap_offset.is_multiple_of(PAGE) {
            return Err(InflightError::Offset(msg.mmap_offset));
        }
        let meta = file.metadata().map_err(|e| InflightError::Os {
            what: "fstat of the inflight file",
            source: e,
        })?;
        let end = msg.mmap_offset.checked_add(want);
        if end.is_none_or(|end| meta.len() < end) {
            return Err(InflightError::FileTooSmall {
                file: meta.len(),
                offset: msg.mmap_offset,
                size: want,
            });
        }
        let region = Arc::new(Self::mmap(
            file,
            msg.mmap_offset,
            want,
            num_queues,
            queue_size,
        )?);
        for q in 0..num_queues {
            let Some(qi) = region.queue(usize::from(q)) else {
                continue;
            };
            let (version, desc_num) = (qi.version(), qi.header_desc_num());
            let ok = match version {
                0 => true,
                INFLIGHT_VERSION => desc_num == queue_size,
                _ => false,
            };
            if !ok {
                return Err(InflightError::Header {
                    queue: q,
                    version,
                    desc_num,
                    queue_size,
                });
            }
        }
        Ok(region)
    }

    fn mmap(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let os = |e: io::Error| InflightError::Os {
            what: "mapping the inflight region",
            source: e,
        };
        let len = usize::try_from(size).map_err(|_| os(io::ErrorKind::InvalidInput.into()))?;
        let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| os(io::Error::other(e)))?;
        let map = GuestRegionMmap::new(mapping, GuestAddress(0))
            .ok_or_else(|| os(io::ErrorKind::InvalidInput.into()))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Queues the region covers.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptor states per queue.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The message that describes this region (offset 0 of its file).
    pub fn message(&self) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: region_size(self.num_queues, self.queue_size),
            mmap_offset: 0,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// Queue `idx`'s part of the region, if the region covers it.
    pub fn queue(self: &Arc<Self>, idx: usize) -> Option<QueueInflight> {
        let i = u16::try_from(idx).ok().filter(|&i| i < self.num_queues)?;
        Some(QueueInflight {
            region: self.clone(),
            base: u64::from(i) * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
        })
    }
}

fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues || queue_size == 0 || queue_size > max_queue_size
    {
        return Err(InflightError::Geometry {
            num_queues,
            queue_size,
            max_queues,
            max_queue_size,
        });
    }
    Ok(())
}

/// A zero-filled memfd of `size` bytes whose size can no longer change.
fn sealed_memfd(size: u64) -> Result<File, InflightError> {
    let os = |what| move |e| InflightError::Os { what, source: e };
    // SAFETY: the name is a NUL-terminated static string and the flags are valid memfd_create flags; the call has no other preconditions.
    let fd = unsafe {
        libc::memfd_create(
            c"unvme-vhost-blk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(os("sizing the inflight memfd"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with an int argument.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    } < 0
    {
        return Err(os("sealing the inflight memfd")(io::Error::last_os_error()));
    }
    Ok(file)
}

/// What [`QueueInflight::recover`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The queue region held state of an earlier device instance (version
    /// 1); false for an uninitialised one (now initialised) or one that had
    /// to be reset.
    pub recovered: bool,
    /// Heads still in flight, oldest (lowest counter) first.
    pub heads: Vec<u16>,
    /// Counter value for the next request taken.
    pub next_counter: u64,
    /// Entries of an interrupted used-ring batch found already used and
    /// cleared.
    pub batch_cleared: u16,
    /// In-flight entries that cannot be resubmitted (beyond the ring,
    /// invalid flag value), cleared.
    pub ignored: usize,
}

/// One queue's part of an [`InflightRegion`].
#[derive(Clone, Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: u64,
    desc_num: u16,
}

impl QueueInflight {
    fn load<T: vm_memory::AtomicAccess + Default>(&self, off: u64, order: Ordering) -> T {
        self.region
            .map
            .load(MemoryRegionAddress(self.base + off), order)
            .unwrap_or_default()
    }

    fn store<T: vm_memory::AtomicAccess>(&self, off: u64, val: T, order: Ordering) {
        // Offsets are computed from checked indexes; a failure would mean a
        // layout bug, and then the store is dropped rather than panicking.
        if let Err(e) = self
            .region
            .map
            .store(val, MemoryRegionAddress(self.base + off), order)
        {
            tracing::debug!(offset = self.base + off, error = %e, "inflight region store");
        }
    }

    fn desc_off(i: u16, field: u64) -> u64 {
        HDR_LEN + DESC_LEN * u64::from(i) + field
    }

    /// Descriptor states in this queue's region.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// The header's `version`.
    pub fn version(&self) -> u16 {
        self.load(OFF_VERSION, Ordering::Acquire)
    }

    /// The header's `desc_num`.
    pub fn header_desc_num(&self) -> u16 {
        self.load(OFF_DESC_NUM, Ordering::Acquire)
    }

    /// The header's `used_idx`: the used ring's index after the last
    /// completed batch.
    pub fn used_idx(&self) -> u16 {
        self.load(OFF_USED_IDX, Ordering::Acquire)
    }

    /// The header's `last_batch_head`.
    pub fn last_batch_head(&self) -> u16 {
        self.load(OFF_LAST_BATCH_HEAD, Ordering::Acquire)
    }

    /// `desc[i].inflight` (0 for `i` beyond the region).
    pub fn inflight(&self, i: u16) -> u8 {
        if i >= self.desc_num {
            return 0;
        }
        self.load(Self::desc_off(i, DESC_OFF_INFLIGHT), Ordering::Acquire)
    }

    /// `desc[i].counter`.
    pub fn counter(&self, i: u16) -> u64 {
        if i >= self.desc_num {
            return 0;
        }
        self.load(Self::desc_off(i, DESC_OFF_COUNTER), Ordering::Acquire)
    }

    /// `desc[i].next`.
    pub fn next(&self, i: u16) -> u16 {
        if i >= self.desc_num {
            return u16::MAX;
        }
        self.load(Self::desc_off(i, DESC_OFF_NEXT), Ordering::Acquire)
    }

    /// Sets `desc[i].inflight` (tests and recovery).
    pub fn set_inflight(&self, i: u16, v: u8) {
        if i < self.desc_num {
            self.store(Self::desc_off(i, DESC_OFF_INFLIGHT), v, Ordering::Release);
        }
    }

    /// A chain with head `head` was taken from the available ring: record
    /// it with its fetch order.
    pub fn mark(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        self.store(
            Self::desc_off(head, DESC_OFF_COUNTER),
            counter,
            Ordering::Relaxed,
        );
        self.store(
            Self::desc_off(head, DESC_OFF_INFLIGHT),
            1u8,
            Ordering::Release,
        );
    }

    /// About to put `head` on the used ring (a batch of one): link it into
    /// the last-batch list.
    pub fn begin_used(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let last = self.last_batch_head();
        self.store(Self::desc_off(head, DESC_OFF_NEXT), last, Ordering::Relaxed);
        self.store(OFF_LAST_BATCH_HEAD, head, Ordering::Release);
    }

    /// `head` is on the used ring and the ring's index is now `used_idx`.
    pub fn end_used(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.store(
                Self::desc_off(head, DESC_OFF_INFLIGHT),
                0u8,
                Ordering::Release,
            );
        }
        self.store(OFF_USED_IDX, used_idx, Ordering::Release);
    }

    fn reset(&self, ring_used: u16) {
        self.store(OFF_DESC_NUM, self.desc_num, Ordering::Relaxed);
        self.store(OFF_LAST_BATCH_HEAD, 0u16, Ordering::Relaxed);
        self.store(OFF_USED_IDX, ring_used, Ordering::Relaxed);
        for i in 0..self.desc_num {
            self.set_inflight(i, 0);
        }
        self.store(OFF_VERSION, INFLIGHT_VERSION, Ordering::Release);
    }

    /// The ring of `ring_size` entries starts with the used ring at
    /// `ring_used`: repair an interrupted batch, then list what is still in
    /// flight (spec: "When reconnecting"). Afterwards the header's
    /// `used_idx` matches the ring.
    pub fn recover(&self, queue: usize, ring_used: u16, ring_size: u16) -> Recovery {
        let mut r = Recovery::default();
        let (version, desc_num) = (self.version(), self.header_desc_num());
        if version != INFLIGHT_VERSION || desc_num != self.desc_num {
            if version != 0 {
                tracing::warn!(
                    queue,
                    version,
                    desc_num,
                    "inflight region header changed; resetting it, nothing resubmitted"
                );
            }
            self.reset(ring_used);
            return r;
        }
        r.recovered = true;

        // An interrupted batch: its entries reached the used ring (the ring
        // index moved past used_idx) but their inflight flags were not yet
        // cleared.
        let used = self.used_idx();
        if used != ring_used {
            let batch = ring_used.wrapping_sub(used);
            if batch > ring_size {
                tracing::warn!(
                    queue,
                    region_used_idx = used,
                    ring_used_idx = ring_used,
                    "inflight region and used ring disagree by more than the ring size; \
                     not repairing the last batch"
                );
            } else {
                let mut i = self.last_batch_head();
                for _ in 0..batch {
                    if i >= self.desc_num {
                        tracing::warn!(
                            queue,
                            index = i,
                            "last-batch list of the inflight region leaves the queue"
                        );
                        break;
                    }
                    self.set_inflight(i, 0);
                    r.batch_cleared += 1;
                    i = self.next(i);
                }
            }
            self.store(OFF_USED_IDX, ring_used, Ordering::Release);
        }

        let mut found: Vec<(u64, u16)> = Vec::new();
        for i in 0..self.desc_num {
            match self.inflight(i) {
                0 => {}
                1 if i < ring_size => found.push((self.counter(i), i)),
                v => {
                    tracing::warn!(
                        queue,
                        index = i,
                        flag = v,
                        ring_size,
                        "in-flight entry beyond the ring or with a bad flag; ignored"
                    );
                    self.set_inflight(i, 0);
                    r.ignored += 1;
                }
            }
        }
        found.sort_unstable();
        r.next_counter = found.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        r.heads = found.into_iter().map(|(_, i)| i).collect();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn open_again(region: &InflightRegion, file: &File) -> Arc<InflightRegion> {
        InflightRegion::open(
            file.try_clone().expect("dup"),
            &region.message(),
            region.num_queues(),
            region.queue_size(),
        )
        .expect("reopen")
    }

    #[test]
    fn layout_matches_libvhost_user_and_dpdk() {
        // header 16 + 16 per descriptor, rounded up to 64
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(region_size(2, 128), 4224);
    }

    #[test]
    fn created_region_is_zeroed_sealed_and_shared_with_a_second_mapping() {
        let (r, file) = InflightRegion::create(2, 128, 4, 1024).expect("create");
        assert_eq!(file.metadata().expect("meta").len(), region_size(2, 128));
        // Sealed: the frontend (or anyone) cannot shrink it under us.
        assert!(file.set_len(10).is_err());
        let q1 = r.queue(1).expect("queue 1");
        assert!(r.queue(2).is_none());
        assert_eq!(q1.version(), 0);
        assert!((0..128).all(|i| q1.inflight(i) == 0));
        q1.mark(5, 42);
        let again = open_again(&r, &file);
        let q1b = again.queue(1).expect("queue 1");
        assert_eq!((q1b.inflight(5), q1b.counter(5)), (1, 42));
        assert_eq!(again.queue(0).expect("queue 0").inflight(5), 0);
    }

    #[test]
    fn a_fresh_region_is_initialised_and_nothing_is_resubmitted() {
        let (r, _f) = InflightRegion::create(1, 8, 1, 8).expect("create");
        let q = r.queue(0).expect("queue");
        let rec = q.recover(0, 7, 8);
        assert!(!rec.recovered);
        assert!(rec.heads.is_empty());
        assert_eq!((q.version(), q.header_desc_num(), q.used_idx()), (1, 8, 7));
    }

    #[test]
    fn in_flight_heads_come_back_in_fetch_order() {
        let (r, _f) = InflightRegion::create(1, 16, 1, 16).expect("create");
        let q = r.queue(0).expect("queue");
        q.recover(0, 0, 16);
        // Taken in the order 9, 3, 12, 0; 3 and 0 completed.
        for (n, h) in [9u16, 3, 12, 0].into_iter().enumerate() {
            q.mark(h, 100 + n as u64);
        }
        for (used, h) in [(1u16, 3u16), (2, 0)] {
            q.begin_used(h);
            q.end_used(h, used);
        }
        let rec = q.recover(0, 2, 16);
        assert!(rec.recovered);
        assert_eq!(rec.heads, vec![9, 12]);
        assert_eq!(rec.next_counter, 103);
        assert_eq!(rec.batch_cleared, 0);
    }

    #[test]
    fn a_batch_that_reached_the_used_ring_is_not_resubmitted() {
        let (r, _f) = InflightRegion::create(1, 16, 1, 16).expect("create");
        let q = r.queue(0).expect("queue");
        q.recover(0, 5, 16);
        q.mark(4, 1);
        q.mark(6, 2);
        // Died after putting 6 on the used ring (5 -> 6), before clearing.
        q.begin_used(6);
        let rec = q.recover(0, 6, 16);
        assert_eq!(rec.heads, vec![4]);
        assert_eq!(rec.batch_cleared, 1);
        assert_eq!(q.used_idx(), 6);
        assert_eq!(q.inflight(6), 0);
        // Died before the used ring moved: 6 is still in flight.
        q.mark(6, 3);
        q.begin_used(6);
        let rec = q.recover(0, 6, 16);
        assert_eq!(rec.heads, vec![4, 6]);
        assert_eq!(rec.batch_cleared, 0);
    }

    #[test]
    fn entries_beyond_the_ring_bad_flags_and_broken_batch_lists_are_ignored() {
        let (r, _f) = InflightRegion::create(1, 16, 1, 16).expect("create");
        let q = r.queue(0).expect("queue");
        q.recover(0, 0, 16);
        q.mark(2, 1);
        q.mark(12, 2); // beyond a ring of 8
        q.set_inflight(3, 7); // not a valid flag
        let rec = q.recover(0, 0, 8);
        assert_eq!(rec.heads, vec![2]);
        assert_eq!(rec.ignored, 2);
        assert_eq!((q.inflight(12), q.inflight(3)), (0, 0));
        // A batch list pointing outside the queue, and a used index far off.
        q.store(OFF_LAST_BATCH_HEAD, 999u16, Ordering::Relaxed);
        let rec = q.recover(0, 1, 16);
        assert_eq!((rec.heads.clone(), rec.batch_cleared), (vec![2], 0));
        let rec = q.recover(0, 40_000, 16);
        assert_eq!(rec.heads, vec![2]);
        assert_eq!(q.used_idx(), 40_000);
    }

    #[test]
    fn a_header_of_another_layout_is_reset() {
        let (r, _f) = InflightRegion::create(1, 16, 1, 16).expect("create");
        let q = r.queue(0).expect("queue");
        q.recover(0, 0, 16);
        q.mark(2, 1);
        q.store(OFF_DESC_NUM, 32u16, Ordering::Relaxed);
        let rec = q.recover(0, 0, 16);
        assert!(!rec.recovered);
        assert!(rec.heads.is_empty());
        assert_eq!(q.inflight(2), 0);
        assert_eq!(q.header_desc_num(), 16);
    }

    #[test]
    fn open_rejects_wrong_sizes_offsets_geometry_short_files_and_foreign_headers() {
        let (r, file) = InflightRegion::create(2, 64, 2, 256).expect("create");
        let good = r.message();
        let open = |m: &VhostUserInflight, f: &File| {
            InflightRegion::open(f.try_clone().expect("dup"), m, 2, 256)
        };
        assert!(open(&good, &file).is_ok());
        for bad in [
            VhostUserInflight {
                mmap_size: good.mmap_size - 64,
                ..good
            },
            VhostUserInflight {
                mmap_size: good.mmap_size + 4096,
                ..good
            },
            VhostUserInflight {
                queue_size: 128,
                ..good
            },
            VhostUserInflight {
                num_queues: 3,
                mmap_size: region_size(3, 64),
                ..good
            },
            VhostUserInflight {
                queue_size: 512,
                mmap_size: region_size(2, 512),
                ..good
            },
            VhostUserInflight {
                mmap_offset: 100,
                ..good
            },
            VhostUserInflight {
                mmap_offset: 4096,
                ..good
            },
            VhostUserInflight {
                mmap_offset: !4095,
                ..good
            },
        ] {
            assert!(
                open(&bad, &file).is_err(),
                "accepted size {} offset {} queues {} size {}",
                bad.mmap_size,
                bad.mmap_offset,
                bad.num_queues,
                bad.queue_size
            );
        }
        // A foreign header: version 2.
        let path = std::env::temp_dir().join(format!("unvme-inflight-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("file");
        std::fs::remove_file(&path).expect("unlink");
        f.set_len(good.mmap_size).expect("size");
        f.seek(SeekFrom::Start(queue_region_size(64) + OFF_VERSION))
            .expect("seek");
        f.write_all(&2u16.to_le_bytes()).expect("write");
        let err = open(&good, &f).expect_err("version 2");
        assert!(
            matches!(err, InflightError::Header { queue: 1, .. }),
            "{err}"
        );
        // Version 1 with another descriptor count.
        f.seek(SeekFrom::Start(queue_region_size(64) + OFF_VERSION))
            .expect("seek");
        f.write_all(&1u16.to_le_bytes()).expect("write");
        f.write_all(&63u16.to_le_bytes()).expect("write");
        assert!(open(&good, &f).is_err());
        f.seek(SeekFrom::Start(queue_region_size(64) + OFF_DESC_NUM))
            .expect("seek");
        f.write_all(&64u16.to_le_bytes()).expect("write");
        assert!(open(&good, &f).is_ok());
    }
}
