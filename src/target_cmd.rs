//! `unvme target`: serve NVMe/TCP subsystems until SIGINT/SIGTERM.

use std::net::SocketAddr;

use unvme_target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};

/// Arguments of `unvme target`. With none, it serves a 1 GiB RAM namespace
/// as `nqn.2024-11.io.unvme:default` on 127.0.0.1:4420 (plus discovery).
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// TOML configuration file (flags given as well override its values).
    #[arg(long, short = 'c')]
    config: Option<std::path::PathBuf>,
    /// Address to listen on (repeatable). Default 127.0.0.1:4420.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Subsystem NQN for the namespaces given by --ram/--null/--file/--ns.
    #[arg(long, default_value = unvme_proto::DEFAULT_SUBNQN)]
    nqn: String,
    /// RAM namespace of SIZE (e.g. 1G) (repeatable).
    #[arg(long, value_name = "SIZE")]
    ram: Vec<String>,
    /// Null namespace of SIZE: writes discarded, reads untouched (repeatable).
    #[arg(long, value_name = "SIZE")]
    null: Vec<String>,
    /// File-backed namespace: PATH[:BS][:create=SIZE] (repeatable).
    #[arg(long, value_name = "PATH")]
    file: Vec<String>,
    /// NVMe controller bound to vfio-pci, served through the user-space
    /// VFIO driver: DDDD:BB:DD.F[:NSID] (repeatable; adds `vfio:ADDR`).
    #[cfg(feature = "vfio")]
    #[arg(long, value_name = "PCI_ADDR")]
    vfio: Vec<String>,
    /// Namespace by backend spec (ram:SIZE[:BS], null:SIZE[:BS], file:PATH…) (repeatable).
    #[arg(long, value_name = "SPEC")]
    ns: Vec<String>,
    /// Host NQN allowed to connect (repeatable; default: any host).
    #[arg(long, value_name = "HOSTNQN")]
    allow_host: Vec<String>,
    /// Serial number.
    #[arg(long)]
    serial: Option<String>,
    /// Model number.
    #[arg(long)]
    model: Option<String>,
    /// Reactor threads (default: one per CPU this process may run on).
    #[arg(long)]
    reactors: Option<usize>,
    /// CPUs to pin reactors to, e.g. `0,1` (reactor i → i-th CPU).
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// In-capsule data size for I/O queues, bytes.
    #[arg(long)]
    in_capsule: Option<u32>,
    /// MAXH2CDATA, bytes.
    #[arg(long)]
    max_h2c_data: Option<u32>,
    /// Maximum data transfer size, bytes (MDTS).
    #[arg(long)]
    max_transfer: Option<u32>,
    /// Maximum queue size (entries) per queue pair.
    #[arg(long)]
    queue_size: Option<u16>,
    /// Maximum I/O queues per controller.
    #[arg(long)]
    io_queues: Option<u16>,
    /// Microseconds a reactor spins without work before sleeping.
    #[arg(long)]
    spin_us: Option<u64>,
}

fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Builds the configuration from the file and flags.
fn build_config(a: &TargetArgs) -> Result<TargetConfig, Box<dyn std::error::Error>> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            TargetConfig::from_toml(&text)?
        }
        None => TargetConfig {
            reactors: available_cpus(),
            ..Default::default()
        },
    };
    let mut specs: Vec<String> = Vec::new();
    specs.extend(a.ram.iter().map(|s| format!("ram:{s}")));
    specs.extend(a.null.iter().map(|s| format!("null:{s}")));
    specs.extend(a.file.iter().map(|s| format!("file:{s}")));
    #[cfg(feature = "vfio")]
    specs.extend(a.vfio.iter().map(|s| format!("vfio:{s}")));
    specs.extend(a.ns.iter().cloned());
    if !specs.is_empty() {
        let namespaces = specs
            .into_iter()
            .map(|bdev| NamespaceConfig { bdev, nsid: None })
            .collect();
        match cfg.subsystems.iter_mut().find(|s| s.nqn == a.nqn) {
            Some(s) => s.namespaces.extend::<Vec<_>>(namespaces),
            None => cfg.subsystems.push(SubsystemConfig {
                nqn: a.nqn.clone(),
                serial: a
                    .serial
                    .clone()
                    .unwrap_or_else(|| "UNVME0000000000001".into()),
                model: a.model.clone().unwrap_or_else(|| "unvme target".into()),
                allowed_hosts: a.allow_host.clone(),
                namespaces,
            }),
        }
    } else if cfg.subsystems.is_empty() {
        let mut d = TargetConfig::default_ram();
        if let Some(s) = d.subsystems.first_mut() {
            s.allowed_hosts = a.allow_host.clone();
            s.nqn = a.nqn.clone();
        }
        cfg.subsystems = d.subsystems;
    }
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    if let Some(n) = a.reactors {
        cfg.reactors = n;
    }
    if a.cpus.is_some() {
        cfg.cpus = a.cpus.clone();
        if a.reactors.is_none() && a.config.is_none() {
            cfg.reactors = a.cpus.as_ref().map_or(1, |c| c.len().max(1));
        }
    }
    if let Some(v) = a.in_capsule {
        cfg.in_capsule_data_size = v;
    }
    if let Some(v) = a.max_h2c_data {
        cfg.max_h2c_data = v;
    }
    if let Some(v) = a.max_transfer {
        cfg.max_transfer_size = v;
    }
    if let Some(v) = a.queue_size {
        cfg.max_queue_size = v;
    }
    if let Some(v) = a.io_queues {
        cfg.max_io_queues = v;
    }
    if let Some(v) = a.spin_us {
        cfg.spin_us = v;
    }
    Ok(cfg)
}

/// Runs the target until SIGINT/SIGTERM, then flushes the backends.
pub fn run(a: TargetArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = build_config(&a)?;
    for s in &cfg.subsystems {
        tracing::info!(subnqn = %s.nqn, namespaces = s.namespaces.len(), "subsystem");
    }
    tracing::info!(reactors = cfg.reactors, spin_us = cfg.spin_us, "starting");
    let target = Target::start(cfg)?;
    let stop = target.stop_flag();
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop)?;
    target.wait();
    Ok(())
}
