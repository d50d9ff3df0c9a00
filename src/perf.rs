//! `unvme perf` (being written).

/// Arguments of `unvme perf`.
#[derive(clap::Args, Debug)]
pub struct PerfArgs {}

/// Runs the benchmark.
pub fn run(_a: PerfArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("not yet".into())
}
