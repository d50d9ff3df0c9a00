//! A minimal NBD client for the in-process tests: NBD_OPT_GO, then
//! requests with simple replies.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use unvme_nbd::{opt, rep, Listen, NbdRequest, OptionHeader, Server};

/// The server's TCP address.
pub fn addr(srv: &Server) -> SocketAddr {
    match srv.local_addrs()[0].clone() {
        Listen::Tcp(a) => a,
        Listen::Unix(_) => unreachable!("the tests listen on TCP"),
    }
}

/// Reads one simple reply: (error, cookie).
pub fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("simple reply");
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

pub fn request(typ: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    NbdRequest {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// Connects and sends NBD_OPT_GO; `Err(reply type)` on an error reply.
pub fn negotiate(addr: SocketAddr) -> Result<TcpStream, u32> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut b = OptionHeader {
        option: opt::GO,
        length: 6,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(&[0u8; 6]);
    s.write_all(&b).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).unwrap();
        if typ == rep::ACK {
            return Ok(s);
        }
        if typ & (1 << 31) != 0 {
            return Err(typ);
        }
    }
}
