//! PowerOffice Go v2 simulator: the client-credentials token endpoint (checks the Basic
//! application/client keys and the subscription key), `/v2/Customers`, `/v2/Suppliers`,
//! `/v2/Departments`, `/v2/Employees` and `/v2/ContactPersons` with `PageNumber`/`PageSize`,
//! the exclusive `lastChangedDateTimeOffsetGreaterThan` filter, JSON Patch updates and the
//! 10 requests/second limit (429 with the vendor's body). No webhooks: PowerOffice is polled.
//!
//! The clock can be frozen ([`PowerOfficeSim::freeze_clock`]) so that many changes share one
//! `LastChangedDateTimeOffset`, the case a change cursor must survive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::kit::{self, RunningSim, SimControl};

#[derive(Debug, Clone)]
pub struct PowerOfficeSimConfig {
    pub application_key: String,
    pub client_key: String,
    pub subscription_key: String,
    pub token_ttl: Duration,
    /// Requests a second per subscription key before 429.
    pub per_second: u32,
}

impl PowerOfficeSimConfig {
    /// The `[poweroffice]` section of a Tether configuration that connects to this simulator
    /// (used by the sandbox and the chaos suite).
    pub fn tether_section(&self, base_url: &str, poll_interval: &str) -> String {
        format!(
            r#"[poweroffice]
base_url = "{base_url}/v2"
token_url = "{base_url}/OAuth/Token"
application_key = "{application_key}"
client_key = "{client_key}"
subscription_key = "{subscription_key}"
poll_interval = "{poll_interval}"
"#,
            application_key = self.application_key,
            client_key = self.client_key,
            subscription_key = self.subscription_key,
        )
    }
}

impl Default for PowerOfficeSimConfig {
    fn default() -> Self {
        PowerOfficeSimConfig {
            application_key: "sim-application-key".to_owned(),
            client_key: "sim-client-key".to_owned(),
            subscription_key: "sim-subscription-key".to_owned(),
            token_ttl: Duration::from_secs(600),
            per_second: 10,
        }
    }
}

const COLLECTIONS: [&str; 5] = [
    "Customers",
    "Suppliers",
    "Departments",
    "Employees",
    "ContactPersons",
];

struct Inner {
    config: PowerOfficeSimConfig,
    /// collection -> id -> DTO (with `Id`, `LastChangedDateTimeOffset`, and `ContactId` for persons).
    records: BTreeMap<&'static str, BTreeMap<i64, Map<String, Value>>>,
    next_id: i64,
    frozen: Option<DateTime<Utc>>,
    tokens: BTreeMap<String, Instant>,
    /// Token bucket of the per-second limit (as the vendor's API gateway: a burst of at most
    /// `per_second`, refilled continuously).
    bucket: f64,
    bucket_at: Instant,
    token_calls: u64,
}

#[derive(Clone)]
pub struct PowerOfficeSim {
    inner: Arc<Mutex<Inner>>,
    pub control: SimControl,
}

/// PowerOffice's error shapes: ProblemDetails, and the gateway's own body for 429.
fn po_error(status: StatusCode, message: &str) -> Response {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return (
            status,
            Json(json!({"statusCode": "429", "message": "Rate limit is exceeded. Try again in 1 seconds."})),
        )
            .into_response();
    }
    (
        status,
        [("content-type", "application/problem+json")],
        json!({"type": "about:blank", "title": message, "status": status.as_u16()}).to_string(),
    )
        .into_response()
}

fn collection(name: &str) -> Option<&'static str> {
    COLLECTIONS.iter().copied().find(|c| *c == name)
}

/// Go stores .NET `DateTimeOffset`s (100 ns ticks) and writes them as .NET's JSON serialiser
/// does: up to 7 fractional digits with trailing zeros trimmed (`…:00.1234567Z`, `…:00.12Z`,
/// `…:00Z`); docs/vendors.md, PowerOffice item 8.
fn stamp(at: DateTime<Utc>) -> Value {
    let ticks = at.timestamp_subsec_nanos() / 100;
    let fraction = format!("{ticks:07}");
    let fraction = fraction.trim_end_matches('0');
    let seconds = at.format("%Y-%m-%dT%H:%M:%S");
    Value::String(if fraction.is_empty() {
        format!("{seconds}Z")
    } else {
        format!("{seconds}.{fraction}Z")
    })
}

/// A `lastChangedDateTimeOffsetGreaterThan` value as Go takes it: a date-time with at most 7
/// fractional digits (a tick is 100 ns). More digits are not a .NET `DateTimeOffset`; how Go
/// treats them is undocumented, so the simulator refuses them as the model binder refuses any
/// value it cannot convert.
fn filter_time(text: &str) -> Result<DateTime<Utc>, &'static str> {
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|_| "lastChangedDateTimeOffsetGreaterThan is not a date-time")?;
    let digits = text
        .split_once('.')
        .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).count())
        .unwrap_or(0);
    if digits > 7 {
        return Err("lastChangedDateTimeOffsetGreaterThan has more than 7 fractional digits");
    }
    Ok(at.with_timezone(&Utc))
}

fn changed_at(dto: &Map<String, Value>) -> Option<DateTime<Utc>> {
    dto.get("LastChangedDateTimeOffset")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl Inner {
    fn now(&self) -> DateTime<Utc> {
        self.frozen.unwrap_or_else(Utc::now)
    }

    fn insert(&mut self, coll: &'static str, mut dto: Map<String, Value>) -> Map<String, Value> {
        self.next_id += 1;
        let id = self.next_id;
        dto.insert("Id".to_owned(), json!(id));
        let now = self.now();
        dto.insert("LastChangedDateTimeOffset".to_owned(), stamp(now));
        let created = match coll {
            "Customers" => "CustomerCreatedDateTimeOffset",
            "Suppliers" => "SupplierCreatedDateTimeOffset",
            "Employees" => "EmployeeCreatedDateTimeOffset",
            _ => "CreatedDateTimeOffset",
        };
        dto.insert(created.to_owned(), stamp(now));
        self.records
            .entry(coll)
            .or_default()
            .insert(id, dto.clone());
        dto
    }
}

impl PowerOfficeSim {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Every later change gets this `LastChangedDateTimeOffset` (`None`: the real clock).
    pub fn freeze_clock(&self, at: Option<DateTime<Utc>>) {
        self.lock().frozen = at;
    }

    /// Adds a record without going through the API; returns the stored DTO. For
    /// `ContactPersons`, `props` must carry `ContactId`.
    pub fn seed(&self, collection_name: &str, props: Value) -> Value {
        let coll = collection(collection_name).expect("a known PowerOffice collection");
        let Value::Object(props) = props else {
            panic!("seed properties must be a JSON object");
        };
        Value::Object(self.lock().insert(coll, props))
    }

    /// A record's current DTO (test assertions).
    pub fn get(&self, collection_name: &str, id: i64) -> Option<Value> {
        let coll = collection(collection_name)?;
        self.lock()
            .records
            .get(coll)
            .and_then(|m| m.get(&id))
            .cloned()
            .map(Value::Object)
    }

    /// Changes a record's fields as a user in Go would (new last-changed time).
    pub fn touch(&self, collection_name: &str, id: i64, changes: Value) {
        let coll = collection(collection_name).expect("a known PowerOffice collection");
        let mut inner = self.lock();
        let now = inner.now();
        if let Some(dto) = inner.records.get_mut(coll).and_then(|m| m.get_mut(&id)) {
            if let Value::Object(changes) = changes {
                dto.extend(changes);
            }
            dto.insert("LastChangedDateTimeOffset".to_owned(), stamp(now));
        }
    }

    pub fn token_calls(&self) -> u64 {
        self.lock().token_calls
    }

    /// Makes every issued token invalid, as if it had expired.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }
}

async fn token(
    State(sim): State<PowerOfficeSim>,
    headers: HeaderMap,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let mut inner = sim.lock();
    inner.token_calls += 1;
    let expected = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        inner.config.application_key, inner.config.client_key
    ));
    let basic_ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        == Some(expected.as_str());
    let subscription_ok = headers
        .get("ocp-apim-subscription-key")
        .and_then(|v| v.to_str().ok())
        == Some(inner.config.subscription_key.as_str());
    if !subscription_ok {
        return kit::respond(
            StatusCode::UNAUTHORIZED,
            json!({"statusCode": 401, "message": "Access denied due to missing subscription key."}),
        );
    }
    if !basic_ok || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return kit::respond(StatusCode::BAD_REQUEST, json!({"error": "invalid_client"}));
    }
    let token = format!("sim-po-{}", uuid::Uuid::new_v4().simple());
    let ttl = inner.config.token_ttl;
    inner.tokens.insert(token.clone(), Instant::now() + ttl);
    kit::respond(
        StatusCode::OK,
        json!({"access_token": token, "token_type": "bearer", "expires_in": ttl.as_secs()}),
    )
}

/// Subscription key, bearer token and the per-second limit on every v2 call.
async fn guard(State(sim): State<PowerOfficeSim>, request: Request, next: Next) -> Response {
    {
        let mut inner = sim.lock();
        let headers = request.headers();
        if headers
            .get("ocp-apim-subscription-key")
            .and_then(|v| v.to_str().ok())
            != Some(inner.config.subscription_key.as_str())
        {
            return po_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong subscription key",
            );
        }
        let bearer_ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| inner.tokens.get(t))
            .is_some_and(|until| *until > Instant::now());
        if !bearer_ok {
            return po_error(StatusCode::UNAUTHORIZED, "invalid or expired token");
        }
        let rate = f64::from(inner.config.per_second);
        let refill = inner.bucket_at.elapsed().as_secs_f64() * rate;
        inner.bucket = (inner.bucket + refill).min(rate);
        inner.bucket_at = Instant::now();
        if inner.bucket < 1.0 {
            let mut response = po_error(StatusCode::TOO_MANY_REQUESTS, "");
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return response;
        }
        inner.bucket -= 1.0;
    }
    next.run(request).await
}

async fn list(
    State(sim): State<PowerOfficeSim>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(coll) = collection(&name) else {
        return po_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    let list = match ListQuery::parse(&query) {
        Ok(list) => list,
        Err(message) => return po_error(StatusCode::BAD_REQUEST, &message),
    };
    let inner = sim.lock();
    let mut items: Vec<&Map<String, Value>> = inner
        .records
        .get(coll)
        .map(|m| m.values().filter(|dto| list.matches(dto)).collect())
        .unwrap_or_default();
    if list.by_change_time {
        items.sort_by(|a, b| {
            changed_at(a).cmp(&changed_at(b)).then(
                a.get("Id")
                    .and_then(Value::as_i64)
                    .cmp(&b.get("Id").and_then(Value::as_i64)),
            )
        });
    }
    let page: Vec<Value> = items
        .into_iter()
        .skip((list.page_number - 1) * list.page_size)
        .take(list.page_size)
        .map(|dto| Value::Object(dto.clone()))
        .collect();
    kit::respond(StatusCode::OK, Value::Array(page))
}

/// The query parameters of a list call the vendor understands: paging, the exclusive change-time
/// filter, comma-separated value filters and ordering by change time.
struct ListQuery {
    page_number: usize,
    page_size: usize,
    changed_after: Option<DateTime<Utc>>,
    import_refs: Option<Vec<String>>,
    external_codes: Option<Vec<String>>,
    contact_ids: Option<Vec<String>>,
    by_change_time: bool,
}

impl ListQuery {
    fn parse(query: &BTreeMap<String, String>) -> Result<Self, String> {
        let number = |k: &str, default: usize| -> Result<usize, String> {
            match query.get(k) {
                None => Ok(default),
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("{k} must be a positive integer")),
            }
        };
        let page_size = number("PageSize", 5000)?;
        if page_size > 20_000 {
            return Err("PageSize exceeds MaxPageSize 20000".to_owned());
        }
        let list_filter = |key: &str| -> Option<Vec<String>> {
            query
                .get(key)
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
        };
        Ok(Self {
            page_number: number("PageNumber", 1)?,
            page_size,
            changed_after: query
                .get("lastChangedDateTimeOffsetGreaterThan")
                .map(|s| filter_time(s))
                .transpose()
                .map_err(str::to_owned)?,
            import_refs: list_filter("externalImportReference"),
            external_codes: list_filter("externalCodes"),
            contact_ids: list_filter("contactIds"),
            by_change_time: query
                .get("OrderBy")
                .is_some_and(|o| o.starts_with("LastChangedDateTimeOffset")),
        })
    }

    fn matches(&self, dto: &Map<String, Value>) -> bool {
        let text_in = |key: &str, wanted: &Option<Vec<String>>| {
            wanted.as_ref().is_none_or(|values| {
                dto.get(key)
                    .and_then(Value::as_str)
                    .is_some_and(|r| values.iter().any(|x| x == r))
            })
        };
        // Exclusive, as the vendor documents.
        self.changed_after
            .is_none_or(|a| changed_at(dto).is_some_and(|t| t > a))
            && text_in("ExternalImportReference", &self.import_refs)
            && text_in("ExternalCode", &self.external_codes)
            && self.contact_ids.as_ref().is_none_or(|ids| {
                dto.get("ContactId")
                    .map(|v| v.to_string())
                    .is_some_and(|r| ids.contains(&r))
            })
    }
}

fn content_type_is(headers: &HeaderMap, wanted: &str) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().map(str::trim) == Some(wanted))
}

async fn create(
    State(sim): State<PowerOfficeSim>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let Some(coll) = collection(&name).filter(|c| *c != "ContactPersons") else {
        return po_error(StatusCode::NOT_FOUND, "unknown resource");
    };
    let Value::Object(mut dto) = body else {
        return po_error(StatusCode::BAD_REQUEST, "body must be an object");
    };
    for read_only in ["Id", "LastChangedDateTimeOffset", "IsActive"] {
        dto.remove(read_only);
    }
    let needs_name = matches!(coll, "Customers" | "Suppliers" | "Departments");
    if needs_name
        && dto
            .get("Name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return po_error(StatusCode::BAD_REQUEST, "Name is required");
    }
    let stored = sim.lock().insert(coll, dto);
    kit::respond(StatusCode::CREATED, Value::Object(stored))
}

async fn create_person(
    State(sim): State<PowerOfficeSim>,
    Path((name, contact_id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    if name != "ContactPersons" {
        return po_error(StatusCode::METHOD_NOT_ALLOWED, "POST is not allowed here");
    }
    let Ok(contact_id) = contact_id.parse::<i64>() else {
        return po_error(StatusCode::BAD_REQUEST, "contactId must be an integer");
    };
    let Value::Object(mut dto) = body else {
        return po_error(StatusCode::BAD_REQUEST, "body must be an object");
    };
    let mut inner = sim.lock();
    let owner_exists = ["Customers", "Suppliers"].iter().any(|c| {
        inner
            .records
            .get(c)
            .is_some_and(|m| m.contains_key(&contact_id))
    });
    if !owner_exists {
        return po_error(StatusCode::NOT_FOUND, "contact not found");
    }
    dto.remove("Id");
    dto.insert("ContactId".to_owned(), json!(contact_id));
    let stored = inner.insert("ContactPersons", dto);
    kit::respond(StatusCode::CREATED, Value::Object(stored))
}

fn apply_patch(dto: &mut Map<String, Value>, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).ok_or("op missing")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("path missing")?;
        let segments: Vec<String> = path
            .strip_prefix('/')
            .ok_or("path must start with /")?
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        if matches!(
            segments[0].as_str(),
            "Id" | "ContactId" | "LastChangedDateTimeOffset"
        ) {
            return Err(format!("{} is read-only", segments[0]));
        }
        let (last, parents) = segments.split_last().ok_or("empty path")?;
        let mut target = &mut *dto;
        for parent in parents {
            let entry = target
                .entry(parent.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            target = entry.as_object_mut().expect("just made an object");
        }
        match kind {
            "replace" | "add" => {
                let value = op.get("value").cloned().ok_or("value missing")?;
                target.insert(last.clone(), value);
            }
            "remove" => {
                target.remove(last);
            }
            other => return Err(format!("unsupported op `{other}`")),
        }
    }
    Ok(())
}

/// The collection and numeric id of an item route, or the status and message to refuse it with.
fn find_key(
    name: &str,
    id: &str,
    contact: Option<&str>,
) -> Result<(&'static str, i64), (StatusCode, &'static str)> {
    let coll = collection(name).ok_or((StatusCode::NOT_FOUND, "unknown resource"))?;
    if (coll == "ContactPersons") != contact.is_some() {
        return Err((StatusCode::NOT_FOUND, "unknown resource"));
    }
    let id = id
        .parse::<i64>()
        .map_err(|_| (StatusCode::BAD_REQUEST, "id must be an integer"))?;
    Ok((coll, id))
}

async fn item(
    sim: PowerOfficeSim,
    method: axum::http::Method,
    headers: HeaderMap,
    coll: &'static str,
    id: i64,
    contact: Option<i64>,
    body: bytes::Bytes,
) -> Response {
    let mut inner = sim.lock();
    let now = inner.now();
    let Some(map) = inner.records.get_mut(coll) else {
        return po_error(StatusCode::NOT_FOUND, "not found");
    };
    let belongs = |dto: &Map<String, Value>| {
        contact.is_none_or(|c| dto.get("ContactId").and_then(Value::as_i64) == Some(c))
    };
    if !map.get(&id).is_some_and(belongs) {
        return po_error(StatusCode::NOT_FOUND, "not found");
    }
    match method.as_str() {
        "GET" => kit::respond(StatusCode::OK, Value::Object(map[&id].clone())),
        "DELETE" => {
            map.remove(&id);
            kit::empty(StatusCode::NO_CONTENT)
        }
        _ => {
            if !content_type_is(&headers, "application/json-patch+json") {
                return po_error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "PATCH needs application/json-patch+json",
                );
            }
            let Ok(Value::Array(ops)) = serde_json::from_slice::<Value>(&body) else {
                return po_error(StatusCode::BAD_REQUEST, "body must be a JSON Patch array");
            };
            let mut dto = map[&id].clone();
            if let Err(message) = apply_patch(&mut dto, &ops) {
                return po_error(StatusCode::BAD_REQUEST, &message);
            }
            dto.insert("LastChangedDateTimeOffset".to_owned(), stamp(now));
            map.insert(id, dto.clone());
            kit::respond(StatusCode::OK, Value::Object(dto))
        }
    }
}

async fn plain_item(
    State(sim): State<PowerOfficeSim>,
    Path((name, id)): Path<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    match find_key(&name, &id, None) {
        Ok((coll, id)) => item(sim, method, headers, coll, id, None, body).await,
        Err((status, message)) => po_error(status, message),
    }
}

async fn person_item(
    State(sim): State<PowerOfficeSim>,
    Path((contact, id)): Path<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let Ok(contact_id) = contact.parse::<i64>() else {
        return po_error(StatusCode::BAD_REQUEST, "contactId must be an integer");
    };
    match find_key("ContactPersons", &id, Some(&contact)) {
        Ok((coll, id)) => item(sim, method, headers, coll, id, Some(contact_id), body).await,
        Err((status, message)) => po_error(status, message),
    }
}

pub fn router(sim: PowerOfficeSim) -> Router {
    let api = Router::new()
        .route("/v2/{collection}", get(list).post(create))
        .route(
            "/v2/{collection}/{id}",
            get(plain_item)
                .patch(plain_item)
                .delete(plain_item)
                .post(create_person),
        )
        .route(
            "/v2/ContactPersons/{contact_id}/{id}",
            get(person_item).patch(person_item).delete(person_item),
        )
        .layer(middleware::from_fn_with_state(sim.clone(), guard))
        .route("/OAuth/Token", post(token))
        .with_state(sim.clone());
    // The token endpoint is outside the API's 10 a second (`guard` does not count it either).
    sim.control.leave_out_of_peaks("POST /OAuth/Token");
    kit::with_kit(api, sim.control.clone())
}

/// Starts the simulator on `bind` (port 0: any free port). The API base is `{base_url}/v2`.
pub async fn start(
    config: PowerOfficeSimConfig,
    bind: SocketAddr,
) -> std::io::Result<(PowerOfficeSim, RunningSim)> {
    let full = f64::from(config.per_second);
    let sim = PowerOfficeSim {
        inner: Arc::new(Mutex::new(Inner {
            config,
            records: BTreeMap::new(),
            next_id: 1000,
            frozen: None,
            tokens: BTreeMap::new(),
            bucket: full,
            bucket_at: Instant::now(),
            token_calls: 0,
        })),
        control: SimControl::new(po_error),
    };
    let running = kit::serve(router(sim.clone()), bind).await?;
    Ok((sim, running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_dotnet_ticks_and_filters_take_at_most_seven_digits() {
        let at = DateTime::parse_from_rfc3339("2021-09-30T08:03:00.120000099Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(stamp(at), json!("2021-09-30T08:03:00.12Z"));
        assert!(filter_time("2021-09-30T08:03:00.1234567Z").is_ok());
        assert!(filter_time("2021-09-30T08:03:00Z").is_ok());
        assert!(filter_time("2021-09-30T08:03:00.123456700Z").is_err());
    }

    #[test]
    fn json_patch_replaces_nested_leaves_and_refuses_read_only() {
        let mut dto =
            json!({"Id": 1, "Name": "A", "MailAddress": {"City": "Bergen", "Zip": "5003"}})
                .as_object()
                .unwrap()
                .clone();
        apply_patch(
            &mut dto,
            &[json!({"op": "replace", "path": "/MailAddress/City", "value": "Oslo"})],
        )
        .unwrap();
        assert_eq!(dto["MailAddress"], json!({"City": "Oslo", "Zip": "5003"}));
        assert!(apply_patch(
            &mut dto,
            &[json!({"op": "replace", "path": "/Id", "value": 2})]
        )
        .is_err());
    }
}
