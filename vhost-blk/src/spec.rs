//! virtio-blk wire formats (VIRTIO 1.2, section 5.2 "Block Device"): the
//! request header, discard/write-zeroes segments, status values, feature
//! bits and the device configuration layout.
//!
//! Pure data: no guest memory, no I/O. Numeric constants come from
//! `virtio-bindings`; the structures are encoded and decoded by hand (little
//! endian, as virtio 1.x mandates) so no `unsafe` transmutes are needed.

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes in a virtio-blk sector; `sector` fields always count these,
/// whatever the device's logical block size (5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Size of [`OutHdr`] on the wire.
pub const OUT_HDR_LEN: usize = 16;

/// Size of one [`DiscardWriteZeroes`] segment on the wire.
pub const DWZ_SEG_LEN: usize = 16;

/// Bytes of a GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// `VIRTIO_BLK_T_*` request types this device understands (5.2.6).
pub mod req_type {
    use super::vb;
    /// Read (device writes guest memory).
    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    /// Write (device reads guest memory).
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    /// Device identification string (20 bytes).
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    /// Discard (trim) sectors.
    pub const DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes, optionally unmapping.
    pub const WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// `VIRTIO_BLK_S_*`: the status byte the device writes last (5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = vb::VIRTIO_BLK_S_OK as u8,
    /// Device or driver error.
    IoErr = vb::VIRTIO_BLK_S_IOERR as u8,
    /// Request unsupported by the device.
    Unsupp = vb::VIRTIO_BLK_S_UNSUPP as u8,
}

impl From<&unvme_bdev::IoError> for Status {
    /// The one place a backend outcome becomes a virtio-blk status.
    fn from(e: &unvme_bdev::IoError) -> Self {
        match e {
            unvme_bdev::IoError::Unsupported => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// `struct virtio_blk_outhdr` (5.2.6): the driver-readable request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutHdr {
    /// `VIRTIO_BLK_T_*`.
    pub type_: u32,
    /// Reserved (formerly `ioprio`).
    pub reserved: u32,
    /// First 512-byte sector of IN/OUT.
    pub sector: u64,
}

impl OutHdr {
    /// Decodes the 16 header bytes.
    pub fn decode(b: &[u8; OUT_HDR_LEN]) -> Self {
        OutHdr {
            type_: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            reserved: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encodes the header (used by tests and frontends).
    pub fn encode(&self) -> [u8; OUT_HDR_LEN] {
        let mut b = [0u8; OUT_HDR_LEN];
        b[0..4].copy_from_slice(&self.type_.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_discard_write_zeroes` (5.2.6): one range of a
/// DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardWriteZeroes {
    /// First 512-byte sector.
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub num_sectors: u32,
    /// Bit 0: `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`; other bits reserved.
    pub flags: u32,
}

impl DiscardWriteZeroes {
    /// The unmap flag (WRITE_ZEROES only).
    pub const FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

    /// Decodes one 16-byte segment.
    pub fn decode(b: &[u8; DWZ_SEG_LEN]) -> Self {
        DiscardWriteZeroes {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encodes the segment (used by tests and frontends).
    pub fn encode(&self) -> [u8; DWZ_SEG_LEN] {
        let mut b = [0u8; DWZ_SEG_LEN];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Feature bits (5.2.3, 6).
pub mod features {
    use super::*;
    /// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
    /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    /// `VIRTIO_BLK_F_RO`: the device is read-only.
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    /// `VIRTIO_BLK_F_FLUSH`: FLUSH requests.
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    /// `VIRTIO_BLK_F_TOPOLOGY`: topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << vb::VIRTIO_BLK_F_TOPOLOGY;
    /// `VIRTIO_BLK_F_CONFIG_WCE`: `writeback` is writable.
    pub const CONFIG_WCE: u64 = 1 << vb::VIRTIO_BLK_F_CONFIG_WCE;
    /// `VIRTIO_BLK_F_MQ`: `num_queues` is valid.
    pub const MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
    /// `VIRTIO_BLK_F_DISCARD`: DISCARD requests and their limits.
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    /// `VIRTIO_BLK_F_WRITE_ZEROES`: WRITE_ZEROES requests and their limits.
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const RING_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const RING_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
}

/// Length of [`BlkConfig`] as encoded: every field up to and including
/// `write_zeroes_may_unmap` and its padding (offset 60). Reads beyond it
/// return zeroes.
pub const CONFIG_LEN: usize = 60;

/// Offset of `writeback` in the configuration space.
pub const CONFIG_WRITEBACK_OFFSET: usize = 32;

/// `struct virtio_blk_config` (5.2.4), the fields this device uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (descriptor) in bytes.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// 1 = write-back cache, 0 = write-through.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest DISCARD segment in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one DISCARD request.
    pub max_discard_seg: u32,
    /// DISCARD alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest WRITE_ZEROES segment in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// WRITE_ZEROES with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Encodes the configuration space (little endian, 5.2.4 layout; the
    /// unused `geometry` is zero).
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry (cylinders u16, heads u8, sectors u8), unused.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[CONFIG_WRITEBACK_OFFSET] = self.writeback;
        // 33: unused0.
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_hdr_round_trips_little_endian() {
        let h = OutHdr {
            type_: req_type::OUT,
            reserved: 7,
            sector: 0x0102_0304_0506_0708,
        };
        let b = h.encode();
        assert_eq!(b[0], 1);
        assert_eq!(b[8], 0x08);
        assert_eq!(OutHdr::decode(&b), h);
    }

    #[test]
    fn discard_segment_round_trips() {
        let s = DiscardWriteZeroes {
            sector: 99,
            num_sectors: 8,
            flags: DiscardWriteZeroes::FLAG_UNMAP,
        };
        assert_eq!(DiscardWriteZeroes::decode(&s.encode()), s);
    }

    #[test]
    fn config_fields_sit_at_the_spec_offsets() {
        let c = BlkConfig {
            capacity: 0x1000,
            size_max: 4096,
            seg_max: 126,
            blk_size: 512,
            writeback: 1,
            num_queues: 2,
            max_discard_seg: 32,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let b = c.encode();
        assert_eq!(&b[0..8], &0x1000u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[20..24], &512u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[40..44], &32u32.to_le_bytes());
        assert_eq!(b[56], 1);
    }
}
