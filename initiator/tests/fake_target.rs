//! The initiator against a minimal fake NVMe/TCP controller on a loopback
//! socket, built from `unvme-proto`: the bring-up sequence, in-capsule and
//! R2T writes, reads split over C2HData PDUs, digests, statuses, and a target
//! that vanishes or terminates mid-I/O, and a hostile one: reads answered
//! with too little, overlapping, out-of-range or duplicated data, floods of
//! R2Ts, and responses for commands that do not exist.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unvme_bdev::{Bdev, IoBuf, IoError, IoOp, IoRequest};
use unvme_initiator::{ConnectOptions, Controller, DataDir, RemoteNamespace};
use unvme_proto::fabrics::{self, fctype, ConnectCmd, ConnectData, PropertyCmd};
use unvme_proto::nvme::{io_opc, Cqe, Sqe, Status};
use unvme_proto::pdu::{
    digest, encode_header, CapsuleResp, DataPdu, Event, Framing, IcResp, Limits, Pdu, PduDecoder,
    R2t, Role, TermReq, MAX_HEADER,
};
use unvme_proto::regs::{self, cap_value};

const BS: usize = 512;
const NBLOCKS: u64 = 2048;
const SUBNQN: &str = "nqn.2024-11.io.unvme:fake";

/// What the fake controller does.
#[derive(Clone, Debug)]
struct Behaviour {
    maxh2cdata: u32,
    /// IOCCSZ in 16-byte units (4 = no in-capsule data).
    ioccsz: u32,
    /// Bytes per C2HData PDU.
    c2h_chunk: usize,
    /// Complete reads with the SUCCESS flag instead of a CapsuleResp.
    success_flag: bool,
    /// Corrupt the data digest of reads at this LBA.
    corrupt_read_lba: Option<u64>,
    /// Close the connection when a Read arrives on an I/O queue.
    close_on_read: bool,
    /// Send a C2HTermReq when a Read arrives on an I/O queue.
    term_on_read: bool,
    /// Never answer commands with this opcode.
    ignore_opcode: Option<u8>,
    /// Send C2HData headers and data in separate, delayed segments, so the
    /// host reads data straight into its buffer.
    dribble: bool,
    /// Corrupt the header digest of C2HData PDUs.
    corrupt_hdgst: bool,
    /// Answer the first N I/O queue Connects with Command Sequence Error (as
    /// Linux nvmet does while the qid's previous queue is being torn down).
    busy_io_connects: usize,
    /// How to lie about the data of the first `attacks` I/O reads.
    bad_read: Option<BadRead>,
    /// Number of I/O reads (and writes, for `r2t_flood`) attacked; the
    /// ones after them are answered honestly.
    attacks: usize,
    /// Answer the first `attacks` R2T writes with this many R2Ts for the
    /// whole transfer, then stop reading.
    r2t_flood: usize,
    /// Before answering the first `attacks` reads, send this many
    /// CapsuleResps for commands that do not exist.
    unknown_cqes: usize,
    /// Answer this many R2T writes with an R2T each, then stop reading
    /// (with a receive buffer of a few KiB).
    stall_on_r2t: usize,
}

/// Lies a hostile controller tells about a read's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadRead {
    /// One 512-byte C2HData flagged LAST_PDU|SUCCESS for the whole read.
    ShortSuccess,
    /// 512 bytes of C2HData, then a successful CapsuleResp.
    ShortCapsuleResp,
    /// The first half, then a PDU starting 512 bytes before its end.
    Overlap,
    /// The first half twice, then the second half.
    Duplicate,
    /// The second half only, with SUCCESS.
    Gap,
    /// A PDU reaching 512 bytes past the read's end.
    OutOfRange,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            maxh2cdata: 32768,
            ioccsz: (8192 + 64) / 16,
            c2h_chunk: 1 << 20,
            success_flag: false,
            corrupt_read_lba: None,
            close_on_read: false,
            term_on_read: false,
            ignore_opcode: None,
            dribble: false,
            corrupt_hdgst: false,
            busy_io_connects: 0,
            bad_read: None,
            attacks: 0,
            r2t_flood: 0,
            unknown_cqes: 0,
            stall_on_r2t: 0,
        }
    }
}

/// What the fake controller saw.
#[derive(Debug, Default)]
struct Log {
    icreq_dgst: Vec<u8>,
    icreq_other: Vec<(u16, u8, u32)>,
    connects: Vec<(ConnectCmd, ConnectData)>,
    props: Vec<(bool, u32, u64)>,
    admin_opcodes: Vec<u8>,
    incapsule_writes: Vec<u32>,
    h2c: Vec<(u16, u32, u32, bool)>,
    sgl_types: Vec<(u8, u8)>,
    term_reqs: Vec<(u16, u32)>,
    /// I/O commands attacked so far.
    attacked: usize,
    /// Connections the fake saw end (EOF or error).
    closed: usize,
}

struct Fake {
    port: u16,
    log: Arc<Mutex<Log>>,
}

fn start(b: Behaviour) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    if b.stall_on_r2t > 0 {
        small_receive_buffer(&l);
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let disk = Arc::new(Mutex::new(vec![0u8; NBLOCKS as usize * BS]));
    let (log2, b2) = (log.clone(), b.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (log, disk, b) = (log2.clone(), disk.clone(), b2.clone());
            std::thread::spawn(move || {
                let _ = Conn::new(s, b, log.clone(), disk).run();
                log.lock().unwrap().closed += 1;
            });
        }
    });
    Fake { port, log }
}

/// Gives the sockets `l` accepts a 4 KiB receive buffer (inherited from the
/// listener), so a peer that stops reading holds little of the host's data.
fn small_receive_buffer(l: &TcpListener) {
    small_buffer(l, libc::SO_RCVBUF);
}

/// Sets socket buffer option `opt` (SO_RCVBUF, SO_SNDBUF) of `s` to 4 KiB.
fn small_buffer(s: &impl std::os::fd::AsRawFd, opt: libc::c_int) {
    let v: libc::c_int = 4096;
    // SAFETY: the fd is open for the call (`s` is borrowed across it); the option value is a c_int that lives across it, and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {opt}");
}

struct Conn {
    s: TcpStream,
    b: Behaviour,
    log: Arc<Mutex<Log>>,
    disk: Arc<Mutex<Vec<u8>>>,
    dec: PduDecoder,
    tx: Framing,
    qid: u16,
    cc: u32,
    /// A write waiting for its H2CData: (sqe, buffer, received).
    pending: Option<(Sqe, Vec<u8>, usize)>,
}

impl Conn {
    fn new(s: TcpStream, b: Behaviour, log: Arc<Mutex<Log>>, disk: Arc<Mutex<Vec<u8>>>) -> Self {
        let dec = PduDecoder::new(
            Role::Controller,
            Limits {
                max_incapsule: 8192,
                max_data: b.maxh2cdata,
            },
        );
        Conn {
            s,
            b,
            log,
            disk,
            dec,
            tx: Framing::default(),
            qid: 0,
            cc: 0,
            pending: None,
        }
    }

    fn send(&mut self, p: &Pdu, data: &[u8], corrupt: bool) -> std::io::Result<()> {
        let mut h = [0u8; MAX_HEADER];
        let n = encode_header(p, &self.tx, &mut h);
        let mut v = h[..n].to_vec();
        if self.b.corrupt_hdgst && self.tx.hdgst && matches!(p, Pdu::C2hData(_)) {
            v[24] ^= 1;
        }
        if self.b.dribble && matches!(p, Pdu::C2hData(_)) {
            self.s.write_all(&v)?;
            v.clear();
            let half = data.len() / 2;
            for part in [&data[..half], &data[half..]] {
                std::thread::sleep(Duration::from_millis(3));
                self.s.write_all(part)?;
            }
            std::thread::sleep(Duration::from_millis(3));
        } else {
            v.extend_from_slice(data);
        }
        if self.tx.ddgst && !data.is_empty() && matches!(p, Pdu::C2hData(_)) {
            let mut d = digest(&[data]);
            if corrupt {
                d[0] ^= 0xff;
            }
            v.extend_from_slice(&d);
        }
        self.s.write_all(&v)
    }

    fn respond(&mut self, sqe: &Sqe, status: Status, dw0: u32, dw1: u32) -> std::io::Result<()> {
        let cqe = Cqe {
            dw0,
            dw1,
            sqhd: 0,
            sqid: self.qid,
            cid: sqe.cid,
            status: status.to_field(),
        };
        self.send(&Pdu::CapsuleResp(CapsuleResp { cqe }), &[], false)
    }

    fn send_read(&mut self, sqe: &Sqe, data: &[u8], corrupt: bool) -> std::io::Result<()> {
        let chunk = self.b.c2h_chunk.max(1);
        let mut off = 0;
        while off < data.len() {
            let n = (data.len() - off).min(chunk);
            let last = off + n == data.len();
            let d = DataPdu {
                cccid: sqe.cid,
                ttag: 0,
                datao: off as u32,
                datal: n as u32,
                last,
                success: last && self.b.success_flag,
            };
            self.send(&Pdu::C2hData(d), &data[off..off + n], corrupt && last)?;
            off += n;
        }
        if !self.b.success_flag || data.is_empty() {
            self.respond(sqe, Status::SUCCESS, 0, 0)?;
        }
        Ok(())
    }

    fn run(mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        let mut cur: Option<(Pdu, Vec<u8>)> = None;
        loop {
            let n = self.s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut off = 0;
            loop {
                let (used, ev) = match self.dec.decode(&buf[off..n]) {
                    Ok(x) => x,
                    Err(_) => return Ok(()),
                };
                off += used;
                match ev {
                    Some(Event::Pdu(p)) => {
                        if p.data_len() == 0 {
                            self.handle(p, Vec::new())?;
                        } else {
                            cur = Some((p, Vec::new()));
                        }
                    }
                    Some(Event::Data(d)) => {
                        if let Some((_, v)) = cur.as_mut() {
                            v.extend_from_slice(d);
                        }
                    }
                    Some(Event::DataEnd { .. }) => {
                        if let Some((p, v)) = cur.take() {
                            self.handle(p, v)?;
                        }
                    }
                    None if used == 0 && off == n => break,
                    None => {}
                }
            }
        }
    }

    fn handle(&mut self, p: Pdu, data: Vec<u8>) -> std::io::Result<()> {
        match p {
            Pdu::IcReq(r) => {
                {
                    let mut l = self.log.lock().unwrap();
                    l.icreq_dgst.push(r.dgst);
                    l.icreq_other.push((r.pfv, r.hpda, r.maxr2t));
                }
                let resp = IcResp {
                    pfv: 0,
                    cpda: 0,
                    dgst: r.dgst,
                    maxh2cdata: self.b.maxh2cdata,
                };
                self.send(&Pdu::IcResp(resp), &[], false)?;
                let f = Framing {
                    hdgst: r.dgst & 1 != 0,
                    ddgst: r.dgst & 2 != 0,
                    pda: 0,
                };
                self.dec.set_framing(f);
                self.tx = f;
            }
            Pdu::CapsuleCmd(c) => self.command(c.sqe, data)?,
            Pdu::H2cTermReq(t) => self.log.lock().unwrap().term_reqs.push((t.fes, t.fei)),
            Pdu::H2cData(d) => {
                self.log
                    .lock()
                    .unwrap()
                    .h2c
                    .push((d.cccid, d.datao, d.datal, d.last));
                if let Some((sqe, mut buf, got)) = self.pending.take() {
                    let o = d.datao as usize;
                    buf[o..o + data.len()].copy_from_slice(&data);
                    let got = got + data.len();
                    if got == buf.len() {
                        self.write(&sqe, &buf)?;
                    } else {
                        self.pending = Some((sqe, buf, got));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn lba_range(&self, sqe: &Sqe) -> Option<std::ops::Range<usize>> {
        let end = sqe.slba().checked_add(u64::from(sqe.nlb()))?;
        (end <= NBLOCKS).then(|| sqe.slba() as usize * BS..end as usize * BS)
    }

    fn write(&mut self, sqe: &Sqe, data: &[u8]) -> std::io::Result<()> {
        match self.lba_range(sqe) {
            Some(r) => {
                self.disk.lock().unwrap()[r].copy_from_slice(data);
                self.respond(sqe, Status::SUCCESS, 0, 0)
            }
            None => self.respond(sqe, Status::LBA_OUT_OF_RANGE, 0, 0),
        }
    }

    fn command(&mut self, sqe: Sqe, data: Vec<u8>) -> std::io::Result<()> {
        let sgl = sqe.sgl();
        self.log
            .lock()
            .unwrap()
            .sgl_types
            .push((sqe.opc, sgl.sgl_type));
        if Some(sqe.opc) == self.b.ignore_opcode {
            return Ok(());
        }
        if sqe.opc == fabrics::OPC_FABRICS {
            return self.fabrics(sqe, data);
        }
        if self.qid == 0 {
            self.log.lock().unwrap().admin_opcodes.push(sqe.opc);
            return self.admin(sqe);
        }
        match sqe.opc {
            io_opc::READ => {
                if self.b.close_on_read {
                    let _ = self.s.shutdown(std::net::Shutdown::Both);
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                if self.b.term_on_read {
                    let t = TermReq {
                        fes: 0x02,
                        fei: 0,
                        data_len: 0,
                    };
                    self.send(&Pdu::C2hTermReq(t), &[], false)?;
                    let _ = self.s.shutdown(std::net::Shutdown::Both);
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                match self.lba_range(&sqe) {
                    Some(r) => {
                        let d = self.disk.lock().unwrap()[r].to_vec();
                        if self.take_attack() {
                            return self.attack_read(&sqe, &d);
                        }
                        let corrupt = self.b.corrupt_read_lba == Some(sqe.slba());
                        self.send_read(&sqe, &d, corrupt)
                    }
                    None => self.respond(&sqe, Status::LBA_OUT_OF_RANGE, 0, 0),
                }
            }
            io_opc::WRITE => {
                let len = sqe.nlb() as usize * BS;
                if !data.is_empty() {
                    self.log
                        .lock()
                        .unwrap()
                        .incapsule_writes
                        .push(data.len() as u32);
                    return self.write(&sqe, &data);
                }
                let r2t = R2t {
                    cccid: sqe.cid,
                    ttag: 7,
                    r2to: 0,
                    r2tl: len as u32,
                };
                if self.b.stall_on_r2t > 0 {
                    self.send(&Pdu::R2t(r2t), &[], false)?;
                    let n = {
                        let mut l = self.log.lock().unwrap();
                        l.attacked += 1;
                        l.attacked
                    };
                    if n < self.b.stall_on_r2t {
                        return Ok(());
                    }
                }
                let flood = self.b.r2t_flood;
                if (flood > 0 && self.take_attack()) || self.b.stall_on_r2t > 0 {
                    let mut v = Vec::new();
                    let mut h = [0u8; MAX_HEADER];
                    for _ in 0..flood {
                        let n = encode_header(&Pdu::R2t(r2t), &self.tx, &mut h);
                        v.extend_from_slice(&h[..n]);
                    }
                    // The flood may be cut short by the host closing.
                    let _ = self.s.write_all(&v);
                    // Never read again (the host's data piles up), until
                    // the host closes the connection.
                    // (A reset or EOF shows as a failed or empty peek; the
                    // unread data keeps a peek succeeding otherwise, so
                    // the wait is bounded.)
                    let mut one = [0u8; 1];
                    let end = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < end && self.s.peek(&mut one).is_ok_and(|n| n > 0) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                self.pending = Some((sqe, vec![0; len], 0));
                self.send(&Pdu::R2t(r2t), &[], false)
            }
            io_opc::FLUSH => self.respond(&sqe, Status::SUCCESS, 0, 0),
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0, 0),
        }
    }

    /// Whether this I/O command is one of the first `attacks`.
    fn take_attack(&mut self) -> bool {
        let mut l = self.log.lock().unwrap();
        if l.attacked >= self.b.attacks {
            return false;
        }
        l.attacked += 1;
        true
    }

    /// Answers a read with the lie of `bad_read`, after the CapsuleResps
    /// for unknown commands of `unknown_cqes`.
    fn attack_read(&mut self, sqe: &Sqe, data: &[u8]) -> std::io::Result<()> {
        if self.b.unknown_cqes > 0 {
            let mut v = Vec::new();
            let mut h = [0u8; MAX_HEADER];
            for i in 0..self.b.unknown_cqes {
                let cqe = Cqe {
                    sqid: self.qid,
                    cid: 0x8000 | i as u16,
                    ..Cqe::default()
                };
                let n = encode_header(&Pdu::CapsuleResp(CapsuleResp { cqe }), &self.tx, &mut h);
                v.extend_from_slice(&h[..n]);
            }
            // The host may close the connection before all of it is sent.
            let _ = self.s.write_all(&v);
        }
        let len = data.len();
        let half = len / 2;
        let c2h = |datao: usize, datal: usize, success: bool| DataPdu {
            cccid: sqe.cid,
            ttag: 0,
            datao: datao as u32,
            datal: datal as u32,
            last: success,
            success,
        };
        let pdus: Vec<(DataPdu, Vec<u8>)> = match self.b.bad_read {
            None => Vec::new(),
            Some(BadRead::ShortSuccess) => vec![(c2h(0, 512, true), data[..512].to_vec())],
            Some(BadRead::ShortCapsuleResp) => vec![(c2h(0, 512, false), data[..512].to_vec())],
            Some(BadRead::Overlap) => vec![
                (c2h(0, half, false), data[..half].to_vec()),
                (
                    c2h(half - 512, len - half + 512, true),
                    data[half - 512..].to_vec(),
                ),
            ],
            Some(BadRead::Duplicate) => vec![
                (c2h(0, half, false), data[..half].to_vec()),
                (c2h(0, half, false), data[..half].to_vec()),
                (c2h(half, len - half, true), data[half..].to_vec()),
            ],
            Some(BadRead::Gap) => vec![(c2h(half, len - half, true), data[half..].to_vec())],
            Some(BadRead::OutOfRange) => vec![
                (c2h(0, half, false), data[..half].to_vec()),
                (
                    c2h(half, len - half + 512, true),
                    vec![0x5a; len - half + 512],
                ),
            ],
        };
        for (d, bytes) in pdus {
            self.send(&Pdu::C2hData(d), &bytes, false)?;
        }
        if self.b.bad_read == Some(BadRead::ShortCapsuleResp) || self.b.bad_read.is_none() {
            self.respond(sqe, Status::SUCCESS, 0, 0)?;
        }
        Ok(())
    }

    fn fabrics(&mut self, sqe: Sqe, data: Vec<u8>) -> std::io::Result<()> {
        match sqe.fctype() {
            fctype::CONNECT => {
                let c = ConnectCmd::from_sqe(&sqe);
                let d = ConnectData::decode(&data).unwrap();
                self.qid = c.qid;
                let io_connects = {
                    let mut l = self.log.lock().unwrap();
                    l.connects.push((c, d));
                    l.connects.iter().filter(|(c, _)| c.qid != 0).count()
                };
                if self.qid != 0 && io_connects <= self.b.busy_io_connects {
                    return self.respond(&sqe, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
                }
                self.respond(&sqe, Status::SUCCESS, 1, 0)
            }
            fctype::PROPERTY_GET => {
                let p = PropertyCmd::from_sqe(&sqe);
                self.log.lock().unwrap().props.push((false, p.ofst, 0));
                let v: u64 = match p.ofst {
                    regs::CAP => cap_value(127, 1),
                    regs::VS => 0x0002_0000,
                    regs::CSTS => {
                        let rdy = u64::from(self.cc & 1);
                        let shst = if self.cc & regs::cc::SHN_MASK != 0 {
                            0x8
                        } else {
                            0
                        };
                        rdy | shst
                    }
                    regs::CC => u64::from(self.cc),
                    _ => 0,
                };
                self.respond(&sqe, Status::SUCCESS, v as u32, (v >> 32) as u32)
            }
            fctype::PROPERTY_SET => {
                let p = PropertyCmd::from_sqe(&sqe);
                self.log.lock().unwrap().props.push((true, p.ofst, p.value));
                if p.ofst == regs::CC {
                    self.cc = p.value as u32;
                }
                self.respond(&sqe, Status::SUCCESS, 0, 0)
            }
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0, 0),
        }
    }

    fn admin(&mut self, sqe: Sqe) -> std::io::Result<()> {
        match sqe.opc {
            0x06 => {
                let mut b = vec![0u8; 4096];
                match sqe.cdw10 & 0xff {
                    1 => {
                        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        b[4..8].copy_from_slice(b"FAKE");
                        b[24..28].copy_from_slice(b"fake");
                        b[77] = 5; // MDTS: 128 KiB
                        b[78..80].copy_from_slice(&1u16.to_le_bytes());
                        b[111] = 1;
                        b[516..520].copy_from_slice(&1u32.to_le_bytes());
                        b[520..522].copy_from_slice(&0x0cu16.to_le_bytes());
                        b[768..768 + SUBNQN.len()].copy_from_slice(SUBNQN.as_bytes());
                        b[1792..1796].copy_from_slice(&self.b.ioccsz.to_le_bytes());
                        b[1796..1800].copy_from_slice(&1u32.to_le_bytes());
                    }
                    0 => {
                        b[0..8].copy_from_slice(&NBLOCKS.to_le_bytes());
                        b[8..16].copy_from_slice(&NBLOCKS.to_le_bytes());
                        b[128 + 2] = 9;
                    }
                    2 => b[0..4].copy_from_slice(&1u32.to_le_bytes()),
                    _ => {}
                }
                self.send_read(&sqe, &b, false)
            }
            0x09 => self.respond(&sqe, Status::SUCCESS, 1 | (1 << 16), 0),
            0x18 => self.respond(&sqe, Status::SUCCESS, 0, 0),
            _ => self.respond(&sqe, Status::INVALID_OPCODE, 0, 0),
        }
    }
}

fn opts(port: u16) -> ConnectOptions {
    ConnectOptions {
        port,
        subnqn: SUBNQN.into(),
        command_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write(lba: u64, data: &[u8], tag: u64) -> IoRequest {
    IoRequest {
        tag,
        op: IoOp::Write {
            lba,
            nlb: (data.len() / BS) as u32,
            fua: false,
        },
        buf: Some(IoBuf::from_slice(data)),
        more: Vec::new(),
    }
}

fn read(lba: u64, nlb: u32, tag: u64) -> IoRequest {
    IoRequest {
        tag,
        op: IoOp::Read { lba, nlb },
        buf: Some(IoBuf::new(nlb as usize * BS)),
        more: Vec::new(),
    }
}

#[test]
fn connect_runs_icreq_connect_properties_identify_and_queue_setup() {
    let f = start(Behaviour::default());
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    assert_eq!(ctrl.cntlid(), 1);
    assert_eq!(ctrl.num_io_queues(), 2);
    assert_eq!(ctrl.identify().subnqn, SUBNQN);
    assert_eq!(ctrl.max_transfer(), 128 * 1024);
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1]);
    let qp = ctrl.create_io_qpair().unwrap();
    assert_eq!(qp.qid(), 1);
    {
        let l = f.log.lock().unwrap();
        assert_eq!(l.icreq_other[0], (0, 0, 0), "PFV 0, HPDA 0, MAXR2T 0");
        assert_eq!(l.icreq_dgst[0], 0);
        let (c, d) = &l.connects[0];
        assert_eq!((c.qid, c.sqsize, c.kato), (0, 31, 5000));
        assert!(c.sqflow_disabled());
        assert_eq!(d.cntlid, 0xffff);
        assert_eq!(d.subnqn, SUBNQN);
        assert!(d.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        let (c, d) = &l.connects[1];
        assert_eq!((c.qid, c.sqsize, c.kato), (1, 127, 0));
        assert_eq!(d.cntlid, 1);
        let p: Vec<_> = l.props.iter().take(4).copied().collect();
        assert_eq!(p[0], (false, regs::CAP, 0));
        assert_eq!(p[1], (false, regs::VS, 0));
        assert_eq!(p[2], (true, regs::CC, 1 | (6 << 16) | (4 << 20)));
        assert_eq!(p[3], (false, regs::CSTS, 0));
        assert_eq!(&l.admin_opcodes[..2], &[0x06, 0x09]);
        // Connect data goes in the capsule; Identify uses a transport SGL.
        assert_eq!(l.sgl_types[0], (0x7f, 0x01));
        assert!(l.sgl_types.contains(&(0x06, 0x5a)));
    }
    drop(qp);
    ctrl.disconnect().unwrap();
    let l = f.log.lock().unwrap();
    let last_set = l.props.iter().rev().find(|p| p.0).unwrap();
    assert_eq!(
        last_set.2 as u32 & regs::cc::SHN_MASK,
        1 << 14,
        "normal shutdown"
    );
}

#[test]
fn small_write_goes_in_capsule_and_reads_back() {
    let f = start(Behaviour::default());
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let data = pattern(4096, 1);
    let c = qp.run_sync(1, write(8, &data, 1)).unwrap();
    assert_eq!(c.result, Ok(()));
    let c = qp.run_sync(1, read(8, 8, 2)).unwrap();
    assert_eq!(c.result, Ok(()));
    assert_eq!(&c.buf.unwrap()[..], &data[..]);
    let l = f.log.lock().unwrap();
    assert_eq!(l.incapsule_writes, vec![4096]);
    assert!(l.h2c.is_empty());
}

#[test]
fn r2t_write_larger_than_maxh2cdata_is_split() {
    let f = start(Behaviour {
        maxh2cdata: 4096,
        ioccsz: 4,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let data = pattern(16384 + 1024, 2);
    let c = qp.run_sync(1, write(100, &data, 1)).unwrap();
    assert_eq!(c.result, Ok(()));
    {
        let l = f.log.lock().unwrap();
        assert!(l.incapsule_writes.is_empty());
        let h: Vec<_> = l.h2c.iter().map(|&(_, o, n, last)| (o, n, last)).collect();
        assert_eq!(
            h,
            vec![
                (0, 4096, false),
                (4096, 4096, false),
                (8192, 4096, false),
                (12288, 4096, false),
                (16384, 1024, true)
            ]
        );
        assert!(l.sgl_types.contains(&(io_opc::WRITE, 0x5a)));
    }
    let c = qp.run_sync(1, read(100, 34, 2)).unwrap();
    assert_eq!(&c.buf.unwrap()[..], &data[..]);
}

fn read_in_pieces(success_flag: bool) {
    let f = start(Behaviour {
        c2h_chunk: 1000,
        success_flag,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let data = pattern(8192, 3);
    assert_eq!(qp.run_sync(1, write(0, &data, 1)).unwrap().result, Ok(()));
    // Several reads in flight at once, each arriving in 9 C2HData PDUs.
    for t in 0..4u64 {
        qp.submit(1, read(0, 16, 10 + t)).unwrap();
    }
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while out.len() < 4 && Instant::now() < end {
        qp.poll_nvme(&mut out);
    }
    assert_eq!(out.len(), 4);
    for c in out {
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.status(), Some(Status::SUCCESS));
        assert_eq!(&c.buf.unwrap()[..], &data[..]);
    }
}

#[test]
fn read_in_several_c2h_pdus_completes_with_capsule_resp() {
    read_in_pieces(false);
}

#[test]
fn read_in_several_c2h_pdus_completes_with_success_flag() {
    read_in_pieces(true);
}

#[test]
fn data_digest_mismatch_fails_only_that_command() {
    for success_flag in [false, true] {
        let f = start(Behaviour {
            corrupt_read_lba: Some(7),
            success_flag,
            ..Behaviour::default()
        });
        let mut o = opts(f.port);
        o.data_digest = true;
        o.hdr_digest = true;
        let ctrl = Controller::connect(o).unwrap();
        assert_eq!(f.log.lock().unwrap().icreq_dgst[0], 3);
        let mut qp = ctrl.create_io_qpair().unwrap();
        let data = pattern(512 * 9, 4);
        assert_eq!(qp.run_sync(1, write(0, &data, 1)).unwrap().result, Ok(()));
        let c = qp.run_sync(1, read(7, 1, 2)).unwrap();
        assert!(matches!(c.result, Err(IoError::Media(_))), "{:?}", c.result);
        let c = qp.run_sync(1, read(0, 9, 3)).unwrap();
        assert_eq!(c.result, Ok(()));
        assert_eq!(&c.buf.unwrap()[..], &data[..]);
        assert!(!qp.is_closed());
    }
}

#[test]
fn nvme_error_statuses_are_reported_exactly() {
    let f = start(Behaviour::default());
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let c = qp.run_sync(1, read(NBLOCKS - 1, 2, 1)).unwrap();
    assert_eq!(c.result, Err(IoError::OutOfRange));
    let sqe = Sqe {
        opc: 0x7e,
        nsid: 1,
        ..Sqe::default()
    };
    let c = qp.run_raw_sync(sqe, None, DataDir::None, 2).unwrap();
    assert_eq!(c.status(), Some(Status::INVALID_OPCODE));
    assert_eq!(c.result, Err(IoError::Unsupported));
    let mut sqe = Sqe {
        opc: io_opc::READ,
        nsid: 1,
        ..Sqe::default()
    };
    sqe.set_lba_range(NBLOCKS, 1);
    let c = qp
        .run_raw_sync(sqe, Some(IoBuf::new(512)), DataDir::ControllerToHost, 3)
        .unwrap();
    assert!(c.status().unwrap().same_code(Status::LBA_OUT_OF_RANGE));
}

#[test]
fn target_closing_mid_io_fails_outstanding_commands_with_unavailable() {
    let f = start(Behaviour {
        close_on_read: true,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    for t in 0..4 {
        qp.submit(1, read(t, 1, t)).unwrap();
    }
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while out.len() < 4 && Instant::now() < end {
        qp.poll(&mut out);
    }
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|c| c.result == Err(IoError::Unavailable)));
    assert!(out.iter().all(|c| c.buf.is_some()), "buffers come back");
    assert!(qp.is_closed());
    let c = qp.run_sync(1, read(0, 1, 9)).unwrap();
    assert_eq!(c.result, Err(IoError::Unavailable));
}

#[test]
fn c2h_term_req_fails_outstanding_commands() {
    let f = start(Behaviour {
        term_on_read: true,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let c = qp.run_sync(1, read(0, 1, 1)).unwrap();
    assert_eq!(c.result, Err(IoError::Unavailable));
    assert!(qp.is_closed());
}

#[test]
fn unanswered_command_times_out() {
    let f = start(Behaviour {
        ignore_opcode: Some(io_opc::FLUSH),
        ..Behaviour::default()
    });
    let mut o = opts(f.port);
    o.command_timeout = Duration::from_millis(200);
    let ctrl = Controller::connect(o).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let t0 = Instant::now();
    let c = qp
        .run_sync(
            1,
            IoRequest {
                tag: 1,
                op: IoOp::Flush,
                buf: None,
                more: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(c.result, Err(IoError::Timeout));
    assert!(t0.elapsed() < Duration::from_secs(3));
    // The queue pair still works.
    assert_eq!(qp.run_sync(1, read(0, 1, 2)).unwrap().result, Ok(()));
}

#[test]
fn remote_namespace_is_a_bdev() {
    let f = start(Behaviour::default());
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let ns = RemoteNamespace::open(&ctrl, 1).unwrap();
    assert_eq!(ns.info().block_size, 512);
    assert_eq!(ns.info().num_blocks, NBLOCKS);
    assert_eq!(ns.info().max_transfer, 128 * 1024);
    let mut q = ns.open_queue().unwrap();
    let data = pattern(1024, 5);
    q.submit(write(3, &data, 1)).unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while out.is_empty() && Instant::now() < end {
        q.poll(&mut out);
    }
    assert_eq!(out[0].result, Ok(()));
    q.submit(read(3, 2, 2)).unwrap();
    out.clear();
    while out.is_empty() && Instant::now() < end {
        q.poll(&mut out);
    }
    assert_eq!(&out[0].buf.as_ref().unwrap()[..], &data[..]);
    // Larger than MDTS: refused locally.
    q.submit(read(0, 512, 3)).unwrap();
    out.clear();
    while out.is_empty() && Instant::now() < end {
        q.poll(&mut out);
    }
    assert_eq!(out[0].result, Err(IoError::TooLarge));
}

#[test]
fn read_data_arriving_after_its_header_lands_in_the_buffer_with_digest_checked() {
    let f = start(Behaviour {
        dribble: true,
        c2h_chunk: 3000,
        ..Behaviour::default()
    });
    let mut o = opts(f.port);
    o.data_digest = true;
    let ctrl = Controller::connect(o).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let data = pattern(8192, 6);
    assert_eq!(qp.run_sync(1, write(40, &data, 1)).unwrap().result, Ok(()));
    let c = qp.run_sync(1, read(40, 16, 2)).unwrap();
    assert_eq!(c.result, Ok(()));
    assert_eq!(&c.buf.unwrap()[..], &data[..]);
}

#[test]
fn header_digest_error_ends_the_connection_with_h2c_term_req() {
    let f = start(Behaviour {
        corrupt_hdgst: true,
        ..Behaviour::default()
    });
    let mut o = opts(f.port);
    o.hdr_digest = true;
    // Identify Controller's C2HData arrives with a bad header digest.
    let err = Controller::connect(o).unwrap_err();
    assert!(err.to_string().contains("Identify"), "{err}");
    let end = Instant::now() + Duration::from_secs(5);
    while f.log.lock().unwrap().term_reqs.is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let l = f.log.lock().unwrap();
    assert_eq!(l.term_reqs[0].0, 0x03, "FES Header Digest Error");
}

#[test]
fn io_connect_refused_while_the_qid_is_torn_down_is_retried() {
    // Linux nvmet frees a queue asynchronously after its connection closes;
    // until then a Connect for that qid gets Command Sequence Error ("qid 1
    // has already been created"), e.g. when a dropped queue pair's qid is
    // reused at once.
    let f = start(Behaviour {
        busy_io_connects: 2,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    assert_eq!(qp.qid(), 1);
    let data = pattern(4096, 7);
    assert_eq!(qp.run_sync(1, write(0, &data, 1)).unwrap().result, Ok(()));
    let io: Vec<u16> = {
        let l = f.log.lock().unwrap();
        l.connects
            .iter()
            .filter(|(c, _)| c.qid != 0)
            .map(|(c, _)| c.qid)
            .collect()
    };
    assert_eq!(
        io,
        vec![1, 1, 1],
        "two refused Connects, then success on the same qid"
    );
    drop(qp);
    ctrl.disconnect().unwrap();
}

/// A read the hostile controller lies about fails, is never reported
/// successful with what was in the buffer before, and ends the connection
/// with an H2CTermReq carrying `fes`.
fn lying_read_fails_and_ends_the_connection(bad: BadRead, fes: u16) {
    let f = start(Behaviour {
        bad_read: Some(bad),
        attacks: 1,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    // 64 KiB of data on the disk, and a buffer full of a previous request's.
    let data = pattern(64 * 1024, 3);
    assert_eq!(qp.run_sync(1, write(0, &data, 1)).unwrap().result, Ok(()));
    let mut req = read(0, 128, 2);
    req.buf.as_mut().unwrap().fill(0xee);
    let c = qp.run_sync(1, req).unwrap();
    assert_eq!(c.result, Err(IoError::Unavailable), "{bad:?}");
    assert!(qp.is_closed(), "{bad:?}: the connection ends");
    let end = Instant::now() + Duration::from_secs(5);
    while f.log.lock().unwrap().term_reqs.is_empty() && Instant::now() < end {
        std::thread::yield_now();
    }
    let l = f.log.lock().unwrap();
    assert_eq!(l.term_reqs.len(), 1, "{bad:?}: one H2CTermReq");
    assert_eq!(l.term_reqs[0].0, fes, "{bad:?}: FES");
}

#[test]
fn c2h_success_with_512_of_65536_bytes_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::ShortSuccess, 0x01);
}

#[test]
fn capsule_resp_success_after_short_c2h_data_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::ShortCapsuleResp, 0x02);
}

#[test]
fn overlapping_c2h_data_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::Overlap, 0x04);
}

#[test]
fn duplicated_c2h_data_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::Duplicate, 0x04);
}

#[test]
fn c2h_data_leaving_a_gap_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::Gap, 0x04);
}

#[test]
fn c2h_data_past_the_read_fails_the_read() {
    lying_read_fails_and_ends_the_connection(BadRead::OutOfRange, 0x04);
}

#[test]
fn remote_namespace_retries_a_lying_read_on_a_new_connection_and_returns_true_data() {
    let f = start(Behaviour {
        bad_read: Some(BadRead::ShortSuccess),
        attacks: 1,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let ns = RemoteNamespace::open(&ctrl, 1).unwrap();
    let mut q = ns.open_queue().unwrap();
    let data = pattern(64 * 1024, 9);
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut run = |q: &mut Box<dyn unvme_bdev::BdevQueue>, req: IoRequest| {
        q.submit(req).unwrap();
        out.clear();
        while out.is_empty() && Instant::now() < end {
            q.poll(&mut out);
        }
        out.pop().expect("a completion before the deadline")
    };
    assert_eq!(run(&mut q, write(0, &data, 1)).result, Ok(()));
    let mut req = read(0, 128, 2);
    req.buf.as_mut().unwrap().fill(0xee);
    // The lie ends the connection; the read is held, sent again on a new
    // one, and completes once, with the disk's data (never the stale buffer).
    let c = run(&mut q, req);
    assert_eq!(c.tag, 2);
    assert_eq!(c.result, Ok(()));
    assert_eq!(&c.buf.unwrap()[..], &data[..], "never OK with stale data");
    assert!(
        f.log.lock().unwrap().term_reqs.len() == 1,
        "the lie ended a connection"
    );
    let c = run(&mut q, read(0, 128, 3));
    assert_eq!(c.result, Ok(()));
    assert_eq!(&c.buf.unwrap()[..], &data[..]);
    out.clear();
    q.poll(&mut out);
    assert!(out.is_empty(), "nothing completes twice: {out:?}");
}

/// Resident set size of this process, from /proc/self/status.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn r2t_flood_for_one_write_ends_the_connection_with_bounded_memory() {
    let f = start(Behaviour {
        r2t_flood: 3000,
        attacks: 1,
        maxh2cdata: 4096,
        ioccsz: 4,
        ..Behaviour::default()
    });
    let mut o = opts(f.port);
    o.command_timeout = Duration::from_millis(1000);
    let ctrl = Controller::connect(o).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let before = rss_kib();
    let t0 = Instant::now();
    let data = pattern(128 * 1024, 4);
    let c = qp.run_sync(1, write(0, &data, 1)).unwrap();
    assert!(c.result.is_err(), "{:?}", c.result);
    assert!(qp.is_closed());
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

/// Counts the events logged at WARN or above while `f` runs on this thread.
fn count_warnings(f: impl FnOnce()) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Counter(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if *e.metadata().level() <= tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    use tracing_subscriber::layer::SubscriberExt;
    let n = Arc::new(AtomicUsize::new(0));
    let sub = tracing_subscriber::registry().with(Counter(n.clone()));
    tracing::subscriber::with_default(sub, f);
    n.load(Ordering::Relaxed)
}

#[test]
fn responses_for_unknown_commands_end_the_connection_without_a_log_line_each() {
    let f = start(Behaviour {
        unknown_cqes: 20_000,
        attacks: 1,
        ..Behaviour::default()
    });
    let ctrl = Controller::connect(opts(f.port)).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    let warnings = count_warnings(|| {
        let c = qp.run_sync(1, read(0, 8, 1)).unwrap();
        assert_eq!(c.result, Err(IoError::Unavailable));
    });
    assert!(qp.is_closed());
    assert!(warnings <= 2, "{warnings} warnings");
    let end = Instant::now() + Duration::from_secs(5);
    while f.log.lock().unwrap().term_reqs.is_empty() && Instant::now() < end {
        std::thread::yield_now();
    }
    // Invalid PDU Header Field, at the CQE's CID.
    assert_eq!(f.log.lock().unwrap().term_reqs, vec![(0x01, 20)]);
}

#[test]
fn write_to_a_controller_that_stops_reading_times_out_and_ends_the_connection() {
    let f = start(Behaviour {
        stall_on_r2t: 8,
        ioccsz: 4,
        ..Behaviour::default()
    });
    let mut o = opts(f.port);
    o.command_timeout = Duration::from_millis(300);
    let ctrl = Controller::connect(o).unwrap();
    let mut qp = ctrl.create_io_qpair().unwrap();
    small_buffer(&qp, libc::SO_SNDBUF);
    let t0 = Instant::now();
    // 1 MiB of writes: far more than the socket buffers hold.
    for t in 0..8 {
        qp.submit(1, write(t * 256, &pattern(128 * 1024, t as u8), t))
            .unwrap();
    }
    let mut out = Vec::new();
    while out.len() < 8 && t0.elapsed() < Duration::from_secs(5) {
        qp.poll(&mut out);
        qp.wait(5);
    }
    assert_eq!(out.len(), 8, "every write ends");
    assert!(out.iter().all(|c| c.result.is_err()));
    assert!(out.iter().any(|c| c.result == Err(IoError::Timeout)));
    assert!(out.iter().all(|c| c.buf.is_some()), "buffers come back");
    assert!(qp.is_closed(), "a controller that does not read is left");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}
