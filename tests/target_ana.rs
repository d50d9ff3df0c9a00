//! ANA on the wire: a target with two listeners (optimized and
//! non-optimized) whose state is changed at run time through
//! `Target::set_ana_state`, as the control plane will: the controller on
//! that listener gets its held Asynchronous Event Request completed with an
//! ANA change notice, its ANA log and I/O statuses follow, and the
//! controller on the other listener hears nothing.

mod common;

use common::RawHost;
use unvme_proto::admin::{aec, fid, lid, opc, AsyncEvent};
use unvme_proto::ana::{AnaLog, AnaState};
use unvme_proto::nvme::{io_opc, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{CapsuleCmd, Pdu};
use unvme_target::{ListenerConfig, NamespaceConfig, SubsystemConfig, Target, TargetConfig};

const NQN: &str = "nqn.2024-11.io.unvme:ana";

/// Shuts the target down when the test ends, pass or fail.
struct Running(Option<Target>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.shutdown();
        }
    }
}

impl std::ops::Deref for Running {
    type Target = Target;
    fn deref(&self) -> &Target {
        self.0.as_ref().expect("running")
    }
}

fn start() -> Running {
    let cfg = TargetConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        listeners: vec![ListenerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ana_state: Some(AnaState::NonOptimized),
            ana_groups: Vec::new(),
        }],
        subsystems: vec![SubsystemConfig {
            namespaces: vec![NamespaceConfig::new("ram:1M")],
            ..SubsystemConfig::new(NQN)
        }],
        ..TargetConfig::default()
    };
    Running(Some(Target::start(cfg).expect("target starts")))
}

/// An admin queue on `addr` with ANA change notices enabled and one AER
/// (CID 0x77) held.
fn admin_with_aer(addr: std::net::SocketAddr) -> RawHost {
    let mut h = RawHost::admin(addr, NQN, false, false);
    let mut set = unvme_proto::nvm::set_features(fid::ASYNC_EVENT_CONFIG, 0, aec::ANACN, false);
    set.cid = 1;
    assert!(h.cmd(set, &[]).0.status().is_success());
    let aer = Sqe {
        opc: opc::ASYNC_EVENT_REQUEST,
        cid: 0x77,
        ..Sqe::default()
    };
    h.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: aer,
            data_len: 0,
        }),
        &[],
    );
    h
}

fn keep_alive(h: &mut RawHost, cid: u16) {
    let sqe = Sqe {
        opc: opc::KEEP_ALIVE,
        cid,
        ..Sqe::default()
    };
    // wait_resp asserts the next response is this one: a completed AER
    // queued before it would fail here.
    assert!(h.cmd(sqe, &[]).0.status().is_success());
}

fn ana_log(h: &mut RawHost) -> AnaLog {
    let mut sqe = unvme_proto::nvm::get_log_page(lid::ANA, 0xFFFF_FFFF, 0, 4096);
    sqe.cid = 0x52;
    sqe.set_sgl(SglDescriptor::transport(4096));
    h.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data_len: 0 }), &[]);
    let (c, data) = h.wait_resp(0x52, &[]);
    assert!(c.status().is_success(), "{}", c.status());
    AnaLog::decode(&data, 128, 1024).expect("ANA log decodes")
}

fn flush(h: &mut RawHost, cid: u16) -> Status {
    let sqe = Sqe {
        opc: io_opc::FLUSH,
        cid,
        nsid: 1,
        ..Sqe::default()
    };
    h.cmd(sqe, &[]).0.status()
}

#[test]
fn set_ana_state_completes_the_held_aer_of_that_listener_and_io_follows() {
    let t = start();
    let [opt, nonopt] = [t.local_addrs()[0], t.local_addrs()[1]];
    let mut a0 = admin_with_aer(opt);
    let mut a1 = admin_with_aer(nonopt);
    let mut io1 = RawHost::io(nonopt, NQN, a1.cntlid, 1, false, false);
    assert_eq!(ana_log(&mut a1).groups[0].state, AnaState::NonOptimized);
    assert!(flush(&mut io1, 3).is_success(), "non-optimized serves I/O");

    t.set_ana_state(Some(NQN), nonopt, Some(1), AnaState::Inaccessible)
        .expect("listener and group exist");
    // The held AER completes (bounded by the host's 10 s read timeout).
    let (cqe, _) = a1.wait_resp(0x77, &[]);
    assert!(cqe.status().is_success());
    assert_eq!(AsyncEvent::from_dword(cqe.dw0), AsyncEvent::ANA_CHANGE);
    let log = ana_log(&mut a1);
    assert_eq!(log.change_count, 1);
    assert_eq!(
        (
            log.groups[0].grpid,
            log.groups[0].state,
            log.groups[0].nsids.clone()
        ),
        (1, AnaState::Inaccessible, vec![1])
    );
    let st = flush(&mut io1, 4);
    assert!(st.same_code(Status::ANA_INACCESSIBLE), "{st}");
    // The other listener's controller: no event, still optimized.
    keep_alive(&mut a0, 5);
    keep_alive(&mut a0, 6);
    assert_eq!(ana_log(&mut a0).groups[0].state, AnaState::Optimized);

    // Unknown listener, group or subsystem.
    let nowhere = "127.0.0.1:1".parse().unwrap();
    assert!(t
        .set_ana_state(None, nowhere, None, AnaState::Optimized)
        .is_err());
    assert!(t
        .set_ana_state(None, nonopt, Some(0), AnaState::Optimized)
        .is_err());
    assert!(t
        .set_ana_state(Some("nqn.x:none"), nonopt, None, AnaState::Optimized)
        .is_err());
}
