//! SPDK as a test peer: the prebuilt tree that `qemu-scripts/install-spdk.sh`
//! installs (in `$UNVME_SPDK_DIR`, default `/tmp/unvme-spdk`), its target
//! (`nvmf_tgt`) and its host (`spdk_tgt` with `bdev_nvme`) as processes
//! killed on drop, configured through SPDK's own `scripts/rpc.py`, and its
//! host tools (`spdk_nvme_perf`, `spdk_nvme_identify`, …) run with a time
//! limit. This is not a dependency of unvme: only tests use it.
//!
//! Every SPDK app runs as these machines need (SPDK's peer README): no
//! hugepages (`--no-huge -s 1024`), no PCI scan (`-u`), no core lock files
//! (`--disable-cpumask-locks`, so other users' SPDK apps do not refuse ours),
//! a private RPC socket, and its own CPU ([`spdk_cpumask`]: the last CPU, the
//! one our processes are not pinned to).
//!
//! Absent peer: [`Spdk::find`] returns `None` after writing one line to
//! stderr, unless `CI=true`, where it panics (DESIGN.md: tests that need SPDK
//! skip outside CI and fail in CI).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The discovery subsystem's NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// How long any one SPDK tool or rpc.py call may take.
pub const TOOL_LIMIT: Duration = Duration::from_secs(60);

/// An installed SPDK peer.
#[derive(Clone, Debug)]
pub struct Spdk {
    /// `$UNVME_SPDK_DIR/spdk`: holds `bin/`, `lib/`, `scripts/rpc.py`.
    pub root: PathBuf,
}

static SERIAL: Mutex<()> = Mutex::new(());

impl Spdk {
    /// The installed peer, or `None` (with one line on stderr) when it is
    /// absent and `CI` is not `true`. Panics in CI when it is absent.
    pub fn find() -> Option<Spdk> {
        let base = std::env::var_os("UNVME_SPDK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/unvme-spdk"));
        let root = base.join("spdk");
        if root.join("bin/nvmf_tgt").is_file() && root.join("scripts/rpc.py").is_file() {
            return Some(Spdk { root });
        }
        let msg = format!(
            "SPDK peer not installed in {} (run qemu-scripts/install-spdk.sh): SPDK test skipped",
            base.display()
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {msg}"
        );
        // Written to the stderr handle itself, past libtest's capture, so the skip is visible.
        let _ = writeln!(std::io::stderr(), "{msg}");
        None
    }

    /// Serializes the SPDK tests of one test binary: every SPDK app spins a
    /// whole CPU, and these machines have two. Hold the guard for the test.
    pub fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A command for `bin/NAME` with SPDK's libraries on the library path.
    pub fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.root.join("bin").join(name));
        c.env("LD_LIBRARY_PATH", self.root.join("lib"));
        c
    }

    /// Runs SPDK host tool `NAME ARGS…` (with `--no-huge -s 1024` when the
    /// tool takes them) on [`spdk_cpumask`]'s CPU, bounded by [`TOOL_LIMIT`].
    pub fn tool(&self, name: &str, args: &[&str]) -> Output {
        let mut c = self.command(name);
        match name {
            "spdk_nvme_perf" => {
                c.args(["--no-huge", "-s", "1024", "-c", &spdk_cpumask()]);
            }
            "spdk_nvme_identify" => {
                c.args(["--no-huge", "-s", "1024", "-p", &spdk_cpu().to_string()]);
            }
            _ => {}
        }
        c.args(args);
        let out = run_bounded(c, None, TOOL_LIMIT);
        remove_run_files(out.pid);
        out
    }

    /// `python3 scripts/rpc.py -s SOCK` with `lines` (one method call each,
    /// rpc.py's syntax) on its standard input; one Python start for all.
    fn rpc_cmd(&self, sock: &Path) -> Command {
        let mut c = Command::new("python3");
        c.arg(self.root.join("scripts/rpc.py"))
            .arg("-s")
            .arg(sock)
            .arg("-t")
            .arg("30");
        c
    }
}

/// The CPU SPDK apps and tools run on: the last one (ours run unpinned or on
/// the first).
pub fn spdk_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// [`spdk_cpu`] as an SPDK core mask.
pub fn spdk_cpumask() -> String {
    format!("{:#x}", 1u64 << spdk_cpu())
}

/// A loopback TCP port that was free a moment ago (for an SPDK listener,
/// which cannot be told to pick one itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// What a bounded command printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Process id it ran as.
    pub pid: u32,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Panics with both outputs unless the command exited 0; returns stdout.
    pub fn ok(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

/// A child process killed (and reaped) on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `c` with `input` on stdin, collecting its output; kills it and
/// panics if it has not exited within `limit`.
pub fn run_bounded(mut c: Command, input: Option<&str>, limit: Duration) -> Output {
    let what = format!("{c:?}");
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = Reaped(c.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}")));
    if let Some(text) = input {
        let mut stdin = child.0.stdin.take().expect("stdin piped");
        stdin.write_all(text.as_bytes()).expect("write stdin");
    }
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = pipe(child.0.stdout.take().map(|p| Box::new(p) as _));
    let err = pipe(child.0.stderr.take().map(|p| Box::new(p) as _));
    // Panics (and so kills the child through `Reaped`) on timeout.
    let pid = child.0.id();
    let status = super::wait_exit(&mut child.0, limit);
    Output {
        pid,
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Removes what SPDK process `pid` leaves behind once it has exited: DPDK's
/// run dir (even on a clean exit) and SPDK's trace file (when killed).
fn remove_run_files(pid: u32) {
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/spdk_pid{pid}"));
    if let Ok(rd) = std::fs::read_dir("/dev/shm") {
        let suffix = format!("_trace.pid{pid}");
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(&suffix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// One running SPDK application (`nvmf_tgt`, `spdk_tgt`) with a private RPC
/// socket; stopped on drop (SIGTERM, then SIGKILL), its run files removed.
pub struct SpdkApp {
    spdk: Spdk,
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl SpdkApp {
    /// Starts `bin/NAME` on [`spdk_cpumask`] with `extra` arguments and waits
    /// (bounded) until its RPC socket exists and `framework_wait_init`
    /// returns.
    pub fn start(spdk: &Spdk, name: &str, extra: &[&str]) -> SpdkApp {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "unvme-spdk-{}-{}-{}",
            name,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the app's run dir");
        let sock = dir.join("rpc.sock");
        let log = dir.join("app.log");
        let logf = std::fs::File::create(&log).expect("create app log");
        let child = spdk
            .command(name)
            .args(["-m", &spdk_cpumask(), "-u", "--no-huge", "-s", "1024"])
            .arg("--disable-cpumask-locks")
            .arg("-r")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn SPDK {name}: {e}"));
        let mut app = SpdkApp {
            spdk: spdk.clone(),
            child: Some(child),
            dir,
            sock,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !app.sock.exists() {
            let exited = app.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "SPDK {name} exited ({exited:?}) before opening its RPC socket:\n{}",
                app.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "SPDK {name} did not open its RPC socket within 30 s:\n{}",
                app.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        app.rpc(&["framework_wait_init"]);
        app
    }

    /// The app's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// What the app logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One RPC (`rpc.py -s SOCK ARGS…`); panics on an error; returns stdout.
    pub fn rpc(&self, args: &[&str]) -> String {
        let mut c = self.spdk.rpc_cmd(&self.sock);
        c.args(args);
        run_bounded(c, None, TOOL_LIMIT).ok(&format!("rpc.py {}", args.join(" ")))
    }

    /// Several RPCs in one rpc.py run (one line each, rpc.py's syntax);
    /// panics on the first error; returns stdout.
    pub fn rpc_batch(&self, lines: &[String]) -> String {
        let c = self.spdk.rpc_cmd(&self.sock);
        let input = lines.join("\n") + "\n";
        run_bounded(c, Some(&input), TOOL_LIMIT).ok(&format!("rpc.py <<{input}"))
    }
}

impl Drop for SpdkApp {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        // SAFETY: kill(2) with the pid of a child we have not reaped yet and a valid signal.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- SPDK app log ({})\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        remove_run_files(pid);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SPDK's NVMe-oF target (`nvmf_tgt`) with its TCP transport created.
pub struct SpdkTarget {
    /// The running app.
    pub app: SpdkApp,
}

impl SpdkTarget {
    /// Starts `nvmf_tgt` and creates the TCP transport (`extra`: more
    /// `nvmf_create_transport` options).
    pub fn start(spdk: &Spdk, extra: &[&str]) -> SpdkTarget {
        let app = SpdkApp::start(spdk, "nvmf_tgt", &[]);
        let mut args = vec!["nvmf_create_transport", "-t", "TCP"];
        args.extend_from_slice(extra);
        app.rpc(&args);
        SpdkTarget { app }
    }

    /// Adds subsystem `nqn` (any host, serial `serial`, model `model`) with
    /// one malloc namespace of `mib` MiB in `block_size` blocks and a TCP
    /// listener on a free loopback port, which it returns.
    pub fn add_malloc_subsystem(
        &self,
        nqn: &str,
        serial: &str,
        model: &str,
        mib: u32,
        block_size: u32,
    ) -> u16 {
        static N: AtomicU32 = AtomicU32::new(0);
        let bdev = format!("Malloc{}", N.fetch_add(1, Ordering::Relaxed));
        let port = free_port();
        self.app.rpc_batch(&[
            format!("bdev_malloc_create {mib} {block_size} -b {bdev}"),
            format!("nvmf_create_subsystem {nqn} -a -s {serial} -d '{model}'"),
            format!("nvmf_subsystem_add_ns {nqn} {bdev}"),
            format!("nvmf_subsystem_add_listener {nqn} -t tcp -f ipv4 -a 127.0.0.1 -s {port}"),
        ]);
        port
    }

    /// Adds a listener of the discovery subsystem on a free loopback port,
    /// which it returns.
    pub fn add_discovery_listener(&self) -> u16 {
        let port = free_port();
        self.app.rpc(&[
            "nvmf_subsystem_add_listener",
            DISCOVERY_NQN,
            "-t",
            "tcp",
            "-f",
            "ipv4",
            "-a",
            "127.0.0.1",
            "-s",
            &port.to_string(),
        ]);
        port
    }
}

/// SPDK's host: `spdk_tgt`, whose `bdev_nvme` module attaches remote NVMe/TCP
/// controllers as bdevs (and can serve them again through its own NVMe-oF
/// target, which is how a test moves data through it).
pub struct SpdkHost {
    /// The running app.
    pub app: SpdkApp,
}

impl SpdkHost {
    /// Starts `spdk_tgt`.
    pub fn start(spdk: &Spdk) -> SpdkHost {
        SpdkHost {
            app: SpdkApp::start(spdk, "spdk_tgt", &[]),
        }
    }

    /// `bdev_nvme_attach_controller` of `nqn` at 127.0.0.1:`port` as
    /// controller `name` (`extra`: more options, e.g. `-e -d` for digests or
    /// `-x multipath`); returns the bdev names it created (`NAMEn1`, …).
    pub fn attach(&self, name: &str, port: u16, nqn: &str, extra: &[&str]) -> Vec<String> {
        let port = port.to_string();
        let mut args = vec![
            "bdev_nvme_attach_controller",
            "-b",
            name,
            "-t",
            "tcp",
            "-f",
            "ipv4",
            "-a",
            "127.0.0.1",
            "-s",
            &port,
            "-n",
            nqn,
        ];
        args.extend_from_slice(extra);
        self.app
            .rpc(&args)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// `bdev_get_bdevs -b NAME` as JSON.
    pub fn bdev(&self, name: &str) -> serde_json::Value {
        let out = self.app.rpc(&["bdev_get_bdevs", "-b", name]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("bdev_get_bdevs JSON");
        v[0].clone()
    }

    /// Serves bdev `bdev` through this app's own NVMe-oF target as subsystem
    /// `nqn` on a free loopback port, which it returns.
    pub fn export(&self, nqn: &str, bdev: &str) -> u16 {
        let port = free_port();
        self.app.rpc_batch(&[
            "nvmf_create_transport -t TCP".to_string(),
            format!("nvmf_create_subsystem {nqn} -a -s SPDKHOST0001"),
            format!("nvmf_subsystem_add_ns {nqn} {bdev}"),
            format!("nvmf_subsystem_add_listener {nqn} -t tcp -f ipv4 -a 127.0.0.1 -s {port}"),
        ]);
        port
    }
}
