//! [`RemoteNamespace`]: a namespace of a remote subsystem as a block
//! device, reachable over one or several paths (multipath with ANA), which
//! rides through lost connections, failed controllers and target restarts.

use std::sync::Arc;

use tracing::{info, warn};
use unvme_bdev::{Bdev, BdevInfo, BdevQueue, IoOp, IoRequest};
use unvme_proto::admin::IdentifyNamespace;

use crate::path::{NsKey, PathShared};
use crate::queue::RemoteQueue;
use crate::{ConnectOptions, Controller, Error, IoQpair, Recovery, Result};

/// How a multipath namespace spreads I/O over its usable paths. Only paths
/// in the best ANA state present (optimized before non-optimized) are
/// candidates; inaccessible, persistent-loss and changing paths are never
/// used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoPolicy {
    /// Every command to the first candidate in the order the paths were
    /// given; the others are standby (SPDK's active_passive; Linux's `numa`
    /// on a single node).
    #[default]
    Failover,
    /// Commands rotate over the candidates (Linux `round-robin`, SPDK
    /// active_active).
    RoundRobin,
    /// Each command to the candidate with the fewest outstanding commands
    /// (Linux `queue-depth`).
    QueueDepth,
}

impl std::str::FromStr for IoPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "failover" | "numa" | "active-passive" => Ok(IoPolicy::Failover),
            "round-robin" | "active-active" => Ok(IoPolicy::RoundRobin),
            "queue-depth" => Ok(IoPolicy::QueueDepth),
            _ => Err(format!(
                "unknown I/O policy {s:?} (failover, round-robin, queue-depth)"
            )),
        }
    }
}

/// What every queue of a namespace shares.
#[derive(Debug)]
pub(crate) struct NsShared {
    pub key: NsKey,
    pub paths: Vec<Arc<PathShared>>,
    pub policy: IoPolicy,
    pub recovery: Recovery,
}

impl NsShared {
    /// Opens a queue pair on the first path that gives one, best ANA state
    /// first. Blocking (admin path).
    fn open_qpair(&self) -> Result<(usize, IoQpair)> {
        let mut order: Vec<usize> = (0..self.paths.len()).collect();
        order.sort_by_key(|&i| match self.paths[i].ana_state() {
            None | Some(unvme_proto::ana::AnaState::Optimized) => 0,
            Some(s) if s.usable() => 1,
            Some(_) => 2,
        });
        let mut last = None;
        for i in order {
            match self.paths[i].open_qpair(self.key) {
                Ok(qp) => return Ok((i, qp)),
                Err(e) => {
                    warn!(path = %self.paths[i].label, error = %e, "path unavailable");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Invalid("a namespace without paths".into())))
    }
}

/// A remote namespace. Each [`Bdev::open_queue`] opens an I/O queue pair (a
/// TCP connection) on every path, connected in the background except the
/// first.
///
/// Recovery follows the [`Recovery`] of the first path's
/// [`ConnectOptions`]: while no path can carry I/O, requests are held and
/// resubmitted when one can, and fail only after `fast_io_fail_tmo` or once
/// the controller is lost (`ctrl_loss_tmo`). A failed controller (keep-alive
/// failure, a command that timed out and was not returned by Abort) is
/// replaced by a new association. With several paths, a path that dies
/// hands its requests to another ([`IoPolicy`]), and comes back into use
/// when it reconnects (failback). A namespace whose size or block size
/// changed meanwhile is not reattached.
#[derive(Debug)]
pub struct RemoteNamespace {
    shared: Arc<NsShared>,
    id: IdentifyNamespace,
    info: BdevInfo,
}

/// The identifiers hosts recognise a namespace by across paths.
fn ns_ids(id: &IdentifyNamespace) -> ([u8; 16], [u8; 8]) {
    (id.nguid, id.eui64)
}

impl RemoteNamespace {
    /// Reads Identify Namespace for `nsid` and describes it as a bdev, over
    /// the one path of `ctrl`.
    pub fn open(ctrl: &Controller, nsid: u32) -> Result<Self> {
        Self::open_paths(
            vec![(ctrl.options().clone(), Some(ctrl.clone()))],
            nsid,
            IoPolicy::Failover,
        )
    }

    /// Opens namespace `nsid` over every path in `paths` (one subsystem
    /// reached at several addresses: target nodes or ports). Paths that do
    /// not answer now are kept and connected later; at least one must
    /// answer. Every path that answers must show the same namespace (same
    /// NGUID and EUI-64, size and block size). Recovery follows the first
    /// path's options.
    pub fn open_multipath(paths: &[ConnectOptions], nsid: u32, policy: IoPolicy) -> Result<Self> {
        let mut all = Vec::with_capacity(paths.len());
        let mut last = None;
        for o in paths {
            match Controller::connect(o.clone()) {
                Ok(c) => all.push((o.clone(), Some(c))),
                Err(e) => {
                    warn!(addr = %o.addr, port = o.port, error = %e, "path unavailable at open; will retry");
                    all.push((o.clone(), None));
                    last = Some(e);
                }
            }
        }
        if all.iter().all(|(_, c)| c.is_none()) {
            return Err(last.unwrap_or_else(|| Error::Invalid("no path given".into())));
        }
        Self::open_paths(all, nsid, policy)
    }

    /// The paths in failover order, each connected or to connect later (at
    /// least one connected).
    fn open_paths(
        all: Vec<(ConnectOptions, Option<Controller>)>,
        nsid: u32,
        policy: IoPolicy,
    ) -> Result<Self> {
        let first = all
            .iter()
            .find_map(|(_, c)| c.clone())
            .ok_or_else(|| Error::Invalid("no path given".into()))?;
        let id = first.identify_namespace(nsid)?;
        let block_size = match id.lba_size() {
            Some(bs) if id.nsze != 0 => bs,
            _ => {
                return Err(Error::Invalid(format!(
                    "namespace {nsid} is not active or has no valid LBA format"
                )))
            }
        };
        let key = NsKey {
            nsid,
            block_size,
            num_blocks: id.nsze,
        };
        let mut paths = Vec::with_capacity(all.len());
        for (o, c) in all {
            let p = PathShared::new(o.clone());
            if let Some(c) = c {
                let cid = c.identify_namespace(nsid)?;
                if ns_ids(&cid) != ns_ids(&id)
                    || cid.nsze != id.nsze
                    || cid.lba_size() != id.lba_size()
                {
                    return Err(Error::Invalid(format!(
                        "{}:{} shows a different namespace {nsid} (identifiers or geometry differ): not a path to the same namespace",
                        o.addr, o.port
                    )));
                }
                p.adopt(c, nsid, &cid)?;
            }
            paths.push(p);
        }
        let cidc = first.identify();
        let max_transfer = paths
            .iter()
            .filter_map(|p| p.controller())
            .map(|c| c.max_transfer())
            .filter(|&m| m != 0)
            .min()
            .unwrap_or(0);
        let info = BdevInfo {
            name: format!("{}/ns{nsid}", first.options().subnqn),
            block_size,
            num_blocks: id.nsze,
            max_transfer,
            volatile_write_cache: cidc.volatile_write_cache(),
            deallocate: cidc.supports_dsm(),
            write_zeroes: cidc.supports_write_zeroes(),
        };
        if paths.len() > 1 {
            for p in &paths {
                info!(nsid, path = %p.label, ana = ?p.ana_state().map(|s| s.name()), "namespace path");
            }
        }
        let shared = Arc::new(NsShared {
            key,
            paths,
            policy,
            recovery: first.options().recovery,
        });
        Ok(RemoteNamespace { shared, id, info })
    }

    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.shared.key.nsid
    }

    /// Identify Namespace data read at open.
    pub fn identify(&self) -> &IdentifyNamespace {
        &self.id
    }

    /// The current controller of the first path that has one.
    pub fn controller(&self) -> Option<Controller> {
        self.shared.paths.iter().find_map(|p| p.controller())
    }

    /// Each path's address (`addr:port`) and the namespace's ANA state
    /// there (`None`: not reported, or not connected yet).
    pub fn paths(&self) -> Vec<(String, Option<unvme_proto::ana::AnaState>)> {
        self.shared
            .paths
            .iter()
            .map(|p| (p.label.clone(), p.ana_state()))
            .collect()
    }

    /// Opens a plain I/O queue pair bound to this namespace on the best
    /// path (no recovery: for tools and tests).
    pub fn open_qpair(&self) -> Result<IoQpair> {
        let (_, mut qp) = self.shared.open_qpair()?;
        qp.set_report_timeouts(false);
        Ok(qp)
    }
}

fn bdev_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> unvme_bdev::Error {
    unvme_bdev::Error::Backend {
        what: what.to_string(),
        source: Box::new(e),
    }
}

impl Bdev for RemoteNamespace {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_queue(&self) -> unvme_bdev::Result<Box<dyn BdevQueue>> {
        let (i, qp) = self
            .shared
            .open_qpair()
            .map_err(|e| bdev_err("opening an NVMe/TCP I/O queue", e))?;
        let q = RemoteQueue::new(self.shared.clone(), i, qp)
            .map_err(|e| bdev_err("creating the queue's wait set", e))?;
        Ok(Box::new(q))
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
                self.shared.key.nsid,
                IoRequest {
                    tag: 0,
                    op: IoOp::Flush,
                    buf: None,
                    more: Vec::new(),
                },
            )
            .map_err(|e| bdev_err("flush", e))?;
        c.result.map_err(|e| bdev_err("flush", e))
    }
}
