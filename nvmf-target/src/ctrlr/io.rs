//! NVM I/O commands on an I/O queue: the command is decoded by the one NVM
//! command layer (`unvme_proto::nvm`) and checked against its namespace
//! (NVM Command Set 1.0 §3: Invalid Namespace, LBA Out of Range, a data
//! length that does not match NLB), then handed to the backend.

use unvme_proto::nvm::{IoOp, NvmCommand};
use unvme_proto::nvme::{io_opc, Sqe, Status};

use super::{Controller, Outcome};
use crate::namespace::ALL;
use crate::subsystem::Subsystem;

impl Controller {
    #[inline]
    pub(super) fn io(&self, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        match self.subsys.as_deref() {
            Some(subsys) => validate(subsys, sqe, data.as_deref()).unwrap_or_else(Outcome::status),
            None => Outcome::status(Status::COMMAND_SEQUENCE_ERROR),
        }
    }
}

/// Validates an NVM I/O command against its namespace and builds the
/// outcome: the bdev operation, or success without I/O for hints and for
/// deallocation on a backend that cannot deallocate. `data` is the
/// command's data buffer (its length is the transfer length).
#[inline]
fn validate(subsys: &Subsystem, sqe: &Sqe, data: Option<&[u8]>) -> Result<Outcome, Status> {
    let Some(ns) = subsys.namespace(sqe.nsid) else {
        return broadcast_flush(subsys, sqe);
    };
    let info = ns.bdev.info();
    let in_range = |lba: u64, nlb: u32| {
        info.check_range(lba, nlb)
            .map_err(|_| Status::LBA_OUT_OF_RANGE)
    };
    let op = match NvmCommand::decode(sqe, data)? {
        NvmCommand::Hint { ranges } => {
            ranges.iter().try_for_each(|r| in_range(r.lba, r.nlb))?;
            return Ok(Outcome::ok(0));
        }
        NvmCommand::Op(op) => op,
    };
    op.try_for_each_range(in_range)?;
    let len = data.map_or(0, <[u8]>::len);
    match op {
        IoOp::Read { nlb, .. } | IoOp::Write { nlb, .. } | IoOp::Compare { nlb, .. }
            if u64::from(nlb) * u64::from(info.block_size) != len as u64 =>
        {
            Err(Status::DATA_SGL_LENGTH_INVALID)
        }
        IoOp::Deallocate { .. } if !info.deallocate => Ok(Outcome::ok(0)),
        op => Ok(Outcome::Io { gidx: ns.gidx, op }),
    }
}

/// A command whose NSID names no active namespace: a Flush with NSID
/// FFFFFFFFh flushes every namespace where Identify Controller says so
/// (VWC.FB = 11b, [`flush_broadcast_supported`]): a subsystem of one
/// namespace (or none) has it flushed as an ordinary Flush. A broadcast to
/// several namespaces would need one backend operation per namespace and a
/// transport that joins their results; VWC.FB says 10b for such a
/// subsystem, and the NVMe Base specification (2.0 §7.1) then prescribes
/// Invalid Namespace or Format, what every other NSID gets here.
#[cold]
fn broadcast_flush(subsys: &Subsystem, sqe: &Sqe) -> Result<Outcome, Status> {
    if sqe.nsid != ALL || sqe.opc != io_opc::FLUSH || !flush_broadcast_supported(subsys) {
        return Err(Status::INVALID_NS);
    }
    Ok(match subsys.namespaces.first() {
        Some(ns) => Outcome::Io {
            gidx: ns.gidx,
            op: IoOp::Flush,
        },
        None => Outcome::ok(0),
    })
}

/// Whether a Flush with NSID FFFFFFFFh flushes every namespace of
/// `subsys` (what VWC.FB in Identify Controller advertises).
pub(super) fn flush_broadcast_supported(subsys: &Subsystem) -> bool {
    subsys.namespaces.len() <= 1
}
