//! Pure helpers that build submission queue entries and split transfers:
//! NVM I/O commands from [`unvme_bdev::IoOp`]s, admin commands, Dataset
//! Management range lists, and the H2CData PDUs that answer an R2T. No I/O.

use unvme_bdev::{IoError, IoOp, LbaRange};
use unvme_proto::admin::{opc, sel, GetFeatures, GetLogPage, Identify, SetFeatures};
use unvme_proto::nvme::{io_opc, Sqe};

use crate::qpair::DataDir;

/// Most ranges in one Dataset Management command.
pub const DSM_MAX_RANGES: usize = 256;
/// Bytes of one Dataset Management range.
pub const DSM_RANGE_SIZE: usize = 16;

/// CDW12 bit 30: Force Unit Access.
const CDW12_FUA: u32 = 1 << 30;
/// CDW12 bit 25: Write Zeroes Deallocate.
const CDW12_DEAC: u32 = 1 << 25;
/// CDW11 bit 2: Dataset Management Attribute - Deallocate.
const DSM_AD: u32 = 1 << 2;

/// An NVM command built from a block-device operation: the SQE (CID and
/// SGL are filled in at submission), its data direction and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoCommand {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// Direction of the data.
    pub dir: DataDir,
    /// Data bytes moved (for Dataset Management: the range list).
    pub len: u32,
}

fn lba_cmd(opc: u8, nsid: u32, lba: u64, nlb: u32) -> Result<Sqe, IoError> {
    if nlb == 0 || nlb > 65536 {
        return Err(if nlb == 0 {
            IoError::BadBuffer
        } else {
            IoError::TooLarge
        });
    }
    let mut sqe = Sqe {
        opc,
        nsid,
        ..Sqe::default()
    };
    sqe.set_lba_range(lba, nlb);
    Ok(sqe)
}

/// Builds the NVM command for `op` on namespace `nsid` whose logical blocks
/// are `block_size` bytes. Read/Write/Compare carry `nlb * block_size` bytes;
/// a Deallocate carries its range list (see [`encode_dsm_ranges`]).
pub fn io_command(nsid: u32, op: &IoOp, block_size: u32) -> Result<IoCommand, IoError> {
    let data_len = |nlb: u32| -> Result<u32, IoError> {
        u64::from(nlb)
            .checked_mul(u64::from(block_size))
            .and_then(|l| u32::try_from(l).ok())
            .ok_or(IoError::TooLarge)
    };
    Ok(match *op {
        IoOp::Read { lba, nlb } => IoCommand {
            sqe: lba_cmd(io_opc::READ, nsid, lba, nlb)?,
            dir: DataDir::ControllerToHost,
            len: data_len(nlb)?,
        },
        IoOp::Write { lba, nlb, fua } => {
            let mut sqe = lba_cmd(io_opc::WRITE, nsid, lba, nlb)?;
            if fua {
                sqe.cdw12 |= CDW12_FUA;
            }
            IoCommand {
                sqe,
                dir: DataDir::HostToController,
                len: data_len(nlb)?,
            }
        }
        IoOp::Compare { lba, nlb } => IoCommand {
            sqe: lba_cmd(io_opc::COMPARE, nsid, lba, nlb)?,
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
            fua,
        } => {
            let mut sqe = lba_cmd(io_opc::WRITE_ZEROES, nsid, lba, nlb)?;
            if deallocate {
                sqe.cdw12 |= CDW12_DEAC;
            }
            if fua {
                sqe.cdw12 |= CDW12_FUA;
            }
            IoCommand {
                sqe,
                dir: DataDir::None,
                len: 0,
            }
        }
        IoOp::Deallocate { ref ranges } => {
            if ranges.is_empty() || ranges.len() > DSM_MAX_RANGES {
                return Err(IoError::TooLarge);
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

/// Writes the Dataset Management range list (NVM Command Set 1.0 Figure 39:
/// context attributes, length in blocks, starting LBA) into `out`, which
/// must hold `ranges.len() * 16` bytes; returns the bytes written.
pub fn encode_dsm_ranges(ranges: &[LbaRange], out: &mut [u8]) -> usize {
    for (r, d) in ranges.iter().zip(out.chunks_exact_mut(DSM_RANGE_SIZE)) {
        d[0..4].fill(0);
        d[4..8].copy_from_slice(&r.nlb.to_le_bytes());
        d[8..16].copy_from_slice(&r.lba.to_le_bytes());
    }
    ranges.len().min(out.len() / DSM_RANGE_SIZE) * DSM_RANGE_SIZE
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

/// One H2CData PDU of an R2T's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2cChunk {
    /// DATAO: offset within the command's data.
    pub datao: u32,
    /// DATAL: bytes in this PDU.
    pub datal: u32,
    /// LAST_PDU: the last PDU for this R2T.
    pub last: bool,
}

/// Splits the transfer an R2T asks for (`r2tl` bytes at `r2to`) into
/// H2CData PDUs of at most `maxh2cdata` bytes each.
pub fn h2c_chunks(r2to: u32, r2tl: u32, maxh2cdata: u32) -> impl Iterator<Item = H2cChunk> {
    let max = maxh2cdata.max(1);
    let end = r2to.saturating_add(r2tl);
    let mut off = r2to;
    std::iter::from_fn(move || {
        if off >= end {
            return None;
        }
        let datal = (end - off).min(max);
        let c = H2cChunk {
            datao: off,
            datal,
            last: off + datal == end,
        };
        off += datal;
        Some(c)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use unvme_proto::admin::lid;

    #[test]
    fn read_builds_zero_based_nlb_and_slba() {
        let c = io_command(
            1,
            &IoOp::Read {
                lba: 0x1_2345_6789,
                nlb: 8,
            },
            512,
        )
        .unwrap();
        assert_eq!(c.sqe.opc, io_opc::READ);
        assert_eq!(c.sqe.nsid, 1);
        assert_eq!(c.sqe.cdw10, 0x2345_6789);
        assert_eq!(c.sqe.cdw11, 0x1);
        assert_eq!(c.sqe.cdw12, 7);
        assert_eq!((c.dir, c.len), (DataDir::ControllerToHost, 4096));
    }

    #[test]
    fn write_with_fua_sets_cdw12_bit_30() {
        let c = io_command(
            2,
            &IoOp::Write {
                lba: 4,
                nlb: 1,
                fua: true,
            },
            4096,
        )
        .unwrap();
        assert_eq!(c.sqe.opc, io_opc::WRITE);
        assert_eq!(c.sqe.cdw12, (1 << 30));
        assert_eq!((c.dir, c.len), (DataDir::HostToController, 4096));
        let c = io_command(2, &IoOp::Compare { lba: 4, nlb: 2 }, 512).unwrap();
        assert_eq!((c.sqe.opc, c.sqe.cdw12, c.len), (io_opc::COMPARE, 1, 1024));
    }

    #[test]
    fn write_zeroes_sets_deac_and_carries_no_data() {
        let op = IoOp::WriteZeroes {
            lba: 10,
            nlb: 65536,
            deallocate: true,
            fua: false,
        };
        let c = io_command(1, &op, 512).unwrap();
        assert_eq!(c.sqe.opc, io_opc::WRITE_ZEROES);
        assert_eq!(c.sqe.cdw12, (1 << 25) | 0xffff);
        assert_eq!((c.dir, c.len), (DataDir::None, 0));
    }

    #[test]
    fn oversized_or_empty_lba_counts_are_rejected() {
        assert_eq!(
            io_command(1, &IoOp::Read { lba: 0, nlb: 65537 }, 512),
            Err(IoError::TooLarge)
        );
        assert_eq!(
            io_command(1, &IoOp::Read { lba: 0, nlb: 0 }, 512),
            Err(IoError::BadBuffer)
        );
    }

    #[test]
    fn deallocate_builds_dsm_with_ad_and_range_list() {
        let ranges = vec![
            LbaRange { lba: 7, nlb: 3 },
            LbaRange {
                lba: 1 << 40,
                nlb: 100,
            },
        ];
        let c = io_command(
            1,
            &IoOp::Deallocate {
                ranges: ranges.clone(),
            },
            512,
        )
        .unwrap();
        assert_eq!(c.sqe.opc, io_opc::DSM);
        assert_eq!(c.sqe.cdw10, 1, "NR is 0's based");
        assert_eq!(c.sqe.cdw11, 1 << 2);
        assert_eq!((c.dir, c.len), (DataDir::HostToController, 32));
        let mut out = [0xffu8; 32];
        assert_eq!(encode_dsm_ranges(&ranges, &mut out), 32);
        assert_eq!(&out[0..4], &[0; 4]);
        assert_eq!(&out[4..8], &3u32.to_le_bytes());
        assert_eq!(&out[8..16], &7u64.to_le_bytes());
        assert_eq!(&out[24..32], &(1u64 << 40).to_le_bytes());
        let too_many = vec![LbaRange { lba: 0, nlb: 1 }; 257];
        assert!(io_command(1, &IoOp::Deallocate { ranges: too_many }, 512).is_err());
    }

    #[test]
    fn r2t_larger_than_maxh2cdata_is_split_with_last_flag_on_the_final_pdu() {
        let c: Vec<_> = h2c_chunks(4096, 10000, 4096).collect();
        assert_eq!(
            c,
            vec![
                H2cChunk {
                    datao: 4096,
                    datal: 4096,
                    last: false
                },
                H2cChunk {
                    datao: 8192,
                    datal: 4096,
                    last: false
                },
                H2cChunk {
                    datao: 12288,
                    datal: 1808,
                    last: true
                },
            ]
        );
        let one: Vec<_> = h2c_chunks(0, 4096, 131072).collect();
        assert_eq!(
            one,
            vec![H2cChunk {
                datao: 0,
                datal: 4096,
                last: true
            }]
        );
        assert_eq!(h2c_chunks(0, 0, 4096).count(), 0);
    }

    #[test]
    fn get_log_page_encodes_numd_across_cdw10_and_cdw11() {
        let s = get_log_page(lid::DISCOVERY, 0, 0x1_0000_0400, 1 << 20);
        let numd = (1u32 << 18) - 1;
        assert_eq!(s.cdw10, 0x70 | ((numd & 0xffff) << 16));
        assert_eq!(s.cdw11, numd >> 16);
        assert_eq!((s.cdw12, s.cdw13), (0x400, 1));
    }
}
