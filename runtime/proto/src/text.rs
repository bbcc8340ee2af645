//! Text that crossed a trust boundary (a message from the broker, a name in a payload), made
//! safe to store, log and report: bounded in length, with no control characters.

/// Longest error text a device stores and reports (its `last_error`, a refusal's reason), in
/// bytes. A reported state therefore stays far below the 1 MiB an MQTT packet may carry.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Longest piece of foreign text quoted inside an error message, in bytes.
pub const MAX_QUOTED: usize = 64;

/// `text` with each control character replaced by U+FFFD and, when it is longer than `max`
/// bytes, cut at a character boundary and ended with `… (N more bytes)`, the whole at most
/// `max` bytes (for `max` of at least 32).
pub fn bounded(text: &str, max: usize) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    char::REPLACEMENT_CHARACTER
                } else {
                    c
                }
            })
            .collect()
    };
    let cleaned = clean(text);
    if cleaned.len() <= max {
        return cleaned;
    }
    // Room for the tail: "… (" + up to 20 digits + " more bytes)".
    let keep = max.saturating_sub(36);
    let mut cut = keep.min(cleaned.len());
    while !cleaned.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &cleaned[..cut], cleaned.len() - cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_unchanged() {
        assert_eq!(bounded("refused: bad key", 64), "refused: bad key");
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(bounded("a\nb\u{1b}[31mc", 64), "a\u{fffd}b\u{fffd}[31mc");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_within_the_bound() {
        for max in [32, 64, 100, MAX_ERROR_TEXT] {
            for text in ["x".repeat(1 << 20), "é".repeat(5000), "日本".repeat(999)] {
                let b = bounded(&text, max);
                assert!(b.len() <= max, "{max}: {} bytes", b.len());
                assert!(b.ends_with(" more bytes)"), "{b}");
            }
        }
    }
}
