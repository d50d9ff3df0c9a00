//! Fuzzes the NVMe/TCP streaming PDU decoder in both roles, with arbitrary
//! framing, over arbitrary input split at arbitrary points. It must never
//! panic and never consume more than it was given.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use unvme_proto::pdu::{Event, Framing, Limits, PduDecoder, Role};

#[derive(Arbitrary, Debug)]
struct Input {
    host: bool,
    hdgst: bool,
    ddgst: bool,
    pda: u8,
    chunk: u8,
    data: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let role = if inp.host {
        Role::Host
    } else {
        Role::Controller
    };
    let mut dec = PduDecoder::new(
        role,
        Limits {
            max_incapsule: 8192,
            max_data: 65536,
        },
    );
    let mut framed = false;
    for piece in inp.data.chunks(usize::from(inp.chunk).max(1)) {
        let mut off = 0;
        loop {
            match dec.decode(&piece[off..]) {
                Err(_) => return,
                Ok((n, ev)) => {
                    assert!(off + n <= piece.len());
                    off += n;
                    if let Some(Event::Pdu(_)) = ev {
                        if !framed {
                            framed = true;
                            dec.set_framing(Framing {
                                hdgst: inp.hdgst,
                                ddgst: inp.ddgst,
                                pda: inp.pda % 32,
                            });
                        }
                    }
                    if ev.is_none() && n == 0 {
                        break;
                    }
                }
            }
        }
    }
});
