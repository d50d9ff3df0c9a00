//! `unvme vhost-blk`: export a block device to a QEMU guest as a
//! vhost-user-blk disk until SIGINT/SIGTERM.
//!
//! The source is a local device (`--ram`, `--file`) or, when neither is
//! given, a namespace of a remote NVMe/TCP controller (`--nsid`, default 1,
//! with the connection arguments of `unvme perf`). Each virtqueue gets its
//! own device queue, so with a remote source its own NVMe/TCP queue pair.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use unvme_bdev::Bdev;
use unvme_initiator::RemoteNamespace;
use unvme_vhost_blk::{DeviceOptions, Server, ServerConfig, SocketOptions};

use crate::connect_args::ConnectArgs;

/// Arguments of `unvme vhost-blk`.
#[derive(clap::Args, Debug)]
pub struct VhostArgs {
    /// vhost-user Unix socket to listen on (replaced if it exists).
    /// Whoever can connect to it has the whole disk.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Permission bits of the socket, in octal (connecting needs write
    /// permission).
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group of the socket (a name or a numeric gid), e.g. QEMU's, with
    /// --socket-mode 0660 (default: this process's group).
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Milliseconds a new connection has to send its first message before
    /// it is dropped (one frontend is served at a time, so a silent peer
    /// would keep QEMU out).
    #[arg(long, value_name = "MS", default_value_t = unvme_vhost_blk::DEFAULT_FIRST_MESSAGE_TIMEOUT.as_millis() as u64)]
    first_message_timeout_ms: u64,
    /// Export a RAM disk of SIZE (e.g. 1G, or 1G:4096 for 4 KiB blocks).
    #[arg(long, value_name = "SIZE", conflicts_with = "file")]
    ram: Option<String>,
    /// Export a file: PATH[:BS][:create=SIZE].
    #[arg(long, value_name = "PATH")]
    file: Option<String>,
    /// Remote namespace to export (when neither --ram nor --file is given).
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    #[command(flatten)]
    conn: ConnectArgs,
    /// Number of virtqueues, each served by its own thread and device queue.
    #[arg(long, default_value_t = 1)]
    num_queues: u16,
    /// Largest virtqueue size the frontend may configure.
    #[arg(long, default_value_t = 1024)]
    max_queue_size: u16,
    /// Offer a read-only disk (VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// Spin on the virtqueues without ever sleeping (lowest latency, one
    /// busy core per queue).
    #[arg(long)]
    poll: bool,
    /// Microseconds an idle queue thread spins before sleeping on its kick
    /// eventfd (without --poll).
    #[arg(long, default_value_t = 100)]
    spin_us: u64,
    /// GET_ID serial (default: a remote controller's serial number, else the
    /// device name; truncated to 20 bytes).
    #[arg(long)]
    serial: Option<String>,
    /// Copy request data between guest memory and a buffer instead of
    /// handing the guest's pages to the device queue (zero copy, the
    /// default, applies to requests whose data is contiguous in host memory).
    #[arg(long)]
    no_zero_copy: bool,
}

/// `0600`, `600` or `0o600`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?}: permission bits in octal, 0 to 0777")),
    }
}

/// A numeric gid, or a group name looked up in the group database.
fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("{s:?}: not a group name"))?;
    // SAFETY: group is plain old data; all zeroes is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; `grp`, `buf` (of its length) and `out` are valid for writes for the duration of the call.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if r == 0 && !out.is_null() {
        Ok(grp.gr_gid)
    } else {
        Err(format!("{s:?}: no such group"))
    }
}

/// The device and the GET_ID serial it suggests (a remote namespace: its
/// controller's serial number).
type Source = (Arc<dyn Bdev>, Option<String>);

fn source(a: &VhostArgs) -> Result<Source, Box<dyn std::error::Error>> {
    if let Some(s) = &a.ram {
        return Ok((unvme_bdev::from_spec(&format!("ram:{s}"))?, None));
    }
    if let Some(f) = &a.file {
        return Ok((unvme_bdev::from_spec(&format!("file:{f}"))?, None));
    }
    let paths = a.conn.paths()?;
    let opts = &paths[0];
    let ns = RemoteNamespace::open_multipath(&paths, a.nsid, a.conn.iopolicy)?;
    tracing::info!(
        nqn = %opts.subnqn,
        nsid = a.nsid,
        paths = paths.len(),
        addr = %opts.addr,
        port = opts.port,
        "remote namespace"
    );
    let sn = ns
        .controller()
        .map(|c| c.identify().sn.trim().to_string())
        .unwrap_or_default();
    Ok((Arc::new(ns), (!sn.is_empty()).then_some(sn)))
}

/// Runs the device until SIGINT/SIGTERM.
pub fn run(a: VhostArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (bdev, serial) = source(&a)?;
    let serial_log = serial.clone();
    let info = bdev.info().clone();
    let cfg = ServerConfig {
        socket: a.socket.clone(),
        bdev: bdev.clone(),
        device: DeviceOptions {
            num_queues: a.num_queues,
            max_queue_size: a.max_queue_size,
            read_only: a.read_only,
            poll: a.poll,
            spin: Duration::from_micros(a.spin_us),
            serial: a.serial.clone().or(serial),
            zero_copy: !a.no_zero_copy,
        },
        listen: SocketOptions {
            mode: a.socket_mode,
            group: a.socket_group,
            first_message_timeout: Duration::from_millis(a.first_message_timeout_ms),
        },
    };
    let server = Server::start(cfg)?;
    tracing::info!(
        device = %info.name,
        bytes = info.size_bytes(),
        block_size = info.block_size,
        queues = a.num_queues,
        serial = a.serial.as_deref().or(serial_log.as_deref()).unwrap_or(&info.name),
        features = format_args!("{:#x}", server.geometry().features()),
        "vhost-user-blk device"
    );
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    while !stop.load(Ordering::Relaxed) && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = server.shutdown();
    bdev.flush_all()?;
    tracing::info!("stopped");
    Ok(r?)
}
