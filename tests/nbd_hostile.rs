//! `unvme nbd` against hostile clients, over real sockets to the real
//! binary: WRITE headers whose payload never comes (memory), READs whose
//! replies are never read (CPU, and the memory they pin), a handshake
//! dribbled a byte at a time (total deadline), floods of idle connections
//! (slots). Each test also checks that a well-behaved client is still
//! served, with its data intact.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use unvme_nbd::{cmd, opt, rep, NbdRequest, OptionHeader};

/// A running `unvme nbd`, killed on drop.
struct NbdProc {
    child: Child,
    addr: SocketAddr,
}

impl NbdProc {
    fn start(args: &[&str]) -> NbdProc {
        let mut full = vec!["nbd", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let (child, addr) = common::spawn_listening(&full);
        NbdProc { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server, in bytes.
    fn rss(&self) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = st.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb << 10
    }

    /// CPU time (user + system) the server used, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &st[st.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for NbdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads the greeting and sends the client flags (FIXED_NEWSTYLE|NO_ZEROES).
fn greet(s: &mut TcpStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// NBD_OPT_GO for the default export; `Ok` at the ACK, `Err(reply type)`
/// for an error reply.
fn go(s: &mut TcpStream) -> Result<(), u32> {
    let mut b = OptionHeader {
        option: opt::GO,
        length: 6,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(&[0u8; 6]); // empty name, no info requests
    s.write_all(&b).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).expect("option reply data");
        if typ == rep::ACK {
            return Ok(());
        }
        if typ & (1 << 31) != 0 {
            return Err(typ);
        }
    }
}

/// A negotiated connection in the transmission phase (simple replies).
fn client(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    greet(&mut s);
    go(&mut s).expect("NBD_OPT_GO");
    s
}

fn request(typ: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    NbdRequest {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// Reads one simple reply; returns its error and cookie.
fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("simple reply");
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes(), "reply magic");
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

/// A well-behaved client writes a pattern and reads it back.
fn write_read_back(addr: SocketAddr, offset: u64, seed: u8) {
    let mut s = client(addr);
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    s.write_all(&request(cmd::WRITE, 1, offset, data.len() as u32))
        .unwrap();
    s.write_all(&data).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 1), "WRITE");
    s.write_all(&request(cmd::READ, 2, offset, data.len() as u32))
        .unwrap();
    assert_eq!(simple_reply(&mut s), (0, 2), "READ");
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "the data read back is the data written");
    s.write_all(&request(cmd::DISC, 3, 0, 0)).unwrap();
}

/// Whether the server closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 4096];
    let until = Instant::now() + limit;
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if Instant::now() >= until {
            return false;
        }
    }
}

#[test]
fn write_headers_without_payload_take_no_memory() {
    let srv = NbdProc::start(&["--ram", "64M"]);
    // Warm up: one normal client, so its pool and the process settle.
    write_read_back(srv.addr, 0, 3);
    let before = srv.rss();
    // 8 connections each declare a 32 MiB WRITE (the old server allocated
    // and zeroed all of it: 256 MiB) and send 4 KiB of it, or nothing.
    let mut attackers = Vec::new();
    for i in 0..8 {
        let mut s = client(srv.addr);
        s.write_all(&request(cmd::WRITE, 9, 0, 32 << 20)).unwrap();
        if i % 2 == 0 {
            s.write_all(&[0xa5; 4096]).unwrap();
        }
        // More headers queue behind it, in the socket.
        for c in 0..4 {
            s.write_all(&request(cmd::WRITE, 10 + c, 0, 32 << 20))
                .unwrap();
        }
        attackers.push(s);
    }
    // The server still serves others while the attack holds.
    write_read_back(srv.addr, 1 << 20, 7);
    write_read_back(srv.addr, 2 << 20, 11);
    let grown = srv.rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB under the WRITE-header attack",
        grown >> 20
    );
    drop(attackers);
}

#[test]
fn a_client_that_never_reads_replies_costs_no_cpu_and_is_closed_at_the_send_timeout() {
    let srv = NbdProc::start(&[
        "--ram",
        "64M",
        "--max-buffer-bytes",
        "83886080",
        "--send-timeout-s",
        "2",
    ]);
    let mut hostile = client(srv.addr);
    hostile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 400 MiB of READs asked for; not one reply byte read.
    let mut b = Vec::new();
    for i in 0..400u64 {
        b.extend_from_slice(&request(cmd::READ, i, (i % 64) << 20, 1 << 20));
    }
    hostile.write_all(&b).unwrap();
    // A normal client is served meanwhile.
    write_read_back(srv.addr, 0, 5);
    let t0 = srv.cpu_ticks();
    let start = Instant::now();
    // Let the server sit on the full socket for a while: it must sleep,
    // not spin. (This is the measurement window, not a synchronisation.)
    std::thread::sleep(Duration::from_millis(2000));
    let ticks = srv.cpu_ticks() - t0;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / start.elapsed().as_secs_f64();
    assert!(
        share < 0.3,
        "the server used {:.0}% of a core while its client read no replies",
        share * 100.0
    );
    assert!(
        srv.rss() < 200 << 20,
        "RSS {} MiB with a client that reads no replies",
        srv.rss() >> 20
    );
    // The attacker keeps the socket full one more second, past the 2 s send
    // timeout (the attack's length, not a synchronisation), then reads:
    // it gets the replies sent until then, then EOF, far short of the
    // 400 MiB it asked for.
    std::thread::sleep(Duration::from_secs(1));
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match hostile.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the hostile connection was not closed: {e}"),
        }
    }
    assert!(
        got < 200 << 20,
        "a connection whose replies are never read is closed ({} MiB sent)",
        got >> 20
    );
    write_read_back(srv.addr, 4 << 20, 9);
}

#[test]
fn the_server_budget_makes_a_second_client_wait_not_fail() {
    // The budget holds one hostile connection's in-flight READs; a normal
    // client waits for memory instead of the server growing past it, and is
    // served once the hostile connection is closed.
    let srv = NbdProc::start(&[
        "--ram",
        "64M",
        "--max-buffer-bytes",
        "67108864",
        "--max-inflight-bytes",
        "67108864",
        "--send-timeout-s",
        "1",
    ]);
    let mut hostile = client(srv.addr);
    let mut b = Vec::new();
    for i in 0..200u64 {
        b.extend_from_slice(&request(cmd::READ, i, (i % 32) << 20, 1 << 20));
    }
    hostile.write_all(&b).unwrap();
    let start = Instant::now();
    write_read_back(srv.addr, 0, 13);
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(
        srv.rss() < 160 << 20,
        "RSS {} MiB with a 64 MiB buffer budget",
        srv.rss() >> 20
    );
    drop(hostile);
}

#[test]
fn a_dribbled_handshake_ends_at_the_total_deadline() {
    let srv = NbdProc::start(&["--ram", "16M", "--handshake-timeout-ms", "1000"]);
    let mut s = connect(srv.addr);
    let start = Instant::now();
    greet(&mut s);
    let mut opt = OptionHeader {
        option: opt::GO,
        length: 1 << 10,
    }
    .encode()
    .to_vec();
    opt.resize(16 + (1 << 10), 0);
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut closed = false;
    // One byte every 100 ms: each read is well within the deadline, the
    // whole would take 100 s.
    for byte in opt.iter() {
        if s.write_all(std::slice::from_ref(byte)).is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let took = start.elapsed();
    assert!(closed, "the handshake was still open after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}, deadline 1 s"
    );
    write_read_back(srv.addr, 0, 17);
}

#[test]
fn idle_handshakes_are_evicted_oldest_first_and_never_take_a_negotiated_slot() {
    let srv = NbdProc::start(&[
        "--ram",
        "16M",
        "--max-connections",
        "2",
        "--max-handshakes",
        "3",
    ]);
    // Ten silent connections: only the newest three can still be open.
    let mut silent: Vec<TcpStream> = (0..10).map(|_| connect(srv.addr)).collect();
    // Each gets its greeting once the server took it: then it is tracked.
    for s in &mut silent {
        let mut g = [0u8; 18];
        // An evicted one may see EOF before its greeting is read; either way
        // the server accepted it.
        let _ = s.read_exact(&mut g);
    }
    // Both negotiated slots are still there for real clients, and a third
    // negotiated client is refused with an error reply, not hung.
    let a = client(srv.addr);
    let b = client(srv.addr);
    let mut c = connect(srv.addr);
    greet(&mut c);
    assert_eq!(
        go(&mut c),
        Err(rep::ERR_SHUTDOWN),
        "no third negotiated slot"
    );
    // The first silent connections were evicted by the newer ones.
    for (i, s) in silent.iter_mut().take(5).enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "silent connection {i} was not evicted"
        );
    }
    drop(a);
    // A freed negotiated slot serves the refused client on its next GO (the
    // server may notice the close a little later: retry until a deadline).
    let until = Instant::now() + Duration::from_secs(5);
    while let Err(e) = go(&mut c) {
        assert_eq!(e, rep::ERR_SHUTDOWN);
        assert!(Instant::now() < until, "the slot was never released");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.write_all(&request(cmd::READ, 1, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c), (0, 1));
    let mut d = [0u8; 4096];
    c.read_exact(&mut d).unwrap();
    drop(b);
}
