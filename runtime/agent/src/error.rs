//! The agent's errors.

/// Why the agent could not start or keep its store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The fleet configuration is invalid.
    #[error("invalid fleet configuration: {0}")]
    Config(String),
    /// The agent's database failed.
    #[error("agent database error: {0}")]
    Store(sled::Error),
    /// The agent's database holds something it should not.
    #[error("agent database is inconsistent: {0}")]
    Corrupt(String),
    /// Too little room on the disk for a write: nothing was written.
    #[error(
        "the disk is full: the agent's store in `{}` needs {wanted} bytes free (4 MiB kept for \
         its database), {free} are",
        dir.display()
    )]
    DiskFull {
        /// Bytes it needs free.
        wanted: u64,
        /// Bytes free.
        free: u64,
        /// The store's directory.
        dir: std::path::PathBuf,
    },
}

// The wrapped error's text is part of the message, so it is not a `#[source]` as well.
impl From<sled::Error> for AgentError {
    fn from(e: sled::Error) -> Self {
        AgentError::Store(e)
    }
}

/// Result alias for this crate.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
