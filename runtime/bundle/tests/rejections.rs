//! Every way a bundle is rejected, each with its own error, plus the round trip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use outpost_bundle::{
    BuildInput, Bundle, BundleError, ModelInput, ReadLimits, SecretKey, TrustStore,
};

fn input(counter: u64) -> BuildInput {
    BuildInput {
        name: "digits".into(),
        version: "1.2.3".parse().unwrap(),
        security_counter: counter,
        guest: b"\0asm\x01\0\0\0guest".to_vec(),
        models: vec![ModelInput {
            name: "classifier".into(),
            bytes: (0..700u32).map(|i| (i * 7) as u8).collect(),
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::F32,
                shape: vec![Dim::Symbolic("batch".into()), Dim::Fixed(64)],
            }],
            outputs: vec![],
            repairs: vec![],
            backend: None,
        }],
        api: Default::default(),
        limits: Default::default(),
        baseline: None,
        labels: vec!["zero".into(), "one".into()],
        metadata: Default::default(),
        serving: Default::default(),
    }
}

fn key() -> SecretKey {
    SecretKey::from_seed(&[11; 32])
}

fn signed(counter: u64) -> Vec<u8> {
    let mut b = Bundle::build(input(counter)).unwrap();
    b.sign(&key());
    b.to_bytes()
}

fn trust() -> TrustStore {
    let mut t = TrustStore::new();
    t.allow(key().public(), ["digits"]);
    t
}

fn verify(bytes: &[u8]) -> Result<outpost_bundle::VerifiedBundle, BundleError> {
    Bundle::read_verified(bytes, &ReadLimits::default(), &trust(), None)
}

/// One archive entry as the tests see it: name, tar type flag, declared size, data.
#[derive(Clone)]
struct Entry {
    name: Vec<u8>,
    typeflag: u8,
    size: u64,
    data: Vec<u8>,
}

fn entry(name: &str, data: &[u8]) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        typeflag: b'0',
        size: data.len() as u64,
        data: data.to_vec(),
    }
}

/// Splits a canonical bundle into entries (test-only, trusts its input).
fn entries(bytes: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut pos = 0;
    while bytes[pos..pos + 512].iter().any(|&b| b != 0) {
        let h = &bytes[pos..pos + 512];
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let size = u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap();
        let data = bytes[pos + 512..pos + 512 + size as usize].to_vec();
        out.push(Entry {
            name: h[..name_end].to_vec(),
            typeflag: h[156],
            size,
            data,
        });
        pos += 512 + (size as usize).div_ceil(512) * 512;
    }
    out
}

/// Writes entries as ustar, whatever they hold (links, hostile names, lying sizes).
fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        h[..e.name.len()].copy_from_slice(&e.name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", e.size).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[148..156].copy_from_slice(b"        ");
        h[156] = e.typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn edited(f: impl FnOnce(&mut Vec<Entry>)) -> Vec<u8> {
    let mut e = entries(&signed(1));
    f(&mut e);
    archive(&e)
}

#[test]
fn round_trip_build_sign_verify() {
    let bytes = signed(5);
    assert_eq!(
        archive(&entries(&bytes)),
        bytes,
        "test helpers reproduce the canonical form"
    );
    let v = verify(&bytes).unwrap();
    let m = v.manifest();
    assert_eq!(
        (m.name.as_str(), m.version.to_string()),
        ("digits", "1.2.3".into())
    );
    assert_eq!(m.security_counter, 5);
    assert_eq!(v.signer(), key().id());
    assert_eq!(v.guest(), b"\0asm\x01\0\0\0guest");
    assert_eq!(v.model("classifier").unwrap().len(), 700);
    assert_eq!(m.labels, ["zero", "one"]);
    // Re-writing a read bundle gives the same bytes: the format is canonical.
    assert_eq!(v.bundle().to_bytes(), bytes);
    // Building twice gives the same bytes: builds are reproducible.
    assert_eq!(signed(5), bytes);
}

#[test]
fn unknown_key() {
    let other = SecretKey::from_seed(&[12; 32]);
    let mut t = TrustStore::new();
    t.allow(other.public(), ["*"]);
    let err = Bundle::read_verified(&signed(1)[..], &ReadLimits::default(), &t, None);
    assert!(matches!(err, Err(BundleError::UnknownKey { ref key_id }) if key_id == key().id()));
}

#[test]
fn key_not_allowed_for_model() {
    let mut t = TrustStore::new();
    t.allow(key().public(), ["sensor-*", "digit"]);
    let err = Bundle::read_verified(&signed(1)[..], &ReadLimits::default(), &t, None);
    assert!(matches!(err, Err(BundleError::KeyNotAllowed { ref model, .. }) if model == "digits"));
}

#[test]
fn bad_signature() {
    // The signature of counter-1 bundle attached to the counter-2 manifest.
    let sig = entries(&signed(1))[1].clone();
    let mut e = entries(&signed(2));
    e[1] = sig;
    assert!(matches!(
        verify(&archive(&e)),
        Err(BundleError::BadSignature { .. })
    ));
}

#[test]
fn unsigned_bundle_refused() {
    let bytes = Bundle::build(input(1)).unwrap().to_bytes();
    assert!(Bundle::read(&bytes[..], &ReadLimits::default()).is_ok());
    assert!(matches!(verify(&bytes), Err(BundleError::Unsigned)));
}

#[test]
fn every_single_flipped_byte_is_rejected() {
    let bytes = signed(1);
    assert!(verify(&bytes).is_ok());
    for pos in 0..bytes.len() {
        for mask in [1u8 << (pos % 8), 0xff] {
            let mut bad = bytes.clone();
            bad[pos] ^= mask;
            assert!(
                verify(&bad).is_err(),
                "flip {mask:#04x} at byte {pos} accepted"
            );
        }
    }
}

#[test]
fn missing_listed_file() {
    let bytes = edited(|e| {
        e.retain(|e| e.name != b"models/classifier.onnx");
    });
    assert!(
        matches!(verify(&bytes), Err(BundleError::MissingFile { ref path }) if path == "models/classifier.onnx")
    );
}

#[test]
fn extra_unlisted_file() {
    let bytes = edited(|e| e.push(entry("extra.bin", b"surprise")));
    assert!(
        matches!(verify(&bytes), Err(BundleError::UnlistedFile { ref path }) if path == "extra.bin")
    );
}

#[test]
fn parent_and_absolute_paths() {
    for name in [
        "../guest.wasm",
        "models/../../etc/passwd",
        "/etc/passwd",
        "/guest.wasm",
    ] {
        let bytes = edited(|e| e.insert(2, entry(name, b"x")));
        assert!(
            matches!(verify(&bytes), Err(BundleError::UnsafePath { ref path, .. }) if path == name),
            "{name} not refused as unsafe"
        );
    }
}

#[test]
fn symlink_and_hard_link_entries() {
    for (flag, want_symlink) in [(b'2', true), (b'1', false)] {
        let bytes = edited(|e| {
            let mut link = entry("guest.wasm", b"");
            link.typeflag = flag;
            e[2] = link;
        });
        let err = verify(&bytes).unwrap_err();
        if want_symlink {
            assert!(matches!(err, BundleError::SymlinkEntry { .. }), "{err}");
        } else {
            assert!(matches!(err, BundleError::HardLinkEntry { .. }), "{err}");
        }
    }
    let bytes = edited(|e| {
        let mut dir = entry("models", b"");
        dir.typeflag = b'5';
        e.insert(2, dir);
    });
    assert!(matches!(
        verify(&bytes),
        Err(BundleError::UnsupportedEntryType { typeflag: '5', .. })
    ));
}

#[test]
fn duplicate_entries() {
    let bytes = edited(|e| {
        let again = e[2].clone();
        e.push(again);
    });
    assert!(
        matches!(verify(&bytes), Err(BundleError::DuplicateEntry { ref path }) if path == "guest.wasm")
    );
    let bytes = edited(|e| {
        let again = e[0].clone();
        e.push(again);
    });
    assert!(
        matches!(verify(&bytes), Err(BundleError::DuplicateEntry { ref path }) if path == "manifest.json")
    );
}

/// Counts how many bytes the reader pulled, to prove limits hit before reading.
struct Counting<'a> {
    inner: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

#[test]
fn oversized_entry_refused_before_reading() {
    let limits = ReadLimits {
        max_file_bytes: 1 << 20,
        ..ReadLimits::default()
    };
    // A header that claims 4 GiB for a listed file, followed by a little real data.
    let mut bytes = edited(|e| {
        e.truncate(2);
        e.push(Entry {
            name: b"guest.wasm".to_vec(),
            typeflag: b'0',
            size: 4 << 30,
            data: vec![],
        });
    });
    bytes.truncate(bytes.len() - 1024);
    bytes.extend_from_slice(&[0x55; 64 << 10]);
    let mut r = Counting {
        inner: &bytes,
        read: 0,
    };
    let err = Bundle::read_verified(&mut r, &limits, &trust(), None).unwrap_err();
    assert!(
        matches!(err, BundleError::EntryTooLarge { size, .. } if size == 4 << 30),
        "{err}"
    );
    assert!(
        r.read <= bytes.len() - (64 << 10),
        "read {} bytes of data",
        r.read
    );
}

#[test]
fn oversized_manifest_refused_before_reading() {
    let limits = ReadLimits {
        max_manifest_bytes: 4096,
        ..ReadLimits::default()
    };
    let huge = vec![b' '; 1 << 20];
    let bytes = archive(&[entry("manifest.json", &huge)]);
    let mut r = Counting {
        inner: &bytes,
        read: 0,
    };
    let err = Bundle::read(&mut r, &limits).unwrap_err();
    assert!(matches!(err, BundleError::ManifestTooLarge { size, limit: 4096 } if size == 1 << 20));
    assert_eq!(r.read, 512, "only the header was read");
}

#[test]
fn total_and_entry_count_limits() {
    let limits = ReadLimits {
        max_total_bytes: 100,
        ..ReadLimits::default()
    };
    let err = Bundle::read(&signed(1)[..], &limits).unwrap_err();
    assert!(
        matches!(err, BundleError::TotalTooLarge { limit: 100 }),
        "{err}"
    );
    let limits = ReadLimits {
        max_entries: 3,
        ..ReadLimits::default()
    };
    let err = Bundle::read(&signed(1)[..], &limits).unwrap_err();
    assert!(
        matches!(err, BundleError::TooManyEntries { limit: 3 }),
        "{err}"
    );
}

fn with_manifest(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    edited(|e| {
        let mut m: serde_json::Value = serde_json::from_slice(&e[0].data).unwrap();
        f(&mut m);
        e[0] = entry("manifest.json", &serde_json::to_vec(&m).unwrap());
    })
}

#[test]
fn unknown_format_version() {
    let bytes = with_manifest(|m| m["format_version"] = 2.into());
    assert!(matches!(
        verify(&bytes),
        Err(BundleError::UnsupportedFormatVersion {
            found: 2,
            supported: 1
        })
    ));
}

#[test]
fn unknown_manifest_field() {
    let bytes = with_manifest(|m| m["surprise"] = true.into());
    let err = verify(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::ManifestSyntax(_)));
    assert!(
        err.to_string().contains("unknown field `surprise`"),
        "{err}"
    );
}

#[test]
fn invalid_model_name() {
    let bytes = with_manifest(|m| m["name"] = "Digits!".into());
    assert!(matches!(
        verify(&bytes),
        Err(BundleError::InvalidManifest(_))
    ));
}

#[test]
fn manifest_must_come_first() {
    let bytes = edited(|e| e.swap(0, 2));
    assert!(matches!(verify(&bytes), Err(BundleError::MissingManifest)));
}

#[test]
fn trailing_data_and_truncation() {
    let mut bytes = signed(1);
    bytes.extend_from_slice(&[0; 512]);
    assert!(matches!(verify(&bytes), Err(BundleError::TrailingData)));
    let bytes = signed(1);
    for cut in [0, 100, 512, 1500, bytes.len() - 1] {
        assert!(verify(&bytes[..cut]).is_err(), "cut at {cut} accepted");
    }
}

#[test]
fn security_counter_below_highest_accepted() {
    let bytes = signed(3);
    let err = Bundle::read_verified(&bytes[..], &ReadLimits::default(), &trust(), Some(4));
    assert!(matches!(
        err,
        Err(BundleError::SecurityCounterRollback {
            counter: 3,
            highest: 4,
            ..
        })
    ));
    for ok in [None, Some(0), Some(3)] {
        assert!(Bundle::read_verified(&bytes[..], &ReadLimits::default(), &trust(), ok).is_ok());
    }
}

#[test]
fn size_and_hash_mismatch() {
    let bytes = edited(|e| e[2] = entry("guest.wasm", b"\0asm\x01\0\0\0guesT"));
    assert!(
        matches!(verify(&bytes), Err(BundleError::HashMismatch { ref path }) if path == "guest.wasm")
    );
    let bytes = edited(|e| e[2] = entry("guest.wasm", b"short"));
    assert!(matches!(
        verify(&bytes),
        Err(BundleError::SizeMismatch {
            expected: 13,
            actual: 5,
            ..
        })
    ));
}

#[test]
fn errors_read_like_sentences_for_operators() {
    let bytes = edited(|e| e.push(entry("extra.bin", b"x")));
    let msg = verify(&bytes).unwrap_err().to_string();
    assert_eq!(
        msg,
        "bundle holds `extra.bin`, which the manifest does not list"
    );
}
