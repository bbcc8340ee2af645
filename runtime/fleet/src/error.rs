//! Fleet errors.

/// Everything that can go wrong in the fleet manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Bad configuration or arguments.
    #[error("{0}")]
    Config(String),
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// No such device, bundle or artifact.
    #[error("{0} not found")]
    NotFound(String),
    /// A pushed bundle failed verification.
    #[error("bundle refused: {0}")]
    Bundle(#[from] outpost_bundle::BundleError),
    /// The state database failed.
    #[error("state store: {0}")]
    Store(#[from] sled::Error),
    /// Stored data could not be read back.
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// File system trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Fleet result.
pub type Result<T, E = FleetError> = std::result::Result<T, E>;
