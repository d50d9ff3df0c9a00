//! Wire-level tests of `unvme target` (the real binary) with a raw host:
//! the data paths, the controller model, command statuses, and every class
//! of malformed PDU.

mod common;

use common::{RawHost, Rx, TargetProc, HOSTNQN};
use unvme_proto::admin::{self, IdentifyController, IdentifyNamespace};
use unvme_proto::discovery::{decode_log, DISCOVERY_NQN};
use unvme_proto::nvme::{io_opc, SglDescriptor, Sqe, Status};
use unvme_proto::pdu::{self, fes, CapsuleCmd, DataPdu, Pdu};
use unvme_proto::DEFAULT_SUBNQN;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn rw_sqe(opc: u8, cid: u16, lba: u64, nlb: u32, len: u32) -> Sqe {
    let mut s = Sqe {
        opc,
        cid,
        nsid: 1,
        ..Default::default()
    };
    s.set_lba_range(lba, nlb);
    s.set_sgl(SglDescriptor::transport(len));
    s
}

/// Writes `data` at `lba` (in-capsule when `incapsule`, else via R2T) and reads it back.
fn write_read(io: &mut RawHost, cid: u16, lba: u64, data: &[u8], incapsule: bool) {
    let nlb = (data.len() / 512) as u32;
    let c = if incapsule {
        let mut s = Sqe {
            opc: io_opc::WRITE,
            cid,
            nsid: 1,
            ..Default::default()
        };
        s.set_lba_range(lba, nlb);
        io.cmd(s, data).0
    } else {
        let s = rw_sqe(io_opc::WRITE, cid, lba, nlb, data.len() as u32);
        io.send(
            &Pdu::CapsuleCmd(CapsuleCmd {
                sqe: s,
                data_len: 0,
            }),
            &[],
        );
        io.wait_resp(cid, data).0
    };
    assert!(c.status().is_success(), "write: {}", c.status());
    let s = rw_sqe(io_opc::READ, cid + 1, lba, nlb, data.len() as u32);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (c, back) = io.wait_resp(cid + 1, &[]);
    assert!(c.status().is_success(), "read: {}", c.status());
    assert!(
        back == data,
        "read-back differs from what was written ({} bytes)",
        data.len()
    );
}

#[test]
fn data_paths_round_trip_with_every_digest_combination() {
    let t = TargetProc::start(&["--ram", "64M", "--max-h2c-data", "16384"]);
    for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
        let admin = RawHost::admin(t.addr, DEFAULT_SUBNQN, h, d);
        let mut io = RawHost::io(t.addr, DEFAULT_SUBNQN, admin.cntlid, 1, h, d);
        assert_eq!(io.maxh2cdata, 16384);
        for (i, len) in [512usize, 4096, 8192, 12288, 65536, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, i as u8 + u8::from(h) * 2 + u8::from(d));
            write_read(
                &mut io,
                10 + 2 * i as u16,
                (i as u64) * 4096,
                &data,
                len <= 8192,
            );
        }
    }
}

#[test]
fn identify_reports_the_subsystem_and_namespace() {
    let t = TargetProc::start(&["--ram", "64M", "--serial", "SN123", "--model", "MODEL-X"]);
    let mut a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut s = Sqe {
        opc: admin::opc::IDENTIFY,
        cid: 1,
        cdw10: admin::cns::CTRL as u32,
        ..Default::default()
    };
    s.set_sgl(SglDescriptor::transport(4096));
    a.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (_, data) = a.wait_resp(1, &[]);
    let id = IdentifyController::decode(&data).unwrap();
    assert_eq!(id.subnqn, DEFAULT_SUBNQN);
    assert_eq!(id.sn, "SN123");
    assert_eq!(id.mn, "MODEL-X");
    assert_eq!(id.cntlid, a.cntlid);
    assert_eq!(id.mdts, 8, "1 MiB MDTS in 4 KiB pages");
    assert_eq!(id.nn, 1);
    assert_eq!(id.ioccsz, (64 + 8192) / 16);
    assert_eq!(
        id.sgls, 0x10_0001,
        "SGLs with in-capsule offsets, no keyed SGLs (RDMA only)"
    );
    assert_eq!(
        id.lpa & 0x2,
        0,
        "no Commands Supported and Effects log is served"
    );
    let mut s = Sqe {
        opc: admin::opc::IDENTIFY,
        cid: 2,
        nsid: 1,
        cdw10: admin::cns::NS as u32,
        ..Default::default()
    };
    s.set_sgl(SglDescriptor::transport(4096));
    a.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (_, data) = a.wait_resp(2, &[]);
    let ns = IdentifyNamespace::decode(&data).unwrap();
    assert_eq!(ns.nsze, 64 * 1024 * 1024 / 512);
    assert_eq!(ns.lba_size(), Some(512));
}

#[test]
fn invalid_commands_get_the_statuses_the_spec_names() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut io = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, false, false);
    let nblocks = 1024 * 1024 / 512;
    // Read past the end: LBA Out of Range (0x80), not Capacity Exceeded.
    let s = rw_sqe(io_opc::READ, 1, nblocks - 1, 2, 1024);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (c, _) = io.wait_resp(1, &[]);
    assert!(
        c.status().same_code(Status::LBA_OUT_OF_RANGE),
        "{}",
        c.status()
    );
    // SLBA overflow.
    let s = rw_sqe(io_opc::READ, 2, u64::MAX, 1, 512);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    assert!(io
        .wait_resp(2, &[])
        .0
        .status()
        .same_code(Status::LBA_OUT_OF_RANGE));
    // Unknown opcode.
    let c = io
        .cmd(
            Sqe {
                opc: 0x7e,
                cid: 3,
                nsid: 1,
                ..Default::default()
            },
            &[],
        )
        .0;
    assert!(
        c.status().same_code(Status::INVALID_OPCODE),
        "{}",
        c.status()
    );
    // Invalid namespace.
    let c = io
        .cmd(
            Sqe {
                opc: io_opc::FLUSH,
                cid: 4,
                nsid: 9,
                ..Default::default()
            },
            &[],
        )
        .0;
    assert!(c.status().same_code(Status::INVALID_NS), "{}", c.status());
    // SGL length that does not match NLB.
    let s = rw_sqe(io_opc::READ, 5, 0, 8, 512);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    assert!(io
        .wait_resp(5, &[])
        .0
        .status()
        .same_code(Status::DATA_SGL_LENGTH_INVALID));
    // Transfer above MDTS.
    let s = rw_sqe(io_opc::READ, 6, 0, 4096, 4096 * 512);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    assert!(io
        .wait_resp(6, &[])
        .0
        .status()
        .same_code(Status::INVALID_FIELD));
    // The connection still works.
    write_read(&mut io, 20, 0, &pattern(4096, 9), true);
}

#[test]
fn data_digest_error_fails_the_command_and_keeps_the_connection() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, true);
    let mut io = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, false, true);
    let data = pattern(4096, 1);
    let mut s = Sqe {
        opc: io_opc::WRITE,
        cid: 1,
        nsid: 1,
        ..Default::default()
    };
    s.set_lba_range(0, 8);
    s.set_sgl(SglDescriptor::in_capsule(0, 4096));
    let mut h = [0u8; pdu::MAX_HEADER];
    let n = pdu::encode_header(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 4096,
        }),
        &io.tx,
        &mut h,
    );
    let mut wire = h[..n].to_vec();
    wire.extend_from_slice(&data);
    wire.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    io.send_raw(&wire);
    let (c, _) = io.wait_resp(1, &[]);
    assert!(
        c.status().same_code(Status::TRANSIENT_TRANSPORT_ERROR),
        "{}",
        c.status()
    );
    write_read(&mut io, 2, 0, &data, true);
}

/// Runs one malformed-PDU case on a fresh I/O connection and checks the
/// TermReq, then that a healthy connection still works.
fn malformed_case(
    t: &TargetProc,
    io_ready: bool,
    bytes: &[u8],
    want_fes: u16,
    want_fei: Option<u32>,
) {
    let a = RawHost::admin(t.addr, DEFAULT_SUBNQN, true, false);
    let mut bad = if io_ready {
        RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, true, false)
    } else {
        RawHost::connect(t.addr)
    };
    bad.send_raw(bytes);
    let (fes, fei) = bad.expect_term();
    assert_eq!(fes, want_fes, "FES");
    if let Some(f) = want_fei {
        assert_eq!(fei, f, "FEI");
    }
    let mut good = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 2, true, false);
    write_read(&mut good, 40, 8, &pattern(4096, 4), true);
}

fn capsule_bytes(f: &pdu::Framing) -> Vec<u8> {
    let mut h = [0u8; pdu::MAX_HEADER];
    let n = pdu::encode_header(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: Sqe {
                opc: io_opc::FLUSH,
                nsid: 1,
                ..Default::default()
            },
            data_len: 0,
        }),
        f,
        &mut h,
    );
    h[..n].to_vec()
}

#[test]
fn malformed_pdus_end_in_a_termreq_and_spare_other_connections() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let f = pdu::Framing {
        hdgst: true,
        ddgst: false,
        pda: 0,
    };
    // Bad header length.
    let mut b = capsule_bytes(&f);
    b[2] = 64;
    malformed_case(&t, true, &b, fes::INVALID_HEADER_FIELD, Some(2));
    // Bad header digest.
    let mut b = capsule_bytes(&f);
    b[72] ^= 0x55;
    malformed_case(&t, true, &b, fes::HEADER_DIGEST_ERROR, None);
    // Unknown PDU type.
    let mut b = capsule_bytes(&f);
    b[0] = 0x0c;
    malformed_case(&t, true, &b, fes::INVALID_HEADER_FIELD, Some(0));
    // PDU before ICReq.
    malformed_case(
        &t,
        false,
        &capsule_bytes(&pdu::Framing::default()),
        fes::SEQUENCE_ERROR,
        None,
    );
    // Oversized PLEN on a command capsule.
    let mut b = capsule_bytes(&f);
    b[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
    malformed_case(&t, true, &b, fes::INVALID_HEADER_FIELD, Some(4));
    // H2CData for a transfer tag no R2T announced.
    let mut h = [0u8; pdu::MAX_HEADER];
    let dp = DataPdu {
        cccid: 1,
        ttag: 3,
        datao: 0,
        datal: 512,
        last: true,
        success: false,
    };
    let n = pdu::encode_header(&Pdu::H2cData(dp), &f, &mut h);
    let mut b = h[..n].to_vec();
    b.extend_from_slice(&[0u8; 512]);
    malformed_case(&t, true, &b, fes::INVALID_HEADER_FIELD, Some(10));
}

#[test]
fn h2c_data_outside_the_r2t_window_is_data_out_of_range() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    let mut io = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, false, false);
    let s = rw_sqe(io_opc::WRITE, 9, 0, 32, 16384);
    io.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (p, _) = io.recv_pdu();
    let Pdu::R2t(r) = p else {
        panic!("expected R2T, got {p:?}")
    };
    assert_eq!((r.r2to, r.r2tl), (0, 16384));
    let dp = DataPdu {
        cccid: 9,
        ttag: r.ttag,
        datao: 12288,
        datal: 8192,
        last: true,
        success: false,
    };
    io.send(&Pdu::H2cData(dp), &[0u8; 8192]);
    assert_eq!(io.expect_term().0, fes::DATA_OUT_OF_RANGE);
    let mut good = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 2, false, false);
    write_read(&mut good, 1, 0, &pattern(16384, 2), false);
}

#[test]
fn a_truncated_stream_and_a_vanishing_host_leave_the_target_serving() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    // Host stops sending mid-PDU.
    let mut mid_pdu = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 1, false, false);
    let b = capsule_bytes(&pdu::Framing::default());
    mid_pdu.send_raw(&b[..40]);
    vanish(&mut mid_pdu);
    // Host stops sending mid-R2T write.
    let mut mid_r2t = RawHost::io(t.addr, DEFAULT_SUBNQN, a.cntlid, 2, false, false);
    let s = rw_sqe(io_opc::WRITE, 9, 0, 64, 32768);
    mid_r2t.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (r2t, _) = mid_r2t.recv_pdu();
    assert!(matches!(r2t, Pdu::R2t(_)), "{r2t:?}");
    let dp = DataPdu {
        cccid: 9,
        ttag: 0,
        datao: 0,
        datal: 8192,
        last: false,
        success: false,
    };
    let mut h = [0u8; pdu::MAX_HEADER];
    let n = pdu::encode_header(&Pdu::H2cData(dp), &mid_r2t.tx, &mut h);
    mid_r2t.send_raw(&h[..n]);
    mid_r2t.send_raw(&[1u8; 1000]);
    vanish(&mut mid_r2t);
    // Queue IDs 1 and 2 are free again once the target let both go.
    let mut good = io_when_free(&t, a.cntlid, 1);
    write_read(&mut good, 1, 0, &pattern(8192, 3), false);
    drop(io_when_free(&t, a.cntlid, 2));
    assert!(t.stop().success(), "target exits cleanly on SIGTERM");
}

/// The host goes away without a word: it ends its half of the connection
/// (the target reads end-of-stream where it expected the rest of a PDU)
/// and waits, within the socket's read timeout (10 s), for the target to
/// close its half without sending anything.
fn vanish(h: &mut RawHost) {
    h.s.shutdown(std::net::Shutdown::Write)
        .expect("shutdown the host's half");
    let mut b = [0u8; 64];
    match std::io::Read::read(&mut h.s, &mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("the target sent {n} bytes to a vanished host"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("the target kept a vanished host's connection open past the read timeout")
        }
        Err(e) => panic!("reading from the target: {e}"),
    }
}

/// Connects I/O queue `qid` of controller `cntlid`. A target that has not
/// yet torn down the queue's old connection answers Command Sequence
/// Error, on which a host retries (as Linux nvmet, see docs/core.md):
/// retried on a new connection for up to 10 s, any other status fails.
fn io_when_free(t: &TargetProc, cntlid: u16, qid: u16) -> RawHost {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut h = RawHost::connect(t.addr);
        h.ic(false, false);
        let c = h.fabrics_connect(qid, DEFAULT_SUBNQN, HOSTNQN, cntlid, 32);
        let st = c.status();
        if st.is_success() {
            h.cntlid = cntlid;
            return h;
        }
        assert!(
            st.same_code(Status::COMMAND_SEQUENCE_ERROR),
            "connect qid {qid}: {st}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "qid {qid} still in use 10 s after its host vanished"
        );
    }
}

#[test]
fn discovery_log_lists_the_subsystem_and_the_discovery_service() {
    let t = TargetProc::start(&["--ram", "1M", "--nqn", "nqn.2024-11.io.unvme:test-disc"]);
    let mut a = RawHost::admin(t.addr, DISCOVERY_NQN, false, false);
    let mut s = Sqe {
        opc: admin::opc::GET_LOG_PAGE,
        cid: 5,
        ..Default::default()
    };
    let g = admin::GetLogPage {
        lid: admin::lid::DISCOVERY,
        numd: 4096 / 4 - 1,
        ..Default::default()
    };
    [s.cdw10, s.cdw11, s.cdw12, s.cdw13] = g.to_cdws();
    s.set_sgl(SglDescriptor::transport(4096));
    a.send(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe: s,
            data_len: 0,
        }),
        &[],
    );
    let (c, data) = a.wait_resp(5, &[]);
    assert!(c.status().is_success());
    let (hdr, entries) = decode_log(&data).unwrap();
    assert_eq!(hdr.numrec, 2);
    let nqns: Vec<_> = entries.iter().map(|e| e.subnqn.as_str()).collect();
    assert!(nqns.contains(&"nqn.2024-11.io.unvme:test-disc"));
    assert!(nqns.contains(&DISCOVERY_NQN));
    assert!(entries
        .iter()
        .all(|e| e.trsvcid == t.port().to_string() && e.traddr == "127.0.0.1"));
    // A discovery controller has no I/O queues.
    let mut io = RawHost::connect(t.addr);
    io.ic(false, false);
    assert!(io
        .fabrics_connect(1, DISCOVERY_NQN, HOSTNQN, a.cntlid, 32)
        .status()
        .same_code(Status::CONNECT_INVALID_PARAMETERS));
}

#[test]
fn connect_rejects_unknown_subsystems_and_hosts_not_allowed() {
    let t = TargetProc::start(&[
        "--ram",
        "1M",
        "--allow-host",
        "nqn.2014-08.org.nvmexpress:uuid:allowed",
    ]);
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    assert!(h
        .fabrics_connect(0, "nqn.2024-11.io.unvme:nope", HOSTNQN, 0xFFFF, 32)
        .status()
        .same_code(Status::CONNECT_INVALID_PARAMETERS));
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    assert!(h
        .fabrics_connect(0, DEFAULT_SUBNQN, HOSTNQN, 0xFFFF, 32)
        .status()
        .same_code(Status::CONNECT_INVALID_HOST));
    // An I/O queue for a controller that does not exist.
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    let st = h
        .fabrics_connect(
            1,
            DEFAULT_SUBNQN,
            "nqn.2014-08.org.nvmexpress:uuid:allowed",
            77,
            32,
        )
        .status();
    assert!(st.same_code(Status::CONNECT_INVALID_PARAMETERS), "{st}");
}

#[test]
fn keep_alive_timeout_destroys_the_controller_and_its_io_queues() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let mut h = RawHost::connect(t.addr);
    h.ic(false, false);
    let mut sqe = Sqe {
        cid: 1,
        ..Default::default()
    };
    unvme_proto::fabrics::ConnectCmd {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 500,
    }
    .to_sqe(&mut sqe);
    let data = unvme_proto::fabrics::ConnectData {
        hostid: [7; 16],
        cntlid: 0xFFFF,
        subnqn: DEFAULT_SUBNQN.into(),
        hostnqn: HOSTNQN.into(),
    }
    .encode();
    let c = h.cmd(sqe, &data).0;
    assert!(c.status().is_success());
    h.cntlid = c.dw0 as u16;
    h.prop_set(unvme_proto::regs::CC, 1);
    let mut io = RawHost::io(t.addr, DEFAULT_SUBNQN, h.cntlid, 1, false, false);
    // No keep-alive for well over KATO + grace: both connections close.
    let start = std::time::Instant::now();
    assert!(matches!(h.recv(), Rx::Closed));
    assert!(matches!(io.recv(), Rx::Closed));
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn shutdown_notification_reports_shst_complete() {
    let t = TargetProc::start(&["--ram", "1M"]);
    let mut a = RawHost::admin(t.addr, DEFAULT_SUBNQN, false, false);
    a.prop_set(unvme_proto::regs::CC, 1 | (1 << 14));
    // The flush runs off the reactor: SHST reads 01b (processing) until it
    // is done, then 10b (complete).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shst = a.prop_get(unvme_proto::regs::CSTS, false) & 0xc;
        if shst == 0x8 {
            break;
        }
        assert_eq!(shst, 0x4, "SHST = shutdown processing occurring");
        assert!(std::time::Instant::now() < deadline, "SHST never complete");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let cap = a.prop_get(unvme_proto::regs::CAP, true);
    assert_eq!(cap & 0xffff, 127, "MQES = max queue size - 1");
}
