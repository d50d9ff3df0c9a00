//! One NBD transmission-phase connection (the real `Conn` over a socket
//! pair, a RAM disk behind it) fed a client's request stream: headers,
//! partial and refused payloads, every command, tight budgets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    unvme_nbd::fuzz::transmission(data);
});
