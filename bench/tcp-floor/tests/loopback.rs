//! A real server thread and a real client over a loopback socket.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use tcp_floor::{run_client, serve, ClientConfig, Error, Mode};

fn run_pair(mode: Mode, req: usize, resp: usize, depths: &[usize]) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = listener.local_addr().expect("bound socket has an address");
    let n = depths.len() as u64;
    let server = thread::spawn(move || serve(&listener, mode, Some(n)));
    for &depth in depths {
        let cfg = ClientConfig {
            addr,
            req,
            resp,
            depth,
            time: Duration::from_millis(200),
            mode,
        };
        let r = run_client(&cfg).unwrap_or_else(|e| panic!("client at depth {depth}: {e}"));
        assert!(r.ops > 0.0, "depth {depth}: no ops");
        assert!(r.completed > 0 && r.verified >= r.completed);
        assert!(r.mean_us > 0.0 && r.p99_us >= r.p50_us);
    }
    server.join().expect("server thread").expect("server");
}

#[test]
fn spinning_client_gets_right_sized_responses_at_depth_1_and_4() {
    run_pair(Mode::Spin, 64, 4096, &[1, 4]);
}

#[test]
fn blocking_client_gets_right_sized_responses_at_depth_1_and_4() {
    run_pair(Mode::Block, 4096, 64, &[1, 4]);
}

#[test]
fn header_only_messages_work() {
    run_pair(Mode::Spin, 8, 8, &[4]);
}

#[test]
fn client_rejects_a_response_of_the_wrong_length() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = listener.local_addr().expect("bound socket has an address");
    // A server that agrees to 96 B responses and then sends one of 100 B.
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut hello = [0u8; 16];
        s.read_exact(&mut hello).expect("handshake");
        s.write_all(b"FLOOROK\0").expect("ack");
        let mut req = [0u8; 64];
        s.read_exact(&mut req).expect("request");
        let mut resp = [0u8; 100];
        resp[..4].copy_from_slice(&100u32.to_le_bytes());
        s.write_all(&resp).expect("response");
        // Keep the socket open until the client gives up.
        let _ = s.read(&mut req);
    });
    let cfg = ClientConfig {
        addr,
        req: 64,
        resp: 96,
        depth: 1,
        time: Duration::from_millis(200),
        mode: Mode::Spin,
    };
    match run_client(&cfg) {
        Err(Error::WrongLength {
            expected: 96,
            got: 100,
        }) => {}
        other => panic!("expected WrongLength, got {other:?}"),
    }
    server.join().expect("server thread");
}
