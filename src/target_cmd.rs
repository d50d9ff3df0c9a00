//! `unvme target` (being written).

/// Arguments of `unvme target`.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {}

/// Runs the target until SIGINT/SIGTERM.
pub fn run(_a: TargetArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("not yet".into())
}
