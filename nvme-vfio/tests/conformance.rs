//! The bdev conformance kit (`unvme_bdev::conformance`) run on the VFIO
//! NVMe driver: a [`VfioBdev`] on a real PCIe NVMe controller bound to
//! vfio-pci, held to the contract the local backends and the remote
//! namespace keep. Run twice, one controller open after the other: with the
//! DMA buffer pool on, every data buffer of the kit's requests goes through
//! the queue's [`BdevQueue::alloc_buf`] ([`ThroughPool`]), so the device
//! reads and writes pool memory itself (zero-copy: PRPs built from the
//! buffer's IOVAs); with the pool off
//! ([`VfioOptions::dma_pool_size`] 0) every request is copied through the
//! queue's own DMA pages. The driver's own per-queue counts (its info
//! events) must show exactly that path taken, and it must log no warning.
//!
//! Each run: [`conformance::check_all`] with what the device says of itself
//! (Compare from Identify Controller ONCS; Write Zeroes and Deallocate as
//! the bdev derives them from ONCS and DLFEAT, checked against Identify
//! here), the queue depth the driver builds its queues with, and the
//! random-operations model test twice: on 48 blocks, and on a region of a
//! little over two MDTS, so requests are split into several NVMe commands.
//!
//! It needs a device, so it is a `harness = false` test: `main` opens
//! the controller named by `UNVME_VFIO_CONFORMANCE_BDF` (e.g.
//! `0000:00:04.0`), which `qemu-scripts/scenarios/vfio-nvme.sh` sets inside
//! its q35 guest (QEMU's emulated NVMe, bound to vfio-pci). Without it,
//! it prints one line saying it was skipped (no device) and exits 0: it
//! checked nothing and says so. libtest would run the two settings in
//! parallel threads, which cannot work here: a VFIO group opens once per
//! process and the pool setting applies only when the controller is
//! opened, so the runs go one after the other, the controller shut down and
//! released in between (which is checked too). `UNVME_VFIO_CONFORMANCE_CASES`
//! sets the model test's cases (default 16; the large region gets a
//! quarter, at least one). Any failure panics: exit status 101.
//!
//! This is not a fault test (the scenario's controller-reset step is) and
//! not a benchmark.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use unvme_bdev::conformance::{self, Expect};
use unvme_bdev::{
    Bdev, BdevInfo, BdevQueue, Extent, IoBuf, IoCompletion, IoError, IoOp, IoRequest, SubmitError,
};
use unvme_nvme_vfio::{identify_device, VfioBdev, VfioOptions, DEFAULT_DMA_POOL_SIZE};
use unvme_proto::admin::oncs;

/// The PCI address of the controller under test.
const BDF_VAR: &str = "UNVME_VFIO_CONFORMANCE_BDF";
/// Cases of the random-operations model test.
const CASES_VAR: &str = "UNVME_VFIO_CONFORMANCE_CASES";

fn main() -> ExitCode {
    let Some(addr) = std::env::var(BDF_VAR).ok().filter(|a| !a.is_empty()) else {
        println!(
            "vfio conformance: SKIPPED: no device ({BDF_VAR} unset; it names an NVMe \
             controller bound to vfio-pci; qemu-scripts/tests/vfio-nvme.sh runs this in a guest)"
        );
        return ExitCode::SUCCESS;
    };
    let cases = match std::env::var(CASES_VAR) {
        Ok(v) => v
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("{CASES_VAR}={v:?} is not a number")),
        Err(_) => 16,
    };
    let seen = Arc::new(Seen::default());
    tracing_subscriber::registry()
        .with(Watch(seen.clone()).with_filter(LevelFilter::INFO))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(LevelFilter::INFO),
        )
        .init();
    let t0 = Instant::now();
    conforms(&addr, PoolMode::On, cases, &seen);
    conforms(&addr, PoolMode::Off, cases, &seen);
    println!(
        "vfio conformance: PASS: {addr}: every conformance check, {cases} + {} model cases, \
         DMA pool on (zero-copy) and off (copied), in {:.1} s",
        large_cases(cases),
        t0.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// Cases of the model test on the large region (its requests are large).
fn large_cases(cases: u32) -> u32 {
    (cases / 4).max(1).min(cases)
}

/// The two data paths of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolMode {
    /// The default pool; the kit's buffers are replaced by pool buffers.
    On,
    /// `dma_pool_size` 0: `alloc_buf` has nothing, every request is copied.
    Off,
}

/// Opens `addr` with the pool as `mode` says, runs every check on it, and
/// closes it again (the controller must be released).
fn conforms(addr: &str, mode: PoolMode, cases: u32, seen: &Seen) {
    let t0 = Instant::now();
    let opts = VfioOptions {
        dma_pool_size: match mode {
            PoolMode::On => DEFAULT_DMA_POOL_SIZE,
            PoolMode::Off => 0,
        },
        inject_disable_after: None,
    };
    let before = seen.snapshot();
    let bdev = VfioBdev::open(addr, None, &format!("vfio:{addr}"), &opts)
        .unwrap_or_else(|e| panic!("cannot open {addr}: {e}"));
    let info = bdev.info().clone();
    let nsid = unvme_bdev::NvmeAdmin::nsid(&bdev);
    // Shares the controller the bdev opened (one per address).
    let id = identify_device(addr, Some(nsid)).unwrap_or_else(|e| panic!("identify {addr}: {e}"));
    let ns = &id.namespaces[0].1;
    let ctrl = &id.controller;
    assert_eq!(
        info.write_zeroes,
        ctrl.supports_write_zeroes(),
        "Write Zeroes as ONCS says"
    );
    assert_eq!(
        info.deallocate,
        ctrl.supports_dsm() && ns.dlfeat & 0x7 == 1,
        "Deallocate (reading back zeroes) as ONCS and DLFEAT say"
    );
    let depth = bdev.queue_depth();
    let mqes = (id.cap & 0xffff) as usize; // CAP.MQES: entries, 0's based
    assert!(
        (1..=mqes).contains(&depth),
        "queue depth {depth} with CAP.MQES {mqes}"
    );
    let compare = ctrl.oncs & oncs::COMPARE != 0;
    println!(
        "vfio conformance: {addr} nsid {nsid} ({} {}): {} blocks of {} B, max transfer {} B \
         (MDTS {} B), queue depth {depth}; compare {}, write-zeroes {}, deallocate {}; DMA pool {}",
        ctrl.mn.trim(),
        ctrl.sn.trim(),
        info.num_blocks,
        info.block_size,
        info.max_transfer,
        id.max_transfer,
        yes(compare),
        yes(info.write_zeroes),
        yes(info.deallocate),
        match mode {
            PoolMode::On => "on",
            PoolMode::Off => "off",
        }
    );
    let expect = Expect {
        stores_data: true,
        compare,
        // One buffer per request (max_segments 1); refusals checked below.
        segments: false,
        queue_depth: Some(depth),
        // NVMe's Get LBA Status is not used: no block status.
        block_status_granularity: None,
        model_cases: cases,
    };
    let dev = ThroughPool::new(bdev, mode == PoolMode::On);
    conformance::check_all(&dev, &expect);
    segments_are_refused(&dev);
    // A region of a little over two MDTS (an odd number of pages), within
    // the transfer limit: its reads and writes are split into commands.
    let mdts = match id.max_transfer {
        0 => 1 << 20,
        m => m.min(1 << 20),
    };
    let blocks = (u64::from(2 * mdts + 3 * 4096) / u64::from(info.block_size))
        .min(u64::from(info.max_transfer / info.block_size))
        .min(info.num_blocks);
    if cases > 0 {
        conformance::random_operations_match_a_model(&dev, blocks, large_cases(cases));
    }
    let (pooled, heap) = dev.counts();
    drop(dev);
    let after = seen.snapshot();
    let (zero_copy, copied, misses) = (
        after.zero_copy - before.zero_copy,
        after.copied - before.copied,
        after.pool_misses - before.pool_misses,
    );
    assert_eq!(
        after.released,
        before.released + 1,
        "the controller was not shut down and released when its last bdev and queue were dropped"
    );
    match mode {
        PoolMode::On => {
            assert!(
                pooled > 0 && zero_copy > 0,
                "pool on: {pooled} pool buffers, {zero_copy} requests zero-copy"
            );
            // Only buffers the pool does not serve (one above the transfer
            // limit, for the largest read) take the copy path; the pool
            // never ran dry.
            assert!(
                copied <= heap,
                "pool on: {copied} requests copied, but only {heap} buffers were not from the pool"
            );
            assert_eq!(misses, 0, "pool on: the pool ran dry {misses} times");
        }
        PoolMode::Off => {
            assert_eq!(pooled, 0, "pool off: alloc_buf handed out pool buffers");
            assert!(
                zero_copy == 0 && copied > 0,
                "pool off: {zero_copy} requests zero-copy, {copied} copied"
            );
        }
    }
    let warnings = seen.warnings.lock().expect("warnings lock").clone();
    assert!(
        warnings.is_empty(),
        "the driver logged warnings: {warnings:#?}"
    );
    println!(
        "vfio conformance: ok: DMA pool {:?}: every check passed ({} + {} model cases over 48 and \
         {blocks} blocks); requests {zero_copy} zero-copy, {copied} copied; controller released; \
         {:.1} s",
        mode,
        cases,
        large_cases(cases),
        t0.elapsed().as_secs_f64()
    );
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// With one segment per request ([`BdevQueue::max_segments`] 1), a request
/// with more segments fails with `BadBuffer`, hands its first buffer back,
/// and writes nothing.
fn segments_are_refused(dev: &dyn Bdev) {
    let bs = dev.info().block_size as usize;
    let mut q = dev.open_queue().expect("a queue");
    assert_eq!(q.max_segments(), 1);
    let before = conformance::read(&mut *q, 2, 2, bs);
    let write = IoRequest {
        tag: 1,
        op: IoOp::Write {
            lba: 2,
            nlb: 2,
            fua: false,
        },
        buf: Some(IoBuf::from_slice(&conformance::pattern(bs, 77))),
        more: vec![IoBuf::from_slice(&conformance::pattern(bs, 78))],
    };
    if q.submit(write).is_err() {
        panic!("an idle queue answered Busy");
    }
    let mut out = Vec::new();
    conformance::poll_until(&mut *q, &mut out, 1);
    let c = out.pop().expect("one completion");
    assert_eq!((c.tag, c.result), (1, Err(IoError::BadBuffer)));
    assert_eq!(c.buf.map(|b| b.len()), Some(bs), "first buffer handed back");
    assert_eq!(
        conformance::read(&mut *q, 2, 2, bs),
        before,
        "a refused write changed the data"
    );
}

/// A [`Bdev`] whose queues replace every data buffer of a request with a
/// buffer of the inner queue's [`BdevQueue::alloc_buf`] (when it gives
/// one), as the NVMe/TCP target does: the bytes are copied in at submit
/// and back at completion, so the caller sees its own buffer, and the
/// device works on pool memory. Without `pool`, requests pass unchanged.
struct ThroughPool {
    inner: VfioBdev,
    pool: bool,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Data buffers replaced by pool buffers.
    pooled: AtomicU64,
    /// Data buffers `alloc_buf` had no pool buffer for.
    heap: AtomicU64,
}

impl ThroughPool {
    fn new(inner: VfioBdev, pool: bool) -> Self {
        ThroughPool {
            inner,
            pool,
            counts: Arc::default(),
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.counts.pooled.load(Ordering::Relaxed),
            self.counts.heap.load(Ordering::Relaxed),
        )
    }
}

impl Bdev for ThroughPool {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        Ok(Box::new(PoolQueue {
            inner: self.inner.open_queue()?,
            pool: self.pool,
            callers: Vec::new(),
            counts: self.counts.clone(),
        }))
    }
}

struct PoolQueue {
    inner: Box<dyn BdevQueue>,
    pool: bool,
    /// The caller's buffers of requests in flight with a pool buffer, by tag.
    callers: Vec<(u64, IoBuf)>,
    counts: Arc<Counts>,
}

impl BdevQueue for PoolQueue {
    fn submit(&mut self, mut req: IoRequest) -> Result<(), SubmitError> {
        let mut caller = None;
        if let Some(buf) = req.buf.as_ref().filter(|b| self.pool && !b.is_empty()) {
            match self.inner.alloc_buf(buf.len()) {
                Some(mut p) => {
                    assert_eq!(p.len(), buf.len(), "alloc_buf({}) length", buf.len());
                    p.copy_from_slice(buf);
                    caller = req.buf.replace(p);
                }
                None => {
                    self.counts.heap.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let tag = req.tag;
        match self.inner.submit(req) {
            Ok(()) => {
                if let Some(b) = caller {
                    assert!(
                        self.callers.iter().all(|(t, _)| *t != tag),
                        "the kit reused tag {tag} while in flight"
                    );
                    self.counts.pooled.fetch_add(1, Ordering::Relaxed);
                    self.callers.push((tag, b));
                }
                Ok(())
            }
            Err(SubmitError::Busy(mut r)) => {
                if caller.is_some() {
                    r.buf = caller;
                }
                Err(SubmitError::Busy(r))
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let from = out.len();
        let n = self.inner.poll(out);
        for c in &mut out[from..] {
            let Some(at) = self.callers.iter().position(|(t, _)| *t == c.tag) else {
                continue;
            };
            let (_, mut mine) = self.callers.swap_remove(at);
            // Handed back only if the queue handed the pool buffer back.
            if let Some(p) = c.buf.take() {
                assert_eq!(p.len(), mine.len(), "the buffer came back resized");
                mine.copy_from_slice(&p);
                c.buf = Some(mine);
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }

    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.wait_fd()
    }

    fn max_segments(&self) -> usize {
        self.inner.max_segments()
    }

    fn alloc_buf(&mut self, len: usize) -> Option<IoBuf> {
        self.inner.alloc_buf(len)
    }

    fn block_status(&mut self, lba: u64, nlb: u32, out: &mut Vec<Extent>) -> bool {
        self.inner.block_status(lba, nlb, out)
    }
}

/// What the driver logged, as far as this test needs it.
#[derive(Default)]
struct Seen {
    /// Sums of the `zero_copy` and `copied` fields of the queues' closing
    /// events ("vfio queue N: X requests zero-copy, Y copied").
    zero_copy: AtomicU64,
    copied: AtomicU64,
    /// Sum of their `pool_misses` (alloc_buf calls the pool could not serve).
    pool_misses: AtomicU64,
    /// "NVMe controller shut down and released" events.
    released: AtomicU64,
    /// Every warning or error event.
    warnings: Mutex<Vec<String>>,
}

#[derive(Clone, Copy, Debug)]
struct Snapshot {
    zero_copy: u64,
    copied: u64,
    pool_misses: u64,
    released: u64,
}

impl Seen {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            zero_copy: self.zero_copy.load(Ordering::SeqCst),
            copied: self.copied.load(Ordering::SeqCst),
            pool_misses: self.pool_misses.load(Ordering::SeqCst),
            released: self.released.load(Ordering::SeqCst),
        }
    }
}

/// A tracing layer that fills a [`Seen`].
struct Watch(Arc<Seen>);

#[derive(Default)]
struct Fields {
    message: String,
    zero_copy: Option<u64>,
    copied: Option<u64>,
    pool_misses: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "zero_copy" => self.zero_copy = Some(value),
            "copied" => self.copied = Some(value),
            "pool_misses" => self.pool_misses = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for Watch {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if let (Some(z), Some(c)) = (f.zero_copy, f.copied) {
            self.0.zero_copy.fetch_add(z, Ordering::SeqCst);
            self.0.copied.fetch_add(c, Ordering::SeqCst);
            let m = f.pool_misses.unwrap_or(0);
            self.0.pool_misses.fetch_add(m, Ordering::SeqCst);
        }
        if f.message.contains("shut down and released") {
            self.0.released.fetch_add(1, Ordering::SeqCst);
        }
        if matches!(*event.metadata().level(), Level::WARN | Level::ERROR) {
            let mut w = self.0.warnings.lock().expect("warnings lock");
            w.push(format!("{}: {}", event.metadata().target(), f.message));
        }
    }
}
