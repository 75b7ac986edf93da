//! The Webhooks API (docs/vendors.md, Zendesk "Webhooks API"): `GET/POST /api/v2/webhooks`,
//! `GET/PUT/DELETE /api/v2/webhooks/{id}` and `GET /api/v2/webhooks/{id}/signing_secret`, in the
//! shapes of Zendesk's OpenAPI (botbrains-io/python-zendesk `openapi-webhooks.yaml`).
//!
//! Event-subscription deliveries go only to registered webhooks: each active webhook whose
//! `subscriptions` name the event type gets its own copy, signed with its own secret and carrying
//! its own id in `X-Zendesk-Webhook-Id`. A simulator started with `webhook_target` has one webhook
//! already (as if an admin had made it in Zendesk's UI), subscribed to every event type.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::SecondsFormat;
use serde_json::{json, Value};

use super::{now, Shared};
use crate::simulators::kit;

/// One registered webhook.
#[derive(Clone)]
pub(super) struct Hook {
    pub id: String,
    pub name: String,
    pub endpoint: String,
    pub active: bool,
    /// `zen:event-type:…` names, or empty with `every_event` for the pre-made webhook.
    pub subscriptions: Vec<String>,
    pub every_event: bool,
    pub secret: String,
    created_at: String,
    updated_at: String,
}

impl Hook {
    /// Whether this webhook gets deliveries of `event_type` (`organization.created`).
    pub fn wants(&self, event_type: &str) -> bool {
        self.active
            && (self.every_event
                || self
                    .subscriptions
                    .iter()
                    .any(|s| s.strip_prefix("zen:event-type:") == Some(event_type)))
    }

    fn render(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "endpoint": self.endpoint,
            "http_method": "POST", "request_format": "json",
            "status": if self.active { "active" } else { "inactive" },
            "subscriptions": self.subscriptions,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "created_by": "10000001", "updated_by": "10000001",
        })
    }
}

/// The account's webhooks.
#[derive(Default)]
pub(super) struct Hooks {
    pub list: Vec<Hook>,
    next: u64,
}

impl Hooks {
    fn new_id(&mut self) -> String {
        self.next += 1;
        // Zendesk webhook ids are ULIDs (26 characters).
        format!("01HSIMWEBHOOK{:013}", self.next)
    }

    /// The webhook an admin made by hand (the simulator's `webhook_target` option).
    pub fn premade(&mut self, endpoint: String, secret: String) {
        let id = super::WEBHOOK_ID.to_owned();
        let at = stamp();
        self.list.push(Hook {
            id,
            name: "Made in the Admin Center".to_owned(),
            endpoint,
            active: true,
            subscriptions: Vec::new(),
            every_event: true,
            secret,
            created_at: at.clone(),
            updated_at: at,
        });
    }
}

fn stamp() -> String {
    now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn new_secret() -> String {
    BASE64.encode(rand::random::<[u8; 32]>())
}

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v2/webhooks", get(list).post(create))
        .route(
            "/api/v2/webhooks/{id}",
            get(show).put(update).delete(remove),
        )
        .route("/api/v2/webhooks/{id}/signing_secret", get(signing_secret))
}

/// Zendesk's Webhooks API error shape: `{"errors": [{"code", "title", "detail"}]}`.
fn error(status: StatusCode, code: &str, detail: &str) -> Response {
    kit::respond(
        status,
        json!({"errors": [{"code": code, "title": code, "detail": detail}]}),
    )
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "WebhookNotFound",
        "Webhook not found",
    )
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let hooks = shared.hooks.lock().unwrap();
    let webhooks: Vec<Value> = hooks
        .list
        .iter()
        .filter(|h| param("filter[name_contains]").is_none_or(|n| h.name.contains(n)))
        .filter(|h| param("filter[status]").is_none_or(|s| (s == "active") == h.active))
        .map(Hook::render)
        .collect();
    // One page: an account has at most a few hundred webhooks and Tether reads them all.
    kit::respond(
        StatusCode::OK,
        json!({"webhooks": webhooks, "meta": {"has_more": false, "after_cursor": null,
            "before_cursor": null}, "links": {"next": null, "prev": null}}),
    )
}

/// The validated writable fields of a create or update body.
struct Input {
    name: String,
    endpoint: String,
    active: bool,
    subscriptions: Vec<String>,
}

/// The body's fields, or what is wrong with them (answered as 400 `InvalidValue`).
fn input(body: &Bytes) -> Result<Input, String> {
    let bad = |detail: &str| detail.to_owned();
    let value: Value = serde_json::from_slice(body).map_err(|_| bad("body is not JSON"))?;
    let hook = value
        .get("webhook")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("missing `webhook` object"))?;
    let text = |k: &str| hook.get(k).and_then(Value::as_str).map(str::to_owned);
    let name = text("name").ok_or_else(|| bad("name is required"))?;
    let endpoint = text("endpoint")
        .filter(|e| e.starts_with("http://") || e.starts_with("https://"))
        .ok_or_else(|| bad("endpoint must be an http(s) URL"))?;
    let active = match text("status").as_deref() {
        Some("active") => true,
        Some("inactive") => false,
        _ => return Err(bad("status must be active or inactive")),
    };
    let subscriptions: Vec<String> = hook
        .get("subscriptions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let events = !subscriptions.is_empty()
        && subscriptions
            .iter()
            .all(|s| s.starts_with("zen:event-type:"));
    if events
        && (text("http_method").as_deref() != Some("POST")
            || text("request_format").as_deref() != Some("json"))
    {
        return Err(bad(
            "event subscriptions need http_method POST and request_format json",
        ));
    }
    if !events && subscriptions != ["conditional_ticket_events"] {
        return Err(bad(
            "subscriptions must be event types or exactly conditional_ticket_events",
        ));
    }
    Ok(Input {
        name,
        endpoint,
        active,
        subscriptions,
    })
}

async fn create(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let input = match input(&body) {
        Ok(i) => i,
        Err(detail) => return error(StatusCode::BAD_REQUEST, "InvalidValue", &detail),
    };
    let mut hooks = shared.hooks.lock().unwrap();
    let at = stamp();
    let hook = Hook {
        id: hooks.new_id(),
        name: input.name,
        endpoint: input.endpoint,
        active: input.active,
        subscriptions: input.subscriptions,
        every_event: false,
        secret: new_secret(),
        created_at: at.clone(),
        updated_at: at,
    };
    let body = json!({"webhook": hook.render()});
    hooks.list.push(hook);
    kit::respond(StatusCode::CREATED, body)
}

async fn show(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let hooks = shared.hooks.lock().unwrap();
    match hooks.list.iter().find(|h| h.id == id) {
        Some(h) => kit::respond(StatusCode::OK, json!({"webhook": h.render()})),
        None => not_found(),
    }
}

/// `PUT` replaces the writable fields and answers 204 without a body, as Zendesk does.
async fn update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let input = match input(&body) {
        Ok(i) => i,
        Err(detail) => return error(StatusCode::BAD_REQUEST, "InvalidValue", &detail),
    };
    let mut hooks = shared.hooks.lock().unwrap();
    let Some(hook) = hooks.list.iter_mut().find(|h| h.id == id) else {
        return not_found();
    };
    hook.name = input.name;
    hook.endpoint = input.endpoint;
    hook.active = input.active;
    hook.subscriptions = input.subscriptions;
    hook.every_event = false;
    hook.updated_at = stamp();
    kit::empty(StatusCode::NO_CONTENT)
}

async fn remove(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut hooks = shared.hooks.lock().unwrap();
    let before = hooks.list.len();
    hooks.list.retain(|h| h.id != id);
    if hooks.list.len() == before {
        return not_found();
    }
    kit::empty(StatusCode::NO_CONTENT)
}

async fn signing_secret(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let hooks = shared.hooks.lock().unwrap();
    match hooks.list.iter().find(|h| h.id == id) {
        Some(h) => kit::respond(
            StatusCode::OK,
            json!({"signing_secret": {"algorithm": "SHA256", "secret": h.secret}}),
        ),
        None => not_found(),
    }
}

/// The webhooks a delivery of `event_type` goes to: (id, endpoint, secret).
pub(super) fn targets(shared: &Shared, event_type: &str) -> Vec<(String, String, String)> {
    let hooks = shared.hooks.lock().unwrap();
    hooks
        .list
        .iter()
        .filter(|h| h.wants(event_type))
        .map(|h| (h.id.clone(), h.endpoint.clone(), h.secret.clone()))
        .collect()
}
