//! A write whose answer was lost (docs/sync-rules.md, "A write whose answer was lost"): a
//! timeout, or a 5xx that may come after the vendor made the change. The engine cannot know
//! whether it happened, so it keeps what it sent on the link (`links.unsure_write`). The next sync
//! of the pair looks: if the written side shows every value sent, the write happened, and the
//! snapshot takes the values a successful write would have given it. Without this the merge base
//! stays before the write, the written side looks changed by a person, and an edit made on the
//! other side meanwhile can lose the tie-break and be overwritten with Tether's own older value.

use serde_json::{json, Map, Value};
use sqlx::PgPool;

use super::merge::{normalize, Side};
use super::plan::idx;
use super::store::Link;
use crate::connectors::Record;

/// What a write that may have happened sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnsureWrite {
    pub side: Side,
    /// The fields sent, as that side names them.
    pub fields: Map<String, Value>,
    /// The snapshot the sync would have stored had the write answered.
    pub snapshot: Map<String, Value>,
}

impl UnsureWrite {
    fn to_json(&self) -> Value {
        json!({ "side": self.side.as_str(), "fields": self.fields, "snapshot": self.snapshot })
    }

    /// The stored form read back; `None` for anything else (it is then ignored).
    pub(crate) fn from_json(value: &Value) -> Option<UnsureWrite> {
        let side = match value.get("side")?.as_str()? {
            "source" => Side::Source,
            "target" => Side::Target,
            _ => return None,
        };
        Some(UnsureWrite {
            side,
            fields: value.get("fields")?.as_object()?.clone(),
            snapshot: value.get("snapshot")?.as_object()?.clone(),
        })
    }
}

/// Keeps `write` on the link until the pair's next stored sync clears it.
pub(crate) async fn remember(
    pool: &PgPool,
    link_id: i64,
    write: &UnsureWrite,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE links SET unsure_write = $2 WHERE id = $1 AND state = 'active'")
        .bind(link_id)
        .bind(write.to_json())
        .execute(pool)
        .await?;
    Ok(())
}

/// Before planning: an unsure write whose side shows every value it sent happened, so the
/// snapshot is the one it would have stored. The link keeps `unsure_write`, so the sync stores the
/// snapshot (and clears it) even if nothing else moves.
pub(crate) fn take_in(link: &mut Link, records: [&Record; 2]) {
    let Some(write) = &link.unsure_write else {
        return;
    };
    let shown = &records[idx(write.side)].fields;
    let happened = write
        .fields
        .iter()
        .all(|(field, sent)| holds(shown.get(field), sent));
    if happened {
        link.snapshot = write.snapshot.clone();
    }
}

/// Whether `actual` holds what was sent: objects key by key (a record has more fields than a
/// write sends), everything else as the merge compares values.
fn holds(actual: Option<&Value>, sent: &Value) -> bool {
    match (actual, sent) {
        (Some(Value::Object(actual)), Value::Object(sent)) => {
            sent.iter().all(|(k, v)| holds(actual.get(k), v))
        }
        (actual, sent) => normalize(actual) == normalize(Some(sent)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_write_is_held_by_a_record_with_more_fields() {
        let actual = json!({"name": "B", "address": {"city": "Oslo", "zip": "0150"}});
        assert!(holds(
            Some(&actual),
            &json!({"name": "B", "address": {"city": "Oslo"}})
        ));
        assert!(!holds(
            Some(&actual),
            &json!({"address": {"city": "Bergen"}})
        ));
        assert!(holds(None, &json!("")));
    }

    #[test]
    fn the_stored_form_reads_back() {
        let write = UnsureWrite {
            side: Side::Target,
            fields: json!({"name": "B"}).as_object().unwrap().clone(),
            snapshot: json!({"name>name": "B"}).as_object().unwrap().clone(),
        };
        assert_eq!(UnsureWrite::from_json(&write.to_json()), Some(write));
        assert_eq!(UnsureWrite::from_json(&json!({"side": "x"})), None);
    }
}
