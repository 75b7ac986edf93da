//! A stateful server implementing the custom-system contract (README, "The custom-system contract"), one
//! parametrised implementation for `customerp` (customer, project, contact) and `custompms`
//! (customer, project).
//!
//! Owns: in-memory records, bearer auth, idempotent creates, merge-patch updates, cursor paging,
//! and Standard Webhooks for every change made through its API. Fault knobs, 429s and counters
//! come from [`kit`].
//!
//! Decisions the contract leaves open, as this simulator makes them:
//! - A `POST` repeated with the same `Idempotency-Key` and the same body answers **201 with the
//!   same record** (a replay is indistinguishable from the first answer, so a client that lost the
//!   first answer needs no special case) plus the header `Idempotent-Replayed: true`, and sends no
//!   second webhook. The same key with a different body answers 422. A `POST` without the header
//!   answers 400.
//! - `updated_at` is strictly increasing across the simulator (microsecond steps), so paging by
//!   `(updated_at, id)` is stable; [`CustomSim::insert`] can seed records with any timestamp,
//!   equal ones included, to test clients against coarse clocks.
//! - The list cursor is the `(updated_at, id)` of the last record returned; pages hold
//!   `page_size` records (default 50, [`CustomSim::set_page_size`]).
//! - A `PATCH` that changes nothing keeps `updated_at` and sends no webhook.
//! - Every webhook carries the record's `updated_at` after the change in `data` (optional in the
//!   contract; Tether then recognises its own echo without a read).
//! - A `PATCH` with `If-Match: "<updated_at>"` is made only if the record's `updated_at` is that
//!   instant, to the microsecond; otherwise 412 and nothing changes (RFC 9110, 13.1.1; the
//!   contract's optional conditional writes). `*` matches any existing record; a tag that is not
//!   an RFC 3339 instant answers 400.
//! - `GET /{type}?idempotency_key=<k>` is the contract addition described in
//!   [`crate::connectors::custom`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::kit::{self, json_error, respond, Outgoing, RunningSim, SimControl, WebhookSender};
use crate::domain::SystemId;
use crate::signing::standard;

/// How to run one custom-system simulator.
#[derive(Clone)]
pub struct CustomSimConfig {
    /// [`SystemId::CustomErp`] or [`SystemId::CustomPms`].
    pub system: SystemId,
    /// The bearer token clients must send.
    pub api_token: String,
    /// Standard Webhooks secret (`whsec_…`); webhooks are sent only with a secret and a target.
    pub webhook_secret: Option<String>,
    /// Full URL webhooks are posted to (e.g. `http://127.0.0.1:8080/webhooks/customerp`).
    pub webhook_target: Option<String>,
    /// Webhooks delivered at once (in order per record); 1 keeps every webhook in order.
    pub webhook_lanes: usize,
}

#[derive(Debug, Clone)]
struct Stored {
    fields: Map<String, Value>,
    updated_at: DateTime<Utc>,
    idempotency_key: Option<String>,
    /// The body of the create, to tell a replay from a reused key.
    create_body: Option<Value>,
}

struct State_ {
    /// type → id → record
    records: BTreeMap<String, BTreeMap<String, Stored>>,
    next_id: u64,
    last_stamp: DateTime<Utc>,
    page_size: usize,
}

struct Inner {
    system: SystemId,
    token: String,
    key: Option<Vec<u8>>,
    state: Mutex<State_>,
    webhooks: WebhookSender,
}

/// Handle on a running or ready-to-serve custom-system simulator.
#[derive(Clone)]
pub struct CustomSim {
    inner: Arc<Inner>,
    pub control: SimControl,
}

fn types_of(system: SystemId) -> &'static [&'static str] {
    match system {
        SystemId::CustomErp => &["customer", "project", "contact"],
        _ => &["customer", "project"],
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn render(id: &str, stored: &Stored) -> Value {
    let mut out = stored.fields.clone();
    out.insert("id".to_owned(), Value::String(id.to_owned()));
    out.insert(
        "updated_at".to_owned(),
        Value::String(stamp(stored.updated_at)),
    );
    Value::Object(out)
}

/// RFC 7396: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(map) = slot {
                    merge_patch(map, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

impl CustomSim {
    /// A simulator with no records. Must be called inside a tokio runtime (the webhook sender
    /// starts a task). Fails if the webhook secret is not `whsec_` followed by base64.
    pub fn new(config: CustomSimConfig) -> Result<Self, standard::BadSecret> {
        let control = SimControl::new(json_error);
        let key = config
            .webhook_secret
            .as_deref()
            .map(standard::secret_key)
            .transpose()?;
        let webhooks = WebhookSender::with_lanes(
            config.webhook_target.clone(),
            control.clone(),
            config.webhook_lanes,
        );
        let records = types_of(config.system)
            .iter()
            .map(|t| (t.to_string(), BTreeMap::new()))
            .collect();
        Ok(CustomSim {
            inner: Arc::new(Inner {
                system: config.system,
                token: config.api_token,
                key,
                state: Mutex::new(State_ {
                    records,
                    next_id: 1,
                    last_stamp: DateTime::<Utc>::UNIX_EPOCH,
                    page_size: 50,
                }),
                webhooks,
            }),
            control,
        })
    }

    /// Starts serving on `bind` (port 0: any free port).
    pub async fn start(
        config: CustomSimConfig,
        bind: SocketAddr,
    ) -> std::io::Result<(CustomSim, RunningSim)> {
        let sim = CustomSim::new(config).map_err(std::io::Error::other)?;
        let running = kit::serve(sim.router(), bind).await?;
        Ok((sim, running))
    }

    pub fn system(&self) -> SystemId {
        self.inner.system
    }

    /// The API routes wrapped with the kit's middleware and `/_sim/*` endpoints.
    pub fn router(&self) -> Router {
        let api = Router::new()
            .route("/{kind}", get(list).post(create))
            .route("/{kind}/{id}", get(fetch).patch(patch))
            .layer(middleware::from_fn_with_state(self.clone(), auth))
            .with_state(self.clone());
        kit::with_kit(api, self.control.clone())
    }

    pub fn set_page_size(&self, size: usize) {
        self.inner.state.lock().unwrap().page_size = size.max(1);
    }

    /// Seeds a record without a webhook. `updated_at: None` stamps it now (strictly after every
    /// earlier stamp); `Some` uses exactly that time, equal to others if wanted. Returns its id.
    pub fn insert(
        &self,
        kind: &str,
        fields: Map<String, Value>,
        updated_at: Option<DateTime<Utc>>,
    ) -> String {
        let mut state = self.inner.state.lock().unwrap();
        let updated_at = updated_at.unwrap_or_else(|| next_stamp(&mut state));
        let id = state.next_id.to_string();
        state.next_id += 1;
        state
            .records
            .get_mut(kind)
            .unwrap_or_else(|| panic!("{} has no type {kind}", self.inner.system))
            .insert(
                id.clone(),
                Stored {
                    fields,
                    updated_at,
                    idempotency_key: None,
                    create_body: None,
                },
            );
        id
    }

    /// Changes a record as if a user of the system did it, without a webhook (for polling tests).
    pub fn touch(
        &self,
        kind: &str,
        id: &str,
        patch: Map<String, Value>,
        updated_at: Option<DateTime<Utc>>,
    ) {
        let mut state = self.inner.state.lock().unwrap();
        let at = updated_at.unwrap_or_else(|| next_stamp(&mut state));
        let stored = state
            .records
            .get_mut(kind)
            .and_then(|m| m.get_mut(id))
            .unwrap_or_else(|| panic!("no {kind} {id}"));
        merge_patch(&mut stored.fields, &patch);
        stored.updated_at = at;
    }

    /// Changes a record as a user of the system would: stamped now and announced by an
    /// `updated` webhook, as an edit in the system's own screens is.
    pub fn edit(&self, kind: &str, id: &str, patch: Map<String, Value>) {
        self.touch(kind, id, patch, None);
        let stamp = self
            .get(kind, id)
            .and_then(|r| r.get("updated_at").cloned());
        self.notify(kind, "updated", id, stamp.as_ref());
    }

    /// All records of a type as the API would return them.
    pub fn all(&self, kind: &str) -> Vec<Value> {
        let state = self.inner.state.lock().unwrap();
        state
            .records
            .get(kind)
            .map(|m| m.iter().map(|(id, s)| render(id, s)).collect())
            .unwrap_or_default()
    }

    /// The record as the API would return it.
    pub fn get(&self, kind: &str, id: &str) -> Option<Value> {
        let state = self.inner.state.lock().unwrap();
        state.records.get(kind)?.get(id).map(|s| render(id, s))
    }

    /// Number of records of a type.
    pub fn len(&self, kind: &str) -> usize {
        let state = self.inner.state.lock().unwrap();
        state.records.get(kind).map_or(0, BTreeMap::len)
    }

    pub fn webhook_stats(&self) -> kit::WebhookStats {
        self.inner.webhooks.stats()
    }

    /// Sends the change's webhook; `updated_at` is the record's stamp after the change (the
    /// contract's optional `data.updated_at`, which this simulator always sends).
    fn notify(&self, kind: &str, action: &str, id: &str, updated_at: Option<&Value>) {
        let Some(key) = &self.inner.key else {
            return;
        };
        let mut data = json!({"id": id});
        if let Some(stamp) = updated_at {
            data["updated_at"] = stamp.clone();
        }
        let body = json!({"type": format!("{kind}.{action}"), "data": data}).to_string();
        let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let timestamp = Utc::now().timestamp().to_string();
        let signature = standard::sign(key, &msg_id, &timestamp, body.as_bytes());
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("webhook-id", msg_id),
            ("webhook-timestamp", timestamp),
            ("webhook-signature", signature),
        ] {
            headers.insert(name, HeaderValue::from_str(&value).expect("ASCII header"));
        }
        self.inner.webhooks.send(Outgoing {
            body: body.into_bytes(),
            headers,
            record: format!("{kind}/{id}"),
        });
    }
}

fn next_stamp(state: &mut State_) -> DateTime<Utc> {
    kit::next_stamp(&mut state.last_stamp)
}

async fn auth(State(sim): State<CustomSim>, request: Request, next: Next) -> Response {
    let ok = kit::has_bearer(request.headers(), &sim.inner.token);
    if !ok {
        return json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(request).await
}

fn unknown_type(kind: &str) -> Response {
    json_error(StatusCode::NOT_FOUND, &format!("unknown type {kind:?}"))
}

async fn fetch(State(sim): State<CustomSim>, Path((kind, id)): Path<(String, String)>) -> Response {
    let state = sim.inner.state.lock().unwrap();
    let Some(records) = state.records.get(&kind) else {
        return unknown_type(&kind);
    };
    match records.get(&id) {
        Some(stored) => respond(StatusCode::OK, render(&id, stored)),
        None => json_error(StatusCode::NOT_FOUND, &format!("no {kind} {id}")),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    updated_after: Option<String>,
    cursor: Option<String>,
    idempotency_key: Option<String>,
}

fn parse_cursor(text: &str) -> Option<(DateTime<Utc>, String)> {
    let (micros, id) = text.split_once(':')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.to_owned()))
}

async fn list(
    State(sim): State<CustomSim>,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let state = sim.inner.state.lock().unwrap();
    let Some(records) = state.records.get(&kind) else {
        return unknown_type(&kind);
    };
    if let Some(key) = &q.idempotency_key {
        let items: Vec<Value> = records
            .iter()
            .filter(|(_, s)| s.idempotency_key.as_deref() == Some(key))
            .map(|(id, s)| render(id, s))
            .collect();
        return respond(StatusCode::OK, json!({"items": items, "next_cursor": null}));
    }
    let after = match q.updated_after.as_deref().map(DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.with_timezone(&Utc)),
        Some(Err(_)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "updated_after must be an RFC 3339 time",
            )
        }
    };
    let from = match q.cursor.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(c)) => Some(c),
        Some(None) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "cursor is not one this server wrote",
            )
        }
    };
    let mut matching: Vec<(&String, &Stored)> = records
        .iter()
        .filter(|(_, s)| after.is_none_or(|a| s.updated_at > a))
        .filter(|(id, s)| {
            from.as_ref()
                .is_none_or(|(at, cid)| (s.updated_at, id.as_str()) > (*at, cid.as_str()))
        })
        .collect();
    matching.sort_by(|a, b| (a.1.updated_at, a.0).cmp(&(b.1.updated_at, b.0)));
    let more = matching.len() > state.page_size;
    matching.truncate(state.page_size);
    let next_cursor = if more {
        matching
            .last()
            .map(|(id, s)| Value::String(format!("{}:{}", s.updated_at.timestamp_micros(), id)))
            .unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let items: Vec<Value> = matching.iter().map(|(id, s)| render(id, s)).collect();
    respond(
        StatusCode::OK,
        json!({"items": items, "next_cursor": next_cursor}),
    )
}

fn object_body(body: &Bytes) -> Result<Map<String, Value>, Box<Response>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => {
            for field in ["id", "updated_at"] {
                if map.contains_key(field) {
                    return Err(Box::new(json_error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        &format!("`{field}` is read-only"),
                    )));
                }
            }
            Ok(map)
        }
        Ok(_) => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ))),
        Err(e) => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON: {e}"),
        ))),
    }
}

async fn create(
    State(sim): State<CustomSim>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.trim().is_empty())
        .map(str::to_owned)
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "the Idempotency-Key header is required",
        );
    };
    let fields = match object_body(&body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let (id, rendered) = {
        let mut state = sim.inner.state.lock().unwrap();
        if !state.records.contains_key(&kind) {
            return unknown_type(&kind);
        }
        let previous = state.records[&kind]
            .iter()
            .find(|(_, s)| s.idempotency_key.as_deref() == Some(&key))
            .map(|(id, s)| (id.clone(), s.clone()));
        if let Some((id, stored)) = previous {
            if stored.create_body.as_ref() != Some(&Value::Object(fields)) {
                return json_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this Idempotency-Key was used with a different body",
                );
            }
            let mut response = respond(StatusCode::CREATED, render(&id, &stored));
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return response;
        }
        let updated_at = next_stamp(&mut state);
        let id = state.next_id.to_string();
        state.next_id += 1;
        let stored = Stored {
            fields: fields.clone(),
            updated_at,
            idempotency_key: Some(key),
            create_body: Some(Value::Object(fields)),
        };
        let rendered = render(&id, &stored);
        state
            .records
            .get_mut(&kind)
            .expect("checked")
            .insert(id.clone(), stored);
        (id, rendered)
    };
    sim.notify(&kind, "created", &id, rendered.get("updated_at"));
    respond(StatusCode::CREATED, rendered)
}

async fn patch(
    State(sim): State<CustomSim>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let patch = match object_body(&body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let condition = match IfMatch::from_headers(&headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (changed, rendered) = {
        let mut state = sim.inner.state.lock().unwrap();
        let Some(records) = state.records.get(&kind) else {
            return unknown_type(&kind);
        };
        let Some(current) = records.get(&id) else {
            return json_error(StatusCode::NOT_FOUND, &format!("no {kind} {id}"));
        };
        if !condition.holds_for(current.updated_at) {
            return json_error(
                StatusCode::PRECONDITION_FAILED,
                &format!(
                    "{kind} {id} changed: its updated_at is {}",
                    stamp(current.updated_at)
                ),
            );
        }
        let mut fields = current.fields.clone();
        merge_patch(&mut fields, &patch);
        let changed = fields != current.fields;
        let at = if changed {
            next_stamp(&mut state)
        } else {
            current_stamp(&state, &kind, &id)
        };
        let stored = state
            .records
            .get_mut(&kind)
            .and_then(|m| m.get_mut(&id))
            .expect("checked");
        stored.fields = fields;
        stored.updated_at = at;
        (changed, render(&id, stored))
    };
    if changed {
        sim.notify(&kind, "updated", &id, rendered.get("updated_at"));
    }
    respond(StatusCode::OK, rendered)
}

/// A `PATCH`'s `If-Match` precondition: none, any record (`*`), or these `updated_at` instants.
enum IfMatch {
    Absent,
    Any,
    Stamps(Vec<DateTime<Utc>>),
}

impl IfMatch {
    fn from_headers(headers: &HeaderMap) -> Result<IfMatch, Box<Response>> {
        let Some(value) = headers.get("if-match") else {
            return Ok(IfMatch::Absent);
        };
        let bad = |why: &str| {
            Box::new(json_error(
                StatusCode::BAD_REQUEST,
                &format!("If-Match {why}: it names the record's updated_at, in quotes"),
            ))
        };
        let text = value.to_str().map_err(|_| bad("is not ASCII"))?.trim();
        if text == "*" {
            return Ok(IfMatch::Any);
        }
        let mut stamps = Vec::new();
        for tag in text.split(',').map(str::trim) {
            let inner = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .ok_or_else(|| bad(&format!("has {tag:?}, not a quoted tag")))?;
            let at = DateTime::parse_from_rfc3339(inner)
                .map_err(|_| bad(&format!("has {tag:?}, not an RFC 3339 instant")))?;
            stamps.push(at.with_timezone(&Utc));
        }
        Ok(IfMatch::Stamps(stamps))
    }

    /// Whether a record changed at `updated_at` meets the precondition.
    fn holds_for(&self, updated_at: DateTime<Utc>) -> bool {
        match self {
            IfMatch::Absent | IfMatch::Any => true,
            // At microseconds, as the contract says: Tether keeps no finer stamp.
            IfMatch::Stamps(stamps) => stamps
                .iter()
                .any(|s| s.timestamp_micros() == updated_at.timestamp_micros()),
        }
    }
}

fn current_stamp(state: &State_, kind: &str, id: &str) -> DateTime<Utc> {
    state.records[kind][id].updated_at
}
