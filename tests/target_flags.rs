//! `unvme target --config FILE` together with each command-line flag: every
//! flag either applies on top of the file (checked on the wire where the
//! host can see it, else in the startup log line) or is refused with an
//! error. Each test runs the real binary with a configuration file whose
//! own `listen` address is taken, so a target that used the file's value
//! instead of `--listen` would not start. Also the controller-side limits
//! a hostile host meets at Connect: controllers per host, and log lines
//! per refused Connect.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{RawHost, HOSTNQN};
use unvme_proto::admin::{self, IdentifyController, IdentifyNamespace, NumberOfQueues};
use unvme_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{CapsuleCmd, Pdu};
use unvme_proto::regs::Cap;
use unvme_proto::DEFAULT_SUBNQN;

const A: &str = "nqn.2024-11.io.unvme:file-a";
const B: &str = "nqn.2024-11.io.unvme:file-b";
const FILE_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:file-host";
const STRANGER: &str = "nqn.2014-08.org.nvmexpress:uuid:stranger";

/// A configuration file in the temporary directory, removed on drop.
struct ConfigFile {
    path: PathBuf,
    /// Holds the file's `listen` address so the target cannot bind it.
    _taken: TcpListener,
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `body` after a `listen` line naming an address in use.
fn config(body: &str) -> ConfigFile {
    static N: AtomicUsize = AtomicUsize::new(0);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let path = std::env::temp_dir().join(format!(
        "unvme-flags-{}-{}.toml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let text = format!(
        "listen = [\"{}\"]\nreactors = 1\n{body}",
        taken.local_addr().unwrap()
    );
    std::fs::write(&path, text).expect("write the configuration");
    ConfigFile {
        path,
        _taken: taken,
    }
}

/// Two subsystems: A (one RAM namespace, FILE_HOST allowed) and B (any host).
fn two_subsystems() -> ConfigFile {
    config(&format!(
        r#"
        in_capsule_data_size = 16384
        max_h2c_data = 32768
        max_transfer_size = 524288
        max_queue_size = 256
        max_io_queues = 8
        max_controllers_per_host = 5
        spin_us = 77
        [[subsystems]]
        nqn = "{A}"
        serial = "FILESERIAL"
        model = "file model"
        allowed_hosts = ["{FILE_HOST}"]
        namespaces = [{{ bdev = "ram:1M" }}]
        [[subsystems]]
        nqn = "{B}"
        namespaces = [{{ bdev = "ram:1M" }}]
        "#
    ))
}

/// A running target, killed on drop, with the log lines up to `listening`.
struct Target {
    child: Child,
    addr: SocketAddr,
    log: Vec<String>,
    /// Every later log line, as it arrives.
    later: std::sync::mpsc::Receiver<String>,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    /// The `starting` log line.
    fn starting(&self) -> &str {
        self.log
            .iter()
            .find(|l| l.contains("starting"))
            .expect("a starting line")
    }
}

fn command(cfg: &ConfigFile, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_unvme"));
    c.arg("target")
        .arg("--config")
        .arg(&cfg.path)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("UNVME_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Starts `unvme target --config FILE --listen 127.0.0.1:0 ARGS…`.
fn start(cfg: &ConfigFile, args: &[&str]) -> Target {
    let mut child = command(cfg, args).spawn().expect("spawn unvme");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let (later_tx, later) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if sent {
                let _ = later_tx.send(line);
            } else {
                lines.push(line.clone());
                if line.contains("listening") {
                    let _ = tx.send(std::mem::take(&mut lines));
                    sent = true;
                }
            }
        }
        if !sent {
            let _ = tx.send(lines);
        }
    });
    let log = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the target logs");
    let Some(addr) = log
        .iter()
        .find_map(|l| l.split("la=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
    else {
        panic!("the target did not start listening: {log:#?}");
    };
    Target {
        child,
        addr,
        log,
        later,
    }
}

/// Runs the target expecting it to refuse its arguments: returns stderr.
fn refused(cfg: &ConfigFile, args: &[&str]) -> String {
    let mut child = command(cfg, args).spawn().expect("spawn unvme");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let st = common::wait_exit(&mut child, Duration::from_secs(10));
    assert!(!st.success(), "the target accepted {args:?}: {err}");
    err
}

/// Admin Connect of `host` to `subnqn`: the completion.
fn connect_as(t: &Target, subnqn: &str, host: &str) -> Cqe {
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    h.fabrics_connect(0, subnqn, host, 0xFFFF, 32)
}

fn accepted(t: &Target, subnqn: &str, host: &str) -> bool {
    let st = connect_as(t, subnqn, host).status();
    if st.is_success() {
        return true;
    }
    assert!(
        st.same_code(Status::CONNECT_INVALID_HOST),
        "{host} to {subnqn}: {st}"
    );
    false
}

/// An admin command answering with 4 KiB of data.
fn admin_data(h: &mut RawHost, mut sqe: Sqe) -> (Cqe, Vec<u8>) {
    sqe.cid = 0x42;
    sqe.set_sgl(SglDescriptor::transport(4096));
    h.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len: 0 }), &[]);
    h.wait_resp(0x42, &[])
}

fn identify(h: &mut RawHost, cns: u8, nsid: u32) -> Vec<u8> {
    let (c, data) = admin_data(h, unvme_proto::nvm::identify(cns, nsid, 0));
    assert!(
        c.status().is_success(),
        "identify {cns}/{nsid}: {}",
        c.status()
    );
    data
}

fn identify_ctrl(t: &Target, subnqn: &str) -> IdentifyController {
    let mut h = RawHost::admin(t.addr, subnqn, false, false);
    IdentifyController::decode(&identify(&mut h, admin::cns::CTRL, 0)).unwrap()
}

#[test]
fn listen_with_config_replaces_the_files_addresses() {
    let cfg = two_subsystems();
    let t = start(&cfg, &[]);
    assert_ne!(t.addr, cfg._taken.local_addr().unwrap());
    assert!(accepted(&t, B, HOSTNQN), "served on the --listen address");
}

#[test]
fn allow_host_with_config_is_added_to_every_subsystems_list() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--allow-host", HOSTNQN]);
    assert!(accepted(&t, A, HOSTNQN), "the flag's host");
    assert!(accepted(&t, A, FILE_HOST), "the file's host stays allowed");
    assert!(!accepted(&t, A, STRANGER), "Connect Invalid Host");
    // B allowed any host in the file; with the flag only the listed one.
    assert!(accepted(&t, B, HOSTNQN));
    assert!(!accepted(&t, B, STRANGER), "Connect Invalid Host");
}

#[test]
fn allow_host_with_nqn_applies_to_that_subsystem_only() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--nqn", B, "--allow-host", HOSTNQN]);
    assert!(accepted(&t, B, HOSTNQN));
    assert!(!accepted(&t, B, STRANGER), "Connect Invalid Host");
    assert!(!accepted(&t, A, HOSTNQN), "A keeps the file's list");
    assert!(accepted(&t, A, FILE_HOST));
}

#[test]
fn namespace_flags_with_config_extend_the_named_subsystem() {
    let cfg = two_subsystems();
    let file = std::env::temp_dir().join(format!("unvme-flags-ns-{}.img", std::process::id()));
    let file_arg = format!("{}:create=4M", file.display());
    let t = start(
        &cfg,
        &[
            "--nqn",
            A,
            "--ram",
            "2M",
            "--null",
            "3M",
            "--file",
            &file_arg,
            "--ns",
            "ram:5M",
            "--allow-host",
            HOSTNQN,
        ],
    );
    let mut h = RawHost::admin(t.addr, A, false, false);
    let list = admin::decode_ns_list(&identify(&mut h, admin::cns::ACTIVE_NS_LIST, 0));
    assert_eq!(
        list,
        vec![1, 2, 3, 4, 5],
        "the file's namespace and four flags'"
    );
    for (nsid, mib) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)] {
        let ns = IdentifyNamespace::decode(&identify(&mut h, admin::cns::NS, nsid)).unwrap();
        assert_eq!(ns.nsze, mib * 1024 * 1024 / 512, "NSID {nsid}");
    }
    drop(t);
    let _ = std::fs::remove_file(file);
}

#[test]
fn namespace_flags_without_nqn_add_the_default_subsystem_beside_the_files() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--ram", "2M"]);
    let mut h = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let ns = IdentifyNamespace::decode(&identify(&mut h, admin::cns::NS, 1)).unwrap();
    assert_eq!(ns.nsze, 2 * 1024 * 1024 / 512);
    assert!(accepted(&t, B, HOSTNQN), "the file's subsystems stay");
}

#[test]
fn serial_and_model_with_config_replace_the_files() {
    let cfg = two_subsystems();
    let t = start(
        &cfg,
        &[
            "--nqn",
            B,
            "--serial",
            "FLAGSERIAL",
            "--model",
            "flag model",
        ],
    );
    let id = identify_ctrl(&t, B);
    assert_eq!(
        (id.sn.as_str(), id.mn.as_str()),
        ("FLAGSERIAL", "flag model")
    );
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    let c = h.fabrics_connect(0, A, FILE_HOST, 0xFFFF, 32);
    assert!(c.status().is_success());
}

#[test]
fn serial_or_model_naming_no_single_subsystem_is_refused() {
    let cfg = two_subsystems();
    let err = refused(&cfg, &["--serial", "X"]);
    assert!(
        err.contains("--serial/--model") && err.contains("--nqn"),
        "{err}"
    );
    let err = refused(&cfg, &["--model", "X"]);
    assert!(err.contains("--serial/--model"), "{err}");
}

#[test]
fn nqn_naming_no_subsystem_is_refused() {
    let cfg = two_subsystems();
    let err = refused(
        &cfg,
        &[
            "--nqn",
            "nqn.2024-11.io.unvme:nope",
            "--allow-host",
            HOSTNQN,
        ],
    );
    assert!(err.contains("--nqn nqn.2024-11.io.unvme:nope"), "{err}");
}

#[test]
fn in_capsule_with_config_sets_ioccsz() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--in-capsule", "4096"]);
    assert_eq!(identify_ctrl(&t, B).ioccsz, (64 + 4096) / 16);
    let t = start(&cfg, &[]);
    assert_eq!(identify_ctrl(&t, B).ioccsz, (64 + 16384) / 16, "the file's");
}

#[test]
fn max_h2c_data_with_config_is_offered_in_icresp() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--max-h2c-data", "65536"]);
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    assert_eq!(h.maxh2cdata, 65536);
}

#[test]
fn max_transfer_with_config_sets_mdts() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--max-transfer", "262144"]);
    assert_eq!(identify_ctrl(&t, B).mdts, 6, "256 KiB in 4 KiB pages");
}

#[test]
fn queue_size_with_config_sets_cap_mqes() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--queue-size", "64"]);
    let mut h = RawHost::admin(t.addr, B, false, false);
    let cap = Cap::decode(h.prop_get(unvme_proto::regs::CAP, true));
    assert_eq!(cap.max_queue_entries(), 64);
}

#[test]
fn io_queues_with_config_limits_number_of_queues() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--io-queues", "3"]);
    let mut h = RawHost::admin(t.addr, B, false, false);
    let sqe = unvme_proto::nvm::get_features(admin::fid::NUM_QUEUES, 0, 0);
    let (c, _) = h.cmd(sqe, &[]);
    assert!(c.status().is_success(), "{}", c.status());
    let q = NumberOfQueues::from_dword(c.dw0);
    assert_eq!((q.sq_count(), q.cq_count()), (3, 3));
}

#[test]
fn max_ctrls_per_host_with_config_answers_connect_controller_busy() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--max-ctrls-per-host", "2"]);
    assert!(
        t.starting().contains("max_ctrls_per_host=2"),
        "{}",
        t.starting()
    );
    let held: Vec<RawHost> = (0..2)
        .map(|_| RawHost::admin(t.addr, B, false, false))
        .collect();
    let st = connect_as(&t, B, HOSTNQN).status();
    assert!(st.same_code(Status::CONNECT_CTRL_BUSY), "{st}");
    assert!(
        connect_as(&t, B, STRANGER).status().is_success(),
        "another host"
    );
    // A controller that goes (its admin queue closed) frees its place.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !connect_as(&t, B, HOSTNQN).status().is_success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the limit never freed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_files_controller_limit_holds_without_the_flag() {
    let cfg = config(
        r#"
        max_controllers_per_host = 1
        [[subsystems]]
        nqn = "nqn.2024-11.io.unvme:file-a"
        namespaces = [{ bdev = "ram:1M" }]
        "#,
    );
    let t = start(&cfg, &[]);
    let _held = RawHost::admin(t.addr, A, false, false);
    let st = connect_as(&t, A, HOSTNQN).status();
    assert!(st.same_code(Status::CONNECT_CTRL_BUSY), "{st}");
}

#[test]
fn reactors_with_config_replaces_the_files() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--reactors", "3"]);
    assert!(t.starting().contains("reactors=3"), "{}", t.starting());
    let t = start(&cfg, &[]);
    assert!(
        t.starting().contains("reactors=1"),
        "the file's: {}",
        t.starting()
    );
}

#[test]
fn cpus_with_config_replaces_the_files() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--cpus", "0"]);
    assert!(t.starting().contains("cpus=0 "), "{}", t.starting());
    assert!(accepted(&t, B, HOSTNQN));
}

#[test]
fn spin_us_with_config_replaces_the_files() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--spin-us", "5"]);
    assert!(t.starting().contains("spin_us=5"), "{}", t.starting());
    let t = start(&cfg, &[]);
    assert!(
        t.starting().contains("spin_us=77"),
        "the file's: {}",
        t.starting()
    );
}

#[test]
fn the_default_limit_is_16_controllers_per_host() {
    let cfg = two_subsystems();
    let t = start(&cfg, &["--max-ctrls-per-host", "16"]);
    let _held: Vec<RawHost> = (0..16)
        .map(|_| RawHost::admin(t.addr, B, false, false))
        .collect();
    let st = connect_as(&t, B, HOSTNQN).status();
    assert!(st.same_code(Status::CONNECT_CTRL_BUSY), "{st}");
    // Without the flag or the file's key, the default is the same 16.
    let cfg = config(&format!(
        "[[subsystems]]\nnqn = \"{B}\"\nnamespaces = [{{ bdev = \"ram:1M\" }}]\n"
    ));
    let t = start(&cfg, &[]);
    assert!(
        t.starting().contains("max_ctrls_per_host=16"),
        "{}",
        t.starting()
    );
    let _held: Vec<RawHost> = (0..16)
        .map(|_| RawHost::admin(t.addr, B, false, false))
        .collect();
    let st = connect_as(&t, B, HOSTNQN).status();
    assert!(st.same_code(Status::CONNECT_CTRL_BUSY), "{st}");
}

#[test]
fn a_host_repeating_a_refused_connect_gets_a_log_line_a_second() {
    let cfg = two_subsystems();
    let t = start(&cfg, &[]);
    let began = std::time::Instant::now();
    for _ in 0..200 {
        assert!(!accepted(&t, A, STRANGER));
    }
    let secs = began.elapsed().as_secs();
    // The target logs a Connect before answering it, so once this host's
    // Connect is answered every earlier line is in the pipe.
    assert!(accepted(&t, A, FILE_HOST));
    let mut refused_lines = 0;
    loop {
        let line = t
            .later
            .recv_timeout(Duration::from_secs(10))
            .expect("the target logs the accepted Connect");
        if line.contains("host not allowed") {
            refused_lines += 1;
        }
        if line.contains("admin queue connected") && line.contains(FILE_HOST) {
            break;
        }
    }
    assert!(refused_lines >= 1, "the first refusal is logged");
    assert!(
        refused_lines <= secs + 2,
        "{refused_lines} lines for 200 refusals in {secs} s"
    );
}

#[test]
fn hostile_peer_limit_flags_with_config_replace_the_defaults() {
    let cfg = two_subsystems();
    let t = start(
        &cfg,
        &[
            "--max-conns-per-reactor",
            "33",
            "--max-conn-transfer",
            "1048576",
            "--max-reactor-transfer",
            "4194304",
            "--max-send-queue",
            "32768",
            "--turn-budget",
            "65536",
            "--connect-timeout-ms",
            "4000",
            "--transfer-timeout-ms",
            "5000",
        ],
    );
    let s = t.starting();
    for want in [
        "max_conns_per_reactor=33",
        "max_conn_transfer=1048576",
        "max_reactor_transfer=4194304",
        "max_send_queue=32768",
        "turn_budget=65536",
        "connect_timeout_ms=4000",
        "transfer_timeout_ms=5000",
    ] {
        assert!(s.contains(want), "{want} in {s}");
    }
    assert!(accepted(&t, B, HOSTNQN), "a host is still served");
}

#[test]
fn icreq_timeout_flag_closes_a_silent_socket_in_time() {
    use std::io::Read;
    let cfg = two_subsystems();
    let t = start(&cfg, &["--icreq-timeout-ms", "300"]);
    let mut s = std::net::TcpStream::connect(t.addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("read timeout");
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 1];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the target closes without sending");
    let took = t0.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "closed after {took:?}, not near the 300 ms deadline"
    );
    assert!(accepted(&t, B, HOSTNQN), "a host is still served");
}

#[test]
fn ana_cntlid_and_namespace_id_flags_with_config_reach_the_host() {
    let cfg = two_subsystems();
    let nguid = "00112233445566778899aabbccddeeff";
    let uuid = "5f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let t = start(
        &cfg,
        &[
            "--nqn",
            B,
            "--ram",
            "1M",
            "--ana-state",
            "non-optimized",
            "--ana-group",
            "3",
            "--nguid",
            nguid,
            "--uuid",
            uuid,
            "--cntlid-min",
            "300",
            "--cntlid-max",
            "310",
        ],
    );
    assert!(
        t.starting().contains("ana_state=non-optimized"),
        "{}",
        t.starting()
    );
    let c = connect_as(&t, B, HOSTNQN);
    assert!(c.status().is_success());
    assert!((300..=310).contains(&(c.dw0 as u16)), "CNTLID {}", c.dw0);
    let c = connect_as(&t, A, FILE_HOST);
    assert_eq!(c.dw0 as u16, 1, "A keeps the default range");
    let mut h = RawHost::admin(t.addr, B, false, false);
    let id = IdentifyNamespace::decode(&identify(&mut h, admin::cns::NS, 2)).unwrap();
    assert_eq!(id.anagrpid, 3);
    assert_eq!(id.nguid, unvme_target::parse_hex::<16>(nguid).unwrap());
    let descs = admin::decode_ns_id_descs(&identify(&mut h, admin::cns::NS_DESC_LIST, 2)).unwrap();
    assert!(descs.contains(&admin::NsIdDescriptor::Uuid(
        unvme_target::parse_hex::<16>(uuid).unwrap()
    )));
    let (c, page) = admin_data(
        &mut h,
        unvme_proto::nvm::get_log_page(admin::lid::ANA, 0xFFFF_FFFF, 0, 4096),
    );
    assert!(c.status().is_success(), "{}", c.status());
    let log = unvme_proto::ana::AnaLog::decode(&page, 128, 1024).unwrap();
    let groups: Vec<_> = log
        .groups
        .iter()
        .map(|g| (g.grpid, g.state, g.nsids.clone()))
        .collect();
    assert_eq!(
        groups,
        vec![
            (1, unvme_proto::ana::AnaState::NonOptimized, vec![1]),
            (3, unvme_proto::ana::AnaState::NonOptimized, vec![2]),
        ]
    );
}

#[test]
fn invalid_ana_cntlid_and_namespace_id_flags_are_refused() {
    let cfg = two_subsystems();
    let err = refused(
        &cfg,
        &[
            "--nqn",
            B,
            "--ram",
            "1M",
            "--ram",
            "1M",
            "--nguid",
            "00112233445566778899aabbccddeeff",
        ],
    );
    assert!(err.contains("--nguid"), "{err}");
    let err = refused(&cfg, &["--cntlid-min", "0"]);
    assert!(err.contains("CNTLID range"), "{err}");
    let err = refused(&cfg, &["--cntlid-min", "9", "--cntlid-max", "8"]);
    assert!(err.contains("CNTLID range"), "{err}");
    let err = refused(&cfg, &["--cntlid-max", "65520"]);
    assert!(err.contains("CNTLID range"), "{err}");
    let err = refused(&cfg, &["--ana-state", "bogus"]);
    assert!(err.contains("ANA state"), "{err}");
    let err = refused(&cfg, &["--nqn", B, "--ram", "1M", "--ana-group", "129"]);
    assert!(err.contains("ANA group"), "{err}");
    let err = refused(&cfg, &["--nqn", B, "--ram", "1M", "--uuid", "xyz"]);
    assert!(err.contains("hex digits"), "{err}");
}
