//! Entry points for the cargo-fuzz targets (feature `fuzzing`): the real
//! handshake and the real transmission-phase connection, fed bytes a
//! client could send. Not an API: nothing outside `fuzz/` calls these.
//!
//! [`handshake`] runs the negotiation over an in-memory stream (reads come
//! from the input, replies go nowhere). [`transmission`] runs a [`Conn`]
//! over a Unix socket pair against a small RAM disk: the input, after a
//! few bytes choosing the session (structured replies, `base:allocation`,
//! read-only, the buffer budget), is what the client sends; a second
//! thread drains the replies. Both check the invariants they can: the
//! connection ends, and it gives back every byte of the budget.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
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

/// Serves `data` as the client's side of the transmission phase. The first
/// byte chooses the session: bit 0 structured replies, bit 1
/// `base:allocation`, bit 2 read-only, bits 3..=5 the budget (64 KiB <<
/// n), bits 6..=7 the in-flight limit.
pub fn transmission(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
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
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    let stop = AtomicBool::new(false);
    let q = e.bdev.open_queue().expect("a RAM queue");
    std::thread::scope(|sc| {
        let mut reader = client.try_clone().expect("a second client handle");
        sc.spawn(move || {
            let mut b = vec![0u8; 1 << 16];
            while matches!(reader.read(&mut b), Ok(n) if n > 0) {}
        });
        sc.spawn(move || {
            let _ = client.write_all(data);
            let _ = client.shutdown(Shutdown::Write);
        });
        let c = Conn::new(server, q, info, view, limits, &stop, &budget).expect("a connection");
        c.run();
    });
    assert_eq!(
        budget.used(),
        0,
        "the connection gave back its whole budget"
    );
}
