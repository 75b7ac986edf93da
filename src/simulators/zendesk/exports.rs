//! The incremental export endpoints (time-based for organizations, cursor-based for the rest)
//! and the event `detail` a webhook carries (docs/vendors.md, Zendesk).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::listing::{link, query_get};
use super::{bad_request, life, now, origin, seconds_of, Kind, Shared, Stored, MAX_EXPORT_PAGE};
use crate::simulators::kit;

/// Zendesk refuses a `start_time` less than a minute old.
pub(super) fn too_recent(start: i64) -> Option<Response> {
    (start > now().timestamp() - 60).then(|| {
        kit::respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "error": "InvalidValue",
                "description": "Too recent start_time. Use a start_time older than 1 minute",
            }),
        )
    })
}

pub(super) fn export_page_size(query: &[(String, String)]) -> usize {
    query_get(query, "per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_EXPORT_PAGE)
        .clamp(1, MAX_EXPORT_PAGE)
}

/// Time-based export: records updated at or after `start_time`, oldest change first. A page is
/// extended to hold every record sharing its last second, so `end_time` can be the next start.
pub(super) async fn incremental_organizations(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let Some(start) = query_get(&query, "start_time").and_then(|v| v.parse::<i64>().ok()) else {
        return bad_request("start_time is required (unix seconds)");
    };
    if let Some(response) = too_recent(start) {
        return response;
    }
    let per_page = export_page_size(&query);
    let state = shared.state.lock().unwrap();
    let mut changed: Vec<&Stored> = state
        .organizations
        .values()
        .filter(|s| seconds_of(&s.body, "updated_at") >= start)
        .collect();
    changed.sort_by_key(|s| s.seq);
    let mut take = changed.len().min(per_page);
    if take > 0 {
        let last = seconds_of(&changed[take - 1].body, "updated_at");
        while take < changed.len() && seconds_of(&changed[take].body, "updated_at") == last {
            take += 1;
        }
    }
    let end_of_stream = take == changed.len();
    let end_time = changed[..take]
        .last()
        .map(|s| seconds_of(&s.body, "updated_at"))
        .unwrap_or(start);
    let records: Vec<Value> = changed[..take]
        .iter()
        .map(|s| Value::Object(s.body.clone()))
        .collect();
    let next = link(
        &origin(&headers),
        "/api/v2/incremental/organizations",
        &query,
        &[("start_time", end_time.to_string())],
    );
    kit::respond(
        StatusCode::OK,
        json!({
            "organizations": records,
            "count": take,
            "end_time": end_time,
            "end_of_stream": end_of_stream,
            "next_page": next,
        }),
    )
}

pub(super) fn encode_seq(seq: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

pub(super) fn decode_seq(raw: &str) -> Option<u64> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("seq:")?
        .parse()
        .ok()
}

/// Cursor-based export (users, tickets): `start_time` for the first page, then `cursor`.
pub(super) async fn incremental_cursor(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    enum From {
        Time(i64),
        Seq(u64),
    }
    let from = match (query_get(&query, "cursor"), query_get(&query, "start_time")) {
        (Some(c), _) => match decode_seq(c) {
            Some(seq) => From::Seq(seq),
            None => return bad_request("cursor is not valid"),
        },
        (None, Some(t)) => match t.parse::<i64>() {
            Ok(t) => {
                if let Some(response) = too_recent(t) {
                    return response;
                }
                From::Time(t)
            }
            Err(_) => return bad_request("start_time must be unix seconds"),
        },
        (None, None) => return bad_request("start_time or cursor is required"),
    };
    let per_page = export_page_size(&query);
    let state = shared.state.lock().unwrap();
    let mut changed: Vec<&Stored> = state
        .table(kind)
        .values()
        .filter(|s| match from {
            From::Time(t) => seconds_of(&s.body, "updated_at") >= t,
            From::Seq(seq) => s.seq > seq,
        })
        .collect();
    changed.sort_by_key(|s| s.seq);
    let end_of_stream = changed.len() <= per_page;
    let page = &changed[..changed.len().min(per_page)];
    let after_seq = page.last().map(|s| s.seq).unwrap_or(match from {
        From::Seq(seq) => seq,
        // Nothing changed since that time: continue after everything older.
        From::Time(_) => state.next_seq,
    });
    let after_cursor = encode_seq(after_seq);
    let path = format!("/api/v2/incremental/{}/cursor", kind.plural());
    let base = origin(&headers);
    let plain: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| k != "start_time" && k != "cursor")
        .cloned()
        .collect();
    let after_url = link(&base, &path, &plain, &[("cursor", after_cursor.clone())]);
    let records: Vec<Value> = page
        .iter()
        .map(|s| life::as_exported(&state, kind, &s.body))
        .collect();
    kit::respond(
        StatusCode::OK,
        json!({
            kind.plural(): records,
            "after_cursor": after_cursor,
            "after_url": after_url,
            "before_cursor": null,
            "before_url": null,
            "end_of_stream": end_of_stream,
        }),
    )
}

pub(super) fn id_string(value: &Value) -> Value {
    match value {
        Value::Number(n) => Value::String(n.to_string()),
        other => other.clone(),
    }
}

/// The `detail` snapshot of an event: the documented properties, ids as strings.
pub(super) fn detail(kind: Kind, record: &Map<String, Value>) -> Value {
    let keys: &[&str] = match kind {
        Kind::Organization => &[
            "created_at",
            "external_id",
            "group_id",
            "id",
            "name",
            "shared_comments",
            "shared_tickets",
            "updated_at",
        ],
        Kind::User => &[
            "created_at",
            "email",
            "external_id",
            "default_group_id",
            "id",
            "organization_id",
            "role",
            "updated_at",
        ],
        Kind::Ticket => &[
            "assignee_id",
            "created_at",
            "description",
            "external_id",
            "group_id",
            "id",
            "organization_id",
            "priority",
            "requester_id",
            "status",
            "subject",
            "submitter_id",
            "tags",
            "type",
            "updated_at",
        ],
    };
    let mut out = Map::new();
    for key in keys {
        let value = record.get(*key).cloned().unwrap_or(Value::Null);
        let value = if *key == "id" || key.ends_with("_id") && *key != "external_id" {
            id_string(&value)
        } else {
            value
        };
        out.insert((*key).to_owned(), value);
    }
    if kind == Kind::Ticket {
        out.insert("is_public".into(), json!(true));
        out.insert("via".into(), json!({"channel": "api_call"}));
        out.insert("actor_id".into(), json!("-1"));
    }
    Value::Object(out)
}
