//! Fuzzes the configuration files Outpost reads that the fuzz build can reach without the
//! runtime: the trust store (`trust.toml`) and the bundle spec. Nothing may panic, and a spec
//! that parses writes back to TOML that parses again.
//!
//! Input: a selector byte, then the file's text. Run with `.ci/fuzz config_files SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle::TrustStore;
use outpost_bundle::spec::Spec;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if which % 2 == 0 {
        let _ = TrustStore::from_toml_str(text);
    } else if let Ok(spec) = Spec::parse(text) {
        let written = spec.to_toml().expect("a parsed spec writes back");
        Spec::parse(&written).expect("a written spec parses again");
    }
});
