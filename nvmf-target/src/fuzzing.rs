//! Entry points for the fuzz targets (feature `fuzzing`): the controller
//! model driven with arbitrary commands, with no socket, and a whole
//! connection (the transport's receive path, the controller, a null
//! backend) fed arbitrary bytes ([`conn_stream`]). Not a stable API.
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
/// of that controller), its 64 SQE bytes and its data buffer. A `queue`
/// of 128 or more is no command but an ANA state change on the port (as
/// the control plane makes): state `sqe[0] % 5`, group `sqe[1]` (0: every
/// group; beyond ANAGRPMAX: refused), then any events go to held AERs.
#[derive(Debug)]
pub struct FuzzCommand {
    /// Which queue: taken modulo 3 (below 128).
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
/// is broken. Returns how many asynchronous events completed held AERs.
pub fn controller_sequence(cmds: &[FuzzCommand]) -> usize {
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
                    ..Default::default()
                },
                NamespaceConfig {
                    bdev: "ram:1M".into(),
                    nsid: Some(3),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..TargetConfig::default()
    };
    let subsystems = Arc::new(Subsystems::from_config(&cfg).expect("a RAM namespace opens"));
    let params = Arc::new(Params::from_config(&cfg));
    let peer = "127.0.0.1:1".parse().expect("an address");
    let new = || Controller::new(peer, 0, subsystems.clone(), params.clone());
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
    let mut events = 0;
    for c in cmds {
        if c.queue >= 128 {
            use unvme_proto::admin::AsyncEvent;
            use unvme_proto::ana::AnaState;
            let states = [
                AnaState::Optimized,
                AnaState::NonOptimized,
                AnaState::Inaccessible,
                AnaState::PersistentLoss,
                AnaState::Change,
            ];
            let group = (c.sqe[1] != 0).then_some(u32::from(c.sqe[1]));
            let ok = subsystems.list[1].set_ana_state(0, group, states[usize::from(c.sqe[0]) % 5]);
            assert_eq!(ok, group.is_none_or(|g| g <= crate::config::ANA_GROUP_MAX));
            while let Some(ev) = admin.take_event() {
                assert!(held > 0, "an event completed an AER that was not held");
                held -= 1;
                events += 1;
                assert_eq!(AsyncEvent::from_dword(ev.dw0), AsyncEvent::ANA_CHANGE);
            }
            continue;
        }
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
    events
}

/// How [`conn_stream`] brings the connection up before the fuzzed bytes.
#[derive(Clone, Copy, Debug)]
pub enum Prelude {
    /// Nothing: the fuzzed bytes are the first the target sees.
    Raw,
    /// ICReq (no digests).
    IcReq,
    /// ICReq, admin Connect, CC.EN = 1.
    Admin,
    /// An enabled admin queue on another connection, then ICReq and an I/O
    /// Connect (queue 1, 32 entries) on this one.
    Io,
}

/// An in-memory stream: reads hand out one chunk per turn (then
/// `WouldBlock`), end of stream after the last; writes take up to `wcap`
/// bytes per turn, so a host that reads slowly is played too.
struct MemStream {
    chunks: std::collections::VecDeque<Vec<u8>>,
    pos: usize,
    wcap: usize,
    wleft: usize,
    out: Vec<u8>,
}

impl std::io::Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(c) = self.chunks.front() else {
            return Ok(0);
        };
        if self.pos == c.len() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(c.len() - self.pos);
        buf[..n].copy_from_slice(&c[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.wleft == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.wleft);
        self.wleft -= n;
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MemStream {
    /// Starts a turn: the next chunk, fresh write room. False at the end.
    fn next_turn(&mut self) -> bool {
        if self.chunks.front().is_some_and(|c| self.pos == c.len()) {
            self.chunks.pop_front();
            self.pos = 0;
        }
        self.wleft = self.wcap;
        !self.chunks.is_empty()
    }
}

fn capsule_bytes(sqe: &Sqe, data: &[u8]) -> Vec<u8> {
    use unvme_proto::pdu::{self, CapsuleCmd, Framing, Pdu};
    let mut sqe = *sqe;
    if !data.is_empty() {
        sqe.set_sgl(unvme_proto::nvme::SglDescriptor::in_capsule(
            0,
            data.len() as u32,
        ));
    }
    let mut h = [0u8; pdu::MAX_HEADER];
    let n = pdu::encode_header(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data_len: data.len() as u32,
        }),
        &Framing::default(),
        &mut h,
    );
    let mut v = h[..n].to_vec();
    v.extend_from_slice(data);
    v
}

fn icreq_bytes() -> Vec<u8> {
    use unvme_proto::pdu::{self, Framing, IcReq, Pdu};
    let mut h = [0u8; pdu::MAX_HEADER];
    let ic = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 0,
        dgst: 0,
        maxr2t: 0,
    });
    let n = pdu::encode_header(&ic, &Framing::default(), &mut h);
    h[..n].to_vec()
}

fn connect_bytes(qid: u16, cntlid: u16) -> Vec<u8> {
    let mut sqe = Sqe {
        cid: 0x7001,
        ..Sqe::default()
    };
    ConnectCmd {
        qid,
        sqsize: 31,
        cattr: unvme_proto::fabrics::CATTR_DISABLE_SQFLOW,
        kato: 0,
        ..ConnectCmd::default()
    }
    .to_sqe(&mut sqe);
    let data = ConnectData {
        hostid: [1; 16],
        cntlid,
        subnqn: NQN.into(),
        hostnqn: HOST.into(),
    }
    .encode();
    capsule_bytes(&sqe, &data)
}

fn enable_bytes() -> Vec<u8> {
    let mut en = Sqe {
        cid: 0x7002,
        ..Sqe::default()
    };
    PropertyCmd {
        size8: false,
        ofst: regs::CC,
        value: u64::from(cc::EN),
    }
    .to_sqe(true, &mut en);
    capsule_bytes(&en, &[])
}

/// Checks that `out` is a well-formed stream of controller-to-host PDUs
/// (no digests) and returns the CQEs in it.
fn check_output(out: &[u8]) -> Vec<unvme_proto::nvme::Cqe> {
    use unvme_proto::pdu::{Event, Limits, Pdu, PduDecoder, Role};
    let mut dec = PduDecoder::new(
        Role::Host,
        Limits {
            max_incapsule: 0,
            max_data: 16 << 20,
        },
    );
    let mut cqes = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let (n, ev) = match dec.decode(&out[at..]) {
            Ok(x) => x,
            // A TermReq ends the stream; the decoder may reject what a
            // TermReq carries (the offending header), nothing else.
            Err(e) => panic!("the target sent a malformed PDU: {e}"),
        };
        at += n;
        match ev {
            Some(Event::Pdu(Pdu::CapsuleResp(r))) => cqes.push(r.cqe),
            Some(Event::Pdu(Pdu::C2hTermReq(_))) => break,
            None if n == 0 => break,
            _ => {}
        }
    }
    cqes
}

/// Runs a connection (reactor-style turns: grant, read, run, poll the
/// backend, flush) over `chunks` (one per turn) after `prelude`, with
/// `wcap` bytes of send room per turn, against a null namespace. Panics if
/// the connection breaks a promise: a malformed PDU sent after an ICResp
/// without digests, or transfer budget left charged at close.
pub fn conn_stream(prelude: Prelude, chunks: &[&[u8]], wcap: usize) {
    use crate::pool::BufPool;
    use crate::queues::BdevQueues;
    use crate::tcp::{Conn, Ctx};
    let cfg = TargetConfig {
        subsystems: vec![SubsystemConfig {
            nqn: NQN.into(),
            serial: "F".into(),
            model: "fuzz".into(),
            allowed_hosts: Vec::new(),
            namespaces: vec![NamespaceConfig {
                bdev: "null:64M".into(),
                nsid: None,
                ..Default::default()
            }],
            ..Default::default()
        }],
        max_transfer_bytes_per_connection: 256 << 10,
        max_transfer_bytes_per_reactor: 512 << 10,
        max_send_queue_bytes: 4096,
        turn_budget_bytes: 16 << 10,
        ..TargetConfig::default()
    };
    let subsystems = Arc::new(Subsystems::from_config(&cfg).expect("a null namespace opens"));
    let params = Arc::new(Params::from_config(&cfg));
    let peer = "127.0.0.1:1".parse().expect("an address");
    let mut pool = BufPool::new(1 << 20, params.reactor_xfer_bytes);
    let mut queues = BdevQueues::new(subsystems.clone());
    let mut comps = Vec::new();
    let new_conn = |chunks: Vec<Vec<u8>>, wcap: usize| {
        let s = MemStream {
            chunks: chunks.into(),
            pos: 0,
            wcap: wcap.max(1),
            wleft: 0,
            out: Vec::new(),
        };
        Conn::new(s, peer, 0, subsystems.clone(), params.clone())
    };
    let run = |c: &mut Conn<MemStream>,
               pool: &mut BufPool,
               queues: &mut BdevQueues,
               comps: &mut Vec<unvme_bdev::IoCompletion>| {
        for _ in 0..4096 {
            let more = c.stream.next_turn();
            let mut ctx = Ctx {
                queues: &mut *queues,
                pool: &mut *pool,
                tag_base: 0,
            };
            if c.has_waiting() {
                c.grant_transfers(&mut ctx);
            }
            c.readable = true;
            c.on_readable(&mut ctx);
            queues.retry();
            queues.poll(comps);
            for comp in comps.drain(..) {
                c.io_done(comp.tag as u16, comp.result, comp.buf, pool);
            }
            let _ = c.flush(pool);
            c.tick(std::time::Instant::now());
            assert!(
                pool.xfer_used <= pool.xfer_limit.max(params.max_transfer as usize),
                "reactor transfer budget overrun"
            );
            if c.close.is_some() || (!more && !c.has_tx() && !queues.pending()) {
                break;
            }
        }
    };
    let mut admin = None;
    let mut pre: Vec<Vec<u8>> = Vec::new();
    match prelude {
        Prelude::Raw => {}
        Prelude::IcReq => pre.push(icreq_bytes()),
        Prelude::Admin => {
            pre.push(icreq_bytes());
            pre.push(connect_bytes(0, CNTLID_DYNAMIC));
            pre.push(enable_bytes());
        }
        Prelude::Io => {
            let mut a = new_conn(
                vec![
                    icreq_bytes(),
                    connect_bytes(0, CNTLID_DYNAMIC),
                    enable_bytes(),
                ],
                1 << 20,
            );
            run(&mut a, &mut pool, &mut queues, &mut comps);
            let cntlid = check_output(&a.stream.out)
                .iter()
                .find(|c| c.cid == 0x7001)
                .map(|c| c.dw0 as u16)
                .expect("the admin Connect answers");
            pre.push(icreq_bytes());
            pre.push(connect_bytes(1, cntlid));
            admin = Some(a);
        }
    }
    pre.extend(chunks.iter().map(|c| c.to_vec()));
    let mut c = new_conn(pre, wcap);
    run(&mut c, &mut pool, &mut queues, &mut comps);
    if !matches!(prelude, Prelude::Raw) {
        check_output(&c.stream.out);
    }
    c.release(&mut pool);
    if let Some(mut a) = admin {
        a.release(&mut pool);
    }
    assert_eq!(
        pool.xfer_used, 0,
        "transfer budget left charged after close"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use unvme_proto::admin::{aec, fid, opc};

    fn cmd(queue: u8, sqe: Sqe) -> FuzzCommand {
        let mut b = [0u8; 64];
        sqe.encode(&mut b);
        FuzzCommand {
            queue,
            sqe: b,
            data: Vec::new(),
        }
    }

    /// The harness's ANA step reaches the event path: notices enabled, two
    /// AERs held, state changes (one refused group) complete them.
    #[test]
    fn the_controller_sequence_drives_ana_changes_into_held_aers() {
        let aer = Sqe {
            opc: opc::ASYNC_EVENT_REQUEST,
            ..Sqe::default()
        };
        let mut change = cmd(200, Sqe::default());
        change.sqe[0] = 2; // inaccessible
        change.sqe[1] = 1; // group 1
        let mut refused = cmd(200, Sqe::default());
        refused.sqe[1] = 200; // beyond ANAGRPMAX
        let seq = vec![
            cmd(
                1,
                unvme_proto::nvm::set_features(fid::ASYNC_EVENT_CONFIG, 0, aec::ANACN, false),
            ),
            cmd(1, aer),
            cmd(1, aer),
            change,
            refused,
            cmd(2, Sqe::default()),
        ];
        assert_eq!(controller_sequence(&seq), 1, "one ANA change notice");
    }
}
