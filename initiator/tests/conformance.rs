//! The bdev conformance kit (`unvme_bdev::conformance`) run on a
//! [`RemoteNamespace`]: our initiator against our own target, started in
//! this process on an ephemeral loopback port with a RAM namespace, so a
//! remote namespace is held to exactly the contract the local backends
//! keep. Each case starts its own target: plain, with header and data
//! digests, and with no in-capsule data and a small MAXH2CDATA so every
//! write goes through R2T and several H2CData PDUs.
//!
//! This is not an interoperability test (the real peers are in the guest
//! tests) and not a fault test (`fake_target.rs` has targets that vanish
//! or misbehave).

use unvme_bdev::conformance::{self, Expect};
use unvme_bdev::Bdev;
use unvme_initiator::{ConnectOptions, Controller, RemoteNamespace};
use unvme_target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};

const SUBNQN: &str = "nqn.2024-11.io.unvme:conformance";

/// Entries of each I/O queue the host asks for (a small queue, so the
/// full-queue check fills it quickly).
const QUEUE_SIZE: u16 = 8;

/// The target's side of a case.
struct Served {
    in_capsule_data_size: u32,
    max_h2c_data: u32,
}

impl Default for Served {
    fn default() -> Self {
        let d = TargetConfig::default();
        Served {
            in_capsule_data_size: d.in_capsule_data_size,
            max_h2c_data: d.max_h2c_data,
        }
    }
}

/// Starts a target serving a 4 MiB RAM namespace (512-byte blocks, larger
/// than the 1 MiB transfer limit) as `served` says, connects to it with
/// the digests asked for, and runs every conformance check that applies.
fn conforms(served: Served, hdr_digest: bool, data_digest: bool) {
    let cfg = TargetConfig {
        listen: vec!["127.0.0.1:0".parse().expect("loopback address")],
        subsystems: vec![SubsystemConfig {
            nqn: SUBNQN.into(),
            serial: "CONFORMANCE0001".into(),
            model: "unvme conformance".into(),
            allowed_hosts: Vec::new(),
            namespaces: vec![NamespaceConfig {
                bdev: "ram:4M".into(),
                nsid: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        }],
        in_capsule_data_size: served.in_capsule_data_size,
        max_h2c_data: served.max_h2c_data,
        ..TargetConfig::default()
    };
    let target = Target::start(cfg).expect("target starts");
    let port = target.local_addrs()[0].port();
    let opts = ConnectOptions {
        addr: "127.0.0.1".into(),
        port,
        subnqn: SUBNQN.into(),
        hdr_digest,
        data_digest,
        io_queue_size: QUEUE_SIZE,
        num_io_queues: 4,
        ..ConnectOptions::default()
    };
    let in_capsule = served.in_capsule_data_size;
    let ctrl = Controller::connect(opts).expect("controller connects");
    // Writes larger than this go by R2T: with 0, every one does.
    assert_eq!(ctrl.identify().incapsule_data_size(), in_capsule);
    let ns = RemoteNamespace::open(&ctrl, 1).expect("namespace 1 opens");
    let info = ns.info().clone();
    assert_eq!((info.block_size, info.num_blocks), (512, 8192));
    assert!(info.max_transfer > 0 && u64::from(info.max_transfer) < info.size_bytes());
    assert!(info.deallocate && info.write_zeroes, "{info:?}");
    let depth = ns.open_qpair().expect("an I/O queue pair").depth();
    let expect = Expect {
        compare: ctrl.identify().oncs & unvme_proto::admin::oncs::COMPARE != 0,
        segments: true,
        queue_depth: Some(depth),
        ..Expect::default()
    };
    assert!(expect.compare, "the target advertises Compare");
    conformance::check_all(&ns, &expect);
    drop(ns);
    ctrl.disconnect().expect("controller disconnects");
    target.shutdown();
}

#[test]
fn remote_namespace_passes_every_conformance_check() {
    conforms(Served::default(), false, false);
}

#[test]
fn remote_namespace_passes_every_conformance_check_with_header_and_data_digests() {
    conforms(Served::default(), true, true);
}

#[test]
fn remote_namespace_passes_every_conformance_check_with_writes_by_r2t() {
    let served = Served {
        in_capsule_data_size: 0,
        max_h2c_data: 4096,
    };
    conforms(served, false, true);
}
