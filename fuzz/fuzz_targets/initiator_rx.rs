//! Fuzzes the initiator's receive path: a real queue pair with reads and
//! writes outstanding, over a socketpair, fed arbitrary controller bytes
//! (C2HData, R2T, CapsuleResp, C2HTermReq, garbage) after a valid ICResp
//! (see `unvme_initiator::fuzzing`). It must never panic, never complete a
//! command successfully unless all of its data moved (asserted inside the
//! queue pair), and hand every command back exactly once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    unvme_initiator::fuzzing::run_rx(data);
});
