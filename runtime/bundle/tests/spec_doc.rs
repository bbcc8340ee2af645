//! `docs/bundle-spec.md` against the parser: its complete example parses, and its tables name
//! exactly the fields the parser accepts (read from the parser's own unknown-field errors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use outpost_bundle::spec::Spec;

const DOC: &str = include_str!("../../../docs/bundle-spec.md");

/// The fields serde expects where `probe` puts an unknown one, from its error message.
fn accepted(probe: &str, prefix: &str) -> BTreeSet<String> {
    let base = "name = \"m\"\nversion = \"1.0.0\"\nsecurity_counter = 1\n";
    let err = Spec::parse(&format!("{base}{probe}"))
        .unwrap_err()
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no field list in: {err}"));
    // `a`, `b`, `c` or, for two fields, `a` or `b`.
    list.replace(" or ", ",")
        .split(',')
        .filter_map(|f| f.trim().strip_prefix('`')?.split('`').next())
        .map(|f| format!("{prefix}{f}"))
        .collect()
}

/// The fields the baseline's JSON accepts where `probe` puts an unknown one.
fn accepted_json(probe: &str, prefix: &str) -> BTreeSet<String> {
    let err = serde_json::from_str::<outpost_bundle::manifest::Baseline>(probe)
        .unwrap_err()
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in: {err}"));
    list.split(',')
        .filter_map(|f| f.trim().strip_prefix('`')?.split('`').next())
        .map(|f| format!("{prefix}{f}"))
        .collect()
}

#[test]
fn the_baseline_example_parses_and_validates() {
    let block = DOC
        .split("## `baseline`")
        .nth(1)
        .and_then(|rest| rest.split("```json\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the doc has its baseline example");
    let b: outpost_bundle::manifest::Baseline = serde_json::from_str(block).unwrap();
    outpost_bundle::drift::validate(&b).unwrap();
    assert_eq!(b.outputs.len(), 1);
}

#[test]
fn the_complete_example_parses() {
    let block = DOC
        .split("<!-- complete example -->")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the doc has its complete example");
    let spec = Spec::parse(block).unwrap();
    assert_eq!(spec.name, "digits");
    assert_eq!(spec.model.len(), 1);
    assert_eq!(spec.limits.timeout_ms, 500);
}

#[test]
fn the_tables_name_every_field_the_parser_accepts_and_no_other() {
    let mut parser = BTreeSet::new();
    parser.extend(accepted("zzz = 1\n", ""));
    parser.extend(accepted("[[model]]\nzzz = 1\n", "model."));
    parser.extend(accepted("[api]\nzzz = 1\n", "api."));
    parser.extend(accepted("[limits]\nzzz = 1\n", "limits."));
    parser.extend(accepted("[api]\ninputs = [{ zzz = 1 }]\n", "tensor."));
    parser.extend(accepted("[serving]\nzzz = 1\n", "serving."));
    parser.extend(accepted("[serving.batching]\nzzz = 1\n", "batching."));
    parser.extend(accepted("[serving.cache]\nzzz = 1\n", "cache."));
    parser.extend(accepted("[serving.sessions]\nzzz = 1\n", "sessions."));
    parser.extend(accepted_json(r#"{"zzz": 1}"#, "baseline."));
    parser.extend(accepted_json(r#"{"features": [{"zzz": 1}]}"#, "feature."));
    for field in [
        "guest",
        "model.inputs",
        "api.raw_content_types",
        "limits.timeout_ms",
        "tensor.shape",
        "batching.max_queue_delay_us",
        "sessions.idle_timeout_s",
    ] {
        assert!(parser.contains(field), "{field} not in {parser:?}");
    }
    let documented: BTreeSet<String> = DOC
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(documented, parser);
}
