//! A reactor's free lists of data buffers, so the I/O path does not
//! allocate in steady state, and the reactor's transfer budget: the data
//! bytes its I/O connections hold for transfers the host has not finished
//! (writes waiting for H2CData, reads waiting to be sent).

use unvme_bdev::IoBuf;

/// Per-reactor free lists of data buffers by power-of-two size class
/// (4 KiB … 16 MiB), bounded in total bytes kept.
pub(crate) struct BufPool {
    classes: Vec<Vec<IoBuf>>,
    kept: usize,
    limit: usize,
    /// Transfer bytes the reactor's I/O connections hold.
    pub xfer_used: usize,
    /// The most they may hold.
    pub xfer_limit: usize,
}

impl BufPool {
    /// An empty pool that keeps at most `limit` bytes of free buffers,
    /// with a transfer budget of `xfer_limit` bytes.
    pub fn new(limit: usize, xfer_limit: usize) -> Self {
        BufPool {
            classes: (0..13).map(|_| Vec::new()).collect(),
            kept: 0,
            limit,
            xfer_used: 0,
            xfer_limit,
        }
    }

    fn class(len: usize) -> usize {
        let pages = len.max(1).div_ceil(4096).next_power_of_two();
        pages.trailing_zeros() as usize
    }

    /// A buffer of exactly `len` bytes (capacity rounded up to its class).
    pub fn get(&mut self, len: usize) -> IoBuf {
        let c = Self::class(len);
        let mut b = match self.classes.get_mut(c).and_then(|v| v.pop()) {
            Some(b) => {
                self.kept -= b.capacity();
                b
            }
            None => IoBuf::new(4096usize << c.min(12)),
        };
        if b.capacity() < len {
            b = IoBuf::new(len);
        }
        b.set_len(len);
        b
    }

    /// Returns a buffer for reuse (dropped if the pool is full; a buffer
    /// borrowed from a device's memory goes back to its owner).
    pub fn put(&mut self, b: IoBuf) {
        if b.owner().is_some() {
            return;
        }
        let cap = b.capacity();
        let c = Self::class(cap);
        if self.kept + cap > self.limit || c >= self.classes.len() || (4096usize << c) != cap {
            return;
        }
        self.kept += cap;
        self.classes[c].push(b);
    }
}
