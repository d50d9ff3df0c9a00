//! Fuzzes a whole target connection: the bytes a host sends, split into
//! arbitrary per-turn chunks, go through the real receive path (`Conn`'s
//! PDU decoding and state machine, in-capsule/R2T/H2C data movement, the
//! transfer budget, backpressure), the controller model and a null
//! backend, after an optional bring-up (ICReq, admin Connect, or an I/O
//! Connect), with a send side that takes only so many bytes a turn. The
//! connection must never panic, must only send well-formed PDUs, and must
//! give all its transfer budget back at close (see
//! `unvme_target::fuzzing::conn_stream`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use unvme_target::fuzzing::{conn_stream, Prelude};

// Input: prelude (byte 0, modulo 4: raw, ICReq, admin, I/O queue), send
// room per turn (bytes 1-2, little endian, plus one), then the host's bytes
// as chunks, one per turn, each a 2-byte little-endian length and that many
// bytes (a short last chunk takes what is left). The explicit framing lets
// a seed be a real session (fuzz/corpus/target_conn holds such seeds).
fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let prelude = match data[0] % 4 {
        0 => Prelude::Raw,
        1 => Prelude::IcReq,
        2 => Prelude::Admin,
        _ => Prelude::Io,
    };
    let wcap = usize::from(u16::from_le_bytes([data[1], data[2]])) + 1;
    let mut rest = &data[3..];
    let mut chunks: Vec<&[u8]> = Vec::new();
    while rest.len() >= 2 && chunks.len() < 256 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        chunks.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    conn_stream(prelude, &chunks, wcap);
});
