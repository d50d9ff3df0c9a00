//! Connection arguments shared by the subcommands that reach a target
//! (`perf`, `identify`).

use std::time::Duration;

use unvme_initiator::ConnectOptions;

/// Where the target is and how to talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Target address (host name or IP).
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: String,
    /// Target TCP port.
    #[arg(long, default_value_t = unvme_proto::DEFAULT_PORT)]
    pub port: u16,
    /// Subsystem NQN.
    #[arg(long, default_value = unvme_proto::DEFAULT_SUBNQN)]
    pub nqn: String,
    /// Host NQN (default: a per-process UUID NQN, as nvme-cli generates).
    #[arg(long)]
    pub hostnqn: Option<String>,
    /// Ask for header digests.
    #[arg(long)]
    pub hdr_digest: bool,
    /// Ask for data digests.
    #[arg(long)]
    pub data_digest: bool,
    /// Keep Alive Timeout in milliseconds (0 disables keep-alive).
    #[arg(long)]
    pub kato_ms: Option<u32>,
    /// Per-command timeout in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
}

impl ConnectArgs {
    /// The initiator's connection options for these arguments.
    pub fn options(&self) -> ConnectOptions {
        let mut o = ConnectOptions {
            addr: self.addr.clone(),
            port: self.port,
            subnqn: self.nqn.clone(),
            hdr_digest: self.hdr_digest,
            data_digest: self.data_digest,
            ..ConnectOptions::default()
        };
        if let Some(h) = &self.hostnqn {
            o.hostnqn = h.clone();
        }
        if let Some(k) = self.kato_ms {
            o.kato_ms = k;
        }
        if let Some(t) = self.timeout_ms {
            o.command_timeout = Duration::from_millis(t.max(1));
        }
        o
    }
}
