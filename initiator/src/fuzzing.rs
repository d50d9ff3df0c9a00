//! Test seam for fuzzing (feature `fuzzing`): runs a real [`QueuePair`]
//! (its receive path: the PDU decoder, C2HData, R2T, CapsuleResp and
//! C2HTermReq handling, and the send queue the R2Ts fill) over a Unix
//! socketpair, with the controller's side played by arbitrary bytes after a
//! valid ICResp.
//!
//! Not an API: nothing here is meant for use outside `fuzz/`. The checks
//! that matter are assertions in the queue pair itself (a command completes
//! successfully only when all of its data moved) and the ones below (every
//! command is handed back exactly once, with its buffer).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use unvme_bdev::IoBuf;
use unvme_proto::nvme::{io_opc, Sqe};
use unvme_proto::pdu::{encode_header, Framing, IcResp, Pdu, DGST_DATA, DGST_HDR, MAX_HEADER};

use crate::qpair::{initialize_connection, DataDir, QueuePair};
use crate::ConnectOptions;

/// Commands the fuzzed queue pair has outstanding while the input arrives:
/// (opcode, direction, length, data segments).
const COMMANDS: [(u8, DataDir, u32, usize); 5] = [
    (io_opc::READ, DataDir::ControllerToHost, 65536, 1),
    (io_opc::WRITE, DataDir::HostToController, 65536, 1),
    (io_opc::WRITE, DataDir::HostToController, 1024, 1),
    (io_opc::FLUSH, DataDir::None, 0, 1),
    (io_opc::READ, DataDir::ControllerToHost, 8192, 2),
];

/// Length of the piece a prefix byte `l` announces: 1..=128 bytes, or
/// 1..=128 KiB in steps of 1 KiB for `l` of 128 and up (so whole C2HData
/// PDUs of a 64 KiB read fit in a few pieces).
fn piece_len(l: u8) -> usize {
    if l < 128 {
        usize::from(l) + 1
    } else {
        usize::from(l - 127) * 1024
    }
}

/// Feeds `input` to a queue pair as the controller's bytes and returns how
/// many of its commands completed successfully. The first byte picks the
/// digests (bits 0 and 1) and MAXH2CDATA (bit 2: 4096, else 131072); the
/// rest follows a valid ICResp as pieces, each a length byte (see
/// [`piece_len`]) and that many bytes, written one at a time with the queue
/// pair polled in between. Panics if the queue pair breaks an invariant.
pub fn run_rx(input: &[u8]) -> usize {
    let Some((&mode, mut rest)) = input.split_first() else {
        return 0;
    };
    let (host, mut ctrl) = UnixStream::pair().expect("socketpair");
    let mut host = TcpStream::from(OwnedFd::from(host));
    let dgst = mode & (DGST_HDR | DGST_DATA);
    let maxh2cdata = if mode & 4 != 0 { 4096 } else { 131072 };
    let opts = ConnectOptions {
        hdr_digest: dgst & DGST_HDR != 0,
        data_digest: dgst & DGST_DATA != 0,
        connect_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    let resp = Pdu::IcResp(IcResp {
        pfv: 0,
        cpda: 0,
        dgst,
        maxh2cdata,
    });
    let mut h = [0u8; MAX_HEADER];
    let n = encode_header(&resp, &Framing::default(), &mut h);
    ctrl.write_all(&h[..n])
        .expect("ICResp fits the socket buffer");
    let (neg, dec) = initialize_connection(&mut host, &opts).expect("valid ICResp");
    let mut qp = QueuePair::new(host, neg, dec, 1, 8, 4096, Duration::from_secs(3600));
    for (tag, &(opc, dir, len, segs)) in COMMANDS.iter().enumerate() {
        let slot = qp.alloc_slot().expect("8 entries, 5 commands");
        let sqe = Sqe {
            opc,
            nsid: 1,
            ..Sqe::default()
        };
        let seg = len as usize / segs;
        let mut buf = IoBuf::new(seg);
        buf.fill(0xee);
        if segs > 1 {
            qp.set_more(slot, (1..segs).map(|_| IoBuf::new(seg)).collect());
        }
        let buf = (dir != DataDir::None).then_some(buf);
        qp.start(slot, sqe, buf, false, dir, len, tag as u64, false);
    }
    ctrl.set_nonblocking(true).expect("non-blocking socketpair");
    let mut sink = vec![0u8; 1 << 16];
    let mut done = Vec::new();
    let mut step = |qp: &mut QueuePair, ctrl: &mut UnixStream| {
        qp.progress();
        qp.drain(|c| done.push(c));
        // Take what the host sends (H2CData, TermReq) so it never blocks.
        while ctrl.read(&mut sink).is_ok_and(|n| n > 0) {}
    };
    step(&mut qp, &mut ctrl);
    while let Some((&l, r)) = rest.split_first() {
        let (mut piece, r) = r.split_at(piece_len(l).min(r.len()));
        rest = r;
        while !piece.is_empty() && !qp.is_closed() {
            match ctrl.write(piece) {
                Ok(n) => piece = &piece[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            step(&mut qp, &mut ctrl);
        }
        if qp.is_closed() {
            break;
        }
    }
    drop(ctrl);
    // The end of the stream; the queue pair reads what is left, then EOF.
    let (_, mut spare) = UnixStream::pair().expect("socketpair");
    for _ in 0..64 {
        if qp.is_closed() {
            break;
        }
        step(&mut qp, &mut spare);
    }
    assert!(qp.is_closed(), "the controller's end is closed");
    assert_eq!(qp.outstanding(), 0, "everything handed back");
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..COMMANDS.len() as u64).collect::<Vec<_>>(),
        "each command completes exactly once"
    );
    for c in &done {
        let (_, dir, _, _) = COMMANDS[c.tag as usize];
        assert_eq!(c.buf.is_some(), dir != DataDir::None, "buffers come back");
    }
    done.iter().filter(|c| c.result.is_ok()).count()
}

/// An input for [`run_rx`] (no digests, MAXH2CDATA 128 KiB) in which the
/// controller answers every command honestly: the reads' data in C2HData
/// PDUs (one with SUCCESS, one followed by a CapsuleResp), an R2T for the
/// large write and, once its data is sent, CapsuleResps. A seed for the
/// fuzzer.
pub fn honest_input() -> Vec<u8> {
    use unvme_proto::nvme::Cqe;
    use unvme_proto::pdu::{CapsuleResp, DataPdu, R2t};
    let f = Framing::default();
    let mut out = vec![0u8];
    let mut piece = |bytes: &[u8]| {
        // Whole pieces of 1 KiB, then the remainder in small ones.
        let mut b = bytes;
        while !b.is_empty() {
            let (l, n) = if b.len() >= 1024 {
                let k = (b.len() / 1024).min(128);
                (127 + k as u8, k * 1024)
            } else {
                let n = b.len().min(128);
                (n as u8 - 1, n)
            };
            out.push(l);
            out.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
    };
    let mut h = [0u8; MAX_HEADER];
    let mut pdu = |p: Pdu, data: &[u8]| {
        let n = encode_header(&p, &f, &mut h);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(data);
        v
    };
    let cqe = |cid: u16| {
        Pdu::CapsuleResp(CapsuleResp {
            cqe: Cqe {
                sqid: 1,
                cid,
                ..Cqe::default()
            },
        })
    };
    let c2h = |cccid, datao, datal, success| {
        Pdu::C2hData(DataPdu {
            cccid,
            ttag: 0,
            datao,
            datal,
            last: success,
            success,
        })
    };
    // Slots are handed out from 0 up: the commands have CIDs 0..5.
    piece(&pdu(c2h(0, 0, 32768, false), &[1; 32768]));
    piece(&pdu(c2h(0, 32768, 32768, true), &[2; 32768]));
    piece(&pdu(
        Pdu::R2t(R2t {
            cccid: 1,
            ttag: 1,
            r2to: 0,
            r2tl: 65536,
        }),
        &[],
    ));
    for cid in [1, 2, 3] {
        piece(&pdu(cqe(cid), &[]));
    }
    piece(&pdu(c2h(4, 0, 8192, true), &[3; 8192]));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_honest_controller_completes_every_command() {
        assert_eq!(super::run_rx(&super::honest_input()), 5);
    }

    #[test]
    fn garbage_or_silence_fails_every_command() {
        assert_eq!(super::run_rx(&[0]), 0);
        assert_eq!(
            super::run_rx(&[3, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            0
        );
    }

    #[test]
    fn a_short_success_read_is_not_a_success() {
        let mut input = super::honest_input();
        // Flag the first of the read's two C2HData PDUs LAST_PDU|SUCCESS:
        // it claims the whole read after half of it.
        assert_eq!(input[2], 0x07, "C2HData type");
        input[3] |= 0x0c; // LAST_PDU | SUCCESS
        assert_eq!(super::run_rx(&input), 0);
    }
}
