//! Hostile frontends against the real device over a real vhost-user
//! socket: each test plays a frontend that breaks the protocol's rules (or
//! a local peer that abuses the socket) and checks the device refuses it,
//! stays alive and goes on serving an honest frontend.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use unvme_bdev::{Bdev, RamBdev};
use unvme_vhost_blk::{region_size, req_type, DeviceOptions, SocketOptions, Status};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// More descriptors than the device accepts in one chain (1024).
const TOO_MANY: usize = 1100;

#[test]
fn chain_longer_than_the_descriptor_limit_gets_ioerr_in_its_status_byte() {
    let (server, sock) = start("longchain", 1, 4096);
    let mut g = Guest::connect(&sock, 1);
    for type_ in [req_type::OUT, req_type::IN] {
        let write = type_ == req_type::IN;
        let h = g.put(&hdr(type_, 0));
        let d = g.put(&[0x5a; 512]);
        let s = g.buf(1);
        g.mem.write_obj(0xffu8, s).expect("status");
        let mut segs = vec![(h, 16, false)];
        segs.extend(std::iter::repeat_n((d, 512, write), TOO_MANY));
        segs.push((s, 1, true));
        g.post_indirect(0, &segs);
        g.kick(0);
        let used = g.wait_used(0);
        let (_, len) = *used.last().expect("used");
        let status: u8 = g.mem.read_obj(s).expect("status");
        assert_eq!(status, Status::IoErr as u8, "type {type_}");
        assert_eq!(len, 1, "type {type_}: only the status byte written");
        // Nothing was written into the data buffers.
        let mut got = [0u8; 512];
        g.mem.read_slice(&mut got, d).expect("data");
        assert_eq!(got, [0x5a; 512], "type {type_}");
    }
    // The device goes on serving well-formed requests.
    let h = g.put(&hdr(req_type::OUT, 0));
    let d = g.put(&[7u8; 512]);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 512, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    drop(g);
    server.shutdown().expect("shutdown");
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> File {
    // SAFETY: a constant NUL-terminated name; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"unvme-vb-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

/// One honest request on a fresh frontend: the device still serves.
fn honest_request(sock: &PathBuf) {
    let mut g = Guest::connect(sock, 1);
    let h = g.put(&hdr(req_type::OUT, 0));
    let d = g.put(&[3u8; 512]);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 512, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
}

#[test]
fn memory_region_larger_than_its_file_is_refused_and_the_device_serves_the_next_frontend() {
    let (server, sock) = start("shortmem", 1, 4096);
    {
        let (mut fe, _conn) = negotiate_conn(&sock, 1);
        // The region is mapped here while the file holds it, then the file
        // shrinks before the device sees it: the device would fault (SIGBUS)
        // on the first access past 1 MiB.
        let file = memfd(MEM as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM,
            Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
        )])
        .expect("map guest memory");
        file.set_len(1 << 20).expect("shrink memfd");
        let region = mem.find_region(GuestAddress(0)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        assert!(
            fe.set_mem_table(&[info]).is_err(),
            "region past EOF accepted"
        );
        // An inflight region in a file too small for it is refused too.
        let msg = VhostUserInflight {
            mmap_size: region_size(1, QSIZE),
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QSIZE,
        };
        let small = memfd(64);
        assert!(
            fe.set_inflight_fd(&msg, small.as_raw_fd()).is_err(),
            "inflight region past EOF accepted"
        );
    }
    assert!(!server.is_finished(), "the device stopped");
    honest_request(&sock);
    server.shutdown().expect("shutdown");
}

#[test]
fn socket_is_created_owner_only_by_default_and_with_the_mode_and_group_asked_for() {
    let bdev = || -> Arc<dyn Bdev> { Arc::new(RamBdev::new("mode", 64, 512).expect("ram")) };
    let (server, sock) = start_listen("mode", bdev(), DeviceOptions::default(), Default::default());
    let meta = std::fs::metadata(&sock).expect("stat socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    server.shutdown().expect("shutdown");

    // SAFETY: getgid cannot fail.
    let gid = unsafe { libc::getgid() };
    let opts = SocketOptions {
        mode: 0o660,
        group: Some(gid),
        ..SocketOptions::default()
    };
    let (server, sock) = start_listen("mode660", bdev(), DeviceOptions::default(), opts);
    let meta = std::fs::metadata(&sock).expect("stat socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    honest_request(&sock);
    server.shutdown().expect("shutdown");
}

#[test]
fn silent_peer_is_dropped_at_the_first_message_deadline_and_the_frontend_gets_in() {
    let deadline = Duration::from_millis(200);
    let opts = SocketOptions {
        first_message_timeout: deadline,
        ..SocketOptions::default()
    };
    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("silent", 4096, 512).expect("ram"));
    let (server, sock) = start_listen("silent", bdev, DeviceOptions::default(), opts);
    // Connects and says nothing: the device hangs up on it.
    let mut silent = UnixStream::connect(&sock).expect("connect");
    wait_closed(&mut silent);
    // So does one that sends half a message header.
    let mut half = UnixStream::connect(&sock).expect("connect");
    half.write_all(&[1, 0, 0]).expect("partial header");
    wait_closed(&mut half);
    // A real frontend that goes quiet after setting up (as QEMU does until
    // the guest driver starts the device) is not dropped.
    let mut g = Guest::connect(&sock, 1);
    std::thread::sleep(deadline * 3);
    let h = g.put(&hdr(req_type::OUT, 0));
    let d = g.put(&[3u8; 512]);
    let s = g.buf(1);
    assert_eq!(
        g.request(0, &[(h, 16, false), (d, 512, false), (s, 1, true)])
            .0,
        Status::Ok as u8
    );
    g.fe.get_features().expect("the connection is still up");
    drop(g);
    server.shutdown().expect("shutdown");
}

#[test]
fn frontend_that_stalls_in_the_middle_of_a_message_is_dropped_and_the_next_gets_in() {
    let opts = SocketOptions {
        first_message_timeout: Duration::from_millis(200),
        ..SocketOptions::default()
    };
    let bdev: Arc<dyn Bdev> = Arc::new(RamBdev::new("stall", 4096, 512).expect("ram"));
    let (server, sock) = start_listen("stall", bdev, DeviceOptions::default(), opts);
    let mut g = Guest::connect(&sock, 1);
    // Half a message header on the live connection, then nothing.
    g.conn.write_all(&[1, 0, 0, 0, 1]).expect("partial header");
    wait_closed(&mut g.conn);
    drop(g);
    honest_request(&sock);
    server.shutdown().expect("shutdown");
}
