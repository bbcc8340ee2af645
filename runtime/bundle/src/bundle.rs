//! Building, signing, reading and verifying bundles.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{BundleError, Result};
use crate::keys::{SecretKey, TrustStore};
use crate::manifest::{
    Api, BackendKind, Baseline, FORMAT_VERSION, FileEntry, MANIFEST_PATH, Manifest, ModelEntry,
    ResourceLimits, SIGNATURE_PATH, Serving, TensorSpec,
};
use crate::tar::{EntryHeader, TarReader, TarWriter};

/// Signatures cover this context string followed by the exact manifest bytes, so a bundle
/// signature can never be replayed as another kind of signed Outpost message.
const SIGNING_CONTEXT: &[u8] = b"outpost bundle manifest v1\n";

/// Largest signature entry accepted (a real one is under 200 bytes).
const MAX_SIGNATURE_BYTES: u64 = 4096;

/// Size limits applied while reading, before any oversized entry is read into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest `manifest.json`.
    pub max_manifest_bytes: u64,
    /// Largest single file.
    pub max_file_bytes: u64,
    /// Largest sum of all files.
    pub max_total_bytes: u64,
    /// Most entries, manifest and signature included.
    pub max_entries: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 1 << 20,
            max_file_bytes: 256 << 20,
            max_total_bytes: 512 << 20,
            max_entries: 64,
        }
    }
}

/// The detached signature entry (`manifest.sig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// Always `ed25519`.
    pub algorithm: String,
    /// Id of the signing key.
    pub key_id: String,
    /// 128 lower-case hex digits.
    pub signature: String,
}

impl SignatureEntry {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).unwrap_or_default();
        b.push(b'\n');
        b
    }

    /// Parses the entry and insists on the canonical bytes, so no byte of it is malleable.
    fn from_slice(bytes: &[u8]) -> Result<Self> {
        let malformed = |m: String| BundleError::MalformedSignature(m);
        let entry: Self = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if entry.algorithm != "ed25519" {
            return Err(malformed(format!(
                "algorithm `{}` is not supported (expected `ed25519`)",
                entry.algorithm
            )));
        }
        if entry.to_bytes() != bytes {
            return Err(malformed("not in canonical form".into()));
        }
        Ok(entry)
    }

    fn signature(&self) -> Result<[u8; 64]> {
        let malformed = || {
            BundleError::MalformedSignature("signature must be 128 lower-case hex digits".into())
        };
        // Lower case only: hex decoding accepts both cases, which would make the entry malleable.
        if self.signature.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed());
        }
        let mut raw = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut raw).map_err(|_| malformed())?;
        Ok(raw)
    }
}

/// An ONNX model to put in a new bundle.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// Name the guest calls the model by.
    pub name: String,
    /// The `.onnx` file's bytes.
    pub bytes: Vec<u8>,
    /// Input tensors.
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    pub outputs: Vec<TensorSpec>,
    /// Exporter quirks the loader repairs in the file, recorded in the manifest.
    pub repairs: Vec<String>,
    /// The backend the model requires, if any.
    pub backend: Option<BackendKind>,
}

/// Everything a new bundle is made of; [`Bundle::build`] computes sizes, hashes and paths.
#[derive(Debug, Clone)]
pub struct BuildInput {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: semver::Version,
    /// Anti-rollback counter.
    pub security_counter: u64,
    /// The compiled guest (`.wasm`).
    pub guest: Vec<u8>,
    /// ONNX models.
    pub models: Vec<ModelInput>,
    /// Public tensor API.
    pub api: Api,
    /// Guest resource limits.
    pub limits: ResourceLimits,
    /// Drift baseline.
    pub baseline: Option<Baseline>,
    /// Class labels.
    pub labels: Vec<String>,
    /// Free metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Batching, caching and sessions.
    pub serving: Serving,
}

/// A bundle whose archive structure, sizes and hashes have been checked, signed or not.
///
/// Its signature has *not* been checked; use [`Bundle::read_verified`] or
/// [`Bundle::verify`] to get a [`VerifiedBundle`] before using any of it.
#[derive(Debug, Clone)]
pub struct Bundle {
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    signature: Option<SignatureEntry>,
    files: BTreeMap<String, Vec<u8>>,
}

/// A bundle whose signer is trusted for its model name, whose signature is valid, and whose
/// security counter is not below the highest accepted: the only form a device may use.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    bundle: Bundle,
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl Bundle {
    /// Assembles an unsigned bundle: the guest at `guest.wasm`, each model at
    /// `models/{name}.onnx`.
    pub fn build(input: BuildInput) -> Result<Self> {
        let entry = |path: String, data: &[u8]| FileEntry {
            path,
            size: data.len() as u64,
            sha256: sha256_hex(data),
        };
        let guest = entry("guest.wasm".into(), &input.guest);
        let mut files = BTreeMap::new();
        files.insert(guest.path.clone(), input.guest);
        let mut models = Vec::new();
        for m in input.models {
            let f = entry(format!("models/{}.onnx", m.name), &m.bytes);
            models.push(ModelEntry {
                name: m.name,
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256,
                inputs: m.inputs,
                outputs: m.outputs,
                repairs: m.repairs,
                backend: m.backend,
            });
            if files.insert(f.path.clone(), m.bytes).is_some() {
                return Err(BundleError::InvalidManifest(format!(
                    "`{}` is listed twice",
                    f.path
                )));
            }
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: input.name,
            version: input.version,
            security_counter: input.security_counter,
            guest,
            models,
            api: input.api,
            limits: input.limits,
            baseline: input.baseline,
            labels: input.labels,
            metadata: input.metadata,
            serving: input.serving,
        };
        manifest.validate()?;
        Ok(Self {
            manifest_bytes: manifest.to_bytes(),
            manifest,
            signature: None,
            files,
        })
    }

    /// Reads a bundle and checks its structure, sizes and hashes, but not its signature.
    /// For inspection; a device uses [`Bundle::read_verified`].
    pub fn read(reader: impl Read, limits: &ReadLimits) -> Result<Self> {
        read_bundle(reader, limits, |_| Ok(()))
    }

    /// Reads a bundle, checking signer, signature and security counter as soon as the
    /// manifest and signature are read, before any other byte is read.
    ///
    /// `highest_accepted` is the highest security counter already accepted for the bundle's
    /// model name, if any.
    pub fn read_verified(
        reader: impl Read,
        limits: &ReadLimits,
        trust: &TrustStore,
        highest_accepted: Option<u64>,
    ) -> Result<VerifiedBundle> {
        let bundle = read_bundle(reader, limits, |b| {
            b.check_signature(trust, highest_accepted)
        })?;
        Ok(VerifiedBundle { bundle })
    }

    /// Verifies a bundle already read with [`Bundle::read`].
    pub fn verify(
        self,
        trust: &TrustStore,
        highest_accepted: Option<u64>,
    ) -> Result<VerifiedBundle> {
        self.check_signature(trust, highest_accepted)?;
        Ok(VerifiedBundle { bundle: self })
    }

    fn check_signature(&self, trust: &TrustStore, highest_accepted: Option<u64>) -> Result<()> {
        let m = &self.manifest;
        let sig = self.signature.as_ref().ok_or(BundleError::Unsigned)?;
        let key = trust.authorize(&sig.key_id, &m.name)?;
        if !key.verify(SIGNING_CONTEXT, &self.manifest_bytes, &sig.signature()?) {
            return Err(BundleError::BadSignature {
                key_id: sig.key_id.clone(),
            });
        }
        if let Some(highest) = highest_accepted.filter(|&h| m.security_counter < h) {
            return Err(BundleError::SecurityCounterRollback {
                name: m.name.clone(),
                counter: m.security_counter,
                highest,
            });
        }
        Ok(())
    }

    /// Signs the manifest with `key`, replacing any previous signature.
    pub fn sign(&mut self, key: &SecretKey) {
        let signature = key.sign(SIGNING_CONTEXT, &self.manifest_bytes);
        self.signature = Some(SignatureEntry {
            algorithm: "ed25519".into(),
            key_id: key.id().into(),
            signature: hex::encode(signature),
        });
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest exactly as stored (what the signature covers).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The signature entry, if the bundle is signed.
    pub fn signature(&self) -> Option<&SignatureEntry> {
        self.signature.as_ref()
    }

    /// A listed file's contents.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    /// Writes the bundle in canonical form: manifest, signature, then the files in manifest
    /// order.
    pub fn write_to<W: Write>(&self, writer: W) -> std::io::Result<W> {
        let mut tar = TarWriter::new(writer);
        tar.append(MANIFEST_PATH, &self.manifest_bytes)?;
        if let Some(sig) = &self.signature {
            tar.append(SIGNATURE_PATH, &sig.to_bytes())?;
        }
        for f in self.manifest.files() {
            tar.append(
                &f.path,
                self.files.get(&f.path).map_or(&[][..], Vec::as_slice),
            )?;
        }
        tar.finish()
    }

    /// The bundle file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.write_to(Vec::new()).unwrap_or_default()
    }
}

impl VerifiedBundle {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    /// Id of the key that signed the bundle.
    pub fn signer(&self) -> &str {
        self.bundle
            .signature
            .as_ref()
            .map_or("", |s| s.key_id.as_str())
    }

    /// The guest module's bytes.
    pub fn guest(&self) -> &[u8] {
        self.file(&self.bundle.manifest.guest.path)
            .unwrap_or_default()
    }

    /// An ONNX model's bytes, by model name.
    pub fn model(&self, name: &str) -> Option<&[u8]> {
        let entry = self.manifest().models.iter().find(|m| m.name == name)?;
        self.file(&entry.path)
    }

    /// A listed file's contents.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.bundle.file(path)
    }

    /// The underlying bundle (to write it out again, for instance).
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
}

fn read_bundle(
    reader: impl Read,
    limits: &ReadLimits,
    check: impl FnOnce(&Bundle) -> Result<()>,
) -> Result<Bundle> {
    let mut tar = TarReader::new(reader);
    let mut entries = 0usize;
    let mut next = |tar: &mut TarReader<_>| -> Result<Option<EntryHeader>> {
        let header = tar.next_header()?;
        if header.is_some() {
            entries += 1;
            if entries > limits.max_entries {
                return Err(BundleError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
        }
        Ok(header)
    };

    let header = match next(&mut tar)? {
        Some(h) if h.path == MANIFEST_PATH => h,
        _ => return Err(BundleError::MissingManifest),
    };
    if header.size > limits.max_manifest_bytes {
        return Err(BundleError::ManifestTooLarge {
            size: header.size,
            limit: limits.max_manifest_bytes,
        });
    }
    let mut manifest_bytes = Vec::with_capacity(header.size as usize);
    tar.read_data(&header, &mut manifest_bytes)?;
    let manifest = Manifest::from_slice(&manifest_bytes)?;
    let listed: BTreeMap<String, FileEntry> = manifest
        .files()
        .into_iter()
        .map(|f| (f.path.clone(), f))
        .collect();
    if listed.len() + 2 > limits.max_entries {
        return Err(BundleError::TooManyEntries {
            limit: limits.max_entries,
        });
    }

    let mut pending = next(&mut tar)?;
    let mut signature = None;
    if let Some(h) = pending.take_if(|h| h.path == SIGNATURE_PATH) {
        if h.size > MAX_SIGNATURE_BYTES {
            return Err(BundleError::MalformedSignature(format!(
                "{} bytes is too large for a signature",
                h.size
            )));
        }
        let mut bytes = Vec::new();
        tar.read_data(&h, &mut bytes)?;
        signature = Some(SignatureEntry::from_slice(&bytes)?);
        pending = next(&mut tar)?;
    }

    let mut bundle = Bundle {
        manifest,
        manifest_bytes,
        signature,
        files: BTreeMap::new(),
    };
    check(&bundle)?;

    let mut total = 0u64;
    let mut seen = BTreeSet::new();
    while let Some(h) = pending {
        if h.path == MANIFEST_PATH || h.path == SIGNATURE_PATH || seen.contains(&h.path) {
            return Err(BundleError::DuplicateEntry { path: h.path });
        }
        let Some(expected) = listed.get(&h.path) else {
            return Err(BundleError::UnlistedFile { path: h.path });
        };
        if h.size > limits.max_file_bytes {
            return Err(BundleError::EntryTooLarge {
                path: h.path,
                size: h.size,
                limit: limits.max_file_bytes,
            });
        }
        total += h.size;
        if total > limits.max_total_bytes {
            return Err(BundleError::TotalTooLarge {
                limit: limits.max_total_bytes,
            });
        }
        if h.size != expected.size {
            return Err(BundleError::SizeMismatch {
                path: h.path,
                expected: expected.size,
                actual: h.size,
            });
        }
        let mut data = Vec::with_capacity(h.size as usize);
        tar.read_data(&h, &mut data)?;
        if sha256_hex(&data) != expected.sha256 {
            return Err(BundleError::HashMismatch { path: h.path });
        }
        seen.insert(h.path.clone());
        bundle.files.insert(h.path, data);
        pending = next(&mut tar)?;
    }
    if let Some(missing) = listed.keys().find(|p| !seen.contains(*p)) {
        return Err(BundleError::MissingFile {
            path: missing.clone(),
        });
    }
    Ok(bundle)
}
