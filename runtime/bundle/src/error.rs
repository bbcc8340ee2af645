//! The one error type of this crate: every way a bundle is rejected has its own variant.

use std::io;

/// Why a bundle, key or trust store was rejected.
///
/// Each rejection is its own variant so that callers (the device, the fleet, the CLI) can tell
/// them apart, and each message says what is wrong in terms an operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Reading the underlying file or stream failed.
    #[error("i/o error while reading the bundle")]
    Io(#[from] io::Error),
    /// The archive ended in the middle of a header, an entry or the end marker.
    #[error("bundle is truncated: it ends inside {0}")]
    Truncated(&'static str),
    /// A tar header is not a well-formed ustar header.
    #[error("malformed archive header at byte {offset}: {reason}")]
    MalformedHeader {
        /// Byte offset of the header in the file.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A tar header's checksum does not match its contents.
    #[error("archive header at byte {offset} is corrupt (checksum mismatch)")]
    HeaderChecksum {
        /// Byte offset of the header in the file.
        offset: u64,
    },
    /// Padding that must be zero is not.
    #[error("bundle is corrupt: non-zero padding at byte {offset}")]
    NonZeroPadding {
        /// Byte offset of the first non-zero padding byte.
        offset: u64,
    },
    /// Bytes follow the archive's end marker.
    #[error("bundle is corrupt: data after the end of the archive")]
    TrailingData,
    /// An entry is a symbolic link.
    #[error("bundle entry `{path}` is a symbolic link; bundles may only hold regular files")]
    SymlinkEntry {
        /// The entry's path.
        path: String,
    },
    /// An entry is a hard link.
    #[error("bundle entry `{path}` is a hard link; bundles may only hold regular files")]
    HardLinkEntry {
        /// The entry's path.
        path: String,
    },
    /// An entry is neither a regular file nor a link (a directory, device, pax header, ...).
    #[error(
        "bundle entry `{path}` has unsupported type `{typeflag}`; bundles may only hold regular files"
    )]
    UnsupportedEntryType {
        /// The entry's path.
        path: String,
        /// The tar type flag, as a character.
        typeflag: char,
    },
    /// A path is absolute, climbs out of the bundle, or is otherwise not a plain relative path.
    #[error("unsafe path `{path}` in bundle: {reason}")]
    UnsafePath {
        /// The offending path (lossily decoded).
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The same path appears twice in the archive.
    #[error("bundle holds `{path}` twice")]
    DuplicateEntry {
        /// The duplicated path.
        path: String,
    },
    /// The archive does not start with `manifest.json`.
    #[error("bundle has no manifest: its first entry must be `manifest.json`")]
    MissingManifest,
    /// The manifest is larger than the limit.
    #[error("manifest is {size} bytes, above the limit of {limit} bytes")]
    ManifestTooLarge {
        /// Size declared in the archive.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A file is larger than the per-file limit.
    #[error("bundle file `{path}` is {size} bytes, above the limit of {limit} bytes")]
    EntryTooLarge {
        /// The file's path.
        path: String,
        /// Size declared in the archive.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The files together are larger than the total limit.
    #[error("bundle contents exceed the total limit of {limit} bytes")]
    TotalTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The archive has more entries than allowed.
    #[error("bundle has more than {limit} entries")]
    TooManyEntries {
        /// The configured limit.
        limit: usize,
    },
    /// The manifest's format version is not one this build understands.
    #[error(
        "manifest format version {found} is not supported (this runtime reads version {supported})"
    )]
    UnsupportedFormatVersion {
        /// Version in the manifest.
        found: u64,
        /// Version this build reads.
        supported: u32,
    },
    /// The manifest is not valid JSON of the expected shape (unknown fields are refused).
    #[error("manifest is malformed: {0}")]
    ManifestSyntax(serde_json::Error),
    /// The manifest parses but breaks a rule (name pattern, duplicate model, bad hash, ...).
    #[error("manifest is invalid: {0}")]
    InvalidManifest(String),
    /// The bundle carries no signature.
    #[error("bundle is not signed (no `manifest.sig` entry)")]
    Unsigned,
    /// The signature entry cannot be parsed.
    #[error("signature entry is malformed: {0}")]
    MalformedSignature(String),
    /// The signing key is not in the trust store.
    #[error("bundle is signed by unknown key `{key_id}`; add it to the trust store to accept it")]
    UnknownKey {
        /// Key id named in the signature.
        key_id: String,
    },
    /// The signing key is trusted, but not for this model name.
    #[error("key `{key_id}` is not allowed to sign model `{model}`")]
    KeyNotAllowed {
        /// Key id named in the signature.
        key_id: String,
        /// Model name from the manifest.
        model: String,
    },
    /// The signature does not verify against the manifest and the named key.
    #[error(
        "signature by key `{key_id}` does not match the manifest (bundle altered or signed by another key)"
    )]
    BadSignature {
        /// Key id named in the signature.
        key_id: String,
    },
    /// A file listed in the manifest is not in the archive.
    #[error("bundle file `{path}` is listed in the manifest but missing from the archive")]
    MissingFile {
        /// The missing path.
        path: String,
    },
    /// The archive holds a file the manifest does not list.
    #[error("bundle holds `{path}`, which the manifest does not list")]
    UnlistedFile {
        /// The unlisted path.
        path: String,
    },
    /// A file's size differs from the manifest.
    #[error("bundle file `{path}` is {actual} bytes but the manifest says {expected}")]
    SizeMismatch {
        /// The file's path.
        path: String,
        /// Size in the manifest.
        expected: u64,
        /// Size in the archive.
        actual: u64,
    },
    /// A file's sha256 differs from the manifest.
    #[error("bundle file `{path}` does not match its sha256 in the manifest")]
    HashMismatch {
        /// The file's path.
        path: String,
    },
    /// The security counter is below the highest one already accepted for this model.
    #[error(
        "security counter {counter} of `{name}` is below {highest}, the highest already accepted (rollback refused)"
    )]
    SecurityCounterRollback {
        /// Model name.
        name: String,
        /// Counter in the manifest.
        counter: u64,
        /// Highest counter accepted before.
        highest: u64,
    },
    /// A key file cannot be used.
    #[error("invalid key file: {0}")]
    InvalidKey(String),
    /// The trust store cannot be used.
    #[error("invalid trust store: {0}")]
    InvalidTrustStore(String),
}

/// Result alias for this crate.
pub type Result<T, E = BundleError> = std::result::Result<T, E>;
