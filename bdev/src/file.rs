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

use crate::sync_queue::{IoResult, SyncBackend, SyncQueue};
use crate::{Bdev, BdevInfo, BdevQueue, Error, IoBuf, IoError, Result, DEFAULT_QUEUE_DEPTH};

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
    /// answers [`crate::SubmitError::Busy`] (default [`DEFAULT_QUEUE_DEPTH`]).
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
        let ops = FileOps::new(Arc::clone(&self.inner));
        Ok(Box::new(SyncQueue::new(ops, self.queue_depth)))
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
            && block_size.is_multiple_of(offset_align)
            && mem_align != 0
            && (crate::buf::IOBUF_ALIGN as u32).is_multiple_of(mem_align);
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
    // SAFETY: the fd is open for the duration of the call, the empty path is a valid NUL-terminated string used with AT_EMPTY_PATH, and `stx` is a writable statx the kernel fills.
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

/// The data operations of a queue on a [`FileBdev`]: `pread`/`pwrite`,
/// `fdatasync` and `fallocate` on the shared file.
#[derive(Debug)]
struct FileOps {
    inner: Arc<FileInner>,
    /// Scratch for Compare (aligned, so it works with `O_DIRECT`).
    scratch: IoBuf,
    /// `FALLOC_FL_ZERO_RANGE` has not been refused yet.
    zero_range_ok: bool,
    /// `FALLOC_FL_PUNCH_HOLE` has not been refused yet.
    punch_hole_ok: bool,
}

impl FileOps {
    fn new(inner: Arc<FileInner>) -> Self {
        FileOps {
            inner,
            scratch: IoBuf::new(CHUNK),
            zero_range_ok: true,
            punch_hole_ok: true,
        }
    }

    /// Whether `data` cannot go to an `O_DIRECT` file as it is.
    fn needs_bounce(&self, data: &[u8]) -> bool {
        self.inner.direct && !(data.as_ptr() as usize).is_multiple_of(crate::buf::IOBUF_ALIGN)
    }

    fn sync_if(&self, sync: bool) -> IoResult {
        if sync {
            self.inner.file.sync_data().map_err(media)
        } else {
            Ok(())
        }
    }

    /// Zeroes `len` bytes at `offset`: zero range, else punch hole, else
    /// write zeroes.
    fn zero(&mut self, offset: u64, len: u64) -> IoResult {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match try_fallocate(&self.inner.file, &mut self.zero_range_ok, mode, offset, len)? {
            true => Ok(()),
            false => self.deallocate(offset, len),
        }
    }

    /// Writes `len` zero bytes at `offset` from the shared zero buffer.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> IoResult {
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
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: fallocate only reads its integer arguments; the fd is open for as long as `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `fallocate(mode)` unless the filesystem refused `mode` before
/// (`*supported` false); returns whether the range is done (an empty one
/// always is). A refusal clears `*supported`, so the mode is not asked for
/// again.
fn try_fallocate(
    file: &File,
    supported: &mut bool,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> std::result::Result<bool, IoError> {
    if len == 0 {
        return Ok(true);
    }
    if !*supported {
        return Ok(false);
    }
    match fallocate(file, mode, offset, len) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(&e) => {
            *supported = false;
            Ok(false)
        }
        Err(e) => Err(media(e)),
    }
}

impl SyncBackend for FileOps {
    fn info(&self) -> &BdevInfo {
        &self.inner.info
    }

    /// `pread`; through the aligned scratch buffer when `O_DIRECT` is on and
    /// `dst` (borrowed memory, e.g. a guest's) is not 4 KiB-aligned.
    fn read(&mut self, offset: u64, dst: &mut [u8]) -> IoResult {
        if !self.needs_bounce(dst) {
            return self.inner.file.read_exact_at(dst, offset).map_err(media);
        }
        let mut pos = offset;
        for dst in dst.chunks_mut(CHUNK) {
            let tmp = &mut self.scratch[..dst.len()];
            self.inner.file.read_exact_at(tmp, pos).map_err(media)?;
            dst.copy_from_slice(tmp);
            pos += dst.len() as u64;
        }
        Ok(())
    }

    /// `pwrite` (bounced like [`FileOps::read`] when needed), then
    /// `fdatasync` for `fua`.
    fn write(&mut self, offset: u64, src: &[u8], fua: bool) -> IoResult {
        if !self.needs_bounce(src) {
            self.inner.file.write_all_at(src, offset).map_err(media)?;
        } else {
            let mut pos = offset;
            for src in src.chunks(CHUNK) {
                let tmp = &mut self.scratch[..src.len()];
                tmp.copy_from_slice(src);
                self.inner.file.write_all_at(tmp, pos).map_err(media)?;
                pos += src.len() as u64;
            }
        }
        self.sync_if(fua)
    }

    /// Reads the file chunk by chunk into the scratch buffer and compares.
    fn compare(&mut self, offset: u64, want: &[u8]) -> IoResult {
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

    fn flush(&mut self) -> IoResult {
        self.sync_if(true)
    }

    /// Zeroes the range, then `fdatasync` for `fua`.
    fn write_zeroes(&mut self, offset: u64, len: u64, _dealloc: bool, fua: bool) -> IoResult {
        self.zero(offset, len)?;
        self.sync_if(fua)
    }

    /// Punch hole, else write zeroes.
    fn deallocate(&mut self, offset: u64, len: u64) -> IoResult {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match try_fallocate(&self.inner.file, &mut self.punch_hole_ok, mode, offset, len)? {
            true => Ok(()),
            false => self.write_zero_bytes(offset, len),
        }
    }

    /// `SEEK_DATA`/`SEEK_HOLE`: holes read as zeroes. (The file offset they
    /// move is not used by this backend, which reads and writes with
    /// `pread`/`pwrite`.)
    fn byte_status(&mut self, offset: u64, len: u64, out: &mut Vec<(u64, bool)>) -> bool {
        let fd = self.inner.file.as_raw_fd();
        let end = offset + len;
        let seek = |pos: u64, whence: libc::c_int| -> Option<std::result::Result<u64, i32>> {
            let pos = libc::off_t::try_from(pos).ok()?;
            // SAFETY: lseek only reads its integer arguments; the fd stays open while `self` is borrowed.
            let r = unsafe { libc::lseek(fd, pos, whence) };
            Some(if r < 0 {
                Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                Ok(r as u64)
            })
        };
        let mut pos = offset;
        while pos < end {
            let data = match seek(pos, libc::SEEK_DATA) {
                Some(Ok(d)) => d.min(end),
                // No data after `pos`: the rest is a hole.
                Some(Err(libc::ENXIO)) => end,
                _ => return false,
            };
            if data > pos {
                out.push((data - pos, false));
                pos = data;
                continue;
            }
            let hole = match seek(pos, libc::SEEK_HOLE) {
                Some(Ok(h)) => h.clamp(pos + 1, end),
                _ => return false,
            };
            out.push((hole - pos, true));
            pos = hole;
        }
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::conformance::{self, check_against_model, model_ops, pattern, read, run, write};
    use crate::IoOp;
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
            assert_eq!(write(&mut *q, 100, 8, &data, false), Ok(()));
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
        assert_eq!(write(&mut *q, 0, 1, &[9; 4096], true), Ok(()));
    }

    struct Keep;
    impl crate::BufOwner for Keep {}

    /// A borrowed buffer starting 512 bytes into `backing` (not 4 KiB-aligned).
    fn unaligned(backing: &mut [u8], len: usize) -> IoBuf {
        let p = std::ptr::NonNull::new(backing[512..].as_mut_ptr()).unwrap();
        assert!(backing.len() >= 512 + len);
        // SAFETY: the caller keeps `backing` alive and untouched until the buffer is dropped, and the range lies inside it (asserted).
        unsafe { IoBuf::from_owner(p, len, std::sync::Arc::new(Keep)) }
    }

    #[test]
    fn unaligned_borrowed_buffers_work_with_direct_io() {
        let path = TempPath::new("unaligned");
        let dev = FileBdev::open(&path.0, 512, Some(1 << 20)).unwrap();
        let mut q = dev.open_queue().unwrap();
        // Larger than the bounce chunk, so the chunked path runs more than once.
        let len = CHUNK * 2 + 1024;
        let data = pattern(len, 3);
        let mut wbacking = IoBuf::new(len + 4096);
        let mut wbuf = unaligned(&mut wbacking, len);
        wbuf.copy_from_slice(&data);
        let nlb = (len / 512) as u32;
        let op = IoOp::Write {
            lba: 5,
            nlb,
            fua: false,
        };
        assert_eq!(run(&mut *q, op, Some(wbuf)).result, Ok(()));
        let mut rbacking = IoBuf::new(len + 4096);
        let done = run(
            &mut *q,
            IoOp::Read { lba: 5, nlb },
            Some(unaligned(&mut rbacking, len)),
        );
        assert_eq!(done.result, Ok(()));
        assert_eq!(&done.buf.unwrap()[..], &data[..]);
        assert_eq!(read(&mut *q, 5, nlb, 512), data);
    }

    #[test]
    fn passes_every_conformance_check() {
        let path = TempPath::new("conformance");
        let dev = FileBdev::open(&path.0, 4096, Some(4096 * 512))
            .unwrap()
            .with_queue_depth(6);
        let expect = conformance::Expect {
            segments: true,
            queue_depth: Some(6),
            block_status_granularity: Some(16),
            model_cases: 8,
            ..Default::default()
        };
        conformance::check_all(&dev, &expect);
    }

    #[test]
    fn segmented_requests_are_bounced_through_one_buffer() {
        let path = TempPath::new("segments");
        let dev = FileBdev::open(&path.0, 4096, Some(4096 * 64)).unwrap();
        assert_eq!(dev.open_queue().unwrap().max_segments(), 1);
        conformance::segmented_requests_match_one_buffer(&dev);
    }

    #[test]
    fn block_status_reports_holes_of_a_sparse_file() {
        let path = TempPath::new("sparse");
        let dev = FileBdev::open(&path.0, 4096, Some(4096 * 512)).unwrap();
        // Filesystems allocate in blocks of up to 64 KiB around a write.
        conformance::block_status_follows_writes_and_deallocation(&dev, 16);
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
        assert_eq!(write(&mut *q, 1, 3, &data, true), Ok(()));
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
            assert_eq!(write(&mut *q, 7, 16, &data, true), Ok(()));
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
        conformance::rejects_out_of_range(&FileBdev::open(&path.0, 512, Some(16 * 512)).unwrap());
    }

    #[test]
    fn short_or_missing_buffer_is_bad_buffer() {
        let path = TempPath::new("shortbuf");
        let dev = FileBdev::open(&path.0, 4096, Some(16 * 4096)).unwrap();
        conformance::rejects_short_or_missing_buffer(&dev);
    }

    #[test]
    fn compare_reports_match_and_mismatch() {
        let path = TempPath::new("compare");
        let dev = FileBdev::open(&path.0, 512, Some(512 * 512)).unwrap();
        // Larger than the scratch chunk, so the comparison spans chunks.
        conformance::compare_reports_match_and_mismatch(&dev, 200);
    }

    #[test]
    fn full_queue_is_busy_until_polled() {
        let path = TempPath::new("busy");
        let dev = FileBdev::open(&path.0, 512, Some(8 * 512))
            .unwrap()
            .with_queue_depth(3);
        conformance::full_queue_is_busy_until_polled(&dev, 3);
    }

    #[test]
    fn deallocate_and_write_zeroes_read_back_zeroes() {
        let path = TempPath::new("zeroes");
        let dev = FileBdev::open(&path.0, 512, Some(64 * 512)).unwrap();
        let mut q = dev.open_queue().unwrap();
        conformance::zeroing_reads_back_zeroes(&mut *q, dev.info());
    }

    #[test]
    fn zeroing_without_fallocate_writes_zeroes() {
        let path = TempPath::new("nofalloc");
        let dev = FileBdev::open(&path.0, 512, Some(64 * 512)).unwrap();
        let mut q = SyncQueue::new(FileOps::new(Arc::clone(&dev.inner)), 8);
        q.backend.zero_range_ok = false;
        q.backend.punch_hole_ok = false;
        conformance::zeroing_reads_back_zeroes(&mut q, dev.info());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn random_operations_match_a_byte_model(ops in model_ops(48)) {
            let path = TempPath::new("model");
            let dev = FileBdev::open(&path.0, 512, Some(48 * 512)).unwrap();
            check_against_model(&dev, 48, &ops);
        }
    }
}
