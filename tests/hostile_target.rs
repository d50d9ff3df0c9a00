//! The initiator, through the real `unvme perf` and `unvme nbd` binaries,
//! against a hostile target: a proxy in front of the real `unvme target`
//! that either turns the first R2T of a connection into a flood of
//! thousands and stops passing the host's bytes on (72 KB from the target
//! used to push `unvme perf` to 413 MB at 100% CPU, never ending), or
//! answers a 64 KiB read with 512 bytes flagged LAST_PDU|SUCCESS (an NBD
//! client used to get status OK and 65,024 bytes of a previous request's
//! data).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{wait_exit, TargetProc};
use unvme_proto::pdu::{encode_header, DataPdu, Event, Framing, Limits, Pdu, PduDecoder, Role};

/// What the proxy does to the target's PDUs.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// Send this many copies of each connection's first R2T, then stop
    /// reading the host.
    R2tFlood(usize),
    /// Answer the large (16 KiB or more) C2HData PDUs after the first
    /// `skip` with 512 bytes flagged LAST_PDU|SUCCESS, dropping the rest of
    /// that command's data and its CapsuleResp.
    ShortSuccess { skip: usize },
}

/// A proxy to `target` that plays `attack`. Returns its address and the
/// count of attacks made.
fn proxy(target: SocketAddr, attack: Attack) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let floods = Arc::new(AtomicUsize::new(0));
    let floods2 = floods.clone();
    std::thread::spawn(move || {
        for host in l.incoming() {
            let Ok(host) = host else { return };
            let Ok(tgt) = TcpStream::connect(target) else {
                return;
            };
            let floods = floods2.clone();
            // Host to target, until the flood: then the host's bytes are
            // left unread (the thread waits for the connection's end).
            let (stall_tx, stall_rx) = mpsc::channel::<()>();
            let (mut h_rd, mut t_wr) = (host.try_clone().unwrap(), tgt.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut b = vec![0u8; 65536];
                loop {
                    if stall_rx.try_recv().is_ok() {
                        // Blocks until the other direction ends.
                        let _ = stall_rx.recv();
                        return;
                    }
                    match h_rd.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stall_rx.try_recv().is_ok() {
                                let _ = stall_rx.recv();
                                return;
                            }
                            if t_wr.write_all(&b[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let (mut t_rd, mut h_wr) = (tgt, host);
            std::thread::spawn(move || {
                let mut dec = PduDecoder::new(
                    Role::Host,
                    Limits {
                        max_incapsule: 0,
                        max_data: u32::MAX,
                    },
                );
                let mut b = vec![0u8; 65536];
                // Bytes the decoder took that are not passed on yet: the
                // current PDU's header until it is complete.
                let mut pending = Vec::new();
                let mut flooded = false;
                // ShortSuccess: the command lied about, and how many data
                // bytes of the current PDU are still passed on (None: all).
                let mut victim: Option<u16> = None;
                let mut pass: Option<usize> = None;
                let mut large_seen = 0;
                loop {
                    let n = match t_rd.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut off = 0;
                    while off < n {
                        let Ok((used, ev)) = dec.decode(&b[off..n]) else {
                            return;
                        };
                        pending.extend_from_slice(&b[off..off + used]);
                        off += used;
                        match (attack, ev) {
                            (Attack::ShortSuccess { skip }, Some(Event::Pdu(Pdu::C2hData(d)))) => {
                                let large = d.datao == 0 && d.datal >= 16384;
                                if large && victim.is_none() {
                                    large_seen += 1;
                                }
                                if large && victim.is_none() && large_seen > skip {
                                    victim = Some(d.cccid);
                                    floods.fetch_add(1, Ordering::Relaxed);
                                    let lie = Pdu::C2hData(DataPdu {
                                        datal: 512,
                                        last: true,
                                        success: true,
                                        ..d
                                    });
                                    let mut h = [0u8; 128];
                                    let n = encode_header(&lie, &Framing::default(), &mut h);
                                    if h_wr.write_all(&h[..n]).is_err() {
                                        return;
                                    }
                                    pass = Some(512);
                                } else if victim == Some(d.cccid) {
                                    pass = Some(0);
                                } else {
                                    if h_wr.write_all(&pending).is_err() {
                                        return;
                                    }
                                    pass = None;
                                }
                                pending.clear();
                            }
                            (Attack::ShortSuccess { .. }, Some(Event::Data(chunk))) => {
                                let k = pass.map_or(chunk.len(), |p| p.min(chunk.len()));
                                if h_wr.write_all(&chunk[..k]).is_err() {
                                    return;
                                }
                                if let Some(p) = pass.as_mut() {
                                    *p -= k;
                                }
                                pending.clear();
                            }
                            (Attack::ShortSuccess { .. }, Some(Event::DataEnd { .. })) => {
                                if pass.is_none() && h_wr.write_all(&pending).is_err() {
                                    return;
                                }
                                pass = None;
                                pending.clear();
                            }
                            (
                                Attack::ShortSuccess { .. },
                                Some(Event::Pdu(Pdu::CapsuleResp(r))),
                            ) if victim == Some(r.cqe.cid) => {
                                victim = None;
                                pending.clear();
                            }
                            (Attack::R2tFlood(flood), Some(Event::Pdu(Pdu::R2t(_))))
                                if !flooded =>
                            {
                                flooded = true;
                                let _ = stall_tx.send(());
                                let v = pending.repeat(flood);
                                pending.clear();
                                floods.fetch_add(1, Ordering::Relaxed);
                                // The host may close before it is all sent.
                                let _ = h_wr.write_all(&v);
                            }
                            (_, Some(_)) => {
                                if h_wr.write_all(&pending).is_err() {
                                    return;
                                }
                                pending.clear();
                            }
                            (_, None) if used == 0 => break,
                            (_, None) => {}
                        }
                    }
                }
            });
        }
    });
    (addr, floods)
}

/// The largest resident set of the children reaped so far, in KiB.
fn children_max_rss_kib() -> i64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    let r = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(r, 0, "getrusage");
    ru.ru_maxrss
}

/// A child process killed (and reaped) on drop, so a failed test leaves
/// nothing running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn perf_against_an_r2t_flood_ends_in_time_with_bounded_memory() {
    let t = TargetProc::start(&["--ram", "64M"]);
    let (proxy, floods) = proxy(t.addr, Attack::R2tFlood(3000));
    let t0 = Instant::now();
    let perf = Command::new(env!("CARGO_BIN_EXE_unvme"))
        .args([
            "perf",
            "--addr",
            "127.0.0.1",
            "--port",
            &proxy.port().to_string(),
            "--pattern",
            "write",
            "--io-size",
            "131072",
            "--qd",
            "4",
            "--time",
            "2",
            "--timeout-ms",
            "1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn unvme perf");
    let mut perf = KillOnDrop(perf);
    let st = wait_exit(&mut perf.0, Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(st.code().is_some(), "perf exited by itself: {st:?}");
    assert!(
        floods.load(Ordering::Relaxed) >= 1,
        "the proxy flooded the I/O queue"
    );
    assert!(took < Duration::from_secs(10), "perf took {took:?}");
    let rss = children_max_rss_kib();
    assert!(rss < 128 * 1024, "perf peaked at {rss} KiB");
}

/// A minimal NBD client: EXPORT_NAME "" with NO_ZEROES, simple replies.
struct Nbd(TcpStream);

impl Nbd {
    fn connect(addr: SocketAddr) -> Nbd {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&unvme_nbd::opt::EXPORT_NAME.to_be_bytes());
        o.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&o).unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
        Nbd(s)
    }

    /// Sends a request and returns the reply's error and (for a read with
    /// no error) its data.
    fn call(&mut self, typ: u16, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        // NBD request and simple reply magics (the protocol document).
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.0.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut d = Vec::new();
        if typ == unvme_nbd::cmd::READ && error == 0 {
            d.resize(len as usize, 0);
            self.0.read_exact(&mut d).unwrap();
        }
        (error, d)
    }
}

#[test]
fn nbd_read_of_a_lying_target_never_returns_another_requests_data() {
    let t = TargetProc::start(&["--ram", "16M"]);
    let (proxy, lies) = proxy(t.addr, Attack::ShortSuccess { skip: 1 });
    let port = proxy.port().to_string();
    let (srv, addr) = common::spawn_listening(&[
        "nbd",
        "--listen",
        "127.0.0.1:0",
        "--port",
        &port,
        "--timeout-ms",
        "3000",
    ]);
    let _srv = KillOnDrop(srv);
    let mut c = Nbd::connect(addr);
    let (a, b) = (vec![0xaau8; 65536], vec![0xbbu8; 65536]);
    assert_eq!(c.call(unvme_nbd::cmd::WRITE, 0, 65536, &a).0, 0);
    assert_eq!(c.call(unvme_nbd::cmd::WRITE, 1 << 20, 65536, &b).0, 0);
    // Honest: fills the server's buffers with A.
    let (e, d) = c.call(unvme_nbd::cmd::READ, 0, 65536, &[]);
    assert_eq!((e, d == a), (0, true));
    // Lied about: 512 bytes of B, flagged as the whole read.
    let (e, d) = c.call(unvme_nbd::cmd::READ, 1 << 20, 65536, &[]);
    assert_eq!(lies.load(Ordering::Relaxed), 1, "the proxy lied");
    assert!(e != 0 || d == b, "status OK with data that is not B");
    // The export reconnects and reads true data again.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (e, d) = c.call(unvme_nbd::cmd::READ, 1 << 20, 65536, &[]);
        if e == 0 {
            assert!(d == b, "status OK with data that is not B");
            break;
        }
        assert!(Instant::now() < end, "the export did not recover");
    }
}
