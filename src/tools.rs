//! `unvme discover` and `unvme identify` (being written).

/// Arguments of `unvme discover`.
#[derive(clap::Args, Debug)]
pub struct DiscoverArgs {}

/// Arguments of `unvme identify`.
#[derive(clap::Args, Debug)]
pub struct IdentifyArgs {}

/// Prints the discovery log.
pub fn discover(_a: DiscoverArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("not yet".into())
}

/// Prints Identify data.
pub fn identify(_a: IdentifyArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("not yet".into())
}
