//! Fuzzes the vhost-user-blk device's message handling: a stream of
//! well-framed vhost-user messages (any request code, flags and payload)
//! through the `vhost` crate's backend message loop into this device's
//! request handler, with or without a valid memory table first. The
//! device must never panic or hang, and must shut down cleanly after the
//! stream ends (see `unvme_vhost_blk::fuzzing::run_messages`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use unvme_vhost_blk::fuzzing::run_messages;

#[derive(Arbitrary, Debug)]
struct Msg {
    /// Request code; kept mostly within the defined range (1..=50).
    request: u8,
    need_reply: bool,
    /// Declared payload size: the real one unless `lie` is set.
    lie: Option<u16>,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Case {
    with_memory: bool,
    msgs: Vec<Msg>,
}

fuzz_target!(|c: Case| {
    let mut stream = Vec::new();
    for m in c.msgs.iter().take(64) {
        let request = u32::from(m.request % 52);
        // Version 1; bit 3 is NEED_REPLY.
        let flags = 1u32 | if m.need_reply { 1 << 3 } else { 0 };
        let body = &m.body[..m.body.len().min(512)];
        let size = m.lie.map_or(body.len() as u32, u32::from);
        stream.extend_from_slice(&request.to_le_bytes());
        stream.extend_from_slice(&flags.to_le_bytes());
        stream.extend_from_slice(&size.to_le_bytes());
        stream.extend_from_slice(body);
    }
    run_messages(&stream, c.with_memory);
});
