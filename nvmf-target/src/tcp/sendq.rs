//! A connection's send queue: PDU headers (and other small bytes) in one
//! arena, data by reference to the command buffer that holds it, all
//! written with vectored writes, so a turn's responses leave in one
//! `writev` and read data is never copied.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use unvme_proto::pdu::{self, Framing, Pdu, MAX_HEADER};

/// Most segments handed to one `writev`.
const IOV_MAX: usize = 64;

/// An element of the send queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    /// Bytes in the header arena.
    Hdr { start: usize, len: usize },
    /// Bytes of a command slot's data buffer.
    Data { slot: u16, off: usize, len: usize },
    /// The slot may be freed once everything before has been sent.
    Free(u16),
}

/// The bytes waiting to go out on one connection.
pub(crate) struct SendQueue {
    framing: Framing,
    hdr: Vec<u8>,
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    off: usize,
}

impl SendQueue {
    /// An empty queue with room for `slots` commands' worth of segments.
    pub fn new(slots: usize) -> Self {
        SendQueue {
            framing: Framing::default(),
            hdr: Vec::with_capacity(64 * 1024),
            segs: VecDeque::with_capacity(4 * slots),
            off: 0,
        }
    }

    /// The framing (digests, padding) of the PDUs sent from now on.
    pub fn set_framing(&mut self, f: Framing) {
        self.framing = f;
    }

    /// The framing of PDUs sent.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether nothing waits to be sent (or freed).
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes held in the header arena: what the queue has copied (headers,
    /// responses), not the command data it sends by reference. The arena
    /// empties whenever the queue does.
    pub fn queued_bytes(&self) -> usize {
        self.hdr.len()
    }

    /// Queues a PDU header (with its digest when header digests are on).
    pub fn push_pdu(&mut self, p: &Pdu) {
        let mut h = [0u8; MAX_HEADER];
        let n = pdu::encode_header(p, &self.framing, &mut h);
        self.push_bytes(&h[..n]);
    }

    /// Queues bytes, copied into the arena.
    pub fn push_bytes(&mut self, b: &[u8]) {
        let start = self.hdr.len();
        self.hdr.extend_from_slice(b);
        if let Some(Seg::Hdr { start: s, len }) = self.segs.back_mut() {
            if *s + *len == start {
                *len += b.len();
                return;
            }
        }
        self.segs.push_back(Seg::Hdr {
            start,
            len: b.len(),
        });
    }

    /// Queues `len` bytes at `off` of `slot`'s data buffer, by reference.
    pub fn push_data(&mut self, slot: u16, off: usize, len: usize) {
        self.segs.push_back(Seg::Data { slot, off, len });
    }

    /// Marks `slot` free once everything queued before has been written.
    pub fn push_free(&mut self, slot: u16) {
        self.segs.push_back(Seg::Free(slot));
    }

    /// Writes as much as `w` takes, in vectored writes. `data(slot)` is
    /// the slot's data buffer; the slots whose every byte went out are
    /// added to `freed`. Returns Ok(true) when the queue is empty, Ok(false)
    /// when the socket would block.
    pub fn flush<'a, W: Write>(
        &mut self,
        w: &mut W,
        data: impl Fn(u16) -> Option<&'a [u8]>,
        freed: &mut Vec<u16>,
    ) -> io::Result<bool> {
        loop {
            while let Some(Seg::Free(slot)) = self.segs.front() {
                freed.push(*slot);
                self.segs.pop_front();
            }
            if self.segs.is_empty() {
                self.hdr.clear();
                self.off = 0;
                return Ok(true);
            }
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let mut n = 0;
            for seg in self.segs.iter() {
                if n == iov.len() {
                    break;
                }
                let skip = if n == 0 { self.off } else { 0 };
                let bytes: &[u8] = match *seg {
                    Seg::Hdr { start, len } => &self.hdr[start + skip..start + len],
                    Seg::Data { slot, off, len } => match data(slot) {
                        Some(b) => &b[off + skip..off + len],
                        None => &[],
                    },
                    Seg::Free(_) => continue,
                };
                iov[n] = IoSlice::new(bytes);
                n += 1;
            }
            match w.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.advance(written, freed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops `w` written bytes from the front.
    fn advance(&mut self, mut w: usize, freed: &mut Vec<u16>) {
        while w > 0 {
            let Some(seg) = self.segs.front() else {
                break;
            };
            let len = match *seg {
                Seg::Hdr { len, .. } | Seg::Data { len, .. } => len,
                Seg::Free(slot) => {
                    freed.push(slot);
                    self.segs.pop_front();
                    continue;
                }
            };
            let left = len - self.off;
            if w >= left {
                w -= left;
                self.off = 0;
                self.segs.pop_front();
            } else {
                self.off += w;
                w = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `chunk` bytes per write.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.chunk - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.chunk {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_free_a_slot_only_after_its_data() {
        let bufs = [vec![1u8; 100], vec![2u8; 50]];
        let data = |s: u16| Some(&bufs[usize::from(s)][..]);
        let mut q = SendQueue::new(4);
        q.push_bytes(b"head");
        q.push_data(0, 10, 90);
        q.push_bytes(b"tail");
        q.push_free(0);
        q.push_data(1, 0, 50);
        q.push_free(1);
        let mut sock = Trickle {
            out: Vec::new(),
            chunk: 7,
            calls: 0,
        };
        let mut freed = Vec::new();
        let mut sent_before_free0 = None;
        while !q.flush(&mut sock, data, &mut freed).unwrap() {
            if freed.contains(&0) && sent_before_free0.is_none() {
                sent_before_free0 = Some(sock.out.len());
            }
        }
        let mut want = b"head".to_vec();
        want.extend_from_slice(&bufs[0][10..]);
        want.extend_from_slice(b"tail");
        want.extend_from_slice(&bufs[1]);
        assert_eq!(sock.out, want);
        assert_eq!(freed, vec![0, 1]);
        if let Some(n) = sent_before_free0 {
            assert!(n >= 4 + 90 + 4, "slot 0 freed after {n} bytes");
        }
        assert!(q.is_empty());
    }

    #[test]
    fn adjacent_bytes_share_one_segment() {
        let mut q = SendQueue::new(1);
        q.push_bytes(b"ab");
        q.push_bytes(b"cd");
        assert_eq!(q.segs.len(), 1);
        let mut out = Vec::new();
        assert!(q.flush(&mut out, |_| None, &mut Vec::new()).unwrap());
        assert_eq!(out, b"abcd");
    }
}
