//! Fuzzes the target's controller model (Fabrics, admin, NVM I/O
//! validation) with arbitrary commands on a fresh, an admin and an I/O
//! queue. The controller must never panic, answer data only into a buffer,
//! hand the backend only in-range operations of the right length, and hold
//! no more AERs than it advertises; ANA state changes in between (a `queue`
//! of 128 or more) complete only held AERs, with ANA change notices (see
//! `unvme_target::fuzzing`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use unvme_target::fuzzing::{controller_sequence, FuzzCommand};

#[derive(Arbitrary, Debug)]
struct Cmd {
    queue: u8,
    sqe: [u8; 64],
    data_len: u16,
    fill: u8,
}

fuzz_target!(|cmds: Vec<Cmd>| {
    let cmds: Vec<FuzzCommand> = cmds
        .into_iter()
        .take(64)
        .map(|c| FuzzCommand {
            queue: c.queue,
            sqe: c.sqe,
            data: vec![c.fill; usize::from(c.data_len % 8193)],
        })
        .collect();
    let _events = controller_sequence(&cmds);
});
