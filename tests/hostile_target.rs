//! The initiator, through the real `unvme perf` binary, against a hostile
//! target: a proxy in front of the real `unvme target` turns the first R2T
//! of a connection into a flood of thousands and stops passing the host's
//! bytes on (72 KB from the target used to push `unvme perf` to 413 MB at
//! 100% CPU, never ending). `perf --time 2 --timeout-ms 1000` must end in
//! bounded time with bounded memory.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{wait_exit, TargetProc};
use unvme_proto::pdu::{Event, Limits, Pdu, PduDecoder, Role};

/// A proxy to `target` that floods the host with `flood` copies of the
/// first R2T on each connection, then stops reading the host. Returns its
/// address and the count of floods sent.
fn r2t_flood_proxy(target: SocketAddr, flood: usize) -> (SocketAddr, Arc<AtomicUsize>) {
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
                        match ev {
                            Some(Event::Pdu(Pdu::R2t(_))) if !flooded => {
                                flooded = true;
                                let _ = stall_tx.send(());
                                let v = pending.repeat(flood);
                                pending.clear();
                                floods.fetch_add(1, Ordering::Relaxed);
                                // The host may close before it is all sent.
                                let _ = h_wr.write_all(&v);
                            }
                            Some(_) => {
                                if h_wr.write_all(&pending).is_err() {
                                    return;
                                }
                                pending.clear();
                            }
                            None if used == 0 => break,
                            None => {}
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
    // SAFETY: getrusage(2) fills the zeroed rusage it is given, which lives
    // across the call.
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
    let (proxy, floods) = r2t_flood_proxy(t.addr, 3000);
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
