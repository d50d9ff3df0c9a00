//! The device behind the vhost-user handler: [`BlkBackend`] holds the
//! features, the configuration space, guest memory and one [`Worker`] per
//! virtqueue, and runs a virtqueue on the calling thread
//! ([`BlkBackend::run_queue`]); [`crate::handler`] decides when.
//!
//! Threading: every virtqueue has its own thread. A kick wakes it, and it
//! then spins in [`BlkBackend::run_queue`]: popping chains, submitting them
//! and polling completions, until the queue is idle (nothing in flight) for
//! the spin budget; then it re-enables notifications and returns to sleep
//! on the kick eventfd. With `poll` it never sleeps while the ring runs.
//! Requests in flight keep the thread spinning, since a device queue has no
//! completion fd.
//!
//! Stop (GET_VRING_BASE): the handler marks the ring not ready and calls
//! [`BlkBackend::drain_queue`], which waits for the queue thread to leave
//! `run_queue` (the worker stops popping when it sees the ring not ready,
//! finishes what is in flight, and leaves) and finishes anything still
//! queued for resubmission. So the ring base handed back to QEMU covers
//! every request, and none is lost or completed after the stop.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unvme_bdev::{Bdev, BdevInfo};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::inflight::QueueInflight;
use crate::request::{Limits, MAX_DISCARD_SEG};
use crate::spec::{features as f, BlkConfig, CONFIG_WRITEBACK_OFFSET, ID_BYTES, SECTOR_SIZE};
use crate::worker::{GuestLender, RingStart, Worker};
use crate::{Error, Result};

/// Guest memory, replaced as a whole on every memory table update.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest IN/OUT request accepted when the backend sets no limit of its own.
pub const DEFAULT_MAX_REQUEST: u32 = 1 << 20;

/// `seg_max` when the transfer limit allows it; 128 - 2 fits QEMU's default
/// queue size of 128 with the header and status descriptors.
const SEG_MAX: u32 = 126;

/// Largest DISCARD / WRITE_ZEROES segment, in sectors (2 GiB).
const MAX_DWZ_SECTORS: u32 = 1 << 22;

/// How the device is exported.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Number of virtqueues (1..=64).
    pub num_queues: u16,
    /// Largest virtqueue size the frontend may configure.
    pub max_queue_size: u16,
    /// Offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Spin on the virtqueue without ever sleeping.
    pub poll: bool,
    /// Idle time a queue thread spins before sleeping on the kick eventfd.
    pub spin: Duration,
    /// GET_ID serial (truncated to 20 bytes); default: the device name.
    pub serial: Option<String>,
    /// Hand guest memory to the device queue as request data buffers when
    /// a request's segments allow (see the crate documentation); off: copy
    /// all.
    pub zero_copy: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            num_queues: 1,
            max_queue_size: 1024,
            read_only: false,
            poll: false,
            spin: Duration::from_micros(100),
            serial: None,
            zero_copy: true,
        }
    }
}

/// Everything the configuration space and the parser need, derived once
/// from the device and the options.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// Virtio feature bits offered.
    pub(crate) features: u64,
    /// Configuration space (with the initial `writeback`).
    pub(crate) config: BlkConfig,
    /// What the parser enforces.
    pub(crate) limits: Limits,
}

impl Geometry {
    /// The virtio feature bits offered to the frontend (virtio-blk's,
    /// the ring's and `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Derives the features, configuration and limits for `info`.
    pub(crate) fn new(info: &BdevInfo, opts: &DeviceOptions) -> Result<Self> {
        let bs = info.block_size;
        if !bs.is_power_of_two() || u64::from(bs) < SECTOR_SIZE {
            return Err(Error::Config(format!("block size {bs} is not supported")));
        }
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(Error::Config(format!(
                "{} queues (1..=64 supported)",
                opts.num_queues
            )));
        }
        // Largest request: the device's own limit, capped so a guest cannot
        // make us allocate without bound; whole blocks.
        let mut max_request = match info.max_transfer {
            0 => DEFAULT_MAX_REQUEST,
            m => m.min(DEFAULT_MAX_REQUEST),
        };
        max_request -= max_request % bs;
        if max_request < 4096.max(bs) {
            return Err(Error::Config(format!(
                "transfer limit {} is below one page",
                info.max_transfer
            )));
        }
        // Linux splits so that a request has at most seg_max segments of at
        // most size_max bytes: keep their product within max_request.
        let mut size_max = (max_request / SEG_MAX) & !4095;
        size_max = size_max.max(4096);
        let seg_max = (max_request / size_max).min(SEG_MAX);
        let bs_sectors = bs / SECTOR_SIZE as u32;
        let discard = info.deallocate && !opts.read_only;
        let write_zeroes = info.write_zeroes && !opts.read_only;
        let dwz_max = MAX_DWZ_SECTORS - MAX_DWZ_SECTORS % bs_sectors;

        let mut features = f::SIZE_MAX
            | f::SEG_MAX
            | f::BLK_SIZE
            | f::TOPOLOGY
            | f::FLUSH
            | f::CONFIG_WCE
            | f::MQ
            | f::VERSION_1
            | f::RING_INDIRECT_DESC
            | f::RING_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.read_only {
            features |= f::RO;
        }
        if discard {
            features |= f::DISCARD;
        }
        if write_zeroes {
            features |= f::WRITE_ZEROES;
        }
        let config = BlkConfig {
            capacity: info.size_bytes() / SECTOR_SIZE,
            size_max,
            seg_max,
            blk_size: bs,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: u8::from(info.volatile_write_cache),
            num_queues: opts.num_queues,
            max_discard_sectors: if discard { dwz_max } else { 0 },
            max_discard_seg: if discard { MAX_DISCARD_SEG } else { 0 },
            discard_sector_alignment: if discard { bs_sectors } else { 0 },
            max_write_zeroes_sectors: if write_zeroes { dwz_max } else { 0 },
            max_write_zeroes_seg: u32::from(write_zeroes),
            write_zeroes_may_unmap: u8::from(write_zeroes && info.deallocate),
        };
        let mut serial = [0u8; ID_BYTES];
        let name = opts.serial.as_deref().unwrap_or(&info.name);
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        let limits = Limits {
            block_size: bs,
            num_blocks: info.num_blocks,
            max_request,
            read_only: opts.read_only,
            discard,
            write_zeroes,
            write_zeroes_may_unmap: write_zeroes && info.deallocate,
            max_discard_sectors: config.max_discard_sectors,
            max_discard_seg: config.max_discard_seg,
            max_write_zeroes_sectors: config.max_write_zeroes_sectors,
            serial,
        };
        Ok(Geometry {
            features,
            config,
            limits,
        })
    }
}

/// A vhost-user-blk device over one bdev, for one frontend connection.
pub struct BlkBackend {
    geo: Geometry,
    opts: DeviceOptions,
    writeback: Arc<AtomicBool>,
    workers: Vec<Mutex<Worker>>,
    mem: GuestMem,
    /// Bumped on every memory update, so a spinning queue picks it up.
    mem_gen: AtomicU64,
    stop: AtomicBool,
}

impl BlkBackend {
    /// Opens one device queue per virtqueue (for a remote namespace, one
    /// NVMe/TCP queue pair each).
    pub fn new(bdev: &Arc<dyn Bdev>, opts: &DeviceOptions) -> Result<Self> {
        let geo = Geometry::new(bdev.info(), opts)?;
        let writeback = Arc::new(AtomicBool::new(geo.config.writeback != 0));
        let limits = Arc::new(geo.limits.clone());
        let workers = (0..opts.num_queues)
            .map(|i| {
                let q = bdev.open_queue().map_err(Error::Bdev)?;
                Ok(Mutex::new(
                    Worker::new(q, limits.clone(), writeback.clone(), opts.max_queue_size)
                        .with_index(usize::from(i)),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BlkBackend {
            geo,
            opts: opts.clone(),
            writeback,
            workers,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mem_gen: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Makes queue threads spinning in `--poll` mode return (the connection
    /// is over).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn config_bytes(&self) -> [u8; crate::spec::CONFIG_LEN] {
        let mut c = self.geo.config;
        c.writeback = u8::from(self.writeback.load(Ordering::Relaxed));
        c.encode()
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    /// Largest virtqueue size the frontend may configure.
    pub fn max_queue_size(&self) -> usize {
        usize::from(self.opts.max_queue_size)
    }

    /// Virtio features offered.
    pub fn features(&self) -> u64 {
        self.geo.features
    }

    /// vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    /// The guest memory the rings and requests live in; the handler
    /// replaces its contents and then calls [`BlkBackend::memory_changed`].
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The memory table changed: spinning queues take the new one.
    pub fn memory_changed(&self) {
        self.mem_gen.fetch_add(1, Ordering::Release);
    }

    /// `size` bytes of the configuration space at `offset` (zeroes past
    /// its end).
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(cfg.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(cfg.len());
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }

    /// A driver write to the configuration space: only `writeback` is
    /// writable (VIRTIO_BLK_F_CONFIG_WCE).
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            let wb = buf[0] != 0;
            tracing::info!(writeback = wb, "cache mode set by the driver");
            self.writeback.store(wb, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback field is writable",
        ))
    }

    fn worker(&self, qidx: usize) -> io::Result<Option<std::sync::MutexGuard<'_, Worker>>> {
        match self.workers.get(qidx) {
            Some(w) => w
                .lock()
                .map(Some)
                .map_err(|_| io::Error::other("worker lock poisoned")),
            None => Ok(None),
        }
    }

    /// Ring `qidx` is starting: attach its part of the inflight region and
    /// queue what it left in flight (see [`Worker::start_ring`]). Waits for
    /// the queue thread if it is still inside [`BlkBackend::run_queue`].
    pub fn start_queue(
        &self,
        qidx: usize,
        vring: &VringRwLock<GuestMem>,
        inflight: Option<QueueInflight>,
    ) -> io::Result<RingStart> {
        let Some(mut w) = self.worker(qidx)? else {
            return Ok(RingStart::default());
        };
        let mem = self.mem.memory();
        let mut st = vring.get_mut();
        Ok(w.start_ring(st.get_queue_mut(), &*mem, qidx, inflight))
    }

    /// Ring `qidx`, already marked not ready, is stopping: wait for its
    /// thread to leave [`BlkBackend::run_queue`], then finish whatever is
    /// still in flight or queued for resubmission.
    pub fn drain_queue(&self, qidx: usize, vring: &VringRwLock<GuestMem>) -> io::Result<()> {
        self.run_queue(qidx, vring)
    }

    /// Gives the worker the current memory table to lend data buffers
    /// from, unless it has generation `gen`'s already (or zero copy is off).
    fn lend(&self, w: &mut Worker, gen: u64) {
        if self.opts.zero_copy && w.lender_generation() != Some(gen) {
            w.set_lender(gen, Some(GuestLender::new(self.mem.memory().into_inner())));
        }
    }

    /// Serves one virtqueue until it is idle (or stopped, then drained).
    pub fn run_queue(&self, qidx: usize, vring: &VringRwLock<GuestMem>) -> io::Result<()> {
        let Some(mut w) = self.worker(qidx)? else {
            return Ok(());
        };
        let mut gen = self.mem_gen.load(Ordering::Acquire);
        let mut mem = self.mem.memory();
        self.lend(&mut w, gen);
        let mut idle_since: Option<Instant> = None;
        {
            let mut st = vring.get_mut();
            // Ignored: with EVENT_IDX this only stops moving avail_event.
            let _ = st.get_queue_mut().disable_notification(&*mem);
        }
        loop {
            let g = self.mem_gen.load(Ordering::Acquire);
            if g != gen {
                gen = g;
                mem = self.mem.memory();
                self.lend(&mut w, gen);
            }
            let mut st = vring.get_mut();
            let ready = st.get_queue().ready();
            let running = ready && st.is_enabled() && !self.stop.load(Ordering::Relaxed);
            let mut work = 0;
            if running {
                work += w.process_avail(st.get_queue_mut(), &*mem);
            } else if !ready && !self.stop.load(Ordering::Relaxed) {
                // Stopping (not the connection ending): requests taken
                // before are finished, so the ring base covers them.
                work += w.process_resubmit(st.get_queue_mut(), &*mem);
            }
            work += w.poll(st.get_queue_mut(), &*mem);
            if w.take_used() > 0 && st.get_queue_mut().needs_notification(&*mem).unwrap_or(true) {
                if let Err(e) = st.signal_used_queue() {
                    tracing::debug!(queue = qidx, error = %e, "call eventfd");
                }
            }
            if !running {
                let resubmit_left =
                    !ready && !self.stop.load(Ordering::Relaxed) && w.resubmit_pending() > 0;
                if w.outstanding() == 0 && !resubmit_left {
                    return Ok(());
                }
                drop(st);
                std::thread::yield_now();
                continue;
            }
            if work > 0 {
                idle_since = None;
                drop(st);
                continue;
            }
            drop(st);
            let now = Instant::now();
            let idle_for = now.duration_since(*idle_since.get_or_insert(now));
            if w.outstanding() > 0 || self.opts.poll {
                // Requests in flight (a device queue has no completion fd):
                // keep polling, but after the spin budget without progress
                // let other threads on this CPU run between polls (a remote
                // target may be sharing it).
                if !self.opts.poll && idle_for >= self.opts.spin {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            if idle_for < self.opts.spin {
                std::hint::spin_loop();
                continue;
            }
            let mut st = vring.get_mut();
            // Idle: ask for kicks again, then look once more so a chain
            // made available meanwhile is not left waiting for a kick.
            let q = st.get_queue_mut();
            match q.enable_notification(&*mem) {
                Ok(true) => {
                    let _ = q.disable_notification(&*mem);
                    idle_since = None;
                }
                Ok(false) => return Ok(()),
                Err(e) => {
                    tracing::warn!(queue = qidx, error = %e, "virtqueue unusable");
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unvme_bdev::RamBdev;

    fn info(bs: u32, max_transfer: u32) -> BdevInfo {
        BdevInfo {
            name: "x".into(),
            block_size: bs,
            num_blocks: 1 << 20,
            max_transfer,
            volatile_write_cache: true,
            deallocate: true,
            write_zeroes: true,
        }
    }

    #[test]
    fn segment_limits_never_allow_a_request_over_the_transfer_limit() {
        for mt in [0, 8192, 65536, 131072, 1 << 20, 4 << 20, 1_000_000] {
            for bs in [512, 4096] {
                let g = Geometry::new(&info(bs, mt), &DeviceOptions::default()).expect("geometry");
                let c = g.config;
                assert!(c.size_max >= 4096, "size_max {} for mt {mt}", c.size_max);
                assert!(c.seg_max >= 1 && c.seg_max <= SEG_MAX);
                assert!(
                    u64::from(c.size_max) * u64::from(c.seg_max) <= u64::from(g.limits.max_request),
                    "mt {mt} bs {bs}: {} x {} > {}",
                    c.seg_max,
                    c.size_max,
                    g.limits.max_request
                );
                assert_eq!(g.limits.max_request % bs, 0);
            }
        }
    }

    #[test]
    fn features_follow_the_device_and_options() {
        let g = Geometry::new(&info(4096, 0), &DeviceOptions::default()).expect("geometry");
        for bit in [
            f::SIZE_MAX,
            f::SEG_MAX,
            f::BLK_SIZE,
            f::TOPOLOGY,
            f::FLUSH,
            f::CONFIG_WCE,
            f::MQ,
            f::DISCARD,
            f::WRITE_ZEROES,
            f::VERSION_1,
            f::RING_INDIRECT_DESC,
            f::RING_EVENT_IDX,
        ] {
            assert_ne!(g.features & bit, 0, "bit {bit:#x} missing");
        }
        assert_eq!(g.features & f::RO, 0);
        assert_eq!(g.config.blk_size, 4096);
        assert_eq!(g.config.capacity, (1u64 << 20) * 8);
        assert_eq!(g.config.discard_sector_alignment, 8);
        assert_eq!(g.config.max_discard_sectors % 8, 0);
        let mut plain = info(512, 0);
        plain.deallocate = false;
        plain.write_zeroes = false;
        let g = Geometry::new(&plain, &DeviceOptions::default()).expect("geometry");
        assert_eq!(g.features & (f::DISCARD | f::WRITE_ZEROES), 0);
        assert!(Geometry::new(
            &plain,
            &DeviceOptions {
                num_queues: 0,
                ..DeviceOptions::default()
            }
        )
        .is_err());
    }

    #[test]
    fn config_reads_are_exactly_the_requested_size_and_writeback_is_writable() {
        let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("r", 2048, 512).expect("ram"));
        let opts = DeviceOptions {
            num_queues: 2,
            ..DeviceOptions::default()
        };
        let b = BlkBackend::new(&bdev, &opts).expect("backend");
        let cfg = b.get_config(0, 96);
        assert_eq!(cfg.len(), 96);
        assert_eq!(&cfg[0..8], &2048u64.to_le_bytes());
        assert_eq!(&cfg[34..36], &2u16.to_le_bytes());
        assert!(cfg[60..].iter().all(|&x| x == 0));
        assert_eq!(b.get_config(200, 8), vec![0u8; 8]);
        b.set_config(CONFIG_WRITEBACK_OFFSET as u32, &[1])
            .expect("wce");
        assert_eq!(b.get_config(CONFIG_WRITEBACK_OFFSET as u32, 1), vec![1]);
        b.set_config(CONFIG_WRITEBACK_OFFSET as u32, &[0])
            .expect("wce");
        assert_eq!(b.get_config(CONFIG_WRITEBACK_OFFSET as u32, 1), vec![0]);
        assert!(b.set_config(0, &[0; 8]).is_err());
        assert_eq!(b.num_queues(), 2);
    }
}
