//! NVM I/O commands on an I/O queue: the command is decoded by the one NVM
//! command layer (`unvme_proto::nvm`) and checked against its namespace
//! (NVM Command Set 1.0 §3: Invalid Namespace, LBA Out of Range, a data
//! length that does not match NLB), then handed to the backend.

use unvme_proto::ana::AnaState;
use unvme_proto::nvm::{IoOp, NvmCommand};
use unvme_proto::nvme::{io_opc, Sqe, Status};

use super::{Controller, Outcome};
use crate::namespace::ALL;
use crate::subsystem::Subsystem;

impl Controller {
    #[inline]
    pub(super) fn io(&self, sqe: &Sqe, data: Option<&mut [u8]>) -> Outcome {
        match self.subsys.as_deref() {
            Some(subsys) => {
                validate(subsys, self.port, sqe, data.as_deref()).unwrap_or_else(Outcome::status)
            }
            None => Outcome::status(Status::COMMAND_SEQUENCE_ERROR),
        }
    }
}

/// Validates an NVM I/O command against its namespace and builds the
/// outcome: the bdev operation, or success without I/O for hints and for
/// deallocation on a backend that cannot deallocate. `data` is the
/// command's data buffer (its length is the transfer length).
#[inline]
fn validate(
    subsys: &Subsystem,
    port: u16,
    sqe: &Sqe,
    data: Option<&[u8]>,
) -> Result<Outcome, Status> {
    let Some(ns) = subsys.namespace(sqe.nsid) else {
        return broadcast_flush(subsys, sqe);
    };
    ana_check(subsys.ana.state(port, ns.ana_group))?;
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

/// The status of an I/O command to a namespace whose ANA group is in
/// `state` on this controller's port (NVMe Base 2.0 §8.1.3): commands run
/// in the Optimized and Non-Optimized states, and complete with the
/// path-related ANA statuses otherwise, so a multipath host retries them
/// on another path.
#[inline]
fn ana_check(state: AnaState) -> Result<(), Status> {
    match state {
        AnaState::Optimized | AnaState::NonOptimized => Ok(()),
        AnaState::Inaccessible => Err(Status::ANA_INACCESSIBLE),
        AnaState::PersistentLoss => Err(Status::ANA_PERSISTENT_LOSS),
        AnaState::Change => Err(Status::ANA_TRANSITION),
    }
}

/// A command whose NSID names no active namespace: a Flush with NSID
/// FFFFFFFFh (broadcast, VWC.FB = 11b in Identify Controller) flushes every
/// namespace of the subsystem: the one namespace's own Flush, or with
/// several the subsystem's broadcast-flush device (`ctrlr::flush_all`),
/// which completes once all of them are flushed. Every other NSID is
/// Invalid Namespace or Format.
#[cold]
fn broadcast_flush(subsys: &Subsystem, sqe: &Sqe) -> Result<Outcome, Status> {
    if sqe.nsid != ALL || sqe.opc != io_opc::FLUSH {
        return Err(Status::INVALID_NS);
    }
    let gidx = match (&subsys.flush_all, subsys.namespaces.first()) {
        (Some((gidx, _)), _) => *gidx,
        (None, Some(ns)) => ns.gidx,
        (None, None) => return Ok(Outcome::ok(0)),
    };
    Ok(Outcome::Io {
        gidx,
        op: IoOp::Flush,
    })
}
