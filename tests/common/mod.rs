//! Helpers shared by the integration tests: start the real `unvme target`
//! binary on an ephemeral port, and a raw NVMe/TCP host built directly on
//! `unvme-proto` (blocking socket) for wire-level tests.

#![allow(dead_code)]

pub mod spdk;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use unvme_proto::fabrics::{self, ConnectCmd, ConnectData, PropertyCmd};
use unvme_proto::nvme::{Cqe, SglDescriptor, Sqe};
use unvme_proto::pdu::{
    self, CapsuleCmd, DataPdu, Event, Framing, IcReq, Limits, Pdu, PduDecoder, Role,
};

/// A running `unvme target` process, killed on drop.
pub struct TargetProc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl TargetProc {
    /// Starts `unvme target --listen 127.0.0.1:0 ARGS…` and waits until it listens.
    pub fn start(args: &[&str]) -> TargetProc {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Starts `unvme target --listen ADDR ARGS…` and waits until it listens.
    pub fn start_on(listen: &str, args: &[&str]) -> TargetProc {
        let mut full = vec!["target", "--listen", listen, "--reactors", "2"];
        full.extend_from_slice(args);
        let (child, addr) = spawn_listening(&full);
        TargetProc { child, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = wait_exit(&mut self.child, Duration::from_secs(10));
        std::mem::forget(self);
        st
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, for at most `limit`, and reaps it: sleeps in
/// poll(2) on a pidfd, which turns readable when the process exits, and
/// panics naming the process if it has not by then (a kernel without
/// pidfd_open, before 5.3, waits without a limit).
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let deadline = std::time::Instant::now() + limit;
    let pid = child.id() as libc::pid_t;
    // SAFETY: pidfd_open(2) takes a pid and flags and touches no memory of ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw >= 0 {
        // SAFETY: `raw` is a descriptor pidfd_open just opened for us and nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut p = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one initialised pollfd on the stack, alive for the whole call.
            let rc = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
            if rc > 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert!(
                rc < 0 && err.kind() == std::io::ErrorKind::Interrupted,
                "process {pid} did not exit within {limit:?} (poll: {rc}, {err})"
            );
        }
    }
    child.wait().expect("reap the child")
}

/// Spawns `unvme ARGS…` (a server that logs `listening la=ADDR` on stderr)
/// and waits until it listens; returns the child and the bound address.
pub fn spawn_listening(args: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_unvme"))
        .args(args)
        .env("UNVME_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unvme");
    let stderr = child.stderr.take().expect("stderr piped");
    let what = args.first().copied().unwrap_or("unvme").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains("listening") {
                if let Some(a) = line.split("la=").nth(1) {
                    let a = a.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(a);
                    sent = true;
                }
            }
            if std::env::var_os("UNVME_TEST_VERBOSE").is_some() {
                eprintln!("[{what}] {line}");
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server did not start listening");
    (child, addr.parse().expect("listen address"))
}

/// What the raw host received.
#[derive(Debug)]
pub enum Rx {
    Pdu(Pdu, Vec<u8>, bool),
    Closed,
}

/// A minimal blocking NVMe/TCP host for wire-level tests.
pub struct RawHost {
    pub s: TcpStream,
    pub dec: PduDecoder,
    pub tx: Framing,
    buf: Vec<u8>,
    start: usize,
    pub cntlid: u16,
    pub maxh2cdata: u32,
}

impl RawHost {
    pub fn connect(addr: SocketAddr) -> RawHost {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawHost {
            s,
            dec: PduDecoder::new(
                Role::Host,
                Limits {
                    max_incapsule: 0,
                    max_data: 16 << 20,
                },
            ),
            tx: Framing::default(),
            buf: Vec::new(),
            start: 0,
            cntlid: 0,
            maxh2cdata: 0,
        }
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn send(&mut self, p: &Pdu, data: &[u8]) {
        let mut h = [0u8; pdu::MAX_HEADER];
        let n = pdu::encode_header(p, &self.tx, &mut h);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(data);
        if self.tx.ddgst && !data.is_empty() {
            v.extend_from_slice(&pdu::digest(&[data]));
        }
        self.send_raw(&v);
    }

    /// Receives one whole PDU (header, data, digest verdict) or Closed.
    pub fn recv(&mut self) -> Rx {
        let mut cur: Option<(Pdu, Vec<u8>, bool)> = None;
        loop {
            loop {
                let (n, ev) = match self.dec.decode(&self.buf[self.start..]) {
                    Ok(x) => x,
                    Err(e) => panic!("target sent a malformed PDU: {e}"),
                };
                self.start += n;
                match ev {
                    Some(Event::Pdu(p)) => {
                        if p.data_len() == 0 {
                            return Rx::Pdu(p, Vec::new(), true);
                        }
                        cur = Some((p, Vec::new(), true));
                    }
                    Some(Event::Data(d)) => cur
                        .as_mut()
                        .expect("data after header")
                        .1
                        .extend_from_slice(d),
                    Some(Event::DataEnd { digest_ok }) => {
                        let mut c = cur.take().expect("data end after header");
                        c.2 = digest_ok;
                        return Rx::Pdu(c.0, c.1, c.2);
                    }
                    None if n == 0 => break,
                    None => {}
                }
            }
            self.buf.drain(..self.start);
            self.start = 0;
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return Rx::Closed,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Rx::Closed,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    pub fn recv_pdu(&mut self) -> (Pdu, Vec<u8>) {
        match self.recv() {
            Rx::Pdu(p, d, ok) => {
                assert!(ok, "data digest from target must verify");
                (p, d)
            }
            Rx::Closed => panic!("connection closed unexpectedly"),
        }
    }

    /// ICReq/ICResp with the given digests.
    pub fn ic(&mut self, hdgst: bool, ddgst: bool) {
        let dgst = u8::from(hdgst) | (u8::from(ddgst) << 1);
        self.send(
            &Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                dgst,
                maxr2t: 0,
            }),
            &[],
        );
        let (p, _) = self.recv_pdu();
        let Pdu::IcResp(r) = p else {
            panic!("expected ICResp, got {p:?}")
        };
        assert_eq!(r.dgst, dgst, "target accepts the digests we ask for");
        self.maxh2cdata = r.maxh2cdata;
        self.tx = Framing {
            hdgst,
            ddgst,
            pda: r.cpda,
        };
        self.dec.set_framing(Framing {
            hdgst,
            ddgst,
            pda: 0,
        });
    }

    /// Sends a command capsule (with optional in-capsule data) and returns the CQE,
    /// collecting any C2H data into the returned vector.
    pub fn cmd(&mut self, mut sqe: Sqe, incapsule: &[u8]) -> (Cqe, Vec<u8>) {
        if !incapsule.is_empty() {
            sqe.set_sgl(SglDescriptor::in_capsule(0, incapsule.len() as u32));
        }
        self.send(
            &Pdu::CapsuleCmd(CapsuleCmd {
                sqe,
                data_len: incapsule.len() as u32,
            }),
            incapsule,
        );
        self.wait_resp(sqe.cid, &[])
    }

    /// Waits for the response to `cid`, answering R2Ts from `h2c` and collecting C2H data.
    pub fn wait_resp(&mut self, cid: u16, h2c: &[u8]) -> (Cqe, Vec<u8>) {
        let mut data = Vec::new();
        loop {
            let (p, d) = self.recv_pdu();
            match p {
                Pdu::CapsuleResp(r) => {
                    assert_eq!(r.cqe.cid, cid);
                    return (r.cqe, data);
                }
                Pdu::C2hData(c) => {
                    assert_eq!(c.cccid, cid);
                    assert_eq!(c.datao as usize, data.len());
                    data.extend_from_slice(&d);
                    if c.success {
                        return (
                            Cqe {
                                cid,
                                ..Default::default()
                            },
                            data,
                        );
                    }
                }
                Pdu::R2t(r) => {
                    assert_eq!(r.cccid, cid);
                    let mut off = r.r2to as usize;
                    let end = off + r.r2tl as usize;
                    while off < end {
                        let n = (end - off).min(self.maxh2cdata as usize);
                        let dp = DataPdu {
                            cccid: cid,
                            ttag: r.ttag,
                            datao: off as u32,
                            datal: n as u32,
                            last: off + n == end,
                            success: false,
                        };
                        self.send(&Pdu::H2cData(dp), &h2c[off..off + n]);
                        off += n;
                    }
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    /// Fabrics Connect on `qid`.
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        sqsize: u16,
    ) -> Cqe {
        let mut sqe = Sqe {
            cid: 0x77,
            ..Default::default()
        };
        ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: sqsize - 1,
            cattr: fabrics::CATTR_DISABLE_SQFLOW,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(&mut sqe);
        let data = ConnectData {
            hostid: [7; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        }
        .encode();
        self.cmd(sqe, &data).0
    }

    pub fn prop_set(&mut self, ofst: u32, value: u64) -> Cqe {
        let mut sqe = Sqe {
            cid: 0x78,
            ..Default::default()
        };
        PropertyCmd {
            size8: false,
            ofst,
            value,
        }
        .to_sqe(true, &mut sqe);
        self.cmd(sqe, &[]).0
    }

    pub fn prop_get(&mut self, ofst: u32, size8: bool) -> u64 {
        let mut sqe = Sqe {
            cid: 0x79,
            ..Default::default()
        };
        PropertyCmd {
            size8,
            ofst,
            value: 0,
        }
        .to_sqe(false, &mut sqe);
        let c = self.cmd(sqe, &[]).0;
        assert!(
            c.status().is_success(),
            "property get {ofst:#x}: {}",
            c.status()
        );
        u64::from(c.dw0) | (u64::from(c.dw1) << 32)
    }

    /// Full admin bring-up: IC, Connect, CC.EN=1.
    pub fn admin(addr: SocketAddr, subnqn: &str, hdgst: bool, ddgst: bool) -> RawHost {
        let mut h = RawHost::connect(addr);
        h.ic(hdgst, ddgst);
        let c = h.fabrics_connect(0, subnqn, HOSTNQN, 0xFFFF, 32);
        assert!(c.status().is_success(), "admin connect: {}", c.status());
        h.cntlid = c.dw0 as u16;
        let c = h.prop_set(unvme_proto::regs::CC, 1 | (6 << 16) | (4 << 20));
        assert!(c.status().is_success());
        assert_eq!(
            h.prop_get(unvme_proto::regs::CSTS, false) & 1,
            1,
            "CSTS.RDY after CC.EN"
        );
        h
    }

    /// I/O queue bring-up for a controller.
    pub fn io(
        addr: SocketAddr,
        subnqn: &str,
        cntlid: u16,
        qid: u16,
        hdgst: bool,
        ddgst: bool,
    ) -> RawHost {
        let mut h = RawHost::connect(addr);
        h.ic(hdgst, ddgst);
        let c = h.fabrics_connect(qid, subnqn, HOSTNQN, cntlid, 32);
        assert!(c.status().is_success(), "io connect: {}", c.status());
        h.cntlid = cntlid;
        h
    }

    /// Expects a C2HTermReq and then a closed connection; returns (FES, FEI).
    pub fn expect_term(&mut self) -> (u16, u32) {
        match self.recv() {
            Rx::Pdu(Pdu::C2hTermReq(t), _, _) => {
                let mut tmp = [0u8; 64];
                let closed = matches!(self.s.read(&mut tmp), Ok(0) | Err(_));
                assert!(closed, "connection must close after a C2HTermReq");
                (t.fes, t.fei)
            }
            other => panic!("expected C2HTermReq, got {other:?}"),
        }
    }
}

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001";
