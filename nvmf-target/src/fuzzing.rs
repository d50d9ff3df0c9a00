//! Entry points for the fuzz targets (feature `fuzzing`): the controller
//! model driven with arbitrary commands, with no socket. Not a stable API.
//!
//! The checks are the controller's promises to the transport, whatever a
//! host sends: it never panics, it answers with data only into a buffer the
//! command has, it hands the backend only operations inside the namespace
//! they name, and it holds no more Asynchronous Event Requests than it
//! advertises. A shutdown notification's flush runs on a helper thread:
//! CSTS.SHST never reads the reserved 11b, and every such flush ends (SHST
//! complete, no flush left running) however the host toggles CC meanwhile.

use std::sync::Arc;

use unvme_bdev::IoOp;
use unvme_proto::fabrics::{ConnectCmd, ConnectData, PropertyCmd, CNTLID_DYNAMIC};
use unvme_proto::nvme::Sqe;
use unvme_proto::regs::{self, cc};

use crate::config::{NamespaceConfig, Params, SubsystemConfig, TargetConfig};
use crate::ctrlr::{Controller, Outcome};
use crate::subsystem::Subsystems;

const NQN: &str = "nqn.2024-11.io.unvme:fuzz";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz";

/// A command for [`controller_sequence`]: the queue it is sent on (0: a
/// fresh queue before Connect, 1: an enabled admin queue, 2: an I/O queue
/// of that controller), its 64 SQE bytes and its data buffer.
#[derive(Debug)]
pub struct FuzzCommand {
    /// Which queue: taken modulo 3.
    pub queue: u8,
    /// The SQE as the wire carries it.
    pub sqe: [u8; 64],
    /// The command's data (its length is the transfer length).
    pub data: Vec<u8>,
}

fn connect(q: &mut Controller, qid: u16, cntlid: u16) -> Option<u16> {
    let mut sqe = Sqe::default();
    ConnectCmd {
        qid,
        sqsize: 31,
        kato: 0,
        ..ConnectCmd::default()
    }
    .to_sqe(&mut sqe);
    let mut data = ConnectData {
        hostid: [1; 16],
        cntlid,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
    }
    .encode();
    match q.execute(&sqe, Some(&mut data)) {
        Outcome::Complete(c) if c.status.is_success() => Some(c.dw0 as u16),
        _ => None,
    }
}

/// Runs `cmds` against a target with two RAM namespaces and checks the
/// controller's promises (see the module documentation); panics if one
/// is broken.
pub fn controller_sequence(cmds: &[FuzzCommand]) {
    let cfg = TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "F".into(),
            model: "fuzz".into(),
            allowed_hosts: Vec::new(),
            // Two namespaces of one size: a broadcast Flush then goes to
            // the subsystem's broadcast-flush device.
            namespaces: vec![
                NamespaceConfig {
                    bdev: "ram:1M".into(),
                    nsid: None,
                },
                NamespaceConfig {
                    bdev: "ram:1M".into(),
                    nsid: Some(3),
                },
            ],
        }],
        ..TargetConfig::default()
    };
    let subsystems = Arc::new(Subsystems::from_config(&cfg).expect("a RAM namespace opens"));
    let params = Arc::new(Params::from_config(&cfg));
    let peer = "127.0.0.1:1".parse().expect("an address");
    let new = || Controller::new(peer, subsystems.clone(), params.clone());
    let mut fresh = new();
    let mut admin = new();
    let cntlid = connect(&mut admin, 0, CNTLID_DYNAMIC).expect("admin Connect");
    let mut en = Sqe::default();
    PropertyCmd {
        size8: false,
        ofst: regs::CC,
        value: u64::from(cc::EN),
    }
    .to_sqe(true, &mut en);
    admin.execute(&en, None);
    let mut io = new();
    connect(&mut io, 1, cntlid).expect("I/O Connect");
    let info = subsystems.list[1].namespaces[0].bdev.info().clone();
    let (blocks, bs) = (info.num_blocks, info.block_size as usize);
    let ctrl = subsystems.list[1]
        .ctrl(cntlid)
        .expect("the controller is live");
    let mut held = 0;
    for c in cmds {
        let Ok(sqe) = Sqe::decode(&c.sqe) else {
            continue;
        };
        let q = match c.queue % 3 {
            0 => &mut fresh,
            1 => &mut admin,
            _ => &mut io,
        };
        let mut data = c.data.clone();
        let has_data = !data.is_empty();
        if q.admit(&sqe).is_err() {
            continue;
        }
        let buf = has_data.then_some(&mut data[..]);
        match q.execute(&sqe, buf) {
            Outcome::Data(_) => assert!(has_data, "data answered into no buffer"),
            Outcome::Io { gidx, op } => {
                let subsys = &subsystems.list[1];
                let broadcast = subsys.flush_all.as_ref().is_some_and(|(g, _)| *g == gidx);
                assert!(
                    subsys.namespaces.iter().any(|n| n.gidx == gidx)
                        || (broadcast && op == IoOp::Flush),
                    "{op:?} for global index {gidx}, no namespace's"
                );
                let inside =
                    op.try_for_each_range(|lba, nlb| match lba.checked_add(u64::from(nlb)) {
                        Some(end) if end <= blocks => Ok(()),
                        _ => Err(()),
                    });
                assert!(inside.is_ok(), "{op:?} outside {blocks} blocks");
                if let IoOp::Read { nlb, .. } | IoOp::Write { nlb, .. } = op {
                    assert_eq!(nlb as usize * bs, c.data.len(), "length checked");
                }
            }
            Outcome::Hold => {
                held += 1;
                assert!(held <= 4, "more AERs held than AERL allows");
            }
            Outcome::Complete(_) | Outcome::Disconnect => {}
        }
        let shst = ctrl.regs().csts & regs::csts::SHST_MASK;
        assert_ne!(shst, regs::csts::SHST_MASK, "SHST 11b is reserved");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ctrl.regs().shn_running {
        assert!(
            std::time::Instant::now() < deadline,
            "a shutdown flush never finished"
        );
        std::thread::yield_now();
    }
    let r = ctrl.regs();
    if r.cc & cc::SHN_MASK != 0 && r.csts & regs::csts::RDY != 0 {
        assert_eq!(
            r.csts & regs::csts::SHST_MASK,
            regs::csts::SHST_COMPLETE,
            "a shutdown notification ends in SHST complete"
        );
    }
    drop(r);
    // Queues go away as their connections would: the admin queue takes
    // its controller out of the subsystem (which holds it until then).
    for q in [&mut io, &mut fresh, &mut admin] {
        q.release();
    }
}
