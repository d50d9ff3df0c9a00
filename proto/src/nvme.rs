//! NVMe queue entries, SGL descriptors, opcodes and status codes
//! (NVMe Base Specification 2.0: §4.2 SQE, §4.6 CQE, §4.3 SGL, §3.3.3.2 status).

use crate::le;
use crate::{Error, Result};

/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0, §3).
pub mod io_opc {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// PSDT value in SQE byte 1 bits 7:6 selecting SGLs for the data pointer
/// (the only choice on NVMe over Fabrics).
pub const PSDT_SGL: u8 = 0x40;

/// Submission Queue Entry (NVMe Base 2.0, Figure 88 "Common Command Format").
///
/// The data pointer is kept raw; [`Sqe::sgl`] reads it as an SGL descriptor.
/// For Fabrics commands (opcode 7Fh) byte 4 is FCTYPE, exposed by
/// [`Sqe::fctype`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// Opcode (CDW0 bits 7:0).
    pub opc: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub flags: u8,
    /// Command Identifier.
    pub cid: u16,
    /// Namespace Identifier.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer (PRP entries or an SGL descriptor).
    pub dptr: [u8; 16],
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

impl Sqe {
    /// Decodes 64 bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < SQE_SIZE {
            return Err(Error::Truncated {
                what: "SQE",
                need: SQE_SIZE,
                have: b.len(),
            });
        }
        let mut dptr = [0u8; 16];
        dptr.copy_from_slice(&b[24..40]);
        Ok(Sqe {
            opc: b[0],
            flags: b[1],
            cid: le::u16(b, 2),
            nsid: le::u32(b, 4),
            cdw2: le::u32(b, 8),
            cdw3: le::u32(b, 12),
            mptr: le::u64(b, 16),
            dptr,
            cdw10: le::u32(b, 40),
            cdw11: le::u32(b, 44),
            cdw12: le::u32(b, 48),
            cdw13: le::u32(b, 52),
            cdw14: le::u32(b, 56),
            cdw15: le::u32(b, 60),
        })
    }

    /// Encodes into the first 64 bytes of `b`.
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.opc;
        b[1] = self.flags;
        le::put_u16(b, 2, self.cid);
        le::put_u32(b, 4, self.nsid);
        le::put_u32(b, 8, self.cdw2);
        le::put_u32(b, 12, self.cdw3);
        le::put_u64(b, 16, self.mptr);
        b[24..40].copy_from_slice(&self.dptr);
        le::put_u32(b, 40, self.cdw10);
        le::put_u32(b, 44, self.cdw11);
        le::put_u32(b, 48, self.cdw12);
        le::put_u32(b, 52, self.cdw13);
        le::put_u32(b, 56, self.cdw14);
        le::put_u32(b, 60, self.cdw15);
    }

    /// FCTYPE of a Fabrics command (byte 4).
    pub fn fctype(&self) -> u8 {
        self.nsid as u8
    }

    /// The data pointer read as an SGL descriptor.
    pub fn sgl(&self) -> SglDescriptor {
        SglDescriptor::decode(&self.dptr)
    }

    /// Sets the data pointer to an SGL descriptor and PSDT to "SGL".
    pub fn set_sgl(&mut self, d: SglDescriptor) {
        d.encode(&mut self.dptr);
        self.flags = (self.flags & 0x3f) | PSDT_SGL;
    }

    /// Starting LBA of an NVM read/write-type command (CDW10/11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of logical blocks of an NVM read/write-type command (CDW12
    /// bits 15:0 are 0's based; this returns the real count).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// Sets SLBA and NLB (real count, 1..=65536) of an NVM command.
    pub fn set_lba_range(&mut self, slba: u64, nlb: u32) {
        self.cdw10 = slba as u32;
        self.cdw11 = (slba >> 32) as u32;
        self.cdw12 = (self.cdw12 & !0xffff) | ((nlb - 1) & 0xffff);
    }

    /// Force Unit Access (CDW12 bit 30) of Read/Write.
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
}

/// Direction of a command's data (NVMe Base 2.0 §5: opcode bits 1:0 for
/// admin and I/O commands; Fabrics commands by their FCTYPE); see
/// `Sqe::data_dir` (in [`crate::nvm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Host to controller (write): in-capsule or by R2T/H2CData.
    HostToController,
    /// Controller to host (read): C2HData.
    ControllerToHost,
}

/// SGL descriptor type/subtype byte values used on NVMe/TCP
/// (NVMe Base 2.0 §4.3.2; NVMe/TCP 1.0 §3.3.2).
pub mod sgl_type {
    /// Data Block descriptor, Offset subtype: in-capsule data.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL Data Block descriptor, Transport Specific subtype:
    /// data moved by R2T/H2CData or C2HData.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5A;
    /// Data Block descriptor, Address subtype.
    pub const DATA_BLOCK_ADDRESS: u8 = 0x00;
}

/// SGL Data Block descriptor (16 bytes): address, length, type/subtype byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SglDescriptor {
    /// Address (offset within the capsule for the Offset subtype).
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Descriptor type (bits 7:4) and subtype (bits 3:0).
    pub sgl_type: u8,
}

impl SglDescriptor {
    /// Decodes 16 bytes.
    pub fn decode(b: &[u8; 16]) -> Self {
        SglDescriptor {
            addr: le::u64(b, 0),
            length: le::u32(b, 8),
            sgl_type: b[15],
        }
    }

    /// Encodes into 16 bytes.
    pub fn encode(&self, b: &mut [u8; 16]) {
        *b = [0; 16];
        le::put_u64(b, 0, self.addr);
        le::put_u32(b, 8, self.length);
        b[15] = self.sgl_type;
    }

    /// In-capsule data descriptor of `len` bytes at capsule offset `offset`.
    pub fn in_capsule(offset: u64, len: u32) -> Self {
        SglDescriptor {
            addr: offset,
            length: len,
            sgl_type: sgl_type::DATA_BLOCK_OFFSET,
        }
    }

    /// Transport data block descriptor of `len` bytes (R2T/C2HData transfer).
    pub fn transport(len: u32) -> Self {
        SglDescriptor {
            addr: 0,
            length: len,
            sgl_type: sgl_type::TRANSPORT_DATA_BLOCK,
        }
    }
}

/// Completion Queue Entry (NVMe Base 2.0 §4.6, Figure 90).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// SQ Head Pointer.
    pub sqhd: u16,
    /// SQ Identifier.
    pub sqid: u16,
    /// Command Identifier.
    pub cid: u16,
    /// Status field including the phase tag in bit 0.
    pub status: u16,
}

impl Cqe {
    /// Decodes 16 bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < CQE_SIZE {
            return Err(Error::Truncated {
                what: "CQE",
                need: CQE_SIZE,
                have: b.len(),
            });
        }
        Ok(Cqe {
            dw0: le::u32(b, 0),
            dw1: le::u32(b, 4),
            sqhd: le::u16(b, 8),
            sqid: le::u16(b, 10),
            cid: le::u16(b, 12),
            status: le::u16(b, 14),
        })
    }

    /// Encodes into the first 16 bytes of `b`.
    pub fn encode(&self, b: &mut [u8]) {
        le::put_u32(b, 0, self.dw0);
        le::put_u32(b, 4, self.dw1);
        le::put_u16(b, 8, self.sqhd);
        le::put_u16(b, 10, self.sqid);
        le::put_u16(b, 12, self.cid);
        le::put_u16(b, 14, self.status);
    }

    /// The status without the phase tag.
    pub fn status(&self) -> Status {
        Status::from_field(self.status)
    }
}

/// Status Code Type values (NVMe Base 2.0 Figure 93).
pub mod sct {
    /// Generic Command Status.
    pub const GENERIC: u8 = 0;
    /// Command Specific Status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and Data Integrity Errors.
    pub const MEDIA: u8 = 2;
    /// Path Related Status.
    pub const PATH: u8 = 3;
}

/// An NVMe completion status (SCT, SC, More, Do Not Retry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status Code Type.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// More information in the error log.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    const fn new(sct: u8, sc: u8) -> Self {
        Status {
            sct,
            sc,
            more: false,
            dnr: false,
        }
    }

    /// Successful Completion.
    pub const SUCCESS: Status = Status::new(sct::GENERIC, 0x00);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status::new(sct::GENERIC, 0x01).with_dnr();
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status::new(sct::GENERIC, 0x02).with_dnr();
    /// Command ID Conflict.
    pub const CID_CONFLICT: Status = Status::new(sct::GENERIC, 0x03).with_dnr();
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Status = Status::new(sct::GENERIC, 0x04);
    /// Internal Error.
    pub const INTERNAL: Status = Status::new(sct::GENERIC, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Status = Status::new(sct::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Status = Status::new(sct::GENERIC, 0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NS: Status = Status::new(sct::GENERIC, 0x0B).with_dnr();
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(sct::GENERIC, 0x0C).with_dnr();
    /// Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::new(sct::GENERIC, 0x0F).with_dnr();
    /// SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status::new(sct::GENERIC, 0x11).with_dnr();
    /// SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: Status = Status::new(sct::GENERIC, 0x16).with_dnr();
    /// Keep Alive Timer Expired.
    pub const KEEP_ALIVE_EXPIRED: Status = Status::new(sct::GENERIC, 0x19);
    /// Transient Transport Error (retryable).
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::new(sct::GENERIC, 0x22);
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Status = Status::new(sct::GENERIC, 0x80).with_dnr();
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: Status = Status::new(sct::GENERIC, 0x81).with_dnr();
    /// Namespace Not Ready.
    pub const NS_NOT_READY: Status = Status::new(sct::GENERIC, 0x82);
    /// Invalid Queue Identifier (Command Specific).
    pub const INVALID_QUEUE_ID: Status = Status::new(sct::COMMAND_SPECIFIC, 0x01).with_dnr();
    /// Invalid Queue Size (Command Specific).
    pub const INVALID_QUEUE_SIZE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x02).with_dnr();
    /// Abort Command Limit Exceeded.
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::new(sct::COMMAND_SPECIFIC, 0x03);
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT_EXCEEDED: Status = Status::new(sct::COMMAND_SPECIFIC, 0x05);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x09).with_dnr();
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x0D).with_dnr();
    /// Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x0E).with_dnr();
    /// Connect: Incompatible Format.
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status =
        Status::new(sct::COMMAND_SPECIFIC, 0x80).with_dnr();
    /// Connect: Controller Busy.
    pub const CONNECT_CTRL_BUSY: Status = Status::new(sct::COMMAND_SPECIFIC, 0x81);
    /// Connect: Invalid Parameters.
    pub const CONNECT_INVALID_PARAMETERS: Status =
        Status::new(sct::COMMAND_SPECIFIC, 0x82).with_dnr();
    /// Connect: Invalid Host.
    pub const CONNECT_INVALID_HOST: Status = Status::new(sct::COMMAND_SPECIFIC, 0x84).with_dnr();
    /// Compare Failure (Media and Data Integrity).
    pub const COMPARE_FAILURE: Status = Status::new(sct::MEDIA, 0x85).with_dnr();
    /// Write Fault (Media and Data Integrity).
    pub const WRITE_FAULT: Status = Status::new(sct::MEDIA, 0x80);
    /// Unrecovered Read Error (Media and Data Integrity).
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(sct::MEDIA, 0x81);
    /// Asymmetric Access Persistent Loss (path related, NVMe Base 2.0
    /// §4.2.3.2 / Figure 104): the namespace's ANA group is in the
    /// Persistent Loss state on this controller; retry on another path.
    pub const ANA_PERSISTENT_LOSS: Status = Status::new(sct::PATH, 0x01);
    /// Asymmetric Access Inaccessible (path related): the namespace's ANA
    /// group is Inaccessible on this controller.
    pub const ANA_INACCESSIBLE: Status = Status::new(sct::PATH, 0x02);
    /// Asymmetric Access Transition (path related): the namespace's ANA
    /// group is changing state on this controller; retry later.
    pub const ANA_TRANSITION: Status = Status::new(sct::PATH, 0x03);

    /// The same status with Do Not Retry set.
    pub const fn with_dnr(mut self) -> Self {
        self.dnr = true;
        self
    }

    /// True for Successful Completion.
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Builds the CQE status field (phase tag 0).
    pub fn to_field(&self) -> u16 {
        (u16::from(self.sc) << 1)
            | (u16::from(self.sct & 0x7) << 9)
            | (u16::from(self.more) << 14)
            | (u16::from(self.dnr) << 15)
    }

    /// Parses a CQE status field (ignores phase and CRD).
    pub fn from_field(f: u16) -> Self {
        Status {
            sc: (f >> 1) as u8,
            sct: ((f >> 9) & 0x7) as u8,
            more: f & (1 << 14) != 0,
            dnr: f & (1 << 15) != 0,
        }
    }

    /// Equality on SCT and SC only.
    pub fn same_code(&self, other: Status) -> bool {
        self.sct == other.sct && self.sc == other.sc
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.sct, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0B) => "Invalid Namespace or Format",
            (0, 0x0C) => "Command Sequence Error",
            (0, 0x0F) => "Data SGL Length Invalid",
            (0, 0x11) => "SGL Descriptor Type Invalid",
            (0, 0x16) => "SGL Offset Invalid",
            (0, 0x19) => "Keep Alive Timer Expired",
            (0, 0x22) => "Transient Transport Error",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x03) => "Abort Command Limit Exceeded",
            (1, 0x05) => "Asynchronous Event Request Limit Exceeded",
            (1, 0x09) => "Invalid Log Page",
            (1, 0x0D) => "Feature Identifier Not Saveable",
            (1, 0x0E) => "Feature Not Changeable",
            (1, 0x80) => "Connect Incompatible Format",
            (1, 0x81) => "Connect Controller Busy",
            (1, 0x82) => "Connect Invalid Parameters",
            (1, 0x84) => "Connect Invalid Host",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x85) => "Compare Failure",
            (3, 0x01) => "Asymmetric Access Persistent Loss",
            (3, 0x02) => "Asymmetric Access Inaccessible",
            (3, 0x03) => "Asymmetric Access Transition",
            _ => "Unknown Status",
        };
        write!(
            f,
            "{name} (SCT {:#x}, SC {:#04x}{})",
            self.sct,
            self.sc,
            if self.dnr { ", DNR" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sqe_round_trips(raw in proptest::collection::vec(any::<u8>(), 64)) {
            let sqe = Sqe::decode(&raw).unwrap();
            let mut out = [0u8; 64];
            sqe.encode(&mut out);
            prop_assert_eq!(&out[..], &raw[..]);
        }

        #[test]
        fn cqe_round_trips(raw in proptest::collection::vec(any::<u8>(), 16)) {
            let cqe = Cqe::decode(&raw).unwrap();
            let mut out = [0u8; 16];
            cqe.encode(&mut out);
            prop_assert_eq!(&out[..], &raw[..]);
        }

        #[test]
        fn status_field_round_trips(sct in 0u8..8, sc: u8, more: bool, dnr: bool) {
            let s = Status { sct, sc, more, dnr };
            prop_assert_eq!(Status::from_field(s.to_field()), s);
        }

        #[test]
        fn sgl_round_trips(addr: u64, length: u32, t: u8) {
            let d = SglDescriptor { addr, length, sgl_type: t };
            let mut b = [0u8; 16];
            d.encode(&mut b);
            prop_assert_eq!(SglDescriptor::decode(&b), d);
        }
    }

    #[test]
    fn status_field_layout_matches_spec() {
        // LBA Out of Range with DNR: SC 0x80 in bits 8:1, DNR bit 15.
        assert_eq!(Status::LBA_OUT_OF_RANGE.to_field(), 0x8100);
        assert_eq!(
            Status::COMPARE_FAILURE.to_field(),
            (0x85 << 1) | (2 << 9) | 0x8000
        );
    }

    #[test]
    fn lba_range_helpers_use_zero_based_nlb() {
        let mut s = Sqe::default();
        s.set_lba_range(0x1_0000_0002, 8);
        assert_eq!(s.cdw12 & 0xffff, 7);
        assert_eq!(s.nlb(), 8);
        assert_eq!(s.slba(), 0x1_0000_0002);
    }

    #[test]
    fn short_input_is_an_error() {
        assert!(Sqe::decode(&[0u8; 63]).is_err());
        assert!(Cqe::decode(&[0u8; 15]).is_err());
    }
}
