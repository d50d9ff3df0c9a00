//! A minimal in-process vhost-user-blk driver for benchmarks: connects to any
//! vhost-user-blk backend's socket (unvme vhost-blk, qemu-storage-daemon),
//! sets up shared memory and one split virtqueue the way QEMU would, and runs
//! 4 KiB random reads or writes at a fixed queue depth for a fixed time,
//! spinning on the used ring like a polling guest driver (EVENT_IDX: it asks
//! for no interrupts and kicks only when the device's avail_event says so).
//! Prints one JSON line: pattern, qd, iops, mean latency, errors.
//!
//! usage: vhost-user-blk-bench --socket PATH [--pattern randread|randwrite]
//!        [--qd N] [--time S] [--size MIB] [--prefill]

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use unvme_vhost_blk::{features as f, req_type, OutHdr};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 64 << 20;
const QSIZE: u16 = 256;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x10_0000;
const BUFS: u64 = 0x20_0000;
const BS: u64 = 4096;

struct Args {
    socket: PathBuf,
    pattern: String,
    qd: u16,
    time: f64,
    size_mib: u64,
    prefill: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        pattern: "randread".into(),
        qd: 1,
        time: 5.0,
        size_mib: 256,
        prefill: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--socket" => a.socket = val()?.into(),
            "--pattern" => a.pattern = val()?,
            "--qd" => a.qd = val()?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--time" => a.time = val()?.parse().map_err(|e| format!("--time: {e}"))?,
            "--size" => a.size_mib = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--prefill" => a.prefill = true,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("--socket is required".into());
    }
    if a.qd == 0 || a.qd > QSIZE / 3 {
        return Err(format!("--qd must be 1..={}", QSIZE / 3));
    }
    Ok(a)
}

struct Driver {
    mem: GuestMemoryMmap<()>,
    _fe: Frontend,
    kick: EventFd,
    avail_idx: u16,
    staged: u16,
    used_seen: u16,
    blocks: u64,
}

impl Driver {
    fn connect(sock: &PathBuf) -> Result<Driver, Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("vu-blk-bench-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        file.set_len(MEM as u64)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file, 0)),
        )])?;
        let mut fe = Frontend::connect(sock, 1)?;
        let features = fe.get_features()?;
        let want = f::VERSION_1
            | f::RING_EVENT_IDX
            | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_owner()?;
        fe.set_features(features & want)?;
        let proto = fe.get_protocol_features()?;
        fe.set_protocol_features(
            proto & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK),
        )?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let (_, cfg) = fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])?;
        let capacity = u64::from_le_bytes(cfg[0..8].try_into()?);
        let region = mem.find_region(GuestAddress(0)).ok_or("no region")?;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region)?])?;
        let host = |gpa: u64| -> Result<u64, Box<dyn std::error::Error>> {
            Ok(mem.get_host_address(GuestAddress(gpa))? as u64)
        };
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(0)?,
            used_ring_addr: host(USED)?,
            avail_ring_addr: host(AVAIL)?,
            log_addr: None,
        };
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        fe.set_vring_num(0, QSIZE)?;
        fe.set_vring_addr(0, &cfg)?;
        fe.set_vring_base(0, 0)?;
        fe.set_vring_call(0, &call)?;
        fe.set_vring_kick(0, &kick)?;
        fe.set_vring_enable(0, true)?;
        let d = Driver {
            mem,
            _fe: fe,
            kick,
            avail_idx: 0,
            staged: 0,
            used_seen: 0,
            blocks: capacity * 512 / BS,
        };
        d.set_used_event();
        Ok(d)
    }

    /// Polling driver: ask for an interrupt half a ring away (never).
    fn set_used_event(&self) {
        let a = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
        let _ = self.mem.write_obj(self.used_seen.wrapping_add(0x7fff), a);
    }

    /// Lays out slot `s`'s chain (descriptors 3s..3s+2) for a 4 KiB request.
    fn prepare(&mut self, s: u16, write: bool, lba: u64) {
        let h = GuestAddress(HDRS + 32 * u64::from(s));
        let hdr = OutHdr {
            type_: if write { req_type::OUT } else { req_type::IN },
            reserved: 0,
            sector: lba * (BS / 512),
        };
        let _ = self.mem.write_slice(&hdr.encode(), h);
        let data = BUFS + BS * u64::from(s);
        let d0 = 3 * s;
        let n = VRING_DESC_F_NEXT as u16;
        let w = VRING_DESC_F_WRITE as u16;
        let descs = [
            SplitDesc::new(h.0, 16, n, d0 + 1),
            SplitDesc::new(data, BS as u32, n | if write { 0 } else { w }, d0 + 2),
            SplitDesc::new(h.0 + 16, 1, w, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            let _ = self.mem.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(16 * u64::from(d0 + i as u16)),
            );
        }
        let pos = self.avail_idx.wrapping_add(self.staged) % QSIZE;
        let _ = self
            .mem
            .write_obj(d0, GuestAddress(AVAIL + 4 + 2 * u64::from(pos)));
        self.staged += 1;
    }

    /// Publishes the staged entries and kicks if the device asked for it.
    fn publish(&mut self) {
        let old = self.avail_idx;
        self.avail_idx = old.wrapping_add(self.staged);
        self.staged = 0;
        fence(Ordering::Release);
        let _ = self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2));
        fence(Ordering::SeqCst);
        let event: u16 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
            .unwrap_or(0);
        // vring_need_event(event, new, old)
        if self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old) {
            let _ = self.kick.write(1);
        }
    }

    /// Completed chains since the last call: (slot, status).
    fn reap(&mut self, out: &mut Vec<(u16, u8)>) {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
        fence(Ordering::Acquire);
        while self.used_seen != idx {
            let e = GuestAddress(USED + 4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = self.mem.read_obj(e).unwrap_or(0);
            let s = (id / 3) as u16;
            let st: u8 = self
                .mem
                .read_obj(GuestAddress(HDRS + 32 * u64::from(s) + 16))
                .unwrap_or(0xff);
            out.push((s, st));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        if !out.is_empty() {
            self.set_used_event();
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args().map_err(|e| format!("vhost-user-blk-bench: {e}"))?;
    let mut d = Driver::connect(&a.socket)?;
    let span = (a.size_mib << 20) / BS;
    if span == 0 || span > d.blocks {
        return Err(format!("--size {} MiB exceeds the device", a.size_mib).into());
    }
    let write = a.pattern == "randwrite";
    let qd = a.qd;
    let mut done = Vec::with_capacity(usize::from(QSIZE));
    if a.prefill {
        // Sequential 4 KiB writes over the span, QD qd.
        let mut next = 0u64;
        let mut inflight = 0u16;
        let mut free: Vec<u16> = (0..qd).collect();
        while next < span || inflight > 0 {
            let mut n = 0;
            while next < span {
                let Some(s) = free.pop() else { break };
                d.prepare(s, true, next);
                next += 1;
                n += 1;
            }
            if n > 0 {
                inflight += n;
                d.publish();
            }
            done.clear();
            d.reap(&mut done);
            inflight -= done.len() as u16;
            free.extend(done.iter().map(|x| x.0));
        }
    }
    let mut start = vec![Instant::now(); usize::from(qd)];
    let mut rng = fastrand::Rng::new();
    for s in 0..qd {
        d.prepare(s, write, rng.u64(..span));
        start[usize::from(s)] = Instant::now();
    }
    d.publish();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.time);
    let (mut ios, mut errors, mut lat_ns) = (0u64, 0u64, 0u128);
    loop {
        done.clear();
        d.reap(&mut done);
        if done.is_empty() {
            if Instant::now() >= end {
                break;
            }
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        let stop = now >= end;
        let mut n = 0;
        for &(s, st) in &done {
            ios += 1;
            errors += u64::from(st != 0);
            lat_ns += now.duration_since(start[usize::from(s)]).as_nanos();
            if !stop {
                d.prepare(s, write, rng.u64(..span));
                start[usize::from(s)] = Instant::now();
                n += 1;
            }
        }
        if n > 0 {
            d.publish();
        }
        if stop {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"pattern\":\"{}\",\"qd\":{},\"iops\":{:.0},\"lat_us_mean\":{:.2},\"ios\":{},\"errors\":{}}}",
        a.pattern,
        qd,
        ios as f64 / secs,
        if ios > 0 { lat_ns as f64 / ios as f64 / 1000.0 } else { 0.0 },
        ios,
        errors
    );
    Ok(())
}
