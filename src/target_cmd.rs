//! `unvme target`: serve NVMe/TCP subsystems until SIGINT/SIGTERM.

use std::net::SocketAddr;

use unvme_target::{
    parse_ana_state, AnaState, NamespaceConfig, SubsystemConfig, Target, TargetConfig,
};

/// Arguments of `unvme target`. With none, it serves a 1 GiB RAM namespace
/// as `nqn.2024-11.io.unvme:default` on 127.0.0.1:4420 (plus discovery).
///
/// Every flag applies together with `--config`: each one's help says
/// whether it overrides the file's value or adds to it, and a combination
/// that cannot mean one thing is refused with an error.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// TOML configuration file; the flags below apply on top of it.
    #[arg(long, short = 'c')]
    config: Option<std::path::PathBuf>,
    /// Address to listen on (repeatable). Default 127.0.0.1:4420. Replaces
    /// the file's `listen` list.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Subsystem the namespace flags (--ram/--null/--file/--ns) add to, and
    /// --allow-host/--serial/--model apply to [default:
    /// nqn.2024-11.io.unvme:default for namespace flags]. With --config, a
    /// subsystem of the file of that NQN is extended, else the namespace
    /// flags create it; an NQN that names neither is an error.
    #[arg(long)]
    nqn: Option<String>,
    /// RAM namespace of SIZE (e.g. 1G) (repeatable; added to --nqn's subsystem).
    #[arg(long, value_name = "SIZE")]
    ram: Vec<String>,
    /// Null namespace of SIZE: writes discarded, reads untouched (repeatable;
    /// added to --nqn's subsystem).
    #[arg(long, value_name = "SIZE")]
    null: Vec<String>,
    /// File-backed namespace: PATH[:BS][:create=SIZE] (repeatable; added to
    /// --nqn's subsystem).
    #[arg(long, value_name = "PATH")]
    file: Vec<String>,
    /// NVMe controller bound to vfio-pci, served through the user-space
    /// VFIO driver: DDDD:BB:DD.F[:NSID] (repeatable; adds `vfio:ADDR` to
    /// --nqn's subsystem).
    #[cfg(feature = "vfio")]
    #[arg(long, value_name = "PCI_ADDR")]
    vfio: Vec<String>,
    /// Namespace by backend spec (ram:SIZE[:BS], null:SIZE[:BS], file:PATH…)
    /// (repeatable; added to --nqn's subsystem).
    #[arg(long, value_name = "SPEC")]
    ns: Vec<String>,
    /// Host NQN allowed to connect (repeatable; default: any host). Added to
    /// the `allowed_hosts` of --nqn's subsystem, or without --nqn of every
    /// subsystem: once given, only listed hosts may connect.
    #[arg(long, value_name = "HOSTNQN")]
    allow_host: Vec<String>,
    /// Serial number of --nqn's subsystem (or of the only one); replaces the file's.
    #[arg(long)]
    serial: Option<String>,
    /// Model number of --nqn's subsystem (or of the only one); replaces the file's.
    #[arg(long)]
    model: Option<String>,
    /// ANA state of every ANA group on every listener of this process:
    /// optimized, non-optimized, inaccessible, persistent-loss or change
    /// [default: optimized]. Replaces the file's `ana_state` and the
    /// `ana_state` of each of its `listeners` (their per-group `ana_groups`
    /// stay).
    #[arg(long, value_name = "STATE", value_parser = ana_state_arg)]
    ana_state: Option<AnaState>,
    /// ANA group of the namespace the namespace flags add (one namespace
    /// flag only) [default: 1].
    #[arg(long, value_name = "GRPID")]
    ana_group: Option<u32>,
    /// NGUID of the namespace the namespace flags add (one only): 32 hex
    /// digits. Give two target processes that export one namespace the
    /// same one (multipath).
    #[arg(long, value_name = "HEX")]
    nguid: Option<String>,
    /// UUID of the namespace the namespace flags add (one only).
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// EUI-64 of the namespace the namespace flags add (one only): 16 hex digits.
    #[arg(long, value_name = "HEX")]
    eui64: Option<String>,
    /// Lowest controller ID handed out in --nqn's subsystem (or in every
    /// subsystem) [default: 1]. Two processes exporting one subsystem NQN
    /// need disjoint --cntlid-min..--cntlid-max ranges. Replaces the
    /// file's `cntlid_min`.
    #[arg(long, value_name = "ID")]
    cntlid_min: Option<u16>,
    /// Highest controller ID handed out [default: 65519 (FFEFh)]. Replaces
    /// the file's `cntlid_max`.
    #[arg(long, value_name = "ID")]
    cntlid_max: Option<u16>,
    /// Reactor threads (default: one per CPU this process may run on, or
    /// one per --cpus entry). Replaces the file's `reactors`.
    #[arg(long)]
    reactors: Option<usize>,
    /// CPUs to pin reactors to, e.g. `0,1` (reactor i → i-th CPU). Replaces
    /// the file's `cpus`.
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// In-capsule data size for I/O queues, bytes [default: 8192]. Replaces
    /// the file's `in_capsule_data_size`.
    #[arg(long)]
    in_capsule: Option<u32>,
    /// MAXH2CDATA, bytes [default: 131072]. Replaces the file's `max_h2c_data`.
    #[arg(long)]
    max_h2c_data: Option<u32>,
    /// Maximum data transfer size, bytes (MDTS) [default: 1048576]. Replaces
    /// the file's `max_transfer_size`.
    #[arg(long)]
    max_transfer: Option<u32>,
    /// Maximum queue size (entries) per queue pair [default: 128]. Replaces
    /// the file's `max_queue_size`.
    #[arg(long)]
    queue_size: Option<u16>,
    /// Maximum I/O queues per controller [default: 64]. Replaces the file's
    /// `max_io_queues`.
    #[arg(long)]
    io_queues: Option<u16>,
    /// Most live controllers one host NQN may have in one subsystem; a
    /// Connect beyond it gets Connect Controller Busy [default: 16].
    /// Replaces the file's `max_controllers_per_host`.
    #[arg(long, value_name = "N")]
    max_ctrls_per_host: Option<usize>,
    /// Microseconds a reactor spins without work before sleeping [default:
    /// 1000]. Replaces the file's `spin_us`.
    #[arg(long)]
    spin_us: Option<u64>,
    /// Connections one reactor serves; at the limit the oldest socket that
    /// has not completed Connect is evicted [default: 1024]. Replaces the
    /// file's `max_connections_per_reactor`.
    #[arg(long, value_name = "N")]
    max_conns_per_reactor: Option<usize>,
    /// Bytes one connection may hold for unfinished transfers (R2T writes
    /// waiting for data, reads not yet sent); more wait [default: 8 MiB].
    /// Replaces the file's `max_transfer_bytes_per_connection`.
    #[arg(long, value_name = "BYTES")]
    max_conn_transfer: Option<usize>,
    /// The same for all I/O connections of one reactor [default: 64 MiB].
    /// Replaces the file's `max_transfer_bytes_per_reactor`.
    #[arg(long, value_name = "BYTES")]
    max_reactor_transfer: Option<usize>,
    /// Queued response bytes above which a connection is not read until its
    /// host drains them [default: 64 KiB]. Replaces the file's
    /// `max_send_queue_bytes`.
    #[arg(long, value_name = "BYTES")]
    max_send_queue: Option<usize>,
    /// Bytes read from one connection per reactor turn [default: 256 KiB].
    /// Replaces the file's `turn_budget_bytes`.
    #[arg(long, value_name = "BYTES")]
    turn_budget: Option<usize>,
    /// Milliseconds from accept to ICReq [default: 10000]. Replaces the
    /// file's `icreq_timeout_ms`.
    #[arg(long, value_name = "MS")]
    icreq_timeout_ms: Option<u64>,
    /// Milliseconds from accept to a successful Connect [default: 10000].
    /// Replaces the file's `connect_timeout_ms`.
    #[arg(long, value_name = "MS")]
    connect_timeout_ms: Option<u64>,
    /// Milliseconds a connection may hold transfer budget with no data
    /// moving [default: 10000]. Replaces the file's `transfer_timeout_ms`.
    #[arg(long, value_name = "MS")]
    transfer_timeout_ms: Option<u64>,
}

fn ana_state_arg(s: &str) -> Result<AnaState, String> {
    parse_ana_state(s).map_err(|e| e.to_string())
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
            TargetConfig::from_toml(&text).map_err(|e| format!("{}: {e}", p.display()))?
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
    let nqn = a.nqn.as_deref().unwrap_or(unvme_proto::DEFAULT_SUBNQN);
    let ns_opts =
        a.ana_group.is_some() || a.nguid.is_some() || a.uuid.is_some() || a.eui64.is_some();
    if ns_opts && specs.len() != 1 {
        return Err(format!(
            "--ana-group/--nguid/--uuid/--eui64 apply to the one namespace a namespace flag adds, \
             and {} are given: use the TOML file's namespace keys",
            specs.len()
        )
        .into());
    }
    if !specs.is_empty() {
        let namespaces = specs.into_iter().map(|bdev| NamespaceConfig {
            ana_group: a.ana_group.unwrap_or(1),
            nguid: a.nguid.clone(),
            uuid: a.uuid.clone(),
            eui64: a.eui64.clone(),
            ..NamespaceConfig::new(bdev)
        });
        match cfg.subsystems.iter_mut().find(|s| s.nqn == nqn) {
            Some(s) => s.namespaces.extend(namespaces),
            None => {
                let mut s = new_subsystem(nqn);
                s.namespaces.extend(namespaces);
                cfg.subsystems.push(s);
            }
        }
    } else if cfg.subsystems.is_empty() {
        let mut d = TargetConfig::default_ram();
        for s in &mut d.subsystems {
            s.nqn = nqn.to_string();
        }
        cfg.subsystems = d.subsystems;
    }
    apply_subsystem_flags(a, &mut cfg)?;
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    if let Some(st) = a.ana_state {
        cfg.ana_state = st;
        for l in &mut cfg.listeners {
            l.ana_state = Some(st);
        }
    }
    if let Some(n) = a.reactors {
        cfg.reactors = n;
    }
    if let Some(cpus) = &a.cpus {
        cfg.cpus = Some(cpus.clone());
        if a.reactors.is_none() && a.config.is_none() {
            cfg.reactors = cpus.len().max(1);
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
    if let Some(v) = a.max_ctrls_per_host {
        cfg.max_controllers_per_host = v;
    }
    if let Some(v) = a.spin_us {
        cfg.spin_us = v;
    }
    let limits: [(Option<usize>, &mut usize); 5] = [
        (
            a.max_conns_per_reactor,
            &mut cfg.max_connections_per_reactor,
        ),
        (
            a.max_conn_transfer,
            &mut cfg.max_transfer_bytes_per_connection,
        ),
        (
            a.max_reactor_transfer,
            &mut cfg.max_transfer_bytes_per_reactor,
        ),
        (a.max_send_queue, &mut cfg.max_send_queue_bytes),
        (a.turn_budget, &mut cfg.turn_budget_bytes),
    ];
    for (flag, field) in limits {
        if let Some(v) = flag {
            *field = v;
        }
    }
    let timeouts: [(Option<u64>, &mut u64); 3] = [
        (a.icreq_timeout_ms, &mut cfg.icreq_timeout_ms),
        (a.connect_timeout_ms, &mut cfg.connect_timeout_ms),
        (a.transfer_timeout_ms, &mut cfg.transfer_timeout_ms),
    ];
    for (flag, field) in timeouts {
        if let Some(v) = flag {
            *field = v;
        }
    }
    Ok(cfg)
}

/// A subsystem created by namespace flags, with the default serial and model.
fn new_subsystem(nqn: &str) -> SubsystemConfig {
    SubsystemConfig::new(nqn)
}

/// Applies --allow-host, --serial and --model: to --nqn's subsystem, which
/// must exist by now, or without --nqn to every subsystem (--serial and
/// --model only where there is exactly one).
fn apply_subsystem_flags(
    a: &TargetArgs,
    cfg: &mut TargetConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let selected: Vec<&mut SubsystemConfig> = match &a.nqn {
        Some(nqn) => {
            let Some(s) = cfg.subsystems.iter_mut().find(|s| &s.nqn == nqn) else {
                return Err(format!(
                    "--nqn {nqn}: no such subsystem in the configuration, and no namespace flag \
                     (--ram/--null/--file/--ns) creates it"
                )
                .into());
            };
            vec![s]
        }
        None => cfg.subsystems.iter_mut().collect(),
    };
    let n = selected.len();
    if (a.serial.is_some() || a.model.is_some()) && n != 1 {
        return Err(format!(
            "--serial/--model apply to one subsystem and the configuration has {n}: name it with --nqn"
        )
        .into());
    }
    for s in selected {
        for h in &a.allow_host {
            if !s.allowed_hosts.contains(h) {
                s.allowed_hosts.push(h.clone());
            }
        }
        if let Some(v) = &a.serial {
            s.serial = v.clone();
        }
        if let Some(v) = &a.model {
            s.model = v.clone();
        }
        if let Some(v) = a.cntlid_min {
            s.cntlid_min = v;
        }
        if let Some(v) = a.cntlid_max {
            s.cntlid_max = v;
        }
    }
    Ok(())
}

/// Runs the target until SIGINT/SIGTERM, then flushes the backends.
pub fn run(a: TargetArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = build_config(&a)?;
    for s in &cfg.subsystems {
        let hosts = if s.allowed_hosts.is_empty() {
            "any".to_string()
        } else {
            s.allowed_hosts.join(",")
        };
        tracing::info!(subnqn = %s.nqn, namespaces = s.namespaces.len(), serial = %s.serial, model = %s.model, allowed_hosts = %hosts, cntlid_min = s.cntlid_min, cntlid_max = s.cntlid_max, "subsystem");
    }
    let cpus = cfg.cpus.as_ref().map_or_else(
        || "any".to_string(),
        |c| {
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        },
    );
    tracing::info!(
        reactors = cfg.reactors,
        cpus = %cpus,
        in_capsule = cfg.in_capsule_data_size,
        max_h2c_data = cfg.max_h2c_data,
        max_transfer = cfg.max_transfer_size,
        queue_size = cfg.max_queue_size,
        io_queues = cfg.max_io_queues,
        max_ctrls_per_host = cfg.max_controllers_per_host,
        spin_us = cfg.spin_us,
        max_conns_per_reactor = cfg.max_connections_per_reactor,
        max_conn_transfer = cfg.max_transfer_bytes_per_connection,
        max_reactor_transfer = cfg.max_transfer_bytes_per_reactor,
        max_send_queue = cfg.max_send_queue_bytes,
        turn_budget = cfg.turn_budget_bytes,
        icreq_timeout_ms = cfg.icreq_timeout_ms,
        connect_timeout_ms = cfg.connect_timeout_ms,
        transfer_timeout_ms = cfg.transfer_timeout_ms,
        ana_state = %unvme_target::ana_state_name(cfg.ana_state),
        "starting"
    );
    let target = Target::start(cfg)?;
    let stop = target.stop_flag();
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop)?;
    target.wait();
    Ok(())
}
