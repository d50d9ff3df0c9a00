//! `unvme nbd` against a small NBD client written here from the protocol
//! document: the handshake, every command in simple and structured form,
//! every error reply, pipelining, bad input that must close one connection
//! only, and the bridge to `unvme target` over real NVMe/TCP.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::Duration;

use unvme_nbd::{
    cmd, cmdflag, errno, info, opt, rep, reply, tflag, InfoRequest, MetaContextRequest, NbdRequest,
    OptionHeader, OptionReply, ReplyHeader, BASE_ALLOCATION,
};

/// A running `unvme nbd`, killed on drop.
struct NbdProc {
    child: Child,
    addr: SocketAddr,
}

impl NbdProc {
    /// Starts `unvme nbd --listen 127.0.0.1:0 ARGS…` and waits until it listens.
    fn start(args: &[&str]) -> NbdProc {
        let mut full = vec!["nbd", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let (child, addr) = common::spawn_listening(&full);
        NbdProc { child, addr }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NbdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reply as the client assembled it.
#[derive(Debug, Default)]
struct Reply {
    error: u32,
    message: String,
    data: Vec<u8>,
    /// Structured chunk types received, in order.
    chunks: Vec<u16>,
    /// Block status descriptors (length, flags).
    extents: Vec<(u32, u32)>,
}

trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// A minimal blocking NBD client.
struct Client {
    s: Box<dyn Io>,
    structured: bool,
    size: u64,
    tflags: u16,
}

impl Client {
    fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Client::over(Box::new(s))
    }

    fn over(s: Box<dyn Io>) -> Client {
        let mut c = Client {
            s,
            structured: false,
            size: 0,
            tflags: 0,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            3,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn send_opt(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            length: data.len() as u32,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn read_opt_reply(&mut self) -> OptionReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply header");
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut b = h.to_vec();
        b.resize(20 + len, 0);
        self.s.read_exact(&mut b[20..]).expect("option reply data");
        OptionReply::decode(&b).expect("option reply").0
    }

    /// Sends an option and collects replies up to the ACK or an error.
    fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptionReply> {
        self.send_opt(option, data);
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.option, option);
            let end = r.rtype == rep::ACK || r.rtype & (1 << 31) != 0;
            v.push(r);
            if end {
                return v;
            }
        }
    }

    /// Negotiates structured replies (and base:allocation) and GOes.
    fn go(&mut self, name: &str, structured: bool) -> Vec<OptionReply> {
        if structured {
            let r = self.opt(opt::STRUCTURED_REPLY, &[]);
            assert_eq!(r[0].rtype, rep::ACK);
            let m = MetaContextRequest {
                name: name.into(),
                queries: vec![BASE_ALLOCATION.into()],
            };
            let r = self.opt(opt::SET_META_CONTEXT, &m.encode());
            assert_eq!(r[0].rtype, rep::META_CONTEXT);
            self.structured = true;
        }
        let req = InfoRequest {
            name: name.into(),
            requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
        };
        let r = self.opt(opt::GO, &req.encode());
        assert_eq!(
            r.last().map(|r| r.rtype),
            Some(rep::ACK),
            "GO {name:?}: {r:?}"
        );
        let e = r
            .iter()
            .find(|r| r.data[..2] == info::EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        self.size = u64::from_be_bytes(e.data[2..10].try_into().unwrap());
        self.tflags = u16::from_be_bytes([e.data[10], e.data[11]]);
        r
    }

    fn connect(addr: SocketAddr, structured: bool) -> Client {
        let mut c = Client::tcp(addr);
        c.go("", structured);
        c
    }

    fn send(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, length: u32, data: &[u8]) {
        let r = NbdRequest {
            flags,
            typ,
            cookie,
            offset,
            length,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one whole reply; `read_len` gives the READ length per cookie
    /// (simple replies do not say how much data follows).
    fn recv(&mut self, read_len: &HashMap<u64, usize>) -> (u64, Reply) {
        let mut out = Reply::default();
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m).expect("reply magic");
            let hl = ReplyHeader::header_len(u32::from_be_bytes(m)).expect("known reply magic");
            let mut h = vec![0u8; hl];
            h[..4].copy_from_slice(&m);
            self.s.read_exact(&mut h[4..]).unwrap();
            match ReplyHeader::decode(&h).unwrap() {
                ReplyHeader::Simple { error, cookie } => {
                    out.error = error;
                    if error == 0 {
                        if let Some(&n) = read_len.get(&cookie) {
                            out.data.resize(n, 0);
                            self.s.read_exact(&mut out.data).unwrap();
                        }
                    }
                    return (cookie, out);
                }
                ReplyHeader::Chunk {
                    flags,
                    rtype,
                    cookie,
                    length,
                } => {
                    let mut p = vec![0u8; length as usize];
                    self.s.read_exact(&mut p).unwrap();
                    out.chunks.push(rtype);
                    match rtype {
                        reply::OFFSET_DATA => out.data.extend_from_slice(&p[8..]),
                        reply::ERROR => {
                            out.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                            let ml = u16::from_be_bytes([p[4], p[5]]) as usize;
                            out.message = String::from_utf8_lossy(&p[6..6 + ml]).into();
                        }
                        reply::BLOCK_STATUS => {
                            for d in p[4..].chunks_exact(8) {
                                out.extents.push((
                                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                                ));
                            }
                        }
                        _ => {}
                    }
                    if flags & reply::FLAG_DONE != 0 {
                        return (cookie, out);
                    }
                }
            }
        }
    }

    /// One request, one reply.
    fn call(&mut self, typ: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> Reply {
        self.send(typ, flags, 42, offset, length, data);
        let mut m = HashMap::new();
        if typ == cmd::READ {
            m.insert(42, length as usize);
        }
        let (c, r) = self.recv(&m);
        assert_eq!(c, 42);
        r
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        self.call(cmd::WRITE, 0, offset, data.len() as u32, data)
    }

    fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.call(cmd::READ, 0, offset, len, &[])
    }

    /// True if the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn unknown_options_get_err_unsup_and_negotiation_continues_to_go() {
    let srv = NbdProc::start(&["--ram", "16M"]);
    let mut c = Client::tcp(srv.addr);
    for o in [
        opt::STARTTLS,
        opt::PEEK_EXPORT,
        opt::EXTENDED_HEADERS,
        0x7777,
    ] {
        let r = c.opt(o, b"whatever");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].rtype, rep::ERR_UNSUP, "option {o}");
    }
    let r = c.opt(opt::LIST, b"x");
    assert_eq!(r[0].rtype, rep::ERR_INVALID, "LIST with data");
    let r = c.opt(opt::GO, b"\0\0\0\x09short");
    assert_eq!(r[0].rtype, rep::ERR_INVALID, "malformed GO");
    c.go("", true);
    assert_eq!(c.size, 16 << 20);
    assert_eq!(c.write(0, &[1u8; 512]).error, 0);
}

#[test]
fn go_reports_size_flags_block_sizes_name_and_description() {
    let srv = NbdProc::start(&["--ram", "16M", "--description", "test disk"]);
    let mut c = Client::tcp(srv.addr);
    let r = c.go("", true);
    let t = c.tflags;
    for f in [
        tflag::HAS_FLAGS,
        tflag::SEND_FLUSH,
        tflag::SEND_FUA,
        tflag::SEND_TRIM,
        tflag::SEND_WRITE_ZEROES,
        tflag::SEND_FAST_ZERO,
        tflag::SEND_CACHE,
        tflag::CAN_MULTI_CONN,
        tflag::SEND_DF,
    ] {
        assert_ne!(t & f, 0, "flag {f:#x} in {t:#x}");
    }
    assert_eq!(t & tflag::READ_ONLY, 0);
    let find = |it: u16| {
        r.iter()
            .find(|r| r.rtype == rep::INFO && r.data[..2] == it.to_be_bytes())
            .map(|r| r.data[2..].to_vec())
            .unwrap_or_else(|| panic!("info {it} missing"))
    };
    let bs = find(info::BLOCK_SIZE);
    assert_eq!(&bs[..4], &512u32.to_be_bytes());
    assert_eq!(&bs[4..8], &4096u32.to_be_bytes());
    assert_eq!(&bs[8..12], &(32u32 << 20).to_be_bytes());
    assert_eq!(find(info::NAME), b"ram:16M");
    assert_eq!(find(info::DESCRIPTION), b"test disk");
}

#[test]
fn list_shows_every_export_and_each_answers_to_its_names() {
    let srv = NbdProc::start(&[
        "--ram", "8M", "--ram", "4M", "--export", "first", "--export", "second",
    ]);
    let mut c = Client::tcp(srv.addr);
    let r = c.opt(opt::LIST, &[]);
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.rtype == rep::SERVER)
        .map(|r| String::from_utf8_lossy(&r.data[4..4 + r.data[3] as usize]).into())
        .collect();
    assert_eq!(names, vec!["first", "second"]);
    for (name, size) in [
        ("", 8u64 << 20),
        ("first", 8 << 20),
        ("ram:8M", 8 << 20),
        ("second", 4 << 20),
        ("ram:4M", 4 << 20),
    ] {
        let mut c = Client::tcp(srv.addr);
        c.go(name, false);
        assert_eq!(c.size, size, "export {name:?}");
    }
    let req = InfoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    let r = c.opt(opt::GO, &req.encode());
    assert_eq!(r[0].rtype, rep::ERR_UNKNOWN);
    let r = c.opt(opt::INFO, &req.encode());
    assert_eq!(r[0].rtype, rep::ERR_UNKNOWN);
    let r = c.opt(opt::ABORT, &[]);
    assert_eq!(r[0].rtype, rep::ACK);
    assert!(c.closed(), "ABORT closes the connection");
}

#[test]
fn export_name_of_unknown_export_closes_and_known_one_enters_transmission() {
    let srv = NbdProc::start(&["--ram", "8M"]);
    let mut c = Client::tcp(srv.addr);
    c.send_opt(opt::EXPORT_NAME, b"nope");
    assert!(c.closed());
    let mut c = Client::tcp(srv.addr);
    c.send_opt(opt::EXPORT_NAME, b"");
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 8 << 20);
    assert_eq!(c.write(4096, &[9u8; 4096]).error, 0);
    assert!(c.read(4096, 4096).data == vec![9u8; 4096]);
}

#[test]
fn simple_replies_serve_every_command() {
    let srv = NbdProc::start(&["--ram", "16M"]);
    let mut c = Client::connect(srv.addr, false);
    let d = pattern(3, 256 << 10);
    assert_eq!(c.write(1 << 20, &d).error, 0);
    assert!(c.read(1 << 20, d.len() as u32).data == d);
    assert_eq!(
        c.call(cmd::WRITE, cmdflag::FUA, 0, 512, &[7u8; 512]).error,
        0
    );
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(c.call(cmd::CACHE, 0, 0, 1 << 20, &[]).error, 0);
    assert_eq!(c.call(cmd::TRIM, 0, 1 << 20, 64 << 10, &[]).error, 0);
    assert!(
        c.read(1 << 20, 64 << 10).data == vec![0u8; 64 << 10],
        "trimmed reads zero"
    );
    assert!(c.read((1 << 20) + (64 << 10), 4096).data == d[64 << 10..(64 << 10) + 4096]);
    let z = c.call(
        cmd::WRITE_ZEROES,
        cmdflag::NO_HOLE,
        (1 << 20) + (128 << 10),
        64 << 10,
        &[],
    );
    assert_eq!(z.error, 0);
    let z = c.call(
        cmd::WRITE_ZEROES,
        cmdflag::FAST_ZERO,
        (1 << 20) + (192 << 10),
        64 << 10,
        &[],
    );
    assert_eq!(z.error, 0);
    assert!(c.read((1 << 20) + (128 << 10), 128 << 10).data == vec![0u8; 128 << 10]);
    // Zero-length requests are no-ops.
    assert_eq!(c.read(0, 0).error, 0);
    c.send(cmd::DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed(), "DISC ends the connection");
}

#[test]
fn structured_read_is_one_offset_data_chunk_and_block_status_reports_data_and_holes() {
    let srv = NbdProc::start(&["--ram", "16M"]);
    let mut c = Client::connect(srv.addr, true);
    let d = pattern(5, 3 << 20); // larger than one device chunk: split and rejoined
    assert_eq!(c.write(4096, &d).error, 0);
    let r = c.call(cmd::READ, cmdflag::DF, 4096, d.len() as u32, &[]);
    assert_eq!(r.chunks, vec![reply::OFFSET_DATA]);
    assert!(r.data == d);
    // RAM pages never written are holes that read as zeroes (HOLE|ZERO = 3).
    let r = c.call(cmd::BLOCK_STATUS, 0, 0, 8 << 20, &[]);
    assert_eq!(r.error, 0);
    let data_end = 4096 + d.len() as u32;
    assert_eq!(
        r.extents,
        vec![(4096, 3), (d.len() as u32, 0), ((8 << 20) - data_end, 3)]
    );
    let r = c.call(cmd::BLOCK_STATUS, cmdflag::REQ_ONE, 0, 8 << 20, &[]);
    assert_eq!(r.extents, vec![(4096, 3)]);
    // A trimmed range is a hole again.
    assert_eq!(c.call(cmd::TRIM, 0, 1 << 20, 1 << 20, &[]).error, 0);
    let r = c.call(cmd::BLOCK_STATUS, 0, 1 << 20, 1 << 20, &[]);
    assert_eq!(r.extents, vec![(1 << 20, 3)]);
    let r = c.read(16 << 20, 512);
    assert_eq!(r.chunks, vec![reply::ERROR]);
    assert_eq!(r.error, errno::EINVAL);
    assert!(r.message.contains("end"), "message: {}", r.message);
}

#[test]
fn bad_requests_get_the_errno_the_protocol_names_and_the_connection_goes_on() {
    let srv = NbdProc::start(&["--ram", "16M"]);
    let end = 16u64 << 20;
    for structured in [false, true] {
        let mut c = Client::connect(srv.addr, structured);
        let cases: Vec<(&str, u16, u16, u64, u32, u32)> = vec![
            ("read past end", cmd::READ, 0, end, 512, errno::EINVAL),
            (
                "read straddling end",
                cmd::READ,
                0,
                end - 512,
                1024,
                errno::EINVAL,
            ),
            ("write past end", cmd::WRITE, 0, end, 512, errno::ENOSPC),
            (
                "write zeroes past end",
                cmd::WRITE_ZEROES,
                0,
                end,
                512,
                errno::ENOSPC,
            ),
            ("trim past end", cmd::TRIM, 0, end, 512, errno::EINVAL),
            ("misaligned read", cmd::READ, 0, 100, 512, errno::EINVAL),
            ("misaligned write", cmd::WRITE, 0, 0, 100, errno::EINVAL),
            (
                "read over max block size",
                cmd::READ,
                0,
                0,
                (32 << 20) + 512,
                errno::EOVERFLOW,
            ),
            ("unknown command", 42, 0, 0, 512, errno::EINVAL),
            ("unknown flag", cmd::READ, 1 << 12, 0, 512, errno::EINVAL),
            (
                "flag not for this command",
                cmd::READ,
                cmdflag::FUA,
                0,
                512,
                errno::EINVAL,
            ),
            (
                "offset overflow",
                cmd::READ,
                0,
                u64::MAX - 511,
                512,
                errno::EINVAL,
            ),
        ];
        for (what, typ, flags, off, len, want) in cases {
            let payload = if typ == cmd::WRITE {
                vec![0u8; len as usize]
            } else {
                Vec::new()
            };
            let r = c.call(typ, flags, off, len, &payload);
            assert_eq!(r.error, want, "{what} (structured {structured})");
            if structured {
                assert!(
                    !r.message.is_empty(),
                    "{what}: structured errors carry a message"
                );
            }
        }
        if !structured {
            let r = c.call(cmd::READ, cmdflag::DF, 0, 512, &[]);
            assert_eq!(r.error, errno::EINVAL, "DF without structured replies");
            let r = c.call(cmd::BLOCK_STATUS, 0, 0, 512, &[]);
            assert_eq!(r.error, errno::EINVAL, "BLOCK_STATUS without a context");
        }
        assert_eq!(c.write(0, &[1u8; 512]).error, 0, "still serving");
        assert!(c.read(0, 512).data == vec![1u8; 512]);
    }
}

#[test]
fn oversized_write_payload_is_skipped_and_answered_eoverflow() {
    let srv = NbdProc::start(&["--ram", "64M"]);
    let mut c = Client::connect(srv.addr, true);
    let len = (32u32 << 20) + 4096;
    let big = vec![0xeeu8; len as usize];
    let r = c.call(cmd::WRITE, 0, 0, len, &big);
    assert_eq!(r.error, errno::EOVERFLOW);
    assert!(
        c.read(0, 4096).data == vec![0u8; 4096],
        "nothing of it was written"
    );
    assert_eq!(c.write(0, &[2u8; 4096]).error, 0);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let srv = NbdProc::start(&["--ram", "8M", "--read-only"]);
    let mut c = Client::connect(srv.addr, false);
    assert_ne!(c.tflags & tflag::READ_ONLY, 0);
    assert_eq!(c.tflags & (tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, &[1u8; 512]).error, errno::EPERM);
    assert_eq!(c.call(cmd::TRIM, 0, 0, 512, &[]).error, errno::EPERM);
    assert_eq!(
        c.call(cmd::WRITE_ZEROES, 0, 0, 512, &[]).error,
        errno::EPERM
    );
    assert!(c.read(0, 512).data == vec![0u8; 512]);
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]).error, 0);
}

#[test]
fn garbage_or_truncated_requests_close_only_that_connection() {
    let mut srv = NbdProc::start(&["--ram", "8M"]);
    let mut other = Client::connect(srv.addr, true);
    assert_eq!(other.write(0, &[4u8; 4096]).error, 0);

    let mut c = Client::connect(srv.addr, false);
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed(), "bad request magic closes the connection");

    let mut c = Client::connect(srv.addr, false);
    c.s.write_all(
        &NbdRequest {
            flags: 0,
            typ: cmd::READ,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode()[..13],
    )
    .unwrap();
    drop(c); // truncated header, then EOF

    let mut c = Client::connect(srv.addr, false);
    c.send(cmd::WRITE, 0, 1, 0, 8192, &[5u8; 1000]);
    drop(c); // truncated payload

    let mut c = Client::tcp(srv.addr);
    c.s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(c.closed(), "garbage in the handshake closes the connection");

    assert!(
        other.read(0, 4096).data == vec![4u8; 4096],
        "other connection unaffected"
    );
    let mut c = Client::connect(srv.addr, false);
    assert!(c.read(0, 4096).data == vec![4u8; 4096]);
    assert!(srv.alive());
}

#[test]
fn pipelined_requests_are_all_answered_with_the_right_data() {
    let srv = NbdProc::start(&["--ram", "1G"]);
    for structured in [false, true] {
        let mut c = Client::connect(srv.addr, structured);
        let n = 300u64;
        let size =
            |i: u64| ((i % 7) as usize + 1) * 4096 * if matches!(i % 50, 0) { 64 } else { 1 };
        for i in 0..n {
            let d = pattern(i as u8, size(i));
            c.send(cmd::WRITE, 0, i, i << 21, d.len() as u32, &d);
        }
        let mut seen = HashMap::new();
        for _ in 0..n {
            let (cookie, r) = c.recv(&HashMap::new());
            assert_eq!(r.error, 0);
            assert!(seen.insert(cookie, ()).is_none(), "one reply per cookie");
        }
        let mut lens = HashMap::new();
        for i in 0..n {
            lens.insert(1000 + i, size(i));
            c.send(cmd::READ, 0, 1000 + i, i << 21, size(i) as u32, &[]);
        }
        for _ in 0..n {
            let (cookie, r) = c.recv(&lens);
            let i = cookie - 1000;
            assert_eq!(r.error, 0);
            assert!(r.data == pattern(i as u8, size(i)), "data of request {i}");
        }
    }
}

#[test]
fn acknowledged_writes_survive_an_abrupt_client_disconnect() {
    let srv = NbdProc::start(&["--ram", "16M"]);
    let mut c = Client::connect(srv.addr, false);
    for i in 0..16u64 {
        c.send(cmd::WRITE, 0, i, i * 65536, 65536, &pattern(i as u8, 65536));
    }
    for _ in 0..16 {
        assert_eq!(c.recv(&HashMap::new()).1.error, 0);
    }
    // More writes in flight, then the client vanishes.
    for i in 16..32u64 {
        c.send(cmd::WRITE, 0, i, i * 65536, 65536, &pattern(i as u8, 65536));
    }
    drop(c);
    let mut c = Client::connect(srv.addr, true);
    for i in 0..16u64 {
        assert!(
            c.read(i * 65536, 65536).data == pattern(i as u8, 65536),
            "acknowledged write {i}"
        );
    }
}

#[test]
fn unix_socket_serves_the_same_export() {
    let dir = std::env::temp_dir().join(format!("unvme-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    let srv = NbdProc::start(&["--ram", "8M", "--unix", sock.to_str().unwrap()]);
    let mut t = Client::connect(srv.addr, false);
    assert_eq!(t.write(8192, &[6u8; 4096]).error, 0);
    let s = UnixStream::connect(&sock).expect("connect unix");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut u = Client::over(Box::new(s));
    u.go("", true);
    assert!(u.read(8192, 4096).data == vec![6u8; 4096]);
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bridged_to_unvme_target_serves_several_connections_on_their_own_queues() {
    let target = common::TargetProc::start(&["--ram", "64M"]);
    let port = target.port().to_string();
    let srv = NbdProc::start(&["--port", &port]);
    let threads: Vec<_> = (0..3u8)
        .map(|t| {
            let addr = srv.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, t % 2 == 1);
                assert_eq!(c.size, 64 << 20);
                let base = u64::from(t) * (8 << 20);
                let mut lens = HashMap::new();
                for i in 0..64u64 {
                    let d = pattern(t ^ i as u8, 16384);
                    c.send(
                        cmd::WRITE,
                        cmdflag::FUA * (i % 2) as u16,
                        i,
                        base + i * 16384,
                        16384,
                        &d,
                    );
                }
                for _ in 0..64 {
                    assert_eq!(c.recv(&lens).1.error, 0);
                }
                assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]).error, 0);
                for i in 0..64u64 {
                    lens.insert(100 + i, 16384);
                    c.send(cmd::READ, 0, 100 + i, base + i * 16384, 16384, &[]);
                }
                for _ in 0..64 {
                    let (k, r) = c.recv(&lens);
                    assert!(r.data == pattern(t ^ (k - 100) as u8, 16384));
                }
                let big = pattern(t, 2 << 20);
                assert_eq!(c.write(base + (4 << 20), &big).error, 0);
                assert!(c.read(base + (4 << 20), 2 << 20).data == big);
                assert_eq!(c.call(cmd::WRITE_ZEROES, 0, base, 1 << 20, &[]).error, 0);
                assert!(c.read(base, 1 << 20).data == vec![0u8; 1 << 20]);
                assert_eq!(c.call(cmd::TRIM, 0, base, 1 << 20, &[]).error, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn losing_the_nvme_target_fails_requests_with_eio_not_hangs() {
    let target = common::TargetProc::start(&["--ram", "16M"]);
    let port = target.port().to_string();
    let mut srv = NbdProc::start(&[
        "--port",
        &port,
        "--timeout-ms",
        "3000",
        "--fast-io-fail-tmo",
        "0",
    ]);
    let mut c = Client::connect(srv.addr, true);
    assert_eq!(c.write(0, &[1u8; 4096]).error, 0);
    // Killed and reaped (TargetProc's drop): its sockets are closed by now.
    drop(target);
    let r = c.read(0, 4096);
    assert_eq!(r.error, errno::EIO, "read after the target vanished");
    assert!(srv.alive());
}

#[test]
fn the_export_reconnects_when_the_nvme_target_returns() {
    let dir = std::env::temp_dir().join(format!("unvme-nbd-rc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = format!("{}:512:create=16M", dir.join("ns.img").display());
    let target = common::TargetProc::start(&["--file", &spec]);
    let listen = target.addr.to_string();
    let port = target.port().to_string();
    let mut srv = NbdProc::start(&[
        "--port",
        &port,
        "--timeout-ms",
        "3000",
        "--fast-io-fail-tmo",
        "0",
    ]);
    let mut c = Client::connect(srv.addr, true);
    assert_eq!(c.write(0, &[7u8; 4096]).error, 0);
    assert_eq!(c.call(cmd::FLUSH, 0, 0, 0, &[]).error, 0);
    assert!(target.stop().success());
    assert_eq!(
        c.read(0, 4096).error,
        errno::EIO,
        "read while the target is down"
    );
    let spec = format!("{}:512", dir.join("ns.img").display());
    let _target = common::TargetProc::start_on(&listen, &["--file", &spec]);
    // The same NBD connection recovers once the target is back (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.read(0, 4096);
        if r.error == 0 {
            assert_eq!(
                r.data,
                vec![7u8; 4096],
                "acknowledged data after reconnection"
            );
            break;
        }
        assert_eq!(r.error, errno::EIO);
        assert!(
            std::time::Instant::now() < deadline,
            "export did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(srv.alive());
    let _ = std::fs::remove_dir_all(&dir);
}
