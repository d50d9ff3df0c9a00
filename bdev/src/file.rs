//! The `file` backend: a block device backed by a regular file (or a block
//! device node) through `pread`/`pwrite`.
//!
//! The file is opened with `O_DIRECT` when the filesystem allows it, so data
//! moves between the caller's [`IoBuf`] (4 KiB-aligned) and the storage
//! without passing through the page cache. Whether it does is decided at
//! open: the `O_DIRECT` open must succeed, an aligned read of one block must
//! succeed, and where the kernel reports the file's direct-I/O alignment
//! (`statx` `STATX_DIOALIGN`) the block size must satisfy it. If any of these
//! fails with `EINVAL` (tmpfs on older kernels, some FUSE and overlay
//! filesystems, a block size below the device's logical block size) the file
//! is used with buffered I/O instead, and that is logged at `info`.
//!
//! One file descriptor is shared by all queues: `pread`/`pwrite` take their
//! own offset, so queues never contend on a file position. Each queue owns its
//! completion list and a scratch buffer for Compare.
//!
//! **The I/O is synchronous**: each request is executed inside
//! [`BdevQueue::submit`] and so blocks the calling (reactor) thread for the
//! duration of the system call. That is fine for tests, for files in the page
//! cache and for modest loads; an `io_uring` path, which would make the queue
//! truly asynchronous, may come later behind a feature.
//!
//! Write with `fua` is `pwrite` followed by `fdatasync`; Flush is
//! `fdatasync`. Deallocate punches a hole (`FALLOC_FL_PUNCH_HOLE |
//! FALLOC_FL_KEEP_SIZE`) and falls back to writing zeroes; WriteZeroes tries
//! `FALLOC_FL_ZERO_RANGE`, then a hole punch, then writing zeroes. A queue
//! remembers which `fallocate` modes the filesystem refused and does not ask
//! again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::completions::Completions;
use crate::{
    Bdev, BdevInfo, BdevQueue, Error, IoBuf, IoCompletion, IoError, IoOp, IoRequest, Result,
    SubmitError, DEFAULT_QUEUE_DEPTH,
};

/// Size of the shared zero buffer and of each queue's Compare scratch
/// buffer: a multiple of every supported block size (512..=65536).
const CHUNK: usize = 64 * 1024;

/// A probe deciding whether `O_DIRECT` works on an open file; an `EINVAL`
/// answer makes [`FileBdev`] fall back to buffered I/O.
type DirectProbe = fn(&File, u32) -> io::Result<()>;

/// State shared by a [`FileBdev`] and its queues.
#[derive(Debug)]
struct FileInner {
    info: BdevInfo,
    file: File,
    direct: bool,
    /// Zeroes for WriteZeroes/Deallocate when `fallocate` cannot help; only
    /// ever read.
    zeroes: IoBuf,
}

/// A block device backed by a file.
#[derive(Debug)]
pub struct FileBdev {
    inner: Arc<FileInner>,
    queue_depth: usize,
}

impl FileBdev {
    /// Opens `path` read-write as a device of `block_size`-byte blocks.
    ///
    /// With `create_size`, the file is created if missing and extended (never
    /// shrunk) to that many bytes. The device has `file size / block_size`
    /// blocks; a trailing partial block is not used. `O_DIRECT` is used when
    /// the filesystem allows it (see the module documentation).
    ///
    /// Fails with [`Error::Config`] for a block size that is not a power of
    /// two in 512..=65536 or a file smaller than one block, and with
    /// [`Error::Io`] when the file cannot be opened or sized.
    pub fn open(
        path: impl AsRef<Path>,
        block_size: u32,
        create_size: Option<u64>,
    ) -> Result<FileBdev> {
        Self::open_with_probe(path.as_ref(), block_size, create_size, probe_direct)
    }

    fn open_with_probe(
        path: &Path,
        block_size: u32,
        create_size: Option<u64>,
        probe: DirectProbe,
    ) -> Result<FileBdev> {
        BdevInfo::check_geometry(block_size, 1)?;
        let io_err = |what: &str, source| Error::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        let (file, direct) = match open_file(path, create_size.is_some(), true) {
            Ok(f) => {
                extend(&f, create_size).map_err(|e| io_err("extending", e))?;
                match probe(&f, block_size) {
                    Ok(()) => (f, true),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::info!(path = %path.display(), block_size, error = %e,
                            "O_DIRECT probe failed, using buffered I/O");
                        drop(f);
                        (
                            open_file(path, false, false).map_err(|e| io_err("opening", e))?,
                            false,
                        )
                    }
                    Err(e) => return Err(io_err("probing O_DIRECT on", e)),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), error = %e, "O_DIRECT open refused, using buffered I/O");
                let f = open_file(path, create_size.is_some(), false)
                    .map_err(|e| io_err("opening", e))?;
                extend(&f, create_size).map_err(|e| io_err("extending", e))?;
                (f, false)
            }
            Err(e) => return Err(io_err("opening", e)),
        };
        let size = file_size(&file).map_err(|e| io_err("sizing", e))?;
        let num_blocks = size / u64::from(block_size);
        if num_blocks == 0 {
            return Err(Error::Config(format!(
                "{} has {size} bytes, less than one block of {block_size}",
                path.display()
            )));
        }
        BdevInfo::check_geometry(block_size, num_blocks)?;
        let info = BdevInfo {
            name: path.display().to_string(),
            block_size,
            num_blocks,
            max_transfer: 0,
            volatile_write_cache: true,
            deallocate: true,
            write_zeroes: true,
        };
        tracing::debug!(path = %path.display(), num_blocks, block_size, direct, "file bdev opened");
        let inner = FileInner {
            info,
            file,
            direct,
            zeroes: IoBuf::new(CHUNK),
        };
        Ok(FileBdev {
            inner: Arc::new(inner),
            queue_depth: DEFAULT_QUEUE_DEPTH,
        })
    }

    /// Sets how many completions a queue opened later holds before `submit`
    /// answers [`SubmitError::Busy`] (default [`DEFAULT_QUEUE_DEPTH`]).
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth.max(1);
        self
    }

    /// Whether the file is accessed with `O_DIRECT` (false: buffered).
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }
}

impl Bdev for FileBdev {
    fn info(&self) -> &BdevInfo {
        &self.inner.info
    }

    fn open_queue(&self) -> Result<Box<dyn BdevQueue>> {
        Ok(Box::new(FileQueue::new(
            Arc::clone(&self.inner),
            self.queue_depth,
        )))
    }

    fn flush_all(&self) -> Result<()> {
        self.inner.file.sync_data().map_err(|source| Error::Io {
            what: format!("fdatasync of {}", self.inner.info.name),
            source,
        })
    }
}

/// Opens `path` read-write, optionally creating it and with `O_DIRECT`.
fn open_file(path: &Path, create: bool, direct: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(create);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
}

/// Extends the file to `size` bytes if it is shorter.
fn extend(file: &File, size: Option<u64>) -> io::Result<()> {
    match size {
        Some(size) if file.metadata()?.len() < size => file.set_len(size),
        _ => Ok(()),
    }
}

/// The size of a regular file, or of a block device node (whose metadata
/// length is 0) found by seeking to its end.
fn file_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

/// Checks that `O_DIRECT` I/O of `block_size` blocks from an [`IoBuf`]
/// works on `file`: the kernel's reported alignment (if any) must be met, and
/// an aligned read of the first block must succeed. Answers `EINVAL` when it
/// does not.
fn probe_direct(file: &File, block_size: u32) -> io::Result<()> {
    if let Some((mem_align, offset_align)) = dio_alignment(file) {
        let ok = offset_align != 0
            && block_size % offset_align == 0
            && mem_align != 0
            && crate::buf::IOBUF_ALIGN as u32 % mem_align == 0;
        if !ok {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
    }
    let mut buf = IoBuf::new(block_size as usize);
    file.read_at(&mut buf, 0).map(|_| ())
}

/// The direct-I/O memory and offset alignment `statx` reports for `file`,
/// or `None` if this kernel or filesystem does not say.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is a plain C struct for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call, the empty path is
    // a valid NUL-terminated string used with AT_EMPTY_PATH, and `stx` is a
    // writable statx the kernel fills.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Whether an `fallocate` failure means "this mode is not supported here".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

/// Converts an OS error of one request into its completion status.
fn media(e: io::Error) -> IoError {
    IoError::Media(e.to_string())
}

/// A queue on a [`FileBdev`]; executes each request inside `submit`.
#[derive(Debug)]
struct FileQueue {
    inner: Arc<FileInner>,
    done: Completions,
    /// Scratch for Compare (aligned, so it works with `O_DIRECT`).
    scratch: IoBuf,
    /// `FALLOC_FL_ZERO_RANGE` has not been refused yet.
    zero_range_ok: bool,
    /// `FALLOC_FL_PUNCH_HOLE` has not been refused yet.
    punch_hole_ok: bool,
}

impl FileQueue {
    fn new(inner: Arc<FileInner>, depth: usize) -> Self {
        FileQueue {
            inner,
            done: Completions::new(depth),
            scratch: IoBuf::new(CHUNK),
            zero_range_ok: true,
            punch_hole_ok: true,
        }
    }

    /// Validates and performs one request.
    fn execute(&mut self, op: &IoOp, buf: Option<&mut IoBuf>) -> std::result::Result<(), IoError> {
        self.inner.info.check_request(op, buf.as_deref())?;
        let bs = u64::from(self.inner.info.block_size);
        // check_request proved every range lies inside the file, whose size
        // fits in u64, so these products cannot overflow.
        let bytes = |nlb: u32| u64::from(nlb) * bs;
        let file = &self.inner.file;
        match *op {
            IoOp::Read { lba, nlb } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                file.read_exact_at(&mut buf[..bytes(nlb) as usize], lba * bs)
                    .map_err(media)
            }
            IoOp::Write { lba, nlb, fua } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                file.write_all_at(&buf[..bytes(nlb) as usize], lba * bs)
                    .map_err(media)?;
                self.sync_if(fua)
            }
            IoOp::Compare { lba, nlb } => {
                let buf = buf.ok_or(IoError::BadBuffer)?;
                self.compare(lba * bs, &buf[..bytes(nlb) as usize])
            }
            IoOp::Flush => self.sync_if(true),
            IoOp::WriteZeroes { lba, nlb, fua, .. } => {
                self.write_zeroes(lba * bs, bytes(nlb))?;
                self.sync_if(fua)
            }
            IoOp::Deallocate { ref ranges } => ranges
                .iter()
                .try_for_each(|r| self.deallocate(r.lba * bs, bytes(r.nlb))),
        }
    }

    fn sync_if(&self, sync: bool) -> std::result::Result<(), IoError> {
        if sync {
            self.inner.file.sync_data().map_err(media)
        } else {
            Ok(())
        }
    }

    /// Compares the file at `offset` with `want`, chunk by chunk.
    fn compare(&mut self, offset: u64, want: &[u8]) -> std::result::Result<(), IoError> {
        let mut pos = offset;
        for want in want.chunks(CHUNK) {
            let got = &mut self.scratch[..want.len()];
            self.inner.file.read_exact_at(got, pos).map_err(media)?;
            if got != want {
                return Err(IoError::CompareFailure);
            }
            pos += want.len() as u64;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`: zero range, else punch hole, else
    /// write zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        if self.zero_range_ok {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.zero_range_ok = false,
                Err(e) => return Err(media(e)),
            }
        }
        self.deallocate(offset, len)
    }

    /// Deallocates `len` bytes at `offset`: punch hole, else write zeroes.
    fn deallocate(&mut self, offset: u64, len: u64) -> std::result::Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        if self.punch_hole_ok {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.punch_hole_ok = false,
                Err(e) => return Err(media(e)),
            }
        }
        self.write_zero_bytes(offset, len)
    }

    /// Writes `len` zero bytes at `offset` from the shared zero buffer.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> std::result::Result<(), IoError> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            // Both ends are block-aligned and CHUNK is a multiple of the block
            // size, so every piece stays aligned for O_DIRECT.
            let n = (end - pos).min(CHUNK as u64);
            self.inner
                .file
                .write_all_at(&self.inner.zeroes[..n as usize], pos)
                .map_err(media)?;
            pos += n;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
        let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
        let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
        // SAFETY: fallocate only reads its integer arguments; the fd is open
        // for as long as `self.inner` lives.
        let rc = unsafe { libc::fallocate(self.inner.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl BdevQueue for FileQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let mut req = self.done.admit(req)?;
        let result = self.execute(&req.op, req.buf.as_mut());
        if let Err(e) = &result {
            tracing::debug!(tag = req.tag, error = %e, "file bdev request failed");
        }
        self.done.push(IoCompletion {
            tag: req.tag,
            result,
            buf: req.buf,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.done.drain_into(out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ram::tests::{check_against_model, model_ops};
    use crate::LbaRange;
    use proptest::prelude::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A uniquely named file path, removed on drop.
    pub(crate) struct TempPath(pub(crate) PathBuf);

    impl TempPath {
        pub(crate) fn new_in(dir: &Path, what: &str) -> TempPath {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            TempPath(dir.join(format!("unvme-bdev-{}-{n}-{what}.img", std::process::id())))
        }

        pub(crate) fn new(what: &str) -> TempPath {
            Self::new_in(&std::env::temp_dir(), what)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run(q: &mut dyn BdevQueue, op: IoOp, buf: Option<IoBuf>) -> IoCompletion {
        q.submit(IoRequest { tag: 5, op, buf })
            .expect("queue has room");
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 1);
        out.pop().expect("one completion")
    }

    fn read(q: &mut dyn BdevQueue, lba: u64, nlb: u32, bs: usize) -> Vec<u8> {
        let c = run(
            q,
            IoOp::Read { lba, nlb },
            Some(IoBuf::new(nlb as usize * bs)),
        );
        assert_eq!(c.result, Ok(()));
        c.buf.expect("buffer handed back").to_vec()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
            .collect()
    }

    fn fail_probe(_: &File, _: u32) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    #[test]
    fn created_file_round_trips_and_persists_after_reopen() {
        let path = TempPath::new("persist");
        let data = pattern(8 * 4096, 1);
        {
            let dev = FileBdev::open(&path.0, 4096, Some(1 << 20)).unwrap();
            assert_eq!(dev.info().num_blocks, 256);
            assert!(dev.info().volatile_write_cache);
            let mut q = dev.open_queue().unwrap();
            assert!(read(&mut *q, 0, 256, 4096).iter().all(|&b| b == 0));
            let c = run(
                &mut *q,
                IoOp::Write {
                    lba: 100,
                    nlb: 8,
                    fua: false,
                },
                Some(IoBuf::from_slice(&data)),
            );
            assert_eq!(c.result, Ok(()));
            assert_eq!(read(&mut *q, 100, 8, 4096), data);
            assert_eq!(run(&mut *q, IoOp::Flush, None).result, Ok(()));
            dev.flush_all().unwrap();
        }
        // A smaller create size never shrinks an existing file.
        let dev = FileBdev::open(&path.0, 4096, Some(4096)).unwrap();
        assert_eq!(dev.info().num_blocks, 256);
        let mut q = dev.open_queue().unwrap();
        assert_eq!(read(&mut *q, 100, 8, 4096), data);
        drop(dev);
        // The queue keeps the file open after the bdev is gone.
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 0,
                nlb: 1,
                fua: true,
            },
            Some(IoBuf::from_slice(&[9; 4096])),
        );
        assert_eq!(c.result, Ok(()));
    }

    #[test]
    fn missing_file_without_create_is_an_io_error() {
        let path = TempPath::new("missing");
        assert!(matches!(
            FileBdev::open(&path.0, 512, None),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn file_smaller_than_a_block_or_bad_block_size_is_a_config_error() {
        let path = TempPath::new("tiny");
        std::fs::write(&path.0, [0u8; 100]).unwrap();
        assert!(matches!(
            FileBdev::open(&path.0, 512, None),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            FileBdev::open(&path.0, 1000, Some(1 << 20)),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn trailing_partial_block_is_not_used() {
        let path = TempPath::new("partial");
        let dev = FileBdev::open(&path.0, 512, Some(512 * 10 + 100)).unwrap();
        assert_eq!(dev.info().num_blocks, 10);
    }

    #[test]
    fn failed_direct_probe_falls_back_to_buffered_io() {
        let path = TempPath::new("fallback");
        let dev = FileBdev::open_with_probe(&path.0, 512, Some(64 * 512), fail_probe).unwrap();
        assert!(!dev.is_direct());
        let mut q = dev.open_queue().unwrap();
        let data = pattern(3 * 512, 4);
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: 1,
                nlb: 3,
                fua: true,
            },
            Some(IoBuf::from_slice(&data)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(read(&mut *q, 1, 3, 512), data);
    }

    #[test]
    fn tmpfs_file_works_with_or_without_direct_io() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let path = TempPath::new_in(shm, "tmpfs");
        let data = pattern(16 * 512, 8);
        {
            let dev = FileBdev::open(&path.0, 512, Some(1 << 16)).unwrap();
            let mut q = dev.open_queue().unwrap();
            let c = run(
                &mut *q,
                IoOp::Write {
                    lba: 7,
                    nlb: 16,
                    fua: true,
                },
                Some(IoBuf::from_slice(&data)),
            );
            assert_eq!(c.result, Ok(()));
            let op = IoOp::WriteZeroes {
                lba: 9,
                nlb: 9,
                deallocate: false,
                fua: false,
            };
            assert_eq!(run(&mut *q, op, None).result, Ok(()));
        }
        let dev = FileBdev::open(&path.0, 512, None).unwrap();
        let mut q = dev.open_queue().unwrap();
        let mut want = data;
        want[2 * 512..11 * 512].fill(0);
        assert_eq!(read(&mut *q, 7, 16, 512), want);
    }

    #[test]
    fn out_of_range_and_lba_overflow_are_rejected() {
        let path = TempPath::new("range");
        let dev = FileBdev::open(&path.0, 512, Some(16 * 512)).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Read { lba: 15, nlb: 2 },
            Some(IoBuf::new(1024)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let c = run(
            &mut *q,
            IoOp::Write {
                lba: u64::MAX,
                nlb: 1,
                fua: false,
            },
            Some(IoBuf::new(512)),
        );
        assert_eq!(c.result, Err(IoError::OutOfRange));
        let op = IoOp::WriteZeroes {
            lba: 16,
            nlb: 1,
            deallocate: false,
            fua: false,
        };
        assert_eq!(run(&mut *q, op, None).result, Err(IoError::OutOfRange));
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange {
                lba: u64::MAX,
                nlb: u32::MAX,
            }],
        };
        assert_eq!(run(&mut *q, op, None).result, Err(IoError::OutOfRange));
    }

    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        let path = TempPath::new("shortbuf");
        let dev = FileBdev::open(&path.0, 4096, Some(16 * 4096)).unwrap();
        let mut q = dev.open_queue().unwrap();
        let c = run(
            &mut *q,
            IoOp::Read { lba: 0, nlb: 2 },
            Some(IoBuf::new(4096)),
        );
        assert_eq!(c.result, Err(IoError::BadBuffer));
        let c = run(&mut *q, IoOp::Compare { lba: 0, nlb: 1 }, None);
        assert_eq!(c.result, Err(IoError::BadBuffer));
    }

    #[test]
    fn compare_reports_match_and_mismatch() {
        let path = TempPath::new("compare");
        let dev = FileBdev::open(&path.0, 512, Some(512 * 512)).unwrap();
        let mut q = dev.open_queue().unwrap();
        // Larger than the scratch chunk, so the comparison spans chunks.
        let data = pattern(200 * 512, 2);
        run(
            &mut *q,
            IoOp::Write {
                lba: 10,
                nlb: 200,
                fua: false,
            },
            Some(IoBuf::from_slice(&data)),
        );
        let c = run(
            &mut *q,
            IoOp::Compare { lba: 10, nlb: 200 },
            Some(IoBuf::from_slice(&data)),
        );
        assert_eq!(c.result, Ok(()));
        let mut other = data;
        other[199 * 512] ^= 1;
        let c = run(
            &mut *q,
            IoOp::Compare { lba: 10, nlb: 200 },
            Some(IoBuf::from_slice(&other)),
        );
        assert_eq!(c.result, Err(IoError::CompareFailure));
    }

    #[test]
    fn full_queue_is_busy_until_polled() {
        let path = TempPath::new("busy");
        let dev = FileBdev::open(&path.0, 512, Some(8 * 512))
            .unwrap()
            .with_queue_depth(3);
        let mut q = dev.open_queue().unwrap();
        for tag in 0..3 {
            q.submit(IoRequest {
                tag,
                op: IoOp::Flush,
                buf: None,
            })
            .unwrap();
        }
        let Err(SubmitError::Busy(req)) = q.submit(IoRequest {
            tag: 3,
            op: IoOp::Flush,
            buf: None,
        }) else {
            panic!("a full queue accepted a request")
        };
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out), 3);
        q.submit(req).unwrap();
        assert_eq!(q.poll(&mut out), 1);
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    /// Writes a pattern, deallocates and zeroes parts of it through `q`, and
    /// checks the result.
    fn zeroing_reads_back_zeroes(q: &mut dyn BdevQueue) {
        let data = pattern(64 * 512, 6);
        run(
            q,
            IoOp::Write {
                lba: 0,
                nlb: 64,
                fua: false,
            },
            Some(IoBuf::from_slice(&data)),
        );
        let op = IoOp::Deallocate {
            ranges: vec![LbaRange { lba: 3, nlb: 18 }, LbaRange { lba: 40, nlb: 1 }],
        };
        assert_eq!(run(q, op, None).result, Ok(()));
        let op = IoOp::WriteZeroes {
            lba: 48,
            nlb: 16,
            deallocate: false,
            fua: true,
        };
        assert_eq!(run(q, op, None).result, Ok(()));
        let op = IoOp::WriteZeroes {
            lba: 30,
            nlb: 2,
            deallocate: true,
            fua: false,
        };
        assert_eq!(run(q, op, None).result, Ok(()));
        let mut want = data;
        want[3 * 512..21 * 512].fill(0);
        want[30 * 512..32 * 512].fill(0);
        want[40 * 512..41 * 512].fill(0);
        want[48 * 512..].fill(0);
        assert_eq!(read(q, 0, 64, 512), want);
    }

    #[test]
    fn deallocate_and_write_zeroes_read_back_zeroes() {
        let path = TempPath::new("zeroes");
        let dev = FileBdev::open(&path.0, 512, Some(64 * 512)).unwrap();
        let mut q = dev.open_queue().unwrap();
        zeroing_reads_back_zeroes(&mut *q);
    }

    #[test]
    fn zeroing_without_fallocate_writes_zeroes() {
        let path = TempPath::new("nofalloc");
        let dev = FileBdev::open(&path.0, 512, Some(64 * 512)).unwrap();
        let mut q = FileQueue::new(Arc::clone(&dev.inner), 8);
        q.zero_range_ok = false;
        q.punch_hole_ok = false;
        zeroing_reads_back_zeroes(&mut q);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn random_operations_match_a_byte_model(ops in model_ops(48)) {
            let path = TempPath::new("model");
            let dev = FileBdev::open(&path.0, 512, Some(48 * 512)).unwrap();
            check_against_model(&dev, &ops);
        }
    }
}
