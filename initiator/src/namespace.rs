//! [`RemoteNamespace`]: a namespace of a remote controller as a block device.

use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoCompletion, IoOp, IoRequest, SubmitError};

use unvme_proto::admin::IdentifyNamespace;

use crate::{Controller, IoQpair, Result};

/// A remote namespace. Each [`Bdev::open_queue`] opens a new I/O queue pair
/// (a new TCP connection) on the controller.
#[derive(Debug)]
pub struct RemoteNamespace {
    ctrl: Controller,
    nsid: u32,
    id: IdentifyNamespace,
    info: BdevInfo,
}

impl RemoteNamespace {
    /// Reads Identify Namespace for `nsid` and describes it as a bdev.
    pub fn open(ctrl: &Controller, nsid: u32) -> Result<Self> {
        let id = ctrl.identify_namespace(nsid)?;
        let block_size = match id.lba_size() {
            Some(bs) if id.nsze != 0 => bs,
            _ => {
                return Err(crate::Error::Invalid(format!(
                    "namespace {nsid} is not active or has no valid LBA format"
                )))
            }
        };
        let cid = ctrl.identify();
        let info = BdevInfo {
            name: format!("{}/ns{nsid}", ctrl.options().subnqn),
            block_size,
            num_blocks: id.nsze,
            max_transfer: ctrl.max_transfer(),
            volatile_write_cache: cid.volatile_write_cache(),
            deallocate: cid.supports_dsm(),
            write_zeroes: cid.supports_write_zeroes(),
        };
        Ok(RemoteNamespace {
            ctrl: ctrl.clone(),
            nsid,
            id,
            info,
        })
    }

    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// Identify Namespace data read at open.
    pub fn identify(&self) -> &IdentifyNamespace {
        &self.id
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// Opens an I/O queue pair bound to this namespace.
    pub fn open_qpair(&self) -> Result<IoQpair> {
        let mut qp = self.ctrl.create_io_qpair()?;
        qp.register_namespace(self.nsid, self.info.block_size);
        Ok(qp)
    }
}

fn bdev_err(what: &str, e: crate::Error) -> unvme_bdev::Error {
    unvme_bdev::Error::Io {
        what: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A [`BdevQueue`] on one [`IoQpair`].
struct RemoteQueue {
    qp: IoQpair,
    nsid: u32,
}

impl BdevQueue for RemoteQueue {
    fn submit(&mut self, req: IoRequest) -> std::result::Result<(), SubmitError> {
        self.qp.submit(self.nsid, req)
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.qp.poll(out)
    }

    fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }

    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.qp))
    }
}

impl Bdev for RemoteNamespace {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        let qp = self
            .open_qpair()
            .map_err(|e| bdev_err("opening an NVMe/TCP I/O queue", e))?;
        Ok(Box::new(RemoteQueue {
            qp,
            nsid: self.nsid,
        }))
    }

    fn flush_all(&self) -> unvme_bdev::Result<()> {
        if !self.info.volatile_write_cache {
            return Ok(());
        }
        let mut qp = self
            .open_qpair()
            .map_err(|e| bdev_err("opening an NVMe/TCP I/O queue", e))?;
        let c = qp
            .run_sync(
                self.nsid,
                IoRequest {
                    tag: 0,
                    op: IoOp::Flush,
                    buf: None,
                },
            )
            .map_err(|e| bdev_err("flush", e))?;
        c.result.map_err(|e| unvme_bdev::Error::Io {
            what: "flush".into(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}
