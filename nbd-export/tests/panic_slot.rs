//! A connection thread that panics (here: its device queue panics on a
//! chosen READ) gives its negotiated slot and its buffer budget back: with
//! one slot, the next client is served, and the server's budget returns to
//! zero. Runs the real [`Server`] in-process over TCP.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{negotiate, request};
use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoCompletion, IoOp, IoRequest, RamBdev, SubmitError};
use unvme_nbd::{cmd, rep, Export, Listen, Server, ServerConfig};

/// The LBA whose READ makes the queue panic.
const POISON_LBA: u64 = 77;

/// A RAM disk whose queues panic on a READ of [`POISON_LBA`].
struct Poisoned(RamBdev);

struct PoisonedQueue(Box<dyn BdevQueue>);

impl Bdev for Poisoned {
    fn info(&self) -> &BdevInfo {
        self.0.info()
    }
    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        Ok(Box::new(PoisonedQueue(self.0.open_queue()?)))
    }
}

impl BdevQueue for PoisonedQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if matches!(
            req.op,
            IoOp::Read {
                lba: POISON_LBA,
                ..
            }
        ) {
            panic!("injected fault: READ of the poisoned LBA");
        }
        self.0.submit(req)
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.0.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.0.outstanding()
    }
}

#[test]
fn a_panicking_connection_releases_its_slot() {
    let bdev: Arc<dyn Bdev> = Arc::new(Poisoned(RamBdev::new("ram", 1 << 12, 512).unwrap()));
    let mut cfg = ServerConfig::new(
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
        vec![Export {
            name: "poisoned".into(),
            aliases: vec![],
            description: String::new(),
            bdev,
            read_only: false,
        }],
    );
    cfg.max_connections = 1;
    let srv = Server::start(cfg).unwrap();
    let addr = common::addr(&srv);

    // The only slot: the connection thread panics on the poisoned READ, and
    // its socket closes.
    let mut first = negotiate(addr).expect("first client");
    assert_eq!(
        negotiate(addr).map(drop),
        Err(rep::ERR_SHUTDOWN),
        "one slot, taken"
    );
    first
        .write_all(&request(cmd::READ, 1, POISON_LBA * 512, 4096))
        .unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        first.read(&mut b).unwrap_or(0),
        0,
        "the panicked connection closed"
    );

    // The slot comes back (the panicking thread releases it while
    // unwinding; allow it a moment).
    let until = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match negotiate(addr) {
            Ok(s) => break s,
            Err(e) => {
                assert_eq!(e, rep::ERR_SHUTDOWN);
                assert!(
                    Instant::now() < until,
                    "the panicked connection's slot leaked"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    s.write_all(&request(cmd::READ, 2, 0, 4096)).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[4..8], &[0; 4], "READ served after the panic");
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
    assert_eq!(srv.connections(), 1);
    assert_eq!(
        srv.buffer_bytes(),
        4096,
        "only the live connection's READ buffer is held: the panicked one's came back"
    );
}
