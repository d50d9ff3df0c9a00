//! Entry points for the cargo-fuzz targets (feature `fuzzing`): the real
//! handshake and the real transmission-phase connection, fed bytes a
//! client could send. Not an API: nothing outside `fuzz/` calls these.
//!
//! [`handshake`] runs the negotiation over an in-memory stream (reads come
//! from the input, replies go nowhere). [`transmission`] runs a [`Conn`]
//! against a small RAM disk over an in-memory client (no threads): the
//! input, after two bytes choosing the session (structured replies,
//! `base:allocation`, read-only, the buffer budget) and how the bytes
//! arrive, is what the client sends. Both check the invariants they can: the
//! connection ends, and it gives back every byte of the budget.

use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use unvme_bdev::RamBdev;

use crate::conn::{Budget, Conn, Limits};
use crate::handshake;
use crate::proto::ExportView;
use crate::server::Export;

fn export(read_only: bool) -> Export {
    let ram = RamBdev::new("fuzz", 2048, 512).expect("a 1 MiB RAM disk");
    Export {
        name: "fuzz".into(),
        aliases: vec!["alias".into()],
        description: "fuzzing".into(),
        bdev: Arc::new(ram),
        read_only,
    }
}

/// An in-memory peer: reads the client's bytes, swallows the replies.
struct Mem<'a>(&'a [u8]);

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the fixed-newstyle negotiation on `data` (the client's bytes after
/// the greeting). The first byte picks whether opening the export fails.
pub fn handshake(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let metas = [export(false).meta(), export(true).meta()];
    let mut s = Mem(data);
    let r = handshake::negotiate(&mut s, &metas, |x| {
        assert!(
            x < metas.len(),
            "the negotiation picked an export that exists"
        );
        if mode & 1 != 0 {
            Err(crate::Error::Busy(1))
        } else {
            Ok(x)
        }
    });
    if let Ok(Some((sess, x))) = r {
        assert_eq!(sess.export, x);
        assert!(!sess.base_allocation || sess.structured);
    }
}

/// A client as the connection sees it, without threads: reads come from
/// the input in pieces of at most `step` bytes, interleaved with
/// `WouldBlock` when `bumpy`; writes are swallowed, partly or refused now
/// and then (so replies go out in pieces). Its descriptor is `/dev/null`,
/// which poll(2) always finds ready.
struct FuzzStream<'a> {
    input: &'a [u8],
    step: usize,
    bumpy: bool,
    turn: u32,
    null: std::fs::File,
}

impl Read for FuzzStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.turn = self.turn.wrapping_add(1);
        if self.bumpy && self.turn.is_multiple_of(3) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.step).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for FuzzStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.turn = self.turn.wrapping_add(1);
        if self.bumpy && self.turn.is_multiple_of(4) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(buf.len().min(if self.bumpy { 4093 } else { usize::MAX }))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsRawFd for FuzzStream<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.null)
    }
}

impl crate::conn::Stream for FuzzStream<'_> {
    fn set_nonblocking(&self, _on: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves `data` as the client's side of the transmission phase. The first
/// byte chooses the session: bit 0 structured replies, bit 1
/// `base:allocation`, bit 2 read-only, bits 3..=5 the budget (64 KiB <<
/// n), bits 6..=7 the in-flight limit. The second chooses how the input
/// arrives: bit 7 bumpy (`WouldBlock` now and then), the rest the most
/// bytes one read returns.
pub fn transmission(data: &[u8]) {
    let [mode, feed, data @ ..] = data else {
        return;
    };
    let (mode, feed) = (*mode, *feed);
    let e = export(mode & 4 != 0);
    let meta = e.meta();
    let info = e.bdev.info();
    let view = ExportView {
        size: meta.size,
        tflags: meta.tflags,
        sizes: meta.sizes,
        structured: mode & 1 != 0,
        base_allocation: mode & 3 == 3,
        fast_zero: info.write_zeroes,
    };
    let limits = Limits {
        max_inflight: 1 << (mode >> 6),
        max_inflight_bytes: 1 << 20,
        pool_bytes: 256 << 10,
        pool_idle: Duration::from_millis(1),
        send_timeout: Duration::from_secs(5),
        spin: Duration::ZERO,
    };
    let budget = Budget::new((64 << 10) << ((mode >> 3) & 7));
    let s = FuzzStream {
        input: data,
        step: (usize::from(feed & 0x7f) + 1) * 37,
        bumpy: feed & 0x80 != 0,
        turn: 0,
        null: std::fs::File::open("/dev/null").expect("/dev/null"),
    };
    let stop = AtomicBool::new(false);
    let q = e.bdev.open_queue().expect("a RAM queue");
    let c = Conn::new(s, q, info, view, limits, &stop, &budget).expect("a connection");
    c.run();
    assert_eq!(
        budget.used(),
        0,
        "the connection gave back its whole budget"
    );
}
