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
    Bundle(outpost_bundle::BundleError),
    /// The state database failed.
    #[error("state store: {0}")]
    Store(sled::Error),
    /// The database (PostgreSQL) failed or cannot be reached; the request may succeed later.
    #[error("database: {0}")]
    Database(String),
    /// This replica does not hold the publishing role (another replica on the same database
    /// does, named when known): push, deploy and roll out through that one.
    #[error("this replica does not hold the publishing role{}; send it to the replica that does", .0.as_ref().map(|h| format!(" (`{h}` does)")).unwrap_or_default())]
    NotPublishing(Option<String>),
    /// A write forwarded to the replica that holds the publishing role got no answer.
    #[error("{0}")]
    Forward(String),
    /// Stored data could not be read back.
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// A protocol message could not be made.
    #[error("{0}")]
    Proto(outpost_proto::ProtoError),
    /// File system trouble.
    #[error("{0}")]
    Io(std::io::Error),
}

// The wrapped error's text is part of each message (the HTTP API shows only the message), so
// these are not `#[source]`s: a printed error chain would repeat them.
macro_rules! from_error {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for FleetError {
            fn from(e: $ty) -> Self {
                FleetError::$variant(e)
            }
        }
    )*};
}

from_error!(
    Bundle(outpost_bundle::BundleError),
    Store(sled::Error),
    Proto(outpost_proto::ProtoError),
    Io(std::io::Error),
);

/// Fleet result.
pub type Result<T, E = FleetError> = std::result::Result<T, E>;
