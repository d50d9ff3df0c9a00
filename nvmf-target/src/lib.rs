//! The unvme NVMe/TCP target: a listener, N poll-mode reactor threads that
//! each own their connections, the controller model of the NVMe over Fabrics
//! specification, and the discovery service.
//!
//! Architecture (see DESIGN.md): an acceptor thread hands each new TCP
//! connection to one reactor, round-robin. From then on the connection —
//! its PDU decoder, its command slots, its buffers — belongs to that reactor
//! thread alone, and every namespace is reached through a
//! [`unvme_bdev::BdevQueue`] that the reactor opened for itself, so the I/O
//! path takes no lock. State shared by several connections of one controller
//! (its registers, keep-alive timer, queue count) lives in
//! [`subsystem::CtrlShared`] behind a mutex that only admin commands, Connect
//! and once-per-tick checks touch.
//!
//! Reactors spin on their sockets (epoll with a zero timeout, then reads and
//! one writev per connection per turn) while work arrives, and fall back to
//! a blocking epoll wait after `spin_us` of idleness, so an idle target costs
//! no CPU.
//!
//! This crate does not parse the command line (see the `unvme` binary) and
//! does not implement backends (see `unvme-bdev`).

#![deny(missing_docs)]

mod config;
mod ctrlr;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod namespace;
mod pool;
mod queues;
mod reactor;
mod subsystem;
mod tcp;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::{
    ana_state_name, parse_ana_state, parse_hex, AnaGroupState, ListenerConfig, NamespaceConfig,
    SubsystemConfig, TargetConfig, ANA_GROUP_MAX, CNTLID_MAX, CNTLID_MIN,
};
pub use error::{Error, Result};
pub use unvme_proto::ana::AnaState;

use error::io_err;

/// A running target. Dropping it does not stop it; call [`Target::shutdown`].
pub struct Target {
    stop: Arc<AtomicBool>,
    reactors: Vec<JoinHandle<()>>,
    acceptors: Vec<JoinHandle<()>>,
    wakers: Vec<Arc<mio::Waker>>,
    local_addrs: Vec<SocketAddr>,
    subsystems: Arc<subsystem::Subsystems>,
}

impl Target {
    /// Opens the namespaces, binds the listeners and starts the reactors.
    pub fn start(cfg: TargetConfig) -> Result<Target> {
        cfg.validate()?;
        let subsystems = Arc::new(subsystem::Subsystems::from_config(&cfg)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for (addr, _) in cfg.ports() {
            let l = TcpListener::bind(addr).map_err(io_err(format!("bind {addr}")))?;
            let la = l.local_addr().map_err(io_err("local_addr"))?;
            tracing::info!(%la, "listening");
            local_addrs.push(la);
            listeners.push(l);
        }
        subsystems.set_listen_addrs(&local_addrs);
        let params = Arc::new(config::Params::from_config(&cfg));
        let mut reactors = Vec::new();
        let mut inboxes = Vec::new();
        let mut wakers = Vec::new();
        for i in 0..cfg.reactors.max(1) {
            let cpu = cfg.cpus.as_ref().and_then(|c| c.get(i % c.len()).copied());
            let (r, inbox, waker) =
                reactor::Reactor::new(i, params.clone(), subsystems.clone(), stop.clone())?;
            wakers.push(waker.clone());
            inboxes.push((inbox, waker));
            let h = std::thread::Builder::new()
                .name(format!("reactor{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        reactor::pin_to_cpu(cpu);
                    }
                    r.run()
                })
                .map_err(io_err("spawn reactor"))?;
            reactors.push(h);
        }
        let inboxes = Arc::new(inboxes);
        let mut acceptors = Vec::new();
        for (port, l) in listeners.into_iter().enumerate() {
            let inboxes = inboxes.clone();
            let stop = stop.clone();
            l.set_nonblocking(true)
                .map_err(io_err("listener nonblocking"))?;
            let h = std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || reactor::accept_loop(l, port as u16, inboxes, stop))
                .map_err(io_err("spawn acceptor"))?;
            acceptors.push(h);
        }
        Ok(Target {
            stop,
            reactors,
            acceptors,
            wakers,
            local_addrs,
            subsystems,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Sets the ANA state of ANA group `group` (or, with `None`, of every
    /// group) on the listener bound to `listener`, in subsystem `subnqn`
    /// (or in every subsystem). Every controller on that listener whose
    /// host enabled ANA change notices gets an Asynchronous Event (Notice,
    /// ANA change, log page 0Ch) and reads the new states from the ANA log;
    /// I/O to a namespace of a group that is not accessible there completes
    /// with an ANA status. For the control plane.
    pub fn set_ana_state(
        &self,
        subnqn: Option<&str>,
        listener: SocketAddr,
        group: Option<u32>,
        state: AnaState,
    ) -> Result<()> {
        let port = self
            .local_addrs
            .iter()
            .position(|a| *a == listener)
            .ok_or_else(|| Error::Config(format!("no listener {listener}")))?;
        let mut found = false;
        for s in self.subsystems.list.iter().filter(|s| !s.is_discovery) {
            if subnqn.is_some_and(|n| n != s.nqn) {
                continue;
            }
            found = true;
            if !s.set_ana_state(port as u16, group, state) {
                return Err(Error::Config(format!(
                    "ANA group {group:?} outside 1..={ANA_GROUP_MAX}"
                )));
            }
        }
        if !found {
            return Err(Error::Config(format!("no subsystem {subnqn:?}")));
        }
        for w in &self.wakers {
            let _ = w.wake();
        }
        Ok(())
    }

    /// A flag that, once set, makes the target stop (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Blocks until the stop flag is set, then shuts down.
    pub fn wait(self) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.shutdown();
    }

    /// Stops accepting, closes every connection, joins the threads and
    /// flushes the backends.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &self.wakers {
            let _ = w.wake();
        }
        for h in self.acceptors {
            let _ = h.join();
        }
        for h in self.reactors {
            let _ = h.join();
        }
        self.subsystems.flush_all();
        tracing::info!("target stopped");
    }
}
