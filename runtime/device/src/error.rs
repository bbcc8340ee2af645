//! Errors: [`HostError`] for the operator (install, activate, start-up), [`InferError`] for
//! one request, mapped to an HTTP status by the API.

use outpost_bundle::BundleError;

/// Why an operation on the device failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A bundle was rejected.
    #[error("bundle rejected: {0}")]
    Bundle(BundleError),
    /// The state database failed.
    #[error("state database error: {0}")]
    Store(sled::Error),
    /// Too little room on the disk for a write (507): nothing was written.
    #[error(
        "the disk is full: {what} needs {wanted} bytes free on the file system of `{}` \
         (its own size and 4 MiB for the state database), {free} are; free some space and \
         try again",
        dir.display()
    )]
    DiskFull {
        /// What was refused.
        what: String,
        /// Bytes it needs free.
        wanted: u64,
        /// Bytes free.
        free: u64,
        /// The data directory.
        dir: std::path::PathBuf,
    },
    /// The state database holds something it should not.
    #[error("state database is inconsistent: {0}")]
    Corrupt(String),
    /// The guest module does not compile or does not fit the contract.
    #[error("guest of {model} {version} cannot be loaded: {reason}")]
    Guest {
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// Why.
        reason: String,
    },
    /// An ONNX model cannot be loaded by tract.
    #[error("ONNX model `{onnx}` of {model} {version} cannot be loaded: {reason}")]
    Onnx {
        /// Bundle model name.
        model: String,
        /// Bundle version.
        version: String,
        /// ONNX model name in the bundle.
        onnx: String,
        /// tract's reason.
        reason: String,
    },
    /// The warm-up request failed, so the version was not activated.
    #[error("{model} {version} failed its warm-up request: {reason}")]
    WarmUp {
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// Why.
        reason: String,
    },
    /// No such model is installed.
    #[error("model `{0}` is not installed")]
    UnknownModel(String),
    /// No such version of the model is installed.
    #[error("version {version} of model `{model}` is not installed")]
    UnknownVersion {
        /// Model name.
        model: String,
        /// Version asked for.
        version: String,
    },
    /// The version's security counter is below the highest accepted for the model.
    #[error(
        "{model} {version} has security counter {counter}, below {highest} (already accepted): it may not run again"
    )]
    Revoked {
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// Its counter.
        counter: u64,
        /// Highest accepted.
        highest: u64,
    },
    /// The active version cannot be removed.
    #[error("{model} {version} is active; activate another version first")]
    RemoveActive {
        /// Model name.
        model: String,
        /// Model version.
        version: String,
    },
    /// A traffic policy that cannot be applied (400).
    #[error("traffic policy refused: {0}")]
    Policy(String),
    /// A version the traffic policy sends requests to cannot be removed (409).
    #[error("{model} {version} is in the traffic policy; change the policy first")]
    RemoveRouted {
        /// Model name.
        model: String,
        /// Model version.
        version: String,
    },
    /// Reading or writing a file failed.
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// The fleet agent could not start.
    #[error("fleet agent: {0}")]
    Agent(outpost_agent::AgentError),
}

// The wrapped error's text is part of each message (the HTTP API shows only the message), so
// these are not `#[source]`s: a printed error chain would repeat them.
impl From<BundleError> for HostError {
    fn from(e: BundleError) -> Self {
        HostError::Bundle(e)
    }
}

impl From<sled::Error> for HostError {
    fn from(e: sled::Error) -> Self {
        HostError::Store(e)
    }
}

impl From<std::io::Error> for HostError {
    fn from(e: std::io::Error) -> Self {
        HostError::Io(e)
    }
}

/// Result alias for this crate.
pub type Result<T, E = HostError> = std::result::Result<T, E>;

/// Why one inference request failed. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// No such model (404).
    #[error("model `{0}` not found")]
    UnknownModel(String),
    /// No such version (404).
    #[error("version {version} of model `{model}` not found")]
    UnknownVersion {
        /// Model name.
        model: String,
        /// Version asked for.
        version: String,
    },
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than allowed (413).
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
    /// Too many requests are running (503).
    #[error("busy: {0} requests are running; retry later")]
    Busy(usize),
    /// The bytes in flight are at the device's budget (503).
    #[error(
        "busy: the device holds its {0} bytes of requests and responses in flight; retry later"
    )]
    BudgetBusy(u64),
    /// A request that could never fit in the budget (413).
    #[error(
        "{what} would take {bytes} bytes in flight, more than the device's max_inflight_bytes ({budget})"
    )]
    OverBudget {
        /// What would not fit.
        what: String,
        /// How much it needs.
        bytes: u64,
        /// The whole budget.
        budget: u64,
    },
    /// A JSON response longer than allowed (400): the client can ask for binary outputs.
    #[error("{}", outpost_oip::OipError::ResponseTooLarge { limit: *limit })]
    ResponseTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The guest refused the input (400).
    #[error("{0}")]
    InvalidInput(String),
    /// The guest reported an error (500).
    #[error("model error: {0}")]
    Internal(String),
    /// The guest exceeded its deadline (500).
    #[error("model exceeded its deadline of {0} ms")]
    Deadline(u64),
    /// The guest exceeded its memory limit (500).
    #[error("model exceeded its memory limit of {0} bytes")]
    Memory(u64),
    /// The guest trapped (500).
    #[error("model trapped: {0}")]
    Trap(String),
    /// A streaming session ended (a version swap, a failed call): its state is gone (409).
    #[error("{0}")]
    SessionEnded(String),
    /// A new streaming session would pass the model's cap on live sessions (429).
    #[error(
        "model `{model}` has {max} live sessions, its limit; end one by letting it idle for \
         {idle_timeout_s} s, or retry later"
    )]
    TooManySessions {
        /// Model name.
        model: String,
        /// The cap.
        max: u32,
        /// Idle time that ends a session.
        idle_timeout_s: u64,
    },
    /// A new streaming session would pass the device's bound on session memory (429).
    #[error(
        "the device's streaming sessions hold {bytes} bytes of guest memory, its \
         guest_caps.session_memory_bytes ({cap}); retry when sessions have ended"
    )]
    SessionMemory {
        /// Bytes the live sessions hold.
        bytes: u64,
        /// The bound.
        cap: u64,
    },
    /// A streaming session is answering another call (409): one call at a time.
    #[error("session `{0}` is answering another call; a session takes one call at a time")]
    SessionBusy(String),
}

impl InferError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            InferError::UnknownModel(_) | InferError::UnknownVersion { .. } => 404,
            InferError::BadRequest(_)
            | InferError::InvalidInput(_)
            | InferError::ResponseTooLarge { .. } => 400,
            InferError::TooLarge(_) | InferError::OverBudget { .. } => 413,
            InferError::Busy(_) | InferError::BudgetBusy(_) => 503,
            InferError::SessionEnded(_) => 409,
            InferError::TooManySessions { .. } | InferError::SessionMemory { .. } => 429,
            InferError::SessionBusy(_) => 409,
            InferError::Internal(_)
            | InferError::Deadline(_)
            | InferError::Memory(_)
            | InferError::Trap(_) => 500,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InferError::UnknownModel(_) | InferError::UnknownVersion { .. } => "not_found",
            InferError::BadRequest(_) | InferError::InvalidInput(_) => "invalid_input",
            InferError::TooLarge(_)
            | InferError::OverBudget { .. }
            | InferError::ResponseTooLarge { .. } => "too_large",
            InferError::Busy(_) | InferError::BudgetBusy(_) => "busy",
            InferError::Internal(_) => "internal",
            InferError::Deadline(_) => "deadline",
            InferError::Memory(_) => "memory",
            InferError::Trap(_) => "trap",
            InferError::SessionEnded(_) => "session_ended",
            InferError::TooManySessions { .. } | InferError::SessionMemory { .. } => {
                "too_many_sessions"
            }
            InferError::SessionBusy(_) => "session_busy",
        }
    }
}

impl From<outpost_oip::OipError> for InferError {
    fn from(e: outpost_oip::OipError) -> Self {
        use outpost_oip::OipError as O;
        match e {
            O::BadRequest(m) => InferError::BadRequest(m),
            O::ResponseTooLarge { limit } => InferError::ResponseTooLarge { limit },
            O::Internal(m) => InferError::Internal(m),
        }
    }
}

impl From<outpost_engine::CallError> for InferError {
    fn from(e: outpost_engine::CallError) -> Self {
        use outpost_engine::CallError as C;
        match e {
            C::BadRequest(m) => InferError::BadRequest(m),
            C::InvalidInput(m) => InferError::InvalidInput(m),
            C::Internal(m) => InferError::Internal(m),
            C::Deadline(ms) => InferError::Deadline(ms),
            C::Memory(bytes) => InferError::Memory(bytes),
            C::Trap(m) => InferError::Trap(m),
        }
    }
}
