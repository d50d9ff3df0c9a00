//! Buffer memory of the in-process [`Server`], read from its budget
//! counter: an idle connection returns its pool, and WRITE headers whose
//! payload never comes hold no buffer (at most the chunk whose first bytes
//! arrived).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{negotiate, request, simple_reply};
use unvme_bdev::{Bdev, RamBdev};
use unvme_nbd::{cmd, Export, Limits, Listen, Server, ServerConfig};

fn server(limits: Limits) -> Server {
    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("ram", 1 << 16, 512).unwrap());
    let mut cfg = ServerConfig::new(
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
        vec![Export {
            name: "ram".into(),
            aliases: vec![],
            description: String::new(),
            bdev,
            read_only: false,
        }],
    );
    cfg.limits = limits;
    Server::start(cfg).unwrap()
}

/// Waits until `f` holds, for at most 5 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < until, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_idle_connection_returns_its_buffer_pool() {
    let srv = server(Limits {
        pool_idle: Duration::from_millis(200),
        ..Limits::default()
    });
    let mut s = negotiate(common::addr(&srv)).unwrap();
    // Sixteen 1 MiB WRITEs pipelined: up to 16 MiB of buffers in use, then
    // pooled (at most the 8 MiB pool).
    for i in 0..16u64 {
        s.write_all(&request(cmd::WRITE, i, i << 20, 1 << 20))
            .unwrap();
        s.write_all(&vec![i as u8; 1 << 20]).unwrap();
    }
    for _ in 0..16 {
        assert_eq!(simple_reply(&mut s).0, 0);
    }
    // (The server frees a slot just after its reply is written.)
    eventually("the pool keeps at most 8 MiB", || {
        srv.buffer_bytes() <= 8 << 20
    });
    // Nothing in flight: the pool goes back, the connection stays open.
    eventually("the idle connection kept its pool", || {
        srv.buffer_bytes() == 0
    });
    s.write_all(&request(cmd::FLUSH, 99, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 99));
}

#[test]
fn write_headers_without_payload_hold_no_buffers() {
    let srv = server(Limits::default());
    let addr = common::addr(&srv);
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut s = negotiate(addr).unwrap();
        s.write_all(&request(cmd::WRITE, 1, 0, 32 << 20)).unwrap();
        if i == 0 {
            // A few payload bytes: the first 1 MiB chunk, no more.
            s.write_all(&[7u8; 100]).unwrap();
        }
        conns.push(s);
    }
    // A client that completes a request proves the server ran past the
    // attackers' headers (each connection has its own thread: this is
    // liveness, the budget below is the memory).
    let mut ok = negotiate(addr).unwrap();
    ok.write_all(&request(cmd::WRITE, 5, 0, 4096)).unwrap();
    ok.write_all(&[1u8; 4096]).unwrap();
    assert_eq!(simple_reply(&mut ok), (0, 5));
    eventually("the 100 payload bytes got their chunk", || {
        srv.buffer_bytes() >= 1 << 20
    });
    assert!(
        srv.buffer_bytes() <= (1 << 20) + (8 << 20),
        "{} bytes held for 4 x 32 MiB of declared, unsent payload",
        srv.buffer_bytes()
    );
}
