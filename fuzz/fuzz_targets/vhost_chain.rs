//! Fuzzes the vhost-user-blk device's data path: arbitrary descriptor
//! tables (direct and indirect), available rings and guest bytes through
//! the real chain walker, request parser and queue worker over a RAM disk.
//! The device must never panic, return every chain it takes, agree with
//! virtio-queue on every chain's descriptors, and still serve a good
//! request afterwards (see `unvme_vhost_blk::fuzzing`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use unvme_vhost_blk::fuzzing::{run_chains, FuzzDesc, FuzzRing};

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
struct Case {
    queue_size_log2: u8,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    heads: Vec<u16>,
    avail_extra: u8,
    data: Vec<u8>,
    lend: bool,
}

fn conv(d: &Desc) -> FuzzDesc {
    FuzzDesc {
        addr: d.addr,
        len: d.len,
        flags: d.flags,
        next: d.next,
    }
}

fuzz_target!(|c: Case| {
    run_chains(&FuzzRing {
        queue_size_log2: c.queue_size_log2,
        table: c.table.iter().map(conv).collect(),
        indirect: c.indirect.iter().map(conv).collect(),
        heads: c.heads,
        avail_extra: u16::from(c.avail_extra % 4),
        data: c.data,
        lend: c.lend,
    });
});
