//! `unvme perf`: IOPS, bandwidth and latency against an NVMe/TCP namespace,
//! in the spirit of `spdk_nvme_perf`.
//!
//! Each thread owns one I/O queue pair (its own TCP connection), keeps
//! `--qd` commands in flight and spins on `poll`. Latency is measured per
//! command from submission to completion and gathered in an HDR histogram.
//!
//! `--verify`: every written block carries a pattern derived from its LBA
//! and a per-run seed, and every read block is checked against it. Because
//! reads can only be checked against blocks written in this run, a verified
//! run whose pattern reads (`read`, `randread`, `randrw`) first writes the
//! whole region (`--range`) sequentially, then starts the timed phase.
//! Writes during the timed phase write the same pattern, so concurrent
//! reads and writes of one block never disagree.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use unvme_bdev::{IoBuf, IoOp, IoRequest};
use unvme_initiator::{Controller, IoQpair};

use crate::connect_args::ConnectArgs;

/// I/O pattern.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes (`--mix` percent reads).
    Randrw,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Randrw => "randrw",
        }
    }
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
    fn reads(self) -> bool {
        matches!(self, Pattern::Read | Pattern::Randread | Pattern::Randrw)
    }
}

/// Arguments of `unvme perf`.
#[derive(clap::Args, Debug)]
pub struct PerfArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Namespace ID.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Queue depth per thread.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// I/O size in bytes (a multiple of the block size).
    #[arg(long, default_value_t = 4096)]
    io_size: usize,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pattern: Pattern,
    /// Read percentage for randrw.
    #[arg(long, default_value_t = 70)]
    mix: u32,
    /// Run time in seconds.
    #[arg(long, default_value_t = 10)]
    time: u64,
    /// Threads, each with its own I/O queue pair (TCP connection).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPU list to pin threads to (thread i on the i-th CPU), e.g. `1` or `0,1` or `0-3`.
    #[arg(long)]
    cpus: Option<String>,
    /// Write a per-block pattern and check it on reads (see the module docs).
    #[arg(long)]
    verify: bool,
    /// Bytes of the namespace to use (e.g. 64M; default: all of it).
    #[arg(long)]
    range: Option<String>,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

type BoxErr = Box<dyn std::error::Error>;

fn parse_cpus(s: &str) -> Result<Vec<usize>, BoxErr> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
                if b < a {
                    return Err(format!("bad CPU range {part:?}").into());
                }
                v.extend(a..=b);
            }
            None => v.push(part.trim().parse()?),
        }
    }
    if v.is_empty() {
        return Err(format!("empty CPU list {s:?}").into());
    }
    Ok(v)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero bytes is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!("CPU {cpu} out of range")));
    }
    // SAFETY: `set` is a valid cpu_set_t and cpu < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is valid for the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The verify pattern: 8-byte words derived from the LBA, the word index and the seed.
fn fill_pattern(buf: &mut [u8], lba: u64, block_size: usize, seed: u64) {
    for (b, blk) in buf.chunks_exact_mut(block_size).enumerate() {
        let base = (seed ^ (lba + b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29);
        for (i, w) in blk.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&base.wrapping_add(i as u64).to_le_bytes());
        }
    }
}

/// Counts blocks of `buf` that do not hold the pattern.
fn check_pattern(buf: &[u8], lba: u64, block_size: usize, seed: u64) -> u64 {
    let mut bad = 0;
    for (b, blk) in buf.chunks_exact(block_size).enumerate() {
        let base = (seed ^ (lba + b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29);
        let ok = blk
            .chunks_exact(8)
            .enumerate()
            .all(|(i, w)| w == base.wrapping_add(i as u64).to_le_bytes());
        if !ok {
            bad += 1;
        }
    }
    bad
}

/// What a worker needs to know.
#[derive(Clone, Copy)]
struct Job {
    nsid: u32,
    qd: usize,
    io_blocks: u32,
    block_size: usize,
    /// Number of I/O-sized units in the region.
    units: u64,
    pattern: Pattern,
    mix: u32,
    verify: bool,
    seed: u64,
    index: usize,
    threads: usize,
    /// How long a stopping worker waits for its commands before it drops
    /// the connection (the command timeout and a margin: the queue pair
    /// times commands out itself, this is the backstop).
    drain: Duration,
}

struct WorkerResult {
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    mismatches: u64,
    elapsed: Duration,
}

struct Inflight {
    start: Instant,
    lba: u64,
    read: bool,
}

/// Runs one worker: keeps `qd` commands in flight until `stop`, or, for a
/// fill pass, writes every unit of its share of the region once.
fn worker(
    mut qp: IoQpair,
    job: Job,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    fill: bool,
) -> WorkerResult {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .expect("static histogram bounds are valid");
    let io_bytes = job.io_blocks as usize * job.block_size;
    let mut bufs: Vec<IoBuf> = (0..job.qd).map(|_| IoBuf::new(io_bytes)).collect();
    let mut inflight: Vec<Option<Inflight>> = (0..job.qd).map(|_| None).collect();
    let mut free_tags: Vec<usize> = (0..job.qd).rev().collect();
    let mut rng = fastrand::Rng::with_seed(job.seed ^ ((job.index as u64 + 1) * 0x1234_5678_9abc));
    let share = job.units / job.threads as u64;
    let first = share * job.index as u64;
    let my_units = if job.index + 1 == job.threads {
        job.units - first
    } else {
        share
    };
    let mut seq = 0u64;
    let (mut ios, mut errors, mut mismatches) = (0u64, 0u64, 0u64);
    let mut out = Vec::with_capacity(job.qd);
    let t0 = Instant::now();
    let mut fill_done = my_units == 0;
    let mut stopping_since: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::Relaxed) || (fill && fill_done);
        if stopping && !qp.is_closed() {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() > job.drain {
                tracing::error!(
                    qid = qp.qid(),
                    outstanding = job.qd - free_tags.len(),
                    "commands still outstanding after the command timeout; dropping the connection"
                );
                qp.disconnect();
            }
        }
        while !stopping && !free_tags.is_empty() {
            let unit = if fill {
                if seq >= my_units {
                    fill_done = true;
                    break;
                }
                seq += 1;
                first + seq - 1
            } else if job.pattern.random() {
                rng.u64(0..job.units)
            } else {
                let u = first + seq % my_units.max(1);
                seq += 1;
                u
            };
            let lba = unit * u64::from(job.io_blocks);
            let read = !fill
                && match job.pattern {
                    Pattern::Read | Pattern::Randread => true,
                    Pattern::Write | Pattern::Randwrite => false,
                    Pattern::Randrw => rng.u32(0..100) < job.mix,
                };
            let Some(tag) = free_tags.pop() else { break };
            let Some(mut buf) = bufs.pop() else { break };
            let op = if read {
                IoOp::Read {
                    lba,
                    nlb: job.io_blocks,
                }
            } else {
                if job.verify {
                    fill_pattern(&mut buf, lba, job.block_size, job.seed);
                }
                IoOp::Write {
                    lba,
                    nlb: job.io_blocks,
                    fua: false,
                }
            };
            inflight[tag] = Some(Inflight {
                start: Instant::now(),
                lba,
                read,
            });
            let req = IoRequest {
                tag: tag as u64,
                op,
                buf: Some(buf),
                more: Vec::new(),
            };
            if let Err(unvme_bdev::SubmitError::Busy(req)) = qp.submit(job.nsid, req) {
                inflight[tag] = None;
                free_tags.push(tag);
                if let Some(b) = req.buf {
                    bufs.push(b);
                }
                break;
            }
        }
        if stopping && free_tags.len() == job.qd {
            break;
        }
        out.clear();
        qp.poll(&mut out);
        let now = Instant::now();
        for c in out.drain(..) {
            let tag = c.tag as usize;
            let Some(inf) = inflight.get_mut(tag).and_then(Option::take) else {
                continue;
            };
            hist.saturating_record(now.duration_since(inf.start).as_nanos() as u64);
            ios += 1;
            match &c.result {
                Ok(()) => {
                    if inf.read && job.verify {
                        if let Some(b) = &c.buf {
                            let bad =
                                check_pattern(&b[..io_bytes], inf.lba, job.block_size, job.seed);
                            if bad > 0 && mismatches < 10 {
                                tracing::error!(lba = inf.lba, blocks = bad, "verify mismatch");
                            }
                            mismatches += bad;
                        }
                    }
                }
                Err(e) => {
                    if errors < 10 {
                        tracing::error!(lba = inf.lba, read = inf.read, error = %e, "I/O error");
                    }
                    errors += 1;
                }
            }
            bufs.push(c.buf.unwrap_or_else(|| IoBuf::new(io_bytes)));
            free_tags.push(tag);
        }
        progress.store(ios, Ordering::Relaxed);
        if qp.is_closed() && free_tags.len() == job.qd {
            if !stop.load(Ordering::Relaxed) {
                tracing::error!(qid = qp.qid(), "connection closed");
                errors += 1;
            }
            break;
        }
    }
    WorkerResult {
        hist,
        ios,
        errors,
        mismatches,
        elapsed: t0.elapsed(),
    }
}

/// Runs workers on `qpairs` until `time` passes (or the fill pass ends).
fn run_phase(
    qpairs: Vec<IoQpair>,
    base: Job,
    cpus: &Option<Vec<usize>>,
    time: Duration,
    fill: bool,
    live: bool,
) -> Result<Vec<WorkerResult>, BoxErr> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> =
        qpairs.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut handles = Vec::new();
    for (i, qp) in qpairs.into_iter().enumerate() {
        let job = Job { index: i, ..base };
        let (stop, progress) = (stop.clone(), counters[i].clone());
        let cpu = cpus.as_ref().and_then(|c| c.get(i).copied());
        handles.push(
            std::thread::Builder::new()
                .name(format!("perf-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = pin_to(cpu) {
                            tracing::warn!(cpu, error = %e, "cannot pin thread");
                        }
                    }
                    worker(qp, job, stop, progress, fill)
                })?,
        );
    }
    let t0 = Instant::now();
    let mut last = (t0, 0u64);
    let bytes_per_io = base.io_blocks as f64 * base.block_size as f64;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if !fill && now.duration_since(t0) >= time {
            stop.store(true, Ordering::Relaxed);
        }
        if live && now.duration_since(last.0) >= Duration::from_secs(1) {
            let total: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            let dt = now.duration_since(last.0).as_secs_f64();
            let iops = (total - last.1) as f64 / dt;
            eprintln!(
                "[{:>4.0}s] {:>10.0} IOPS {:>9.2} MiB/s",
                now.duration_since(t0).as_secs_f64(),
                iops,
                iops * bytes_per_io / (1024.0 * 1024.0)
            );
            last = (now, total);
        }
    }
    stop.store(true, Ordering::Relaxed);
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "a perf thread panicked".into()))
        .collect()
}

/// Runs the benchmark.
pub fn run(a: PerfArgs) -> Result<(), BoxErr> {
    if a.qd == 0 || a.threads == 0 || a.io_size == 0 {
        return Err("--qd, --threads and --io-size must be positive".into());
    }
    if a.mix > 100 {
        return Err("--mix is a percentage (0..=100)".into());
    }
    let cpus = a.cpus.as_deref().map(parse_cpus).transpose()?;
    let mut opts = a.conn.options();
    opts.num_io_queues = a.threads.min(u16::MAX as usize) as u16;
    opts.io_queue_size = opts
        .io_queue_size
        .max((a.qd + 1).min(u16::MAX as usize) as u16);
    let ctrl = Controller::connect(opts)?;
    let id = ctrl.identify_namespace(a.nsid)?;
    let block_size = match id.lba_size() {
        Some(bs) if id.nsze != 0 => bs as usize,
        _ => return Err(format!("namespace {} is not active", a.nsid).into()),
    };
    if !a.io_size.is_multiple_of(block_size) {
        return Err(format!(
            "--io-size {} is not a multiple of the block size {block_size}",
            a.io_size
        )
        .into());
    }
    let mt = ctrl.max_transfer() as usize;
    if mt != 0 && a.io_size > mt {
        return Err(format!(
            "--io-size {} exceeds the controller's MDTS ({mt} bytes)",
            a.io_size
        )
        .into());
    }
    let ns_bytes = id.nsze * block_size as u64;
    let region = match &a.range {
        Some(r) => unvme_bdev::parse_size(r)?.min(ns_bytes),
        None => ns_bytes,
    };
    let units = region / a.io_size as u64;
    if units == 0 {
        return Err("--range is smaller than one I/O".into());
    }
    if (ctrl.num_io_queues() as usize) < a.threads {
        return Err(format!(
            "the controller granted {} I/O queues; --threads {} needs one each",
            ctrl.num_io_queues(),
            a.threads
        )
        .into());
    }
    let seed = fastrand::u64(..);
    let job = Job {
        nsid: a.nsid,
        qd: a.qd,
        io_blocks: (a.io_size / block_size) as u32,
        block_size,
        units,
        pattern: a.pattern,
        mix: a.mix,
        verify: a.verify,
        seed,
        index: 0,
        threads: a.threads,
        drain: ctrl.options().command_timeout + Duration::from_secs(1),
    };
    let open = |n: usize| -> Result<Vec<IoQpair>, BoxErr> {
        (0..n)
            .map(|_| {
                let mut q = ctrl.create_io_qpair()?;
                q.register_namespace(a.nsid, block_size as u32);
                Ok(q)
            })
            .collect()
    };
    let mut fill_errors = 0;
    if a.verify && a.pattern.reads() {
        eprintln!(
            "verify: writing the pattern over {} MiB first",
            units * a.io_size as u64 / (1 << 20)
        );
        let r = run_phase(open(a.threads)?, job, &cpus, Duration::ZERO, true, false)?;
        fill_errors = r.iter().map(|w| w.errors).sum::<u64>();
    }
    let results = run_phase(
        open(a.threads)?,
        job,
        &cpus,
        Duration::from_secs(a.time),
        false,
        true,
    )?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let (mut ios, mut errors, mut mismatches) = (0u64, fill_errors, 0u64);
    let mut secs = 0f64;
    for r in &results {
        hist.add(&r.hist)?;
        ios += r.ios;
        errors += r.errors;
        mismatches += r.mismatches;
        secs = secs.max(r.elapsed.as_secs_f64());
    }
    let secs = secs.max(1e-9);
    let iops = ios as f64 / secs;
    let mib_s = iops * a.io_size as f64 / (1024.0 * 1024.0);
    let us = |ns: u64| ns as f64 / 1000.0;
    let (mean, min, max) = if ios > 0 {
        (hist.mean() / 1000.0, us(hist.min()), us(hist.max()))
    } else {
        (0.0, 0.0, 0.0)
    };
    let (p50, p99, p999) = (
        us(hist.value_at_quantile(0.50)),
        us(hist.value_at_quantile(0.99)),
        us(hist.value_at_quantile(0.999)),
    );
    let mut t = String::new();
    let _ = writeln!(
        t,
        "pattern {} io_size {} qd {} threads {} cpus {} digests hdr={} data={} time {:.1}s",
        a.pattern.name(),
        a.io_size,
        a.qd,
        a.threads,
        a.cpus.as_deref().unwrap_or("-"),
        a.conn.hdr_digest,
        a.conn.data_digest,
        secs
    );
    let _ = writeln!(
        t,
        "{:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "IOPS", "MiB/s", "mean_us", "min_us", "max_us", "p50_us", "p99_us", "p99.9_us"
    );
    let _ = writeln!(
        t,
        "{iops:>12.0} {mib_s:>10.2} {mean:>10.2} {min:>10.2} {max:>10.2} {p50:>10.2} {p99:>10.2} {p999:>10.2}"
    );
    let _ = write!(t, "ios {ios} errors {errors}");
    if a.verify {
        let _ = write!(t, " verify_mismatches {mismatches}");
    }
    println!("{t}");
    if a.json {
        let j = serde_json::json!({
            "iops": iops,
            "mib_s": mib_s,
            "ios": ios,
            "errors": errors,
            "lat_us": {"mean": mean, "min": min, "max": max, "p50": p50, "p99": p99, "p999": p999},
            "threads": a.threads,
            "qd": a.qd,
            "io_size": a.io_size,
            "pattern": a.pattern.name(),
        });
        println!("{j}");
    }
    drop(ctrl);
    if errors > 0 || mismatches > 0 {
        return Err(format!("{errors} I/O errors, {mismatches} verify mismatches").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_accept_singles_commas_and_ranges() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("3-1").is_err());
    }

    #[test]
    fn verify_pattern_detects_a_changed_or_misplaced_block() {
        let mut b = vec![0u8; 4096];
        fill_pattern(&mut b, 10, 512, 42);
        assert_eq!(check_pattern(&b, 10, 512, 42), 0);
        assert_eq!(check_pattern(&b, 11, 512, 42), 8);
        assert_eq!(check_pattern(&b, 10, 512, 43), 8);
        b[600] ^= 1;
        assert_eq!(check_pattern(&b, 10, 512, 42), 1);
    }
}
