//! The process-wide panic policy: a panic on any thread ends the process
//! with status 70 and a clear message, so no half-dead server stays up.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_panicking_thread_ends_the_target_with_status_70() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_unvme"))
        .args([
            "target",
            "--listen",
            "127.0.0.1:0",
            "--null",
            "1G",
            "--fault-panic-ms",
            "300",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start unvme target");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = common::wait_exit(&mut child, Duration::from_secs(20));
    let log = reader.join().expect("stderr reader");
    assert_eq!(status.code(), Some(70), "exit status; log:\n{log}");
    assert!(
        log.contains("listening"),
        "the target was serving first:\n{log}"
    );
    assert!(
        log.contains("unvme: fatal: thread 'fault-inject' panicked; exiting with status 70"),
        "{log}"
    );
}
