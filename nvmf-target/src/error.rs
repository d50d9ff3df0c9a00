//! The target's error type: what can fail while setting a target up
//! (sockets, threads, backends, configuration). Errors on the wire are NVMe
//! statuses and Fatal Error Statuses, not these.

/// Errors of the target.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A socket or thread could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A backend could not be opened.
    #[error("namespace {spec}: {source}")]
    Bdev {
        /// The namespace's backend spec.
        spec: String,
        /// The backend's error.
        #[source]
        source: unvme_bdev::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The configuration file is not valid TOML for a target.
    #[error("invalid configuration file: {0}")]
    Toml(#[source] toml::de::Error),
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
