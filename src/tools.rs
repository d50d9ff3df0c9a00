//! `unvme discover` and `unvme identify`: read-only views of a target, in
//! the format of `nvme discover` and `nvme id-ctrl`/`id-ns`.

use serde_json::{json, Value};
use unvme_initiator::{ConnectOptions, Controller};
use unvme_proto::admin::{IdentifyController, IdentifyNamespace, NsIdDescriptor};
use unvme_proto::discovery::{
    DiscoveryLogEntry, ADRFAM_FC, ADRFAM_IB, ADRFAM_INTRA_HOST, ADRFAM_IPV4, ADRFAM_IPV6,
    SECTYPE_NONE, SUBTYPE_CURRENT_DISCOVERY, SUBTYPE_NVME, SUBTYPE_REFERRAL, TREQ_NOT_REQUIRED,
    TREQ_NOT_SPECIFIED, TREQ_REQUIRED, TREQ_SECURE_CHANNEL_MASK, TRTYPE_FC, TRTYPE_INTRA_HOST,
    TRTYPE_RDMA, TRTYPE_TCP,
};

use crate::connect_args::ConnectArgs;

type BoxErr = Box<dyn std::error::Error>;

/// Arguments of `unvme discover`.
#[derive(clap::Args, Debug)]
pub struct DiscoverArgs {
    /// Discovery controller address.
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
    /// Discovery controller port.
    #[arg(long, default_value_t = unvme_proto::DEFAULT_PORT)]
    port: u16,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Arguments of `unvme identify`.
#[derive(clap::Args, Debug)]
pub struct IdentifyArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Namespace to show (default: every active namespace).
    #[arg(long)]
    nsid: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Inspect a local NVMe controller bound to vfio-pci (DDDD:BB:DD.F)
    /// instead of a remote target.
    #[cfg(feature = "vfio")]
    #[arg(long, value_name = "PCI_ADDR")]
    vfio: Option<String>,
}

/// TRTYPE as nvme-cli prints it.
fn trtype_str(trtype: u8) -> &'static str {
    match trtype {
        TRTYPE_RDMA => "rdma",
        TRTYPE_FC => "fc",
        TRTYPE_TCP => "tcp",
        TRTYPE_INTRA_HOST => "loop",
        _ => "unrecognized",
    }
}

/// ADRFAM as nvme-cli prints it.
fn adrfam_str(adrfam: u8) -> &'static str {
    match adrfam {
        ADRFAM_IPV4 => "ipv4",
        ADRFAM_IPV6 => "ipv6",
        ADRFAM_IB => "infiniband",
        ADRFAM_FC => "fibre-channel",
        ADRFAM_INTRA_HOST => "loop",
        _ => "unrecognized",
    }
}

/// SUBTYPE as nvme-cli prints it.
fn subtype_str(subtype: u8) -> &'static str {
    match subtype {
        SUBTYPE_REFERRAL => "discovery subsystem referral",
        SUBTYPE_NVME => "nvme subsystem",
        SUBTYPE_CURRENT_DISCOVERY => "current discovery subsystem",
        _ => "unrecognized",
    }
}

/// TREQ (its secure channel field) as nvme-cli prints it.
fn treq_str(treq: u8) -> &'static str {
    match treq & TREQ_SECURE_CHANNEL_MASK {
        TREQ_NOT_SPECIFIED => "not specified",
        TREQ_REQUIRED => "required",
        TREQ_NOT_REQUIRED => "not required",
        _ => "reserved",
    }
}

/// The TCP security type as `nvme discover` prints it.
fn sectype_str(sectype: u8) -> &'static str {
    if sectype == SECTYPE_NONE {
        "none"
    } else {
        "tls"
    }
}

/// An NVMe version value (VS property or Identify VER) as
/// `major.minor.tertiary`.
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

fn entry_json(e: &DiscoveryLogEntry) -> Value {
    json!({
        "trtype": trtype_str(e.trtype),
        "adrfam": adrfam_str(e.adrfam),
        "subtype": subtype_str(e.subtype),
        "treq": treq_str(e.treq),
        "portid": e.portid,
        "trsvcid": e.trsvcid,
        "subnqn": e.subnqn,
        "traddr": e.traddr,
        "cntlid": e.cntlid,
        "asqsz": e.asqsz,
        "eflags": e.eflags,
        "sectype": e.sectype,
    })
}

/// Prints the discovery log.
pub fn discover(a: DiscoverArgs) -> Result<(), BoxErr> {
    let opts = ConnectOptions {
        addr: a.addr.clone(),
        port: a.port,
        ..ConnectOptions::default()
    };
    let ctrl = Controller::connect_discovery(opts)?;
    let log = ctrl.discovery_log()?;
    if a.json {
        let j = json!({
            "genctr": log.genctr,
            "records": log.entries.iter().map(entry_json).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        println!(
            "\nDiscovery Log Number of Records {}, Generation counter {}",
            log.entries.len(),
            log.genctr
        );
        for (i, e) in log.entries.iter().enumerate() {
            println!("=====Discovery Log Entry {i}======");
            println!("trtype:  {}", trtype_str(e.trtype));
            println!("adrfam:  {}", adrfam_str(e.adrfam));
            println!("subtype: {}", subtype_str(e.subtype));
            println!("treq:    {}", treq_str(e.treq));
            println!("portid:  {}", e.portid);
            println!("trsvcid: {}", e.trsvcid);
            println!("subnqn:  {}", e.subnqn);
            println!("traddr:  {}", e.traddr);
            println!("eflags:  {:#x}", e.eflags);
            println!("sectype: {}", sectype_str(e.sectype));
        }
    }
    ctrl.disconnect()?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A byte count in binary units, e.g. `64.00 MiB`.
fn human(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.2} {}", U[i])
}

/// `max_transfer` is the MDTS in bytes (the controller's CAP.MPSMIN is
/// needed to scale it; 0 = no limit).
fn ctrl_json(id: &IdentifyController, max_transfer: u32) -> Value {
    json!({
        "vid": id.vid, "ssvid": id.ssvid, "sn": id.sn, "mn": id.mn, "fr": id.fr,
        "mdts": id.mdts, "max_transfer": max_transfer, "cntlid": id.cntlid,
        "ver": version_string(id.ver), "cntrltype": id.cntrltype, "nn": id.nn,
        "oncs": id.oncs, "vwc": id.vwc, "sgls": id.sgls, "subnqn": id.subnqn,
        "ioccsz": id.ioccsz, "iorcsz": id.iorcsz, "icdoff": id.icdoff,
        "kas": id.kas, "maxcmd": id.maxcmd, "sqes": id.sqes, "cqes": id.cqes,
        "oacs": id.oacs, "acl": id.acl, "aerl": id.aerl, "lpa": id.lpa,
        "elpe": id.elpe, "fuses": id.fuses, "fna": id.fna, "awun": id.awun,
        "awupf": id.awupf, "msdbd": id.msdbd, "fcatt": id.fcatt,
    })
}

fn print_ctrl(id: &IdentifyController, max_transfer: u32) {
    println!("NVME Identify Controller:");
    println!("vid       : {:#x}", id.vid);
    println!("ssvid     : {:#x}", id.ssvid);
    println!("sn        : {}", id.sn);
    println!("mn        : {}", id.mn);
    println!("fr        : {}", id.fr);
    println!("cmic      : {:#x}", id.cmic);
    println!(
        "mdts      : {} ({})",
        id.mdts,
        match max_transfer {
            0 => "no limit".to_string(),
            m => human(u64::from(m)),
        }
    );
    println!("cntlid    : {:#x}", id.cntlid);
    println!("ver       : {:#x} ({})", id.ver, version_string(id.ver));
    println!("cntrltype : {}", id.cntrltype);
    println!("oacs      : {:#x}", id.oacs);
    println!("acl       : {}", id.acl);
    println!("aerl      : {}", id.aerl);
    println!("lpa       : {:#x}", id.lpa);
    println!("elpe      : {}", id.elpe);
    println!("kas       : {}", id.kas);
    println!("sqes      : {:#x}", id.sqes);
    println!("cqes      : {:#x}", id.cqes);
    println!("maxcmd    : {}", id.maxcmd);
    println!("nn        : {}", id.nn);
    println!("oncs      : {:#x}", id.oncs);
    println!("fuses     : {:#x}", id.fuses);
    println!("fna       : {:#x}", id.fna);
    println!("vwc       : {:#x}", id.vwc);
    println!("awun      : {}", id.awun);
    println!("awupf     : {}", id.awupf);
    println!("sgls      : {:#x}", id.sgls);
    println!("subnqn    : {}", id.subnqn);
    println!("ioccsz    : {}", id.ioccsz);
    println!("iorcsz    : {}", id.iorcsz);
    println!("icdoff    : {}", id.icdoff);
    println!("fcatt     : {:#x}", id.fcatt);
    println!("msdbd     : {}", id.msdbd);
}

fn ns_json(nsid: u32, id: &IdentifyNamespace, uuid: Option<String>) -> Value {
    let bs = u64::from(id.lba_size().unwrap_or(0));
    json!({
        "nsid": nsid, "nsze": id.nsze, "ncap": id.ncap, "nuse": id.nuse,
        "nsfeat": id.nsfeat, "nlbaf": id.nlbaf, "flbas": id.flbas,
        "nmic": id.nmic, "nguid": hex(&id.nguid), "eui64": hex(&id.eui64),
        "uuid": uuid, "block_size": bs, "size_bytes": id.nsze * bs,
        "lbafs": id.lba_formats().iter().enumerate().map(|(i, f)| json!({
            "ms": f.ms, "ds": f.lbads, "rp": f.rp, "in_use": i == id.flbas_index(),
        })).collect::<Vec<_>>(),
    })
}

fn print_ns(nsid: u32, id: &IdentifyNamespace, uuid: Option<String>) {
    let bs = u64::from(id.lba_size().unwrap_or(0));
    println!("NVME Identify Namespace {nsid}:");
    println!("nsze    : {:#x}", id.nsze);
    println!("ncap    : {:#x}", id.ncap);
    println!("nuse    : {:#x}", id.nuse);
    println!("nsfeat  : {:#x}", id.nsfeat);
    println!("nlbaf   : {}", id.nlbaf);
    println!("flbas   : {:#x}", id.flbas);
    println!("nmic    : {:#x}", id.nmic);
    println!("nguid   : {}", hex(&id.nguid));
    println!("eui64   : {}", hex(&id.eui64));
    if let Some(u) = uuid {
        println!("uuid    : {u}");
    }
    for (i, f) in id.lba_formats().iter().enumerate() {
        println!(
            "lbaf {i:>2} : ms:{:<3} lbads:{:<2} rp:{:#x}{}",
            f.ms,
            f.lbads,
            f.rp,
            if i == id.flbas_index() {
                " (in use)"
            } else {
                ""
            }
        );
    }
    println!(
        "size    : {} ({} bytes, {} blocks of {bs})",
        human(id.nsze * bs),
        id.nsze * bs,
        id.nsze
    );
}

/// Prints Identify data.
pub fn identify(a: IdentifyArgs) -> Result<(), BoxErr> {
    #[cfg(feature = "vfio")]
    if let Some(addr) = &a.vfio {
        return identify_vfio(addr, &a);
    }
    let mut opts = a.conn.options();
    opts.num_io_queues = 1;
    let ctrl = Controller::connect(opts)?;
    let id = ctrl.identify_controller()?;
    let nsids = match a.nsid {
        Some(n) => vec![n],
        None if ctrl.is_discovery() => Vec::new(),
        None => ctrl.active_namespaces()?,
    };
    let mut namespaces = Vec::new();
    for nsid in nsids {
        let ns = ctrl.identify_namespace(nsid)?;
        let uuid = ctrl
            .ns_descriptors(nsid)
            .ok()
            .and_then(|d| {
                d.into_iter().find_map(|d| match d {
                    NsIdDescriptor::Uuid(u) => Some(u),
                    _ => None,
                })
            })
            .map(|u| unvme_initiator::format_uuid(&u));
        namespaces.push((nsid, ns, uuid));
    }
    if a.json {
        let j = json!({
            "controller": ctrl_json(&id, ctrl.max_transfer()),
            "namespaces": namespaces.iter().map(|(n, ns, u)| ns_json(*n, ns, u.clone())).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        print_ctrl(&id, ctrl.max_transfer());
        for (n, ns, u) in &namespaces {
            println!();
            print_ns(*n, ns, u.clone());
        }
    }
    ctrl.disconnect()?;
    Ok(())
}

/// `unvme identify --vfio ADDR`: Identify data of a local device.
#[cfg(feature = "vfio")]
fn identify_vfio(addr: &str, a: &IdentifyArgs) -> Result<(), BoxErr> {
    let d = unvme_nvme_vfio::identify_device(addr, a.nsid)?;
    if a.json {
        let j = json!({
            "controller": ctrl_json(&d.controller, d.max_transfer),
            "namespaces": d.namespaces.iter().map(|(n, ns)| ns_json(*n, ns, None)).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        print_ctrl(&d.controller, d.max_transfer);
        for (n, ns) in &d.namespaces {
            println!();
            print_ns(*n, ns, None);
        }
    }
    Ok(())
}
