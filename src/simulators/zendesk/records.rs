//! How the simulated Zendesk checks and shapes a record written through its API: unique and
//! required fields (case-insensitive, as Zendesk compares them), a new record built from its
//! template, an update applied field by field (server-owned fields ignored), ticket comments, and
//! the JSON envelope (docs/vendors.md, Zendesk).

use super::*;

/// A unique field's value as Zendesk compares it (case-insensitively); `None` for null.
pub(super) fn unique_key(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.to_lowercase()),
        other => Some(other.to_string()),
    }
}

pub(super) fn ci_eq(a: &Value, b: &Value) -> bool {
    match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => a
            .chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase)),
        _ => a == b,
    }
}

pub(super) fn unique_value(record: &Map<String, Value>, key: &str) -> Option<String> {
    record.get(key).and_then(unique_key)
}

pub(super) fn text(value: Option<&Value>) -> Option<&str> {
    value
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// Checks required and unique fields of `candidate` (the record as it would be stored).
pub(super) fn validate(
    state: &Store,
    kind: Kind,
    candidate: &Map<String, Value>,
    own_id: Option<u64>,
) -> Result<(), Box<Response>> {
    let unique = |key: &'static str, label: &str| -> Result<(), Box<Response>> {
        if let Some(value) = candidate.get(key).filter(|v| !v.is_null()) {
            if state.taken(kind, key, value, own_id) {
                return Err(invalid_boxed(
                    key,
                    "DuplicateValue",
                    format!("{label}: has already been taken"),
                ));
            }
        }
        Ok(())
    };
    match kind {
        Kind::Organization => {
            if text(candidate.get("name")).is_none() {
                return Err(invalid_boxed(
                    "name",
                    "BlankValue",
                    "Name: cannot be blank".into(),
                ));
            }
            unique("name", "Name")?;
            unique("external_id", "External ID")?;
        }
        Kind::User => {
            if text(candidate.get("name")).is_none() {
                return Err(invalid_boxed(
                    "name",
                    "BlankValue",
                    "Name: cannot be blank".into(),
                ));
            }
            let role = candidate.get("role").and_then(Value::as_str);
            if !matches!(role, Some("end-user" | "agent" | "admin")) {
                return Err(invalid_boxed(
                    "role",
                    "InvalidValue",
                    "Role: is not included in the list".into(),
                ));
            }
            unique("email", "Email")?;
            unique("external_id", "External ID")?;
        }
        Kind::Ticket => {
            if let Some(status) = candidate.get("status").and_then(Value::as_str) {
                if !matches!(
                    status,
                    "new" | "open" | "pending" | "hold" | "solved" | "closed"
                ) {
                    return Err(invalid_boxed(
                        "status",
                        "InvalidValue",
                        "Status: is not valid".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Stores a new record built from `input` (writable keys only) and, for tickets, its first comment.
pub(super) fn build(
    state: &mut Store,
    kind: Kind,
    input: &Map<String, Value>,
    origin: &str,
) -> Map<String, Value> {
    let mut record = kind.template();
    apply(kind, &mut record, input);
    let id = state.id();
    let at = timestamp(now());
    record.insert("id".into(), json!(id));
    record.insert(
        "url".into(),
        json!(format!("{origin}/api/v2/{}/{id}.json", kind.plural())),
    );
    record.insert("created_at".into(), json!(at));
    record.insert("updated_at".into(), json!(at));
    if kind == Kind::Ticket {
        // Zendesk files a ticket under its requester's organization unless told otherwise.
        if record.get("organization_id").is_some_and(Value::is_null) {
            let requester_org = record
                .get("requester_id")
                .and_then(Value::as_u64)
                .and_then(|r| state.users.get(&r))
                .and_then(|u| u.body.get("organization_id"))
                .cloned();
            if let Some(org) = requester_org {
                record.insert("organization_id".into(), org);
            }
        }
        if let Some(Value::Object(comment)) = input.get("comment") {
            let body = comment_text(comment);
            record.insert("description".into(), json!(body));
            if record.get("submitter_id").is_some_and(Value::is_null) {
                let requester = record.get("requester_id").cloned().unwrap_or(Value::Null);
                record.insert("submitter_id".into(), requester);
            }
            let author = record.get("submitter_id").cloned().unwrap_or(Value::Null);
            add_comment(state, id, comment, author);
        }
    }
    state.put(kind, id, record.clone());
    record
}

/// Copies the writable keys of `input` onto `record`; returns the keys whose value changed.
pub(super) fn apply(
    kind: Kind,
    record: &mut Map<String, Value>,
    input: &Map<String, Value>,
) -> Vec<String> {
    let template = kind.template();
    let mut changed = Vec::new();
    for (key, value) in input {
        if READ_ONLY.contains(&key.as_str())
            || kind.server_owned(key)
            || !template.contains_key(key)
        {
            continue;
        }
        if record.get(key) != Some(value) {
            record.insert(key.clone(), value.clone());
            changed.push(key.clone());
        }
    }
    changed
}

pub(super) fn comment_text(comment: &Map<String, Value>) -> String {
    text(comment.get("body"))
        .or_else(|| text(comment.get("html_body")))
        .unwrap_or_default()
        .to_owned()
}

pub(super) fn add_comment(
    state: &mut Store,
    ticket_id: u64,
    input: &Map<String, Value>,
    default_author: Value,
) -> (Map<String, Value>, u64) {
    let id = state.id();
    let audit_id = state.id();
    let body = comment_text(input);
    let author = input
        .get("author_id")
        .filter(|v| !v.is_null())
        .cloned()
        .unwrap_or(default_author);
    let mut comment = Map::new();
    comment.insert("id".into(), json!(id));
    comment.insert("type".into(), json!("Comment"));
    comment.insert("author_id".into(), author);
    comment.insert("body".into(), json!(body));
    comment.insert(
        "html_body".into(),
        json!(format!("<div class=\"zd-comment\"><p>{body}</p></div>")),
    );
    comment.insert("plain_body".into(), json!(body));
    comment.insert(
        "public".into(),
        input.get("public").cloned().unwrap_or(json!(true)),
    );
    comment.insert("attachments".into(), json!([]));
    comment.insert("audit_id".into(), json!(audit_id));
    comment.insert("via".into(), json!({"channel": "api"}));
    comment.insert("metadata".into(), json!({}));
    let at = now();
    comment.insert("created_at".into(), json!(timestamp(at)));
    state
        .comments
        .entry(ticket_id)
        .or_default()
        .push(comment.clone());
    state.audits.push(events::Audit {
        id: audit_id,
        ticket_id,
        at,
        author: comment["author_id"].clone(),
        child: events::Child::Comment(id),
    });
    (comment, audit_id)
}

pub(super) fn envelope(kind: Kind, record: &Map<String, Value>) -> Value {
    json!({ kind.singular(): record })
}
