//! Backend specifications as given on the command line: `ram:1G`,
//! `null:4T:4096`, `file:/var/lib/disk.img:4096:create=10G`.
//!
//! Only the built-in backends are described here. Backends of other crates
//! (a VFIO NVMe SSD, `vfio:0000:00:04.0`) add their kind of specification
//! at start-up with [`register_backend`], so this crate depends on none of
//! them; the binary decides which it links and registers.

use std::sync::{Arc, RwLock};

use crate::{Bdev, Error, FileBdev, NullBdev, RamBdev, Result};

/// Block size used when a specification does not give one.
const DEFAULT_BLOCK_SIZE: u32 = 512;

/// Parses a size in bytes: a decimal number, optionally followed by `K`,
/// `M`, `G` or `T` (case-insensitive, powers of 1024), which may itself be
/// followed by `B` or `iB` (`4096`, `64K`, `1g`, `2TiB`, `512MB`).
pub fn parse_size(s: &str) -> Result<u64> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(Error::Config(format!(
            "size {s:?} does not start with a decimal number"
        )));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| Error::Config(format!("size {s:?} is too large")))?;
    let mut chars = suffix.chars();
    let shift = match chars.next().map(|c| c.to_ascii_uppercase()) {
        None => 0,
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        Some(_) => {
            return Err(Error::Config(format!(
                "size {s:?} has an unknown suffix {suffix:?} (use K, M, G or T)"
            )))
        }
    };
    if !matches!(chars.as_str(), "" | "B" | "iB") {
        return Err(Error::Config(format!(
            "size {s:?} has an unknown suffix {suffix:?} (use K, M, G or T)"
        )));
    }
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| Error::Config(format!("size {s:?} does not fit in 64 bits")))
}

/// Parses a block size: a size (see [`parse_size`]) that fits in `u32`. The
/// backend constructors check that it is a power of two in 512..=65536.
fn parse_block_size(s: &str) -> Result<u32> {
    let bs = parse_size(s)?;
    u32::try_from(bs).map_err(|_| Error::Config(format!("block size {s:?} is too large")))
}

/// Number of blocks of `block_size` in `size` bytes; the size must be a
/// non-zero multiple of the block size.
fn blocks_of(spec: &str, size: u64, block_size: u32) -> Result<u64> {
    if block_size == 0 || size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(Error::Config(format!(
            "{spec:?}: size {size} is not a non-zero multiple of the block size {block_size}"
        )));
    }
    Ok(size / u64::from(block_size))
}

/// Opens a backend of another crate from the text after `KIND:` (`rest`);
/// the whole specification (`spec`) is the device's name.
pub type SpecOpener = Arc<dyn Fn(&str, &str) -> Result<Arc<dyn Bdev>> + Send + Sync>;

/// Backend kinds registered by other crates.
static BACKENDS: RwLock<Vec<(String, SpecOpener)>> = RwLock::new(Vec::new());

/// Makes [`from_spec`] open specifications `KIND:…` with `open` (which gets
/// the whole specification and the text after `KIND:`). Registering a kind
/// again replaces its opener; the built-in kinds (`ram`, `null`, `file`)
/// cannot be replaced and are refused with [`Error::Config`].
pub fn register_backend(kind: &str, open: SpecOpener) -> Result<()> {
    if matches!(kind, "ram" | "null" | "file") || kind.is_empty() || kind.contains(':') {
        return Err(Error::Config(format!(
            "backend kind {kind:?} cannot be registered"
        )));
    }
    let mut all = BACKENDS.write().unwrap_or_else(|e| e.into_inner());
    all.retain(|(k, _)| k != kind);
    all.push((kind.to_string(), open));
    Ok(())
}

/// The opener registered for `kind`, if any.
fn registered(kind: &str) -> Option<SpecOpener> {
    let all = BACKENDS.read().unwrap_or_else(|e| e.into_inner());
    all.iter().find(|(k, _)| k == kind).map(|(_, o)| o.clone())
}

/// Opens a backend from its specification:
///
/// - `ram:SIZE[:BS]`: a [`RamBdev`] of SIZE bytes;
/// - `null:SIZE[:BS]`: a [`NullBdev`] of SIZE bytes;
/// - `file:PATH[:BS][:create=SIZE]`: a [`FileBdev`] on PATH, created or
///   extended to SIZE bytes if `create=` is given.
///
/// - `KIND:…` for a kind another crate added with [`register_backend`]
///   (`vfio:DDDD:BB:DD.F[:NSID]` when the binary links the VFIO driver).
///
/// SIZE is as [`parse_size`] reads it; BS, the block size, defaults to 512.
/// A PATH may contain `:`, but a trailing `:` component that starts with a
/// digit is taken as the block size. The device's name is the specification.
/// Malformed specifications fail with [`Error::Config`]; a file that cannot
/// be opened fails with [`Error::Io`].
pub fn from_spec(spec: &str) -> Result<Arc<dyn Bdev>> {
    let (kind, rest) = spec.split_once(':').ok_or_else(|| {
        Error::Config(format!(
            "{spec:?}: expected ram:SIZE, null:SIZE or file:PATH"
        ))
    })?;
    match kind {
        "ram" | "null" => {
            let mut parts = rest.split(':');
            let size = parse_size(parts.next().unwrap_or_default())?;
            let block_size = parts
                .next()
                .map(parse_block_size)
                .transpose()?
                .unwrap_or(DEFAULT_BLOCK_SIZE);
            if let Some(extra) = parts.next() {
                return Err(Error::Config(format!(
                    "{spec:?}: unexpected {extra:?} after the block size"
                )));
            }
            let num_blocks = blocks_of(spec, size, block_size)?;
            if kind == "ram" {
                Ok(Arc::new(RamBdev::new(spec, num_blocks, block_size)?))
            } else {
                Ok(Arc::new(NullBdev::new(spec, num_blocks, block_size)?))
            }
        }
        "file" => {
            let mut path = rest;
            let mut create_size = None;
            let mut block_size = None;
            // Peel optional trailing components off the right, so a path may
            // itself contain ':'.
            while let Some((head, last)) = path.rsplit_once(':') {
                if let Some(size) = last.strip_prefix("create=") {
                    if create_size.is_some() {
                        return Err(Error::Config(format!("{spec:?}: create= given twice")));
                    }
                    create_size = Some(parse_size(size)?);
                } else if last.starts_with(|c: char| c.is_ascii_digit()) && block_size.is_none() {
                    block_size = Some(parse_block_size(last)?);
                } else {
                    break;
                }
                path = head;
            }
            if path.is_empty() {
                return Err(Error::Config(format!("{spec:?}: the file path is empty")));
            }
            if create_size == Some(0) {
                return Err(Error::Config(format!(
                    "{spec:?}: create=0 makes an empty device"
                )));
            }
            let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
            Ok(Arc::new(FileBdev::open(path, block_size, create_size)?))
        }
        other => match registered(other) {
            Some(open) => open(spec, rest),
            None if other == "vfio" => Err(Error::Config(format!(
                "{spec:?}: this build has no VFIO support (the unvme binary's cargo feature `vfio`)"
            ))),
            None => Err(Error::Config(format!(
                "{spec:?}: unknown backend {other:?} (use ram, null or file)"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::tests::TempPath;

    fn config_err<T>(r: Result<T>) -> String {
        match r {
            Err(Error::Config(msg)) => msg,
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected a config error, got success"),
        }
    }

    #[test]
    fn sizes_accept_plain_bytes_and_binary_suffixes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("3M").unwrap(), 3 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("16777215T").unwrap(), 16777215 << 40);
    }

    #[test]
    fn malformed_or_overflowing_sizes_are_config_errors() {
        for bad in [
            "",
            "K",
            "-1",
            "1.5G",
            "1X",
            "1KX",
            "1 K",
            " 1",
            "1Kb",
            "16777216T",
            "99999999999999999999",
        ] {
            let msg = config_err(parse_size(bad));
            assert!(msg.contains("size"), "{bad:?}: {msg}");
        }
    }

    #[test]
    fn ram_and_null_specs_give_the_requested_geometry() {
        let ram = from_spec("ram:1M").unwrap();
        assert_eq!((ram.info().num_blocks, ram.info().block_size), (2048, 512));
        assert_eq!(ram.info().name, "ram:1M");
        let ram = from_spec("ram:64K:4K").unwrap();
        assert_eq!((ram.info().num_blocks, ram.info().block_size), (16, 4096));
        let null = from_spec("null:1T:4096").unwrap();
        assert_eq!(null.info().size_bytes(), 1 << 40);
        assert_eq!(null.info().block_size, 4096);
    }

    #[test]
    fn malformed_specs_are_config_errors() {
        for bad in [
            "ram",
            "ram:",
            "ram:0",
            "ram:1000",
            "ram:1M:1000",
            "ram:1M:128",
            "ram:1M:4096:9",
            "null:abc",
            "disk:1G",
            "file:",
            "file::512",
            "file:/tmp/x:create=0",
            "file:/tmp/x:create=1Q",
            "file:/tmp/x:create=1M:create=2M",
            "file:/tmp/x:9X:create=1M",
        ] {
            config_err(from_spec(bad));
        }
    }

    #[test]
    fn file_spec_takes_block_size_and_create_size() {
        let path = TempPath::new("spec");
        let spec = format!("file:{}:4K:create=1M", path.0.display());
        let dev = from_spec(&spec).unwrap();
        assert_eq!((dev.info().num_blocks, dev.info().block_size), (256, 4096));
        drop(dev);
        let dev = from_spec(&format!("file:{}", path.0.display())).unwrap();
        assert_eq!((dev.info().num_blocks, dev.info().block_size), (2048, 512));
    }

    #[test]
    fn registered_kinds_are_opened_by_their_opener_and_builtins_stay() {
        let open: SpecOpener = Arc::new(|spec: &str, rest: &str| {
            let size = parse_size(rest)?;
            Ok(Arc::new(RamBdev::new(spec, size / 512, 512)?) as Arc<dyn Bdev>)
        });
        config_err(from_spec("test-kind:64K"));
        register_backend("test-kind", open.clone()).unwrap();
        let dev = from_spec("test-kind:64K").unwrap();
        assert_eq!(
            (dev.info().name.as_str(), dev.info().num_blocks),
            ("test-kind:64K", 128)
        );
        config_err(from_spec("test-kind:64Q"));
        for builtin in ["ram", "null", "file", "", "a:b"] {
            config_err(register_backend(builtin, open.clone()));
        }
        assert_eq!(from_spec("ram:1M").unwrap().info().num_blocks, 2048);
        let msg = config_err(from_spec("vfio:0000:00:04.0"));
        assert!(msg.contains("no VFIO support"), "{msg}");
    }

    #[test]
    fn file_spec_for_a_missing_file_without_create_is_an_io_error() {
        let path = TempPath::new("spec-missing");
        let r = from_spec(&format!("file:{}", path.0.display()));
        assert!(matches!(r, Err(Error::Io { .. })));
    }
}
