//! What a panic does to the process: it ends it.
//!
//! A reactor thread owns many connections and a bridge's worker owns a
//! queue; a thread that died of a panic would leave a process that looks
//! alive while silently dropping a share of its clients. So every panic, on
//! any thread, is reported (the standard message and location, then one
//! `unvme: fatal:` line naming the thread) and the process exits with
//! status 70 (EX_SOFTWARE), for a supervisor (systemd, a container runtime)
//! to restart it. Hosts reconnect (Linux nvme-tcp, our initiator, QEMU's
//! vhost-user-blk with `reconnect`), so a restart is the recoverable
//! outcome; a half-dead process is not. docs/security.md states the policy.

/// Exit status after a panic (EX_SOFTWARE, sysexits.h).
pub const PANIC_EXIT: i32 = 70;

/// Installs the hook; call once, first thing in `main`.
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(thread = name, "panic: {info}; exiting");
        eprintln!("unvme: fatal: thread '{name}' panicked; exiting with status {PANIC_EXIT}");
        std::process::exit(PANIC_EXIT);
    }));
}

/// Fault injection (`--fault-panic-ms`): a thread that panics after `ms`.
pub fn inject(ms: u64) {
    let spawned = std::thread::Builder::new()
        .name("fault-inject".into())
        .spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            panic!("injected fault (--fault-panic-ms {ms})");
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the fault injection thread: {e}");
    }
}
