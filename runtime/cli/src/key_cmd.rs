//! `outpost key`: generate signing keys and turn public keys into trust-store entries.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use outpost_bundle::{PublicKey, SecretKey, TrustStore};

use crate::util;

/// Key subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum KeyCommand {
    /// Generate an ed25519 signing key: writes NAME.key (secret, mode 0600) and NAME.pub.
    Generate {
        /// Path prefix of the two files to write.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Print a trust-store entry allowing a public key to sign the given model names.
    Trust {
        /// The public key file (NAME.pub).
        public_key: PathBuf,
        /// Model names it may sign, comma-separated (`digits,sensor-*`): exact names,
        /// `prefix*`, or `*` for any. May also be repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<String>,
    },
}

pub(crate) fn run(cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Generate { out, force } => {
            let secret_path = out.with_extension("key");
            let public_path = out.with_extension("pub");
            for p in [&secret_path, &public_path] {
                if p.exists() && !force {
                    bail!(
                        "`{}` already exists (use --force to overwrite)",
                        p.display()
                    );
                }
            }
            let key = SecretKey::generate()?;
            util::write_atomic(&secret_path, key.to_file_string().as_bytes(), true)?;
            util::write_atomic(
                &public_path,
                key.public().to_file_string().as_bytes(),
                false,
            )?;
            println!("key id      {}", key.id());
            println!("secret key  {}  (keep it private)", secret_path.display());
            println!("public key  {}", public_path.display());
            println!(
                "trust it    outpost key trust {} --models '*' >> trust.toml",
                public_path.display()
            );
            Ok(())
        }
        KeyCommand::Trust { public_key, models } => {
            let key = PublicKey::from_file_str(&util::read_string(&public_key)?)
                .with_context(|| format!("cannot load `{}`", public_key.display()))?;
            let mut store = TrustStore::new();
            store.allow(key, models);
            let text = store.to_toml_string();
            // Round-trip through the parser so a bad pattern fails here, not on the device.
            TrustStore::from_toml_str(&text)?;
            print!("{text}");
            Ok(())
        }
    }
}
