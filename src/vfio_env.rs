//! The VFIO driver's settings from the environment: the library reads none
//! itself, so the binary turns `UNVME_VFIO_DMA_POOL` and
//! `UNVME_VFIO_INJECT_DISABLE_MS` into [`VfioOptions`] and registers the
//! `vfio:` backend kind with them before any subcommand runs.

use std::time::Duration;

use unvme_nvme_vfio::VfioOptions;

/// Bytes of each device's DMA buffer pool, e.g. `64M`; `0` turns the
/// zero-copy path off.
const DMA_POOL_ENV: &str = "UNVME_VFIO_DMA_POOL";
/// Fault injection: clear CC.EN on the live controller this many
/// milliseconds after it opens.
const INJECT_DISABLE_ENV: &str = "UNVME_VFIO_INJECT_DISABLE_MS";

/// [`VfioOptions`] from `get` (the environment in the binary); a value that
/// does not parse is logged and ignored.
fn options(get: impl Fn(&str) -> Option<String>) -> VfioOptions {
    let mut o = VfioOptions::default();
    if let Some(v) = get(DMA_POOL_ENV) {
        match unvme_bdev::parse_size(v.trim()) {
            Ok(n) => o.dma_pool_size = usize::try_from(n).unwrap_or(usize::MAX),
            Err(e) => tracing::warn!("{DMA_POOL_ENV} ignored: {e}"),
        }
    }
    if let Some(v) = get(INJECT_DISABLE_ENV) {
        match v.trim().parse::<u64>() {
            Ok(ms) => o.inject_disable_after = Some(Duration::from_millis(ms)),
            Err(_) => {
                tracing::warn!("ignoring {INJECT_DISABLE_ENV}={v:?}: not a number of milliseconds")
            }
        }
    }
    o
}

/// Makes `vfio:` specifications open with the driver and the environment's
/// settings.
pub fn register() {
    unvme_nvme_vfio::register(options(|k| std::env::var(k).ok()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_values_become_options_and_bad_ones_are_ignored() {
        let none = options(|_| None);
        assert_eq!(none, VfioOptions::default());
        let set = options(|k| match k {
            DMA_POOL_ENV => Some("16M".into()),
            INJECT_DISABLE_ENV => Some(" 1500 ".into()),
            _ => None,
        });
        assert_eq!(set.dma_pool_size, 16 << 20);
        assert_eq!(set.inject_disable_after, Some(Duration::from_millis(1500)));
        let off = options(|k| (k == DMA_POOL_ENV).then(|| "0".into()));
        assert_eq!(off.dma_pool_size, 0);
        let bad = options(|_| Some("soon".into()));
        assert_eq!(bad, VfioOptions::default());
    }
}
