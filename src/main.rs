//! `unvme`: the one binary. This file parses the command line and hands over
//! to library code; each subcommand's arguments live in its own module.

mod connect_args;
mod nbd_cmd;
mod panic_policy;
mod perf;
mod target_cmd;
mod tools;
#[cfg(feature = "vfio")]
mod vfio_env;
mod vhost_cmd;

use clap::{Parser, Subcommand};

/// User-space NVMe over TCP: target, poll-mode initiator and tools.
#[derive(Parser, Debug)]
#[command(name = "unvme", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `unvme_target=debug`.
    #[arg(long, global = true, env = "UNVME_LOG", default_value = "info")]
    log: String,

    /// Fault injection for tests: a thread that panics after this many
    /// milliseconds (the panic policy ends the process with status 70).
    #[arg(long, global = true, hide = true)]
    fault_panic_ms: Option<u64>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve NVMe/TCP subsystems (and the discovery subsystem).
    Target(Box<target_cmd::TargetArgs>),
    /// Measure IOPS, bandwidth and latency against an NVMe/TCP namespace.
    Perf(perf::PerfArgs),
    /// Print a discovery service's log page (like `nvme discover`).
    Discover(tools::DiscoverArgs),
    /// Print Identify Controller / Namespace data (like `nvme id-ctrl`/`id-ns`).
    Identify(tools::IdentifyArgs),
    /// Export a remote NVMe/TCP namespace (or a local device) over NBD.
    Nbd(nbd_cmd::NbdArgs),
    /// Export a remote NVMe/TCP namespace (or a local device) to QEMU as vhost-user-blk.
    #[command(name = "vhost-blk")]
    VhostBlk(vhost_cmd::VhostArgs),
}

fn main() {
    panic_policy::install();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[cfg(feature = "vfio")]
    vfio_env::register();
    if let Some(ms) = cli.fault_panic_ms {
        panic_policy::inject(ms);
    }
    let result = match cli.command {
        Command::Target(a) => target_cmd::run(*a),
        Command::Perf(a) => perf::run(a),
        Command::Discover(a) => tools::discover(a),
        Command::Identify(a) => tools::identify(a),
        Command::Nbd(a) => nbd_cmd::run(a),
        Command::VhostBlk(a) => vhost_cmd::run(a),
    };
    if let Err(e) = result {
        eprintln!("unvme: {e:#}");
        std::process::exit(1);
    }
}
