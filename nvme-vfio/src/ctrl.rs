//! The NVMe controller behind VFIO: bring-up (reset, admin queue, enable),
//! admin commands (Identify, Set Features, I/O queue creation/deletion) and
//! shutdown (NVMe Base 2.0 §3.5.1 "Memory-based Controller Initialization",
//! §3.6 "Shutdown Processing").
//!
//! The admin queue sits behind a mutex: it is used at start, when a reactor
//! opens or closes its queue, for forwarded admin commands, and at shutdown,
//! never on the I/O path. Admin commands are polled with a deadline; CSTS
//! is checked while waiting so a fatal controller or a vanished device ends
//! the wait with an error.
//!
//! **Reset after a failure** (NVMe Base 2.0 §3.7.2 "Controller Level
//! Reset"). A controller that reports CSTS.CFS, drops CSTS.RDY while
//! enabled, or lets a command pass its deadline is reset by a thread of its
//! own, so no reactor ever waits for it: CC.EN = 0 and CSTS.RDY = 0 within
//! CAP.TO, a fresh admin queue, CC.EN = 1, Identify Controller and Set
//! Features Number of Queues again — up to [`RESET_ATTEMPTS`] attempts with
//! [`RESET_BACKOFF`] between them, at most [`RESET_BUDGET`] resets per
//! [`RESET_WINDOW`] (a controller that keeps failing is given up on, not
//! reset forever). The controller's [`Epoch`] (state and generation, one
//! atomic word) tells its I/O queues: while it is `Resetting` they fail
//! what they had outstanding and hold new requests; at the next generation
//! each queue re-creates its SQ/CQ pair, at its next submit or poll. A
//! device that has vanished (registers read all ones) is never reset: it
//! ends `Failed` at once, and so does a controller whose resets all fail.
//!
//! **Fault injection** for testing the reset where no controller can be
//! made to fail (QEMU's emulated NVMe has no way to raise CFS):
//! [`VfioOptions::inject_disable_after`] makes the driver itself clear CC.EN
//! on the live controller that long after it was opened. The controller then really
//! goes not-ready and drops its queues, and the driver finds out as it would
//! about any failure (CSTS.RDY = 0 at the next health check).

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError, Weak};
use std::time::{Duration, Instant};

use unvme_proto::admin::{self, cns, IdentifyController, IdentifyNamespace};
use unvme_proto::bringup::{self, BringUpError, BroughtUp, ControllerAccess};
use unvme_proto::nvm;
use unvme_proto::nvme::{Cqe, Sqe, CQE_SIZE, SQE_SIZE};
use unvme_proto::regs::{self, cc, csts, Cap};

use super::dma::{DmaRegion, PAGE, PRPS_PER_PAGE};
use super::ring::{CqRing, SqRing};
use super::sys::{probe_pci, Mmio, VfioDevice};
use super::{Error, VfioOptions};

/// Admin queue entries (both queues), bounded by CAP.MQES.
const ADMIN_ENTRIES: u32 = 32;
/// I/O queue entries, bounded by CAP.MQES.
pub(crate) const IO_ENTRIES: u32 = 256;
/// I/O queues asked for in Set Features Number of Queues.
const WANT_IO_QUEUES: u32 = 64;
/// Largest transfer this driver issues: what one PRP list page describes.
pub(crate) const DRIVER_MAX_TRANSFER: u32 = (PRPS_PER_PAGE * PAGE) as u32;
/// Floor of the command timeout (CAP.TO is meant for enable/disable, but it
/// is the controller's own statement of its worst case, so it also bounds
/// commands from below).
const MIN_CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// Reset attempts after one failure before the controller is given up on.
pub(crate) const RESET_ATTEMPTS: u32 = 3;
/// Pause before attempt 2, 3, … of a reset.
pub(crate) const RESET_BACKOFF: [Duration; 2] =
    [Duration::from_millis(250), Duration::from_millis(1000)];
/// Most resets in [`RESET_WINDOW`]; one more failure gives the controller up.
pub(crate) const RESET_BUDGET: usize = 5;
/// See [`RESET_BUDGET`].
pub(crate) const RESET_WINDOW: Duration = Duration::from_secs(60);

/// What the controller is doing, as its queues see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Enabled and serving its queues of the current generation.
    Ready,
    /// Failed and being reset: no queue of the current generation exists
    /// on the device any more (or soon will not).
    Resetting,
    /// Given up on (gone, or every reset failed); stays so.
    Failed,
}

/// The controller's state and generation (completed resets since it was
/// opened), read by queues with one atomic load per submit and poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Epoch {
    /// Completed resets.
    pub gen: u64,
    /// See [`State`].
    pub state: State,
}

impl Epoch {
    fn pack(self) -> u64 {
        let st = match self.state {
            State::Ready => 0,
            State::Resetting => 1,
            State::Failed => 2,
        };
        (self.gen << 2) | st
    }

    fn unpack(v: u64) -> Self {
        Epoch {
            gen: v >> 2,
            state: match v & 3 {
                0 => State::Ready,
                1 => State::Resetting,
                _ => State::Failed,
            },
        }
    }
}

/// Why a controller is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// CSTS.CFS (Controller Fatal Status).
    Cfs,
    /// CSTS.RDY went to 0 while the controller was enabled.
    NotReady,
    /// A command passed its deadline.
    Timeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failure::Cfs => "CFS",
            Failure::NotReady => "CSTS.RDY dropped",
            Failure::Timeout => "command timeout",
        })
    }
}

/// Runs up to `max` reset attempts (`attempt(1)`, `attempt(2)`, …) with
/// `backoff[i]` slept before attempt `i + 2` (the last entry repeats);
/// returns the attempt that succeeded or the last error. A device that is
/// gone is not retried.
pub(crate) fn run_attempts(
    max: u32,
    backoff: &[Duration],
    mut attempt: impl FnMut(u32) -> Result<(), Error>,
    mut sleep: impl FnMut(Duration),
) -> Result<u32, Error> {
    let mut last = Error::Failed;
    for i in 1..=max {
        if i > 1 {
            let k = (i as usize - 2).min(backoff.len().saturating_sub(1));
            if let Some(d) = backoff.get(k) {
                sleep(*d);
            }
        }
        match attempt(i) {
            Ok(()) => return Ok(i),
            Err(Error::Gone) => return Err(Error::Gone),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The resets of the last [`RESET_WINDOW`]: a controller that fails again
/// and again is given up on instead of being reset forever.
#[derive(Debug, Default)]
pub(crate) struct ResetBudget {
    recent: Vec<Instant>,
}

impl ResetBudget {
    /// Whether a reset may start at `now` (and counts it if so).
    pub fn allow(&mut self, now: Instant) -> bool {
        self.recent
            .retain(|t| now.saturating_duration_since(*t) < RESET_WINDOW);
        if self.recent.len() >= RESET_BUDGET {
            return false;
        }
        self.recent.push(now);
        true
    }
}

/// Reads the CQE at byte `off` of `region` if its phase tag says it is new.
pub(crate) fn read_cqe(region: &DmaRegion, off: usize, cq: &CqRing) -> Option<Cqe> {
    let dw3 = region.read_u32(off + 12);
    if !cq.is_new((dw3 >> 16) as u16) {
        return None;
    }
    // The phase tag is written last by the device: read the rest after it.
    fence(Ordering::Acquire);
    let dw2 = region.read_u32(off + 8);
    Some(Cqe {
        dw0: region.read_u32(off),
        dw1: region.read_u32(off + 4),
        sqhd: dw2 as u16,
        sqid: (dw2 >> 16) as u16,
        cid: dw3 as u16,
        status: (dw3 >> 16) as u16,
    })
}

/// Puts PRP1/PRP2 into an SQE's data pointer.
pub(crate) fn set_prps(sqe: &mut Sqe, prp1: u64, prp2: u64) {
    sqe.dptr[..8].copy_from_slice(&prp1.to_le_bytes());
    sqe.dptr[8..].copy_from_slice(&prp2.to_le_bytes());
}

struct AdminQueue {
    /// Page 0: ASQ, page 1: ACQ, page 2: data buffer.
    region: DmaRegion,
    sq: SqRing,
    cq: CqRing,
    next_cid: u16,
}

const ADMIN_SQ_OFF: usize = 0;
const ADMIN_CQ_OFF: usize = PAGE;
const ADMIN_DATA_OFF: usize = 2 * PAGE;

impl AdminQueue {
    /// Starts the rings over in zeroed memory (slot 0, phase 1), for a
    /// controller that is about to be given this queue.
    fn restart(&mut self, entries: u16) {
        self.region.zero(ADMIN_SQ_OFF, 2 * PAGE);
        self.sq = SqRing::new(entries);
        self.cq = CqRing::new(entries);
    }
}

/// The command timeout: CAP.TO, at least [`MIN_CMD_TIMEOUT`].
fn cmd_timeout(cap: &Cap) -> Duration {
    cap.ready_timeout().max(MIN_CMD_TIMEOUT)
}

/// CSTS checks while an admin command of bring-up or a reset runs: a
/// vanished device or a fatal status ends the wait (nothing else, as the
/// controller's state is the reset's own business then).
fn raw_health(bar: &Mmio) -> Result<(), Error> {
    let s = bar.read32(regs::CSTS);
    if regs::gone(s) {
        Err(Error::Gone)
    } else if s & csts::CFS != 0 {
        Err(Error::Fatal)
    } else {
        Ok(())
    }
}

/// Runs one admin command on `q` to completion. `data`, if given (at most
/// a page), receives the command's controller-to-host data (PRP1 = the
/// admin data page). Fails on a non-success status, on whatever `health`
/// (polled while waiting) reports, and after `timeout` with
/// [`Error::AdminTimeout`].
fn run_admin(
    bar: &Mmio,
    cap: &Cap,
    timeout: Duration,
    q: &mut AdminQueue,
    sqe: &mut Sqe,
    data: Option<&mut [u8]>,
    health: &mut dyn FnMut() -> Result<(), Error>,
) -> Result<Cqe, Error> {
    let cid = q.next_cid;
    q.next_cid = q.next_cid.wrapping_add(1);
    sqe.cid = cid;
    if data.is_some() {
        set_prps(sqe, q.region.iova(ADMIN_DATA_OFF), 0);
        q.region.zero(ADMIN_DATA_OFF, PAGE);
    }
    let slot = usize::from(q.sq.push());
    let mut entry = [0u8; SQE_SIZE];
    sqe.encode(&mut entry);
    q.region.write_slice(ADMIN_SQ_OFF + slot * SQE_SIZE, &entry);
    fence(Ordering::SeqCst);
    bar.ring(cap.sq_doorbell(0), u32::from(q.sq.tail()));
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        let off = ADMIN_CQ_OFF + usize::from(q.cq.head()) * CQE_SIZE;
        if let Some(cqe) = read_cqe(&q.region, off, &q.cq) {
            q.cq.advance();
            bar.ring(cap.cq_doorbell(0), u32::from(q.cq.head()));
            if cqe.cid != cid {
                tracing::warn!(cid = cqe.cid, want = cid, "stray admin completion");
                continue;
            }
            let status = cqe.status();
            if !status.is_success() {
                return Err(Error::AdminStatus {
                    opc: sqe.opc,
                    sct: status.sct,
                    sc: status.sc,
                    dnr: status.dnr,
                });
            }
            if let Some(d) = data {
                let n = d.len().min(PAGE);
                q.region.read_slice(ADMIN_DATA_OFF, &mut d[..n]);
            }
            return Ok(cqe);
        }
        spins += 1;
        if spins < 1000 {
            std::hint::spin_loop();
            continue;
        }
        std::thread::sleep(Duration::from_micros(100));
        health()?;
        if Instant::now() > deadline {
            return Err(Error::AdminTimeout {
                opc: sqe.opc,
                ms: timeout.as_millis() as u64,
            });
        }
    }
}

/// The PCIe side of [`unvme_proto::bringup`]: registers in BAR0, admin
/// commands on the admin queue in DMA memory.
struct Pcie<'a> {
    dev: &'a VfioDevice,
    q: &'a mut AdminQueue,
    /// Known once CAP is read ([`ControllerAccess::before_enable`]).
    cap: Cap,
    timeout: Duration,
}

impl<'a> Pcie<'a> {
    fn new(dev: &'a VfioDevice, q: &'a mut AdminQueue, cap: Cap) -> Self {
        Pcie {
            dev,
            q,
            cap,
            timeout: cmd_timeout(&cap),
        }
    }
}

impl ControllerAccess for Pcie<'_> {
    type Error = Error;

    fn read32(&mut self, off: u32) -> Result<u32, Error> {
        Ok(self.dev.bar0.read32(off))
    }

    fn read64(&mut self, off: u32) -> Result<u64, Error> {
        Ok(self.dev.bar0.read64(off))
    }

    fn write32(&mut self, off: u32, value: u32) -> Result<(), Error> {
        self.dev.bar0.write32(off, value);
        Ok(())
    }

    fn admin(&mut self, mut sqe: Sqe, data: Option<&mut [u8]>) -> Result<Cqe, Error> {
        let bar = &self.dev.bar0;
        run_admin(
            bar,
            &self.cap,
            self.timeout,
            self.q,
            &mut sqe,
            data,
            &mut || raw_health(bar),
        )
    }

    fn wait(&mut self, d: Duration) {
        std::thread::sleep(d);
    }

    /// Checks what this driver needs (NVM command set, 4 KiB pages),
    /// disables the controller and gives it a fresh admin queue.
    fn before_enable(&mut self, cap: &Cap) -> Result<(), Error> {
        if !cap.css_nvm() {
            return Err(Error::Unsupported(
                "controller does not support the NVM command set".into(),
            ));
        }
        if cap.mpsmin != 0 {
            return Err(Error::Unsupported(format!(
                "controller's smallest memory page is {} KiB; this driver uses 4 KiB",
                4u32 << cap.mpsmin
            )));
        }
        self.cap = *cap;
        self.timeout = cmd_timeout(cap);
        bringup::disable(self, cap)?;
        let entries = ADMIN_ENTRIES.min(cap.max_queue_entries()) as u16;
        self.q.restart(entries);
        let bar = &self.dev.bar0;
        bar.write32(regs::AQA, regs::aqa_value(entries, entries));
        bar.write64(regs::ASQ, self.q.region.iova(ADMIN_SQ_OFF));
        bar.write64(regs::ACQ, self.q.region.iova(ADMIN_CQ_OFF));
        Ok(())
    }
}

impl From<BringUpError> for Error {
    fn from(e: BringUpError) -> Self {
        match e {
            BringUpError::Gone => Error::Gone,
            BringUpError::Fatal => Error::Fatal,
            BringUpError::Timeout { step, ms, csts } => Error::ReadyTimeout { step, ms, csts },
            BringUpError::Decode { source } => Error::Decode {
                what: "Identify Controller",
                source,
            },
        }
    }
}

/// Brings the controller behind `dev` up with the admin queue `q`:
/// disable, admin queue, enable, Identify Controller, Number of Queues.
fn bring_up(dev: &VfioDevice, q: &mut AdminQueue) -> Result<BroughtUp, Error> {
    let mut pcie = Pcie::new(dev, q, Cap::default());
    bringup::bring_up(&mut pcie, |_| WANT_IO_QUEUES)
}

/// One NVMe controller driven through VFIO.
pub(crate) struct Controller {
    /// The PCI address.
    pub addr: String,
    /// Decoded CAP.
    pub cap: Cap,
    /// CAP as read at open.
    pub cap_raw: u64,
    /// The settings it was opened with.
    pub opts: VfioOptions,
    /// VS register.
    pub vs: u32,
    /// Identify Controller data.
    pub id: IdentifyController,
    /// Largest transfer: MDTS, capped at [`DRIVER_MAX_TRANSFER`].
    pub max_transfer: u32,
    /// Entries of each I/O queue.
    pub io_entries: u16,
    /// Command timeout.
    pub cmd_timeout: Duration,
    /// The packed [`Epoch`].
    epoch: AtomicU64,
    /// Resets of the last minute.
    budget: Mutex<ResetBudget>,
    /// This controller's own `Arc` (set by whoever wraps it), for the reset
    /// thread to hold.
    me: OnceLock<Weak<Controller>>,
    /// I/O queue IDs in use (index qid - 1).
    qids: Mutex<Vec<bool>>,
    // Dropped before `dev`: the admin queue's DMA memory is unmapped while
    // the container still has its group.
    admin: Mutex<AdminQueue>,
    /// The VFIO device (BAR0, container).
    pub dev: VfioDevice,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.addr)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Opens `addr` and brings the controller up: reset, admin queue,
    /// enable, Identify Controller, Set Features Number of Queues.
    pub fn open(addr: &str, opts: &VfioOptions) -> Result<Self, Error> {
        let pci = probe_pci(addr)?;
        let dev = VfioDevice::open(&pci)?;
        dev.enable_bus_master()?;
        let mut q = AdminQueue {
            region: DmaRegion::new(&dev.container, 3 * PAGE)?,
            sq: SqRing::new(2),
            cq: CqRing::new(2),
            next_cid: 0,
        };
        let up = bring_up(&dev, &mut q)?;
        let cap = up.cap;
        tracing::info!(
            addr,
            vs = format_args!("{:#x}", up.vs),
            mqes = cap.max_queue_entries(),
            dstrd = cap.dstrd,
            to = cap.to,
            "NVMe controller enabled"
        );
        let max_transfer = match up.id.max_transfer(cap.mpsmin) {
            0 => DRIVER_MAX_TRANSFER,
            m => m.min(DRIVER_MAX_TRANSFER),
        };
        let queues = up.io_queues as usize;
        tracing::info!(
            addr,
            mn = %up.id.mn.trim(),
            sn = %up.id.sn.trim(),
            mdts = up.id.mdts,
            max_transfer,
            io_queues = queues,
            "NVMe controller identified"
        );
        Ok(Controller {
            addr: addr.into(),
            cap,
            cap_raw: up.cap_raw,
            opts: opts.clone(),
            vs: up.vs,
            id: up.id,
            max_transfer,
            io_entries: IO_ENTRIES.min(cap.max_queue_entries()) as u16,
            cmd_timeout: cmd_timeout(&cap),
            epoch: AtomicU64::new(
                Epoch {
                    gen: 0,
                    state: State::Ready,
                }
                .pack(),
            ),
            budget: Mutex::new(ResetBudget::default()),
            me: OnceLock::new(),
            qids: Mutex::new(vec![false; queues]),
            admin: Mutex::new(q),
            dev,
        })
    }

    /// Gives the controller its own `Arc`, so a failure can start a reset
    /// thread that keeps it alive; arms the fault injection if asked for.
    pub fn adopt(me: &Arc<Controller>) {
        let _ = me.me.set(Arc::downgrade(me));
        arm_fault_injection(me);
    }

    /// The current state and generation.
    pub fn epoch(&self) -> Epoch {
        Epoch::unpack(self.epoch.load(Ordering::Acquire))
    }

    fn set_epoch(&self, e: Epoch) {
        self.epoch.store(e.pack(), Ordering::Release);
    }

    /// Whether the controller cannot be used now: failed for good, or being
    /// reset. Either way memory it was given may still be written by it.
    pub fn failed(&self) -> bool {
        self.epoch().state != State::Ready
    }

    /// The error for a controller that is not [`State::Ready`].
    fn state_error(&self) -> Result<(), Error> {
        match self.epoch().state {
            State::Ready => Ok(()),
            State::Resetting => Err(Error::Resetting),
            State::Failed => Err(Error::Failed),
        }
    }

    /// Checks CSTS: a fatal status or a controller that dropped RDY starts
    /// a reset, a vanished device fails the controller for good; either is
    /// returned as an error, as is a controller already resetting or failed.
    pub fn check_status(&self) -> Result<(), Error> {
        self.state_error()?;
        let s = self.dev.bar0.read32(regs::CSTS);
        if regs::gone(s) {
            self.give_up(&Error::Gone);
            Err(Error::Gone)
        } else if s & csts::CFS != 0 {
            self.request_reset(Failure::Cfs);
            Err(Error::Fatal)
        } else if s & csts::RDY == 0 {
            self.request_reset(Failure::NotReady);
            Err(Error::NotReady)
        } else {
            Ok(())
        }
    }

    /// Fails the controller for good.
    fn give_up(&self, why: &Error) {
        let e = self.epoch();
        if e.state != State::Failed {
            self.set_epoch(Epoch {
                state: State::Failed,
                ..e
            });
            tracing::error!(addr = %self.addr, "vfio {}: {why}; the backend stays failed", self.addr);
        }
    }

    /// Starts a reset on a thread of its own, unless one is running or the
    /// controller is failed. Returns at once.
    pub fn request_reset(&self, why: Failure) {
        let cur = self.epoch();
        if cur.state != State::Ready {
            return;
        }
        let resetting = Epoch {
            state: State::Resetting,
            ..cur
        };
        if self
            .epoch
            .compare_exchange(
                cur.pack(),
                resetting.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return; // someone else saw it first
        }
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            // Not adopted yet (bring-up) or going away: nothing to reset for.
            self.give_up(&Error::Device(format!("controller failed ({why})")));
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("vfio-reset".into())
            .spawn(move || me.recover(why, resetting.gen));
        if let Err(e) = spawned {
            self.give_up(&Error::Device(format!(
                "controller failed ({why}) and no reset thread could be started: {e}"
            )));
        }
    }

    /// The reset thread: bounded attempts, then `Ready` at the next
    /// generation or `Failed`.
    fn recover(&self, why: Failure, gen: u64) {
        let addr = &self.addr;
        let allowed = self
            .budget
            .lock()
            .map(|mut b| b.allow(Instant::now()))
            .unwrap_or(false);
        if !allowed {
            return self.give_up(&Error::Device(format!(
                "controller failed ({why}) after {RESET_BUDGET} resets within {} s; giving up",
                RESET_WINDOW.as_secs()
            )));
        }
        let start = Instant::now();
        let outcome = run_attempts(
            RESET_ATTEMPTS,
            &RESET_BACKOFF,
            |attempt| {
                tracing::warn!(addr = %addr, "vfio {addr}: controller failed ({why}) — resetting (attempt {attempt}/{RESET_ATTEMPTS})");
                let r = self.reset_once();
                if let Err(e) = &r {
                    tracing::warn!(addr = %addr, "vfio {addr}: reset attempt {attempt}/{RESET_ATTEMPTS} failed: {e}");
                }
                r
            },
            std::thread::sleep,
        );
        match outcome {
            Ok(attempt) => {
                self.set_epoch(Epoch {
                    gen: gen + 1,
                    state: State::Ready,
                });
                tracing::warn!(
                    addr = %addr,
                    generation = gen + 1,
                    ms = start.elapsed().as_millis() as u64,
                    "vfio {addr}: reset complete (attempt {attempt}/{RESET_ATTEMPTS}); I/O queues re-create their SQ/CQ pairs"
                );
            }
            Err(e) => self.give_up(&Error::Device(format!(
                "giving up after {RESET_ATTEMPTS} reset attempts (last: {e})"
            ))),
        }
    }

    /// One controller reset and re-initialisation, holding the admin queue:
    /// the whole bring-up again (disable, a fresh admin queue in the same
    /// memory, enable, Identify Controller, Number of Queues).
    fn reset_once(&self) -> Result<(), Error> {
        let mut guard = self
            .admin
            .lock()
            .map_err(|_| Error::Device("admin queue mutex poisoned".into()))?;
        if self.dev.bar0.read64(regs::CAP) == u64::MAX {
            return Err(Error::Gone);
        }
        self.dev.enable_bus_master()?;
        let up = bring_up(&self.dev, &mut guard)?;
        if up.id.sn != self.id.sn || up.id.mn != self.id.mn {
            tracing::warn!(addr = %self.addr, sn = %up.id.sn.trim(), mn = %up.id.mn.trim(), "vfio {}: the controller identifies differently after the reset", self.addr);
        }
        let granted = up.io_queues as usize;
        let had = self.qids.lock().map(|q| q.len()).unwrap_or(0);
        if granted < had {
            tracing::warn!(addr = %self.addr, granted, had, "vfio {}: fewer I/O queues after the reset; queues above {granted} stay failed", self.addr);
        }
        Ok(())
    }

    /// Runs one admin command to completion. `data`, if given, is a 4 KiB
    /// buffer the command reads from the controller (PRP1 = the admin data
    /// page). Fails on a non-success status, on CSTS.CFS, on a device that
    /// is gone and after the command timeout (which starts a reset); fails
    /// at once, without waiting, while the controller is being reset.
    pub fn admin(&self, sqe: &mut Sqe, data: Option<&mut [u8; PAGE]>) -> Result<Cqe, Error> {
        let mut guard = loop {
            self.state_error()?;
            match self.admin.try_lock() {
                Ok(g) => break g,
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_micros(50)),
                Err(TryLockError::Poisoned(_)) => {
                    return Err(Error::Device("admin queue mutex poisoned".into()))
                }
            }
        };
        self.check_status()?;
        let r = run_admin(
            &self.dev.bar0,
            &self.cap,
            self.cmd_timeout,
            &mut guard,
            sqe,
            data.map(|d| &mut d[..]),
            &mut || self.check_status(),
        );
        if let Err(Error::AdminTimeout { .. }) = r {
            self.request_reset(Failure::Timeout);
        }
        r
    }

    /// Clears CC.EN on the live controller, for the fault injection.
    fn inject_disable(&self) {
        // Not in the middle of an admin command or a reset.
        let Ok(_q) = self.admin.lock() else { return };
        if self.epoch().state != State::Ready {
            return;
        }
        let bar = &self.dev.bar0;
        let v = bar.read32(regs::CC);
        tracing::warn!(addr = %self.addr, "vfio {}: fault injection: clearing CC.EN on the live controller", self.addr);
        bar.write32(regs::CC, v & !cc::EN);
    }

    /// Identify with CNS `cns` for `nsid` into `data`.
    pub fn identify(&self, cns: u8, nsid: u32, data: &mut [u8; PAGE]) -> Result<(), Error> {
        let mut sqe = unvme_proto::nvm::identify(cns, nsid, 0);
        self.admin(&mut sqe, Some(data)).map(|_| ())
    }

    /// The active namespace IDs (Identify CNS 02h; 1..=NN if the controller
    /// predates that list).
    pub fn active_namespaces(&self) -> Result<Vec<u32>, Error> {
        let mut data = [0u8; PAGE];
        match self.identify(cns::ACTIVE_NS_LIST, 0, &mut data) {
            Ok(()) => Ok(admin::decode_ns_list(&data)),
            Err(Error::AdminStatus { .. }) => Ok((1..=self.id.nn.min(1024)).collect()),
            Err(e) => Err(e),
        }
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, Error> {
        let mut data = [0u8; PAGE];
        self.identify(cns::NS, nsid, &mut data)?;
        IdentifyNamespace::decode(&data)
            .map_err(|e| Error::Device(format!("Identify Namespace {nsid}: {e}")))
    }

    /// Reserves a free I/O queue ID.
    pub fn alloc_qid(&self) -> Result<u16, Error> {
        let mut q = self
            .qids
            .lock()
            .map_err(|_| Error::Device("queue ID mutex poisoned".into()))?;
        let i = q.iter().position(|u| !u).ok_or(Error::NoQueue {
            max: q.len() as u32,
        })?;
        q[i] = true;
        Ok(i as u16 + 1)
    }

    /// Releases an I/O queue ID.
    pub fn free_qid(&self, qid: u16) {
        if let Ok(mut q) = self.qids.lock() {
            if let Some(u) = q.get_mut(usize::from(qid) - 1) {
                *u = false;
            }
        }
    }

    /// Creates I/O CQ `qid` (physically contiguous for the device, no
    /// interrupts) at `cq_iova` and I/O SQ `qid` on it at `sq_iova`.
    pub fn create_io_queues(&self, qid: u16, cq_iova: u64, sq_iova: u64) -> Result<(), Error> {
        let mut cq = nvm::create_io_cq(qid, self.io_entries);
        set_prps(&mut cq, cq_iova, 0);
        self.admin(&mut cq, None)?;
        let mut sq = nvm::create_io_sq(qid, self.io_entries, qid);
        set_prps(&mut sq, sq_iova, 0);
        if let Err(e) = self.admin(&mut sq, None) {
            let _ = self.admin(&mut nvm::delete_io_queue(false, qid), None);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes I/O SQ then CQ `qid`.
    pub fn delete_io_queues(&self, qid: u16) -> Result<(), Error> {
        self.admin(&mut nvm::delete_io_queue(true, qid), None)?;
        self.admin(&mut nvm::delete_io_queue(false, qid), None)
            .map(|_| ())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if regs::gone(self.dev.bar0.read32(regs::CSTS)) {
            tracing::warn!(addr = %self.addr, "NVMe device gone; releasing it");
            return;
        }
        // Normal shutdown so a real SSD flushes its cache, then disable.
        let q = self.admin.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut pcie = Pcie::new(&self.dev, q, self.cap);
        let cc_now = self.dev.bar0.read32(regs::CC);
        if let Err(e) = bringup::shutdown(&mut pcie, cc_now, self.cap.ready_timeout()) {
            tracing::warn!(addr = %self.addr, "NVMe shutdown: {e}");
        }
        if let Err(e) = bringup::disable(&mut pcie, &self.cap) {
            tracing::warn!(addr = %self.addr, "NVMe disable: {e}");
        }
        tracing::info!(addr = %self.addr, "NVMe controller shut down and released");
    }
}

/// If the options ask for it ([`VfioOptions::inject_disable_after`]), has
/// a thread clear CC.EN on `ctrl` that long from now (once). The thread
/// holds only a weak reference: it never keeps the controller open.
fn arm_fault_injection(ctrl: &Arc<Controller>) {
    let Some(after) = ctrl.opts.inject_disable_after else {
        return;
    };
    let ms = after.as_millis() as u64;
    tracing::warn!(addr = %ctrl.addr, "vfio {}: fault injection armed: CC.EN will be cleared in {ms} ms", ctrl.addr);
    let weak = Arc::downgrade(ctrl);
    let spawned = std::thread::Builder::new()
        .name("vfio-inject".into())
        .spawn(move || {
            std::thread::sleep(after);
            if let Some(c) = weak.upgrade() {
                c.inject_disable();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("fault injection: cannot start the injection thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_packs_state_and_generation_into_one_word() {
        for gen in [0u64, 1, 7, (1 << 61) - 1] {
            for state in [State::Ready, State::Resetting, State::Failed] {
                let e = Epoch { gen, state };
                assert_eq!(Epoch::unpack(e.pack()), e);
            }
        }
        let ready = Epoch {
            gen: 3,
            state: State::Ready,
        };
        let resetting = Epoch {
            state: State::Resetting,
            ..ready
        };
        assert_ne!(ready.pack(), resetting.pack());
    }

    #[test]
    fn a_reset_that_succeeds_on_a_later_attempt_backs_off_between_attempts() {
        let mut slept = Vec::new();
        let mut tried = Vec::new();
        let r = run_attempts(
            RESET_ATTEMPTS,
            &RESET_BACKOFF,
            |i| {
                tried.push(i);
                if i < 3 {
                    Err(Error::ReadyTimeout {
                        step: bringup::Step::Disable,
                        ms: 500,
                        csts: 1,
                    })
                } else {
                    Ok(())
                }
            },
            |d| slept.push(d),
        );
        assert_eq!(r.unwrap(), 3);
        assert_eq!(tried, [1, 2, 3]);
        assert_eq!(slept, RESET_BACKOFF);
    }

    #[test]
    fn resets_are_bounded_and_a_vanished_device_is_not_retried() {
        let mut n = 0;
        let r = run_attempts(
            RESET_ATTEMPTS,
            &RESET_BACKOFF,
            |_| {
                n += 1;
                Err(Error::Fatal)
            },
            |_| {},
        );
        assert!(matches!(r, Err(Error::Fatal)));
        assert_eq!(n, RESET_ATTEMPTS);

        let mut n = 0;
        let r = run_attempts(
            RESET_ATTEMPTS,
            &RESET_BACKOFF,
            |_| {
                n += 1;
                Err(Error::Gone)
            },
            |_| {},
        );
        assert!(matches!(r, Err(Error::Gone)));
        assert_eq!(n, 1, "a device that is gone is not reset again");

        let r = run_attempts(
            RESET_ATTEMPTS,
            &RESET_BACKOFF,
            |_| Ok(()),
            |_| panic!("no backoff before the first attempt"),
        );
        assert_eq!(r.unwrap(), 1);
    }

    #[test]
    fn a_controller_that_keeps_failing_runs_out_of_resets() {
        let mut b = ResetBudget::default();
        let t0 = Instant::now();
        for i in 0..RESET_BUDGET {
            assert!(b.allow(t0 + Duration::from_secs(i as u64)), "reset {i}");
        }
        assert!(
            !b.allow(t0 + Duration::from_secs(10)),
            "one too many within the window"
        );
        // Once the window has passed, resets are allowed again.
        assert!(b.allow(t0 + RESET_WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn failures_are_named_as_the_log_says() {
        assert_eq!(Failure::Cfs.to_string(), "CFS");
        assert_eq!(Failure::NotReady.to_string(), "CSTS.RDY dropped");
        assert_eq!(Failure::Timeout.to_string(), "command timeout");
    }
}
