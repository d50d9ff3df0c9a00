//! Parsing one virtio-blk descriptor chain into a block request.
//!
//! VIRTIO 1.x lets a driver lay a request out in any descriptors it likes
//! (2.7.4.2 "Message Framing"): the 16-byte header may be split over several
//! driver-readable descriptors, and the status byte may share the last
//! device-writable descriptor with the data. So the chain is read as two byte
//! streams — the driver-readable bytes (header, then data for writes and
//! discard/write-zeroes segments) followed by the device-writable bytes (data
//! for reads and GET_ID, then the status byte, always the very last byte) —
//! not as "three descriptors".
//!
//! Everything a guest controls is checked here and turned into a virtio-blk
//! status, never a panic: a chain whose status byte cannot be reached is
//! returned with nothing written; any other malformed chain (too short, too
//! long, readable after writable, outside guest memory, misaligned, beyond
//! the disk's end, over the transfer limit) gets `VIRTIO_BLK_S_IOERR`, and an
//! unknown request type `VIRTIO_BLK_S_UNSUPP`.
//!
//! This module is not the data mover: it records where the data lives in
//! guest memory ([`Seg`]s); the queue worker copies between those segments
//! and the request's `IoBuf`.

use unvme_bdev::{IoOp, LbaRange};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::spec::{
    req_type, DiscardWriteZeroes, OutHdr, Status, DWZ_SEG_LEN, ID_BYTES, OUT_HDR_LEN, SECTOR_SIZE,
};

/// Most descriptors one chain may have (direct or indirect); longer chains
/// are answered with IOERR. Linux never exceeds `seg_max + 2`.
pub const MAX_CHAIN_DESCS: usize = 1024;

/// Most segments of one DISCARD request this device accepts.
pub const MAX_DISCARD_SEG: u32 = 32;

/// A request's buffer does not lie (wholly) in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("buffer outside guest memory")]
pub struct BadGuestMemory;

/// One contiguous piece of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One descriptor of a chain, as collected before parsing.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// What the device promises the guest (the configuration space), which the
/// parser enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Logical block size in bytes (a power of two, >= 512).
    pub block_size: u32,
    /// Device size in logical blocks.
    pub num_blocks: u64,
    /// Largest IN/OUT transfer in bytes.
    pub max_request: u32,
    /// `VIRTIO_BLK_F_RO` was offered: writes, discards and write-zeroes fail.
    pub read_only: bool,
    /// `VIRTIO_BLK_F_DISCARD` was offered.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` was offered.
    pub write_zeroes: bool,
    /// WRITE_ZEROES with UNMAP may deallocate.
    pub write_zeroes_may_unmap: bool,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`.
    pub max_discard_seg: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// GET_ID answer (zero padded).
    pub serial: [u8; ID_BYTES],
}

/// Where a parsed request's data and status live; reused between requests
/// so the steady state allocates nothing.
#[derive(Debug, Default)]
pub struct ChainInfo {
    /// Address of the status byte.
    pub status_addr: GuestAddress,
    /// The data segments: device-writable ones for IN, driver-readable ones
    /// (after the header) for OUT. Empty for the other types.
    pub segs: Vec<Seg>,
    /// Sum of `segs` lengths.
    pub data_len: u32,
}

/// The verdict on one chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The status byte is unreachable (no device-writable last byte, or it
    /// lies outside guest memory): return the chain with nothing written.
    NoStatus,
    /// Done without the backend: write `status`, report `used_len` bytes
    /// written (data plus the status byte).
    Complete {
        /// Status to write.
        status: Status,
        /// Bytes written into the chain, status byte included.
        used_len: u32,
    },
    /// Hand `op` to the backend; its data segments are in [`ChainInfo`].
    Submit(IoOp),
}

impl Parsed {
    fn err(status: Status) -> Self {
        Parsed::Complete {
            status,
            used_len: 1,
        }
    }
}

/// Per-queue scratch space for [`Parser::parse`].
#[derive(Debug, Default)]
pub struct Parser {
    descs: Vec<Desc>,
}

impl Parser {
    /// A parser with room for the longest accepted chain.
    pub fn new() -> Self {
        Parser {
            descs: Vec::with_capacity(MAX_CHAIN_DESCS),
        }
    }

    /// Parses one chain. `writeback` is the current cache mode: in
    /// write-through mode writes are issued with FUA.
    pub fn parse<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: impl Iterator<Item = Descriptor>,
        lim: &Limits,
        writeback: bool,
        out: &mut ChainInfo,
    ) -> Parsed {
        out.segs.clear();
        out.data_len = 0;
        self.descs.clear();
        let mut truncated = false;
        let mut last_has_next = false;
        // The last non-empty descriptor of the whole chain, kept past
        // MAX_CHAIN_DESCS: an over-long chain is answered in its own status
        // byte (the walk is bounded by the chain iterator: at most the
        // table size, one indirect table of at most 2^16 - 1 entries).
        let mut tail: Option<Desc> = None;
        for d in chain {
            last_has_next = d.has_next();
            let desc = Desc {
                addr: d.addr(),
                len: d.len(),
                write: d.is_write_only(),
            };
            if desc.len > 0 {
                tail = Some(desc);
            }
            if self.descs.len() == MAX_CHAIN_DESCS {
                truncated = true;
                continue;
            }
            self.descs.push(desc);
        }
        // A chain cut short by virtio-queue (loop, bad next index, bad
        // indirect table, over 4 GiB) ends on a descriptor that still says
        // "next".
        truncated |= last_has_next;

        // The status byte is the last byte of the last non-empty descriptor.
        let Some(ld) = tail else {
            return Parsed::NoStatus;
        };
        if !ld.write {
            return Parsed::NoStatus;
        }
        let Some(status_addr) = ld.addr.checked_add(u64::from(ld.len) - 1) else {
            return Parsed::NoStatus;
        };
        if !mem.check_range(status_addr, 1, Permissions::Write) {
            return Parsed::NoStatus;
        }
        out.status_addr = status_addr;
        if truncated {
            return Parsed::err(Status::IoErr);
        }

        // Driver-readable descriptors must all precede device-writable ones
        // (2.7.4.2).
        let first_write = self
            .descs
            .iter()
            .position(|d| d.write)
            .unwrap_or(self.descs.len());
        if self.descs[first_write..]
            .iter()
            .any(|d| !d.write && d.len > 0)
        {
            return Parsed::err(Status::IoErr);
        }
        let (readable, writable) = self.descs.split_at(first_write);
        let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        // Writable bytes before the status byte.
        let writable_data: u64 = writable.iter().map(|d| u64::from(d.len)).sum::<u64>() - 1;

        let mut hdr = [0u8; OUT_HDR_LEN];
        if readable_len < OUT_HDR_LEN as u64 || read_stream(mem, readable, 0, &mut hdr).is_err() {
            return Parsed::err(Status::IoErr);
        }
        let hdr = OutHdr::decode(&hdr);
        let readable_data = readable_len - OUT_HDR_LEN as u64;

        match hdr.type_ {
            req_type::IN => {
                if readable_data != 0 {
                    return Parsed::err(Status::IoErr);
                }
                let Some(lba_nlb) = rw_range(&hdr, writable_data, lim) else {
                    return Parsed::err(Status::IoErr);
                };
                if collect(mem, writable, 0, writable_data, out).is_err() {
                    return Parsed::err(Status::IoErr);
                }
                Parsed::Submit(IoOp::Read {
                    lba: lba_nlb.0,
                    nlb: lba_nlb.1,
                })
            }
            req_type::OUT => {
                if lim.read_only || writable_data != 0 {
                    return Parsed::err(Status::IoErr);
                }
                let Some((lba, nlb)) = rw_range(&hdr, readable_data, lim) else {
                    return Parsed::err(Status::IoErr);
                };
                if collect(mem, readable, OUT_HDR_LEN as u64, readable_data, out).is_err() {
                    return Parsed::err(Status::IoErr);
                }
                Parsed::Submit(IoOp::Write {
                    lba,
                    nlb,
                    fua: !writeback,
                })
            }
            req_type::FLUSH => {
                if readable_data != 0 || writable_data != 0 {
                    return Parsed::err(Status::IoErr);
                }
                Parsed::Submit(IoOp::Flush)
            }
            req_type::GET_ID => {
                if readable_data != 0 {
                    return Parsed::err(Status::IoErr);
                }
                let n = writable_data.min(ID_BYTES as u64) as usize;
                if write_stream(mem, writable, 0, &lim.serial[..n]).is_err() {
                    return Parsed::err(Status::IoErr);
                }
                Parsed::Complete {
                    status: Status::Ok,
                    used_len: n as u32 + 1,
                }
            }
            req_type::DISCARD | req_type::WRITE_ZEROES => {
                self.parse_dwz(mem, hdr.type_, readable_data, writable_data, lim, writeback)
            }
            _ => Parsed::err(Status::Unsupp),
        }
    }

    fn parse_dwz<M: GuestMemory>(
        &self,
        mem: &M,
        type_: u32,
        readable_data: u64,
        writable_data: u64,
        lim: &Limits,
        writeback: bool,
    ) -> Parsed {
        let discard = type_ == req_type::DISCARD;
        let (offered, max_seg, max_sectors) = if discard {
            (lim.discard, lim.max_discard_seg, lim.max_discard_sectors)
        } else {
            (lim.write_zeroes, 1, lim.max_write_zeroes_sectors)
        };
        if !offered {
            return Parsed::err(Status::Unsupp);
        }
        if lim.read_only || writable_data != 0 {
            return Parsed::err(Status::IoErr);
        }
        let nseg = readable_data / DWZ_SEG_LEN as u64;
        if readable_data == 0
            || !readable_data.is_multiple_of(DWZ_SEG_LEN as u64)
            || nseg > u64::from(max_seg)
        {
            return Parsed::err(Status::IoErr);
        }
        let first_write = self
            .descs
            .iter()
            .position(|d| d.write)
            .unwrap_or(self.descs.len());
        let readable = &self.descs[..first_write];
        let mut ranges = Vec::with_capacity(nseg as usize);
        let mut unmap = false;
        for i in 0..nseg {
            let mut b = [0u8; DWZ_SEG_LEN];
            let off = OUT_HDR_LEN as u64 + i * DWZ_SEG_LEN as u64;
            if read_stream(mem, readable, off, &mut b).is_err() {
                return Parsed::err(Status::IoErr);
            }
            let s = DiscardWriteZeroes::decode(&b);
            if s.flags & !DiscardWriteZeroes::FLAG_UNMAP != 0 {
                return Parsed::err(Status::Unsupp);
            }
            if s.flags & DiscardWriteZeroes::FLAG_UNMAP != 0 {
                // 5.2.6.2: UNMAP in a DISCARD is unsupported.
                if discard {
                    return Parsed::err(Status::Unsupp);
                }
                unmap = true;
            }
            if s.num_sectors > max_sectors {
                return Parsed::err(Status::IoErr);
            }
            let Some((lba, nlb)) = sectors_to_blocks(s.sector, u64::from(s.num_sectors), lim)
            else {
                return Parsed::err(Status::IoErr);
            };
            ranges.push(LbaRange { lba, nlb });
        }
        if discard {
            Parsed::Submit(IoOp::Deallocate { ranges })
        } else {
            let r = ranges[0];
            Parsed::Submit(IoOp::WriteZeroes {
                lba: r.lba,
                nlb: r.nlb,
                deallocate: unmap && lim.write_zeroes_may_unmap,
                fua: !writeback,
            })
        }
    }
}

/// The LBA range of an IN/OUT request of `len` data bytes, or `None` when it
/// is empty, misaligned, over `max_request`, or beyond the disk's end.
fn rw_range(hdr: &OutHdr, len: u64, lim: &Limits) -> Option<(u64, u32)> {
    if len == 0 || len > u64::from(lim.max_request) || !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    sectors_to_blocks(hdr.sector, len / SECTOR_SIZE, lim)
}

/// Converts a range of 512-byte sectors into whole logical blocks inside
/// the device.
fn sectors_to_blocks(sector: u64, sectors: u64, lim: &Limits) -> Option<(u64, u32)> {
    let bs = u64::from(lim.block_size);
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let len = sectors.checked_mul(SECTOR_SIZE)?;
    if sectors == 0 || !start.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return None;
    }
    let lba = start / bs;
    let nlb = u32::try_from(len / bs).ok()?;
    let end = lba.checked_add(u64::from(nlb))?;
    (end <= lim.num_blocks).then_some((lba, nlb))
}

/// Records `len` bytes of the descriptors' stream starting at byte `skip` as
/// data segments, checking each lies in guest memory.
fn collect<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    mut skip: u64,
    len: u64,
    out: &mut ChainInfo,
) -> Result<(), BadGuestMemory> {
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(left);
        let addr = d.addr.checked_add(skip).ok_or(BadGuestMemory)?;
        let access = if d.write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, take as usize, access) {
            return Err(BadGuestMemory);
        }
        out.segs.push(Seg {
            addr,
            len: take as u32,
        });
        left -= take;
        skip = 0;
    }
    if left != 0 {
        return Err(BadGuestMemory);
    }
    out.data_len = u32::try_from(len).map_err(|_| BadGuestMemory)?;
    Ok(())
}

/// Reads `out.len()` bytes of the descriptors' stream from byte `skip`.
fn read_stream<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), BadGuestMemory> {
    let mut done = 0;
    for d in descs {
        if done == out.len() {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = ((dlen - skip) as usize).min(out.len() - done);
        let addr = d.addr.checked_add(skip).ok_or(BadGuestMemory)?;
        mem.read_slice(&mut out[done..done + take], addr)
            .map_err(|_| BadGuestMemory)?;
        done += take;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(BadGuestMemory)
    }
}

/// Writes `data` into the descriptors' stream from byte `skip`.
fn write_stream<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    mut skip: u64,
    data: &[u8],
) -> Result<(), BadGuestMemory> {
    let mut done = 0;
    for d in descs {
        if done == data.len() {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = ((dlen - skip) as usize).min(data.len() - done);
        let addr = d.addr.checked_add(skip).ok_or(BadGuestMemory)?;
        mem.write_slice(&data[done..done + take], addr)
            .map_err(|_| BadGuestMemory)?;
        done += take;
        skip = 0;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(BadGuestMemory)
    }
}

/// Copies guest memory `segs` into `buf` (a write's data). This copy is the
/// current data path: the backend owns its `IoBuf`, so guest data is
/// gathered into it; zero copy into guest memory is a later optimisation.
pub fn gather<M: GuestMemory>(mem: &M, segs: &[Seg], buf: &mut [u8]) -> Result<(), BadGuestMemory> {
    let mut off = 0usize;
    for s in segs {
        let len = s.len as usize;
        let dst = buf.get_mut(off..off + len).ok_or(BadGuestMemory)?;
        mem.read_slice(dst, s.addr).map_err(|_| BadGuestMemory)?;
        off += len;
    }
    Ok(())
}

/// Copies `buf` into guest memory `segs` (a read's data).
pub fn scatter<M: GuestMemory>(mem: &M, segs: &[Seg], buf: &[u8]) -> Result<(), BadGuestMemory> {
    let mut off = 0usize;
    for s in segs {
        let len = s.len as usize;
        let src = buf.get(off..off + len).ok_or(BadGuestMemory)?;
        mem.write_slice(src, s.addr).map_err(|_| BadGuestMemory)?;
        off += len;
    }
    Ok(())
}

/// Writes the status byte.
pub fn write_status<M: GuestMemory>(mem: &M, addr: GuestAddress, status: Status) {
    if let Err(e) = mem.write_obj(status as u8, addr) {
        tracing::debug!(error = %e, "status byte write failed");
    }
}
