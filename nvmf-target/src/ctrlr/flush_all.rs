//! The device behind a Flush with NSID FFFFFFFFh (broadcast) in a
//! subsystem of several namespaces: [`FlushAllBdev`] takes one request, a
//! Flush, and completes it once every namespace's backend has made what was
//! written durable ([`Bdev::flush_all`]).
//!
//! It sits in the reactors' queue table at a global index of its own, so
//! the transport submits a broadcast flush like any other operation and
//! gets one completion back. The flushes run on a worker thread (one per
//! reactor, started by the first broadcast flush that reactor sees), which
//! wakes the reactor through an eventfd: a file backend's fsync never
//! stalls the reactor's other connections. It is not a namespace: Identify
//! and the namespace lists never see it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};

use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoCompletion, IoError, IoOp, IoRequest, SubmitError};

/// Broadcast flushes one reactor may have outstanding; more wait as Busy.
const DEPTH: usize = 4;

/// Every namespace of one subsystem, for a broadcast Flush.
pub(crate) struct FlushAllBdev {
    info: BdevInfo,
    members: Arc<[Arc<dyn Bdev>]>,
}

impl FlushAllBdev {
    /// The broadcast-flush device of subsystem `nqn` over `members`.
    pub fn new(nqn: &str, members: Vec<Arc<dyn Bdev>>) -> Self {
        FlushAllBdev {
            info: BdevInfo {
                name: format!("{nqn}:flush-all"),
                block_size: 512,
                num_blocks: 0,
                max_transfer: 0,
                volatile_write_cache: true,
                deallocate: false,
                write_zeroes: false,
            },
            members: members.into(),
        }
    }
}

impl Bdev for FlushAllBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        let efd = eventfd().map_err(|source| unvme_bdev::Error::Io {
            what: "eventfd for the broadcast flush".into(),
            source,
        })?;
        let (tx, rx) = mpsc::sync_channel::<u64>(DEPTH);
        let done: Arc<Mutex<Vec<IoCompletion>>> = Arc::new(Mutex::new(Vec::new()));
        let members = self.members.clone();
        let wake = efd.try_clone().map_err(|source| unvme_bdev::Error::Io {
            what: "eventfd for the broadcast flush".into(),
            source,
        })?;
        let finished = done.clone();
        std::thread::Builder::new()
            .name("unvme-flush-all".into())
            .spawn(move || {
                // Ends when the queue (the sender) is dropped.
                for tag in rx {
                    let result = members
                        .iter()
                        .try_for_each(|b| b.flush_all())
                        .map_err(|e| IoError::Media(format!("broadcast flush: {e}")));
                    finished
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(IoCompletion {
                            tag,
                            result,
                            buf: None,
                        });
                    signal(&wake);
                }
            })
            .map_err(|source| unvme_bdev::Error::Io {
                what: "thread for the broadcast flush".into(),
                source,
            })?;
        Ok(Box::new(FlushAllQueue {
            tx,
            done,
            efd,
            outstanding: 0,
            refused: Vec::new(),
        }))
    }

    fn flush_all(&self) -> unvme_bdev::Result<()> {
        self.members.iter().try_for_each(|b| b.flush_all())
    }
}

/// One reactor's queue on a [`FlushAllBdev`].
struct FlushAllQueue {
    tx: SyncSender<u64>,
    done: Arc<Mutex<Vec<IoCompletion>>>,
    efd: OwnedFd,
    outstanding: usize,
    /// Requests answered at once (not a Flush), for the next poll.
    refused: Vec<IoCompletion>,
}

impl BdevQueue for FlushAllQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if req.op != IoOp::Flush {
            self.refused.push(IoCompletion {
                tag: req.tag,
                result: Err(IoError::Unsupported),
                buf: req.buf,
            });
            self.outstanding += 1;
            return Ok(());
        }
        if self.outstanding >= DEPTH {
            return Err(SubmitError::Busy(req));
        }
        // Never blocks: at most DEPTH requests are outstanding and the
        // channel holds DEPTH; a worker that is gone fails the request.
        if self.tx.try_send(req.tag).is_err() {
            self.refused.push(IoCompletion {
                tag: req.tag,
                result: Err(IoError::Unavailable),
                buf: None,
            });
        }
        self.outstanding += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut n = self.refused.len();
        out.append(&mut self.refused);
        if self.outstanding > n {
            drain(&self.efd);
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            n += done.len();
            out.append(&mut *done);
        }
        self.outstanding -= n.min(self.outstanding);
        n
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

/// A non-blocking eventfd.
fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes an initial value and flags and touches no memory of ours.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by eventfd(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `efd` readable (adds 1 to its counter).
fn signal(efd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, which lives across the call, to a descriptor we own; a full counter (EAGAIN) still leaves it readable.
    let _ = unsafe { libc::write(efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets `efd`'s counter (it stays readable until then).
fn drain(efd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into `v`, which lives across the call, from a non-blocking descriptor we own; EAGAIN (nothing to read) is fine.
    let _ = unsafe { libc::read(efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A RAM device that counts its flushes.
    struct Counting {
        inner: Arc<dyn Bdev>,
        flushes: AtomicUsize,
    }

    impl Bdev for Counting {
        fn info(&self) -> &BdevInfo {
            self.inner.info()
        }
        fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
            self.inner.open_queue()
        }
        fn flush_all(&self) -> unvme_bdev::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn wait_readable(fd: RawFd) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised pollfd on the stack, alive for the whole call.
        let rc = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(rc, 1, "the worker wakes the queue within 10 s");
    }

    #[test]
    fn a_broadcast_flush_flushes_every_member_and_completes_once() {
        let members: Vec<Arc<Counting>> = (0..3)
            .map(|_| {
                Arc::new(Counting {
                    inner: unvme_bdev::from_spec("ram:1M").unwrap(),
                    flushes: AtomicUsize::new(0),
                })
            })
            .collect();
        let dev = FlushAllBdev::new(
            "nqn.test",
            members.iter().map(|m| m.clone() as Arc<dyn Bdev>).collect(),
        );
        let mut q = dev.open_queue().unwrap();
        q.submit(IoRequest::new(7, IoOp::Flush, None)).unwrap();
        assert_eq!(q.outstanding(), 1);
        let mut out = Vec::new();
        while out.is_empty() {
            wait_readable(q.wait_fd().unwrap());
            q.poll(&mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag, 7);
        assert!(out[0].result.is_ok());
        assert_eq!(q.outstanding(), 0);
        for m in &members {
            assert_eq!(m.flushes.load(Ordering::SeqCst), 1);
        }
        // Anything but a Flush is refused; more than DEPTH wait as Busy.
        q.submit(IoRequest::new(8, IoOp::Read { lba: 0, nlb: 1 }, None))
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 1);
        assert!(matches!(out[0].result, Err(IoError::Unsupported)));
        for t in 0..DEPTH as u64 {
            q.submit(IoRequest::new(t, IoOp::Flush, None)).unwrap();
        }
        assert!(matches!(
            q.submit(IoRequest::new(99, IoOp::Flush, None)),
            Err(SubmitError::Busy(_))
        ));
    }
}
