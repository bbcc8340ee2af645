//! Builds the example guests (`examples/`) and the test guests (`tests/guests/`) for
//! `wasm32-wasip2` once, with their own target directory, so the crate can embed them.
//! A build script reports failure by panicking, so `expect` is the error path here.

#![allow(clippy::expect_used)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // <target>/<profile>/build/<crate>-<hash>/out → <target>/wasm-guests, shared by every
    // profile and by cross builds, and apart from the outer build's lock.
    let target_root = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent())
        .and_then(|profile| profile.parent())
        .map(|t| {
            if t.file_name()
                .is_some_and(|n| n.to_string_lossy().contains('-'))
            {
                t.parent().unwrap_or(t).to_path_buf()
            } else {
                t.to_path_buf()
            }
        })
        .unwrap_or_else(|| out_dir.clone());
    let guest_target = target_root.join("wasm-guests");

    for dir in ["guest-sdk", "examples", "tests/guests"] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo::rerun-if-changed={}", root.join("models").display());

    for workspace in ["examples", "tests/guests"] {
        build(&root.join(workspace).join("Cargo.toml"), &guest_target);
    }
    let wasm_dir = guest_target.join("wasm32-wasip2/release");
    let mut generated = String::new();
    for (konst, file) in [
        ("DIGITS_GUEST", "digits_guest.wasm"),
        ("SENSOR_GUEST", "sensor_guest.wasm"),
        ("GENERIC_GUEST", "generic_guest.wasm"),
        ("HOSTILE_GUEST", "hostile_guest.wasm"),
    ] {
        let path = wasm_dir.join(file);
        assert!(path.exists(), "guest build produced no {}", path.display());
        generated.push_str(&format!(
            "/// The compiled `{file}`.\npub const {konst}: &[u8] = include_bytes!({:?});\n",
            path.display().to_string()
        ));
    }
    std::fs::write(out_dir.join("guests.rs"), generated).expect("write guests.rs");
}

fn build(manifest: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--target")
        .arg("wasm32-wasip2")
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_TARGET_DIR", target_dir);
    // The outer build's settings are for the host; the guests get their own (and under
    // `cargo clippy`, the outer build's wrapper must not lint the guests with its flags).
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the wasm guests");
    assert!(
        status.success(),
        "building the wasm guests in {} failed; is the target installed? (rustup target add wasm32-wasip2)",
        manifest.display()
    );
}
