//! Hostile frontends against the real device over a real vhost-user
//! socket: each test plays a frontend that breaks the protocol's rules (or
//! a local peer that abuses the socket) and checks the device refuses it,
//! stays alive and goes on serving an honest frontend.

mod common;

use common::*;
use unvme_vhost_blk::{req_type, Status};
use vm_memory::Bytes;

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
