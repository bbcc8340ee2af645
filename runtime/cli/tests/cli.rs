//! The real `outpost` binary, driven as an operator would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

mod common;
use common::{fails, ok, signer};
use outpost_testkit::TempDir;

/// A directory with a key pair, a trust store, a spec and its files.
fn workspace(name: &str) -> TempDir {
    let dir = TempDir::new(&format!("cli-{name}"));
    fs::write(dir.join("guest.wasm"), outpost_examples::DIGITS_GUEST).unwrap();
    fs::write(dir.join("model.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    fs::write(
        dir.join("bundle.toml"),
        r#"
name = "digits"
version = "0.3.0"
security_counter = 7
guest = "guest.wasm"
labels = ["0", "1"]

[[model]]
name = "classifier"
path = "model.onnx"
inputs = [{ name = "input", datatype = "FP32", shape = ["batch", 64] }]
outputs = [{ name = "probabilities", datatype = "FP32", shape = ["batch", 10] }]

[limits]
timeout_ms = 250

[metadata]
dataset = "test"
"#,
    )
    .unwrap();
    signer(&dir);
    dir
}

fn build_and_sign(dir: &Path) {
    ok(
        dir,
        &["bundle", "build", "bundle.toml", "--out", "digits.opb"],
    );
    ok(
        dir,
        &["bundle", "sign", "digits.opb", "--key", "signer.key"],
    );
}

#[test]
fn build_sign_verify_inspect() {
    let ws = workspace("round-trip");
    let dir = ws.path();
    build_and_sign(dir);
    let out = ok(
        dir,
        &["bundle", "verify", "digits.opb", "--trust", "trust.toml"],
    );
    assert!(
        out.starts_with("verified digits 0.3.0 (security counter 7)"),
        "{out}"
    );

    let text = ok(dir, &["bundle", "inspect", "digits.opb"]);
    assert!(text.contains("bundle    digits 0.3.0"), "{text}");
    assert!(text.contains("inputs   input FP32[batch, 64]"), "{text}");
    assert!(text.contains("timeout 250 ms"), "{text}");

    let json: serde_json::Value =
        serde_json::from_str(&ok(dir, &["bundle", "inspect", "digits.opb", "--json"])).unwrap();
    assert_eq!(json["manifest"]["name"], "digits");
    assert_eq!(
        json["manifest"]["models"][0]["size"],
        outpost_examples::DIGITS_ONNX.len()
    );
    assert_eq!(json["signature"]["checked"], false);
    assert_eq!(
        json["file"]["size"],
        fs::metadata(dir.join("digits.opb")).unwrap().len()
    );

    // Ordinary tools can read it.
    let listing = Command::new("tar")
        .arg("tf")
        .arg(dir.join("digits.opb"))
        .output();
    if let Ok(listing) = listing {
        let names = String::from_utf8_lossy(&listing.stdout);
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            [
                "manifest.json",
                "manifest.sig",
                "guest.wasm",
                "models/classifier.onnx"
            ]
        );
    }
}

#[cfg(unix)]
#[test]
fn secret_key_is_private_and_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let ws = workspace("keys");
    let mode = fs::metadata(ws.join("signer.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let before = fs::read(ws.join("signer.key")).unwrap();
    let err = fails(&ws, &["key", "generate", "--out", "signer"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read(ws.join("signer.key")).unwrap(), before);
}

#[test]
fn verify_rejections_exit_non_zero_with_a_reason() {
    let ws = workspace("rejections");
    let dir = ws.path();
    build_and_sign(dir);

    let err = fails(
        dir,
        &[
            "bundle",
            "verify",
            "digits.opb",
            "--trust",
            "trust.toml",
            "--min-security-counter",
            "8",
        ],
    );
    assert!(err.contains("rollback refused"), "{err}");

    ok(dir, &["key", "generate", "--out", "other"]);
    let other = ok(dir, &["key", "trust", "other.pub", "--models", "*"]);
    fs::write(dir.join("other-trust.toml"), other).unwrap();
    let err = fails(
        dir,
        &[
            "bundle",
            "verify",
            "digits.opb",
            "--trust",
            "other-trust.toml",
        ],
    );
    assert!(err.contains("unknown key"), "{err}");

    let wrong = ok(dir, &["key", "trust", "signer.pub", "--models", "sensor-*"]);
    fs::write(dir.join("wrong-trust.toml"), wrong).unwrap();
    let err = fails(
        dir,
        &[
            "bundle",
            "verify",
            "digits.opb",
            "--trust",
            "wrong-trust.toml",
        ],
    );
    assert!(err.contains("not allowed to sign model `digits`"), "{err}");

    let mut bytes = fs::read(dir.join("digits.opb")).unwrap();
    let inside_model = bytes.len() - 1024 - 5000; // in the last file, the ONNX model
    bytes[inside_model] ^= 1;
    fs::write(dir.join("tampered.opb"), &bytes).unwrap();
    let err = fails(
        dir,
        &["bundle", "verify", "tampered.opb", "--trust", "trust.toml"],
    );
    assert!(err.contains("does not match its sha256"), "{err}");

    ok(
        dir,
        &["bundle", "build", "bundle.toml", "--out", "unsigned.opb"],
    );
    let err = fails(
        dir,
        &["bundle", "verify", "unsigned.opb", "--trust", "trust.toml"],
    );
    assert!(err.contains("not signed"), "{err}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let ws = workspace("bad-inputs");
    let dir = ws.path();
    fs::write(dir.join("garbage.opb"), b"this is not a bundle").unwrap();
    fs::write(dir.join("empty.opb"), b"").unwrap();
    for f in ["garbage.opb", "empty.opb", "missing.opb", "trust.toml"] {
        fails(dir, &["bundle", "inspect", f]);
        fails(dir, &["bundle", "verify", f, "--trust", "trust.toml"]);
        fails(dir, &["bundle", "sign", f, "--key", "signer.key"]);
    }
    build_and_sign(dir);
    fails(
        dir,
        &["bundle", "verify", "digits.opb", "--trust", "garbage.opb"],
    );
    fails(
        dir,
        &["bundle", "sign", "digits.opb", "--key", "signer.pub"],
    );
    fails(
        dir,
        &["bundle", "sign", "digits.opb", "--key", "trust.toml"],
    );
    fails(
        dir,
        &["key", "trust", "signer.pub", "--models", "Not A Name"],
    );

    fs::write(dir.join("bad.toml"), "name = \"digits\"\nsurprise = 1\n").unwrap();
    let err = fails(dir, &["bundle", "build", "bad.toml", "--out", "x.opb"]);
    assert!(err.contains("invalid bundle spec"), "{err}");
    let spec = fs::read_to_string(dir.join("bundle.toml")).unwrap();
    fs::write(
        dir.join("badname.toml"),
        spec.replace("\"digits\"", "\"Digits\""),
    )
    .unwrap();
    let err = fails(dir, &["bundle", "build", "badname.toml", "--out", "x.opb"]);
    assert!(err.contains("must match [a-z0-9]"), "{err}");
    assert!(!dir.join("x.opb").exists());
}

#[test]
fn build_refuses_what_a_device_could_not_load() {
    let ws = workspace("engine-checks");
    let dir = ws.path();
    fs::write(dir.join("model.onnx"), b"not an onnx model").unwrap();
    let err = fails(dir, &["bundle", "build", "bundle.toml", "--out", "x.opb"]);
    assert!(
        err.contains("ONNX model `classifier` cannot be loaded by tract"),
        "{err}"
    );
    fs::write(dir.join("model.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    // A core module, not a component of the model world.
    fs::write(dir.join("guest.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let err = fails(dir, &["bundle", "build", "bundle.toml", "--out", "x.opb"]);
    assert!(
        err.contains("the guest module") && err.contains("cannot be loaded"),
        "{err}"
    );
    fs::write(dir.join("guest.wasm"), b"\0asm garbage").unwrap();
    fails(dir, &["bundle", "build", "bundle.toml", "--out", "x.opb"]);
    assert!(!dir.join("x.opb").exists());
}

/// Regression: the spec's per-model inputs and outputs are what the manifest states as fact,
/// so `bundle build` compares them with the ONNX graph and refuses a mismatch.
#[test]
fn build_refuses_a_model_declaration_the_graph_contradicts() {
    let ws = workspace("signature-checks");
    let dir = ws.path();
    let spec = fs::read_to_string(dir.join("bundle.toml")).unwrap();
    let declared = r#"inputs = [{ name = "input", datatype = "FP32", shape = ["batch", 64] }]"#;
    assert!(spec.contains(declared));
    for (wrong, needle) in [
        (
            r#"inputs = [{ name = "foo", datatype = "FP32", shape = [7, 9, 9] }]"#,
            "the spec declares input `foo` FP32 [7, 9, 9], the model's is `input` FP32 [?, 64]",
        ),
        (
            r#"inputs = [{ name = "input", datatype = "INT32", shape = ["batch", 64] }]"#,
            "declares input `input` INT32 [batch, 64]",
        ),
        (
            r#"inputs = [{ name = "input", datatype = "FP32", shape = ["batch", 63] }]"#,
            "declares input `input` FP32 [batch, 63]",
        ),
        (
            r#"inputs = [{ name = "input", datatype = "FP32", shape = ["batch", 64] }, { name = "extra", datatype = "FP32", shape = [1] }]"#,
            "the spec declares 2 inputs, the model has 1: `input` FP32 [?, 64]",
        ),
    ] {
        fs::write(dir.join("wrong.toml"), spec.replace(declared, wrong)).unwrap();
        let err = fails(dir, &["bundle", "build", "wrong.toml", "--out", "x.opb"]);
        assert!(
            err.contains("ONNX model `classifier` does not match its declaration"),
            "{err}"
        );
        assert!(err.contains(needle), "{wrong}: {err}");
        assert!(!dir.join("x.opb").exists());
    }
    let wrong_output = spec.replace(
        r#"name = "probabilities", datatype = "FP32", shape = ["batch", 10]"#,
        r#"name = "scores", datatype = "FP32", shape = ["batch", 10]"#,
    );
    fs::write(dir.join("wrong.toml"), wrong_output).unwrap();
    let err = fails(dir, &["bundle", "build", "wrong.toml", "--out", "x.opb"]);
    assert!(
        err.contains("declares output `scores` FP32 [batch, 10], the model's is `probabilities`"),
        "{err}"
    );
    // Narrowing a free dimension to a size is a valid declaration.
    fs::write(
        dir.join("narrow.toml"),
        spec.replace(
            declared,
            r#"inputs = [{ name = "input", datatype = "FP32", shape = [1, 64] }]"#,
        ),
    )
    .unwrap();
    ok(dir, &["bundle", "build", "narrow.toml", "--out", "x.opb"]);
}

#[test]
fn every_command_has_help() {
    let dir = std::env::temp_dir();
    for cmd in [
        &[][..],
        &["key"],
        &["key", "generate"],
        &["key", "trust"],
        &["bundle"],
        &["bundle", "build"],
        &["bundle", "sign"],
        &["bundle", "verify"],
        &["bundle", "inspect"],
        &["device"],
        &["device", "run"],
        &["device", "install"],
        &["device", "status"],
        &["device", "default-config"],
        &["batch"],
        &["model", "inspect"],
        &["guest"],
        &["guest", "new"],
        &["fleet", "compare"],
        &["fleet", "deploy"],
        &["demo"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = ok(&dir, &args);
        assert!(out.contains("Usage: outpost"), "{args:?}: {out}");
    }
}

/// `device check-config` reads a configuration as `device run` does, writes nothing, and names
/// what is wrong; `health` succeeds only on a 2xx answer.
#[test]
fn check_config_and_health_answer_by_exit_status() {
    let d = workspace("check-config");
    let dir = &d.0;
    let config = ok(dir, &["device", "default-config"])
        .replace("data_dir = \"/var/lib/outpost\"", "data_dir = \"data\"");
    assert!(config.contains("data_dir = \"data\""));
    fs::write(dir.join("device.toml"), config).unwrap();
    let out = ok(dir, &["device", "check-config", "--config", "device.toml"]);
    assert!(out.contains("device.toml: valid"), "{out}");
    assert!(
        !dir.join("data").exists(),
        "the check wrote the data directory"
    );
    fs::write(dir.join("bad.toml"), "listen = 8080\n").unwrap();
    let err = fails(dir, &["device", "check-config", "--config", "bad.toml"]);
    assert!(err.contains("listen"), "{err}");
    let err = fails(dir, &["device", "check-config", "--config", "missing.toml"]);
    assert!(err.contains("missing.toml"), "{err}");

    // Nothing listens on a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let err = fails(dir, &["health", "--url", &url, "--timeout", "2s"]);
    assert!(err.contains(&url), "{err}");
}
