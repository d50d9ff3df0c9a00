//! Interoperability with SPDK, the fastest open NVMe/TCP target and host, in
//! both directions, natively on this machine (tests/common/spdk.rs):
//!
//! * our initiator against SPDK's `nvmf_tgt`: `unvme identify`, `unvme
//!   discover` (SPDK's discovery subsystem on its own port), `unvme perf
//!   --verify` with and without header/data digests, and the NBD bridge over
//!   an SPDK namespace (qemu-io writes, a fresh bridge reads back);
//! * SPDK's host against `unvme target`: `spdk_nvme_identify` of the I/O
//!   controller and of the discovery controller (its discovery log page),
//!   `spdk_nvme_perf` randrw over two queue pairs with and without digests,
//!   and `spdk_tgt`'s bdev_nvme attached to our target, re-served through
//!   SPDK's own target and checked end to end by `unvme perf --verify`.
//!
//! `spdk_nvme_discover` is not used: unlike the other tools it has no
//! `--no-huge` and cannot start without hugepages, which these machines do not
//! have; `spdk_nvme_identify` of the discovery controller reads the same log.
//!
//! Without the SPDK peer every test here skips with one line (fails in CI).

mod common;

use std::process::Command;

use common::spdk::{run_bounded, Output, Spdk, SpdkHost, SpdkTarget, DISCOVERY_NQN, TOOL_LIMIT};
use common::{spawn_listening, TargetProc};

const SPDK_NQN: &str = "nqn.2016-06.io.spdk:unvme-interop";
const SPDK_SERIAL: &str = "SPDK00000000000001";
const SPDK_MODEL: &str = "SPDK_interop_ctrl";
const UNVME_NQN: &str = "nqn.2024-11.io.unvme:default";
const UNVME_SERIAL: &str = "UNVMESPDKINTEROP01";

/// Runs `unvme ARGS…` bounded in time.
fn unvme(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_unvme"));
    c.args(args).env("UNVME_LOG", "warn");
    run_bounded(c, None, TOOL_LIMIT)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `unvme perf --verify` for a couple of seconds; asserts it moved data
/// without an error or a mismatch.
fn perf_verify(port: u16, nqn: &str, pattern: &str, digests: &[&str]) {
    let port = port.to_string();
    let mut args = vec![
        "perf",
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--nqn",
        nqn,
        "--pattern",
        pattern,
        "--qd",
        "16",
        "--time",
        "2",
        "--verify",
        "--range",
        "16M",
    ];
    args.extend_from_slice(digests);
    let out = unvme(&args).ok(&format!("unvme perf {pattern} {digests:?}"));
    let last = out.lines().last().unwrap_or("");
    let f: Vec<&str> = last.split_whitespace().collect();
    assert!(
        matches!(f.as_slice(), ["ios", n, "errors", "0", "verify_mismatches", "0"] if n.parse::<u64>().is_ok_and(|n| n > 0)),
        "perf {pattern} {digests:?}: expected I/O with no errors or mismatches, got: {out}"
    );
}

#[test]
fn unvme_identify_and_discover_read_spdk_targets_controller_and_discovery_log() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = SpdkTarget::start(&spdk, &[]);
    let port = t.add_malloc_subsystem(SPDK_NQN, SPDK_SERIAL, SPDK_MODEL, 64, 4096);
    let dport = t.add_discovery_listener();

    let id = json(
        &unvme(&[
            "identify",
            "--port",
            &port.to_string(),
            "--nqn",
            SPDK_NQN,
            "--json",
        ])
        .ok("unvme identify"),
    );
    let c = &id["controller"];
    assert_eq!(c["sn"], SPDK_SERIAL);
    assert_eq!(c["mn"], SPDK_MODEL);
    assert_eq!(c["subnqn"], SPDK_NQN);
    let ns = id["namespaces"].as_array().expect("namespaces");
    assert_eq!(ns.len(), 1, "one namespace: {id}");
    assert_eq!(ns[0]["nsid"], 1);
    assert_eq!(ns[0]["block_size"], 4096);
    assert_eq!(ns[0]["size_bytes"], 64u64 << 20);

    // The same over header and data digests.
    let id = json(
        &unvme(&[
            "identify",
            "--port",
            &port.to_string(),
            "--nqn",
            SPDK_NQN,
            "--hdr-digest",
            "--data-digest",
            "--json",
        ])
        .ok("unvme identify with digests"),
    );
    assert_eq!(id["controller"]["sn"], SPDK_SERIAL);

    let log = json(&unvme(&["discover", "--port", &dport.to_string(), "--json"]).ok("discover"));
    let recs = log["records"].as_array().expect("records");
    let sub = recs
        .iter()
        .find(|r| r["subnqn"] == SPDK_NQN)
        .unwrap_or_else(|| panic!("SPDK's log lists its subsystem: {log}"));
    assert_eq!(sub["trtype"], "tcp");
    assert_eq!(sub["adrfam"], "ipv4");
    assert_eq!(sub["traddr"], "127.0.0.1");
    assert_eq!(sub["trsvcid"], port.to_string());
    assert_eq!(sub["subtype"], "nvme subsystem");
    assert!(
        recs.iter()
            .any(|r| r["subnqn"] == DISCOVERY_NQN && r["trsvcid"] == *dport.to_string()),
        "SPDK's log lists its discovery listener: {log}"
    );
}

#[test]
fn unvme_perf_verifies_data_on_spdk_target_with_and_without_digests() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = SpdkTarget::start(&spdk, &[]);
    let port = t.add_malloc_subsystem(SPDK_NQN, SPDK_SERIAL, SPDK_MODEL, 64, 4096);
    perf_verify(port, SPDK_NQN, "randwrite", &[]);
    perf_verify(port, SPDK_NQN, "randread", &[]);
    perf_verify(port, SPDK_NQN, "randrw", &["--hdr-digest"]);
    perf_verify(port, SPDK_NQN, "randrw", &["--hdr-digest", "--data-digest"]);
}

/// `unvme nbd` bridging SPDK's namespace, started on an ephemeral port.
struct Bridge {
    child: std::process::Child,
    url: String,
}

impl Bridge {
    fn start(port: u16) -> Bridge {
        let port = port.to_string();
        let (child, addr) = spawn_listening(&[
            "nbd",
            "--listen",
            "127.0.0.1:0",
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--nqn",
            SPDK_NQN,
            "--hdr-digest",
            "--data-digest",
        ]);
        Bridge {
            child,
            url: format!("nbd://{addr}"),
        }
    }

    /// Runs qemu-io commands against the export; asserts every pattern check held.
    fn qemu_io(&self, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(&self.url);
        let out = run_bounded(c, None, TOOL_LIMIT);
        let text = format!("{}{}", out.stdout, out.stderr);
        let ok = out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed");
        assert!(ok, "qemu-io {cmds:?}: {}\n{text}", out.status);
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbd_bridge_over_spdk_namespace_reads_back_what_it_wrote() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = SpdkTarget::start(&spdk, &[]);
    let port = t.add_malloc_subsystem(SPDK_NQN, SPDK_SERIAL, SPDK_MODEL, 64, 4096);

    let b = Bridge::start(port);
    b.qemu_io(&[
        "write -P 0xa5 0 1M",
        "write -P 0x3c 5M 64k",
        "write -P 0x77 60M 4M",
        "read -P 0xa5 0 1M",
        "read -P 0x3c 5M 64k",
    ]);
    drop(b);
    // A new bridge (new NVMe/TCP connections) sees the data on SPDK's namespace.
    let b = Bridge::start(port);
    b.qemu_io(&[
        "read -P 0xa5 0 1M",
        "read -P 0x3c 5M 64k",
        "read -P 0x77 60M 4M",
    ]);
}

/// Our target with a RAM namespace and a known serial.
fn our_target() -> TargetProc {
    TargetProc::start(&["--ram", "64M", "--serial", UNVME_SERIAL])
}

fn trid(port: u16, nqn: &str) -> String {
    format!("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{nqn}")
}

/// The value after `KEY:` on the first line of `text` that starts with it.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(|v| v.trim_start_matches(':').trim())
        .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"))
}

#[test]
fn spdk_identify_reads_unvme_targets_controller_namespace_and_discovery_log() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = our_target();

    let out = spdk
        .tool("spdk_nvme_identify", &["-r", &trid(t.port(), UNVME_NQN)])
        .ok("spdk_nvme_identify");
    assert_eq!(field(&out, "Serial Number"), UNVME_SERIAL);
    assert_eq!(field(&out, "Model Number"), "unvme target");
    assert_eq!(field(&out, "Subsystem NQN"), UNVME_NQN);
    assert_eq!(field(&out, "Namespace ID"), "1");
    assert_eq!(
        field(&out, "Size (in LBAs)"),
        "131072 (0GiB)",
        "64 MiB of 512-byte blocks"
    );

    let out = spdk
        .tool(
            "spdk_nvme_identify",
            &["-r", &trid(t.port(), DISCOVERY_NQN)],
        )
        .ok("spdk_nvme_identify of the discovery controller");
    let log = out
        .split_once("Discovery Log Page")
        .unwrap_or_else(|| panic!("no discovery log page in:\n{out}"))
        .1;
    assert!(
        log.lines()
            .any(|l| l.starts_with("NVM Subsystem Qualified Name:")
                && l.trim_end().ends_with(UNVME_NQN)),
        "the discovery log lists our subsystem:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("Service Identifier")
                && l.trim_end().ends_with(&t.port().to_string())),
        "the discovery log gives our port:\n{log}"
    );
}

#[test]
fn spdk_perf_randrw_over_two_qpairs_against_unvme_target_with_and_without_digests() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = our_target();
    for digests in [&[][..], &["-H", "-I"][..]] {
        let mut args = vec![
            "-q", "16", "-o", "4096", "-w", "randrw", "-M", "50", "-P", "2", "-t", "2",
        ];
        args.extend_from_slice(digests);
        let r = trid(t.port(), UNVME_NQN);
        args.extend_from_slice(&["-r", &r]);
        let out = spdk.tool("spdk_nvme_perf", &args);
        let text = format!("{}\n{}", out.stdout, out.stderr);
        let stdout = out.ok(&format!("spdk_nvme_perf {digests:?}"));
        let total = stdout
            .lines()
            .find(|l| l.starts_with("Total"))
            .unwrap_or_else(|| panic!("no Total line:\n{text}"));
        let iops: f64 = total
            .split(':')
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no IOPS in {total:?}"));
        assert!(iops > 0.0, "{total}");
        // The one error SPDK logs at every host shutdown is harmless (its README); nothing else.
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("*ERROR*") && !l.contains("CQ transport error -6"))
            .collect();
        assert!(
            errors.is_empty(),
            "spdk_nvme_perf {digests:?} errors:\n{text}"
        );
    }
    assert!(t.stop().success(), "target exits cleanly after SPDK's host");
}

#[test]
fn spdk_bdev_nvme_host_moves_verified_data_through_unvme_target() {
    let _serial = Spdk::serial();
    let Some(spdk) = Spdk::find() else { return };
    let t = our_target();
    let h = SpdkHost::start(&spdk);
    let bdevs = h.attach("U0", t.port(), UNVME_NQN, &["-e", "-d"]);
    assert_eq!(bdevs, ["U0n1"], "one bdev per namespace");
    let b = h.bdev("U0n1");
    assert_eq!(b["block_size"], 512, "{b}");
    assert_eq!(b["num_blocks"], 131072, "{b}");
    assert_eq!(b["product_name"], "NVMe disk", "{b}");

    // SPDK's host in the middle: unvme perf -> spdk_tgt (NVMe-oF target, bdev_nvme host) -> unvme target.
    let nqn = "nqn.2016-06.io.spdk:via-bdev-nvme";
    let port = h.export(nqn, "U0n1");
    perf_verify(port, nqn, "randwrite", &[]);
    perf_verify(port, nqn, "randrw", &[]);

    h.app.rpc(&["bdev_nvme_detach_controller", "U0"]);
    drop(h);
    assert!(
        t.stop().success(),
        "target exits cleanly after SPDK's host detached"
    );
}
