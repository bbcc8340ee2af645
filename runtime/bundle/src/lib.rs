//! Outpost model bundles (`*.opb`). Owns: the bundle format, manifests and bundle specs,
//! signing keys, the trust store and the security counter. Never imports: any other Outpost
//! crate, a model runtime, wasmtime, or a transport.
//!
//! A bundle is a plain ustar archive holding `manifest.json`, an optional detached ed25519
//! signature `manifest.sig`, and exactly the files the manifest lists: a WebAssembly guest and
//! ONNX models. Readers check everything, with limits, before any byte is used:
//! archive structure, paths, sizes, hashes, the signer's right to sign the model name, the
//! signature (`verify_strict`) and the anti-rollback security counter.
//!
//! ```
//! use outpost_bundle::{Bundle, BuildInput, ReadLimits, SecretKey, TrustStore};
//!
//! # fn main() -> Result<(), outpost_bundle::BundleError> {
//! let mut bundle = Bundle::build(BuildInput {
//!     name: "digits".into(),
//!     version: "1.0.0".parse().expect("valid semver"),
//!     security_counter: 1,
//!     guest: b"\0asm\x01\0\0\0".to_vec(),
//!     models: vec![],
//!     api: Default::default(),
//!     limits: Default::default(),
//!     baseline: None,
//!     labels: vec![],
//!     metadata: Default::default(),
//!     serving: Default::default(),
//! })?;
//! let key = SecretKey::from_seed(&[42; 32]);
//! bundle.sign(&key);
//! let bytes = bundle.to_bytes();
//!
//! let mut trust = TrustStore::new();
//! trust.allow(key.public(), ["digits"]);
//! let verified = Bundle::read_verified(&bytes[..], &ReadLimits::default(), &trust, None)?;
//! assert_eq!(verified.manifest().name, "digits");
//! # Ok(())
//! # }
//! ```

mod bundle;
pub mod drift;
mod error;
mod keys;
pub mod manifest;
pub mod spec;
mod tar;

pub use bundle::{
    BuildInput, Bundle, ModelInput, ReadLimits, SignatureEntry, VerifiedBundle, sha256_hex,
};
pub use error::{BundleError, Result};
pub use keys::{PublicKey, SecretKey, Signer, TrustStore, key_id};
pub use manifest::Manifest;
