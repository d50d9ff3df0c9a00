//! `unvme nbd`: export block devices over NBD until SIGINT/SIGTERM.
//!
//! Sources are local devices (`--ram`, `--file`) or, when none is given,
//! namespaces of a remote NVMe/TCP controller (`--nsid`, default 1, with the
//! connection arguments of `unvme perf`). Each NBD connection gets its own
//! device queue, so with a remote source its own NVMe/TCP queue pair.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use unvme_bdev::Bdev;
use unvme_initiator::RemoteNamespace;
use unvme_nbd::{Export, Limits, Listen, Server, ServerConfig, ServerDefaults};

use crate::connect_args::ConnectArgs;

/// The server's defaults (the `--help` text shows them).
const DEFAULTS: ServerDefaults = ServerDefaults::new();

/// Default NBD port (IANA).
const NBD_PORT: u16 = 10809;

/// Arguments of `unvme nbd`.
#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    /// TCP address to listen on (repeatable). Default 127.0.0.1:10809, unless
    /// only --unix is given.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Unix socket to listen on (repeatable).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Export name for each source, in order (--ram, then --file, then each
    /// --nsid). Unnamed exports are named after their device (`ram:1G`, or
    /// `NQN/nsN` for a remote namespace); the first also answers to "".
    #[arg(long, value_name = "NAME")]
    export: Vec<String>,
    /// Export description (all exports).
    #[arg(long)]
    description: Option<String>,
    /// Export a RAM disk of SIZE (e.g. 1G, or 1G:4096 for 4 KiB blocks) (repeatable).
    #[arg(long, value_name = "SIZE")]
    ram: Vec<String>,
    /// Export a file: PATH[:BS][:create=SIZE] (repeatable).
    #[arg(long, value_name = "PATH")]
    file: Vec<String>,
    /// Remote namespace to export (repeatable; default 1 when no --ram/--file).
    #[arg(long)]
    nsid: Vec<u32>,
    #[command(flatten)]
    conn: ConnectArgs,
    /// Export read-only (writes fail with EPERM).
    #[arg(long)]
    read_only: bool,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = Limits::default().max_inflight)]
    max_inflight: usize,
    /// Data bytes of READ/WRITE requests in flight per connection (declared
    /// lengths; memory is taken as WRITE payload arrives).
    #[arg(long, default_value_t = Limits::default().max_inflight_bytes)]
    max_inflight_bytes: usize,
    /// Bytes of data buffers all connections together may hold; a
    /// connection that would exceed it waits. Memory stays under this plus
    /// about 1 MiB per connection.
    #[arg(long, default_value_t = DEFAULTS.max_buffer_bytes)]
    max_buffer_bytes: usize,
    /// Bytes of idle buffers a connection keeps for reuse (returned after
    /// --pool-idle-ms with nothing in flight).
    #[arg(long, default_value_t = Limits::default().pool_bytes)]
    pool_bytes: usize,
    /// Milliseconds with nothing in flight after which a connection returns
    /// its buffer pool.
    #[arg(long, default_value_t = Limits::default().pool_idle.as_millis() as u64)]
    pool_idle_ms: u64,
    /// Seconds a client may leave the server's replies unread (its socket
    /// full) before the connection is closed.
    #[arg(long, default_value_t = Limits::default().send_timeout.as_secs())]
    send_timeout_s: u64,
    /// Negotiated connections served at once; a client finishing the
    /// handshake beyond this is refused.
    #[arg(long, default_value_t = DEFAULTS.max_connections)]
    max_connections: usize,
    /// Connections in the handshake at once (they never take a negotiated
    /// slot); a new one beyond this evicts the oldest still negotiating.
    #[arg(long, default_value_t = DEFAULTS.max_handshakes)]
    max_handshakes: usize,
    /// Milliseconds a client has for the whole handshake.
    #[arg(long, default_value_t = DEFAULTS.handshake_timeout.as_millis() as u64)]
    handshake_timeout_ms: u64,
    /// Microseconds a connection spins on an idle socket before sleeping.
    #[arg(long, default_value_t = Limits::default().spin.as_micros() as u64)]
    spin_us: u64,
}

/// A device to export and its default description.
type Source = (Arc<dyn Bdev>, String);

fn sources(a: &NbdArgs) -> Result<Vec<Source>, Box<dyn std::error::Error>> {
    let mut v: Vec<Source> = Vec::new();
    for s in &a.ram {
        v.push((
            unvme_bdev::from_spec(&format!("ram:{s}"))?,
            "unvme RAM disk".into(),
        ));
    }
    for f in &a.file {
        v.push((
            unvme_bdev::from_spec(&format!("file:{f}"))?,
            "unvme file".into(),
        ));
    }
    if v.is_empty() || !a.nsid.is_empty() {
        let paths = a.conn.paths()?;
        let opts = &paths[0];
        let nsids = if a.nsid.is_empty() {
            vec![1]
        } else {
            a.nsid.clone()
        };
        for nsid in nsids {
            let ns = RemoteNamespace::open_multipath(&paths, nsid, a.conn.iopolicy)?;
            tracing::info!(
                nqn = %opts.subnqn,
                nsid,
                paths = paths.len(),
                addr = %opts.addr,
                port = opts.port,
                "remote namespace"
            );
            let desc = format!(
                "NVMe/TCP {}:{} {} namespace {nsid}",
                opts.addr, opts.port, opts.subnqn
            );
            v.push((Arc::new(ns), desc));
        }
    }
    Ok(v)
}

/// Runs the NBD server until SIGINT/SIGTERM.
pub fn run(a: NbdArgs) -> Result<(), Box<dyn std::error::Error>> {
    let srcs = sources(&a)?;
    if a.export.len() > srcs.len() {
        return Err(format!(
            "{} --export names for {} sources",
            a.export.len(),
            srcs.len()
        )
        .into());
    }
    let exports = srcs
        .into_iter()
        .enumerate()
        .map(|(i, (bdev, desc))| {
            let dev_name = bdev.info().name.clone();
            let (name, aliases) = match a.export.get(i) {
                Some(n) if *n != dev_name => (n.clone(), vec![dev_name]),
                _ => (dev_name, Vec::new()),
            };
            Export {
                name,
                aliases,
                description: a.description.clone().unwrap_or(desc),
                bdev,
                read_only: a.read_only,
            }
        })
        .collect();
    let mut listen: Vec<Listen> = a.listen.iter().copied().map(Listen::Tcp).collect();
    listen.extend(a.unix.iter().cloned().map(Listen::Unix));
    if a.listen.is_empty() && a.unix.is_empty() {
        listen.push(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], NBD_PORT))));
    }
    let mut cfg = ServerConfig::new(listen, exports);
    cfg.limits = Limits {
        max_inflight: a.max_inflight.max(1),
        max_inflight_bytes: a.max_inflight_bytes.max(1 << 20),
        pool_bytes: a.pool_bytes,
        pool_idle: Duration::from_millis(a.pool_idle_ms),
        send_timeout: Duration::from_secs(a.send_timeout_s.max(1)),
        spin: Duration::from_micros(a.spin_us),
    };
    cfg.max_connections = a.max_connections.max(1);
    cfg.max_handshakes = a.max_handshakes.max(1);
    cfg.handshake_timeout = Duration::from_millis(a.handshake_timeout_ms.max(1));
    cfg.max_buffer_bytes = a.max_buffer_bytes.max(1 << 20);
    let server = Server::start(cfg)?;
    let stop = server.stop_flag();
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop)?;
    server.wait();
    tracing::info!("stopped");
    Ok(())
}
