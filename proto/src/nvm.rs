//! The NVM command layer: block-device operations ([`IoOp`]) and their
//! submission queue entries, in both directions (NVM Command Set
//! Specification 1.0, §3: Read, Write, Compare, Flush, Write Zeroes,
//! Dataset Management), plus the admin command builders a host sends
//! (Identify, Get Log Page, Get/Set Features, and the PCIe queue management).
//!
//! One place says what an NVM command means, so every transport agrees:
//! the initiator turns an [`IoOp`] into an SQE for NVMe/TCP, the VFIO driver
//! does the same for a PCIe queue (adding PRPs of its own), and the target
//! turns a host's SQE back into an [`IoOp`] for its backend. What is left to
//! each is what only it knows: the data pointer (SGL or PRPs) and, for the
//! target, the namespace's size.
//!
//! Pure code: no I/O, no allocation beyond a Dataset Management range list.

use crate::admin::{opc, sel, GetFeatures, GetLogPage, Identify, SetFeatures};
use crate::fabrics::{fctype, OPC_FABRICS};
use crate::nvme::{io_opc, DataDir, Sqe, Status};

/// Most ranges in one Dataset Management command (NR is 8 bits, 0's based).
pub const DSM_MAX_RANGES: usize = 256;
/// Bytes of one Dataset Management range (NVM Command Set 1.0, Figure 39).
pub const DSM_RANGE_SIZE: usize = 16;
/// Most logical blocks of one read/write-type command (NLB is 16 bits, 0's based).
pub const MAX_NLB: u32 = 65536;

/// CDW12 bit 30: Force Unit Access (Read, Write, Compare, Write Zeroes).
pub const CDW12_FUA: u32 = 1 << 30;
/// CDW12 bit 25: Write Zeroes Deallocate (DEAC).
pub const CDW12_DEAC: u32 = 1 << 25;
/// CDW11 bit 2: Dataset Management Attribute - Deallocate (AD).
pub const DSM_AD: u32 = 1 << 2;

/// One LBA range of a deallocate request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaRange {
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub nlb: u32,
}

/// An operation on a block device. Block counts are real counts (not the
/// NVMe 0's based form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read `nlb` blocks at `lba` into the request's buffer.
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
    },
    /// Write `nlb` blocks at `lba` from the request's buffer; with `fua` the
    /// data is durable when the request completes.
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
        /// Force Unit Access.
        fua: bool,
    },
    /// Compare `nlb` blocks at `lba` with the request's buffer.
    Compare {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
    },
    /// Make every completed write durable.
    Flush,
    /// Set `nlb` blocks at `lba` to zero; `deallocate` allows the backend to
    /// deallocate them instead of writing zeroes.
    WriteZeroes {
        /// First block.
        lba: u64,
        /// Number of blocks.
        nlb: u32,
        /// The blocks may be deallocated (DEAC).
        deallocate: bool,
        /// Force Unit Access.
        fua: bool,
    },
    /// Deallocate (trim) the ranges; later reads return zeroes.
    Deallocate {
        /// The ranges, none of them empty.
        ranges: Vec<LbaRange>,
    },
}

impl IoOp {
    /// Bytes of data the request moves through its buffer.
    pub fn data_len(&self, block_size: u32) -> usize {
        match *self {
            IoOp::Read { nlb, .. } | IoOp::Write { nlb, .. } | IoOp::Compare { nlb, .. } => {
                nlb as usize * block_size as usize
            }
            _ => 0,
        }
    }

    /// The NVM opcode of the operation.
    pub fn opcode(&self) -> u8 {
        match self {
            IoOp::Read { .. } => io_opc::READ,
            IoOp::Write { .. } => io_opc::WRITE,
            IoOp::Compare { .. } => io_opc::COMPARE,
            IoOp::Flush => io_opc::FLUSH,
            IoOp::WriteZeroes { .. } => io_opc::WRITE_ZEROES,
            IoOp::Deallocate { .. } => io_opc::DSM,
        }
    }

    /// Calls `f` with every LBA range the operation touches (for bounds
    /// checks); stops at the first error.
    pub fn try_for_each_range<E>(
        &self,
        mut f: impl FnMut(u64, u32) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            IoOp::Read { lba, nlb }
            | IoOp::Write { lba, nlb, .. }
            | IoOp::Compare { lba, nlb }
            | IoOp::WriteZeroes { lba, nlb, .. } => f(*lba, *nlb),
            IoOp::Flush => Ok(()),
            IoOp::Deallocate { ranges } => ranges.iter().try_for_each(|r| f(r.lba, r.nlb)),
        }
    }
}

impl Sqe {
    /// The direction of this command's data, from opcode bits 1:0 (01b host
    /// to controller, 10b controller to host) or, for a Fabrics command,
    /// from its FCTYPE (Connect and Authentication Send carry data to the
    /// controller, Authentication Receive from it).
    #[inline]
    pub fn data_dir(&self) -> DataDir {
        if self.opc == OPC_FABRICS {
            return match self.fctype() {
                fctype::CONNECT | fctype::AUTH_SEND => DataDir::HostToController,
                fctype::AUTH_RECV => DataDir::ControllerToHost,
                _ => DataDir::None,
            };
        }
        match self.opc & 0x3 {
            1 => DataDir::HostToController,
            2 => DataDir::ControllerToHost,
            _ => DataDir::None,
        }
    }
}

/// Why an [`IoOp`] cannot be expressed as one NVM command.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildError {
    /// A read/write-type command of zero blocks, or a Deallocate without ranges.
    #[error("the operation covers no blocks")]
    Empty,
    /// More blocks (or ranges, or bytes) than one command carries.
    #[error("the operation is larger than one NVM command carries")]
    TooLarge,
}

/// An NVM command built from a block-device operation: the SQE (CID and the
/// data pointer are the transport's to fill in), its data direction and the
/// bytes of data it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoCommand {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// Direction of the data.
    pub dir: DataDir,
    /// Data bytes moved (for Dataset Management: the range list, which
    /// [`encode_dsm_ranges`] writes).
    pub len: u32,
}

fn lba_sqe(opc: u8, nsid: u32, lba: u64, nlb: u32) -> Result<Sqe, BuildError> {
    if nlb == 0 {
        return Err(BuildError::Empty);
    }
    if nlb > MAX_NLB {
        return Err(BuildError::TooLarge);
    }
    let mut sqe = Sqe {
        opc,
        nsid,
        ..Sqe::default()
    };
    sqe.set_lba_range(lba, nlb);
    Ok(sqe)
}

impl IoCommand {
    /// Builds the NVM command for `op` on namespace `nsid` whose logical
    /// blocks are `block_size` bytes. Read/Write/Compare carry
    /// `nlb * block_size` bytes; a Deallocate carries its range list.
    pub fn build(nsid: u32, op: &IoOp, block_size: u32) -> Result<IoCommand, BuildError> {
        let data_len = |nlb: u32| -> Result<u32, BuildError> {
            u64::from(nlb)
                .checked_mul(u64::from(block_size))
                .and_then(|l| u32::try_from(l).ok())
                .ok_or(BuildError::TooLarge)
        };
        let fua = |on: bool| if on { CDW12_FUA } else { 0 };
        Ok(match *op {
            IoOp::Read { lba, nlb } => IoCommand {
                sqe: lba_sqe(io_opc::READ, nsid, lba, nlb)?,
                dir: DataDir::ControllerToHost,
                len: data_len(nlb)?,
            },
            IoOp::Write { lba, nlb, fua: f } => {
                let mut sqe = lba_sqe(io_opc::WRITE, nsid, lba, nlb)?;
                sqe.cdw12 |= fua(f);
                IoCommand {
                    sqe,
                    dir: DataDir::HostToController,
                    len: data_len(nlb)?,
                }
            }
            IoOp::Compare { lba, nlb } => IoCommand {
                sqe: lba_sqe(io_opc::COMPARE, nsid, lba, nlb)?,
                dir: DataDir::HostToController,
                len: data_len(nlb)?,
            },
            IoOp::Flush => IoCommand {
                sqe: Sqe {
                    opc: io_opc::FLUSH,
                    nsid,
                    ..Sqe::default()
                },
                dir: DataDir::None,
                len: 0,
            },
            IoOp::WriteZeroes {
                lba,
                nlb,
                deallocate,
                fua: f,
            } => {
                let mut sqe = lba_sqe(io_opc::WRITE_ZEROES, nsid, lba, nlb)?;
                if deallocate {
                    sqe.cdw12 |= CDW12_DEAC;
                }
                sqe.cdw12 |= fua(f);
                IoCommand {
                    sqe,
                    dir: DataDir::None,
                    len: 0,
                }
            }
            IoOp::Deallocate { ref ranges } => {
                if ranges.is_empty() {
                    return Err(BuildError::Empty);
                }
                if ranges.len() > DSM_MAX_RANGES {
                    return Err(BuildError::TooLarge);
                }
                IoCommand {
                    sqe: Sqe {
                        opc: io_opc::DSM,
                        nsid,
                        cdw10: (ranges.len() - 1) as u32,
                        cdw11: DSM_AD,
                        ..Sqe::default()
                    },
                    dir: DataDir::HostToController,
                    len: (ranges.len() * DSM_RANGE_SIZE) as u32,
                }
            }
        })
    }
}

/// Writes the Dataset Management range list (NVM Command Set 1.0 Figure 39:
/// context attributes, length in blocks, starting LBA) into `out`, which
/// should hold `ranges.len() * 16` bytes; returns the bytes written.
pub fn encode_dsm_ranges(ranges: &[LbaRange], out: &mut [u8]) -> usize {
    for (r, d) in ranges.iter().zip(out.chunks_exact_mut(DSM_RANGE_SIZE)) {
        d[0..4].fill(0);
        d[4..8].copy_from_slice(&r.nlb.to_le_bytes());
        d[8..16].copy_from_slice(&r.lba.to_le_bytes());
    }
    ranges.len().min(out.len() / DSM_RANGE_SIZE) * DSM_RANGE_SIZE
}

/// An NVM I/O command a host sent, decoded from its SQE (and, for Dataset
/// Management, its range list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvmCommand {
    /// An operation for the block device.
    Op(IoOp),
    /// Dataset Management without the Deallocate attribute: its ranges are
    /// hints (access frequency, latency) with no effect on the data; they
    /// are still checked against the namespace.
    Hint {
        /// The non-empty ranges.
        ranges: Vec<LbaRange>,
    },
}

impl NvmCommand {
    /// Decodes the NVM command in `sqe`. `data` is the command's data, read
    /// only for Dataset Management (its range list). Empty ranges in a range
    /// list are dropped; a Deallocate whose ranges are all empty becomes a
    /// [`NvmCommand::Hint`] with none.
    ///
    /// Errors are the status the command completes with: Invalid Opcode for
    /// an opcode this layer does not carry, Data SGL Length Invalid for a
    /// range list shorter than NR says.
    #[inline]
    pub fn decode(sqe: &Sqe, data: Option<&[u8]>) -> Result<NvmCommand, Status> {
        let (lba, nlb) = (sqe.slba(), sqe.nlb());
        let fua = sqe.cdw12 & CDW12_FUA != 0;
        Ok(NvmCommand::Op(match sqe.opc {
            io_opc::READ => IoOp::Read { lba, nlb },
            io_opc::WRITE => IoOp::Write { lba, nlb, fua },
            io_opc::COMPARE => IoOp::Compare { lba, nlb },
            io_opc::FLUSH => IoOp::Flush,
            io_opc::WRITE_ZEROES => IoOp::WriteZeroes {
                lba,
                nlb,
                deallocate: sqe.cdw12 & CDW12_DEAC != 0,
                fua,
            },
            io_opc::DSM => {
                let nr = (sqe.cdw10 & 0xff) as usize + 1;
                let list = data
                    .and_then(|d| d.get(..nr * DSM_RANGE_SIZE))
                    .ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
                let ranges: Vec<LbaRange> = decode_dsm_ranges(list).filter(|r| r.nlb > 0).collect();
                if sqe.cdw11 & DSM_AD == 0 || ranges.is_empty() {
                    return Ok(NvmCommand::Hint { ranges });
                }
                IoOp::Deallocate { ranges }
            }
            _ => return Err(Status::INVALID_OPCODE),
        }))
    }
}

/// Reads a Dataset Management range list (whole 16-byte entries only).
pub fn decode_dsm_ranges(list: &[u8]) -> impl Iterator<Item = LbaRange> + '_ {
    list.chunks_exact(DSM_RANGE_SIZE).map(|r| LbaRange {
        nlb: crate::le::u32(r, 4),
        lba: crate::le::u64(r, 8),
    })
}

/// An Identify command for `cns`, `nsid` and controller `cntid`.
pub fn identify(cns: u8, nsid: u32, cntid: u16) -> Sqe {
    let [cdw10, cdw11] = Identify {
        cns,
        cntid,
        ..Identify::default()
    }
    .to_cdws();
    Sqe {
        opc: opc::IDENTIFY,
        nsid,
        cdw10,
        cdw11,
        ..Sqe::default()
    }
}

/// A Get Log Page command for `len` bytes (a non-zero multiple of 4) of
/// log `lid` starting at byte `offset`.
pub fn get_log_page(lid: u8, nsid: u32, offset: u64, len: u32) -> Sqe {
    let [cdw10, cdw11, cdw12, cdw13] = GetLogPage {
        lid,
        numd: (len / 4).saturating_sub(1),
        lpo: offset,
        ..GetLogPage::default()
    }
    .to_cdws();
    Sqe {
        opc: opc::GET_LOG_PAGE,
        nsid,
        cdw10,
        cdw11,
        cdw12,
        cdw13,
        ..Sqe::default()
    }
}

/// A Get Features command (current value).
pub fn get_features(fid: u8, nsid: u32, cdw11: u32) -> Sqe {
    Sqe {
        opc: opc::GET_FEATURES,
        nsid,
        cdw10: GetFeatures {
            fid,
            sel: sel::CURRENT,
        }
        .to_cdw10(),
        cdw11,
        ..Sqe::default()
    }
}

/// A Set Features command; `save` sets SV.
pub fn set_features(fid: u8, nsid: u32, cdw11: u32, save: bool) -> Sqe {
    Sqe {
        opc: opc::SET_FEATURES,
        nsid,
        cdw10: SetFeatures { fid, sv: save }.to_cdw10(),
        cdw11,
        ..Sqe::default()
    }
}

/// A Create I/O Completion Queue command (NVMe Base 2.0 §5.4) for queue
/// `qid` of `entries` entries, physically contiguous (PC), interrupts off;
/// the transport puts the queue's address in PRP1.
pub fn create_io_cq(qid: u16, entries: u16) -> Sqe {
    Sqe {
        opc: opc::CREATE_IO_CQ,
        cdw10: (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid),
        cdw11: 1, // PC = 1, IEN = 0
        ..Sqe::default()
    }
}

/// A Create I/O Submission Queue command (NVMe Base 2.0 §5.5) for queue
/// `qid` of `entries` entries on completion queue `cqid`, physically
/// contiguous, priority 0; PRP1 is the transport's.
pub fn create_io_sq(qid: u16, entries: u16, cqid: u16) -> Sqe {
    Sqe {
        opc: opc::CREATE_IO_SQ,
        cdw10: (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid),
        cdw11: (u32::from(cqid) << 16) | 1, // CQID, QPRIO 0, PC = 1
        ..Sqe::default()
    }
}

/// A Delete I/O Submission Queue (`sq`) or Completion Queue command for
/// queue `qid` (NVMe Base 2.0 §5.6, §5.7).
pub fn delete_io_queue(sq: bool, qid: u16) -> Sqe {
    Sqe {
        opc: if sq {
            opc::DELETE_IO_SQ
        } else {
            opc::DELETE_IO_CQ
        },
        cdw10: u32::from(qid),
        ..Sqe::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_builds_zero_based_nlb_and_slba() {
        let c = IoCommand::build(
            3,
            &IoOp::Read {
                lba: 0x1_0000_0002,
                nlb: 8,
            },
            512,
        )
        .unwrap();
        assert_eq!(c.sqe.opc, io_opc::READ);
        assert_eq!(c.sqe.nsid, 3);
        assert_eq!((c.sqe.cdw10, c.sqe.cdw11, c.sqe.cdw12), (2, 1, 7));
        assert_eq!((c.dir, c.len), (DataDir::ControllerToHost, 4096));
    }

    #[test]
    fn write_with_fua_sets_cdw12_bit_30() {
        let op = IoOp::Write {
            lba: 0,
            nlb: 1,
            fua: true,
        };
        let c = IoCommand::build(1, &op, 4096).unwrap();
        assert_eq!(c.sqe.cdw12, CDW12_FUA);
        assert_eq!((c.dir, c.len), (DataDir::HostToController, 4096));
    }

    #[test]
    fn write_zeroes_sets_deac_and_carries_no_data() {
        let op = IoOp::WriteZeroes {
            lba: 5,
            nlb: 2,
            deallocate: true,
            fua: false,
        };
        let c = IoCommand::build(1, &op, 512).unwrap();
        assert_eq!(c.sqe.cdw12, CDW12_DEAC | 1);
        assert_eq!((c.dir, c.len), (DataDir::None, 0));
    }

    #[test]
    fn oversized_or_empty_lba_counts_are_rejected() {
        let build = |nlb| IoCommand::build(1, &IoOp::Read { lba: 0, nlb }, 512);
        assert_eq!(build(0), Err(BuildError::Empty));
        assert_eq!(build(MAX_NLB + 1), Err(BuildError::TooLarge));
        assert!(build(MAX_NLB).is_ok());
        let big = IoCommand::build(1, &IoOp::Read { lba: 0, nlb: 65536 }, 1 << 20);
        assert_eq!(big, Err(BuildError::TooLarge), "length overflows u32");
        let none = IoOp::Deallocate { ranges: vec![] };
        assert_eq!(IoCommand::build(1, &none, 512), Err(BuildError::Empty));
    }

    #[test]
    fn deallocate_builds_dsm_with_ad_and_range_list() {
        let ranges = vec![LbaRange { lba: 9, nlb: 3 }, LbaRange { lba: 100, nlb: 1 }];
        let c = IoCommand::build(
            2,
            &IoOp::Deallocate {
                ranges: ranges.clone(),
            },
            512,
        )
        .unwrap();
        assert_eq!(
            (c.sqe.opc, c.sqe.cdw10, c.sqe.cdw11),
            (io_opc::DSM, 1, DSM_AD)
        );
        assert_eq!((c.dir, c.len), (DataDir::HostToController, 32));
        let mut list = [0xAAu8; 32];
        assert_eq!(encode_dsm_ranges(&ranges, &mut list), 32);
        assert_eq!(&list[0..4], &[0; 4]);
        assert_eq!(decode_dsm_ranges(&list).collect::<Vec<_>>(), ranges);
    }

    #[test]
    fn unknown_opcode_decodes_to_invalid_opcode() {
        let sqe = Sqe {
            opc: 0x7E,
            ..Sqe::default()
        };
        assert_eq!(NvmCommand::decode(&sqe, None), Err(Status::INVALID_OPCODE));
    }

    #[test]
    fn dsm_shorter_than_nr_is_a_length_error_and_hints_have_no_effect() {
        let sqe = Sqe {
            opc: io_opc::DSM,
            cdw10: 1, // two ranges
            cdw11: DSM_AD,
            ..Sqe::default()
        };
        let err = NvmCommand::decode(&sqe, Some(&[0u8; 16]));
        assert_eq!(err, Err(Status::DATA_SGL_LENGTH_INVALID));
        assert_eq!(
            NvmCommand::decode(&sqe, None),
            Err(Status::DATA_SGL_LENGTH_INVALID)
        );
        let mut list = [0u8; 32];
        encode_dsm_ranges(
            &[LbaRange { lba: 1, nlb: 0 }, LbaRange { lba: 4, nlb: 2 }],
            &mut list,
        );
        let hint = Sqe { cdw11: 0, ..sqe };
        assert_eq!(
            NvmCommand::decode(&hint, Some(&list)),
            Ok(NvmCommand::Hint {
                ranges: vec![LbaRange { lba: 4, nlb: 2 }]
            })
        );
        assert_eq!(
            NvmCommand::decode(&sqe, Some(&list)),
            Ok(NvmCommand::Op(IoOp::Deallocate {
                ranges: vec![LbaRange { lba: 4, nlb: 2 }]
            }))
        );
    }

    #[test]
    fn get_log_page_encodes_numd_across_cdw10_and_cdw11() {
        let s = get_log_page(crate::admin::lid::DISCOVERY, 0, 0x1_0000_0400, 1 << 20);
        let numd = (1u32 << 18) - 1;
        assert_eq!(s.opc, opc::GET_LOG_PAGE);
        assert_eq!(s.cdw10, 0x70 | ((numd & 0xffff) << 16));
        assert_eq!(s.cdw11, numd >> 16);
        assert_eq!((s.cdw12, s.cdw13), (0x400, 1));
    }

    #[test]
    fn queue_management_commands_carry_0s_based_sizes_and_the_cq() {
        let cq = create_io_cq(3, 1024);
        assert_eq!(
            (cq.opc, cq.cdw10, cq.cdw11),
            (opc::CREATE_IO_CQ, (1023 << 16) | 3, 1)
        );
        let sq = create_io_sq(3, 1024, 3);
        assert_eq!(
            (sq.opc, sq.cdw10, sq.cdw11),
            (opc::CREATE_IO_SQ, (1023 << 16) | 3, (3 << 16) | 1)
        );
        assert_eq!(
            (delete_io_queue(true, 7).opc, delete_io_queue(true, 7).cdw10),
            (opc::DELETE_IO_SQ, 7)
        );
        assert_eq!(delete_io_queue(false, 7).opc, opc::DELETE_IO_CQ);
    }

    fn io_op() -> impl Strategy<Value = IoOp> {
        let nlb = 1..=MAX_NLB;
        prop_oneof![
            (any::<u64>(), nlb.clone()).prop_map(|(lba, nlb)| IoOp::Read { lba, nlb }),
            (any::<u64>(), nlb.clone(), any::<bool>()).prop_map(|(lba, nlb, fua)| IoOp::Write {
                lba,
                nlb,
                fua
            }),
            (any::<u64>(), nlb.clone()).prop_map(|(lba, nlb)| IoOp::Compare { lba, nlb }),
            Just(IoOp::Flush),
            (any::<u64>(), nlb, any::<bool>(), any::<bool>()).prop_map(
                |(lba, nlb, deallocate, fua)| IoOp::WriteZeroes {
                    lba,
                    nlb,
                    deallocate,
                    fua
                }
            ),
            prop::collection::vec(
                (any::<u64>(), 1..=u32::MAX).prop_map(|(lba, nlb)| LbaRange { lba, nlb }),
                1..=DSM_MAX_RANGES
            )
            .prop_map(|ranges| IoOp::Deallocate { ranges }),
        ]
    }

    proptest! {
        /// What a host builds, a controller decodes back to the same operation
        /// with the data direction the opcode's bits say.
        #[test]
        fn build_then_decode_round_trips(op in io_op(), nsid in any::<u32>()) {
            let c = IoCommand::build(nsid, &op, 512).unwrap();
            let mut list = vec![0u8; c.len as usize];
            if let IoOp::Deallocate { ranges } = &op {
                prop_assert_eq!(encode_dsm_ranges(ranges, &mut list), list.len());
            }
            prop_assert_eq!(c.sqe.nsid, nsid);
            prop_assert_eq!(c.sqe.data_dir(), c.dir);
            prop_assert_eq!(NvmCommand::decode(&c.sqe, Some(&list)), Ok(NvmCommand::Op(op)));
        }

        /// No SQE makes the decoder panic, whatever its range list says.
        #[test]
        fn decode_never_panics(
            opc in any::<u8>(),
            cdws in any::<[u32; 4]>(),
            data in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let sqe = Sqe { opc, cdw10: cdws[0], cdw11: cdws[1], cdw12: cdws[2], cdw13: cdws[3], ..Sqe::default() };
            let _ = NvmCommand::decode(&sqe, Some(&data));
        }
    }
}
