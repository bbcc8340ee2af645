//! `docs/rules.md` against the parser: its example loads, and its tables name exactly the
//! fields the parser accepts (read from the parser's own unknown-field errors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use outpost_fleet::rules::RuleFile;

const DOC: &str = include_str!("../../../docs/rules.md");

fn accepted(probe: &str, prefix: &str) -> BTreeSet<String> {
    let err = toml::from_str::<RuleFile>(probe).unwrap_err().to_string();
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
fn the_example_loads() {
    let block = DOC
        .split("<!-- rules example -->")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the doc has its example");
    let dir = std::env::temp_dir().join(format!("outpost-rules-doc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("retrain.secret"), "0123456789abcdef0123\n").unwrap();
    let rules = RuleFile::load(block, &dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].spec.min_devices, 2);
}

#[test]
fn the_tables_name_every_field_the_parser_accepts_and_no_other() {
    let rule =
        "[[rule]]\nname = \"r\"\nmetric = \"accuracy\"\nmodel = \"m\"\nop = \"<\"\nthreshold = 1\n";
    let mut parser = BTreeSet::new();
    parser.extend(accepted(&format!("{rule}zzz = 1\n"), ""));
    parser.extend(accepted(
        &format!("{rule}[rule.webhook]\nurl = \"http://x\"\nzzz = 1\n"),
        "webhook.",
    ));
    parser.extend(accepted(
        &format!("{rule}[rule.command]\nargv = [\"x\"]\nzzz = 1\n"),
        "command.",
    ));
    for field in ["name", "cooldown_s", "webhook.secret_file", "command.argv"] {
        assert!(parser.contains(field), "{field} not in {parser:?}");
    }
    let documented: BTreeSet<String> = DOC
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .filter(|f| !f.contains(' '))
        .map(str::to_owned)
        .collect();
    assert_eq!(documented, parser);
}
