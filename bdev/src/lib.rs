//! The unvme block-device layer: one interface that joins every frontend to
//! every backend, in the spirit of SPDK's bdev layer.
//!
//! A [`Bdev`] describes a device and is shared between threads. I/O never goes
//! through the `Bdev` itself: each thread that wants to do I/O opens its own
//! [`BdevQueue`] (SPDK calls this an I/O channel) and owns it exclusively, so
//! the I/O path takes no lock. Submission is asynchronous and completion is
//! polled: [`BdevQueue::submit`] hands a request over, [`BdevQueue::poll`]
//! collects whatever has finished. Data buffers are [`IoBuf`]s owned by the
//! caller; a request moves its buffer into the queue and the completion hands
//! it back, so no copy and no lifetime puzzle is involved.
//!
//! This crate is not a scheduler, a cache or a volume manager: it has the
//! interface and the simple backends (`ram`, `null`, `file`). Remote NVMe/TCP
//! namespaces (`unvme-initiator`) and VFIO NVMe SSDs (`unvme-nvme-vfio`)
//! implement the same traits in their own crates; a crate whose backend
//! should be reachable through [`from_spec`] (`vfio:…`) adds its spec kind
//! with [`register_backend`]. With the `test-utils` feature, `conformance`
//! holds the checks every backend must pass, for any crate's tests to run
//! on its own bdevs.

#![deny(missing_docs)]

mod buf;
mod completions;
#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
mod file;
mod null;
mod ram;
mod spec;
pub mod status;
mod sync_queue;

pub use buf::{BufOwner, IoBuf, IOBUF_ALIGN};
pub use file::FileBdev;
pub use null::NullBdev;
pub use ram::RamBdev;
pub use spec::{from_spec, parse_size, register_backend, SpecOpener};

/// Requests a queue of the built-in backends accepts before
/// [`BdevQueue::submit`] answers [`SubmitError::Busy`]; each backend has a
/// `with_queue_depth` to change it.
pub const DEFAULT_QUEUE_DEPTH: usize = 1024;

/// Errors of the block-device layer that are not per-I/O outcomes.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// An I/O error from the operating system while opening or sizing a backend.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value that cannot describe a device.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A backend's own error (a remote controller, a device driver).
    #[error("{what}: {source}")]
    Backend {
        /// What we were doing.
        what: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Static description of a block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdevInfo {
    /// Human-readable name (`ram0`, a file path, a remote NQN/NSID).
    pub name: String,
    /// Logical block size in bytes (a power of two, 512..=65536).
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
    /// Largest transfer of one request, in bytes (0 = no limit of its own).
    pub max_transfer: u32,
    /// The device has a volatile write cache: [`IoOp::Flush`] and FUA matter.
    pub volatile_write_cache: bool,
    /// [`IoOp::Deallocate`] is meaningful (reads of deallocated blocks return zeroes).
    pub deallocate: bool,
    /// [`IoOp::WriteZeroes`] is supported natively or by emulation.
    pub write_zeroes: bool,
}

impl BdevInfo {
    /// Size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * u64::from(self.block_size)
    }

    /// Checks that `lba .. lba + nlb` lies inside the device.
    pub fn check_range(&self, lba: u64, nlb: u32) -> std::result::Result<(), IoError> {
        match lba.checked_add(u64::from(nlb)) {
            Some(end) if end <= self.num_blocks => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    /// Checks a request against the device before it is executed: every LBA
    /// range inside the device ([`IoError::OutOfRange`]), the transfer within
    /// `max_transfer` ([`IoError::TooLarge`]), and a buffer of at least
    /// `op.data_len()` bytes for Read/Write/Compare ([`IoError::BadBuffer`]).
    pub fn check_request(
        &self,
        op: &IoOp,
        buf: Option<&IoBuf>,
    ) -> std::result::Result<(), IoError> {
        self.check_request_len(op, buf.map(|b| b.len()))
    }

    /// [`BdevInfo::check_request`] for data of `have` bytes in all (`None`:
    /// no buffer).
    pub fn check_request_len(
        &self,
        op: &IoOp,
        have: Option<usize>,
    ) -> std::result::Result<(), IoError> {
        match op {
            IoOp::Read { lba, nlb } | IoOp::Write { lba, nlb, .. } | IoOp::Compare { lba, nlb } => {
                self.check_range(*lba, *nlb)?;
                let len = op.data_len(self.block_size);
                if self.max_transfer != 0 && len > self.max_transfer as usize {
                    return Err(IoError::TooLarge);
                }
                match have {
                    Some(n) if n >= len => Ok(()),
                    _ => Err(IoError::BadBuffer),
                }
            }
            IoOp::WriteZeroes { lba, nlb, .. } => self.check_range(*lba, *nlb),
            IoOp::Deallocate { ranges } => ranges
                .iter()
                .try_for_each(|r| self.check_range(r.lba, r.nlb)),
            IoOp::Flush => Ok(()),
        }
    }

    /// Checks that `block_size` and `num_blocks` describe a device the
    /// built-in backends can serve: a power-of-two block size in
    /// 512..=65536, at least one block, and a byte size that fits in `u64`.
    pub fn check_geometry(block_size: u32, num_blocks: u64) -> Result<u64> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(Error::Config(format!(
                "block size {block_size} is not a power of two between 512 and 65536"
            )));
        }
        if num_blocks == 0 {
            return Err(Error::Config("the device has no blocks".into()));
        }
        num_blocks
            .checked_mul(u64::from(block_size))
            .ok_or_else(|| {
                Error::Config(format!(
                    "{num_blocks} blocks of {block_size} bytes overflow u64"
                ))
            })
    }
}

pub use unvme_proto::nvm::{IoOp, LbaRange};

/// A run of blocks in one allocation state (see [`BdevQueue::block_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Number of blocks in the run.
    pub nlb: u32,
    /// Whether the blocks hold data; unallocated blocks read as zeroes.
    pub allocated: bool,
}

/// A request handed to [`BdevQueue::submit`].
#[derive(Debug)]
pub struct IoRequest {
    /// Caller's cookie, returned in the completion.
    pub tag: u64,
    /// What to do.
    pub op: IoOp,
    /// The data buffer for Read/Write/Compare (at least `op.data_len()` bytes;
    /// the first `data_len` bytes are used). `None` for the other operations.
    pub buf: Option<IoBuf>,
    /// Further data segments after `buf`, for a queue whose
    /// [`BdevQueue::max_segments`] allows them: the data is then `buf`'s
    /// bytes followed by each of these, in order (together at least
    /// `data_len` bytes). They let a caller hand over scattered memory (a
    /// guest's pages) without gathering it first. They are dropped when the
    /// request completes; the completion returns only `buf`. Empty for
    /// almost every request (an empty `Vec` does not allocate).
    pub more: Vec<IoBuf>,
}

impl IoRequest {
    /// A request with one data buffer (or none).
    pub fn new(tag: u64, op: IoOp, buf: Option<IoBuf>) -> Self {
        IoRequest {
            tag,
            op,
            buf,
            more: Vec::new(),
        }
    }

    /// Bytes in all the request's data segments.
    pub fn data_capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len()) + self.more.iter().map(|b| b.len()).sum::<usize>()
    }
}

/// The outcome of one request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The LBA range lies (partly) outside the device.
    #[error("LBA range out of range")]
    OutOfRange,
    /// The request's buffer is missing or shorter than the transfer.
    #[error("data buffer missing or too short")]
    BadBuffer,
    /// The transfer is larger than the device's `max_transfer`.
    #[error("transfer larger than the device allows")]
    TooLarge,
    /// A Compare found different data.
    #[error("compare failure")]
    CompareFailure,
    /// The backend does not implement this operation.
    #[error("operation not supported")]
    Unsupported,
    /// The backend failed (media or transport error); the message says why.
    #[error("I/O error: {0}")]
    Media(String),
    /// The request did not complete in time (remote backends).
    #[error("timed out")]
    Timeout,
    /// The backend is gone (remote peer disconnected, device removed).
    #[error("device unavailable")]
    Unavailable,
}

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Success or the reason for failure.
    pub result: std::result::Result<(), IoError>,
    /// The request's buffer, handed back (filled for a successful Read).
    pub buf: Option<IoBuf>,
}

/// Returned by [`BdevQueue::submit`] when the request could not be taken.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full; retry after polling completions. The request is
    /// handed back untouched.
    Busy(IoRequest),
}

/// A per-thread queue on a block device. It is `Send` so it can be created on
/// one thread and moved to its owner, but it is driven by exactly one thread.
pub trait BdevQueue: Send {
    /// Submits a request. Failures of the request itself (out of range, media
    /// error, …) are reported through its completion, never here.
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError>;

    /// Makes progress and appends finished requests to `out`; returns how many
    /// were appended. Never blocks.
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize;

    /// Requests submitted but not yet returned by [`BdevQueue::poll`].
    fn outstanding(&self) -> usize;

    /// A file descriptor that polls readable when [`BdevQueue::poll`] may
    /// make progress, so a caller with requests outstanding can sleep in
    /// poll(2)/epoll beside its other descriptors instead of spinning (a
    /// spinning thread starves a peer that shares its CPU). `None`, the
    /// default, means the queue needs no outside event: whatever was
    /// submitted is ready at the next `poll`.
    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// How many data segments (`buf` plus [`IoRequest::more`]) a request
    /// may have. The default, 1, fails a request with segments in `more`
    /// with [`IoError::BadBuffer`]; a caller with scattered data gathers it
    /// into one buffer for such a queue.
    fn max_segments(&self) -> usize {
        1
    }

    /// A data buffer of `len` bytes in this queue's preferred memory, for a
    /// caller that is about to fill it (a write's incoming data) or submit a
    /// read into it. A VFIO NVMe queue answers with pages of its
    /// IOMMU-mapped pool, so the SSD moves the data straight from or to the
    /// bytes the caller's socket touches, with no copy. `None`, the default
    /// and also the answer when such memory has run out, means any buffer
    /// will do: use [`IoBuf::new`] or the caller's own pool. Every queue
    /// accepts every buffer either way; this only saves copies.
    fn alloc_buf(&mut self, _len: usize) -> Option<IoBuf> {
        None
    }

    /// Which of the `nlb` blocks from `lba` on are allocated: appends runs
    /// to `out` in LBA order, starting at `lba`, covering at least one block
    /// and at most `nlb` (the answer may stop early, as NBD's BLOCK_STATUS
    /// allows). A block reported unallocated reads as zeroes. Returns false,
    /// the default, when the device cannot tell; then every block counts as
    /// allocated. This is synchronous, for backends whose answer is a cheap
    /// system call (RAM: the page table; file: `SEEK_DATA`/`SEEK_HOLE`); the
    /// caller has checked the range against the device.
    fn block_status(&mut self, _lba: u64, _nlb: u32, _out: &mut Vec<Extent>) -> bool {
        false
    }
}

/// A block device: shared description, per-thread queues.
pub trait Bdev: Send + Sync {
    /// The device's geometry and capabilities.
    fn info(&self) -> &BdevInfo;

    /// Opens a queue for the calling thread.
    fn open_queue(&self) -> Result<Box<dyn BdevQueue>>;

    /// Makes everything written so far durable (used at shutdown). The
    /// default does nothing, which is right for volatile backends.
    fn flush_all(&self) -> Result<()> {
        Ok(())
    }

    /// The admin commands of the NVMe controller behind this device, for a
    /// target that shows its hosts the real SSD's Identify data and health
    /// log (pass-through, as SPDK's nvmf does for an NVMe bdev). `None`, the
    /// default, means there is no NVMe controller to ask.
    fn nvme_admin(&self) -> Option<&dyn NvmeAdmin> {
        None
    }
}

/// Admin commands forwarded to the NVMe controller behind a [`Bdev`]
/// (see [`Bdev::nvme_admin`]). The control path: a call may wait for the
/// controller (bounded by its command timeout), never for a reset.
pub trait NvmeAdmin: Send + Sync {
    /// The bdev's namespace ID on its controller (a target maps its own
    /// NSID to this one).
    fn nsid(&self) -> u32;

    /// Runs an admin command and returns dword 0 of its completion. Only
    /// `opc`, `nsid` and `cdw10..=cdw15` of `sqe` are used; the backend
    /// supplies the command identifier and the data pointer. The command's
    /// controller-to-host data (at most 4096 bytes) fills `data`, whose
    /// length is the transfer. A backend forwards only commands that read
    /// (Identify, Get Log Page) and only for its own namespace or the whole
    /// controller (NSID 0 or FFFFFFFFh); anything else is [`AdminError::Refused`].
    fn admin(
        &self,
        sqe: &unvme_proto::nvme::Sqe,
        data: &mut [u8],
    ) -> std::result::Result<u32, AdminError>;
}

/// Why a forwarded admin command did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The backend does not forward this command.
    #[error("not forwarded to the device")]
    Refused,
    /// The device completed the command with this status.
    #[error("the device answered {0}")]
    Status(unvme_proto::nvme::Status),
    /// The device cannot be asked now (being reset, failed, gone).
    #[error("device unavailable: {0}")]
    Unavailable(String),
}
