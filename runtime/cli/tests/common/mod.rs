//! Helpers shared by the CLI's integration tests: the real binary and signed digits bundles
//! made with it. The generic helpers (temporary directories, `eventually`, HTTP) are in
//! `outpost-testkit`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// The `outpost` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
}

/// Runs `outpost ARGS` in `dir`.
pub fn outpost(dir: &Path, args: &[&str]) -> Output {
    bin()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run outpost")
}

/// Starts `outpost device run --config CONFIG` in `dir` and returns it with the URL it
/// serves on (its config listens on port 0). Its log goes on being read, so it never blocks
/// on a full pipe.
pub fn run_device(dir: &Path, config: &str) -> (Child, String) {
    let mut child = bin()
        .args(["device", "run", "--config", config])
        .current_dir(dir)
        .env("OUTPOST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(i) = line.find("serving addr=") {
            let addr: String = line[i + 13..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            std::thread::spawn(move || lines.for_each(drop));
            return (child, format!("http://{addr}"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the device never said where it serves");
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = outpost(dir, args);
    assert!(
        out.status.success(),
        "outpost {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr after checking it is a clean error.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = outpost(dir, args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "outpost {args:?} succeeded");
    assert!(
        !stderr.contains("panicked"),
        "outpost {args:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.starts_with("error"),
        "no error line for {args:?}:\n{stderr}"
    );
    assert_no_repeated_cause(&stderr);
    stderr
}

/// Each `caused by:` line says something the lines above it did not already say.
pub fn assert_no_repeated_cause(stderr: &str) {
    let mut said: Vec<&str> = Vec::new();
    for line in stderr.lines() {
        if let Some(cause) = line.trim_start().strip_prefix("caused by: ") {
            assert!(
                !said.iter().any(|s| s.contains(cause.trim())),
                "the cause `{cause}` is printed twice:\n{stderr}"
            );
            said.push(line);
        } else if let Some(message) = line.strip_prefix("error: ") {
            said.push(message);
        }
    }
}

/// Writes a signer key pair (`signer.key`, `signer.pub`) and a `trust.toml` letting it sign
/// `digits`.
pub fn signer(dir: &Path) {
    ok(dir, &["key", "generate", "--out", "signer"]);
    let trust = ok(dir, &["key", "trust", "signer.pub", "--models", "digits"]);
    fs::write(dir.join("trust.toml"), trust).unwrap();
}

/// Writes the digits guest and model and a bundle spec `{version}.toml` for them.
pub fn digits_spec(dir: &Path, version: &str) {
    fs::write(dir.join("guest.wasm"), outpost_examples::DIGITS_GUEST).unwrap();
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    fs::write(
        dir.join(format!("{version}.toml")),
        format!(
            "name = \"digits\"\nversion = \"{version}\"\nsecurity_counter = 1\nguest = \"guest.wasm\"\n\
             [[model]]\nname = \"classifier\"\npath = \"digits.onnx\"\n\
             [api]\ninputs = [{{ name = \"pixels\", datatype = \"FP32\", shape = [1, 64] }}]\n"
        ),
    )
    .unwrap();
}

/// Builds `spec` into `out` and signs it with `signer.key`.
pub fn build_and_sign(dir: &Path, spec: &str, out: &str) {
    ok(dir, &["bundle", "build", spec, "--out", out]);
    ok(dir, &["bundle", "sign", out, "--key", "signer.key"]);
}
