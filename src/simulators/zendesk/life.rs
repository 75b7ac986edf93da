//! A ticket's later life (docs/vendors.md, Zendesk "Closed tickets refuse updates", "Comments are
//! redacted or made private", "Deleted tickets"):
//! - a closed ticket accepts changes of `tags`, `subject` and `priority` only; anything else (a
//!   comment above all) is refused with 422 "Status: closed prevents ticket update";
//! - `DELETE /api/v2/tickets/{id}` soft-deletes: the ticket then answers 404 everywhere, shows
//!   in the ticket export with `status: "deleted"`, and `ticket.soft_deleted` is sent;
//!   `DELETE /api/v2/deleted_tickets/{id}` removes it for good (`ticket.permanently_deleted`),
//!   `PUT /api/v2/deleted_tickets/{id}/restore` brings it back (`ticket.undeleted`);
//! - `PUT .../comments/{id}/redact` replaces text with `▇`, `PUT .../comments/{id}/make_private`
//!   hides a comment from the requester; each is a ticket audit and a webhook.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::events::{Audit, Child};
use super::{id_string, invalid, not_found, now, parse_id, timestamp, Kind, Shared, Store};
use crate::simulators::kit;

/// What a closed ticket still lets an API client change.
const CHANGEABLE_WHEN_CLOSED: [&str; 3] = ["tags", "subject", "priority"];

/// Zendesk's refusal of a change to a closed ticket.
fn closed() -> Response {
    invalid(
        "status",
        "InvalidValue",
        "Status: closed prevents ticket update".into(),
    )
}

/// The refusal, if `input` changes a closed ticket in a way Zendesk does not allow.
pub(super) fn closed_refusal(
    kind: Kind,
    before: &Map<String, Value>,
    input: &Map<String, Value>,
) -> Option<Response> {
    let is_closed = kind == Kind::Ticket && before.get("status") == Some(&json!("closed"));
    let refused = input
        .keys()
        .any(|key| !CHANGEABLE_WHEN_CLOSED.contains(&key.as_str()));
    (is_closed && refused).then(closed)
}

/// A ticket as the ticket export shows it: a soft-deleted one with `status: "deleted"`.
pub(super) fn as_exported(state: &Store, kind: Kind, body: &Map<String, Value>) -> Value {
    let mut body = body.clone();
    let id = body.get("id").and_then(Value::as_u64).unwrap_or(0);
    if state.is_deleted(kind, id) {
        body.insert("status".into(), json!("deleted"));
    }
    Value::Object(body)
}

/// Stamps a ticket as changed now (new `updated_at`, next place in the export) and returns it.
fn touch(state: &mut Store, ticket_id: u64) -> Option<Map<String, Value>> {
    let seq = state.seq();
    let stored = state.tickets.get_mut(&ticket_id)?;
    stored.seq = seq;
    stored
        .body
        .insert("updated_at".into(), json!(timestamp(now())));
    Some(stored.body.clone())
}

/// `DELETE /api/v2/tickets/{id}`: 204.
pub(super) async fn soft_delete(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some(id) = parse_id(&raw).filter(|id| state.tickets.contains_key(id)) else {
        return not_found();
    };
    if !state.deleted_tickets.insert(id) {
        return not_found();
    }
    if let Some(ticket) = touch(&mut state, id) {
        let shown = as_exported(&state, Kind::Ticket, &ticket);
        let shown = shown.as_object().cloned().unwrap_or_default();
        shared.emit(Kind::Ticket, &shown, "ticket.soft_deleted", json!({}));
    }
    kit::empty(StatusCode::NO_CONTENT)
}

/// `DELETE /api/v2/deleted_tickets/{id}`: only a soft-deleted ticket; answers a queued job.
pub(super) async fn delete_permanently(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some(id) = parse_id(&raw).filter(|id| state.deleted_tickets.contains(id)) else {
        return not_found();
    };
    state.deleted_tickets.remove(&id);
    state.comments.remove(&id);
    state.audits.retain(|a| a.ticket_id != id);
    if let Some(stored) = state.tickets.remove(&id) {
        let mut gone = stored.body;
        gone.insert("status".into(), json!("deleted"));
        shared.emit(Kind::Ticket, &gone, "ticket.permanently_deleted", json!({}));
    }
    let job = uuid::Uuid::new_v4().simple().to_string();
    kit::respond(
        StatusCode::OK,
        json!({"job_status": {"id": job, "status": "queued", "job_type": "DeleteTicketsJob"}}),
    )
}

/// `PUT /api/v2/deleted_tickets/{id}/restore`: 200 without a body.
pub(super) async fn restore(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some(id) = parse_id(&raw).filter(|id| state.deleted_tickets.contains(id)) else {
        return not_found();
    };
    state.deleted_tickets.remove(&id);
    if let Some(ticket) = touch(&mut state, id) {
        shared.emit(Kind::Ticket, &ticket, "ticket.undeleted", json!({}));
    }
    kit::empty(StatusCode::OK)
}

/// The live ticket and the index of its comment (Zendesk answers 404 otherwise).
fn find_comment(state: &Store, raw: &(String, String)) -> Option<(u64, usize)> {
    let ticket_id = parse_id(&raw.0)
        .filter(|id| state.tickets.contains_key(id) && !state.deleted_tickets.contains(id))?;
    let comment_id = parse_id(&raw.1)?;
    let index = state
        .comments
        .get(&ticket_id)?
        .iter()
        .position(|c| c["id"].as_u64() == Some(comment_id))?;
    Some((ticket_id, index))
}

/// Records the audit, stamps the ticket and sends the webhook of a comment change.
fn announce(shared: &Shared, state: &mut Store, ticket_id: u64, child: Child, event_type: &str) {
    let comment_id = match &child {
        Child::Comment(id) | Child::Redaction { comment: id, .. } => *id,
        Child::Privacy { comment, .. } => *comment,
    };
    let audit_id = state.id();
    let public = state.comments[&ticket_id]
        .iter()
        .find(|c| c["id"].as_u64() == Some(comment_id))
        .map(|c| c["public"].clone())
        .unwrap_or(Value::Null);
    state.audits.push(Audit {
        id: audit_id,
        ticket_id,
        at: now(),
        author: json!(null),
        child,
    });
    if let Some(ticket) = touch(state, ticket_id) {
        let event = json!({"comment": {"id": id_string(&json!(comment_id)), "is_public": public}});
        shared.emit(Kind::Ticket, &ticket, event_type, event);
    }
}

/// `PUT /api/v2/tickets/{ticket_id}/comments/{id}/redact` with `{"text": "..."}`: 200 with the
/// comment, each character of every occurrence of the text replaced by `▇`.
pub(super) async fn redact(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let text = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["text"].as_str().map(str::to_owned))
        .filter(|t| !t.is_empty());
    let Some(text) = text else {
        return super::bad_request("the body must be {\"text\": \"<the text to redact>\"}");
    };
    let mut state = shared.state.lock().unwrap();
    let Some((ticket_id, index)) = find_comment(&state, &raw) else {
        return not_found();
    };
    if state.tickets[&ticket_id].body["status"] == json!("closed") {
        return closed();
    }
    let blocks = "▇".repeat(text.chars().count());
    let comment = &mut state.comments.get_mut(&ticket_id).expect("found")[index];
    for key in ["body", "html_body", "plain_body"] {
        if let Some(value) = comment.get(key).and_then(Value::as_str) {
            let redacted = value.replace(&text, &blocks);
            comment.insert(key.into(), json!(redacted));
        }
    }
    let answer = json!({"comment": comment.clone()});
    let comment_id = comment["id"].as_u64().unwrap_or(0);
    let id = state.id();
    let child = Child::Redaction {
        id,
        comment: comment_id,
    };
    announce(
        &shared,
        &mut state,
        ticket_id,
        child,
        "ticket.comment_redacted",
    );
    kit::respond(StatusCode::OK, answer)
}

/// `PUT /api/v2/tickets/{ticket_id}/comments/{id}/make_private`: 200 without a body.
pub(super) async fn make_private(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<(String, String)>,
) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some((ticket_id, index)) = find_comment(&state, &raw) else {
        return not_found();
    };
    let comment = &mut state.comments.get_mut(&ticket_id).expect("found")[index];
    if comment["public"] == json!(false) {
        return kit::empty(StatusCode::OK);
    }
    comment.insert("public".into(), json!(false));
    let comment_id = comment["id"].as_u64().unwrap_or(0);
    let id = state.id();
    let child = Child::Privacy {
        id,
        comment: comment_id,
    };
    announce(
        &shared,
        &mut state,
        ticket_id,
        child,
        "ticket.comment_made_private",
    );
    kit::empty(StatusCode::OK)
}
