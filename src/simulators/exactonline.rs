//! Exact Online simulator: the token endpoint with rotating refresh tokens, `crm/Accounts`,
//! `hrm/Departments`, `hrm/Divisions` and `sync/CRM/Accounts` of one division in OData v2 JSON,
//! the per-division minute and day limits with `X-RateLimit-*` headers, and HashCode-signed
//! webhooks (topic `Accounts`) for every account change made through the API.
//!
//! Token rules as Exact applies them: each refresh returns a new refresh token; the previous one
//! still works until the new one has been used (a lost response can be retried), after that it
//! is invalid (`400 invalid_grant`). A refresh sooner than `min_refresh_interval` after the last
//! one is refused with `400 invalid_request`.

mod deleted;
mod oauth;
mod odata;
mod subscriptions;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use chrono::{NaiveDateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};

use super::kit::{self, FixedWindow, Outgoing, RunningSim, SimControl, WebhookSender};
use crate::signing;
use oauth::*;
use odata::*;

/// Row versions start above 2^53, where an Int64 read through a floating-point number (as a
/// JavaScript client or a careless parser would) loses its last digits.
const FIRST_ROW_VERSION: i64 = (1 << 53) + 1;

/// How the simulated tenant is set up.
#[derive(Debug, Clone)]
pub struct ExactSimConfig {
    pub division: i64,
    pub client_id: String,
    pub client_secret: String,
    /// The refresh token the first refresh must use (what an operator would configure).
    pub refresh_token: String,
    pub access_token_ttl: Duration,
    pub min_refresh_interval: Duration,
    pub minutely_limit: u32,
    pub daily_limit: u32,
    pub page_size: usize,
    /// Key of the webhook HashCode. `webhook_target`: a subscription to `Accounts` that exists
    /// from the start (made in Exact before); otherwise webhooks go only to the subscriptions made
    /// through `webhooks/WebhookSubscriptions`.
    pub webhook_secret: String,
    pub webhook_target: Option<String>,
    /// Exact's strict rotation (set per app by Exact): a refresh token is dead the moment it is
    /// used, so a lost refresh response cannot be retried with it.
    pub strict_rotation: bool,
}

impl ExactSimConfig {
    /// The `[exactonline]` section of a Tether configuration that connects to this simulator
    /// (used by the sandbox and the chaos suite).
    pub fn tether_section(&self, base_url: &str, poll_interval: &str) -> String {
        format!(
            r#"[exactonline]
base_url = "{base_url}"
division = {division}
client_id = "{client_id}"
client_secret = "{client_secret}"
refresh_token = "{refresh_token}"
webhook_secret = "{webhook_secret}"
poll_interval = "{poll_interval}"
"#,
            division = self.division,
            client_id = self.client_id,
            client_secret = self.client_secret,
            refresh_token = self.refresh_token,
            webhook_secret = self.webhook_secret,
        )
    }
}

impl Default for ExactSimConfig {
    fn default() -> Self {
        ExactSimConfig {
            division: 123456,
            client_id: "sim-client".to_owned(),
            client_secret: "sim-client-secret".to_owned(),
            refresh_token: "sim-refresh-0".to_owned(),
            access_token_ttl: Duration::from_secs(600),
            min_refresh_interval: Duration::from_secs(570),
            minutely_limit: 60,
            daily_limit: 5000,
            page_size: 60,
            webhook_secret: "sim-webhook-secret".to_owned(),
            webhook_target: None,
            strict_rotation: false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Set {
    Accounts,
    Departments,
    Divisions,
}

struct Row {
    /// The entity's properties, dates as milliseconds in `Created`/`Modified` below.
    props: Map<String, Value>,
    modified_ms: i64,
    /// Sync API row version.
    timestamp: i64,
}

struct Tokens {
    current: String,
    previous: Option<String>,
    generation: u64,
    last_refresh: Option<Instant>,
    access: BTreeMap<String, Instant>,
}

struct Limits {
    minute: FixedWindow,
    day: FixedWindow,
}

struct Inner {
    config: ExactSimConfig,
    rows: BTreeMap<(Set, String), Row>,
    row_version: i64,
    tokens: Tokens,
    limits: Limits,
    public_base: String,
    token_calls: u64,
    errors: ErrorCounts,
    /// The next token answer is held this long after the refresh was done (a lost response).
    hold_next_token_answer: Option<Duration>,
    /// What `sync/Deleted` reports, oldest first.
    deleted: Vec<deleted::Tombstone>,
    /// `webhooks/WebhookSubscriptions` by ID: where webhooks go.
    subscriptions: BTreeMap<String, subscriptions::Subscription>,
}

/// Exact's error rule (docs/vendors.md, Exact Online item 3): "No more than 10 errors per API
/// key, per user, per company, per endpoint, and per hour … Response code 400, 401, 403, and 404
/// are counted as errors." The simulator has one app, user and division, so it counts per
/// endpoint (`crm/Accounts`, the key stripped) and clock hour, 405 included, and blocks the
/// endpoint for the rest of the hour once the count passes 10.
#[derive(Default)]
struct ErrorCounts {
    /// (endpoint, hours since the epoch) -> errors.
    counts: BTreeMap<(String, i64), u32>,
}

/// Errors an endpoint may cause within an hour before Exact blocks it.
pub const ERRORS_PER_ENDPOINT_AND_HOUR: u32 = 10;

impl ErrorCounts {
    fn hour() -> i64 {
        Utc::now().timestamp().div_euclid(3600)
    }

    fn count(&mut self, endpoint: &str, status: StatusCode) {
        if matches!(status.as_u16(), 400 | 401 | 403 | 404 | 405) {
            *self
                .counts
                .entry((endpoint.to_owned(), Self::hour()))
                .or_default() += 1;
        }
    }

    fn this_hour(&self, endpoint: &str) -> u32 {
        self.counts
            .get(&(endpoint.to_owned(), Self::hour()))
            .copied()
            .unwrap_or(0)
    }

    fn blocked(&self, endpoint: &str) -> bool {
        self.this_hour(endpoint) > ERRORS_PER_ENDPOINT_AND_HOUR
    }
}

/// The endpoint Exact counts errors for: the path after `/api/v1/{division}/` without a key.
fn endpoint_of(path: &str) -> String {
    let rest = path
        .strip_prefix("/api/v1/")
        .and_then(|r| r.split_once('/'))
        .map(|(_, r)| r)
        .unwrap_or(path);
    rest.split('(').next().unwrap_or(rest).to_owned()
}

/// Handle to a running Exact simulator's state.
#[derive(Clone)]
pub struct ExactSim {
    inner: Arc<Mutex<Inner>>,
    pub control: SimControl,
    webhooks: WebhookSender,
}

/// Exact's error envelope.
fn exact_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": "", "message": {"lang": "", "value": message}}})),
    )
        .into_response()
}

fn odata_date(ms: i64) -> Value {
    Value::String(format!("/Date({ms})/"))
}

impl ExactSim {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Errors Exact counts (400, 401, 403, 404, 405) on `endpoint` (`crm/Accounts`) this hour.
    pub fn errors_this_hour(&self, endpoint: &str) -> u32 {
        self.lock().errors.this_hour(endpoint)
    }

    /// The next refresh is carried out, but its answer is held for `delay` before it is sent:
    /// a client with a shorter timeout loses it (the rotation happened all the same).
    pub fn lose_next_token_response(&self, delay: Duration) {
        self.lock().hold_next_token_answer = Some(delay);
    }

    /// Calls to the token endpoint so far.
    pub fn token_calls(&self) -> u64 {
        self.lock().token_calls
    }

    /// The refresh token that currently works (what a re-authorisation would hand out).
    pub fn current_refresh_token(&self) -> String {
        self.lock().tokens.current.clone()
    }

    /// The user withdrew Tether's access in Exact's app centre: every access and refresh token
    /// is dead at once, and a re-authorisation would hand out [`Self::current_refresh_token`].
    pub fn revoke_grant(&self) {
        let mut inner = self.lock();
        let tokens = &mut inner.tokens;
        tokens.access.clear();
        tokens.previous = None;
        tokens.last_refresh = None;
        tokens.generation += 1;
        tokens.current = format!(
            "sim-refresh-{}-{}",
            tokens.generation,
            uuid::Uuid::new_v4().simple()
        );
    }

    /// Makes every access token expire now, as if ten minutes had passed.
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for until in self.lock().tokens.access.values_mut() {
            *until = now;
        }
    }

    /// Adds or replaces an account without a webhook (test and sandbox seeding). Returns its ID.
    pub fn seed_account(&self, props: Value) -> String {
        self.seed(Set::Accounts, props)
    }

    /// Creates an account as a user in Exact would: stored with a new `Timestamp` and announced
    /// by a `Create` webhook. Returns its ID.
    pub fn create_account(&self, props: Value) -> String {
        let id = self.seed(Set::Accounts, props);
        self.notify("Create", &id);
        id
    }

    /// The number of accounts.
    pub fn account_count(&self) -> usize {
        self.lock()
            .rows
            .keys()
            .filter(|(set, _)| *set == Set::Accounts)
            .count()
    }

    pub fn seed_department(&self, props: Value) -> String {
        self.seed(Set::Departments, props)
    }

    /// Divisions are keyed by their integer `Code`, which `props` must contain.
    pub fn seed_division(&self, props: Value) -> String {
        self.seed(Set::Divisions, props)
    }

    /// Seeds with a given `Modified` time (milliseconds), for equal-timestamp tests.
    pub fn seed_at(&self, entity_set: &str, props: Value, modified_ms: i64) -> String {
        let set = match entity_set {
            "Accounts" => Set::Accounts,
            "Departments" => Set::Departments,
            _ => Set::Divisions,
        };
        let id = self.seed(set, props);
        if let Some(row) = self.lock().rows.get_mut(&(set, id.clone())) {
            row.modified_ms = modified_ms;
        }
        id
    }

    fn seed(&self, set: Set, props: Value) -> String {
        let mut inner = self.lock();
        let Value::Object(props) = props else {
            panic!("seed properties must be a JSON object");
        };
        inner.insert(set, props, None).0
    }

    /// Changes an account as a user in Exact would: new `Modified` and sync `Timestamp`, and an
    /// `Update` webhook. Returns `false` if there is no such account.
    pub fn change_account(&self, id: &str, changes: Value) -> bool {
        let id = id.to_lowercase();
        {
            let mut inner = self.lock();
            let Some(row) = inner.rows.get(&(Set::Accounts, id.clone())) else {
                return false;
            };
            let mut props = row.props.clone();
            if let Value::Object(changes) = changes {
                props.extend(changes);
            }
            inner.insert(Set::Accounts, props, Some(id.clone()));
        }
        self.notify("Update", &id);
        true
    }

    /// Deletes an account as a user in Exact would, with a `Delete` webhook.
    pub fn delete_account(&self, id: &str) -> bool {
        let id = id.to_lowercase();
        let removed = self.lock().remove(Set::Accounts, &id);
        if removed {
            self.notify("Delete", &id);
        }
        removed
    }

    /// An account's current properties (test assertions).
    pub fn account(&self, id: &str) -> Option<Value> {
        let inner = self.lock();
        inner
            .rows
            .get(&(Set::Accounts, id.to_owned()))
            .map(|row| inner.render(Set::Accounts, row))
    }

    pub fn webhook_stats(&self) -> kit::WebhookStats {
        self.webhooks.stats()
    }

    fn notify(&self, action: &str, id: &str) {
        let callbacks = self.subscribers("Accounts");
        if callbacks.is_empty() {
            return;
        }
        let (content, secret) = {
            let inner = self.lock();
            let endpoint = format!(
                "{}/api/v1/{}/crm/Accounts(guid'{id}')",
                inner.public_base, inner.config.division
            );
            let content = json!({
                "Topic": "Accounts",
                "ClientId": inner.config.client_id,
                "Division": inner.config.division,
                "Action": action,
                "Key": id,
                "ExactOnlineEndpoint": endpoint,
                "EventCreatedOn": Utc::now().format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            })
            .to_string();
            (content, inner.config.webhook_secret.clone())
        };
        let hash = signing::exact::sign(&secret, content.as_bytes());
        let body = format!("{{\"Content\":{content},\"HashCode\":\"{hash}\"}}");
        for callback in callbacks {
            let outgoing = Outgoing {
                body: body.clone().into_bytes(),
                headers: HeaderMap::new(),
                record: format!("Accounts/{id}"),
            };
            self.webhooks.send_to(callback, outgoing);
        }
    }
}

impl Inner {
    /// Removes a row as a delete in Exact does: with a `sync/Deleted` entry of a new row version.
    fn remove(&mut self, set: Set, key: &str) -> bool {
        if self.rows.remove(&(set, key.to_owned())).is_none() {
            return false;
        }
        if let Some(entity_type) = deleted::entity_type(set) {
            self.row_version += 1;
            self.deleted.push(deleted::Tombstone {
                timestamp: self.row_version,
                entity_type,
                key: key.to_owned(),
                deleted_ms: Utc::now().timestamp_millis(),
            });
        }
        true
    }

    fn key_field(set: Set) -> &'static str {
        match set {
            Set::Divisions => "Code",
            _ => "ID",
        }
    }

    /// Inserts or replaces; returns the key and whether it was new.
    fn insert(
        &mut self,
        set: Set,
        mut props: Map<String, Value>,
        id: Option<String>,
    ) -> (String, bool) {
        let key_field = Self::key_field(set);
        let id = match (id, props.get(key_field)) {
            (Some(id), _) => id,
            (None, Some(Value::String(s))) => s.to_lowercase(),
            (None, Some(Value::Number(n))) => n.to_string(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        props.insert(
            key_field.to_owned(),
            if set == Set::Divisions {
                json!(id.parse::<i64>().unwrap_or_default())
            } else {
                json!(id)
            },
        );
        props.remove("Modified");
        props.remove("Timestamp");
        props.insert("Division".to_owned(), json!(self.config.division));
        let now = Utc::now().timestamp_millis();
        self.row_version += 1;
        let key = (set, id.clone());
        let created = !self.rows.contains_key(&key);
        if created {
            props.entry("Created").or_insert(odata_date(now));
        }
        self.rows.insert(
            key,
            Row {
                props,
                modified_ms: now,
                timestamp: self.row_version,
            },
        );
        (id, created)
    }

    fn render(&self, _set: Set, row: &Row) -> Value {
        let mut props = row.props.clone();
        props.insert("Modified".to_owned(), odata_date(row.modified_ms));
        props.insert("Division".to_owned(), json!(self.config.division));
        Value::Object(props)
    }

    fn check_bearer(&mut self, headers: &HeaderMap) -> bool {
        let Some(token) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        matches!(self.tokens.access.get(token), Some(until) if *until > Instant::now())
    }

    /// Counts a call against the minute and day windows; `Err` is a 429.
    fn take_limits(&mut self) -> Result<(), ()> {
        if self.limits.minute.remaining() == 0 || self.limits.day.remaining() == 0 {
            return Err(());
        }
        self.limits.minute.take().map_err(|_| ())?;
        self.limits.day.take().map_err(|_| ())
    }

    fn limit_headers(&mut self) -> Vec<(&'static str, String)> {
        let reset_ms = |window: &FixedWindow| {
            let reset =
                Utc::now() + chrono::Duration::from_std(window.resets_in()).unwrap_or_default();
            reset.timestamp_millis().to_string()
        };
        let (minute, day) = (&mut self.limits.minute, &mut self.limits.day);
        vec![
            ("x-ratelimit-limit", day.limit.to_string()),
            ("x-ratelimit-remaining", day.remaining().to_string()),
            ("x-ratelimit-reset", reset_ms(day)),
            ("x-ratelimit-minutely-limit", minute.limit.to_string()),
            (
                "x-ratelimit-minutely-remaining",
                minute.remaining().to_string(),
            ),
            ("x-ratelimit-minutely-reset", reset_ms(minute)),
        ]
    }
}

/// Auth, the error block and the per-division limits, with the headers on every answer (429
/// included); every answer Exact counts as an error is counted.
async fn api_guard(State(sim): State<ExactSim>, request: Request, next: Next) -> Response {
    let endpoint = endpoint_of(request.uri().path());
    let (authorised, blocked, limited, headers) = {
        let mut inner = sim.lock();
        let blocked = inner.errors.blocked(&endpoint);
        let authorised = inner.check_bearer(request.headers());
        let limited = authorised && !blocked && inner.take_limits().is_err();
        (authorised, blocked, limited, inner.limit_headers())
    };
    let mut response = if blocked {
        exact_error(
            StatusCode::TOO_MANY_REQUESTS,
            "API key blocked: too many errors on this endpoint within the hour",
        )
    } else if !authorised {
        exact_error(StatusCode::UNAUTHORIZED, "Unauthorized")
    } else if limited {
        exact_error(StatusCode::TOO_MANY_REQUESTS, "API rate limit exceeded")
    } else {
        next.run(request).await
    };
    sim.lock().errors.count(&endpoint, response.status());
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

fn list(
    inner: &Inner,
    set: Set,
    path: &str,
    query: &BTreeMap<String, String>,
    sync: bool,
) -> Response {
    let clauses = match query.get("$filter").map(|f| parse_filter(f)).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(message) => return exact_error(StatusCode::BAD_REQUEST, &message),
    };
    let mut rows: Vec<(&String, &Row)> = inner
        .rows
        .iter()
        .filter(|((s, _), row)| *s == set && matches(row, &clauses))
        .map(|((_, id), row)| (id, row))
        .collect();
    match query.get("$orderby").map(String::as_str) {
        Some("Modified") => {
            rows.sort_by(|a, b| a.1.modified_ms.cmp(&b.1.modified_ms).then(a.0.cmp(b.0)))
        }
        Some("Timestamp") => rows.sort_by_key(|r| r.1.timestamp),
        _ if sync => rows.sort_by_key(|r| r.1.timestamp),
        _ => {}
    }
    let skip: usize = query
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let page = if sync { 1000 } else { inner.config.page_size };
    let page = match query.get("$top").map(|t| t.parse::<usize>()) {
        None => page,
        Some(Ok(top)) => page.min(top),
        Some(Err(_)) => return exact_error(StatusCode::BAD_REQUEST, "$top is not a number"),
    };
    let top_reached = query.contains_key("$top");
    let results: Vec<Value> = rows
        .iter()
        .skip(skip)
        .take(page)
        .map(|(_, row)| {
            let mut v = inner.render(set, row);
            if sync {
                // Edm.Int64 travels as a JSON string in OData v2 (docs/vendors.md, Exact item 2).
                v["Timestamp"] = json!(row.timestamp.to_string());
            }
            v
        })
        .collect();
    let mut d = json!({ "results": results });
    if rows.len() > skip + page && !top_reached {
        d["__next"] = json!(next_link(&inner.public_base, path, query, skip + page));
    }
    kit::respond(StatusCode::OK, json!({ "d": d }))
}

async fn entity_get(
    State(sim): State<ExactSim>,
    Path((_division, module, segment)): Path<(i64, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    request_path: axum::http::Uri,
) -> Response {
    let Some((name, key)) = parse_segment(&segment) else {
        return exact_error(StatusCode::BAD_REQUEST, "bad resource segment");
    };
    if subscriptions::is_subscriptions(&module, name) && key.is_none() {
        return subscriptions::list(&sim);
    }
    let inner = sim.lock();
    let Some(set) = set_of(&module, name) else {
        return exact_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    match key {
        None => list(&inner, set, request_path.path(), &query, false),
        Some(key) => match inner.rows.get(&(set, key)) {
            Some(row) => kit::respond(StatusCode::OK, json!({"d": inner.render(set, row)})),
            None => exact_error(StatusCode::NOT_FOUND, "Not found"),
        },
    }
}

async fn sync_accounts(
    State(sim): State<ExactSim>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    let inner = sim.lock();
    if !query
        .get("$filter")
        .is_some_and(|f| f.contains("Timestamp"))
    {
        return exact_error(
            StatusCode::BAD_REQUEST,
            "The sync API requires a filter on Timestamp",
        );
    }
    list(&inner, Set::Accounts, uri.path(), &query, true)
}

/// `hrm/Departments` and `hrm/Divisions` are GET only in Exact's REST API (docs/vendors.md, Exact
/// item 1): a write is refused with 405 and Exact's error envelope.
fn read_only(set: Set) -> Option<Response> {
    matches!(set, Set::Departments | Set::Divisions)
        .then(|| exact_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"))
}

async fn entity_post(
    State(sim): State<ExactSim>,
    Path((_division, module, segment)): Path<(i64, String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if parse_segment(&segment)
        .is_some_and(|(n, k)| k.is_none() && subscriptions::is_subscriptions(&module, n))
    {
        return subscriptions::create(&sim, &body);
    }
    let Some(set) = parse_segment(&segment)
        .and_then(|(n, k)| k.is_none().then_some(()).and(set_of(&module, n)))
    else {
        return exact_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    if let Some(refusal) = read_only(set) {
        return refusal;
    }
    let Value::Object(props) = body else {
        return exact_error(StatusCode::BAD_REQUEST, "body must be an object");
    };
    if set == Set::Accounts
        && props
            .get("Name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return exact_error(StatusCode::BAD_REQUEST, "Mandatory: Name");
    }
    let (id, rendered) = {
        let mut inner = sim.lock();
        let (id, _) = inner.insert(set, props, Some(uuid::Uuid::new_v4().to_string()));
        let rendered = inner.render(set, &inner.rows[&(set, id.clone())]);
        (id, rendered)
    };
    if set == Set::Accounts {
        sim.notify("Create", &id);
    }
    let wants_body = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("return=representation"));
    if wants_body {
        kit::respond(StatusCode::CREATED, json!({"d": rendered}))
    } else {
        kit::empty(StatusCode::CREATED)
    }
}

async fn entity_put(
    State(sim): State<ExactSim>,
    Path((_division, module, segment)): Path<(i64, String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let Some((name, Some(key))) = parse_segment(&segment) else {
        return exact_error(StatusCode::BAD_REQUEST, "PUT needs a key");
    };
    let Some(set) = set_of(&module, name) else {
        return exact_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    if let Some(refusal) = read_only(set) {
        return refusal;
    }
    let Value::Object(changes) = body else {
        return exact_error(StatusCode::BAD_REQUEST, "body must be an object");
    };
    {
        let mut inner = sim.lock();
        let Some(row) = inner.rows.get(&(set, key.clone())) else {
            return exact_error(StatusCode::NOT_FOUND, "Not found");
        };
        let mut props = row.props.clone();
        for (k, v) in changes {
            if k != Inner::key_field(set) {
                props.insert(k, v);
            }
        }
        inner.insert(set, props, Some(key.clone()));
    }
    if set == Set::Accounts {
        sim.notify("Update", &key);
    }
    kit::empty(StatusCode::NO_CONTENT)
}

async fn entity_delete(
    State(sim): State<ExactSim>,
    Path((_division, module, segment)): Path<(i64, String, String)>,
) -> Response {
    let Some((name, Some(key))) = parse_segment(&segment) else {
        return exact_error(StatusCode::BAD_REQUEST, "DELETE needs a key");
    };
    if subscriptions::is_subscriptions(&module, name) {
        return subscriptions::delete(&sim, &key);
    }
    let Some(set) = set_of(&module, name) else {
        return exact_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    if let Some(refusal) = read_only(set) {
        return refusal;
    }
    let removed = sim.lock().remove(set, &key);
    if !removed {
        return exact_error(StatusCode::NOT_FOUND, "Not found");
    }
    if set == Set::Accounts {
        sim.notify("Delete", &key);
    }
    kit::empty(StatusCode::NO_CONTENT)
}

/// Builds the router (API under the kit's fault layer, token endpoint outside the API limits).
pub fn router(sim: ExactSim) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/{division}/{module}/{segment}",
            get(entity_get)
                .post(entity_post)
                .put(entity_put)
                .delete(entity_delete),
        )
        .route("/api/v1/{division}/sync/CRM/Accounts", get(sync_accounts))
        .route(
            "/api/v1/{division}/sync/Deleted",
            get(deleted::sync_deleted),
        )
        .layer(middleware::from_fn_with_state(sim.clone(), api_guard))
        .route("/api/oauth2/token", post(token))
        .with_state(sim.clone());
    // The token endpoint is outside the API limits (`api_guard` does not count it either).
    sim.control.leave_out_of_peaks("POST /api/oauth2/token");
    kit::with_kit(api, sim.control.clone())
}

/// Starts the simulator on `bind` (port 0: any free port).
pub async fn start(
    config: ExactSimConfig,
    bind: SocketAddr,
) -> std::io::Result<(ExactSim, RunningSim)> {
    let control = SimControl::new(exact_error);
    // Every delivery names its subscription's callback (`send_to`).
    let webhooks = WebhookSender::new(None, control.clone());
    let sim = ExactSim {
        inner: Arc::new(Mutex::new(Inner {
            tokens: Tokens {
                current: config.refresh_token.clone(),
                previous: None,
                generation: 0,
                last_refresh: None,
                access: BTreeMap::new(),
            },
            limits: Limits {
                minute: FixedWindow::new(config.minutely_limit, Duration::from_secs(60)),
                day: FixedWindow::new(config.daily_limit, Duration::from_secs(86_400)),
            },
            config,
            rows: BTreeMap::new(),
            row_version: FIRST_ROW_VERSION,
            deleted: Vec::new(),
            public_base: String::new(),
            token_calls: 0,
            errors: ErrorCounts::default(),
            hold_next_token_answer: None,
            subscriptions: BTreeMap::new(),
        })),
        control,
        webhooks,
    };
    // A configured target stands for a subscription made in Exact before the test or sandbox.
    let made_before = sim.lock().config.webhook_target.clone();
    if let Some(target) = made_before {
        sim.subscribe(&target, "Accounts");
    }
    let running = kit::serve(router(sim.clone()), bind).await?;
    sim.lock().public_base = running.base_url();
    Ok((sim, running))
}
