//! Connection arguments shared by the subcommands that reach a target
//! (`perf`, `identify`, `nbd`, `vhost-blk`).

use std::time::Duration;

use unvme_initiator::{ConnectOptions, IoPolicy, Recovery};

/// Where the target is and how to talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Target address (host name or IP). Repeat it (with --port) for more
    /// paths to the same subsystem (multipath: the bridges use them all).
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: Vec<String>,
    /// Target TCP port. Repeat it for more paths: ports pair with
    /// addresses in order, and a single address or port applies to all.
    #[arg(long, default_value = "4420")]
    pub port: Vec<u16>,
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
    /// Per-command timeout in milliseconds (then Abort, then a controller
    /// reset).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Seconds without a working connection after which the controller is
    /// declared lost and I/O fails (until it is back); -1: never (as
    /// `nvme connect --ctrl-loss-tmo`).
    #[arg(long, value_name = "SECS", allow_negative_numbers = true,
          default_value_t = secs(Recovery::default().ctrl_loss_tmo))]
    pub ctrl_loss_tmo: f64,
    /// Seconds between reconnection attempts (the first is immediate).
    #[arg(long, value_name = "SECS",
          default_value_t = Recovery::default().reconnect_delay.as_secs_f64())]
    pub reconnect_delay: f64,
    /// Seconds without a working connection after which held I/O fails
    /// (the controller is still reconnected); -1: off, hold until lost.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true,
          default_value_t = secs(Recovery::default().fast_io_fail_tmo))]
    pub fast_io_fail_tmo: f64,
    /// Retries of a command the controller failed with a retryable status.
    #[arg(long, default_value_t = Recovery::default().max_retries)]
    pub max_retries: u32,
    /// How I/O is spread over several paths: failover (the first usable
    /// path in the order given, the best ANA state first), round-robin or
    /// queue-depth.
    #[arg(long, default_value = "failover")]
    pub iopolicy: IoPolicy,
}

/// A timeout as the flags show it (-1: none).
fn secs(d: Option<Duration>) -> f64 {
    d.map_or(-1.0, |d| d.as_secs_f64())
}

/// A timeout flag's value (negative: none).
fn timeout(s: f64) -> Option<Duration> {
    (s >= 0.0).then(|| Duration::from_secs_f64(s.min(1e9)))
}

impl ConnectArgs {
    /// The initiator's connection options for the first path.
    pub fn options(&self) -> ConnectOptions {
        let mut o = ConnectOptions {
            addr: self.addr[0].clone(),
            port: self.port[0],
            subnqn: self.nqn.clone(),
            hdr_digest: self.hdr_digest,
            data_digest: self.data_digest,
            recovery: Recovery {
                ctrl_loss_tmo: timeout(self.ctrl_loss_tmo),
                reconnect_delay: timeout(self.reconnect_delay).unwrap_or_default(),
                fast_io_fail_tmo: timeout(self.fast_io_fail_tmo),
                max_retries: self.max_retries,
            },
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

    /// The options of every path given, in order.
    pub fn paths(&self) -> Result<Vec<ConnectOptions>, String> {
        let (na, np) = (self.addr.len(), self.port.len());
        let n = na.max(np);
        if na != np && na != 1 && np != 1 {
            return Err(format!(
                "{na} --addr and {np} --port: give one of them once, or both equally often"
            ));
        }
        let base = self.options();
        Ok((0..n)
            .map(|i| ConnectOptions {
                addr: self.addr[if na == 1 { 0 } else { i }].clone(),
                port: self.port[if np == 1 { 0 } else { i }],
                ..base.clone()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: ConnectArgs,
    }

    fn parse(args: &[&str]) -> ConnectArgs {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("parses")
            .c
    }

    #[test]
    fn defaults_are_one_path_to_the_default_port_with_the_library_recovery() {
        let c = parse(&[]);
        let p = c.paths().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].port, unvme_proto::DEFAULT_PORT);
        assert_eq!(p[0].recovery, Recovery::default());
    }

    #[test]
    fn paths_pair_addresses_and_ports_and_timeouts_parse_like_nvme_cli() {
        let c = parse(&[
            "--port",
            "4420",
            "--port",
            "4421",
            "--ctrl-loss-tmo",
            "-1",
            "--fast-io-fail-tmo",
            "0.5",
            "--reconnect-delay",
            "2",
            "--iopolicy",
            "round-robin",
        ]);
        let p = c.paths().unwrap();
        assert_eq!(
            p.iter()
                .map(|o| (o.addr.as_str(), o.port))
                .collect::<Vec<_>>(),
            [("127.0.0.1", 4420), ("127.0.0.1", 4421)]
        );
        assert_eq!(p[1].recovery.ctrl_loss_tmo, None);
        assert_eq!(
            p[1].recovery.fast_io_fail_tmo,
            Some(Duration::from_millis(500))
        );
        assert_eq!(p[1].recovery.reconnect_delay, Duration::from_secs(2));
        assert_eq!(c.iopolicy, IoPolicy::RoundRobin);
        let c = parse(&[
            "--addr", "a", "--addr", "b", "--addr", "c", "--port", "1", "--port", "2",
        ]);
        assert!(c.paths().is_err(), "3 addresses and 2 ports do not pair");
    }
}
