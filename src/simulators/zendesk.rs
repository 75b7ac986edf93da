//! A Zendesk Support API of its own, in memory: organizations, users, tickets and ticket comments.
//!
//! Owns: the simulated records, the vendor's paths, JSON envelopes, error shapes and status codes
//! (docs/vendors.md, Zendesk), cursor and offset pagination, the incremental export endpoints,
//! auth (API token basic and OAuth bearer), the `X-Rate-Limit` headers, and a signed
//! event-subscription webhook for every change made through its API.
//! May call: `simulators::kit` (faults, counters, 429s, webhook delivery) and `signing::zendesk`.
//!
//! Vendor behaviours that break naive clients, each in its own module and in docs/vendors.md
//! (Zendesk): a user's primary email is fixed after create ([`lookups`]: an update adds a
//! secondary identity), search sees a write only after a lag while `show_many` sees it at once
//! ([`lookups`]), a closed ticket refuses updates, tickets are soft-deleted and comments redacted
//! or made private ([`life`]), comments are exported as ticket events ([`events`]), and 429s come
//! as `text/plain` while the exports have their own 10-a-minute limit and 409s happen ([`limits`]).
//!
//! Simplifications, on purpose: no organization or user deletes, no `create_many`/`update_many`;
//! a ticket without `requester_id` keeps it null (Zendesk would use the API user); user search
//! understands `email:` and otherwise matches name or email substrings; search hides a record
//! written through the API for the lag and then shows its current state (Zendesk's index would
//! show an older one); an organization change without a Zendesk event type (`notes`, `details`,
//! `domain_names`) sends no webhook, as in Zendesk.

mod emit;
mod events;
mod exports;
mod hooks;
mod life;
mod limits;
mod listing;
mod lookups;
mod records;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::kit::{self, Outgoing, RunningSim, SimControl, WebhookSender, WebhookStats};
use exports::*;
use listing::*;
use records::*;

/// How the simulator is started.
#[derive(Clone)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free one.
    pub bind: SocketAddr,
    pub credentials: SimCredentials,
    /// A webhook made by hand before Tether came (as an admin would in Zendesk's UI), subscribed
    /// to every event type, with this endpoint (e.g. `http://127.0.0.1:8080/webhooks/zendesk`);
    /// `None`: no webhook until one is registered through the Webhooks API ([`hooks`]).
    pub webhook_target: Option<String>,
    /// The signing secret of the hand-made webhook.
    pub webhook_secret: String,
    /// Webhooks delivered at once (in order per record); 1 keeps every webhook in order.
    pub webhook_lanes: usize,
}

/// The credentials the simulator accepts: `{email}/token:{api_token}` as basic auth, and, if set,
/// an OAuth bearer token.
#[derive(Clone)]
pub struct SimCredentials {
    pub email: String,
    pub api_token: String,
    pub oauth_token: Option<String>,
}

impl std::fmt::Debug for SimCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCredentials")
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

/// The account id the simulator reports in webhooks.
pub const ACCOUNT_ID: u64 = 10_000_001;
/// The id of the simulated webhook (sent as `X-Zendesk-Webhook-Id`).
pub const WEBHOOK_ID: &str = "01HSIMZENDESKWEBHOOK000001";
const EVENT_VERSION: &str = "2022-06-20";
/// Cursor pages: Zendesk's maximum `page[size]` for most endpoints.
const MAX_PAGE_SIZE: usize = 100;
/// Incremental exports: Zendesk's default and maximum `per_page`.
const MAX_EXPORT_PAGE: usize = 1000;

/// The three kinds of top-level record; comments live under their ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Organization,
    User,
    Ticket,
}

impl Kind {
    fn singular(self) -> &'static str {
        match self {
            Kind::Organization => "organization",
            Kind::User => "user",
            Kind::Ticket => "ticket",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Organization => "organizations",
            Kind::User => "users",
            Kind::Ticket => "tickets",
        }
    }

    /// The record as the server creates it: every field with its default. Keys not in here are
    /// ignored on writes, as Zendesk ignores unknown attributes.
    fn template(self) -> Map<String, Value> {
        let value = match self {
            Kind::Organization => json!({
                "name": null, "external_id": null, "details": null, "notes": null,
                "domain_names": [], "group_id": null, "organization_fields": {},
                "shared_comments": false, "shared_tickets": false, "tags": [],
            }),
            Kind::User => json!({
                "name": null, "email": null, "external_id": null, "organization_id": null,
                "role": "end-user", "phone": null, "details": "", "notes": "", "tags": [],
                "user_fields": {}, "active": true, "verified": false, "suspended": false,
                "time_zone": "Copenhagen", "locale": "en-US", "default_group_id": null,
            }),
            Kind::Ticket => json!({
                "external_id": null, "type": null, "subject": null, "description": null,
                "priority": null, "status": "new", "requester_id": null, "submitter_id": null,
                "assignee_id": null, "organization_id": null, "group_id": null, "tags": [],
                "custom_fields": [], "via": {"channel": "api"},
            }),
        };
        match value {
            Value::Object(map) => map,
            _ => unreachable!("templates are objects"),
        }
    }

    /// Fields no two records of the kind may share (case-insensitively).
    fn unique_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Organization => &["name", "external_id"],
            Kind::User => &["email", "external_id"],
            Kind::Ticket => &[],
        }
    }

    /// Fields the server owns beyond `id`, `url`, `created_at`, `updated_at`.
    fn server_owned(self, key: &str) -> bool {
        match self {
            Kind::Ticket => matches!(key, "description" | "via"),
            Kind::User => key == "active",
            Kind::Organization => false,
        }
    }
}

const READ_ONLY: [&str; 4] = ["id", "url", "created_at", "updated_at"];

struct Stored {
    /// Position in the change order, for incremental exports.
    seq: u64,
    body: Map<String, Value>,
}

#[derive(Default)]
struct Store {
    next_id: u64,
    next_seq: u64,
    organizations: BTreeMap<u64, Stored>,
    users: BTreeMap<u64, Stored>,
    tickets: BTreeMap<u64, Stored>,
    comments: BTreeMap<u64, Vec<Map<String, Value>>>,
    /// (kind, unique field, case-folded value) -> id, so a uniqueness check is a lookup rather
    /// than a scan of every record (Zendesk keeps such indexes too).
    unique: HashMap<(Kind, &'static str, String), u64>,
    /// Secondary email addresses an update of `email` added, per user ([`lookups`]).
    identities: BTreeMap<u64, Vec<String>>,
    /// Soft-deleted tickets: 404 to every call, `status: "deleted"` in the ticket export ([`life`]).
    deleted_tickets: BTreeSet<u64>,
    /// Ticket audits in the order they happened, for `incremental/ticket_events` ([`events`]).
    audits: Vec<events::Audit>,
    /// When a record written through the API shows up in search ([`lookups`]); absent: at once.
    indexed_at: HashMap<(Kind, u64), Instant>,
}

impl Store {
    fn table(&self, kind: Kind) -> &BTreeMap<u64, Stored> {
        match kind {
            Kind::Organization => &self.organizations,
            Kind::User => &self.users,
            Kind::Ticket => &self.tickets,
        }
    }

    fn table_mut(&mut self, kind: Kind) -> &mut BTreeMap<u64, Stored> {
        match kind {
            Kind::Organization => &mut self.organizations,
            Kind::User => &mut self.users,
            Kind::Ticket => &mut self.tickets,
        }
    }

    /// Stores a record under `id` as the newest change (next place in the export), keeping the
    /// uniqueness index in step.
    fn put(&mut self, kind: Kind, id: u64, body: Map<String, Value>) {
        let stored = Stored {
            seq: self.seq(),
            body,
        };
        for key in kind.unique_fields() {
            if let Some(old) = self
                .table(kind)
                .get(&id)
                .and_then(|s| unique_value(&s.body, key))
            {
                self.unique.remove(&(kind, *key, old));
            }
            if let Some(new) = unique_value(&stored.body, key) {
                self.unique.insert((kind, *key, new), id);
            }
        }
        self.table_mut(kind).insert(id, stored);
    }

    /// Whether another record of `kind` holds `value` in the unique field `key`.
    fn taken(&self, kind: Kind, key: &'static str, value: &Value, own_id: Option<u64>) -> bool {
        unique_key(value)
            .and_then(|v| self.unique.get(&(kind, key, v)))
            .is_some_and(|holder| Some(*holder) != own_id)
    }

    /// A soft-deleted ticket ([`life`]).
    fn is_deleted(&self, kind: Kind, id: u64) -> bool {
        kind == Kind::Ticket && self.deleted_tickets.contains(&id)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

struct Shared {
    state: Mutex<Store>,
    credentials: SimCredentials,
    webhooks: WebhookSender,
    /// The registered webhooks ([`hooks`]); deliveries go only to these.
    hooks: Mutex<hooks::Hooks>,
    control: SimControl,
    /// Vendor limits and lags a test may tune ([`limits`]).
    tuning: Mutex<limits::Tuning>,
}

/// Entry point: `ZendeskSim::start(options)`.
pub struct ZendeskSim;

impl ZendeskSim {
    /// Starts serving and returns the server and a handle to its state and knobs.
    pub async fn start(options: SimOptions) -> std::io::Result<(RunningSim, ZendeskSimHandle)> {
        let control = SimControl::new(error_body);
        let mut premade = hooks::Hooks::default();
        if let Some(target) = options.webhook_target {
            premade.premade(target, options.webhook_secret);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(Store {
                // Zendesk ids are large; starting high catches code that assumes small ones.
                next_id: 360_000_000_000,
                ..Store::default()
            }),
            credentials: options.credentials,
            webhooks: WebhookSender::with_lanes(None, control.clone(), options.webhook_lanes),
            hooks: Mutex::new(premade),
            control: control.clone(),
            tuning: Mutex::new(limits::Tuning::default()),
        });
        let router = kit::with_kit(router(shared.clone()), control);
        let running = kit::serve(router, options.bind).await?;
        Ok((running, ZendeskSimHandle { shared }))
    }
}

/// Direct access for tests and the sandbox: seed records (no webhooks, as if they existed before
/// the subscription), read state, turn knobs.
#[derive(Clone)]
pub struct ZendeskSimHandle {
    shared: Arc<Shared>,
}

impl ZendeskSimHandle {
    pub fn control(&self) -> &SimControl {
        &self.shared.control
    }

    pub fn webhook_stats(&self) -> WebhookStats {
        self.shared.webhooks.stats()
    }

    /// Seeds an organization (no validation, no webhook) and returns it as stored.
    pub fn insert_organization(&self, fields: Value) -> Value {
        self.insert(Kind::Organization, fields)
    }

    pub fn insert_user(&self, fields: Value) -> Value {
        self.insert(Kind::User, fields)
    }

    /// Seeds a ticket; a `comment` object in `fields` becomes its first comment.
    pub fn insert_ticket(&self, fields: Value) -> Value {
        self.insert(Kind::Ticket, fields)
    }

    fn insert(&self, kind: Kind, fields: Value) -> Value {
        let input = fields.as_object().cloned().unwrap_or_default();
        let mut state = self.shared.state.lock().unwrap();
        let record = build(&mut state, kind, &input, "http://zendesk.invalid");
        Value::Object(record)
    }

    /// Creates a record as an agent would in Zendesk: validated, stamped and announced by
    /// webhook. Answers what the API would (201 with the record, or the error).
    pub fn create(&self, kind: Kind, fields: Value) -> Response {
        let input = fields.as_object().cloned().unwrap_or_default();
        write_create(&self.shared, kind, input, "http://zendesk.invalid")
    }

    /// Changes a record as an agent would in Zendesk: validated, stamped and announced by one
    /// webhook per changed field. Answers what the API would.
    pub fn update(&self, kind: Kind, id: u64, fields: Value) -> Response {
        let input = fields.as_object().cloned().unwrap_or_default();
        write_update(&self.shared, kind, id, input)
    }

    /// Moves a record's `updated_at` (tests of the time-based export); its place in the change
    /// order stays. Returns false if there is no such record.
    pub fn set_updated_at(&self, kind: Kind, id: u64, unix_seconds: i64) -> bool {
        let Some(at) = DateTime::from_timestamp(unix_seconds, 0) else {
            return false;
        };
        let mut state = self.shared.state.lock().unwrap();
        match state.table_mut(kind).get_mut(&id) {
            Some(stored) => {
                stored
                    .body
                    .insert("updated_at".into(), json!(timestamp(at)));
                true
            }
            None => false,
        }
    }

    pub fn organization(&self, id: u64) -> Option<Value> {
        self.get(Kind::Organization, id)
    }

    pub fn user(&self, id: u64) -> Option<Value> {
        self.get(Kind::User, id)
    }

    pub fn ticket(&self, id: u64) -> Option<Value> {
        self.get(Kind::Ticket, id)
    }

    fn get(&self, kind: Kind, id: u64) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .table(kind)
            .get(&id)
            .map(|s| Value::Object(s.body.clone()))
    }

    /// All records of a kind, by id.
    pub fn all(&self, kind: Kind) -> Vec<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .table(kind)
            .values()
            .map(|s| Value::Object(s.body.clone()))
            .collect()
    }

    pub fn comments(&self, ticket_id: u64) -> Vec<Value> {
        let state = self.shared.state.lock().unwrap();
        state
            .comments
            .get(&ticket_id)
            .map(|c| c.iter().cloned().map(Value::Object).collect())
            .unwrap_or_default()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(directory_routes(Kind::Organization))
        .route("/api/v2/organizations/search", get(search_organizations))
        .merge(directory_routes(Kind::User))
        .route("/api/v2/users/search", get(search_users))
        .route("/api/v2/users/{id}/identities", get(lookups::identities))
        .merge(ticket_routes())
        .merge(export_routes(shared.clone()))
        .merge(hooks::routes())
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            auth_and_headers,
        ))
        .with_state(shared)
}

/// What organizations and users share: list and create, create-or-update, show_many, show and
/// update by id.
fn directory_routes(kind: Kind) -> Router<Arc<Shared>> {
    let base = format!("/api/v2/{}", kind.plural());
    Router::new()
        .route(
            &base,
            get(move |s, h, q| list(kind, s, h, q)).post(move |s, h, b| create(kind, s, h, b)),
        )
        .route(
            &format!("{base}/create_or_update"),
            post(move |s, h, b| create_or_update(kind, s, h, b)),
        )
        .route(
            &format!("{base}/show_many"),
            get(move |s, q| lookups::show_many(kind, s, q)),
        )
        .route(
            &format!("{base}/{{id}}"),
            get(move |s, p| show(kind, s, p)).put(move |s, p, b| update(kind, s, p, b)),
        )
}

/// Tickets, their comments (redaction, making private) and their deletion and restore.
fn ticket_routes() -> Router<Arc<Shared>> {
    use Kind::Ticket;
    Router::new()
        .route(
            "/api/v2/tickets",
            get(move |s, h, q| list(Ticket, s, h, q)).post(move |s, h, b| create(Ticket, s, h, b)),
        )
        .route(
            "/api/v2/tickets/{id}",
            get(move |s, p| show(Ticket, s, p))
                .put(move |s, p, b| update(Ticket, s, p, b))
                .delete(life::soft_delete),
        )
        .route("/api/v2/tickets/{id}/comments", get(list_comments))
        .route(
            "/api/v2/tickets/{id}/comments/{comment_id}/redact",
            axum::routing::put(life::redact),
        )
        .route(
            "/api/v2/tickets/{id}/comments/{comment_id}/make_private",
            axum::routing::put(life::make_private),
        )
        .route(
            "/api/v2/deleted_tickets/{id}",
            axum::routing::delete(life::delete_permanently),
        )
        .route(
            "/api/v2/deleted_tickets/{id}/restore",
            axum::routing::put(life::restore),
        )
}

/// The incremental exports, behind their own per-minute limit ([`limits::export_limit`]).
fn export_routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    use Kind::*;
    Router::new()
        .route(
            "/api/v2/incremental/organizations",
            get(incremental_organizations),
        )
        .route(
            "/api/v2/incremental/users/cursor",
            get(move |s, h, q| incremental_cursor(User, s, h, q)),
        )
        .route(
            "/api/v2/incremental/tickets/cursor",
            get(move |s, h, q| incremental_cursor(Ticket, s, h, q)),
        )
        .route(
            "/api/v2/incremental/ticket_events",
            get(events::ticket_events),
        )
        .route_layer(middleware::from_fn_with_state(shared, limits::export_limit))
}

/// Error bodies in Zendesk's shapes, for the statuses the kit produces. A 429 is plain text, as
/// Zendesk sends it for its rate limits (docs/vendors.md, Zendesk "429 and 409"): a client must
/// read `Retry-After`, never the body.
fn error_body(status: StatusCode, message: &str) -> Response {
    let body = match status {
        StatusCode::TOO_MANY_REQUESTS => return limits::too_many_text(),
        StatusCode::UNAUTHORIZED => json!({"error": "Couldn't authenticate you"}),
        _ => json!({"error": "InternalServerError", "description": message}),
    };
    (status, Json(body)).into_response()
}

fn not_found() -> Response {
    kit::respond(
        StatusCode::NOT_FOUND,
        json!({"error": "RecordNotFound", "description": "Not found"}),
    )
}

fn invalid(field: &str, code: &str, description: String) -> Response {
    kit::respond(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({
            "error": "RecordInvalid",
            "description": "Record validation errors",
            "details": { field: [{"description": description, "error": code}] },
        }),
    )
}

fn invalid_boxed(field: &str, code: &str, description: String) -> Box<Response> {
    Box::new(invalid(field, code, description))
}

fn bad_request(message: &str) -> Response {
    kit::respond(
        StatusCode::BAD_REQUEST,
        json!({"error": "InvalidParameter", "description": message}),
    )
}

/// Checks credentials, then adds Zendesk's rate-limit headers to the answer.
async fn auth_and_headers(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if !authorized(&shared.credentials, request.headers()) {
        return error_body(StatusCode::UNAUTHORIZED, "");
    }
    let mut response = next.run(request).await;
    if let Some((limit, remaining, reset)) = shared.control.rate_status() {
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("x-rate-limit"),
            HeaderValue::from(limit),
        );
        headers.insert(
            HeaderName::from_static("x-rate-limit-remaining"),
            HeaderValue::from(remaining),
        );
        headers.insert(
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(reset),
        );
    }
    response
}

fn authorized(credentials: &SimCredentials, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(token) = value.strip_prefix("Bearer ") {
        return credentials.oauth_token.as_deref() == Some(token.trim());
    }
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let expected = format!("{}/token:{}", credentials.email, credentials.api_token);
        return BASE64
            .decode(encoded.trim())
            .is_ok_and(|decoded| decoded == expected.as_bytes());
    }
    false
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn seconds_of(record: &Map<String, Value>, key: &str) -> i64 {
    record
        .get(key)
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

/// `http://host` from the request, for `url` fields and pagination links.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// Zendesk accepts `/organizations/1.json` as well as `/organizations/1`.
fn parse_id(raw: &str) -> Option<u64> {
    raw.strip_suffix(".json").unwrap_or(raw).parse().ok()
}

fn parse_body(bytes: &Bytes, envelope: &str) -> Result<Map<String, Value>, Box<Response>> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Box::new(bad_request(&format!("the body is not valid JSON: {e}"))))?;
    match value.get(envelope) {
        Some(Value::Object(map)) => Ok(map.clone()),
        _ => Err(Box::new(bad_request(&format!(
            "the body must be an object with a `{envelope}` object"
        )))),
    }
}

async fn show(kind: Kind, State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Response {
    let Some(id) = parse_id(&raw) else {
        return not_found();
    };
    let state = shared.state.lock().unwrap();
    match state.table(kind).get(&id) {
        Some(stored) if !state.is_deleted(kind, id) => {
            kit::respond(StatusCode::OK, envelope(kind, &stored.body))
        }
        _ => not_found(),
    }
}

async fn create(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let input = match parse_body(&body, kind.singular()) {
        Ok(input) => input,
        Err(response) => return *response,
    };
    write_create(&shared, kind, input, &origin(&headers))
}

fn write_create(shared: &Shared, kind: Kind, input: Map<String, Value>, origin: &str) -> Response {
    if kind == Kind::Ticket {
        match input.get("comment") {
            Some(Value::Object(c)) if !comment_text(c).is_empty() => {}
            _ => return invalid("base", "BlankValue", "Description: cannot be blank".into()),
        }
    }
    let mut state = shared.state.lock().unwrap();
    let mut candidate = kind.template();
    apply(kind, &mut candidate, &input);
    if let Err(response) = validate(&state, kind, &candidate, None) {
        return *response;
    }
    let record = build(&mut state, kind, &input, origin);
    if let Some(id) = record.get("id").and_then(Value::as_u64) {
        lookups::index_later(shared, &mut state, kind, id);
    }
    shared.emit_created(kind, &record);
    let mut response = kit::respond(StatusCode::CREATED, envelope(kind, &record));
    set_location(&mut response, kind, &record);
    response
}

fn set_location(response: &mut Response, kind: Kind, record: &Map<String, Value>) {
    if let Some(id) = record.get("id") {
        if let Ok(value) = HeaderValue::from_str(&format!("/api/v2/{}/{id}.json", kind.plural())) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
}

/// `create_or_update`: organizations match by `id` or `external_id`; users by `external_id` or
/// `email`. 200 when it updated an existing record, 201 when it created one.
async fn create_or_update(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let input = match parse_body(&body, kind.singular()) {
        Ok(input) => input,
        Err(response) => return *response,
    };
    let existing = {
        let state = shared.state.lock().unwrap();
        let matches = |key: &str, record: &Map<String, Value>| {
            input
                .get(key)
                .filter(|v| !v.is_null())
                .is_some_and(|v| record.get(key).is_some_and(|r| ci_eq(r, v)))
        };
        let keys: &[&str] = match kind {
            Kind::Organization => &["id", "external_id"],
            _ => &["external_id", "email"],
        };
        keys.iter().find_map(|key| {
            state
                .table(kind)
                .iter()
                .find(|(_, s)| matches(key, &s.body))
                .map(|(id, _)| *id)
        })
    };
    match existing {
        Some(id) => {
            let mut response = write_update(&shared, kind, id, input);
            if response.status() == StatusCode::OK {
                if let Ok(value) =
                    HeaderValue::from_str(&format!("/api/v2/{}/{id}.json", kind.plural()))
                {
                    response.headers_mut().insert(header::LOCATION, value);
                }
            }
            response
        }
        None => create(kind, State(shared), headers, body).await,
    }
}

async fn update(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = parse_id(&raw) else {
        return not_found();
    };
    let input = match parse_body(&body, kind.singular()) {
        Ok(input) => input,
        Err(response) => return *response,
    };
    if let Some(agents) = limits::take_racing_change(&shared, kind, id) {
        write_update(&shared, kind, id, agents);
    }
    write_update(&shared, kind, id, input)
}

fn write_update(shared: &Shared, kind: Kind, id: u64, mut input: Map<String, Value>) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some(stored) = state.table(kind).get(&id) else {
        return not_found();
    };
    if state.is_deleted(kind, id) {
        return not_found();
    }
    let before = stored.body.clone();
    if let Some(refusal) = life::closed_refusal(kind, &before, &input) {
        return refusal;
    }
    if let Some(stale) = limits::stale_safe_update(kind, &before, &input) {
        return stale;
    }
    if let Some(conflict) = limits::take_conflict(shared) {
        return conflict;
    }
    if kind == Kind::User {
        lookups::email_becomes_identity(&mut state, id, &before, &mut input);
    }
    let mut after = before.clone();
    let changed = apply(kind, &mut after, &input);
    if let Err(response) = validate(&state, kind, &after, Some(id)) {
        return *response;
    }
    let comment_input = match comment_of_update(kind, &input) {
        Ok(comment) => comment,
        Err(refusal) => return *refusal,
    };
    if changed.is_empty() && comment_input.is_none() {
        return kit::respond(StatusCode::OK, envelope(kind, &before));
    }
    after.insert("updated_at".into(), json!(timestamp(now())));
    let added = comment_input.map(|c| {
        let author = c
            .get("author_id")
            .cloned()
            .unwrap_or_else(|| after.get("requester_id").cloned().unwrap_or(Value::Null));
        add_comment(&mut state, id, &c, author)
    });
    state.put(kind, id, after.clone());
    lookups::index_later(shared, &mut state, kind, id);
    for key in &changed {
        shared.emit_change(kind, &after, key, &before[key], &after[key]);
    }
    let mut body = json!({ kind.singular(): after });
    if let Some((comment, audit_id)) = &added {
        shared.emit(kind, &after, "ticket.comment_added", comment_added(comment));
        body["audit"] = comment_audit(id, comment, *audit_id);
    }
    drop(state);
    kit::respond(StatusCode::OK, body)
}

/// The comment an update of a ticket adds, if any; Zendesk refuses a blank or malformed one.
fn comment_of_update(
    kind: Kind,
    input: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, Box<Response>> {
    match (kind, input.get("comment")) {
        (Kind::Ticket, Some(Value::Object(c))) if comment_text(c).is_empty() => Err(Box::new(
            invalid("base", "BlankValue", "Comment: body cannot be blank".into()),
        )),
        (Kind::Ticket, Some(Value::Object(c))) => Ok(Some(c.clone())),
        (Kind::Ticket, Some(_)) => Err(Box::new(bad_request("`comment` must be an object"))),
        _ => Ok(None),
    }
}

/// The `event` of a `ticket.comment_added` webhook for a stored comment.
fn comment_added(comment: &Map<String, Value>) -> Value {
    json!({"comment": {
        "id": comment["id"].to_string(),
        "body": comment["body"],
        "is_public": comment["public"],
        "author": {"id": id_string(&comment["author_id"])},
    }})
}

/// The audit an update that added a comment answers with (its one event is the comment).
fn comment_audit(ticket_id: u64, comment: &Map<String, Value>, audit_id: u64) -> Value {
    let mut event = comment.clone();
    event.remove("created_at");
    json!({
        "id": audit_id,
        "ticket_id": ticket_id,
        "created_at": comment["created_at"],
        "author_id": comment["author_id"],
        "events": [event],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_seq(&encode_seq(7)), Some(7));
        assert_eq!(decode_cursor("not-a-cursor"), None);
        assert_eq!(decode_seq(&encode_cursor(7)), None);
    }

    #[test]
    fn basic_and_bearer_auth() {
        let creds = SimCredentials {
            email: "a@b.c".into(),
            api_token: "tok".into(),
            oauth_token: Some("oauth".into()),
        };
        let mut headers = HeaderMap::new();
        let basic = format!("Basic {}", BASE64.encode("a@b.c/token:tok"));
        headers.insert(header::AUTHORIZATION, basic.parse().unwrap());
        assert!(authorized(&creds, &headers));
        headers.insert(header::AUTHORIZATION, "Bearer oauth".parse().unwrap());
        assert!(authorized(&creds, &headers));
        headers.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(!authorized(&creds, &headers));
        let wrong = format!("Basic {}", BASE64.encode("a@b.c:tok"));
        headers.insert(header::AUTHORIZATION, wrong.parse().unwrap());
        assert!(!authorized(&creds, &headers));
        assert!(!format!("{creds:?}").contains("tok"));
    }

    #[test]
    fn detail_has_ids_as_strings() {
        let mut record = Kind::User.template();
        record.insert("id".into(), json!(5));
        record.insert("organization_id".into(), json!(9));
        record.insert("external_id".into(), json!("x"));
        let d = detail(Kind::User, &record);
        assert_eq!(d["id"], json!("5"));
        assert_eq!(d["organization_id"], json!("9"));
        assert_eq!(d["external_id"], json!("x"));
    }
}
