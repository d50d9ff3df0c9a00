//! Pure helpers of the host side: the NVM command of an `IoOp` (built by the
//! one NVMe command layer, [`unvme_proto::nvm`]) with the host's error
//! mapping, and what is NVMe/TCP's own: splitting the transfer an R2T asks
//! for into H2CData PDUs. No I/O.

use unvme_bdev::{IoError, IoOp};
use unvme_proto::nvm::{BuildError, IoCommand};

/// Builds the NVM command for `op` on namespace `nsid` (the one NVM command
/// layer, [`unvme_proto::nvm`]), with its failure as the bdev error a caller
/// of [`unvme_bdev::BdevQueue::submit`] sees.
pub fn io_command(nsid: u32, op: &IoOp, block_size: u32) -> Result<IoCommand, IoError> {
    IoCommand::build(nsid, op, block_size).map_err(|e| match e {
        BuildError::Empty => IoError::BadBuffer,
        BuildError::TooLarge => IoError::TooLarge,
    })
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
    use unvme_bdev::LbaRange;

    #[test]
    fn build_errors_map_to_the_bdev_errors_a_submitter_sees() {
        assert_eq!(
            io_command(1, &IoOp::Read { lba: 0, nlb: 65537 }, 512),
            Err(IoError::TooLarge)
        );
        assert_eq!(
            io_command(1, &IoOp::Read { lba: 0, nlb: 0 }, 512),
            Err(IoError::BadBuffer)
        );
        let too_many = vec![LbaRange { lba: 0, nlb: 1 }; 257];
        assert_eq!(
            io_command(1, &IoOp::Deallocate { ranges: too_many }, 512),
            Err(IoError::TooLarge)
        );
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
}
