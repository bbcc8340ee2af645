//! Fuzzes the bundle reader: any input must give `Ok` or a `BundleError`, never a panic, and
//! never an allocation beyond the read limits.
//!
//! Run with `.ci/fuzz bundle_reader SECONDS` (stable toolchain; see `.ci/fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};

fuzz_target!(|data: &[u8]| {
    let limits = ReadLimits {
        max_manifest_bytes: 64 << 10,
        max_file_bytes: 1 << 20,
        max_total_bytes: 2 << 20,
        max_entries: 16,
    };
    let _ = Bundle::read(data, &limits);
    let mut trust = TrustStore::new();
    trust.allow(SecretKey::from_seed(&[1; 32]).public(), ["*"]);
    if let Ok(b) = Bundle::read_verified(data, &limits, &trust, Some(1)) {
        // Whatever verifies must re-serialize to exactly the input: the format is canonical.
        assert_eq!(b.bundle().to_bytes(), data);
    }
});
