//! `tcp-floor`: the floor of a plain TCP request/response over loopback.
//! Parses arguments and calls the library.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tcp_floor::{pin_to_cpu, run_client, serve, ClientConfig, Mode};

#[derive(Parser)]
#[command(about = "TCP request/response floor over loopback")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer requests, one connection after another.
    Server {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after serving one connection (otherwise run until SIGTERM).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Keep `depth` requests in flight for `time` seconds and report.
    Client {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes per request (at least 8).
        #[arg(long)]
        req: usize,
        /// Bytes per response (at least 8).
        #[arg(long)]
        resp: usize,
        /// Requests in flight on the connection.
        #[arg(long, default_value_t = 1)]
        depth: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        time: f64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Busy-poll non-blocking sockets (the default).
    #[arg(long, conflicts_with = "block")]
    spin: bool,
    /// Sleep in blocking socket calls.
    #[arg(long)]
    block: bool,
    /// Pin the thread to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

impl Common {
    fn mode(&self) -> Mode {
        if self.block {
            Mode::Block
        } else {
            Mode::Spin
        }
    }

    fn pin(&self) -> tcp_floor::Result<()> {
        self.cpu.map_or(Ok(()), pin_to_cpu)
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.cmd {
        Cmd::Server {
            listen,
            once,
            common,
        } => {
            common.pin()?;
            let listener = TcpListener::bind(listen)?;
            eprintln!(
                "tcp-floor server: listening on {} ({})",
                listener.local_addr()?,
                common.mode().name()
            );
            serve(&listener, common.mode(), once.then_some(1))?;
        }
        Cmd::Client {
            connect,
            req,
            resp,
            depth,
            time,
            json,
            common,
        } => {
            common.pin()?;
            let time = Duration::try_from_secs_f64(time)?;
            let cfg = ClientConfig {
                addr: connect,
                req,
                resp,
                depth,
                time,
                mode: common.mode(),
            };
            let r = run_client(&cfg)?;
            if json {
                println!("{}", r.to_json(&cfg));
            } else {
                println!(
                    "{} B -> {} B depth {} {}: {:.0} ops/s, mean {:.2} us, p50 {:.2} us, p99 {:.2} us ({} ops)",
                    req,
                    resp,
                    depth,
                    cfg.mode.name(),
                    r.ops,
                    r.mean_us,
                    r.p50_us,
                    r.p99_us,
                    r.completed
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
