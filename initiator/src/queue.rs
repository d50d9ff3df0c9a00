//! [`RemoteQueue`]: the [`BdevQueue`] of a [`crate::RemoteNamespace`]: one
//! I/O queue pair per path, requests held and resubmitted across lost
//! connections, failed controllers and path failures.
//!
//! Every request gets an entry in a table sized to the queue depth (its
//! index is the tag the queue pairs see), which keeps its operation and,
//! while it is not on the wire, its buffers. A request whose connection
//! ended without an answer ([`crate::NvmeCompletion::lost`]) or that the
//! controller failed with a status allowing a retry goes back to the held
//! list and is submitted again on the best usable path; it completes
//! towards the caller exactly once, with the answer of the last attempt.
//! Nothing here blocks: connecting runs on short-lived threads, and the
//! queue's [`BdevQueue::wait_fd`] is an epoll set of every path's socket
//! and a timer for the next reconnection or deadline.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use unvme_bdev::{BdevQueue, IoBuf, IoCompletion, IoError, IoOp, IoRequest, SubmitError};
use unvme_proto::nvme::{sct, Status};

use crate::namespace::{IoPolicy, NsShared};
use crate::path::PathShared;
use crate::{IoQpair, NvmeCompletion, Result};

/// How long an aborted command may take to come back before its
/// controller is reset.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// How often to look for the result of a connection attempt under way.
const ATTEMPT_POLL: Duration = Duration::from_millis(5);

/// A request the queue owns until it completes.
struct Entry {
    tag: u64,
    op: IoOp,
    /// The buffers while the request is not on the wire.
    buf: Option<IoBuf>,
    more: Vec<IoBuf>,
    /// Retries after an NVMe status so far.
    retries: u32,
}

/// One path's queue pair and its reconnection state.
struct PathQueue {
    shared: Arc<PathShared>,
    qp: Option<IoQpair>,
    /// The connection attempt under way.
    attempt: Option<mpsc::Receiver<Result<IoQpair>>>,
    next_attempt: Instant,
    /// Entries whose command timed out and was aborted, and when the
    /// controller is reset if one of them is still outstanding.
    aborted: Vec<u32>,
    reset_at: Option<Instant>,
    /// Logged "path down" for the current loss.
    down_logged: bool,
    /// When to look at the ANA state again of a connected path that
    /// cannot take I/O (inaccessible, in transition).
    ana_check_at: Instant,
}

impl PathQueue {
    fn usable(&self) -> bool {
        self.qp.as_ref().is_some_and(|q| !q.is_closed()) && self.shared.ana_usable()
    }

    /// Rank for path selection: lower is better (optimized, or no ANA).
    fn rank(&self) -> u8 {
        match self.shared.ana_state() {
            None | Some(unvme_proto::ana::AnaState::Optimized) => 0,
            _ => 1,
        }
    }
}

/// Whether a failed command may be sent again: NVMe says so (DNR clear)
/// and the status is one a retry can cure.
fn retryable(s: Status) -> bool {
    if s.dnr {
        return false;
    }
    s.sct == sct::PATH
        || (s.sct == sct::GENERIC
            && matches!(
                s.sc,
                0x07 // Command Abort Requested
                | 0x08 // Command Aborted due to SQ Deletion
                | 0x21 // Command Interrupted
                | 0x22 // Transient Transport Error
                | 0x82 // Namespace Not Ready
            ))
}

/// Whether every LBA range of `op` lies inside a namespace of `num_blocks`
/// blocks. Checked before the request is encoded, as every bdev checks it
/// first ([`unvme_bdev::BdevInfo::check_request`]): a range past the end
/// is [`IoError::OutOfRange`] even when it is also too long for one NVMe
/// command, and a request that cannot succeed costs no round trip.
fn ranges_inside(op: &IoOp, num_blocks: u64) -> bool {
    let inside = |lba: u64, nlb: u32| {
        lba.checked_add(u64::from(nlb))
            .is_some_and(|end| end <= num_blocks)
    };
    match op {
        IoOp::Read { lba, nlb }
        | IoOp::Write { lba, nlb, .. }
        | IoOp::Compare { lba, nlb }
        | IoOp::WriteZeroes { lba, nlb, .. } => inside(*lba, *nlb),
        IoOp::Deallocate { ranges } => ranges.iter().all(|r| inside(r.lba, r.nlb)),
        IoOp::Flush => true,
    }
}

/// An epoll set (every path's socket and a timer) the caller can sleep on.
struct Waker {
    ep: OwnedFd,
    timer: OwnedFd,
    /// Sockets in the set.
    fds: Vec<RawFd>,
}

impl Waker {
    fn new() -> std::io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `ep` was just returned by epoll_create1 and is owned by nothing else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        // SAFETY: timerfd_create takes no pointers; a non-negative result is a new fd we own.
        let t = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if t < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `t` was just returned by timerfd_create and is owned by nothing else.
        let timer = unsafe { OwnedFd::from_raw_fd(t) };
        let w = Waker {
            ep,
            timer,
            fds: Vec::new(),
        };
        w.ctl(libc::EPOLL_CTL_ADD, w.timer.as_raw_fd());
        Ok(w)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd) {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a valid epoll_event on our stack; both fds are open (the socket belongs to a live queue pair, the epoll fd to `self`).
        unsafe {
            libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev);
        }
    }

    /// Makes the set hold exactly `fds`.
    fn sync(&mut self, fds: &[RawFd]) {
        if self.fds.len() == fds.len() && self.fds.iter().zip(fds).all(|(a, b)| a == b) {
            return;
        }
        for &fd in &self.fds.clone() {
            if !fds.contains(&fd) {
                self.ctl(libc::EPOLL_CTL_DEL, fd);
            }
        }
        for &fd in fds {
            if !self.fds.contains(&fd) {
                self.ctl(libc::EPOLL_CTL_ADD, fd);
            }
        }
        self.fds = fds.to_vec();
    }

    /// Drops a socket from the set before its queue pair closes it.
    fn forget(&mut self, fd: RawFd) {
        if let Some(i) = self.fds.iter().position(|&f| f == fd) {
            self.ctl(libc::EPOLL_CTL_DEL, fd);
            self.fds.remove(i);
        }
    }

    /// Arms the timer to fire once after `d` (0: disarms it), and clears
    /// an expiry already signalled.
    fn arm(&self, d: Option<Duration>) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf` on our stack from our non-blocking timerfd.
        unsafe {
            libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
        }
        let d = d.map(|d| d.max(Duration::from_micros(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.map_or(0, |d| d.as_secs() as libc::time_t),
                tv_nsec: d.map_or(0, |d| d.subsec_nanos() as libc::c_long),
            },
        };
        // SAFETY: `spec` is a valid itimerspec on our stack, the old value pointer is null (not wanted), and the timerfd is ours and open.
        unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
    }
}

/// See the module documentation.
pub(crate) struct RemoteQueue {
    ns: Arc<NsShared>,
    paths: Vec<PathQueue>,
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Entries waiting for a usable path, oldest first.
    held: VecDeque<u32>,
    /// Completions ready for the caller.
    done: Vec<IoCompletion>,
    scratch: Vec<NvmeCompletion>,
    expired: Vec<(u16, u64)>,
    rr: usize,
    /// Since when no path has been usable.
    down_since: Option<Instant>,
    /// The failure reported for the current loss (held requests failed,
    /// new ones fail at once) and whether the controller is lost.
    failing: bool,
    lost: bool,
    waker: Waker,
    /// A queue pair came or went since the wait set was last updated.
    fds_dirty: bool,
}

impl RemoteQueue {
    /// A queue over every path of `ns`; `first` is a queue pair already open
    /// on path `first_path`, the other paths connect in the background.
    pub fn new(ns: Arc<NsShared>, first_path: usize, first: IoQpair) -> std::io::Result<Self> {
        let depth = first.depth().max(1);
        let now = Instant::now();
        let mut paths: Vec<PathQueue> = ns
            .paths
            .iter()
            .map(|p| PathQueue {
                shared: p.clone(),
                qp: None,
                attempt: None,
                next_attempt: now,
                aborted: Vec::new(),
                reset_at: None,
                down_logged: false,
                ana_check_at: now,
            })
            .collect();
        paths[first_path].qp = Some(first);
        let mut q = RemoteQueue {
            ns,
            paths,
            entries: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            held: VecDeque::with_capacity(depth),
            done: Vec::with_capacity(depth),
            scratch: Vec::with_capacity(depth),
            expired: Vec::new(),
            rr: 0,
            down_since: None,
            failing: false,
            lost: false,
            waker: Waker::new()?,
            fds_dirty: false,
        };
        q.sync_waker();
        Ok(q)
    }

    /// The path a new command goes to, by ANA state and policy.
    fn pick(&mut self) -> Option<usize> {
        let best = self
            .paths
            .iter()
            .filter(|p| p.usable())
            .map(PathQueue::rank)
            .min()?;
        let n = self.paths.len();
        let candidates = (0..n).filter(|&i| self.paths[i].usable() && self.paths[i].rank() == best);
        match self.ns.policy {
            IoPolicy::Failover => candidates.into_iter().next(),
            IoPolicy::RoundRobin => {
                let start = self.rr;
                let i = candidates
                    .min_by_key(|&i| (i + n - start % n) % n)
                    .expect("a usable path exists");
                self.rr = i + 1;
                Some(i)
            }
            IoPolicy::QueueDepth => candidates.min_by_key(|&i| {
                self.paths[i]
                    .qp
                    .as_ref()
                    .map_or(usize::MAX, IoQpair::outstanding)
            }),
        }
    }

    /// Sends entry `idx` on the best path, or holds it.
    fn dispatch(&mut self, idx: u32) -> bool {
        let Some(p) = self.pick() else {
            return false;
        };
        let e = self.entries[idx as usize]
            .as_mut()
            .expect("dispatching a live entry");
        let req = IoRequest {
            tag: u64::from(idx),
            op: e.op.clone(),
            buf: e.buf.take(),
            more: std::mem::take(&mut e.more),
        };
        let qp = self.paths[p]
            .qp
            .as_mut()
            .expect("a usable path has a queue");
        match qp.submit(self.ns.key.nsid, req) {
            Ok(()) => true,
            Err(SubmitError::Busy(req)) => {
                e.buf = req.buf;
                e.more = req.more;
                false
            }
        }
    }

    /// Submits every held request a path can take, in order.
    fn dispatch_held(&mut self) {
        while let Some(&idx) = self.held.front() {
            if !self.dispatch(idx) {
                return;
            }
            self.held.pop_front();
        }
    }

    fn finish(&mut self, idx: u32, result: std::result::Result<(), IoError>, buf: Option<IoBuf>) {
        if let Some(e) = self.entries[idx as usize].take() {
            self.done.push(IoCompletion {
                tag: e.tag,
                result,
                buf: buf.or(e.buf),
            });
            self.free.push(idx);
        }
    }

    /// Handles one queue pair completion of path `p`.
    fn on_completion(&mut self, p: usize, c: NvmeCompletion) {
        let Ok(idx) = u32::try_from(c.tag) else {
            return;
        };
        let Some(e) = self.entries.get_mut(idx as usize).and_then(Option::as_mut) else {
            return;
        };
        self.paths[p].aborted.retain(|&a| a != idx);
        if c.result.is_ok() {
            return self.finish(idx, Ok(()), c.buf);
        }
        let status = c.status();
        let retry = if c.lost {
            true
        } else if let Some(s) = status.filter(|s| retryable(*s)) {
            if s.sct == sct::PATH {
                self.paths[p].shared.refresh_ana(self.ns.key.nsid);
            }
            e.retries += 1;
            e.retries <= self.ns.recovery.max_retries
        } else {
            false
        };
        if retry {
            e.buf = c.buf;
            e.more = c.more;
            self.held.push_back(idx);
        } else {
            self.finish(idx, c.result, c.buf);
        }
    }

    /// Collects connection attempts, drops ended queue pairs, resets
    /// controllers whose aborted commands did not come back, and starts
    /// attempts that are due.
    fn maintain(&mut self, now: Instant) {
        let key = self.ns.key;
        let delay = self.ns.recovery.reconnect_delay;
        for p in &mut self.paths {
            if let Some(qp) = &mut p.qp {
                if qp.controller_failed() && !qp.is_closed() {
                    qp.reset();
                }
                if let Some(at) = p.reset_at {
                    if now >= at {
                        p.reset_at = None;
                        if !p.aborted.is_empty() {
                            warn!(path = %p.shared.label, commands = p.aborted.len(),
                                "aborted commands did not complete; resetting the controller");
                            p.aborted.clear();
                            if let Some(c) = p.shared.controller() {
                                c.fail("command timeout");
                            }
                            qp.reset();
                        }
                    }
                }
                if qp.is_closed() && qp.outstanding() == 0 {
                    if !p.down_logged {
                        warn!(path = %p.shared.label, nsid = key.nsid, "NVMe/TCP I/O queue lost");
                        p.down_logged = true;
                    }
                    qp.set_aborted();
                    self.waker.forget(qp.as_raw_fd());
                    self.fds_dirty = true;
                    p.qp = None;
                    p.aborted.clear();
                    p.reset_at = None;
                }
            }
            if p.qp.is_some() {
                if !p.shared.ana_usable() && now >= p.ana_check_at {
                    p.shared.refresh_ana(key.nsid);
                    p.ana_check_at = now + delay;
                }
                continue;
            }
            if let Some(rx) = &p.attempt {
                let outcome = match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => continue,
                    Err(mpsc::TryRecvError::Disconnected) => Err(crate::Error::Invalid(
                        "the reconnection thread ended without an answer".into(),
                    )),
                };
                p.attempt = None;
                match outcome {
                    Ok(qp) => {
                        info!(path = %p.shared.label, nsid = key.nsid, qid = qp.qid(),
                            "NVMe/TCP I/O queue connected");
                        p.qp = Some(qp);
                        p.down_logged = false;
                        self.fds_dirty = true;
                        continue;
                    }
                    Err(e) => {
                        warn!(path = %p.shared.label, nsid = key.nsid, error = %e,
                            retry_in_ms = delay.as_millis() as u64, "NVMe/TCP reconnection failed");
                        p.next_attempt = now + delay;
                        continue;
                    }
                }
            }
            if now < p.next_attempt {
                continue;
            }
            let (tx, rx) = mpsc::sync_channel(1);
            let shared = p.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("unvme-reconnect".into())
                .spawn(move || {
                    // The queue may be gone by now; then the new pair is dropped.
                    let _ = tx.send(shared.open_qpair(key));
                });
            match spawned {
                Ok(_) => p.attempt = Some(rx),
                Err(e) => {
                    warn!(path = %p.shared.label, error = %e, "cannot start a reconnection thread");
                    p.next_attempt = now + delay;
                }
            }
        }
    }

    /// Sends Abort for the commands of path `p` past their deadline and
    /// schedules the controller reset in case they do not come back.
    fn on_expired(&mut self, p: usize, now: Instant) {
        if self.expired.is_empty() {
            return;
        }
        let path = &mut self.paths[p];
        let qid = path.qp.as_ref().map_or(0, IoQpair::qid);
        let mut cids = Vec::new();
        for &(cid, tag) in &self.expired {
            let Ok(idx) = u32::try_from(tag) else {
                continue;
            };
            if !path.aborted.contains(&idx) {
                path.aborted.push(idx);
                cids.push(cid);
            }
        }
        self.expired.clear();
        if cids.is_empty() {
            return;
        }
        path.reset_at.get_or_insert(now + ABORT_GRACE);
        if let Some(ctrl) = path.shared.controller() {
            let label = path.shared.label.clone();
            let _ = std::thread::Builder::new()
                .name("unvme-abort".into())
                .spawn(move || {
                    for cid in cids {
                        match ctrl.abort(qid, cid) {
                            Ok(done) => info!(path = %label, qid, cid, aborted = done, "Abort"),
                            Err(e) => warn!(path = %label, qid, cid, error = %e, "Abort failed"),
                        }
                    }
                });
        }
    }

    /// Applies the loss timeouts: after fast_io_fail or ctrl_loss, held
    /// requests fail and new ones fail at once until a path is back.
    fn apply_timeouts(&mut self, now: Instant) {
        let usable = self.paths.iter().any(PathQueue::usable);
        if usable {
            if self.down_since.take().is_some() && (self.failing || self.lost) {
                info!(nsid = self.ns.key.nsid, "remote namespace reachable again");
            }
            self.failing = false;
            self.lost = false;
            return;
        }
        let since = *self.down_since.get_or_insert(now);
        let down = now - since;
        let r = self.ns.recovery;
        if !self.lost && r.ctrl_loss_tmo.is_some_and(|t| down >= t) {
            self.lost = true;
            self.failing = true;
            error!(
                nsid = self.ns.key.nsid,
                down_ms = down.as_millis() as u64,
                "controller lost (ctrl_loss_tmo): failing I/O until it is back"
            );
        } else if !self.failing && r.fast_io_fail_tmo.is_some_and(|t| down >= t) {
            self.failing = true;
            warn!(
                nsid = self.ns.key.nsid,
                down_ms = down.as_millis() as u64,
                "fast_io_fail_tmo: failing held I/O"
            );
        }
        if self.failing {
            while let Some(idx) = self.held.pop_front() {
                self.finish(idx, Err(IoError::Unavailable), None);
            }
        }
    }

    /// The next time something must be looked at without an event.
    fn next_wake(&self, now: Instant) -> Option<Duration> {
        let mut at: Option<Instant> = None;
        let mut soon = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for p in &self.paths {
            if p.attempt.is_some() {
                soon(now + ATTEMPT_POLL);
            } else if p.qp.is_none() {
                soon(p.next_attempt);
            } else if !p.shared.ana_usable() {
                soon(p.ana_check_at);
            } else if p.qp.as_ref().is_some_and(|q| q.is_closed()) {
                soon(now);
            }
            if let Some(t) = p.reset_at {
                soon(t);
            }
        }
        if let (Some(since), false) = (self.down_since, self.failing) {
            let r = self.ns.recovery;
            for t in [r.fast_io_fail_tmo, r.ctrl_loss_tmo].into_iter().flatten() {
                soon(since + t);
            }
        }
        if !self.held.is_empty() && self.paths.iter().any(PathQueue::usable) {
            soon(now);
        }
        at.map(|t| t.saturating_duration_since(now))
    }
}

impl BdevQueue for RemoteQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        if !ranges_inside(&req.op, self.ns.key.num_blocks) {
            self.done.push(IoCompletion {
                tag: req.tag,
                result: Err(IoError::OutOfRange),
                buf: req.buf,
            });
            return Ok(());
        }
        if self.failing && !self.paths.iter().any(PathQueue::usable) {
            self.done.push(IoCompletion {
                tag: req.tag,
                result: Err(IoError::Unavailable),
                buf: req.buf,
            });
            return Ok(());
        }
        let Some(idx) = self.free.pop() else {
            return Err(SubmitError::Busy(req));
        };
        let IoRequest { tag, op, buf, more } = req;
        self.entries[idx as usize] = Some(Entry {
            tag,
            op,
            buf,
            more,
            retries: 0,
        });
        if !self.held.is_empty() || !self.dispatch(idx) {
            self.held.push_back(idx);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let now = Instant::now();
        for p in 0..self.paths.len() {
            let Some(qp) = self.paths[p].qp.as_mut() else {
                continue;
            };
            qp.poll_nvme(&mut self.scratch);
            qp.take_expired(&mut self.expired);
            let mut batch = std::mem::take(&mut self.scratch);
            for c in batch.drain(..) {
                self.on_completion(p, c);
            }
            self.scratch = batch;
            self.on_expired(p, now);
        }
        self.maintain(now);
        self.apply_timeouts(now);
        if !self.held.is_empty() {
            self.dispatch_held();
        }
        if self.fds_dirty {
            self.fds_dirty = false;
            self.sync_waker();
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn outstanding(&self) -> usize {
        self.done.len() + self.entries.len() - self.free.len()
    }

    fn max_segments(&self) -> usize {
        crate::controller::MAX_SEGMENTS
    }

    fn wait_fd(&self) -> Option<RawFd> {
        if !self.done.is_empty() {
            return None;
        }
        let now = Instant::now();
        let wake = self.next_wake(now);
        if wake == Some(Duration::ZERO) {
            return None;
        }
        // The sockets in the set are brought up to date by `poll`.
        self.waker.arm(wake);
        Some(self.waker.ep.as_raw_fd())
    }
}

impl RemoteQueue {
    /// Brings the wait set up to date with the current sockets.
    fn sync_waker(&mut self) {
        let fds: Vec<RawFd> = self
            .paths
            .iter()
            .filter_map(|p| p.qp.as_ref().map(|q| q.as_raw_fd()))
            .collect();
        self.waker.sync(&fds);
    }
}
