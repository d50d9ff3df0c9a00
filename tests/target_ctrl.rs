//! The controller model as a host sees it on the wire, against the real
//! `unvme target`: a broadcast Flush (NSID FFFFFFFFh) over several
//! namespaces, and Identify Namespace for NSIDs that are not valid.

mod common;

use common::{RawHost, TargetProc};
use unvme_proto::admin::{self, IdentifyController};
use unvme_proto::nvme::{io_opc, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{CapsuleCmd, Pdu};
use unvme_proto::DEFAULT_SUBNQN;

fn flush(h: &mut RawHost, cid: u16, nsid: u32) -> Status {
    let sqe = Sqe {
        opc: io_opc::FLUSH,
        cid,
        nsid,
        ..Default::default()
    };
    h.cmd(sqe, &[]).0.status()
}

fn identify(h: &mut RawHost, cns: u8, nsid: u32) -> (Status, Vec<u8>) {
    let mut sqe = unvme_proto::nvm::identify(cns, nsid, 0);
    sqe.cid = 0x51;
    sqe.set_sgl(SglDescriptor::transport(4096));
    h.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len: 0 }), &[]);
    let (c, data) = h.wait_resp(0x51, &[]);
    (c.status(), data)
}

#[test]
fn broadcast_flush_flushes_every_namespace_and_vwc_says_so() {
    let dir = std::env::temp_dir();
    let img = dir.join(format!("unvme-ctrl-bflush-{}.img", std::process::id()));
    let file = format!("{}:create=1M", img.display());
    let t = TargetProc::start(&["--ram", "1M", "--file", &file, "--null", "1M"]);
    let mut a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let (st, data) = identify(&mut a, admin::cns::CTRL, 0);
    assert!(st.is_success());
    let id = IdentifyController::decode(&data).unwrap();
    assert_eq!(id.vwc & 0x7, 0x7, "VWC present, broadcast Flush supported");
    let mut q = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, false, false);
    for cid in 1..=8 {
        let st = flush(&mut q, cid, 0xFFFF_FFFF);
        assert!(st.is_success(), "broadcast flush {cid}: {st}");
    }
    assert!(flush(&mut q, 9, 2).is_success(), "the file's own flush");
    let st = flush(&mut q, 10, 4);
    assert!(st.same_code(Status::INVALID_NS), "{st}");
    // Another controller's queue is served meanwhile, and after.
    let mut b = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut q2 = RawHost::io(t.addr, DEFAULT_SUBNQN, b.cntlid, 1, false, false);
    assert!(flush(&mut q2, 1, 0xFFFF_FFFF).is_success());
    let (st, _) = identify(&mut b, admin::cns::CTRL, 0);
    assert!(st.is_success());
    drop(t);
    let _ = std::fs::remove_file(img);
}

#[test]
fn identify_namespace_refuses_an_nsid_beyond_nn_and_zero() {
    let t = TargetProc::start(&["--ns", "ram:1M", "--ns", "ram:1M"]);
    let mut a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let (st, data) = identify(&mut a, admin::cns::CTRL, 0);
    assert!(st.is_success());
    let nn = IdentifyController::decode(&data).unwrap().nn;
    assert_eq!(nn, 2);
    let (st, data) = identify(&mut a, admin::cns::NS, 2);
    assert!(st.is_success() && data.iter().any(|&b| b != 0), "active");
    let (st, _) = identify(&mut a, admin::cns::NS, nn + 1);
    assert!(st.same_code(Status::INVALID_NS), "beyond NN: {st}");
    let (st, _) = identify(&mut a, admin::cns::NS, 0);
    assert!(st.same_code(Status::INVALID_NS), "NSID 0: {st}");
}
