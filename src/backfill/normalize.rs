//! How the backfill compares merge-criteria values: as a person would (docs/backfill.md,
//! "Matching"). Pure functions.
//!
//! Text is put in Unicode NFC (a precomposed "é" equals "e" + combining accent), trimmed, inner
//! runs of whitespace collapsed to one space, and lowercased (Unicode lowercase, so "ÆRØ" equals
//! "ærø"). E-mail addresses get the same treatment, which makes them case-insensitive in full:
//! the local part too, as every mail system in practice treats it. Numbers compare by their
//! value as text (`42` equals `"42"`, since vendors disagree on whether an id is a number), and
//! an empty value (null, absent, `""`, whitespace only, `[]`, `{}`) matches nothing.

use serde_json::Value;
use unicode_normalization::UnicodeNormalization as _;

/// A merge-criterion value as it is compared, or `None` when it is empty (an empty value never
/// matches, not even another empty value).
pub fn key(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(s) => Some(text(s)).filter(|t| !t.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) if a.is_empty() => None,
        Value::Object(o) if o.is_empty() => None,
        other => Some(other.to_string()),
    }
}

/// Text in NFC, trimmed, inner whitespace collapsed to single spaces, lowercased.
pub fn text(s: &str) -> String {
    let composed: String = s.nfc().collect();
    let collapsed = composed.split_whitespace().collect::<Vec<_>>().join(" ");
    // Lowercasing can decompose (a few capitals lower to a letter and a combining mark), so
    // compose again afterwards.
    collapsed.to_lowercase().nfc().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn k(v: Value) -> Option<String> {
        key(Some(&v))
    }

    #[test]
    fn text_is_trimmed_collapsed_and_case_insensitive() {
        assert_eq!(
            k(json!("  Acme   Trading\tBV \n")),
            k(json!("acme trading bv"))
        );
        assert_eq!(text("ACME  Corp"), "acme corp");
        assert_ne!(k(json!("Acme Corp")), k(json!("Acme Corporation")));
    }

    #[test]
    fn unicode_is_compared_in_nfc_and_lowercased() {
        // "é" precomposed (U+00E9) and "e" + U+0301.
        assert_eq!(k(json!("Caf\u{e9} Nord")), k(json!("CAFE\u{301} NORD")));
        assert_eq!(k(json!("ÆRØ Fisk")), k(json!("ærø fisk")));
        // Non-breaking and other Unicode spaces count as whitespace.
        assert_eq!(k(json!("Fjord\u{a0}Kraft")), k(json!("fjord kraft")));
    }

    #[test]
    fn emails_are_case_insensitive_in_full() {
        assert_eq!(
            k(json!(" Ada.Lovelace@Example.COM ")),
            k(json!("ada.lovelace@example.com"))
        );
        assert_ne!(k(json!("ada@example.com")), k(json!("ada@example.org")));
    }

    #[test]
    fn numbers_match_their_text_and_empties_match_nothing() {
        assert_eq!(k(json!(42)), k(json!("42")));
        assert_eq!(k(json!("")), None);
        assert_eq!(k(json!("   ")), None);
        assert_eq!(k(json!(null)), None);
        assert_eq!(k(json!([])), None);
        assert_eq!(key(None), None);
    }
}
