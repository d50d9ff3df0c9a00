//! The vhost-user request handler: every frontend message QEMU's
//! vhost-user-blk sends, answered by this device (the `vhost` crate's
//! [`VhostUserBackendReqHandlerMut`], driven by its `BackendReqHandler` over
//! the connection; see [`crate::server`]).
//!
//! `vhost-user-backend` has a handler of its own, but it refuses
//! GET/SET_INFLIGHT_FD and cannot be wrapped, so this one replaces it; it
//! still uses that crate's `VringRwLock` for the ring state.
//!
//! Ring life cycle (vhost-user "Ring states"): a ring *starts* when its
//! kick eventfd arrives (SET_VRING_KICK, or SET_VRING_CALL after it) —
//! then this ring's part of the inflight region is attached and whatever
//! an earlier device instance left in flight is queued for resubmission —
//! and it is *processed* while started and enabled (SET_VRING_ENABLE, or
//! at once when `VHOST_USER_F_PROTOCOL_FEATURES` is not negotiated).
//! GET_VRING_BASE stops it: the queue thread drains, and the next available
//! index comes back to the frontend. RESET_DEVICE (and the deprecated
//! RESET_OWNER) stop every ring and forget features and the region.
//!
//! Threads: one per virtqueue, sleeping in epoll on its kick eventfd
//! (registered only while the ring is started and enabled) and on a wake
//! eventfd the handler writes when a ring becomes runnable, so chains made
//! available before that are not left waiting for a kick. The thread runs
//! [`BlkBackend::run_queue`].
//!
//! Requests this handler refuses (bad ring size, bad inflight region, …)
//! are logged and acknowledged with a failure (REPLY_ACK); the connection
//! goes on. A failure the frontend cannot be told about ends it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostUserError, GpuBackend, Result as VhostUserResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BlkBackend, GuestMem};
use crate::inflight::InflightRegion;
use crate::{Error, Result};

const TOKEN_WAKE: u64 = 0;
const TOKEN_KICK: u64 = 1;

/// What one queue thread sleeps on.
struct QueueCtl {
    epoll: Epoll,
    wake: EventFd,
    exit: AtomicBool,
}

struct QueueThread {
    ctl: Arc<QueueCtl>,
    /// The kick fd registered in `ctl.epoll`, if any.
    registered: Option<RawFd>,
    thread: Option<JoinHandle<()>>,
}

/// A user address range of the frontend and where it sits in guest memory
/// (to translate SET_VRING_ADDR's addresses).
#[derive(Debug, Clone, Copy)]
struct Mapping {
    user_addr: u64,
    size: u64,
    gpa: u64,
}

/// The vhost-user request handler for one frontend connection.
pub struct BlkHandler {
    backend: Arc<BlkBackend>,
    vrings: Vec<VringRwLock<GuestMem>>,
    queues: Vec<QueueThread>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    mappings: Vec<Mapping>,
    inflight: Option<Arc<InflightRegion>>,
    /// The last request failed in a way the frontend was told about (an
    /// acknowledged refusal); the connection can go on.
    refused: bool,
}

fn refuse_msg(msg: impl std::fmt::Display) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, msg.to_string()))
}

impl BlkHandler {
    /// A handler over `backend`, with one (sleeping) thread per virtqueue.
    pub fn new(backend: Arc<BlkBackend>) -> Result<Self> {
        let os = |what: &'static str| move |source| Error::Io { what, source };
        let mut vrings = Vec::new();
        let mut queues = Vec::new();
        for q in 0..backend.num_queues() {
            let max = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
            let vring = VringRwLock::new(backend.memory().clone(), max)
                .map_err(|source| Error::Virtqueue { queue: q, source })?;
            let ctl = Arc::new(QueueCtl {
                epoll: Epoll::new().map_err(os("epoll_create"))?,
                wake: EventFd::new(EFD_NONBLOCK).map_err(os("eventfd"))?,
                exit: AtomicBool::new(false),
            });
            ctl.epoll
                .ctl(
                    ControlOperation::Add,
                    ctl.wake.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_WAKE),
                )
                .map_err(os("epoll_ctl"))?;
            let (b, v, c) = (backend.clone(), vring.clone(), ctl.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vhost-blk-q{q}"))
                .spawn(move || queue_thread(&b, q, &v, &c))
                .map_err(os("spawning a queue thread"))?;
            vrings.push(vring);
            queues.push(QueueThread {
                ctl,
                registered: None,
                thread: Some(thread),
            });
        }
        Ok(BlkHandler {
            backend,
            vrings,
            queues,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            mappings: Vec::new(),
            inflight: None,
            refused: false,
        })
    }

    /// True (once) if the last failed request was refused with the
    /// frontend told so, rather than failing the connection.
    pub fn take_refused(&mut self) -> bool {
        std::mem::take(&mut self.refused)
    }

    /// The connection is over: queue threads stop taking requests, finish
    /// what is in flight, and exit.
    pub fn shutdown(&mut self) {
        self.backend.request_stop();
        for q in &self.queues {
            q.ctl.exit.store(true, Ordering::Release);
            let _ = q.ctl.wake.write(1);
        }
        for q in &mut self.queues {
            if let Some(t) = q.thread.take() {
                if t.join().is_err() {
                    tracing::error!("a queue thread panicked");
                }
            }
        }
    }

    fn refuse<T>(&mut self, what: &str, msg: impl std::fmt::Display) -> VhostUserResult<T> {
        tracing::warn!("refused {what}: {msg}");
        self.refused = true;
        Err(refuse_msg(format!("{what}: {msg}")))
    }

    fn vring(&self, index: u32) -> VhostUserResult<&VringRwLock<GuestMem>> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn check_index(&mut self, what: &str, index: u32) -> VhostUserResult<usize> {
        if (index as usize) < self.vrings.len() {
            Ok(index as usize)
        } else {
            self.refuse(what, format!("no virtqueue {index}"))
        }
    }

    fn vmm_va_to_gpa(&self, va: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.user_addr && va - m.user_addr < m.size)
            .map(|m| va - m.user_addr + m.gpa)
    }

    /// Registers the ring's kick eventfd with its thread while the ring is
    /// started and enabled (and wakes the thread, which then looks at the
    /// ring at once), unregisters it otherwise.
    fn update_registration(&mut self, idx: usize) -> VhostUserResult<()> {
        let (want, fd) = {
            let st = self.vrings[idx].get_ref();
            let fd = st.get_kick().as_ref().map(|k| k.as_raw_fd());
            (
                st.get_queue().ready() && st.is_enabled() && fd.is_some(),
                fd,
            )
        };
        let q = &mut self.queues[idx];
        if let Some(old) = q.registered {
            if !want || Some(old) != fd {
                let _ = q.ctl.epoll.ctl(
                    ControlOperation::Delete,
                    old,
                    EpollEvent::new(EventSet::IN, TOKEN_KICK),
                );
                q.registered = None;
            }
        }
        if let (true, None, Some(fd)) = (want, q.registered, fd) {
            q.ctl
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_KICK),
                )
                .map_err(VhostUserError::ReqHandlerError)?;
            q.registered = Some(fd);
            let _ = q.ctl.wake.write(1);
        }
        Ok(())
    }

    /// Drops the kick registration before the kick fd changes (a new fd may
    /// get the old one's number).
    fn unregister(&mut self, idx: usize) {
        let q = &mut self.queues[idx];
        if let Some(old) = q.registered.take() {
            let _ = q.ctl.epoll.ctl(
                ControlOperation::Delete,
                old,
                EpollEvent::new(EventSet::IN, TOKEN_KICK),
            );
        }
    }

    /// Starts ring `idx` if its kick is set and it is not started yet.
    fn maybe_start(&mut self, idx: usize) -> VhostUserResult<()> {
        let needs = {
            let st = self.vrings[idx].get_ref();
            !st.get_queue().ready() && st.get_kick().is_some()
        };
        if !needs {
            return Ok(());
        }
        let inflight = self.inflight.as_ref().and_then(|r| r.queue(idx));
        let tracked = inflight.is_some();
        let rs = self
            .backend
            .start_queue(idx, &self.vrings[idx], inflight)
            .map_err(VhostUserError::ReqHandlerError)?;
        if rs.resubmit > 0 {
            tracing::info!(
                "queue {idx}: resubmitting {} in-flight requests",
                rs.resubmit
            );
        }
        if rs.recovery.batch_cleared > 0 || rs.recovery.ignored > 0 {
            tracing::info!(
                queue = idx,
                completed_before_exit = rs.recovery.batch_cleared,
                ignored = rs.recovery.ignored,
                "inflight region repaired"
            );
        }
        if let Some(next) = rs.next_avail {
            tracing::info!(
                queue = idx,
                next_avail = next,
                "ring restarts after the requests the inflight region accounts for"
            );
        }
        if let (true, Some(why)) = (tracked, rs.untracked) {
            tracing::warn!(queue = idx, "in-flight requests not tracked: {why}");
        }
        self.vrings[idx].set_queue_ready(true);
        Ok(())
    }

    /// Stops ring `idx` (GET_VRING_BASE, reset): no more chains are taken,
    /// what was taken is finished. Returns the next available index.
    fn stop_ring(&mut self, idx: usize) -> VhostUserResult<u16> {
        let vring = self.vrings[idx].clone();
        vring.set_queue_ready(false);
        self.update_registration(idx)?;
        self.backend
            .drain_queue(idx, &vring)
            .map_err(VhostUserError::ReqHandlerError)?;
        Ok(vring.queue_next_avail())
    }

    fn reset_rings(&mut self) -> VhostUserResult<()> {
        for idx in 0..self.vrings.len() {
            self.stop_ring(idx)?;
            self.unregister(idx);
            let vring = &self.vrings[idx];
            vring.set_enabled(false);
            vring.set_kick(None);
            vring.set_call(None);
            vring.set_err(None);
            let mut st = vring.get_mut();
            st.get_queue_mut().reset();
        }
        self.acked_features = 0;
        self.inflight = None;
        Ok(())
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `file` is sealed against shrinking (F_SEAL_SHRINK): `None` if
/// it cannot be sealed at all (not a memfd).
fn shrink_sealed(file: &File) -> Option<bool> {
    // SAFETY: F_GET_SEALS only reads the seals of a valid, open descriptor.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    (seals >= 0).then_some(seals & libc::F_SEAL_SHRINK != 0)
}

/// Logs whether a frontend's file is protected from being shrunk under the
/// mapping: the size was checked when it was mapped, but an unsealed file
/// truncated later still faults (SIGBUS) on the next access.
fn log_seals(what: &str, gpa: u64, file: &File) {
    match shrink_sealed(file) {
        Some(true) => tracing::debug!(gpa, "{what}: memfd sealed against shrinking"),
        Some(false) => tracing::warn!(
            gpa,
            "{what}: memfd not sealed against shrinking (F_SEAL_SHRINK); a frontend that \
             truncates it can crash this process"
        ),
        None => tracing::info!(
            gpa,
            "{what}: not a memfd, cannot be sealed; whoever can truncate it can crash this \
             process (memory-backend-memfd seals by default)"
        ),
    }
}

/// One virtqueue's thread: sleep until kicked or woken, then serve the ring.
fn queue_thread(backend: &BlkBackend, qidx: usize, vring: &VringRwLock<GuestMem>, ctl: &QueueCtl) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match ctl.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(queue = qidx, error = %e, "epoll_wait");
                return;
            }
        };
        if ctl.exit.load(Ordering::Acquire) {
            return;
        }
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_WAKE => {
                    let _ = ctl.wake.read();
                }
                _ => {
                    let _ = vring.read_kick();
                }
            }
        }
        if let Err(e) = backend.run_queue(qidx, vring) {
            tracing::warn!(queue = qidx, error = %e, "queue");
        }
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return self.refuse("SET_OWNER", "already owned");
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        // Deprecated; the spec suggests treating it as "disable all rings".
        self.reset_rings()
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.reset_rings()
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return self.refuse(
                "SET_FEATURES",
                format_args!(
                    "{features:#x} has bits not offered ({:#x})",
                    self.backend.features()
                ),
            );
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled at once.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for idx in 0..self.vrings.len() {
                self.vrings[idx].set_enabled(true);
                self.update_registration(idx)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features & self.backend.protocol_features().bits();
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return self.refuse("SET_MEM_TABLE", "postcopy is not supported");
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            // Fields of a packed message: copied out.
            let (gpa, size, offset, user_addr) =
                (r.guest_phys_addr, r.memory_size, r.mmap_offset, r.user_addr);
            // A mapping past the end of a file faults (SIGBUS, the whole
            // process) on first touch: the file must hold the region.
            let meta = match file.metadata() {
                Ok(m) => m,
                Err(e) => return self.refuse("SET_MEM_TABLE", format_args!("fstat: {e}")),
            };
            let end = offset.checked_add(size);
            if meta.is_file() && end.is_none_or(|end| meta.len() < end) {
                return self.refuse(
                    "SET_MEM_TABLE",
                    format_args!(
                        "region at {gpa:#x}: file of {} bytes cannot hold {size} bytes at {offset}",
                        meta.len()
                    ),
                );
            }
            log_seals("guest memory", gpa, &file);
            let mmap = match r.mmap_region::<()>(file) {
                Ok(m) => m,
                Err(e) => return self.refuse("SET_MEM_TABLE", e),
            };
            let Some(region) = GuestRegionMmap::new(mmap, GuestAddress(gpa)) else {
                return self.refuse("SET_MEM_TABLE", "region wraps the address space");
            };
            regions.push(region);
            mappings.push(Mapping {
                user_addr,
                size,
                gpa,
            });
        }
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            match GuestMemoryMmap::from_regions(regions) {
                Ok(m) => m,
                Err(e) => return self.refuse("SET_MEM_TABLE", e),
            }
        };
        match self.backend.memory().lock() {
            Ok(g) => g.replace(mem),
            Err(_) => return Err(refuse_msg("guest memory lock poisoned")),
        }
        self.backend.memory_changed();
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_NUM", index)?;
        let max = self.backend.max_queue_size();
        if num == 0 || num as usize > max || !num.is_power_of_two() {
            return self.refuse(
                "SET_VRING_NUM",
                format_args!("queue {idx}: size {num} (a power of two up to {max})"),
            );
        }
        self.vrings[idx].set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_ADDR", index)?;
        let (Some(desc), Some(avail), Some(used)) = (
            self.vmm_va_to_gpa(descriptor),
            self.vmm_va_to_gpa(available),
            self.vmm_va_to_gpa(used),
        ) else {
            return self.refuse(
                "SET_VRING_ADDR",
                format_args!("queue {idx}: ring addresses outside the memory table"),
            );
        };
        let vring = self.vrings[idx].clone();
        if let Err(e) = vring.set_queue_info(desc, avail, used) {
            return self.refuse("SET_VRING_ADDR", format_args!("queue {idx}: {e}"));
        }
        // SET_VRING_BASE restores only the available index; the used index
        // is the ring's own (it is 0 after a driver reset).
        match vring.queue_used_idx() {
            Ok(u) => vring.set_queue_next_used(u),
            Err(e) => {
                return self.refuse(
                    "SET_VRING_ADDR",
                    format_args!("queue {idx}: used ring: {e}"),
                )
            }
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_BASE", index)?;
        self.vrings[idx].set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        // A failure here cannot be answered: the reply carries no status.
        self.vring(index)?;
        let idx = index as usize;
        let next = self.stop_ring(idx)?;
        self.unregister(idx);
        let vring = &self.vrings[idx];
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_KICK", u32::from(index))?;
        self.unregister(idx);
        self.vrings[idx].set_kick(fd);
        self.maybe_start(idx)?;
        self.update_registration(idx)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_CALL", u32::from(index))?;
        self.vrings[idx].set_call(fd);
        self.maybe_start(idx)?;
        self.update_registration(idx)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let idx = self.check_index("SET_VRING_ERR", u32::from(index))?;
        self.vrings[idx].set_err(fd);
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return self.refuse(
                "SET_VRING_ENABLE",
                "VHOST_USER_F_PROTOCOL_FEATURES not negotiated",
            );
        }
        let idx = self.check_index("SET_VRING_ENABLE", index)?;
        self.vrings[idx].set_enabled(enable);
        self.update_registration(idx)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        match self.backend.set_config(offset, buf) {
            Ok(()) => Ok(()),
            Err(e) => self.refuse("SET_CONFIG", e),
        }
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        self.refuse("GPU_SET_SOCKET", "not a GPU")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        // A failure cannot be answered (the reply must carry a file): it
        // ends the connection, and QEMU fails to start the device.
        let max_queues = u16::try_from(self.vrings.len()).unwrap_or(u16::MAX);
        let max_size = u16::try_from(self.backend.max_queue_size()).unwrap_or(u16::MAX);
        match InflightRegion::create(
            inflight.num_queues,
            inflight.queue_size,
            max_queues,
            max_size,
        ) {
            Ok((region, file)) => {
                let msg = region.message();
                tracing::info!(
                    queues = msg.num_queues,
                    queue_size = msg.queue_size,
                    bytes = msg.mmap_size,
                    "inflight region created"
                );
                self.inflight = Some(region);
                Ok((msg, file))
            }
            Err(e) => {
                tracing::warn!(error = %e, "GET_INFLIGHT_FD failed");
                // The region error stays the cause of the handler error.
                Err(VhostUserError::ReqHandlerError(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    e,
                )))
            }
        }
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let max_queues = u16::try_from(self.vrings.len()).unwrap_or(u16::MAX);
        let max_size = u16::try_from(self.backend.max_queue_size()).unwrap_or(u16::MAX);
        log_seals("inflight region", 0, &file);
        match InflightRegion::open(file, inflight, max_queues, max_size) {
            Ok(region) => {
                tracing::info!(
                    queues = inflight.num_queues,
                    queue_size = inflight.queue_size,
                    bytes = inflight.mmap_size,
                    "inflight region set"
                );
                self.inflight = Some(region);
                Ok(())
            }
            Err(e) => self.refuse("SET_INFLIGHT_FD", e),
        }
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Err(VhostUserError::InvalidOperation(
            "CONFIGURE_MEM_SLOTS not offered",
        ))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        self.refuse("ADD_MEM_REG", "CONFIGURE_MEM_SLOTS not offered")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        self.refuse("REM_MEM_REG", "CONFIGURE_MEM_SLOTS not offered")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        self.refuse("SET_DEVICE_STATE_FD", "no device state to transfer")
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        self.refuse("CHECK_DEVICE_STATE", "no device state to transfer")
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("LOG_SHMFD not offered"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceOptions;
    use unvme_bdev::{Bdev, RamBdev};

    fn handler(queues: u16) -> BlkHandler {
        let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("h", 2048, 512).expect("ram"));
        let opts = DeviceOptions {
            num_queues: queues,
            max_queue_size: 256,
            ..DeviceOptions::default()
        };
        let b = Arc::new(BlkBackend::new(&bdev, &opts).expect("backend"));
        BlkHandler::new(b).expect("handler")
    }

    #[test]
    fn bad_ring_sizes_and_indexes_are_refused_and_the_handler_goes_on() {
        let mut h = handler(2);
        for (idx, num) in [(0, 0), (0, 512), (0, 100), (2, 128), (u32::MAX, 128)] {
            assert!(h.set_vring_num(idx, num).is_err(), "{idx} {num}");
            assert!(h.take_refused());
        }
        h.set_vring_num(1, 128).expect("valid size");
        assert!(!h.take_refused());
        // Addresses outside the (empty) memory table.
        assert!(h
            .set_vring_addr(0, VhostUserVringAddrFlags::empty(), 0, 0, 0, 0)
            .is_err());
        assert!(h.take_refused());
        assert!(h.set_vring_enable(0, true).is_err());
        assert!(h.set_features(1 << 63).is_err());
        assert!(h.set_owner().is_ok());
        assert!(h.set_owner().is_err());
    }

    #[test]
    fn shrink_seal_is_seen_on_memfds_and_other_files_are_unsealable() {
        let memfd = |flags| {
            // SAFETY: a constant NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"unvme-seal".as_ptr(), flags) };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: `fd` was just created and is owned by nothing else.
            unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        };
        let open = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        assert_eq!(shrink_sealed(&open), Some(false));
        // SAFETY: F_ADD_SEALS on a valid memfd created with sealing allowed.
        let r = unsafe { libc::fcntl(open.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
        assert_eq!(shrink_sealed(&open), Some(true));
        // Sealed against shrinking only: it still grows, it no longer shrinks.
        open.set_len(4096).expect("grow");
        assert!(open.set_len(0).is_err(), "a sealed memfd shrank");
        let plain = File::open("/proc/self/status").expect("a regular file");
        assert_eq!(shrink_sealed(&plain), None);
    }

    #[test]
    fn inflight_fd_of_a_wrong_geometry_is_refused() {
        let mut h = handler(1);
        let good = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        let (msg, file) = h.get_inflight_fd(&good).expect("get");
        assert_eq!(msg.mmap_size, crate::inflight::region_size(1, 128));
        assert!(h
            .set_inflight_fd(&msg, file.try_clone().expect("dup"))
            .is_ok());
        for bad in [
            VhostUserInflight {
                num_queues: 2,
                ..msg
            },
            VhostUserInflight {
                mmap_size: msg.mmap_size * 2,
                ..msg
            },
        ] {
            assert!(h
                .set_inflight_fd(&bad, file.try_clone().expect("dup"))
                .is_err());
            assert!(h.take_refused());
        }
        // GET for more queues than the device has fails (ending the
        // connection, not refused).
        assert!(h
            .get_inflight_fd(&VhostUserInflight {
                num_queues: 2,
                ..good
            })
            .is_err());
        assert!(!h.take_refused());
    }
}
