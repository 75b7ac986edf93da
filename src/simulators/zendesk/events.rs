//! `GET /api/v2/incremental/ticket_events`: the ticket audits, time-based (docs/vendors.md, Zendesk
//! "Comments come from the ticket-event export"). Every comment added, redacted or made private
//! is one audit; with `include=comment_events` the comment itself is a child event (rendered from
//! the comment as it is now, so a redacted text never comes back), without it the audit says only
//! `comment_present` and `comment_public`. As in Zendesk, `start_time` must be a minute old and
//! the events of the last minute are left out; a page holds the whole of its last second, so
//! `end_time` is the next `start_time` (and the next page repeats that second's events).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Duration as Span, Utc};
use serde_json::{json, Value};

use super::{
    export_page_size, link, now, origin, query_get, timestamp, too_recent, Shared, Store,
    ZendeskSimHandle,
};
use crate::simulators::kit;

/// Events younger than this are not exported yet.
const HELD_BACK_SECS: i64 = 60;

/// One ticket audit.
pub(super) struct Audit {
    pub id: u64,
    pub ticket_id: u64,
    pub at: DateTime<Utc>,
    pub author: Value,
    pub child: Child,
}

/// What the audit did to a comment.
pub(super) enum Child {
    /// The comment was added (the child event's id is the comment's).
    Comment(u64),
    /// Text was redacted from the comment (`CommentRedactionEvent`).
    Redaction { id: u64, comment: u64 },
    /// The comment was made private (`CommentPrivacyChange`).
    Privacy { id: u64, comment: u64 },
}

impl Child {
    fn comment_id(&self) -> u64 {
        match self {
            Child::Comment(id) => *id,
            Child::Redaction { comment, .. } | Child::Privacy { comment, .. } => *comment,
        }
    }
}

fn comment_of(
    state: &Store,
    ticket_id: u64,
    comment_id: u64,
) -> Option<&serde_json::Map<String, Value>> {
    state
        .comments
        .get(&ticket_id)?
        .iter()
        .find(|c| c["id"].as_u64() == Some(comment_id))
}

/// The export's view of one audit.
fn render(state: &Store, audit: &Audit, with_comments: bool) -> Value {
    let comment = comment_of(state, audit.ticket_id, audit.child.comment_id());
    let child = match (&audit.child, comment) {
        (Child::Comment(_), Some(comment)) if with_comments => {
            let mut event = comment.clone();
            event.insert("event_type".into(), json!("Comment"));
            vec![Value::Object(event)]
        }
        (Child::Comment(_), _) => vec![],
        (Child::Redaction { id, comment }, _) => vec![json!({
            "id": id, "type": "CommentRedactionEvent", "event_type": "CommentRedactionEvent",
            "comment_id": comment,
        })],
        (Child::Privacy { id, comment }, _) => vec![json!({
            "id": id, "type": "CommentPrivacyChange", "event_type": "CommentPrivacyChange",
            "comment_id": comment, "public": false,
        })],
    };
    let is_comment = matches!(audit.child, Child::Comment(_));
    json!({
        "id": audit.id,
        "ticket_id": audit.ticket_id,
        "timestamp": audit.at.timestamp(),
        "created_at": timestamp(audit.at),
        "updater_id": audit.author,
        "via": {"channel": "api"},
        "event_type": "Audit",
        "comment_present": is_comment,
        "comment_public": is_comment && comment.is_some_and(|c| c["public"] == json!(true)),
        "child_events": child,
    })
}

pub(super) async fn ticket_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let Some(start) = query_get(&query, "start_time").and_then(|v| v.parse::<i64>().ok()) else {
        return super::bad_request("start_time is required (unix seconds)");
    };
    if let Some(response) = too_recent(start) {
        return response;
    }
    let with_comments = query_get(&query, "include")
        .is_some_and(|v| v.split(',').any(|i| i.trim() == "comment_events"));
    let per_page = export_page_size(&query);
    let newest = now().timestamp() - HELD_BACK_SECS;
    let state = shared.state.lock().unwrap();
    let mut due: Vec<&Audit> = state
        .audits
        .iter()
        .filter(|a| (start..=newest).contains(&a.at.timestamp()))
        .collect();
    due.sort_by_key(|a| (a.at.timestamp(), a.id));
    let mut take = due.len().min(per_page);
    if take > 0 {
        let last = due[take - 1].at.timestamp();
        while take < due.len() && due[take].at.timestamp() == last {
            take += 1;
        }
    }
    let end_time = due[..take]
        .last()
        .map(|a| a.at.timestamp())
        .unwrap_or(start);
    let events: Vec<Value> = due[..take]
        .iter()
        .map(|a| render(&state, a, with_comments))
        .collect();
    let next = link(
        &origin(&headers),
        "/api/v2/incremental/ticket_events",
        &query,
        &[("start_time", end_time.to_string())],
    );
    kit::respond(
        StatusCode::OK,
        json!({
            "ticket_events": events,
            "count": take,
            "end_time": end_time,
            "end_of_stream": take == due.len(),
            "next_page": next,
        }),
    )
}

impl ZendeskSimHandle {
    /// Moves every ticket audit `seconds` into the past, as if that much time had gone by (the
    /// export holds back the last minute, so a test ages the events it wants to read).
    pub fn age_ticket_events(&self, seconds: i64) {
        let mut state = self.shared.state.lock().unwrap();
        for audit in &mut state.audits {
            audit.at -= Span::seconds(seconds);
        }
    }
}
