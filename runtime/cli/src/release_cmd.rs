//! `outpost release`: sign a directory of release files, and verify one before installing it.
//!
//! `sign` writes `SHA256SUMS` (in `sha256sum`'s format: `HEX  NAME`, one line per regular file
//! of the directory, sorted by name) and `SHA256SUMS.sig`, an ed25519 signature over the exact
//! bytes of `SHA256SUMS` by a key from `outpost key generate`. `verify` checks the signature
//! against a release key, every listed file against its sum, and that nothing unlisted sits
//! beside them: a tarball someone added a file to is refused, not partly trusted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_bundle::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::util;

/// What a release signature signs in: a signature over one thing never verifies as another's.
const RELEASE_CONTEXT: &[u8] = b"outpost-release-sums-v1";
/// The sums file.
const SUMS: &str = "SHA256SUMS";
/// The signature file.
const SIG: &str = "SHA256SUMS.sig";

/// `outpost release` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ReleaseCommand {
    /// Write DIR/SHA256SUMS for every regular file in DIR and sign it (DIR/SHA256SUMS.sig).
    Sign {
        /// The release signing key (`outpost key generate`).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The directory of release files.
        dir: PathBuf,
    },
    /// Check DIR/SHA256SUMS.sig against the release key, every file against SHA256SUMS, and
    /// that DIR holds nothing unlisted.
    Verify {
        /// The release public key: 64 hex digits, or a public key file (`outpost key
        /// generate`'s `.pub`).
        #[arg(long, value_name = "HEX|FILE")]
        key: String,
        /// The directory of release files (an unpacked tarball).
        dir: PathBuf,
    },
}

/// The signature file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    /// The signing key's id.
    key_id: String,
    /// 128 hex digits.
    signature: String,
}

pub(crate) fn run(cmd: ReleaseCommand) -> Result<()> {
    match cmd {
        ReleaseCommand::Sign { key_file, dir } => {
            let key = SecretKey::from_file_str(&util::read_string(&key_file)?)
                .with_context(|| format!("reading the key `{}`", key_file.display()))?;
            let names = release_files(&dir)?;
            if names.is_empty() {
                bail!("`{}` holds no files to sign", dir.display());
            }
            let mut sums = String::new();
            for name in &names {
                sums.push_str(&format!("{}  {name}\n", sha256_of(&dir.join(name))?));
            }
            let signature = Signature {
                key_id: key.id().to_owned(),
                signature: hex::encode(key.sign(RELEASE_CONTEXT, sums.as_bytes())),
            };
            util::write_atomic(&dir.join(SUMS), sums.as_bytes(), false)?;
            util::write_atomic(
                &dir.join(SIG),
                (serde_json::to_string_pretty(&signature)? + "\n").as_bytes(),
                false,
            )?;
            println!(
                "signed {} file(s) in {} with key {}",
                names.len(),
                dir.display(),
                key.id()
            );
            Ok(())
        }
        ReleaseCommand::Verify { key, dir } => {
            let key = read_public_key(&key)?;
            let count = verify(&dir, &key)?;
            println!(
                "{}: {count} file(s) match SHA256SUMS, signed by {}",
                dir.display(),
                key.id()
            );
            Ok(())
        }
    }
}

/// A public key from 64 hex digits or a public key file.
fn read_public_key(text: &str) -> Result<PublicKey> {
    let trimmed = text.trim();
    if trimmed.len() == 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return PublicKey::from_hex(trimmed).context("--key");
    }
    let path = Path::new(text);
    PublicKey::from_file_str(&util::read_string(path)?)
        .with_context(|| format!("reading the public key `{}`", path.display()))
}

/// Checks a release directory; returns how many files it holds besides the sums.
fn verify(dir: &Path, key: &PublicKey) -> Result<usize> {
    let sums = util::read(&dir.join(SUMS))
        .with_context(|| format!("`{}` is not a signed release", dir.display()))?;
    let sig_text = util::read_string(&dir.join(SIG))
        .with_context(|| format!("`{}` carries no signature", dir.display()))?;
    let sig: Signature = serde_json::from_str(&sig_text).context("SHA256SUMS.sig is malformed")?;
    if sig.key_id != key.id() {
        bail!(
            "SHA256SUMS is signed by key {}, not by the release key {}",
            outpost_proto::text::bounded(&sig.key_id, outpost_proto::text::MAX_QUOTED),
            key.id()
        );
    }
    let mut bytes = [0u8; 64];
    if hex::decode_to_slice(&sig.signature, &mut bytes).is_err()
        || !key.verify(RELEASE_CONTEXT, &sums, &bytes)
    {
        bail!(
            "the signature over SHA256SUMS does not verify: the release was altered or signed by another key"
        );
    }
    let text = std::str::from_utf8(&sums).context("SHA256SUMS is not text")?;
    let mut listed = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let (sum, name) = line
            .split_once("  ")
            .with_context(|| format!("SHA256SUMS line {} is not `HEX  NAME`", i + 1))?;
        if !is_plain_name(name) || name == SUMS || name == SIG {
            bail!(
                "SHA256SUMS line {} names `{name}`, not a file of the release",
                i + 1
            );
        }
        let path = dir.join(name);
        let actual = sha256_of(&path).with_context(|| format!("`{name}` is listed but missing"))?;
        if !actual.eq_ignore_ascii_case(sum) {
            bail!("`{name}` does not match its checksum (the file was altered or damaged)");
        }
        if !listed.insert(name.to_owned()) {
            bail!("SHA256SUMS lists `{name}` twice");
        }
    }
    let present: BTreeSet<String> = release_files(dir)?.into_iter().collect();
    if let Some(extra) = present.difference(&listed).next() {
        bail!(
            "`{extra}` is in the release but not in SHA256SUMS: refusing a release with files nobody signed"
        );
    }
    Ok(listed.len())
}

/// A name of a file directly inside the release directory.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control)
}

/// The regular files of `dir` but the sums and the signature, sorted.
fn release_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("cannot read `{}`", dir.display()))?
    {
        let entry = entry?;
        let kind = entry.file_type()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SUMS || name == SIG {
            continue;
        }
        if kind.is_dir() || kind.is_symlink() {
            bail!(
                "`{}` is a {} in the release directory: a release holds files only",
                name,
                if kind.is_dir() {
                    "directory"
                } else {
                    "symlink"
                }
            );
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn sha256_of(path: &Path) -> Result<String> {
    outpost_agent::download::sha256_file(path)
        .with_context(|| format!("cannot read `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(dir: &Path) -> PublicKey {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("outpost"), b"\x7fELF binary").unwrap();
        std::fs::write(dir.join("device.toml"), b"listen = \"127.0.0.1:8080\"\n").unwrap();
        let key = SecretKey::generate().unwrap();
        let key_file = dir.with_extension("key");
        std::fs::write(&key_file, key.to_file_string()).unwrap();
        run(ReleaseCommand::Sign {
            key_file,
            dir: dir.to_owned(),
        })
        .unwrap();
        key.public()
    }

    #[test]
    fn a_signed_release_verifies_and_every_alteration_is_refused() {
        let tmp = outpost_testkit::TempDir::new("release");
        let dir = tmp.0.join("r");
        let key = release(&dir);
        assert_eq!(verify(&dir, &key).unwrap(), 2);
        let sums = std::fs::read_to_string(dir.join(SUMS)).unwrap();
        assert!(
            sums.ends_with("  outpost\n") && sums.contains("  device.toml\n"),
            "{sums}"
        );

        // Another key.
        let other = SecretKey::generate().unwrap().public();
        let err = verify(&dir, &other).unwrap_err().to_string();
        assert!(err.contains("not by the release key"), "{err}");
        // A file changed.
        std::fs::write(dir.join("outpost"), b"\x7fELF evil").unwrap();
        let err = verify(&dir, &key).unwrap_err().to_string();
        assert!(
            err.contains("`outpost` does not match its checksum"),
            "{err}"
        );
        // The sums changed to match it: the signature fails.
        let evil = sums.replace(
            sums.lines().find(|l| l.ends_with("outpost")).unwrap(),
            &format!("{}  outpost", sha256_of(&dir.join("outpost")).unwrap()),
        );
        std::fs::write(dir.join(SUMS), evil).unwrap();
        let err = verify(&dir, &key).unwrap_err().to_string();
        assert!(err.contains("does not verify"), "{err}");
    }

    #[test]
    fn unlisted_missing_and_unsigned_files_are_refused() {
        let tmp = outpost_testkit::TempDir::new("release-extra");
        let dir = tmp.0.join("r");
        let key = release(&dir);
        std::fs::write(dir.join("install-hook.sh"), b"#!/bin/sh\n").unwrap();
        let err = verify(&dir, &key).unwrap_err().to_string();
        assert!(
            err.contains("`install-hook.sh` is in the release but not in SHA256SUMS"),
            "{err}"
        );
        std::fs::remove_file(dir.join("install-hook.sh")).unwrap();
        std::fs::remove_file(dir.join("device.toml")).unwrap();
        let err = format!("{:#}", verify(&dir, &key).unwrap_err());
        assert!(err.contains("`device.toml` is listed but missing"), "{err}");
        std::fs::remove_file(dir.join(SIG)).unwrap();
        let err = format!("{:#}", verify(&dir, &key).unwrap_err());
        assert!(err.contains("carries no signature"), "{err}");
    }

    #[test]
    fn keys_are_read_as_hex_or_as_a_public_key_file() {
        let tmp = outpost_testkit::TempDir::new("release-key");
        let key = SecretKey::generate().unwrap().public();
        assert_eq!(read_public_key(&key.to_hex()).unwrap().id(), key.id());
        let file = tmp.0.join("release.pub");
        std::fs::write(&file, key.to_file_string()).unwrap();
        assert_eq!(
            read_public_key(file.to_str().unwrap()).unwrap().id(),
            key.id()
        );
        assert!(read_public_key("zz").is_err());
    }
}
