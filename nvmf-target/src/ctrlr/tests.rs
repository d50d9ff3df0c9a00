//! Unit tests of the controller model, with no socket: commands go in as
//! SQEs and data buffers, outcomes come out (in the manner of SPDK's
//! `test/unit/lib/nvmf/ctrlr.c`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use unvme_bdev::{IoOp, LbaRange};
use unvme_proto::admin::{
    self, cns, fid, lid, opc, ChangedNsList, ErrorLogEntry, FirmwareSlotLog, IdentifyController,
    IdentifyNamespace, NsIdDescriptor, NumberOfQueues,
};
use unvme_proto::discovery::{self, DISCOVERY_NQN};
use unvme_proto::fabrics::{
    fctype, ConnectCmd, ConnectData, PropertyCmd, CNTLID_DYNAMIC, OPC_FABRICS,
};
use unvme_proto::nvm::{self, encode_dsm_ranges, IoCommand, DSM_AD};
use unvme_proto::nvme::{io_opc, Sqe, Status};
use unvme_proto::regs::{self as prop, cc, csts};

use super::*;
use crate::config::{NamespaceConfig, Params, SubsystemConfig, TargetConfig};
use crate::subsystem::Subsystems;
use unvme_proto::ana::{AnaLog, AnaState};

const NQN: &str = "nqn.2024-11.io.unvme:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
const HOSTID: [u8; 16] = [7; 16];
/// Blocks of the test namespace (4 MiB of 512-byte blocks).
const BLOCKS: u64 = 8192;

struct Env {
    subsystems: Arc<Subsystems>,
    params: Arc<Params>,
}

fn env_with(allowed_hosts: Vec<String>) -> Env {
    env_from(test_config(allowed_hosts), unvme_bdev::from_spec)
}

/// The test subsystem: `ram:4M` as NSID 1 and `null:1M` as NSID 5.
fn test_config(allowed_hosts: Vec<String>) -> TargetConfig {
    TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "S1".into(),
            model: "test".into(),
            allowed_hosts,
            namespaces: vec![
                NamespaceConfig {
                    bdev: "ram:4M".into(),
                    nsid: None,
                    ..Default::default()
                },
                NamespaceConfig {
                    bdev: "null:1M".into(),
                    nsid: Some(5),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        listen: vec!["127.0.0.1:4420".parse().unwrap()],
        ..TargetConfig::default()
    }
}

/// A target of `cfg` whose backends `open` makes from their specs.
fn env_from(
    cfg: TargetConfig,
    open: impl Fn(&str) -> unvme_bdev::Result<Arc<dyn unvme_bdev::Bdev>>,
) -> Env {
    let subsystems = Arc::new(Subsystems::from_config_with(&cfg, open).expect("RAM target opens"));
    subsystems.set_listen_addrs(&cfg.listen);
    Env {
        subsystems,
        params: Arc::new(Params::from_config(&cfg)),
    }
}

fn env() -> Env {
    env_with(Vec::new())
}

impl Env {
    fn queue(&self) -> Controller {
        self.queue_on(0)
    }

    /// A queue pair that arrived on listener `port`.
    fn queue_on(&self, port: u16) -> Controller {
        Controller::new(
            "127.0.0.1:9".parse().unwrap(),
            port,
            self.subsystems.clone(),
            self.params.clone(),
        )
    }

    /// An admin queue connected to `nqn` and, with `enable`, CC.EN set.
    fn admin(&self, nqn: &str, enable: bool) -> (Controller, u16) {
        self.admin_on(0, nqn, enable)
    }

    /// [`Env::admin`] on listener `port`.
    fn admin_on(&self, port: u16, nqn: &str, enable: bool) -> (Controller, u16) {
        let mut q = self.queue_on(port);
        let cntlid = match connect(&mut q, 0, 31, nqn, CNTLID_DYNAMIC) {
            Outcome::Complete(c) if c.status.is_success() => c.dw0 as u16,
            o => panic!("admin connect failed: {o:?}"),
        };
        if enable {
            assert_eq!(prop_set(&mut q, prop::CC, cc::EN), Status::SUCCESS);
        }
        (q, cntlid)
    }

    /// An I/O queue `qid` of controller `cntlid`.
    fn io(&self, cntlid: u16, qid: u16) -> Controller {
        self.io_on(0, cntlid, qid)
    }

    /// [`Env::io`] on listener `port`.
    fn io_on(&self, port: u16, cntlid: u16, qid: u16) -> Controller {
        let mut q = self.queue_on(port);
        assert_eq!(
            connect(&mut q, qid, 127, NQN, cntlid),
            Outcome::ok(u32::from(cntlid))
        );
        q
    }
}

fn connect_with(q: &mut Controller, c: ConnectCmd, data: &ConnectData) -> Outcome {
    let mut sqe = Sqe::default();
    c.to_sqe(&mut sqe);
    let mut buf = data.encode();
    assert!(q.admit(&sqe).is_ok(), "Connect is always admitted");
    q.execute(&sqe, Some(&mut buf))
}

fn connect(q: &mut Controller, qid: u16, sqsize: u16, nqn: &str, cntlid: u16) -> Outcome {
    let c = ConnectCmd {
        qid,
        sqsize,
        kato: 30_000,
        ..ConnectCmd::default()
    };
    let d = ConnectData {
        hostid: HOSTID,
        cntlid,
        subnqn: nqn.into(),
        hostnqn: HOST.into(),
    };
    connect_with(q, c, &d)
}

fn property(set: bool, ofst: u32, size8: bool, value: u64) -> Sqe {
    let mut sqe = Sqe::default();
    PropertyCmd { size8, ofst, value }.to_sqe(set, &mut sqe);
    sqe.opc = OPC_FABRICS;
    sqe.nsid = u32::from(if set {
        fctype::PROPERTY_SET
    } else {
        fctype::PROPERTY_GET
    });
    sqe
}

fn prop_set(q: &mut Controller, ofst: u32, value: u32) -> Status {
    match q.execute(&property(true, ofst, false, u64::from(value)), None) {
        Outcome::Complete(c) => c.status,
        o => panic!("Property Set answered {o:?}"),
    }
}

fn prop_get(q: &mut Controller, ofst: u32, size8: bool) -> Result<u64, Status> {
    match q.execute(&property(false, ofst, size8, 0), None) {
        Outcome::Complete(c) if c.status.is_success() => {
            Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
        }
        Outcome::Complete(c) => Err(c.status),
        o => panic!("Property Get answered {o:?}"),
    }
}

fn status(o: Outcome) -> Status {
    match o {
        Outcome::Complete(c) => c.status,
        Outcome::Data(c) => c.status,
        o => panic!("expected a completion, got {o:?}"),
    }
}

/// Runs an admin command that returns `len` bytes; the data on success.
fn read_admin(q: &mut Controller, sqe: Sqe, len: usize) -> Result<Vec<u8>, Status> {
    let mut buf = vec![0xEEu8; len];
    match q.execute(&sqe, Some(&mut buf)) {
        Outcome::Data(c) => {
            assert!(c.status.is_success());
            Ok(buf)
        }
        Outcome::Complete(c) => Err(c.status),
        o => panic!("unexpected {o:?}"),
    }
}

fn identify(q: &mut Controller, cns: u8, nsid: u32) -> Result<Vec<u8>, Status> {
    read_admin(q, nvm::identify(cns, nsid, 0), admin::IDENTIFY_DATA_SIZE)
}

fn log_page(q: &mut Controller, lid: u8, offset: u64, len: usize) -> Result<Vec<u8>, Status> {
    read_admin(q, nvm::get_log_page(lid, 0, offset, len as u32), len)
}

fn features(q: &mut Controller, sqe: Sqe) -> Completion {
    match q.execute(&sqe, None) {
        Outcome::Complete(c) => c,
        o => panic!("features answered {o:?}"),
    }
}

fn io_cmd(q: &mut Controller, op: &IoOp, nsid: u32, data: Option<&mut [u8]>) -> Outcome {
    let c = IoCommand::build(nsid, op, 512).expect("valid op");
    q.execute(&c.sqe, data)
}

// ---------------------------------------------------------------------------
// Connect
// ---------------------------------------------------------------------------

#[test]
fn before_connect_only_connect_is_admitted() {
    let e = env();
    let mut q = e.queue();
    let id = nvm::identify(cns::CTRL, 0, 0);
    assert_eq!(q.admit(&id), Err(Status::COMMAND_SEQUENCE_ERROR));
    assert_eq!(status(q.execute(&id, None)), Status::COMMAND_SEQUENCE_ERROR);
    assert_eq!(
        prop_get(&mut q, prop::CAP, true),
        Err(Status::INVALID_OPCODE)
    );
    assert!(!q.connected());
    assert_eq!(q.in_capsule_size(), ADMIN_INCAPSULE);
}

#[test]
fn admin_connect_creates_a_controller_with_a_fresh_cntlid() {
    let e = env();
    let (a, c1) = e.admin(NQN, false);
    let (_b, c2) = e.admin(NQN, false);
    assert!(a.connected());
    assert_eq!((a.qid(), a.sqsize(), a.cntlid()), (0, 32, Some(c1)));
    assert_ne!(c1, c2, "every admin Connect makes a new controller");
    assert!(c1 > 0 && c1 < 0xFFF0);
}

#[test]
fn connect_to_an_unknown_subsystem_points_at_subnqn() {
    let e = env();
    let mut q = e.queue();
    let o = connect(&mut q, 0, 31, "nqn.2024-11.io.unvme:nope", CNTLID_DYNAMIC);
    assert_eq!(
        o,
        Outcome::Complete(Completion {
            status: Status::CONNECT_INVALID_PARAMETERS,
            dw0: 1 | (256 << 16),
            dw1: 0
        })
    );
    assert!(!q.connected());
}

#[test]
fn connect_from_a_host_not_on_the_allow_list_is_refused() {
    let e = env_with(vec!["nqn.2014-08.org.nvmexpress:uuid:someone-else".into()]);
    let mut q = e.queue();
    let o = connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC);
    assert_eq!(status(o), Status::CONNECT_INVALID_HOST);
    let e = env_with(vec![HOST.into()]);
    let mut q = e.queue();
    assert!(status(connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC)).is_success());
}

#[test]
fn a_host_gets_at_most_its_limit_of_controllers_then_connect_controller_busy() {
    let mut cfg = test_config(Vec::new());
    cfg.max_controllers_per_host = 3;
    let e = env_from(cfg, unvme_bdev::from_spec);
    let mut held: Vec<_> = (0..3).map(|_| e.admin(NQN, false)).collect();
    let mut q = e.queue();
    assert_eq!(
        status(connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC)),
        Status::CONNECT_CTRL_BUSY
    );
    assert!(!q.connected());
    // Another host is not affected by this host's controllers.
    let mut other = e.queue();
    let c = ConnectCmd {
        qid: 0,
        sqsize: 31,
        ..ConnectCmd::default()
    };
    let d = ConnectData {
        hostid: [9; 16],
        cntlid: CNTLID_DYNAMIC,
        subnqn: NQN.into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:other".into(),
    };
    assert!(status(connect_with(&mut other, c, &d)).is_success());
    // Nor is the discovery subsystem (a limit per subsystem).
    let (_disc, _) = e.admin(DISCOVERY_NQN, false);
    // A controller that goes frees its place.
    let (mut gone, _) = held.pop().unwrap();
    gone.release();
    let mut q = e.queue();
    assert!(status(connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC)).is_success());
}

#[test]
fn connect_checks_queue_size_format_and_data() {
    let e = env();
    let max = e.params.max_queue_size;
    for (qid, sqsize) in [(0, 0), (0, 30), (0, max), (0, max + 1)] {
        let mut q = e.queue();
        let o = connect(&mut q, qid, sqsize, NQN, CNTLID_DYNAMIC);
        assert_eq!(status(o), Status::INVALID_QUEUE_SIZE, "sqsize {sqsize}");
    }
    let mut q = e.queue();
    let c = ConnectCmd {
        recfmt: 1,
        sqsize: 31,
        ..ConnectCmd::default()
    };
    let d = ConnectData {
        cntlid: CNTLID_DYNAMIC,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
        ..ConnectData::default()
    };
    assert_eq!(
        status(connect_with(&mut q, c, &d)),
        Status::CONNECT_INCOMPATIBLE_FORMAT
    );
    let mut sqe = Sqe::default();
    ConnectCmd {
        sqsize: 31,
        ..ConnectCmd::default()
    }
    .to_sqe(&mut sqe);
    assert_eq!(
        status(q.execute(&sqe, None)),
        Status::DATA_SGL_LENGTH_INVALID
    );
    let mut short = [0u8; 512];
    assert_eq!(
        status(q.execute(&sqe, Some(&mut short))),
        Status::DATA_SGL_LENGTH_INVALID
    );
    let o = connect(&mut q, 0, 31, NQN, 5);
    assert_eq!(
        o,
        Outcome::Complete(Completion {
            status: Status::CONNECT_INVALID_PARAMETERS,
            dw0: 1 | (16 << 16),
            dw1: 0
        }),
        "a static CNTLID on the admin queue points at CNTLID"
    );
}

#[test]
fn a_second_connect_on_a_connected_queue_is_a_sequence_error() {
    let e = env();
    let (mut q, _) = e.admin(NQN, false);
    let o = connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC);
    assert_eq!(status(o), Status::COMMAND_SEQUENCE_ERROR);
}

#[test]
fn io_queue_connect_needs_a_ready_controller_of_the_same_host() {
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, false);
    let invalid = |ipo: u32, in_data: u32| {
        Outcome::Complete(Completion {
            status: Status::CONNECT_INVALID_PARAMETERS,
            dw0: in_data | (ipo << 16),
            dw1: 0,
        })
    };
    let mut q = e.queue();
    assert_eq!(
        connect(&mut q, 1, 127, NQN, cntlid),
        invalid(42, 0),
        "not enabled"
    );
    assert_eq!(prop_set(&mut a, prop::CC, cc::EN), Status::SUCCESS);
    let mut q = e.queue();
    assert_eq!(
        connect(&mut q, 1, 127, NQN, cntlid + 100),
        invalid(16, 1),
        "unknown CNTLID"
    );
    let mut q = e.queue();
    let c = ConnectCmd {
        qid: 1,
        sqsize: 127,
        ..ConnectCmd::default()
    };
    let other = ConnectData {
        hostid: HOSTID,
        cntlid,
        subnqn: NQN.into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:other".into(),
    };
    assert_eq!(
        connect_with(&mut q, c, &other),
        invalid(512, 1),
        "another host"
    );
    let too_many = e.params.max_io_queues + 1;
    let mut q = e.queue();
    assert_eq!(connect(&mut q, too_many, 127, NQN, cntlid), invalid(42, 0));
    let mut q1 = e.io(cntlid, 1);
    assert_eq!(q1.qid(), 1);
    assert_eq!(q1.in_capsule_size(), e.params.in_capsule);
    let mut dup = e.queue();
    let o = connect(&mut dup, 1, 127, NQN, cntlid);
    assert_eq!(status(o), Status::COMMAND_SEQUENCE_ERROR, "QID in use");
    q1.release();
    let again = e.io(cntlid, 1);
    assert!(again.connected(), "a released QID can connect again");
}

#[test]
fn the_discovery_controller_has_no_io_queues() {
    let e = env();
    let (_a, cntlid) = e.admin(DISCOVERY_NQN, true);
    let mut q = e.queue();
    let o = connect(&mut q, 1, 31, DISCOVERY_NQN, cntlid);
    assert_eq!(status(o), Status::CONNECT_INVALID_PARAMETERS);
}

// ---------------------------------------------------------------------------
// Properties, enable, reset, shutdown, keep-alive
// ---------------------------------------------------------------------------

#[test]
fn properties_report_cap_vs_and_follow_cc() {
    let e = env();
    let (mut a, _) = e.admin(NQN, false);
    let cap = prop_get(&mut a, prop::CAP, true).unwrap();
    assert_eq!(cap & 0xFFFF, u64::from(e.params.max_queue_size - 1), "MQES");
    assert_ne!(cap & (1 << 37), 0, "NVM command set");
    assert_eq!(prop_get(&mut a, prop::VS, false), Ok(0x0002_0000));
    assert_eq!(prop_get(&mut a, prop::CSTS, false), Ok(0));
    assert_eq!(
        prop_get(&mut a, prop::CAP, false),
        Err(Status::INVALID_FIELD)
    );
    assert_eq!(prop_get(&mut a, 0x40, false), Err(Status::INVALID_FIELD));
    assert_eq!(prop_set(&mut a, prop::CSTS, 1), Status::INVALID_FIELD);
    let en = cc::EN | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT);
    assert_eq!(prop_set(&mut a, prop::CC, en), Status::SUCCESS);
    assert_eq!(prop_get(&mut a, prop::CC, false), Ok(u64::from(en)));
    assert_eq!(
        prop_get(&mut a, prop::CSTS, false),
        Ok(u64::from(csts::RDY))
    );
}

#[test]
fn admin_commands_wait_for_cc_en() {
    let e = env();
    let (mut a, _) = e.admin(NQN, false);
    assert_eq!(
        identify(&mut a, cns::CTRL, 0),
        Err(Status::COMMAND_SEQUENCE_ERROR)
    );
    assert_eq!(prop_set(&mut a, prop::CC, cc::EN), Status::SUCCESS);
    assert!(identify(&mut a, cns::CTRL, 0).is_ok());
}

#[test]
fn a_controller_reset_or_teardown_ends_its_io_queues() {
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let q = e.io(cntlid, 1);
    let now = Instant::now();
    assert_eq!(q.tick(now), None);
    assert_eq!(prop_set(&mut a, prop::CC, 0), Status::SUCCESS);
    assert_eq!(q.tick(now), Some(Teardown::ControllerGone), "reset");
    assert_eq!(prop_get(&mut a, prop::CSTS, false), Ok(0));
    assert_eq!(prop_set(&mut a, prop::CC, cc::EN), Status::SUCCESS);
    let q2 = e.io(cntlid, 1);
    assert_eq!(q2.tick(now), None, "a reset frees the QIDs");
    a.release();
    assert_eq!(
        q2.tick(now),
        Some(Teardown::ControllerGone),
        "admin queue gone"
    );
    let mut late = e.queue();
    assert_eq!(
        status(connect(&mut late, 2, 127, NQN, cntlid)),
        Status::CONNECT_INVALID_PARAMETERS
    );
}

/// Waits (up to 10 s) until CSTS.SHST of `q`'s controller reads `shst`.
fn wait_shst(q: &mut Controller, shst: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = prop_get(q, prop::CSTS, false).unwrap() as u32;
        if v & csts::SHST_MASK == shst {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CSTS {v:#x}: SHST never became {shst:#x}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn shutdown_notification_reports_shst_complete() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    assert_eq!(
        prop_set(&mut a, prop::CC, cc::EN | (1 << cc::SHN_SHIFT)),
        Status::SUCCESS
    );
    wait_shst(&mut a, csts::SHST_COMPLETE);
}

/// A RAM device whose `flush_all` waits until the test opens its gate, and
/// counts the flushes that finished.
struct GatedFlush {
    inner: Arc<dyn unvme_bdev::Bdev>,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    entered: std::sync::atomic::AtomicUsize,
    flushed: std::sync::atomic::AtomicUsize,
}

impl GatedFlush {
    fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl unvme_bdev::Bdev for GatedFlush {
    fn info(&self) -> &unvme_bdev::BdevInfo {
        self.inner.info()
    }
    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn unvme_bdev::BdevQueue>> {
        self.inner.open_queue()
    }
    fn flush_all(&self) -> unvme_bdev::Result<()> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.flushed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The test target with NSID 1 behind a [`GatedFlush`].
fn gated_env() -> (Env, Arc<GatedFlush>) {
    let slow = Arc::new(GatedFlush {
        inner: unvme_bdev::from_spec("ram:4M").unwrap(),
        gate: std::sync::Mutex::new(false),
        opened: std::sync::Condvar::new(),
        entered: Default::default(),
        flushed: Default::default(),
    });
    let dev = slow.clone();
    let e = env_from(test_config(Vec::new()), move |spec| {
        if spec == "ram:4M" {
            Ok(dev.clone() as Arc<dyn unvme_bdev::Bdev>)
        } else {
            unvme_bdev::from_spec(spec)
        }
    });
    (e, slow)
}

#[test]
fn a_shutdown_notification_taken_back_during_the_flush_ends_in_shst_normal() {
    let (e, slow) = gated_env();
    let (mut a, cntlid) = e.admin(NQN, true);
    assert_eq!(
        prop_set(&mut a, prop::CC, cc::EN | (1 << cc::SHN_SHIFT)),
        Status::SUCCESS
    );
    assert_eq!(prop_set(&mut a, prop::CC, cc::EN), Status::SUCCESS);
    slow.open_gate();
    let ctrl = e.subsystems.by_nqn(NQN).unwrap().ctrl(cntlid).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctrl.regs().shn_running {
        assert!(Instant::now() < deadline, "the flush never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    let v = prop_get(&mut a, prop::CSTS, false).unwrap() as u32;
    assert_eq!(v & csts::SHST_MASK, 0, "normal operation");
    assert_eq!(slow.flushed.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn shutdown_flush_runs_off_the_caller_and_shst_reports_processing_until_done() {
    let (e, slow) = gated_env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let mut q = e.io(cntlid, 1);
    // The Property Set returns while the backend's flush is blocked: the
    // caller (a reactor) is not the thread that flushes.
    assert_eq!(
        prop_set(&mut a, prop::CC, cc::EN | (1 << cc::SHN_SHIFT)),
        Status::SUCCESS
    );
    let v = prop_get(&mut a, prop::CSTS, false).unwrap() as u32;
    assert_eq!(
        v & csts::SHST_MASK,
        csts::SHST_OCCURRING,
        "processing occurring"
    );
    assert_eq!(v & csts::RDY, csts::RDY);
    // The controller's queues keep being served meanwhile.
    assert!(features(&mut a, nvm::get_features(fid::NUM_QUEUES, 0, 0))
        .status
        .is_success());
    let g = gidx_of(&e, 1);
    assert_eq!(
        io_cmd(&mut q, &IoOp::Flush, 1, None),
        Outcome::Io {
            gidx: g,
            op: IoOp::Flush
        }
    );
    // A second notification while the first is processed starts no second
    // thread; it is folded into one more pass.
    assert_eq!(prop_set(&mut a, prop::CC, cc::EN), Status::SUCCESS);
    assert_eq!(
        prop_set(&mut a, prop::CC, cc::EN | (1 << cc::SHN_SHIFT)),
        Status::SUCCESS
    );
    assert_eq!(slow.flushed.load(std::sync::atomic::Ordering::SeqCst), 0);
    slow.open_gate();
    wait_shst(&mut a, csts::SHST_COMPLETE);
    assert_eq!(
        slow.flushed.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "flushed again for the second notification"
    );
}

#[test]
fn keep_alive_expires_after_kato_plus_grace_and_admin_commands_refresh_it() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let t0 = Instant::now();
    assert_eq!(a.tick(t0 + Duration::from_secs(30)), None, "within KATO");
    assert_eq!(
        a.tick(t0 + Duration::from_secs(36)),
        Some(Teardown::KeepAliveExpired)
    );
    std::thread::sleep(Duration::from_millis(20));
    let ka = Sqe {
        opc: opc::KEEP_ALIVE,
        ..Sqe::default()
    };
    assert_eq!(a.execute(&ka, None), Outcome::ok(0));
    assert_eq!(
        a.tick(t0 + Duration::from_secs(35) + Duration::from_millis(10)),
        None,
        "refreshed"
    );
    let off = nvm::set_features(fid::KEEP_ALIVE_TIMER, 0, 0, false);
    assert!(features(&mut a, off).status.is_success());
    assert_eq!(
        a.tick(t0 + Duration::from_secs(3600)),
        None,
        "KATO 0 disables it"
    );
}

#[test]
fn disconnect_completes_then_closes() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let sqe = Sqe {
        opc: OPC_FABRICS,
        nsid: u32::from(fctype::DISCONNECT),
        ..Sqe::default()
    };
    assert_eq!(a.execute(&sqe, None), Outcome::Disconnect);
    let unknown = Sqe {
        opc: OPC_FABRICS,
        nsid: 0x33,
        ..Sqe::default()
    };
    assert_eq!(status(a.execute(&unknown, None)), Status::INVALID_OPCODE);
}

// ---------------------------------------------------------------------------
// Identify
// ---------------------------------------------------------------------------

#[test]
fn identify_controller_describes_the_subsystem_and_limits() {
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let id = IdentifyController::decode(&identify(&mut a, cns::CTRL, 0).unwrap()).unwrap();
    assert_eq!(id.cntlid, cntlid);
    assert_eq!(id.subnqn, NQN);
    assert_eq!(id.sn, "S1");
    assert_eq!(id.nn, 5, "highest NSID");
    assert_eq!(id.ioccsz, (64 + e.params.in_capsule) / 16);
    assert_eq!(id.cntrltype, 1, "I/O controller");
    assert_eq!(id.maxcmd, e.params.max_queue_size);
    assert_eq!(4096u32 << id.mdts, e.params.max_transfer);
}

#[test]
fn identify_namespace_and_lists() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let ns = IdentifyNamespace::decode(&identify(&mut a, cns::NS, 1).unwrap()).unwrap();
    assert_eq!((ns.nsze, ns.ncap), (BLOCKS, BLOCKS));
    assert_eq!(ns.current_lba_format().map(|f| f.lbads), Some(9));
    let inactive = identify(&mut a, cns::NS, 3).unwrap();
    assert!(inactive.iter().all(|&b| b == 0), "inactive NSID: zeroes");
    assert_eq!(
        identify(&mut a, cns::NS, 6),
        Err(Status::INVALID_NS),
        "an NSID beyond NN (5) is invalid, not inactive"
    );
    assert_eq!(identify(&mut a, cns::NS, 0), Err(Status::INVALID_NS));
    assert_eq!(
        identify(&mut a, cns::NS, 0xFFFF_FFFF),
        Err(Status::INVALID_NS)
    );
    let list = admin::decode_ns_list(&identify(&mut a, cns::ACTIVE_NS_LIST, 0).unwrap());
    assert_eq!(list, vec![1, 5]);
    let list = admin::decode_ns_list(&identify(&mut a, cns::ACTIVE_NS_LIST, 1).unwrap());
    assert_eq!(list, vec![5], "only NSIDs above the command's");
    assert_eq!(
        identify(&mut a, cns::ACTIVE_NS_LIST, 0xFFFF_FFFE),
        Err(Status::INVALID_NS)
    );
    let descs =
        admin::decode_ns_id_descs(&identify(&mut a, cns::NS_DESC_LIST, 1).unwrap()).unwrap();
    assert!(descs
        .iter()
        .any(|d| matches!(d, NsIdDescriptor::Nguid(v) if *v == ns.nguid)));
    assert!(descs.iter().any(|d| matches!(d, NsIdDescriptor::Uuid(_))));
    assert!(descs.contains(&NsIdDescriptor::Csi(0)));
    assert_eq!(
        identify(&mut a, cns::NS_DESC_LIST, 2),
        Err(Status::INVALID_NS)
    );
    assert_eq!(identify(&mut a, 0x77, 0), Err(Status::INVALID_FIELD));
}

#[test]
fn identify_answers_only_what_the_host_asked_for_and_zeroes_the_rest() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let short = read_admin(&mut a, nvm::identify(cns::CTRL, 0, 0), 512).unwrap();
    let full = identify(&mut a, cns::CTRL, 0).unwrap();
    assert_eq!(short[..], full[..512]);
    let mut none = [0u8; 0];
    assert_eq!(
        a.execute(&nvm::identify(cns::CTRL, 0, 0), Some(&mut none)),
        Outcome::ok(0)
    );
    let big = read_admin(&mut a, nvm::get_log_page(lid::ERROR, 0, 0, 128), 128).unwrap();
    assert!(
        big.iter().all(|&b| b == 0),
        "past the page: zeroes, not stale bytes"
    );
}

#[test]
fn the_discovery_controller_serves_its_log_and_not_namespaces() {
    let e = env();
    let (mut d, _) = e.admin(DISCOVERY_NQN, true);
    let id = IdentifyController::decode(&identify(&mut d, cns::CTRL, 0).unwrap()).unwrap();
    assert_eq!(id.cntrltype, 2, "discovery controller");
    assert_eq!(identify(&mut d, cns::NS, 1), Err(Status::INVALID_FIELD));
    let page = log_page(&mut d, lid::DISCOVERY, 0, 4096).unwrap();
    let (_, entries) = discovery::decode_log(&page).unwrap();
    let nqns: Vec<&str> = entries.iter().map(|e| e.subnqn.as_str()).collect();
    assert!(
        nqns.contains(&NQN) && nqns.contains(&DISCOVERY_NQN),
        "{nqns:?}"
    );
    assert!(entries
        .iter()
        .all(|e| e.trsvcid == "4420" && e.traddr == "127.0.0.1"));
    assert_eq!(
        log_page(&mut d, lid::SMART, 0, 512),
        Err(Status::INVALID_LOG_PAGE)
    );
    let (mut a, _) = e.admin(NQN, true);
    assert_eq!(
        log_page(&mut a, lid::DISCOVERY, 0, 1024),
        Err(Status::INVALID_LOG_PAGE)
    );
}

#[test]
fn discovery_hides_subsystems_the_host_may_not_connect_to() {
    let e = env_with(vec!["nqn.2014-08.org.nvmexpress:uuid:someone-else".into()]);
    let (mut d, _) = e.admin(DISCOVERY_NQN, true);
    let page = log_page(&mut d, lid::DISCOVERY, 0, 4096).unwrap();
    let (_, entries) = discovery::decode_log(&page).unwrap();
    assert!(!entries.is_empty() && entries.iter().all(|e| e.subnqn != NQN));
}

// ---------------------------------------------------------------------------
// Log pages, features, AER, abort
// ---------------------------------------------------------------------------

#[test]
fn log_pages_are_built_from_the_proto_structures() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let err = log_page(&mut a, lid::ERROR, 0, 64).unwrap();
    assert_eq!(ErrorLogEntry::decode(&err).unwrap().error_count, 0);
    let ch = log_page(&mut a, lid::CHANGED_NS, 0, 4096).unwrap();
    assert_eq!(
        ChangedNsList::decode(&ch).unwrap(),
        ChangedNsList::Nsids(vec![])
    );
    let fw = FirmwareSlotLog::decode(&log_page(&mut a, lid::FW_SLOT, 0, 512).unwrap()).unwrap();
    assert_eq!((fw.afi, fw.frs[0].as_str()), (1, env!("CARGO_PKG_VERSION")));
    let smart = log_page(&mut a, lid::SMART, 0, 512).unwrap();
    assert_eq!(admin::SmartLog::decode(&smart).unwrap().avail_spare, 100);
    let tail = log_page(&mut a, lid::FW_SLOT, 8, 8).unwrap();
    assert_eq!(tail, fw.to_bytes()[8..16]);
    assert_eq!(
        log_page(&mut a, lid::FW_SLOT, 6, 8),
        Err(Status::INVALID_FIELD),
        "unaligned"
    );
    assert_eq!(
        log_page(&mut a, lid::FW_SLOT, 516, 8),
        Err(Status::INVALID_FIELD),
        "past the end"
    );
    assert_eq!(log_page(&mut a, 0x7E, 0, 8), Err(Status::INVALID_LOG_PAGE));
}

#[test]
fn number_of_queues_is_granted_once_before_io_queues_connect() {
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let max = u32::from(e.params.max_io_queues);
    let ask = |n: u32| {
        nvm::set_features(
            fid::NUM_QUEUES,
            0,
            NumberOfQueues::from_counts(n, n).to_dword(),
            false,
        )
    };
    let c = features(&mut a, ask(2));
    assert_eq!(NumberOfQueues::from_dword(c.dw0).sq_count(), 2);
    let c = features(&mut a, ask(max + 10));
    assert_eq!(NumberOfQueues::from_dword(c.dw0).sq_count(), max, "capped");
    let cur = features(&mut a, nvm::get_features(fid::NUM_QUEUES, 0, 0));
    assert_eq!(NumberOfQueues::from_dword(cur.dw0).sq_count(), max);
    let bad = nvm::set_features(fid::NUM_QUEUES, 0, 0xFFFF_FFFF, false);
    assert_eq!(features(&mut a, bad).status, Status::INVALID_FIELD);
    let _q = e.io(cntlid, 1);
    assert_eq!(
        features(&mut a, ask(1)).status,
        Status::COMMAND_SEQUENCE_ERROR
    );
}

#[test]
fn features_keep_their_values_and_refuse_what_cannot_change() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    assert!(features(
        &mut a,
        nvm::set_features(fid::KEEP_ALIVE_TIMER, 0, 15_000, false)
    )
    .status
    .is_success());
    assert_eq!(
        features(&mut a, nvm::get_features(fid::KEEP_ALIVE_TIMER, 0, 0)).dw0,
        15_000
    );
    assert_eq!(
        features(&mut a, nvm::get_features(fid::VOLATILE_WC, 0, 0)).dw0,
        1
    );
    assert!(
        features(&mut a, nvm::set_features(fid::VOLATILE_WC, 0, 0, false))
            .status
            .is_success()
    );
    assert_eq!(
        features(&mut a, nvm::get_features(fid::VOLATILE_WC, 0, 0)).dw0,
        0
    );
    assert!(features(
        &mut a,
        nvm::set_features(fid::ASYNC_EVENT_CONFIG, 0, 0x100, false)
    )
    .status
    .is_success());
    assert_eq!(
        features(&mut a, nvm::get_features(fid::ASYNC_EVENT_CONFIG, 0, 0)).dw0,
        0x100
    );
    let save = nvm::set_features(fid::VOLATILE_WC, 0, 1, true);
    assert_eq!(features(&mut a, save).status, Status::FEATURE_NOT_SAVEABLE);
    let arb = nvm::set_features(fid::ARBITRATION, 0, 1, false);
    assert_eq!(features(&mut a, arb).status, Status::FEATURE_NOT_CHANGEABLE);
    assert_eq!(
        features(&mut a, nvm::get_features(fid::TEMP_THRESH, 0, 0)).dw0,
        343
    );
    assert_eq!(
        features(&mut a, nvm::get_features(0xEE, 0, 0)).status,
        Status::INVALID_FIELD
    );
    let (mut d, _) = e.admin(DISCOVERY_NQN, true);
    let nq = nvm::get_features(fid::NUM_QUEUES, 0, 0);
    assert_eq!(
        features(&mut d, nq).status,
        Status::INVALID_FIELD,
        "discovery: no I/O queues"
    );
}

#[test]
fn async_event_requests_are_held_up_to_the_limit() {
    let e = env();
    let (mut a, _) = e.admin(NQN, true);
    let aer = Sqe {
        opc: opc::ASYNC_EVENT_REQUEST,
        ..Sqe::default()
    };
    for _ in 0..MAX_AER {
        assert_eq!(a.execute(&aer, None), Outcome::Hold);
    }
    assert_eq!(status(a.execute(&aer, None)), Status::AER_LIMIT_EXCEEDED);
    let abort = Sqe {
        opc: opc::ABORT,
        ..Sqe::default()
    };
    assert_eq!(a.execute(&abort, None), Outcome::ok(1), "not aborted");
    let unknown = Sqe {
        opc: 0xC1,
        ..Sqe::default()
    };
    assert_eq!(status(a.execute(&unknown, None)), Status::INVALID_OPCODE);
}

// ---------------------------------------------------------------------------
// NVM I/O
// ---------------------------------------------------------------------------

fn gidx_of(e: &Env, nsid: u32) -> usize {
    e.subsystems
        .by_nqn(NQN)
        .unwrap()
        .namespace(nsid)
        .unwrap()
        .gidx
}

#[test]
fn io_commands_become_backend_operations() {
    let e = env();
    let (_a, cntlid) = e.admin(NQN, true);
    let mut q = e.io(cntlid, 1);
    let g = gidx_of(&e, 1);
    assert_eq!(q.namespace_index(1), Some(g));
    assert_eq!(q.namespace_index(9), None);
    let read = IoOp::Read {
        lba: BLOCKS - 8,
        nlb: 8,
    };
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        io_cmd(&mut q, &read, 1, Some(&mut buf)),
        Outcome::Io { gidx: g, op: read }
    );
    let write = IoOp::Write {
        lba: 0,
        nlb: 1,
        fua: true,
    };
    let mut buf = vec![0u8; 512];
    assert_eq!(
        io_cmd(&mut q, &write, 1, Some(&mut buf)),
        Outcome::Io { gidx: g, op: write }
    );
    assert_eq!(
        io_cmd(&mut q, &IoOp::Flush, 1, None),
        Outcome::Io {
            gidx: g,
            op: IoOp::Flush
        }
    );
    let wz = IoOp::WriteZeroes {
        lba: 10,
        nlb: 100,
        deallocate: true,
        fua: false,
    };
    assert_eq!(
        io_cmd(&mut q, &wz, 1, None),
        Outcome::Io { gidx: g, op: wz }
    );
}

#[test]
fn broadcast_flush_goes_to_every_namespace_as_vwc_says() {
    // Two namespaces: the subsystem's broadcast-flush device, at a global
    // index of its own that is no namespace's.
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let id = IdentifyController::decode(&identify(&mut a, cns::CTRL, 0).unwrap()).unwrap();
    assert_eq!(id.vwc, 0x7, "VWC present, FB 11b");
    let subsys = e.subsystems.by_nqn(NQN).unwrap();
    let (fa, _) = subsys.flush_all.as_ref().expect("a broadcast-flush device");
    assert!(subsys.namespaces.iter().all(|n| n.gidx != *fa));
    assert_eq!(e.subsystems.all_namespaces[*fa], (1, 0xFFFF_FFFF));
    assert!(subsys.queue_bdev(0xFFFF_FFFF).is_some());
    let mut q = e.io(cntlid, 1);
    assert_eq!(
        io_cmd(&mut q, &IoOp::Flush, 0xFFFF_FFFF, None),
        Outcome::Io {
            gidx: *fa,
            op: IoOp::Flush
        }
    );
    // Only Flush is broadcast: a read to FFFFFFFFh is still refused.
    let mut buf = vec![0u8; 512];
    let read = IoOp::Read { lba: 0, nlb: 1 };
    assert_eq!(
        status(io_cmd(&mut q, &read, 0xFFFF_FFFF, Some(&mut buf))),
        Status::INVALID_NS
    );
    // One namespace: its own Flush, and no extra device.
    let mut cfg = test_config(Vec::new());
    cfg.subsystems[0].namespaces.truncate(1);
    let e = env_from(cfg, unvme_bdev::from_spec);
    assert!(e.subsystems.by_nqn(NQN).unwrap().flush_all.is_none());
    let (_a, cntlid) = e.admin(NQN, true);
    let mut q = e.io(cntlid, 1);
    assert_eq!(
        io_cmd(&mut q, &IoOp::Flush, 0xFFFF_FFFF, None),
        Outcome::Io {
            gidx: gidx_of(&e, 1),
            op: IoOp::Flush
        }
    );
}

#[test]
fn io_commands_are_validated_against_the_namespace() {
    let e = env();
    let (_a, cntlid) = e.admin(NQN, true);
    let mut q = e.io(cntlid, 1);
    let mut buf = vec![0u8; 4096];
    let past_end = IoOp::Read {
        lba: BLOCKS - 7,
        nlb: 8,
    };
    assert_eq!(
        status(io_cmd(&mut q, &past_end, 1, Some(&mut buf))),
        Status::LBA_OUT_OF_RANGE
    );
    let huge = IoOp::Read {
        lba: u64::MAX,
        nlb: 8,
    };
    assert_eq!(
        status(io_cmd(&mut q, &huge, 1, Some(&mut buf))),
        Status::LBA_OUT_OF_RANGE
    );
    let read = IoOp::Read { lba: 0, nlb: 8 };
    assert_eq!(
        status(io_cmd(&mut q, &read, 2, Some(&mut buf))),
        Status::INVALID_NS
    );
    let mut small = vec![0u8; 2048];
    assert_eq!(
        status(io_cmd(&mut q, &read, 1, Some(&mut small))),
        Status::DATA_SGL_LENGTH_INVALID
    );
    assert_eq!(
        status(io_cmd(&mut q, &read, 1, None)),
        Status::DATA_SGL_LENGTH_INVALID
    );
    let wz = IoOp::WriteZeroes {
        lba: BLOCKS,
        nlb: 1,
        deallocate: false,
        fua: false,
    };
    assert_eq!(
        status(io_cmd(&mut q, &wz, 1, None)),
        Status::LBA_OUT_OF_RANGE
    );
    let unknown = Sqe {
        opc: 0x81,
        nsid: 1,
        ..Sqe::default()
    };
    assert_eq!(status(q.execute(&unknown, None)), Status::INVALID_OPCODE);
}

#[test]
fn dataset_management_deallocates_or_only_checks_hints() {
    let e = env();
    let (_a, cntlid) = e.admin(NQN, true);
    let mut q = e.io(cntlid, 1);
    let ranges = vec![LbaRange { lba: 0, nlb: 8 }, LbaRange { lba: 100, nlb: 1 }];
    let mut list = vec![0u8; 32];
    encode_dsm_ranges(&ranges, &mut list);
    let dealloc = IoOp::Deallocate {
        ranges: ranges.clone(),
    };
    let g = gidx_of(&e, 1);
    assert_eq!(
        io_cmd(&mut q, &dealloc, 1, Some(&mut list)),
        Outcome::Io {
            gidx: g,
            op: dealloc.clone()
        }
    );
    let mut hint = IoCommand::build(1, &dealloc, 512).unwrap().sqe;
    hint.cdw11 &= !DSM_AD;
    assert_eq!(
        q.execute(&hint, Some(&mut list)),
        Outcome::ok(0),
        "hints: no I/O"
    );
    let mut bad = vec![0u8; 32];
    encode_dsm_ranges(
        &[
            LbaRange {
                lba: BLOCKS,
                nlb: 1,
            },
            LbaRange { lba: 0, nlb: 1 },
        ],
        &mut bad,
    );
    assert_eq!(
        status(q.execute(&hint, Some(&mut bad))),
        Status::LBA_OUT_OF_RANGE,
        "hint ranges are checked too"
    );
    let mut short = vec![0u8; 16];
    assert_eq!(
        status(io_cmd(&mut q, &dealloc, 1, Some(&mut short))),
        Status::DATA_SGL_LENGTH_INVALID
    );
    // The null backend at NSID 5 cannot deallocate (its reads would not
    // return zeroes): success with no I/O.
    let ns5 = e.subsystems.by_nqn(NQN).unwrap().namespace(5).unwrap();
    assert!(!ns5.bdev.info().deallocate);
    let mut list = vec![0u8; 32];
    encode_dsm_ranges(&ranges, &mut list);
    assert_eq!(io_cmd(&mut q, &dealloc, 5, Some(&mut list)), Outcome::ok(0));
}

#[test]
fn io_commands_never_reach_the_admin_queue_and_admin_never_the_io_queue() {
    let e = env();
    let (mut a, cntlid) = e.admin(NQN, true);
    let mut buf = vec![0u8; 512];
    let read = IoOp::Read { lba: 0, nlb: 1 };
    // Opcode 02h on the admin queue is Get Log Page, not Read: here with
    // an invalid log page identifier (LID 0), it is refused as such.
    let o = io_cmd(&mut a, &read, 1, Some(&mut buf));
    assert_eq!(status(o), Status::INVALID_LOG_PAGE);
    let mut q = e.io(cntlid, 1);
    let id = nvm::identify(cns::NS, 1, 0);
    assert_eq!(
        status(q.execute(&id, None)),
        Status::INVALID_OPCODE,
        "Identify on an I/O queue"
    );
    assert_eq!(io_opc::READ, opc::GET_LOG_PAGE);
}

// ---------------------------------------------------------------------------
// ANA (multipath), CNTLID ranges, configured identifiers
// ---------------------------------------------------------------------------

const NGUID: &str = "0123456789abcdef0123456789abcdef";
const UUID: &str = "5f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const EUI64: &str = "00:11:22:33:44:55:66:77";

/// Two ports: 4420 (every group optimized) and 4421 (non-optimized,
/// group 2 inaccessible); NSID 1 in group 1, NSID 5 in group 2 with
/// configured identifiers.
fn ana_env() -> Env {
    let cfg = TargetConfig::from_toml(&format!(
        r#"
        listen = ["127.0.0.1:4420"]
        [[listeners]]
        addr = "127.0.0.1:4421"
        ana_state = "non-optimized"
        ana_groups = [{{ group = 2, state = "inaccessible" }}]
        [[subsystems]]
        nqn = "{NQN}"
        cntlid_min = 100
        cntlid_max = 101
        namespaces = [
            {{ bdev = "ram:4M" }},
            {{ bdev = "null:1M", nsid = 5, ana_group = 2, nguid = "{NGUID}", uuid = "{UUID}", eui64 = "{EUI64}" }},
        ]
        "#
    ))
    .expect("ANA configuration parses");
    cfg.validate().expect("ANA configuration is valid");
    env_from(cfg, unvme_bdev::from_spec)
}

fn ana_log(q: &mut Controller, lsp: u8, rae: bool) -> AnaLog {
    let [cdw10, cdw11, cdw12, cdw13] = admin::GetLogPage {
        lid: lid::ANA,
        lsp,
        rae,
        numd: 4096 / 4 - 1,
        lpo: 0,
        ..Default::default()
    }
    .to_cdws();
    let sqe = Sqe {
        opc: opc::GET_LOG_PAGE,
        nsid: 0xFFFF_FFFF,
        cdw10,
        cdw11,
        cdw12,
        cdw13,
        ..Sqe::default()
    };
    let page = read_admin(q, sqe, 4096).expect("ANA log page");
    AnaLog::decode(&page, 128, 1024).expect("ANA log page decodes")
}

fn subsys(e: &Env) -> &Arc<crate::subsystem::Subsystem> {
    e.subsystems.by_nqn(NQN).expect("test subsystem")
}

#[test]
fn identify_controller_reports_ana_and_several_controllers() {
    let e = ana_env();
    let (mut a, cntlid) = e.admin(NQN, true);
    assert_eq!(cntlid, 100, "first CNTLID of the configured range");
    let id = IdentifyController::decode(&identify(&mut a, cns::CTRL, 0).unwrap()).unwrap();
    assert_eq!(
        id.cmic,
        0x1 | 0x2 | 0x8,
        "multi-port, multi-controller, ANA"
    );
    assert_ne!(id.oaes & admin::aec::ANACN, 0, "ANA change notices");
    assert_eq!(id.anatt, 10);
    assert_eq!(id.anacap, 0x1F | 0x40, "every state; ANAGRPID fixed");
    assert_eq!(id.anagrpmax, crate::config::ANA_GROUP_MAX);
    assert_eq!(id.nanagrpid, crate::config::ANA_GROUP_MAX);
    assert_eq!(id.mnan, 5, "every NSID fits the host's ANA log buffer");
    let (mut d, _) = e.admin(DISCOVERY_NQN, true);
    let id = IdentifyController::decode(&identify(&mut d, cns::CTRL, 0).unwrap()).unwrap();
    assert_eq!((id.cmic & 0x8, id.anagrpmax), (0, 0), "no ANA on discovery");
}

#[test]
fn identify_namespace_reports_its_ana_group_and_configured_identifiers() {
    let e = ana_env();
    let (mut a, _) = e.admin(NQN, true);
    let ns1 = IdentifyNamespace::decode(&identify(&mut a, cns::NS, 1).unwrap()).unwrap();
    assert_eq!(ns1.anagrpid, 1, "default group");
    assert_eq!(ns1.nmic & 1, 1, "may be shared (multipath)");
    let ns5 = IdentifyNamespace::decode(&identify(&mut a, cns::NS, 5).unwrap()).unwrap();
    assert_eq!(ns5.anagrpid, 2);
    let nguid = crate::config::parse_hex::<16>(NGUID).unwrap();
    let uuid = crate::config::parse_hex::<16>(UUID).unwrap();
    let eui64 = crate::config::parse_hex::<8>(EUI64).unwrap();
    assert_eq!(ns5.nguid, nguid);
    assert_eq!(ns5.eui64, eui64);
    let descs =
        admin::decode_ns_id_descs(&identify(&mut a, cns::NS_DESC_LIST, 5).unwrap()).unwrap();
    assert!(descs.contains(&NsIdDescriptor::Nguid(nguid)));
    assert!(descs.contains(&NsIdDescriptor::Uuid(uuid)));
    assert!(descs.contains(&NsIdDescriptor::Eui64(eui64)));
}

#[test]
fn derived_identifiers_are_the_same_in_two_targets_exporting_one_nqn_and_nsid() {
    let (e1, e2) = (ana_env(), ana_env());
    let n1 = subsys(&e1).namespace(1).unwrap();
    let n2 = subsys(&e2).namespace(1).unwrap();
    assert_ne!(n1.nguid, [0; 16]);
    assert_eq!((n1.nguid, n1.uuid), (n2.nguid, n2.uuid));
}

#[test]
fn the_ana_log_page_lists_each_group_with_its_state_on_the_controllers_port() {
    let e = ana_env();
    let (mut a0, _) = e.admin_on(0, NQN, true);
    let (mut a1, _) = e.admin_on(1, NQN, true);
    let l0 = ana_log(&mut a0, 0, false);
    assert_eq!(l0.change_count, 0);
    let g: Vec<_> = l0
        .groups
        .iter()
        .map(|g| (g.grpid, g.state, g.nsids.clone()))
        .collect();
    assert_eq!(
        g,
        vec![
            (1, AnaState::Optimized, vec![1]),
            (2, AnaState::Optimized, vec![5]),
        ]
    );
    let l1 = ana_log(&mut a1, 0, false);
    let g: Vec<_> = l1.groups.iter().map(|g| (g.grpid, g.state)).collect();
    assert_eq!(
        g,
        vec![(1, AnaState::NonOptimized), (2, AnaState::Inaccessible),]
    );
    // Return Groups Only: the same descriptors with no NSID lists.
    let rgo = ana_log(&mut a1, admin::ana_lsp::RGO, false);
    assert_eq!(rgo.groups.len(), 2);
    assert!(rgo.groups.iter().all(|g| g.nsids.is_empty()));
    // A change bumps the page's and the group's change counts.
    assert!(subsys(&e).set_ana_state(1, Some(1), AnaState::Optimized));
    let l1 = ana_log(&mut a1, 0, false);
    assert_eq!(l1.change_count, 1);
    assert_eq!(
        (
            l1.groups[0].state,
            l1.groups[0].change_count,
            l1.groups[1].change_count
        ),
        (AnaState::Optimized, 1, 0)
    );
    assert_eq!(
        ana_log(&mut a0, 0, false).groups[0].change_count,
        0,
        "port 0 unchanged"
    );
    // Setting the state a group already has changes nothing.
    assert!(subsys(&e).set_ana_state(1, Some(1), AnaState::Optimized));
    assert_eq!(ana_log(&mut a1, 0, false).change_count, 1);
    // Unknown port or group.
    assert!(!subsys(&e).set_ana_state(2, None, AnaState::Optimized));
    assert!(!subsys(&e).set_ana_state(0, Some(0), AnaState::Optimized));
    assert!(!subsys(&e).set_ana_state(0, Some(129), AnaState::Optimized));
}

#[test]
fn io_to_a_group_not_accessible_on_the_port_completes_with_the_ana_status() {
    let e = ana_env();
    let (_a0, c0) = e.admin_on(0, NQN, true);
    let (_a1, c1) = e.admin_on(1, NQN, true);
    let mut q0 = e.io_on(0, c0, 1);
    let mut q1 = e.io_on(1, c1, 1);
    let read = IoOp::Read { lba: 0, nlb: 1 };
    let run = |q: &mut Controller, nsid: u32| {
        let mut buf = vec![0u8; 512];
        io_cmd(q, &read, nsid, Some(&mut buf))
    };
    assert!(matches!(run(&mut q0, 5), Outcome::Io { .. }), "optimized");
    assert!(
        matches!(run(&mut q1, 1), Outcome::Io { .. }),
        "non-optimized"
    );
    assert_eq!(status(run(&mut q1, 5)), Status::ANA_INACCESSIBLE);
    let flush = io_cmd(&mut q1, &IoOp::Flush, 5, None);
    assert_eq!(status(flush), Status::ANA_INACCESSIBLE, "every I/O command");
    let s = subsys(&e);
    s.set_ana_state(1, Some(2), AnaState::PersistentLoss);
    assert_eq!(status(run(&mut q1, 5)), Status::ANA_PERSISTENT_LOSS);
    s.set_ana_state(1, Some(2), AnaState::Change);
    let st = status(run(&mut q1, 5));
    assert_eq!(st, Status::ANA_TRANSITION);
    assert_eq!((st.sct, st.dnr), (3, false), "path related, retryable");
    s.set_ana_state(0, None, AnaState::Inaccessible);
    assert_eq!(status(run(&mut q0, 1)), Status::ANA_INACCESSIBLE);
    s.set_ana_state(1, None, AnaState::Optimized);
    assert!(matches!(run(&mut q1, 5), Outcome::Io { .. }));
}

fn hold_aer(a: &mut Controller) {
    let aer = Sqe {
        opc: opc::ASYNC_EVENT_REQUEST,
        ..Sqe::default()
    };
    assert_eq!(a.execute(&aer, None), Outcome::Hold);
}

fn enable_ana_notices(a: &mut Controller) {
    let set = nvm::set_features(fid::ASYNC_EVENT_CONFIG, 0, admin::aec::ANACN, false);
    assert!(features(a, set).status.is_success());
}

#[test]
fn an_ana_state_change_completes_a_held_aer_on_that_port_once_until_the_log_is_read() {
    let e = ana_env();
    let s = subsys(&e).clone();
    let (mut a1, _) = e.admin_on(1, NQN, true);
    let (mut a0, _) = e.admin_on(0, NQN, true);
    enable_ana_notices(&mut a1);
    enable_ana_notices(&mut a0);
    hold_aer(&mut a1);
    hold_aer(&mut a1);
    hold_aer(&mut a0);
    assert_eq!(a1.take_event(), None, "nothing happened yet");
    assert!(s.set_ana_state(1, Some(2), AnaState::Optimized));
    let ev = a1.take_event().expect("ANA change event");
    assert!(ev.status.is_success());
    assert_eq!(
        admin::AsyncEvent::from_dword(ev.dw0),
        admin::AsyncEvent::ANA_CHANGE
    );
    assert_eq!(ev.dw0, 0x000C_0302, "notice, ANA change, log page 0Ch");
    assert_eq!(a1.take_event(), None, "one event per change");
    assert_eq!(a0.take_event(), None, "port 0 did not change");
    // Masked until the host reads the log with RAE cleared.
    assert!(s.set_ana_state(1, Some(2), AnaState::Inaccessible));
    assert_eq!(a1.take_event(), None, "masked until the ANA log is read");
    ana_log(&mut a1, 0, true);
    assert!(s.set_ana_state(1, Some(2), AnaState::Optimized));
    assert_eq!(a1.take_event(), None, "RAE set keeps it masked");
    ana_log(&mut a1, 0, false);
    assert!(s.set_ana_state(1, Some(2), AnaState::NonOptimized));
    assert!(a1.take_event().is_some(), "unmasked by reading the log");
    // No AER held: the event waits for the next one.
    assert!(s.set_ana_state(0, None, AnaState::NonOptimized));
    assert!(a0.take_event().is_some());
    ana_log(&mut a0, 0, false);
    assert!(s.set_ana_state(0, None, AnaState::Optimized));
    assert_eq!(a0.take_event(), None, "no AER held");
    hold_aer(&mut a0);
    assert!(a0.take_event().is_some(), "delivered to the next AER");
}

#[test]
fn ana_change_notices_need_the_hosts_asynchronous_event_configuration() {
    let e = ana_env();
    let (mut a, _) = e.admin_on(1, NQN, true);
    hold_aer(&mut a);
    assert!(subsys(&e).set_ana_state(1, None, AnaState::Inaccessible));
    assert_eq!(a.take_event(), None, "ANACN not enabled");
}

#[test]
fn controller_ids_come_from_the_configured_range() {
    let e = ana_env();
    let (a, c1) = e.admin(NQN, false);
    let (_b, c2) = e.admin_on(1, NQN, false);
    assert_eq!((c1, c2), (100, 101));
    let mut q = e.queue();
    assert_eq!(
        status(connect(&mut q, 0, 31, NQN, CNTLID_DYNAMIC)),
        Status::CONNECT_CTRL_BUSY,
        "range exhausted"
    );
    let mut a = a;
    a.release();
    let (_c, c3) = e.admin(NQN, false);
    assert_eq!(c3, 100, "a freed CNTLID of the range is reused");
}
