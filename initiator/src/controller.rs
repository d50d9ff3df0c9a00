//! [`Controller`]: one association with an NVMe over Fabrics controller —
//! its admin queue, keep-alive, and the I/O queue pairs opened on it.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use unvme_bdev::{IoBuf, IoCompletion, IoError, IoOp, IoRequest, SubmitError};
use unvme_proto::admin::{
    cns, cntrltype, decode_ns_id_descs, decode_ns_list, lid, opc, IdentifyController,
    IdentifyNamespace, NsIdDescriptor, IDENTIFY_DATA_SIZE, NS_LIST_MAX,
};
use unvme_proto::bringup::{self, BringUpError, ControllerAccess};
use unvme_proto::discovery::{DiscoveryLogEntry, DiscoveryLogHeader, DISCOVERY_NQN};
use unvme_proto::fabrics::{
    ConnectCmd, ConnectData, PropertyCmd, CATTR_DISABLE_SQFLOW, CNTLID_DYNAMIC,
};
use unvme_proto::nvme::{Cqe, Sqe, Status};
use unvme_proto::regs::Cap;

use crate::qpair::{
    connect_socket, initialize_connection, set_linger_zero, DataDir, NvmeCompletion, QueuePair,
    RawBusy,
};
use crate::wire;
use crate::{ConnectOptions, Error, Result};
use unvme_proto::nvm::{self, encode_dsm_ranges};

/// Admin queue entries (SQSIZE 31, as Linux).
const ADMIN_QSIZE: u16 = 32;
/// In-capsule data the admin queue accepts (NVMe/TCP 1.0 §3.3.2: 8 KiB).
const ADMIN_INCAPSULE: u32 = 8192;
/// Identify data size.
const IDENTIFY_SIZE: u32 = IDENTIFY_DATA_SIZE as u32;
/// Largest Get Log Page transfer when the controller sets no MDTS.
const LOG_CHUNK: u32 = 64 * 1024;
/// Most discovery records accepted (bounds the allocation).
const MAX_DISCOVERY_RECORDS: u64 = 4096;
/// Upper bound on waiting for shutdown to complete.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);
/// How long an I/O queue Connect answered with Command Sequence Error is
/// retried. Linux nvmet tears a queue down asynchronously after its
/// connection closes and until then rejects a Connect for the same qid
/// ("qid N has already been created"), so a qid released by a dropped
/// [`IoQpair`] and reused at once can race with that teardown.
const QID_BUSY_RETRY: Duration = Duration::from_secs(2);
/// Most data segments a block request may have
/// ([`unvme_bdev::IoRequest::more`]); each is one send item, and a send
/// writes up to 64 items at once.
pub(crate) const MAX_SEGMENTS: usize = 256;

/// Tags of admin commands; unique per process.
static ADMIN_TAG: AtomicU64 = AtomicU64::new(1 << 63);

fn next_tag() -> u64 {
    ADMIN_TAG.fetch_add(1, Ordering::Relaxed)
}

/// Turns a completion into its CQE, or the error it stands for.
fn check(c: NvmeCompletion, what: &'static str) -> Result<NvmeCompletion> {
    match (c.cqe, &c.result) {
        (Some(cqe), _) if !cqe.status().is_success() => Err(Error::Nvme {
            what,
            status: cqe.status(),
        }),
        (_, Err(e)) => Err(Error::Command {
            what,
            source: e.clone(),
        }),
        _ => Ok(c),
    }
}

/// Sends a Fabrics Connect for `qid` and returns the controller ID.
fn fabrics_connect(
    qp: &mut QueuePair,
    opts: &ConnectOptions,
    qid: u16,
    sqsize: u16,
    kato: u32,
    cntlid: u16,
) -> Result<u16> {
    let mut sqe = Sqe::default();
    ConnectCmd {
        recfmt: 0,
        qid,
        sqsize,
        cattr: CATTR_DISABLE_SQFLOW,
        kato,
    }
    .to_sqe(&mut sqe);
    let data = ConnectData {
        hostid: opts.hostid,
        cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    }
    .encode();
    let len = data.len() as u32;
    let c = qp.run(
        sqe,
        Some(IoBuf::from_slice(&data)),
        DataDir::HostToController,
        len,
        next_tag(),
        true,
    );
    let c = check(c, "Connect")?;
    Ok(c.cqe.map_or(0, |q| q.dw0 as u16))
}

fn property_get(qp: &mut QueuePair, ofst: u32, size8: bool) -> Result<u64> {
    let mut sqe = Sqe::default();
    PropertyCmd {
        size8,
        ofst,
        value: 0,
    }
    .to_sqe(false, &mut sqe);
    let c = check(
        qp.run(sqe, None, DataDir::None, 0, next_tag(), false),
        "Property Get",
    )?;
    Ok(c.cqe
        .map_or(0, |q| u64::from(q.dw0) | (u64::from(q.dw1) << 32)))
}

fn property_set(qp: &mut QueuePair, ofst: u32, value: u32) -> Result<()> {
    let mut sqe = Sqe::default();
    PropertyCmd {
        size8: false,
        ofst,
        value: u64::from(value),
    }
    .to_sqe(true, &mut sqe);
    check(
        qp.run(sqe, None, DataDir::None, 0, next_tag(), false),
        "Property Set",
    )?;
    Ok(())
}

/// The Fabrics side of [`unvme_proto::bringup`]: registers are properties
/// (Property Get / Set on the admin queue), admin commands run on the
/// admin queue pair. The Connect comes before, and I/O queues are made by
/// a Connect each ([`Controller::create_io_qpair`]).
struct Fabrics<'a> {
    q: &'a mut QueuePair,
}

impl ControllerAccess for Fabrics<'_> {
    type Error = Error;

    fn read32(&mut self, off: u32) -> Result<u32> {
        Ok(property_get(self.q, off, false)? as u32)
    }

    fn read64(&mut self, off: u32) -> Result<u64> {
        property_get(self.q, off, true)
    }

    fn write32(&mut self, off: u32, value: u32) -> Result<()> {
        property_set(self.q, off, value)
    }

    fn admin(&mut self, sqe: Sqe, data: Option<&mut [u8]>) -> Result<Cqe> {
        let what = match sqe.opc {
            opc::IDENTIFY => "Identify Controller",
            opc::SET_FEATURES => "Set Features (Number of Queues)",
            _ => "admin command",
        };
        let (buf, dir, len) = match &data {
            Some(d) => (
                Some(IoBuf::new(d.len())),
                DataDir::ControllerToHost,
                d.len() as u32,
            ),
            None => (None, DataDir::None, 0),
        };
        let c = check(self.q.run(sqe, buf, dir, len, next_tag(), false), what)?;
        if let Some(d) = data {
            let got = c.buf.as_deref().unwrap_or_default();
            if got.len() < d.len() {
                return Err(Error::Command {
                    what,
                    source: IoError::BadBuffer,
                });
            }
            d.copy_from_slice(&got[..d.len()]);
        }
        Ok(c.cqe.unwrap_or_default())
    }

    fn wait(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

impl From<BringUpError> for Error {
    fn from(e: BringUpError) -> Self {
        match e {
            BringUpError::Decode { source } => Error::Decode {
                what: "Identify Controller",
                source,
            },
            other => Error::NotReady(other.to_string()),
        }
    }
}

/// Wakes the keep-alive thread early when the controller goes away.
#[derive(Debug, Default)]
struct KaSignal {
    stop: Mutex<bool>,
    cv: Condvar,
}

/// I/O queue IDs: fresh ones first, released ones only when none is left.
#[derive(Debug)]
struct QidPool {
    next: u16,
    max: u16,
    released: Vec<u16>,
}

/// A whole discovery log page as [`Controller::discovery_log`] read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryLog {
    /// Generation Counter.
    pub genctr: u64,
    /// Record Format.
    pub recfmt: u16,
    /// The entries (NUMREC of them).
    pub entries: Vec<DiscoveryLogEntry>,
}

/// Geometry of a namespace as an I/O queue needs it.
#[derive(Clone, Copy, Debug)]
struct NsGeom {
    block_size: u32,
}

#[derive(Debug)]
struct Inner {
    opts: ConnectOptions,
    admin: Mutex<QueuePair>,
    /// The admin connection's socket, to end it without the queue's lock.
    admin_sock: TcpStream,
    cntlid: u16,
    cap: u64,
    vs: u32,
    cc: u32,
    id: IdentifyController,
    /// Largest transfer per command in bytes (MDTS and CAP.MPSMIN; 0 = no limit).
    max_transfer: u32,
    discovery: bool,
    io_queues: u16,
    qids: Mutex<QidPool>,
    io_sockets: Mutex<Vec<(u16, TcpStream)>>,
    ns_geom: Mutex<Vec<(u32, NsGeom)>>,
    shut: AtomicBool,
    /// Set once the controller is considered dead (keep-alive failure, a
    /// reset asked for by a queue): its queues end, nothing new is opened.
    failed: AtomicBool,
    ka: Arc<KaSignal>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn admin(
        &self,
        what: &'static str,
        sqe: Sqe,
        buf: Option<IoBuf>,
        dir: DataDir,
        len: u32,
    ) -> Result<NvmeCompletion> {
        let mut q = lock(&self.admin);
        if q.is_closed() {
            return Err(Error::Command {
                what,
                source: IoError::Unavailable,
            });
        }
        check(q.run(sqe, buf, dir, len, next_tag(), false), what)
    }

    fn admin_read(&self, what: &'static str, sqe: Sqe, len: u32) -> Result<IoBuf> {
        let c = self.admin(
            what,
            sqe,
            Some(IoBuf::new(len as usize)),
            DataDir::ControllerToHost,
            len,
        )?;
        c.buf.ok_or(Error::Command {
            what,
            source: IoError::BadBuffer,
        })
    }

    /// One Keep Alive, which must complete within KATO (as Linux times its
    /// keep-alive request) or the controller is as good as gone.
    fn keep_alive(&self) -> Result<()> {
        let what = "Keep Alive";
        let sqe = Sqe {
            opc: opc::KEEP_ALIVE,
            ..Sqe::default()
        };
        let limit = match self.opts.kato_ms {
            0 => self.opts.command_timeout,
            k => Duration::from_millis(u64::from(k)),
        };
        let mut q = lock(&self.admin);
        if q.is_closed() {
            return Err(Error::Command {
                what,
                source: IoError::Unavailable,
            });
        }
        check(
            q.run_timed(sqe, None, DataDir::None, 0, next_tag(), limit),
            what,
        )?;
        Ok(())
    }

    /// Declares the controller dead: ends the admin connection and every
    /// I/O connection (their queue pairs see the end at their next poll and
    /// hand their commands back as lost), abortively, so the controller
    /// does not execute commands it had not read yet. Idempotent.
    fn fail(&self, why: &str) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            addr = %self.opts.addr,
            port = self.opts.port,
            cntlid = self.cntlid,
            reason = why,
            "controller failed; ending its connections"
        );
        for (_, s) in lock(&self.io_sockets).iter() {
            set_linger_zero(s);
            let _ = s.shutdown(Shutdown::Read);
        }
        // Not through the admin queue's lock: a command may hold it for
        // its whole timeout. The queue sees the end at its next read.
        set_linger_zero(&self.admin_sock);
        let _ = self.admin_sock.shutdown(Shutdown::Read);
    }

    fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        let b = self.admin_read(
            "Identify Namespace",
            nvm::identify(cns::NS, nsid, 0),
            IDENTIFY_SIZE,
        )?;
        IdentifyNamespace::decode(&b).map_err(|source| Error::Decode {
            what: "Identify Namespace",
            source,
        })
    }

    fn ns_geom(&self, nsid: u32) -> Result<NsGeom> {
        if let Some((_, g)) = lock(&self.ns_geom).iter().find(|(n, _)| *n == nsid) {
            return Ok(*g);
        }
        let id = self.identify_namespace(nsid)?;
        if id.nsze == 0 {
            return Err(Error::Invalid(format!("namespace {nsid} is not active")));
        }
        let Some(block_size) = id.lba_size() else {
            return Err(Error::Invalid(format!(
                "namespace {nsid} has an invalid LBA format (FLBAS {:#x})",
                id.flbas
            )));
        };
        let g = NsGeom { block_size };
        lock(&self.ns_geom).push((nsid, g));
        Ok(g)
    }

    fn release_qid(&self, qid: u16) {
        lock(&self.io_sockets).retain(|(q, _)| *q != qid);
        lock(&self.qids).released.push(qid);
    }

    /// Normal shutdown (CC.SHN), bounded wait for CSTS.SHST, close every socket.
    fn shutdown(&self) -> Result<()> {
        if self.shut.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        *lock(&self.ka.stop) = true;
        self.ka.cv.notify_all();
        let mut q = lock(&self.admin);
        let mut result = Ok(());
        if !q.is_closed() {
            let limit = Cap::decode(self.cap).ready_timeout().min(SHUTDOWN_LIMIT);
            result = bringup::shutdown(&mut Fabrics { q: &mut q }, self.cc, limit);
        }
        q.shutdown();
        for (_, s) in lock(&self.io_sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        debug!(cntlid = self.cntlid, "disconnected");
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            debug!(error = %e, "shutdown on drop");
        }
    }
}

/// Decodes Identify Controller data as an admin read returned it.
fn decode_identify_controller(b: Option<&[u8]>) -> Result<IdentifyController> {
    IdentifyController::decode(b.unwrap_or_default()).map_err(|source| Error::Decode {
        what: "Identify Controller",
        source,
    })
}

fn spawn_keepalive(weak: Weak<Inner>, sig: Arc<KaSignal>, period: Duration) -> Result<()> {
    std::thread::Builder::new()
        .name("unvme-keepalive".into())
        .spawn(move || {
            let mut stop = lock(&sig.stop);
            loop {
                let (g, _) = sig
                    .cv
                    .wait_timeout(stop, period)
                    .unwrap_or_else(|e| e.into_inner());
                if *g {
                    return;
                }
                drop(g);
                let Some(inner) = weak.upgrade() else { return };
                if inner.failed.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = inner.keep_alive() {
                    warn!(error = %e, "keep alive failed");
                    if !inner.shut.load(Ordering::Acquire) {
                        inner.fail("keep alive failed");
                    }
                    return;
                }
                drop(inner);
                stop = lock(&sig.stop);
            }
        })
        .map_err(|source| Error::Io {
            what: "spawning the keep-alive thread",
            source,
        })?;
    Ok(())
}

/// An association with one controller. Cloning gives another handle to the
/// same association; it ends (normal shutdown, sockets closed) with
/// [`Controller::disconnect`] or when the last handle and the last
/// [`IoQpair`] are dropped.
#[derive(Clone, Debug)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl Controller {
    /// Connects to the controller `opts` names and brings it up: ICReq,
    /// Connect (admin queue), CAP/VS, CC.EN, CSTS.RDY, Identify Controller,
    /// and for an NVM subsystem Set Features (Number of Queues).
    pub fn connect(opts: ConnectOptions) -> Result<Controller> {
        let mut s = connect_socket(&opts)?;
        let (neg, dec) = initialize_connection(&mut s, &opts)?;
        let admin_sock = s.try_clone().map_err(|source| Error::Io {
            what: "cloning the socket",
            source,
        })?;
        let mut q = QueuePair::new(
            s,
            neg,
            dec,
            0,
            ADMIN_QSIZE,
            ADMIN_INCAPSULE,
            opts.command_timeout,
        );
        let cntlid = fabrics_connect(
            &mut q,
            &opts,
            0,
            ADMIN_QSIZE - 1,
            opts.kato_ms,
            CNTLID_DYNAMIC,
        )?;
        let is_discovery = |id: &IdentifyController| {
            id.cntrltype == cntrltype::DISCOVERY || opts.subnqn == DISCOVERY_NQN
        };
        // CAP, VS, CC.EN, CSTS.RDY, Identify Controller, Number of Queues
        // (none for a discovery controller).
        let up = bringup::bring_up(&mut Fabrics { q: &mut q }, |id| {
            if is_discovery(id) {
                0
            } else {
                u32::from(opts.num_io_queues)
            }
        })?;
        let discovery = is_discovery(&up.id);
        let (cap, vs, ccv, id) = (up.cap_raw, up.vs, up.cc, up.id);
        let max_transfer = id.max_transfer(up.cap.mpsmin);
        // At most num_io_queues, so the cast is lossless.
        let io_queues = up.io_queues as u16;
        let icdoff = id.icdoff;
        q.set_incapsule_max(ADMIN_INCAPSULE);
        debug!(
            addr = %opts.addr,
            port = opts.port,
            subnqn = %opts.subnqn,
            cntlid,
            io_queues,
            hdgst = neg.tx.hdgst,
            ddgst = neg.tx.ddgst,
            icdoff,
            "connected"
        );
        let kato = opts.kato_ms;
        let ka = Arc::new(KaSignal::default());
        let inner = Arc::new(Inner {
            admin: Mutex::new(q),
            admin_sock,
            cntlid,
            cap,
            vs,
            cc: ccv,
            discovery,
            io_queues,
            qids: Mutex::new(QidPool {
                next: 1,
                max: io_queues,
                released: Vec::new(),
            }),
            io_sockets: Mutex::new(Vec::new()),
            ns_geom: Mutex::new(Vec::new()),
            shut: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            ka: ka.clone(),
            id,
            max_transfer,
            opts,
        });
        if kato > 0 {
            let period = Duration::from_millis(u64::from(kato / 2).max(100));
            spawn_keepalive(Arc::downgrade(&inner), ka, period)?;
        }
        Ok(Controller { inner })
    }

    /// Connects to the discovery controller at `opts.addr:opts.port`
    /// (the subsystem NQN is replaced by the discovery NQN; no keep-alive).
    pub fn connect_discovery(mut opts: ConnectOptions) -> Result<Controller> {
        opts.subnqn = DISCOVERY_NQN.into();
        opts.kato_ms = 0;
        opts.num_io_queues = 0;
        Self::connect(opts)
    }

    /// The options this controller was connected with.
    pub fn options(&self) -> &ConnectOptions {
        &self.inner.opts
    }

    /// Controller ID assigned by Connect.
    pub fn cntlid(&self) -> u16 {
        self.inner.cntlid
    }

    /// The CAP property.
    pub fn cap(&self) -> u64 {
        self.inner.cap
    }

    /// The VS property.
    pub fn version(&self) -> u32 {
        self.inner.vs
    }

    /// True for a discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.inner.discovery
    }

    /// Number of I/O queues the controller granted.
    pub fn num_io_queues(&self) -> u16 {
        self.inner.io_queues
    }

    /// Identify Controller data read at connect time.
    pub fn identify(&self) -> &IdentifyController {
        &self.inner.id
    }

    /// Largest transfer per command in bytes (from MDTS and CAP.MPSMIN;
    /// 0 = no limit).
    pub fn max_transfer(&self) -> u32 {
        self.inner.max_transfer
    }

    /// Runs any admin command and returns its completion as it is (NVMe
    /// error statuses included). `data` is sent (HostToController) or filled
    /// (ControllerToHost) with its full length.
    pub fn admin_raw(&self, sqe: Sqe, data: Option<IoBuf>, dir: DataDir) -> NvmeCompletion {
        let len = data.as_ref().map_or(0, |b| b.len() as u32);
        let mut q = lock(&self.inner.admin);
        q.run(sqe, data, dir, len, next_tag(), false)
    }

    /// Reads Identify Controller afresh.
    pub fn identify_controller(&self) -> Result<IdentifyController> {
        let b = self.inner.admin_read(
            "Identify Controller",
            nvm::identify(cns::CTRL, 0, 0),
            IDENTIFY_SIZE,
        )?;
        decode_identify_controller(Some(&b))
    }

    /// Reads Identify Namespace for `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        self.inner.identify_namespace(nsid)
    }

    /// The active namespace IDs, in increasing order.
    pub fn active_namespaces(&self) -> Result<Vec<u32>> {
        let mut all = Vec::new();
        let mut start = 0u32;
        loop {
            let b = self.inner.admin_read(
                "Identify Active Namespace List",
                nvm::identify(cns::ACTIVE_NS_LIST, start, 0),
                IDENTIFY_SIZE,
            )?;
            let list = decode_ns_list(&b);
            let full = list.len() == NS_LIST_MAX;
            let last = list.last().copied();
            all.extend(list.into_iter().filter(|&n| n > start));
            match last {
                Some(l) if full && l > start && l < 0xffff_fffe => start = l,
                _ => return Ok(all),
            }
        }
    }

    /// The Namespace Identification Descriptors of `nsid`.
    pub fn ns_descriptors(&self, nsid: u32) -> Result<Vec<NsIdDescriptor>> {
        let b = self.inner.admin_read(
            "Identify Namespace Descriptors",
            nvm::identify(cns::NS_DESC_LIST, nsid, 0),
            IDENTIFY_SIZE,
        )?;
        decode_ns_id_descs(&b).map_err(|source| Error::Decode {
            what: "Namespace Identification Descriptor list",
            source,
        })
    }

    /// Reads `len` bytes of log page `lid` from byte `offset` (NSID all).
    pub fn get_log_page(&self, lid: u8, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.get_log_page_ns(lid, 0xffff_ffff, offset, len)
    }

    /// Reads `len` bytes of log page `lid` for `nsid` from byte `offset`, in
    /// commands no larger than MDTS.
    pub fn get_log_page_ns(&self, lid: u8, nsid: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let chunk = match self.max_transfer() {
            0 => LOG_CHUNK,
            m => m.min(LOG_CHUNK),
        } as usize;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(chunk);
            let n4 = n.div_ceil(4) * 4;
            let b = self.inner.admin_read(
                "Get Log Page",
                nvm::get_log_page(lid, nsid, offset + out.len() as u64, n4 as u32),
                n4 as u32,
            )?;
            out.extend_from_slice(&b[..n]);
        }
        Ok(out)
    }

    /// Reads the whole discovery log page: the header, then all records
    /// (by NUMREC), then the header again; retries if GENCTR changed.
    pub fn discovery_log(&self) -> Result<DiscoveryLog> {
        let decode_err = |source| Error::Decode {
            what: "discovery log page",
            source,
        };
        let header = || -> Result<DiscoveryLogHeader> {
            let b = self.get_log_page_ns(lid::DISCOVERY, 0, 0, DiscoveryLogHeader::SIZE)?;
            DiscoveryLogHeader::decode(&b).map_err(decode_err)
        };
        for _ in 0..10 {
            let h = header()?;
            if h.numrec > MAX_DISCOVERY_RECORDS {
                return Err(Error::Invalid(format!(
                    "discovery log claims {} records",
                    h.numrec
                )));
            }
            let n = h.numrec as usize;
            let page = if n > 0 {
                self.get_log_page_ns(
                    lid::DISCOVERY,
                    0,
                    DiscoveryLogHeader::SIZE as u64,
                    n * DiscoveryLogEntry::SIZE,
                )?
            } else {
                Vec::new()
            };
            let h2 = header()?;
            if h2.genctr != h.genctr || h2.numrec != h.numrec {
                debug!(
                    old = h.genctr,
                    new = h2.genctr,
                    "discovery log changed while reading; retrying"
                );
                continue;
            }
            return Ok(DiscoveryLog {
                genctr: h.genctr,
                recfmt: h.recfmt,
                entries: page
                    .chunks_exact(DiscoveryLogEntry::SIZE)
                    .map(DiscoveryLogEntry::decode)
                    .collect::<std::result::Result<_, _>>()
                    .map_err(decode_err)?,
            });
        }
        Err(Error::Invalid(
            "discovery log kept changing while being read".into(),
        ))
    }

    /// Get Features (current value): returns CQE dword 0.
    pub fn get_features(&self, fid: u8, nsid: u32, cdw11: u32) -> Result<u32> {
        let c = self.inner.admin(
            "Get Features",
            nvm::get_features(fid, nsid, cdw11),
            None,
            DataDir::None,
            0,
        )?;
        Ok(c.cqe.map_or(0, |c| c.dw0))
    }

    /// Set Features: returns CQE dword 0.
    pub fn set_features(&self, fid: u8, nsid: u32, cdw11: u32, save: bool) -> Result<u32> {
        let c = self.inner.admin(
            "Set Features",
            nvm::set_features(fid, nsid, cdw11, save),
            None,
            DataDir::None,
            0,
        )?;
        Ok(c.cqe.map_or(0, |c| c.dw0))
    }

    /// Sends one Keep Alive now.
    pub fn keep_alive(&self) -> Result<()> {
        self.inner.keep_alive()
    }

    /// True once the controller failed (keep-alive failure or
    /// [`Controller::fail`]); it will not serve again, connect a new one.
    pub fn is_failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// Declares the controller dead (the start of a controller reset): its
    /// admin and I/O connections end at once, abortively; every queue pair
    /// on it hands its outstanding commands back as lost
    /// ([`NvmeCompletion::lost`]).
    pub fn fail(&self, why: &str) {
        self.inner.fail(why)
    }

    /// Asks the controller to abort command `cid` of submission queue
    /// `sqid` (Abort). Returns whether the controller says it aborted it
    /// (the command then completes with Command Abort Requested).
    pub fn abort(&self, sqid: u16, cid: u16) -> Result<bool> {
        let sqe = Sqe {
            opc: opc::ABORT,
            cdw10: u32::from(sqid) | (u32::from(cid) << 16),
            ..Sqe::default()
        };
        let c = self.inner.admin("Abort", sqe, None, DataDir::None, 0)?;
        Ok(c.cqe.is_some_and(|c| c.dw0 & 1 == 0))
    }

    /// Opens an I/O queue pair on a new TCP connection (qid 1..=granted).
    pub fn create_io_qpair(&self) -> Result<IoQpair> {
        let inner = &self.inner;
        if inner.discovery || inner.shut.load(Ordering::Acquire) {
            return Err(Error::NoQueue(0));
        }
        if inner.failed.load(Ordering::Acquire) {
            return Err(Error::Command {
                what: "opening an I/O queue",
                source: IoError::Unavailable,
            });
        }
        let qid = {
            let mut p = lock(&inner.qids);
            if p.next <= p.max {
                p.next += 1;
                p.next - 1
            } else if let Some(q) = p.released.pop() {
                q
            } else {
                return Err(Error::NoQueue(inner.io_queues));
            }
        };
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match self.open_io_qpair(qid) {
                Ok(q) => return Ok(q),
                Err(Error::Nvme {
                    what: "Connect",
                    status,
                }) if status.sct == Status::COMMAND_SEQUENCE_ERROR.sct
                    && status.sc == Status::COMMAND_SEQUENCE_ERROR.sc
                    && start.elapsed() < QID_BUSY_RETRY =>
                {
                    debug!(
                        qid,
                        "I/O queue Connect: Command Sequence Error (qid still in use?); retrying"
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => {
                    inner.release_qid(qid);
                    return Err(e);
                }
            }
        }
    }

    fn open_io_qpair(&self, qid: u16) -> Result<IoQpair> {
        let inner = &self.inner;
        let opts = &inner.opts;
        let mqes = Cap::decode(inner.cap).mqes;
        let qsize = opts.io_queue_size.clamp(2, mqes.saturating_add(1).max(2));
        let mut s = connect_socket(opts)?;
        let (neg, dec) = initialize_connection(&mut s, opts)?;
        let clone = s.try_clone().map_err(|source| Error::Io {
            what: "cloning the socket",
            source,
        })?;
        let incapsule = if inner.id.icdoff == 0 {
            inner.id.incapsule_data_size()
        } else {
            0
        };
        let mut qp = QueuePair::new(s, neg, dec, qid, qsize, incapsule, opts.command_timeout);
        fabrics_connect(&mut qp, opts, qid, qsize - 1, 0, inner.cntlid)?;
        lock(&inner.io_sockets).push((qid, clone));
        debug!(qid, qsize, incapsule, "I/O queue connected");
        Ok(IoQpair {
            qp,
            ctrl: inner.clone(),
            geoms: Vec::with_capacity(8),
            max_transfer: inner.max_transfer,
        })
    }

    /// Shuts the controller down (CC.SHN normal, bounded wait for
    /// CSTS.SHST) and closes the admin and every I/O connection, including
    /// those of queue pairs still alive.
    pub fn disconnect(self) -> Result<()> {
        self.inner.shutdown()
    }
}

/// One I/O queue pair: its own TCP connection, owned and polled by one
/// thread. Submission and polling take no lock and do not allocate in
/// steady state (the first I/O to a namespace reads its geometry once).
#[derive(Debug)]
pub struct IoQpair {
    qp: QueuePair,
    ctrl: Arc<Inner>,
    geoms: Vec<(u32, NsGeom)>,
    max_transfer: u32,
}

impl IoQpair {
    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qp.qid()
    }

    /// Commands that may be outstanding at once.
    pub fn depth(&self) -> usize {
        self.qp.depth()
    }

    /// Commands submitted and not yet returned by a poll.
    pub fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }

    /// True once the connection has ended; every later command completes
    /// with [`IoError::Unavailable`].
    pub fn is_closed(&self) -> bool {
        self.qp.is_closed()
    }

    /// Ends the connection now: every outstanding command completes with
    /// [`IoError::Unavailable`] (handed out by the next poll). For a caller
    /// that must stop by a deadline whatever the controller does.
    pub fn disconnect(&mut self) {
        self.qp.shutdown();
    }

    /// Ends the connection now, abortively (a TCP reset: the controller
    /// drops what it has not read rather than executing it); every
    /// outstanding command is handed back as lost
    /// ([`NvmeCompletion::lost`]) by the next poll. Used by recovery before
    /// it submits those commands again.
    pub fn reset(&mut self) {
        self.qp.reset();
    }

    /// Makes the close of this (ended) queue pair abortive as well.
    pub(crate) fn set_aborted(&mut self) {
        self.qp.set_aborted();
    }

    /// With `on`, a command past its deadline is not completed with
    /// [`IoError::Timeout`] but reported by [`IoQpair::take_expired`] and
    /// kept outstanding, for a caller that aborts it and then resets the
    /// queue (which hands it back as lost).
    pub fn set_report_timeouts(&mut self, on: bool) {
        self.qp.set_report_timeouts(on);
    }

    /// Appends the command IDs and tags of commands past their deadline
    /// (see [`IoQpair::set_report_timeouts`]).
    pub fn take_expired(&mut self, out: &mut Vec<(u16, u64)>) {
        self.qp.take_expired(out);
    }

    /// True once the controller this queue belongs to failed.
    pub fn controller_failed(&self) -> bool {
        self.ctrl.failed.load(Ordering::Relaxed)
    }

    /// Records the block size of `nsid` so the first I/O need not ask the
    /// controller.
    pub fn register_namespace(&mut self, nsid: u32, block_size: u32) {
        self.geoms.retain(|(n, _)| *n != nsid);
        self.geoms.push((nsid, NsGeom { block_size }));
    }

    fn geom(&mut self, nsid: u32) -> Result<NsGeom> {
        if let Some((_, g)) = self.geoms.iter().find(|(n, _)| *n == nsid) {
            return Ok(*g);
        }
        let g = self.ctrl.ns_geom(nsid)?;
        self.geoms.push((nsid, g));
        Ok(g)
    }

    /// Submits a block request to namespace `nsid`. Only a full queue is
    /// refused; every other failure arrives as the request's completion.
    pub fn submit(&mut self, nsid: u32, req: IoRequest) -> std::result::Result<(), SubmitError> {
        let Some(slot) = self.qp.alloc_slot() else {
            return Err(SubmitError::Busy(req));
        };
        let IoRequest { tag, op, buf, more } = req;
        let fail = |qp: &mut QueuePair, buf, e| {
            qp.start(
                slot,
                Sqe::default(),
                buf,
                false,
                DataDir::None,
                0,
                tag,
                false,
            );
            qp.fail_now(slot, e);
        };
        let geom = match self.geom(nsid) {
            Ok(g) => g,
            Err(e) => {
                debug!(nsid, error = %e, "namespace unavailable");
                fail(&mut self.qp, buf, IoError::Unavailable);
                return Ok(());
            }
        };
        let cmd = match wire::io_command(nsid, &op, geom.block_size) {
            Ok(c) => c,
            Err(e) => {
                fail(&mut self.qp, buf, e);
                return Ok(());
            }
        };
        if !more.is_empty() && op.data_len(geom.block_size) == 0 {
            // Data segments on a request that moves no data.
            fail(&mut self.qp, buf, IoError::BadBuffer);
            return Ok(());
        }
        if let IoOp::Deallocate { ranges } = &op {
            let aux = self.qp.aux_buf(slot, cmd.len as usize);
            encode_dsm_ranges(ranges, aux);
            self.qp
                .start(slot, cmd.sqe, buf, true, cmd.dir, cmd.len, tag, false);
            return Ok(());
        }
        if cmd.dir != DataDir::None {
            if self.max_transfer != 0 && cmd.len > self.max_transfer {
                fail(&mut self.qp, buf, IoError::TooLarge);
                return Ok(());
            }
            let have =
                buf.as_ref().map_or(0, |b| b.len()) + more.iter().map(|b| b.len()).sum::<usize>();
            if buf.is_none() || have < cmd.len as usize || more.len() > MAX_SEGMENTS - 1 {
                fail(&mut self.qp, buf, IoError::BadBuffer);
                return Ok(());
            }
            self.qp.set_more(slot, more);
        }
        self.qp
            .start(slot, cmd.sqe, buf, false, cmd.dir, cmd.len, tag, false);
        Ok(())
    }

    /// Submits any NVMe command as it is (the CID and data pointer are
    /// filled in). `data` is sent or filled whole, according to `dir`.
    pub fn submit_raw(
        &mut self,
        sqe: Sqe,
        data: Option<IoBuf>,
        dir: DataDir,
        tag: u64,
    ) -> std::result::Result<(), RawBusy> {
        let Some(slot) = self.qp.alloc_slot() else {
            return Err(RawBusy { sqe, data });
        };
        let len = match dir {
            DataDir::None => 0,
            _ => data.as_ref().map_or(0, |b| b.len() as u32),
        };
        self.qp.start(slot, sqe, data, false, dir, len, tag, false);
        Ok(())
    }

    /// Makes progress (reads and handles every PDU available, then flushes
    /// pending sends) and appends finished requests to `out`. Never blocks.
    pub fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.qp.progress();
        self.qp.drain(|c| out.push(c.into_io_completion()))
    }

    /// As [`IoQpair::poll`], with the full NVMe completion of each command.
    pub fn poll_nvme(&mut self, out: &mut Vec<NvmeCompletion>) -> usize {
        self.qp.progress();
        self.qp.drain(|c| out.push(c))
    }

    /// Submits a request and polls until it completes (tools and tests).
    pub fn run_sync(&mut self, nsid: u32, req: IoRequest) -> Result<IoCompletion> {
        let tag = req.tag;
        self.submit(nsid, req).map_err(|_| Error::Command {
            what: "run_sync",
            source: IoError::Media("queue full".into()),
        })?;
        let limit = self.ctrl.opts.command_timeout + Duration::from_secs(1);
        Ok(self.qp.wait_for(tag, limit).into_io_completion())
    }

    /// Submits a raw command and polls until it completes.
    pub fn run_raw_sync(
        &mut self,
        sqe: Sqe,
        data: Option<IoBuf>,
        dir: DataDir,
        tag: u64,
    ) -> Result<NvmeCompletion> {
        self.submit_raw(sqe, data, dir, tag)
            .map_err(|_| Error::Command {
                what: "run_raw_sync",
                source: IoError::Media("queue full".into()),
            })?;
        let limit = self.ctrl.opts.command_timeout + Duration::from_secs(1);
        Ok(self.qp.wait_for(tag, limit))
    }

    /// Waits up to `ms` milliseconds for the socket to have something to
    /// read (for callers that want to sleep instead of spinning).
    pub fn wait(&self, ms: i32) {
        crate::qpair::wait_socket(self.qp.stream(), false, ms);
    }
}

impl std::os::fd::AsRawFd for IoQpair {
    /// The queue pair's socket: readable when a response may be waiting.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.qp.stream().as_raw_fd()
    }
}

impl Drop for IoQpair {
    fn drop(&mut self) {
        self.qp.shutdown();
        self.ctrl.release_qid(self.qp.qid());
    }
}
