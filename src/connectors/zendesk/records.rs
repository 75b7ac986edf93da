//! Zendesk's JSON as `Record`s and back: envelopes, ids, timestamps, which fields are data and
//! which may be written, and how merge criteria are compared (docs/vendors.md, Zendesk).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{bad_input, malformed, Entity, READ_ONLY};
use crate::connectors::{get_path, ConnectorError, Record};

pub(super) fn array(page: &Value, key: &str) -> Result<Vec<Value>, ConnectorError> {
    page.get(key)
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| malformed(format!("no `{key}` list in the answer")))
}

pub(super) fn envelope<'a>(answer: &'a Value, key: &str) -> Result<&'a Value, ConnectorError> {
    answer
        .get(key)
        .filter(|v| v.is_object())
        .ok_or_else(|| malformed(format!("no `{key}` object in the answer")))
}

/// A Zendesk id as a number: JSON numbers, or strings of digits.
pub(super) fn as_id(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn parse_numeric_id(entity: Entity, id: &str) -> Result<u64, ConnectorError> {
    id.trim().parse().map_err(|_| {
        bad_input(format!(
            "a Zendesk {} id is a number, got {id:?}",
            entity.singular()
        ))
    })
}

/// `"{ticket_id}:{comment_id}"`.
pub(super) fn parse_comment_id(id: &str) -> Result<(u64, u64), ConnectorError> {
    let parsed = id
        .split_once(':')
        .and_then(|(t, c)| Some((t.trim().parse().ok()?, c.trim().parse().ok()?)));
    parsed.ok_or_else(|| {
        bad_input(format!(
            "a Ticketcomments id is \"{{ticket_id}}:{{comment_id}}\", got {id:?}"
        ))
    })
}

pub(super) fn timestamp(value: Option<&Value>) -> Option<DateTime<Utc>> {
    value
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The fields of a Zendesk object without its read-only ones.
pub(super) fn data_fields(object: &Map<String, Value>) -> Map<String, Value> {
    object
        .iter()
        .filter(|(k, _)| !READ_ONLY.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Zendesk's reference fields, which its API types as integers.
pub(super) const ID_FIELDS: &[&str] = &[
    "organization_id",
    "requester_id",
    "submitter_id",
    "assignee_id",
    "group_id",
    "default_group_id",
];

/// What may be sent: the given fields without the read-only ones. A reference arrives from the
/// sync engine as the registry's `string` (a translated id such as `"360000000001"`); Zendesk
/// types these fields as integers, so a numeric string is sent as the number it is.
pub(super) fn writable(fields: &Map<String, Value>) -> Map<String, Value> {
    let mut out = data_fields(fields);
    for key in ID_FIELDS {
        if let Some(Value::String(text)) = out.get(*key) {
            if let Ok(number) = text.parse::<u64>() {
                out.insert((*key).to_owned(), json!(number));
            }
        }
    }
    out
}

pub(super) fn record(entity: Entity, value: &Value) -> Result<Record, ConnectorError> {
    let object = value
        .as_object()
        .ok_or_else(|| malformed(format!("a {} is not an object", entity.singular())))?;
    let id = object
        .get("id")
        .and_then(as_id)
        .ok_or_else(|| malformed(format!("a {} without a numeric id", entity.singular())))?;
    Ok(Record {
        id: id.to_string(),
        updated_at: timestamp(object.get("updated_at")),
        fields: data_fields(object),
    })
}

pub(super) fn comment_record(ticket_id: u64, value: &Value) -> Result<Record, ConnectorError> {
    let object = value
        .as_object()
        .ok_or_else(|| malformed("a comment is not an object"))?;
    let id = object
        .get("id")
        .and_then(as_id)
        .ok_or_else(|| malformed("a comment without a numeric id"))?;
    let mut fields = data_fields(object);
    fields.insert("ticket_id".into(), json!(ticket_id));
    Ok(Record {
        id: format!("{ticket_id}:{id}"),
        // Comments never change after they are added.
        updated_at: timestamp(object.get("created_at")),
        fields,
    })
}

/// Zendesk compares names, emails and external ids case-insensitively.
pub(super) fn values_match(key: &str, actual: Option<&Value>, expected: &Value) -> bool {
    let Some(actual) = actual else {
        return expected.is_null();
    };
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match (text(actual), text(expected)) {
        (Some(a), Some(e)) => {
            let last = key.rsplit('.').next().unwrap_or(key);
            if matches!(last, "name" | "email" | "external_id") {
                a.to_lowercase() == e.to_lowercase()
            } else {
                a == e
            }
        }
        _ => actual == expected,
    }
}

pub(super) fn matches_all(record: &Record, criteria: &Map<String, Value>) -> bool {
    criteria.iter().all(|(path, expected)| {
        if path == "id" {
            return values_match(path, Some(&json!(record.id)), expected);
        }
        values_match(path, get_path(&record.fields, path), expected)
    })
}

/// An `external_id` criterion `show_many` can look up (its list is comma-separated).
pub(super) fn lookup_id(criteria: &Map<String, Value>) -> Option<String> {
    criterion(criteria, "external_id").filter(|id| !id.contains(','))
}

/// A criterion usable as a search term: a non-empty string or a number.
pub(super) fn criterion(criteria: &Map<String, Value>, key: &str) -> Option<String> {
    match criteria.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
