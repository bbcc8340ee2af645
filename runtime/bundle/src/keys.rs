//! Ed25519 signing keys, their ids, and the trust store that says who may sign what.

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{BundleError, Result};

const SECRET_TYPE: &str = "outpost-ed25519-secret-key";
const PUBLIC_TYPE: &str = "outpost-ed25519-public-key";

/// The id of a public key: the first 8 bytes of its sha256, as 16 hex digits.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A signing key with its id. The secret never appears in `Debug` output.
#[derive(Clone)]
pub struct SecretKey {
    key: SigningKey,
    id: String,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
}

impl SecretKey {
    /// Generates a new key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| BundleError::InvalidKey(format!("no randomness available: {e}")))?;
        Ok(Self::from_seed(&seed))
    }

    /// Builds a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let id = key_id(&key.verifying_key());
        Self { key, id }
    }

    /// The key id that signatures carry.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
            id: self.id.clone(),
        }
    }

    /// Signs `context || message`. Each kind of signed Outpost message has its own context,
    /// so a signature made for one kind is never valid for another.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        let mut m = Vec::with_capacity(context.len() + message.len());
        m.extend_from_slice(context);
        m.extend_from_slice(message);
        self.key.sign(&m).to_bytes()
    }

    /// The key file text (JSON). Keep it private: it signs bundles.
    pub fn to_file_string(&self) -> String {
        let file = KeyFile {
            kind: SECRET_TYPE.into(),
            key_id: self.id.clone(),
            secret_key: Some(hex::encode(self.key.to_bytes())),
            public_key: None,
        };
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Parses a key file written by [`SecretKey::to_file_string`].
    pub fn from_file_str(text: &str) -> Result<Self> {
        let file = parse_key_file(text, SECRET_TYPE)?;
        let seed = decode32(file.secret_key.as_deref(), "secret_key")?;
        let key = Self::from_seed(&seed);
        if key.id != file.key_id {
            return Err(BundleError::InvalidKey(format!(
                "key_id `{}` does not match the key (expected `{}`)",
                file.key_id, key.id
            )));
        }
        Ok(key)
    }
}

/// A public key with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    /// Builds a public key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|e| BundleError::InvalidKey(format!("not an ed25519 public key: {e}")))?;
        if key.is_weak() {
            return Err(BundleError::InvalidKey("weak ed25519 public key".into()));
        }
        Ok(Self {
            id: key_id(&key),
            key,
        })
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        Self::from_bytes(&decode32(Some(text), "public_key")?)
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// Checks a signature made by [`SecretKey::sign`] (`verify_strict`).
    pub fn verify(&self, context: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        let mut m = Vec::with_capacity(context.len() + message.len());
        m.extend_from_slice(context);
        m.extend_from_slice(message);
        self.key
            .verify_strict(&m, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }

    /// The public key file text (JSON).
    pub fn to_file_string(&self) -> String {
        let file = KeyFile {
            kind: PUBLIC_TYPE.into(),
            key_id: self.id.clone(),
            secret_key: None,
            public_key: Some(self.to_hex()),
        };
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Parses a public key file written by [`PublicKey::to_file_string`].
    pub fn from_file_str(text: &str) -> Result<Self> {
        let file = parse_key_file(text, PUBLIC_TYPE)?;
        let key = Self::from_hex(file.public_key.as_deref().unwrap_or_default())?;
        if key.id != file.key_id {
            return Err(BundleError::InvalidKey(format!(
                "key_id `{}` does not match the key (expected `{}`)",
                file.key_id, key.id
            )));
        }
        Ok(key)
    }
}

fn parse_key_file(text: &str, kind: &str) -> Result<KeyFile> {
    let file: KeyFile = serde_json::from_str(text)
        .map_err(|e| BundleError::InvalidKey(format!("not an outpost key file: {e}")))?;
    if file.kind != kind {
        return Err(BundleError::InvalidKey(format!(
            "expected a `{kind}` file, found `{}`",
            file.kind
        )));
    }
    Ok(file)
}

fn decode32(text: Option<&str>, field: &str) -> Result<[u8; 32]> {
    let text = text.ok_or_else(|| BundleError::InvalidKey(format!("`{field}` is missing")))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| BundleError::InvalidKey(format!("`{field}` must be 64 hex digits")))?;
    Ok(out)
}

/// Which keys may sign bundles, and for which model names.
///
/// Loaded from TOML:
///
/// ```toml
/// [[signer]]
/// public_key = "<64 hex digits>"   # from `outpost key generate`
/// models = ["digits", "sensor-*"]  # exact names, `prefix*`, or `*` for any
/// ```
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    signers: Vec<Signer>,
}

/// One trusted key and the model names it may sign.
#[derive(Debug, Clone)]
pub struct Signer {
    /// The key.
    pub key: PublicKey,
    /// Name patterns: exact names, `prefix*`, or `*`.
    pub models: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustStore {
    #[serde(default)]
    signer: Vec<RawSigner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigner {
    public_key: String,
    #[serde(default)]
    key_id: Option<String>,
    models: Vec<String>,
}

impl TrustStore {
    /// An empty store, which trusts nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a signer allowed to sign the models matching `models`.
    pub fn allow(&mut self, key: PublicKey, models: impl IntoIterator<Item = impl Into<String>>) {
        self.signers.push(Signer {
            key,
            models: models.into_iter().map(Into::into).collect(),
        });
    }

    /// Parses the TOML form shown on [`TrustStore`].
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let raw: RawTrustStore =
            toml::from_str(text).map_err(|e| BundleError::InvalidTrustStore(e.to_string()))?;
        let mut store = Self::new();
        for (i, s) in raw.signer.into_iter().enumerate() {
            let key = PublicKey::from_hex(&s.public_key)
                .map_err(|e| BundleError::InvalidTrustStore(format!("signer {}: {e}", i + 1)))?;
            if let Some(id) = s.key_id.filter(|id| *id != key.id) {
                return Err(BundleError::InvalidTrustStore(format!(
                    "signer {}: key_id `{id}` does not match its public key (`{}`)",
                    i + 1,
                    key.id
                )));
            }
            if let Some(bad) = s.models.iter().find(|p| !is_valid_pattern(p)) {
                return Err(BundleError::InvalidTrustStore(format!(
                    "signer {}: `{bad}` is not a model name, `prefix*` or `*`",
                    i + 1
                )));
            }
            store.allow(key, s.models);
        }
        Ok(store)
    }

    /// The TOML form of this store.
    pub fn to_toml_string(&self) -> String {
        let mut out = String::new();
        for s in &self.signers {
            let models: Vec<String> = s.models.iter().map(|m| format!("{m:?}")).collect();
            out.push_str(&format!(
                "[[signer]]\nkey_id = \"{}\"\npublic_key = \"{}\"\nmodels = [{}]\n\n",
                s.key.id,
                s.key.to_hex(),
                models.join(", ")
            ));
        }
        out
    }

    /// The signers, in order.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// Finds the key with this id and checks it may sign `model`.
    pub fn authorize(&self, key_id: &str, model: &str) -> Result<&PublicKey> {
        let mut known = false;
        for s in self.signers.iter().filter(|s| s.key.id == key_id) {
            known = true;
            if s.models.iter().any(|p| pattern_matches(p, model)) {
                return Ok(&s.key);
            }
        }
        Err(if known {
            BundleError::KeyNotAllowed {
                key_id: key_id.into(),
                model: model.into(),
            }
        } else {
            BundleError::UnknownKey {
                key_id: key_id.into(),
            }
        })
    }
}

fn is_valid_pattern(p: &str) -> bool {
    match p.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => prefix
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
        None => crate::manifest::is_valid_model_name(p),
    }
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let k = SecretKey::from_seed(&[7; 32]);
        let back = SecretKey::from_file_str(&k.to_file_string()).unwrap();
        assert_eq!(back.id(), k.id());
        let p = PublicKey::from_file_str(&k.public().to_file_string()).unwrap();
        assert_eq!(p, k.public());
        assert!(matches!(
            SecretKey::from_file_str(&k.public().to_file_string()),
            Err(BundleError::InvalidKey(_))
        ));
    }

    #[test]
    fn trust_store_patterns() {
        let k = SecretKey::from_seed(&[1; 32]).public();
        let toml = format!(
            "[[signer]]\npublic_key = \"{}\"\nmodels = [\"digits\", \"sensor-*\"]\n",
            k.to_hex()
        );
        let store = TrustStore::from_toml_str(&toml).unwrap();
        assert!(store.authorize(k.id(), "digits").is_ok());
        assert!(store.authorize(k.id(), "sensor-a").is_ok());
        assert!(matches!(
            store.authorize(k.id(), "digits2"),
            Err(BundleError::KeyNotAllowed { .. })
        ));
        assert!(matches!(
            store.authorize("0000000000000000", "digits"),
            Err(BundleError::UnknownKey { .. })
        ));
        let again = TrustStore::from_toml_str(&store.to_toml_string()).unwrap();
        assert!(again.authorize(k.id(), "sensor-b").is_ok());
    }

    #[test]
    fn trust_store_refuses_bad_patterns_and_ids() {
        let k = SecretKey::from_seed(&[1; 32]).public();
        let bad = format!(
            "[[signer]]\npublic_key = \"{}\"\nmodels = [\"Bad Name\"]\n",
            k.to_hex()
        );
        assert!(TrustStore::from_toml_str(&bad).is_err());
        let bad = format!(
            "[[signer]]\nkey_id = \"ffffffffffffffff\"\npublic_key = \"{}\"\nmodels = [\"*\"]\n",
            k.to_hex()
        );
        assert!(TrustStore::from_toml_str(&bad).is_err());
    }
}
