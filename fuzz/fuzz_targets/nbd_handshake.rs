//! The NBD fixed-newstyle negotiation fed a client's bytes: every option,
//! malformed lengths, oversized data to skip, GO with a failing open.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    unvme_nbd::fuzz::handshake(data);
});
