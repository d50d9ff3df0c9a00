//! The floor of a plain TCP request/response over loopback.
//!
//! A client keeps `depth` requests of `req` bytes in flight on one
//! connection; the server answers each with `resp` bytes. Both ends either
//! busy-poll non-blocking sockets ([`Mode::Spin`], the floor unvme has to
//! beat) or sleep in blocking calls ([`Mode::Block`]). The time an NVMe/TCP
//! command takes over and above this exchange is what our stack costs.
//!
//! This is not a protocol anyone else speaks. Every message starts with a
//! [`Header`] (length and sequence number) so that the client can check the
//! size and order of every response; the rest of a message is zeros. The
//! sizes are agreed in a 16-byte handshake when the client connects.
//!
//! Sends are batched: whatever messages are ready go out in one `write`.

#![deny(missing_docs)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Bytes of the [`Header`] that starts every request and response.
pub const HDR_LEN: usize = 8;
/// Largest request or response the server accepts in the handshake.
pub const MAX_MSG: usize = 16 << 20;
/// Magic that opens the client's handshake.
const HELLO: [u8; 8] = *b"TCPFLOOR";
/// The server's answer to an accepted handshake.
const ACK: [u8; 8] = *b"FLOOROK\0";
/// Bytes asked of the kernel per `read`.
const RBUF_LEN: usize = 256 << 10;
/// Upper bound on the bytes of responses the server batches into one write.
const SERVER_BATCH_BYTES: usize = 256 << 10;
/// A connection that makes no progress for this long is given up.
const STALL: Duration = Duration::from_secs(10);

/// Errors of the TCP floor benchmark.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// The call that failed.
        what: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The peer did not open with the expected handshake.
    #[error("bad handshake from peer")]
    BadHandshake,
    /// The sizes asked for are out of range.
    #[error("message sizes out of range: req {req}, resp {resp} (each {HDR_LEN}..={MAX_MSG})")]
    BadSize {
        /// Request bytes asked for.
        req: usize,
        /// Response bytes asked for.
        resp: usize,
    },
    /// A message carried another length than agreed.
    #[error("message of {got} bytes, expected {expected}")]
    WrongLength {
        /// The agreed length.
        expected: usize,
        /// The length in the header.
        got: usize,
    },
    /// A message arrived out of order.
    #[error("message with sequence {got}, expected {expected}")]
    OutOfOrder {
        /// The next sequence number due.
        expected: u32,
        /// The sequence number in the header.
        got: u32,
    },
    /// The peer closed the connection with messages outstanding.
    #[error("peer closed the connection with {0} messages outstanding")]
    PeerClosed(u64),
    /// No progress for [`STALL`].
    #[error("no progress for {STALL:?} with {0} messages outstanding")]
    Stalled(u64),
    /// `depth` must be at least one.
    #[error("depth must be at least 1")]
    ZeroDepth,
    /// The thread could not be pinned.
    #[error("cannot pin to CPU {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// The error from `sched_setaffinity`.
        #[source]
        source: io::Error,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// How both ends wait for the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Non-blocking sockets; read and write until `WouldBlock`, and loop.
    Spin,
    /// Blocking sockets; the thread sleeps until data arrives. Each side
    /// writes all it has before reading, so `depth * (req + resp)` must fit
    /// in the socket buffers (it does by far for the sizes bench/core uses).
    Block,
}

impl Mode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Spin => "spin",
            Mode::Block => "block",
        }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(Error::Pin {
            cpu,
            source: io::Error::from(ErrorKind::InvalidInput),
        });
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` was checked above, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a live cpu_set_t and the size passed is its size, so the kernel reads only within it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::Pin {
            cpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The start of every request and response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the whole message, header included.
    pub len: u32,
    /// Sequence number; responses echo their request's.
    pub seq: u32,
}

impl Header {
    fn encode(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..HDR_LEN].copy_from_slice(&self.seq.to_le_bytes());
    }

    fn decode(b: &[u8; HDR_LEN]) -> Self {
        Header {
            len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            seq: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// Cuts a byte stream into messages of a fixed length and hands on their
/// headers; the bytes after the header are skipped, not copied.
struct Framer {
    msg_len: usize,
    pos: usize,
    hdr: [u8; HDR_LEN],
}

impl Framer {
    fn new(msg_len: usize) -> Self {
        Framer {
            msg_len,
            pos: 0,
            hdr: [0; HDR_LEN],
        }
    }

    /// Consumes `data`, calling `f` with the header of each message it completes.
    fn feed(&mut self, mut data: &[u8], mut f: impl FnMut(Header) -> Result<()>) -> Result<()> {
        while !data.is_empty() {
            let n = if self.pos < HDR_LEN {
                let n = (HDR_LEN - self.pos).min(data.len());
                self.hdr[self.pos..self.pos + n].copy_from_slice(&data[..n]);
                n
            } else {
                (self.msg_len - self.pos).min(data.len())
            };
            self.pos += n;
            data = &data[n..];
            if self.pos == self.msg_len {
                self.pos = 0;
                f(Header::decode(&self.hdr))?;
            }
        }
        Ok(())
    }
}

/// Messages waiting to be written, laid out back to back so that one `write`
/// sends all of them.
struct TxBuf {
    buf: Vec<u8>,
    msg_len: usize,
    fill: usize,
    sent: usize,
}

impl TxBuf {
    fn new(msg_len: usize, msgs: usize) -> Self {
        TxBuf {
            buf: vec![0; msg_len * msgs],
            msg_len,
            fill: 0,
            sent: 0,
        }
    }

    /// Appends a message with `seq`, or returns false if there is no room.
    fn push(&mut self, seq: u32) -> bool {
        if self.fill + self.msg_len > self.buf.len() {
            if self.sent == 0 {
                return false;
            }
            // Move the unsent tail to the front; only happens after a short write.
            self.buf.copy_within(self.sent..self.fill, 0);
            self.fill -= self.sent;
            self.sent = 0;
            if self.fill + self.msg_len > self.buf.len() {
                return false;
            }
        }
        let len = u32::try_from(self.msg_len).expect("message length checked against MAX_MSG");
        Header { len, seq }.encode(&mut self.buf[self.fill..]);
        self.fill += self.msg_len;
        true
    }

    fn is_empty(&self) -> bool {
        self.sent == self.fill
    }

    /// Writes what is pending. Returns false if the socket would block.
    fn flush_once(&mut self, s: &mut TcpStream) -> Result<bool> {
        loop {
            match s.write(&self.buf[self.sent..self.fill]) {
                Ok(n) => {
                    self.sent += n;
                    if self.sent == self.fill {
                        self.sent = 0;
                        self.fill = 0;
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("write")(e)),
            }
        }
    }
}

/// Reads once. `Ok(None)` means the socket would block, `Ok(Some(0))` end of stream.
fn read_once(s: &mut TcpStream, buf: &mut [u8]) -> Result<Option<usize>> {
    loop {
        match s.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read")(e)),
        }
    }
}

fn check_sizes(req: usize, resp: usize) -> Result<()> {
    let ok = |n: usize| (HDR_LEN..=MAX_MSG).contains(&n);
    if ok(req) && ok(resp) {
        Ok(())
    } else {
        Err(Error::BadSize { req, resp })
    }
}

/// Serves connections on `listener` one after another, each until the client
/// closes it; returns after `max_conns` connections, or never if `None`.
/// A connection that fails is reported on stderr and the next one accepted.
pub fn serve(listener: &TcpListener, mode: Mode, max_conns: Option<u64>) -> Result<()> {
    let mut served = 0;
    loop {
        if let Some(max) = max_conns {
            if served >= max {
                return Ok(());
            }
        }
        let (stream, peer) = listener.accept().map_err(io_err("accept"))?;
        served += 1;
        match serve_conn(stream, mode) {
            Ok(ops) => eprintln!("tcp-floor server: {peer}: {ops} requests answered"),
            Err(e) => eprintln!("tcp-floor server: {peer}: {e}"),
        }
    }
}

/// Answers the requests on one connection until the client closes it;
/// returns the number answered.
pub fn serve_conn(mut s: TcpStream, mode: Mode) -> Result<u64> {
    s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    s.set_read_timeout(Some(STALL))
        .map_err(io_err("SO_RCVTIMEO"))?;
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello).map_err(io_err("handshake"))?;
    if hello[..8] != HELLO {
        return Err(Error::BadHandshake);
    }
    let req = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
    let resp = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
    check_sizes(req, resp)?;
    s.write_all(&ACK).map_err(io_err("handshake"))?;
    // Blocking mode must not time out while a client is idle between
    // requests; spinning mode watches for stalls itself.
    s.set_read_timeout(None).map_err(io_err("SO_RCVTIMEO"))?;
    if mode == Mode::Spin {
        s.set_nonblocking(true).map_err(io_err("O_NONBLOCK"))?;
    }

    let mut rx = Framer::new(req);
    let mut rbuf = vec![0u8; RBUF_LEN];
    let mut tx = TxBuf::new(resp, (SERVER_BATCH_BYTES / resp).clamp(1, 256));
    let mut next_req: u32 = 0;
    let mut next_resp: u32 = 0;
    let mut owed: u64 = 0;
    let mut answered: u64 = 0;
    let mut last_progress = Instant::now();
    let mut idle_spins: u32 = 0;

    loop {
        // Take in everything that has arrived.
        let mut progress = false;
        while let Some(n) = read_once(&mut s, &mut rbuf)? {
            if n == 0 {
                return if owed == 0 && tx.is_empty() {
                    Ok(answered)
                } else {
                    Err(Error::PeerClosed(owed))
                };
            }
            progress = true;
            rx.feed(&rbuf[..n], |h| {
                if h.len as usize != req {
                    return Err(Error::WrongLength {
                        expected: req,
                        got: h.len as usize,
                    });
                }
                if h.seq != next_req {
                    return Err(Error::OutOfOrder {
                        expected: next_req,
                        got: h.seq,
                    });
                }
                next_req = next_req.wrapping_add(1);
                owed += 1;
                Ok(())
            })?;
            if mode == Mode::Block {
                break;
            }
        }
        // Answer everything owed, as few writes as the batch buffer allows.
        loop {
            while owed > 0 && tx.push(next_resp) {
                next_resp = next_resp.wrapping_add(1);
                owed -= 1;
                answered += 1;
            }
            if tx.is_empty() || !tx.flush_once(&mut s)? {
                break;
            }
            progress = true;
        }
        if mode == Mode::Spin {
            if progress {
                last_progress = Instant::now();
                idle_spins = 0;
            } else if owed > 0 || !tx.is_empty() {
                // Only a stuck client can stall us; check the clock now and then.
                idle_spins = idle_spins.wrapping_add(1);
                if idle_spins & 0xfff == 0 && last_progress.elapsed() > STALL {
                    return Err(Error::Stalled(owed));
                }
            }
            std::hint::spin_loop();
        }
    }
}

/// What the client is asked to do.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Bytes per request.
    pub req: usize,
    /// Bytes per response.
    pub resp: usize,
    /// Requests kept in flight.
    pub depth: usize,
    /// How long to keep issuing requests.
    pub time: Duration,
    /// Spinning or blocking sockets.
    pub mode: Mode,
}

/// What the client measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Requests completed within the measured time.
    pub completed: u64,
    /// Requests completed in all, draining included; every response checked.
    pub verified: u64,
    /// Completed requests per second.
    pub ops: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

impl Report {
    /// The one-line JSON object the script reads.
    pub fn to_json(&self, cfg: &ClientConfig) -> serde_json::Value {
        serde_json::json!({
            "ops": self.ops,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "req": cfg.req,
            "resp": cfg.resp,
            "depth": cfg.depth,
            "mode": cfg.mode.name(),
        })
    }
}

/// Connects, keeps `depth` requests in flight for `time`, waits for the
/// ones still outstanding, and checks the length and order of every
/// response.
pub fn run_client(cfg: &ClientConfig) -> Result<Report> {
    check_sizes(cfg.req, cfg.resp)?;
    if cfg.depth == 0 {
        return Err(Error::ZeroDepth);
    }
    let mut s = TcpStream::connect(cfg.addr).map_err(io_err("connect"))?;
    s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    s.set_read_timeout(Some(STALL))
        .map_err(io_err("SO_RCVTIMEO"))?;
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&HELLO);
    hello[8..12].copy_from_slice(&(cfg.req as u32).to_le_bytes());
    hello[12..].copy_from_slice(&(cfg.resp as u32).to_le_bytes());
    s.write_all(&hello).map_err(io_err("handshake"))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).map_err(io_err("handshake"))?;
    if ack != ACK {
        return Err(Error::BadHandshake);
    }
    if cfg.mode == Mode::Spin {
        s.set_nonblocking(true).map_err(io_err("O_NONBLOCK"))?;
    }

    let depth = cfg.depth;
    let mut tx = TxBuf::new(cfg.req, depth);
    let mut rx = Framer::new(cfg.resp);
    let mut rbuf = vec![0u8; RBUF_LEN];
    // Issue time of each request in flight, by sequence number modulo depth.
    let mut issued_at = vec![Instant::now(); depth];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .expect("constant histogram bounds are valid");
    let mut lat_sum_ns: u128 = 0;
    let mut next_seq: u32 = 0;
    let mut expect_seq: u32 = 0;
    let mut inflight: u64 = 0;
    let mut completed: u64 = 0;
    let mut verified: u64 = 0;

    let start = Instant::now();
    let deadline = start + cfg.time;
    let mut elapsed = None;
    let mut last_progress = start;

    loop {
        let now = Instant::now();
        if elapsed.is_none() && now >= deadline {
            elapsed = Some(now - start);
        }
        let issuing = elapsed.is_none();
        if !issuing && inflight == 0 && tx.is_empty() {
            break;
        }
        if now - last_progress > STALL {
            return Err(Error::Stalled(inflight));
        }
        let mut progress = false;

        // Top up the pipeline and send the new requests in one write.
        if issuing {
            while inflight < depth as u64 && tx.push(next_seq) {
                issued_at[next_seq as usize % depth] = now;
                next_seq = next_seq.wrapping_add(1);
                inflight += 1;
            }
        }
        while !tx.is_empty() && tx.flush_once(&mut s)? {
            progress = true;
        }

        // Take in every response that has arrived.
        while inflight > 0 {
            let Some(n) = read_once(&mut s, &mut rbuf)? else {
                break;
            };
            if n == 0 {
                return Err(Error::PeerClosed(inflight));
            }
            progress = true;
            let at = Instant::now();
            rx.feed(&rbuf[..n], |h| {
                if h.len as usize != cfg.resp {
                    return Err(Error::WrongLength {
                        expected: cfg.resp,
                        got: h.len as usize,
                    });
                }
                if h.seq != expect_seq || inflight == 0 {
                    return Err(Error::OutOfOrder {
                        expected: expect_seq,
                        got: h.seq,
                    });
                }
                let ns = (at - issued_at[h.seq as usize % depth]).as_nanos();
                expect_seq = expect_seq.wrapping_add(1);
                inflight -= 1;
                verified += 1;
                if issuing {
                    completed += 1;
                    lat_sum_ns += ns;
                    hist.saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
                }
                Ok(())
            })?;
            if cfg.mode == Mode::Block {
                break;
            }
        }
        if progress {
            last_progress = Instant::now();
        } else {
            std::hint::spin_loop();
        }
    }

    let secs = elapsed
        .expect("loop ends only after the deadline")
        .as_secs_f64();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Report {
        completed,
        verified,
        ops: completed as f64 / secs,
        mean_us: if completed == 0 {
            0.0
        } else {
            lat_sum_ns as f64 / completed as f64 / 1000.0
        },
        p50_us: us(hist.value_at_quantile(0.5)),
        p99_us: us(hist.value_at_quantile(0.99)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_reassembles_messages_split_anywhere() {
        let msg_len = 20;
        let mut stream = Vec::new();
        for seq in 0..5u32 {
            let mut m = vec![0u8; msg_len];
            Header {
                len: msg_len as u32,
                seq,
            }
            .encode(&mut m);
            stream.extend_from_slice(&m);
        }
        for chunk in 1..=stream.len() {
            let mut f = Framer::new(msg_len);
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                f.feed(piece, |h| {
                    assert_eq!(h.len as usize, msg_len);
                    seen.push(h.seq);
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(seen, vec![0, 1, 2, 3, 4], "chunk size {chunk}");
        }
    }

    #[test]
    fn framer_handles_header_only_messages() {
        let mut f = Framer::new(HDR_LEN);
        let mut m = [0u8; HDR_LEN];
        Header {
            len: HDR_LEN as u32,
            seq: 7,
        }
        .encode(&mut m);
        let mut n = 0;
        f.feed(&m, |h| {
            assert_eq!(h.seq, 7);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn txbuf_compacts_after_a_short_write() {
        let mut tx = TxBuf::new(10, 2);
        assert!(tx.push(0));
        assert!(tx.push(1));
        assert!(!tx.push(2));
        tx.sent = 15; // as if a write sent one and a half messages
        assert!(tx.push(2));
        assert_eq!(tx.fill, 15);
        assert_eq!(&tx.buf[..4], &[0, 0, 0, 0]); // tail of message 1
        assert_eq!(&tx.buf[5..9], &10u32.to_le_bytes());
        assert_eq!(&tx.buf[9..13], &2u32.to_le_bytes());
    }
}
