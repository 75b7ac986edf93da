//! The three-way merge of one property (rule 4), as a pure decision so it can be tested alone.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// A side of a dataflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// What to do with one property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Neither side changed since the snapshot.
    Unchanged,
    /// Both sides hold the same value already (e.g. our own write came back before its snapshot
    /// was stored): nothing to write, the snapshot takes the value.
    Converged,
    /// Write the winner's value to the given side.
    WriteTo(Side),
    /// Only one side changed, to an empty value, and the other side's is not empty: nothing is
    /// written (an empty value never overwrites a non-empty one) and the snapshot keeps its base.
    KeepNonEmpty,
}

/// What the engine knows about one property on both sides.
#[derive(Debug, Clone, Copy)]
pub struct PropertyFacts {
    pub source_changed: bool,
    pub target_changed: bool,
    /// The two sides hold the same value (references compared after translation).
    pub equal: bool,
    pub source_empty: bool,
    pub target_empty: bool,
    pub source_updated_at: Option<DateTime<Utc>>,
    pub target_updated_at: Option<DateTime<Utc>>,
    /// The side whose event is being processed: it wins a tie of timestamps.
    pub event_side: Side,
}

pub fn decide(f: &PropertyFacts) -> Decision {
    if !f.source_changed && !f.target_changed {
        return Decision::Unchanged;
    }
    if f.equal {
        return Decision::Converged;
    }
    let winner = match (f.source_changed, f.target_changed) {
        (true, false) => Side::Source,
        (false, true) => Side::Target,
        // Changed on both sides (or no base yet) and only one side holds a value: that value
        // wins whatever the times, since an empty value never overwrites a non-empty one.
        _ if f.source_empty != f.target_empty => {
            if f.source_empty {
                Side::Target
            } else {
                Side::Source
            }
        }
        _ => match f.source_updated_at.cmp(&f.target_updated_at) {
            std::cmp::Ordering::Greater => Side::Source,
            std::cmp::Ordering::Less => Side::Target,
            std::cmp::Ordering::Equal => f.event_side,
        },
    };
    let (winner_empty, loser_empty) = match winner {
        Side::Source => (f.source_empty, f.target_empty),
        Side::Target => (f.target_empty, f.source_empty),
    };
    if winner_empty && !loser_empty {
        return Decision::KeepNonEmpty;
    }
    Decision::WriteTo(winner.other())
}

/// Null, a missing value, an empty string, array or object all count as empty; they are compared
/// as `null` so a vendor answering `""` for a cleared field is not a change.
pub fn normalize(value: Option<&Value>) -> Value {
    match value {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.is_empty() => Value::Null,
        Some(Value::Array(a)) if a.is_empty() => Value::Null,
        Some(Value::Object(o)) if o.is_empty() => Value::Null,
        Some(v) => v.clone(),
    }
}

/// A reference id as a string (`42` and `"42"` are the same id), `None` when empty.
pub fn ref_id(value: Option<&Value>) -> Option<String> {
    match normalize(value) {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(s: bool, t: bool) -> PropertyFacts {
        PropertyFacts {
            source_changed: s,
            target_changed: t,
            equal: false,
            source_empty: false,
            target_empty: false,
            source_updated_at: None,
            target_updated_at: None,
            event_side: Side::Source,
        }
    }

    #[test]
    fn one_side_changed_wins() {
        assert_eq!(decide(&facts(true, false)), Decision::WriteTo(Side::Target));
        assert_eq!(decide(&facts(false, true)), Decision::WriteTo(Side::Source));
        assert_eq!(decide(&facts(false, false)), Decision::Unchanged);
    }

    #[test]
    fn both_changed_later_wins_and_ties_go_to_the_event_side() {
        let early = Utc::now();
        let late = early + chrono::Duration::seconds(1);
        let mut f = facts(true, true);
        f.source_updated_at = Some(late);
        f.target_updated_at = Some(early);
        assert_eq!(decide(&f), Decision::WriteTo(Side::Target));
        f.source_updated_at = Some(early);
        f.target_updated_at = Some(late);
        assert_eq!(decide(&f), Decision::WriteTo(Side::Source));
        f.target_updated_at = Some(early);
        f.event_side = Side::Target;
        assert_eq!(decide(&f), Decision::WriteTo(Side::Source));
    }

    #[test]
    fn empty_never_overwrites_non_empty() {
        let mut f = facts(true, false);
        f.source_empty = true;
        assert_eq!(decide(&f), Decision::KeepNonEmpty);
        f.target_empty = true;
        assert_eq!(decide(&f), Decision::WriteTo(Side::Target));
    }

    #[test]
    fn changed_on_both_sides_the_non_empty_value_wins() {
        let early = Utc::now();
        let mut f = facts(true, true);
        f.source_empty = true;
        f.source_updated_at = Some(early + chrono::Duration::seconds(1));
        f.target_updated_at = Some(early);
        assert_eq!(decide(&f), Decision::WriteTo(Side::Source));
    }

    #[test]
    fn equal_values_converge() {
        let mut f = facts(true, true);
        f.equal = true;
        assert_eq!(decide(&f), Decision::Converged);
    }

    #[test]
    fn empties_normalize_and_ids_stringify() {
        assert_eq!(normalize(Some(&Value::String(String::new()))), Value::Null);
        assert_eq!(normalize(None), Value::Null);
        assert_eq!(ref_id(Some(&serde_json::json!(42))), Some("42".into()));
        assert_eq!(ref_id(Some(&serde_json::json!(""))), None);
    }
}
