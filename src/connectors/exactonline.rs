//! Exact Online connector: `Accounts` (`crm/Accounts`), `Departments` (`hrm/Departments`) and
//! `Divisions` (`hrm/Divisions`) of one division.
//!
//! Owns: the OAuth2 token lifecycle (10-minute access tokens, rotating refresh tokens kept in the
//! `oauth_tokens` table), the per-division call budget (60 a minute, 5,000 a day, read from the
//! `X-RateLimit-*` headers) and the OData v2 JSON translation (`d.results`, `__next`, `/Date(ms)/`).
//! May call: the database (its token row) and Exact's HTTP API. Nothing else.
//!
//! Field names in a [`Record`] are Exact's own (`Name`, `Description`, ...), which are the
//! registry's names for these types. `/Date(ms)/` values are presented as RFC 3339 strings.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::http::{check, client, send_error};
use super::{ChangePage, Connector, ConnectorError, Record};
use crate::config::ExactConfig;
use crate::domain::SystemId;

const SYSTEM: SystemId = SystemId::ExactOnline;

/// Exact refuses a new access token sooner than 9 min 30 s after the previous one.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(570);
/// An access token this close to expiry is treated as expired (a call may take a while).
const EXPIRY_MARGIN: chrono::Duration = chrono::Duration::seconds(30);
/// Calls a minute Exact allows per division and app.
const MINUTE_LIMIT: usize = 60;
/// A budget wait up to this long is slept inline; longer ones are returned as back-pressure so
/// the worker is not held.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(2);

/// The operator-facing instruction when the refresh token is gone.
const REAUTHORISE: &str =
    "re-authorise Tether in Exact Online and set exactonline.refresh_token to the new refresh token";

/// One entity type's shape in Exact's API.
struct EntityDef {
    /// Path under `/api/v1/{division}/`.
    path: &'static str,
    /// The key property (`ID` GUID or `Code` integer).
    key: &'static str,
    guid_key: bool,
    /// Whether the API accepts creates and updates (divisions are read-only).
    writable: bool,
}

fn entity(entity_type: &str, operation: &'static str) -> Result<EntityDef, ConnectorError> {
    Ok(match entity_type {
        "Accounts" => EntityDef {
            path: "crm/Accounts",
            key: "ID",
            guid_key: true,
            writable: true,
        },
        "Departments" => EntityDef {
            path: "hrm/Departments",
            key: "ID",
            guid_key: true,
            writable: true,
        },
        "Divisions" => EntityDef {
            path: "hrm/Divisions",
            key: "Code",
            guid_key: false,
            writable: false,
        },
        other => {
            return Err(ConnectorError::Unsupported {
                system: SYSTEM,
                entity_type: other.to_owned(),
                operation,
            })
        }
    })
}

impl EntityDef {
    /// `crm/Accounts(guid'…')` or `hrm/Divisions(123)`, after checking the id has the key's form.
    fn keyed_path(&self, id: &str) -> Result<String, ConnectorError> {
        if self.guid_key {
            let guid = uuid::Uuid::parse_str(id).map_err(|_| {
                bad_input(format!(
                    "`{id}` is not an Exact Online GUID key for {}",
                    self.path
                ))
            })?;
            Ok(format!("{}(guid'{}')", self.path, guid.hyphenated()))
        } else {
            let code: i64 = id.parse().map_err(|_| {
                bad_input(format!(
                    "`{id}` is not an Exact Online integer key for {}",
                    self.path
                ))
            })?;
            Ok(format!("{}({code})", self.path))
        }
    }
}

fn bad_input(message: String) -> ConnectorError {
    ConnectorError::Rejected {
        system: SYSTEM,
        status: 400,
        message,
    }
}

/// Parses OData's `/Date(1700000000000)/` (optionally with an offset suffix, which Exact does not
/// send) into a UTC time.
pub fn parse_odata_date(text: &str) -> Option<DateTime<Utc>> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    let digits_end = inner
        .char_indices()
        .skip(1)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map(|(i, _)| i)
        .unwrap_or(inner.len());
    let ms: i64 = inner[..digits_end].parse().ok()?;
    Utc.timestamp_millis_opt(ms).single()
}

/// Formats a time as OData's `/Date(ms)/`.
pub fn odata_date(at: DateTime<Utc>) -> String {
    format!("/Date({})/", at.timestamp_millis())
}

/// Turns one OData entity into a [`Record`].
fn to_record(def: &EntityDef, entity: &Value) -> Result<Record, ConnectorError> {
    let object = entity
        .as_object()
        .ok_or_else(|| malformed("an entity is not an object"))?;
    let id = match object.get(def.key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(malformed("an entity has no key")),
    };
    let updated_at = object
        .get("Modified")
        .and_then(Value::as_str)
        .and_then(parse_odata_date);
    let mut fields = Map::new();
    for (name, value) in object {
        if name == "__metadata" {
            continue;
        }
        let value = match value {
            Value::String(s) => match parse_odata_date(s) {
                Some(at) => Value::String(at.to_rfc3339_opts(SecondsFormat::Millis, true)),
                None => value.clone(),
            },
            _ => value.clone(),
        };
        fields.insert(name.clone(), value);
    }
    Ok(Record {
        id,
        updated_at,
        fields,
    })
}

fn malformed(what: &str) -> ConnectorError {
    ConnectorError::Transient {
        system: SYSTEM,
        message: format!("malformed Exact Online response: {what}"),
    }
}

/// An OData string literal with quotes doubled.
fn odata_literal(value: &Value) -> Result<String, ConnectorError> {
    Ok(match value {
        // GUID-typed properties (`Parent`, `MainContact`) need the `guid'…'` literal.
        Value::String(s) if uuid::Uuid::parse_str(s).is_ok() && s.len() == 36 => {
            format!("guid'{s}'")
        }
        Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        _ => {
            return Err(bad_input(
                "Exact Online merge criteria must be strings, numbers, booleans or null".to_owned(),
            ))
        }
    })
}

/// The per-division call budget. Exact counts calls per division across all replicas; its headers
/// say what is left, and a local sliding window keeps this replica under 60 a minute even before
/// the first header arrives.
#[derive(Default)]
struct Budget {
    recent: VecDeque<Instant>,
    minutely_remaining: Option<i64>,
    minutely_reset: Option<DateTime<Utc>>,
    daily_remaining: Option<i64>,
    daily_reset: Option<DateTime<Utc>>,
}

/// Exact's reset headers are epoch milliseconds; values that look like seconds are accepted too.
fn epoch(value: i64) -> Option<DateTime<Utc>> {
    if value > 1_000_000_000_000 {
        Utc.timestamp_millis_opt(value).single()
    } else {
        Utc.timestamp_opt(value, 0).single()
    }
}

impl Budget {
    /// How long to wait before the next call, or `Err` when that is too long to wait inline.
    fn take(&mut self) -> Result<Duration, ConnectorError> {
        let now = Instant::now();
        let wall = Utc::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if let (Some(remaining), Some(reset)) = (self.daily_remaining, self.daily_reset) {
            if remaining <= 0 && reset > wall {
                // The day's quota is gone: say when it comes back instead of sleeping for hours.
                return Err(ConnectorError::RateLimited {
                    system: SYSTEM,
                    retry_after: (reset - wall).to_std().ok(),
                });
            }
        }
        let mut wait = Duration::ZERO;
        if self.recent.len() >= MINUTE_LIMIT {
            let oldest = self.recent[self.recent.len() - MINUTE_LIMIT];
            wait = (oldest + Duration::from_secs(60)).saturating_duration_since(now);
        }
        if let (Some(remaining), Some(reset)) = (self.minutely_remaining, self.minutely_reset) {
            if remaining <= 0 && reset > wall {
                wait = wait.max((reset - wall).to_std().unwrap_or_default());
            }
        }
        if wait > MAX_INLINE_WAIT {
            return Err(ConnectorError::RateLimited {
                system: SYSTEM,
                retry_after: Some(wait),
            });
        }
        self.recent.push_back(now + wait);
        // Count this call at once, so calls made before its response arrives (other tasks of
        // this replica) see it too; the response's headers then replace the estimate.
        if let Some(r) = self.minutely_remaining.as_mut() {
            *r -= 1;
        }
        if let Some(r) = self.daily_remaining.as_mut() {
            *r -= 1;
        }
        Ok(wait)
    }

    fn observe(&mut self, headers: &reqwest::header::HeaderMap) {
        let int =
            |name: &str| -> Option<i64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
        if let Some(v) = int("x-ratelimit-minutely-remaining") {
            self.minutely_remaining = Some(v);
        }
        if let Some(v) = int("x-ratelimit-minutely-reset").and_then(epoch) {
            self.minutely_reset = Some(v);
        }
        if let Some(v) = int("x-ratelimit-remaining") {
            self.daily_remaining = Some(v);
        }
        if let Some(v) = int("x-ratelimit-reset").and_then(epoch) {
            self.daily_reset = Some(v);
        }
    }

    /// After a 429: when the headers say the quota resets, wait until then.
    fn retry_after(&self) -> Option<Duration> {
        let wall = Utc::now();
        let reset = match (self.daily_remaining, self.daily_reset) {
            (Some(r), Some(reset)) if r <= 0 => Some(reset),
            _ => self.minutely_reset,
        }?;
        (reset > wall).then(|| (reset - wall).to_std().unwrap_or_default())
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: String,
    /// Exact sends it as a string (`"600"`); a number is accepted too.
    expires_in: Value,
}

#[derive(Deserialize)]
struct TokenError {
    error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    access_token: Option<String>,
    access_expires_at: Option<DateTime<Utc>>,
    refresh_token: String,
    refreshed_at: Option<DateTime<Utc>>,
    seed_sha256: String,
    stopped_reason: Option<String>,
}

/// The Exact Online client of one division.
pub struct ExactOnline {
    config: ExactConfig,
    pool: PgPool,
    http: reqwest::Client,
    budget: Mutex<Budget>,
}

impl std::fmt::Debug for ExactOnline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactOnline")
            .field("base_url", &self.config.base_url.as_str())
            .field("division", &self.config.division)
            .finish_non_exhaustive()
    }
}

impl ExactOnline {
    /// `timeout` bounds every call (the `outbound.timeout` setting).
    pub fn new(config: ExactConfig, pool: PgPool, timeout: Duration) -> Self {
        ExactOnline {
            config,
            pool,
            http: client(timeout),
            budget: Mutex::new(Budget::default()),
        }
    }

    fn account(&self) -> String {
        self.config.division.to_string()
    }

    fn url(&self, path_and_query: &str) -> String {
        format!(
            "{}/api/v1/{}/{}",
            self.config.base_url.as_str().trim_end_matches('/'),
            self.config.division,
            path_and_query
        )
    }

    fn seed_hash(&self) -> String {
        hex::encode(Sha256::digest(
            self.config.refresh_token.expose_secret().as_bytes(),
        ))
    }

    fn stopped_error(reason: &str) -> ConnectorError {
        ConnectorError::Unauthorized {
            system: SYSTEM,
            message: format!("Exact Online is stopped: {reason}"),
        }
    }

    fn db_error(error: sqlx::Error) -> ConnectorError {
        ConnectorError::Transient {
            system: SYSTEM,
            message: format!("token storage failed: {error}"),
        }
    }

    /// A valid access token. `rejected` is a token the API just refused with 401: it is not
    /// reused. Only the replica holding the row lock calls the token endpoint; the others wait
    /// for the lock and then reuse what it stored.
    async fn access_token(&self, rejected: Option<&str>) -> Result<String, ConnectorError> {
        let account = self.account();
        let seed = self.seed_hash();
        let usable = |row: &TokenRow| -> Option<String> {
            let token = row.access_token.as_ref()?;
            let expires = row.access_expires_at?;
            (expires - EXPIRY_MARGIN > Utc::now() && Some(token.as_str()) != rejected)
                .then(|| token.clone())
        };

        // Fast path without a lock: most calls find a valid token.
        let row: Option<TokenRow> = sqlx::query_as(
            "SELECT access_token, access_expires_at, refresh_token, refreshed_at, seed_sha256, \
             stopped_reason FROM oauth_tokens WHERE system = $1 AND account = $2",
        )
        .bind(SYSTEM.as_str())
        .bind(&account)
        .fetch_optional(&self.pool)
        .await
        .map_err(Self::db_error)?;
        match &row {
            Some(row) => {
                if let Some(reason) = &row.stopped_reason {
                    if row.seed_sha256 == seed {
                        return Err(Self::stopped_error(reason));
                    }
                } else if let Some(token) = usable(row) {
                    return Ok(token);
                }
            }
            None => {
                // The configured refresh token seeds the row only when none exists yet.
                sqlx::query(
                    "INSERT INTO oauth_tokens (system, account, refresh_token, seed_sha256) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (system, account) DO NOTHING",
                )
                .bind(SYSTEM.as_str())
                .bind(&account)
                .bind(self.config.refresh_token.expose_secret())
                .bind(&seed)
                .execute(&self.pool)
                .await
                .map_err(Self::db_error)?;
            }
        }

        // Slow path: take the row lock. Holding it across the token call is what makes one
        // replica the only user of the refresh token; the others wait here and then find the new
        // access token. If the call times out or the commit fails after Exact rotated, nothing
        // is lost: Exact keeps the old refresh token valid until the new one is used.

        let mut tx = self.pool.begin().await.map_err(Self::db_error)?;
        let mut row: TokenRow = sqlx::query_as(
            "SELECT access_token, access_expires_at, refresh_token, refreshed_at, seed_sha256, \
             stopped_reason FROM oauth_tokens WHERE system = $1 AND account = $2 FOR UPDATE",
        )
        .bind(SYSTEM.as_str())
        .bind(&account)
        .fetch_one(&mut *tx)
        .await
        .map_err(Self::db_error)?;
        if let Some(reason) = &row.stopped_reason {
            if row.seed_sha256 == seed {
                return Err(Self::stopped_error(reason));
            }
            // The operator configured a new refresh token after the stop: start over with it.
            // `refreshed_at` stays, so the 570 s rule still holds across the reseed.
            sqlx::query(
                "UPDATE oauth_tokens SET refresh_token = $3, seed_sha256 = $4, access_token = NULL, \
                 access_expires_at = NULL, stopped_reason = NULL, stopped_at = NULL \
                 WHERE system = $1 AND account = $2",
            )
            .bind(SYSTEM.as_str())
            .bind(&account)
            .bind(self.config.refresh_token.expose_secret())
            .bind(&seed)
            .execute(&mut *tx)
            .await
            .map_err(Self::db_error)?;
            tracing::info!(system = %SYSTEM, "configured refresh token changed; Exact Online restarted");
            row.refresh_token = self.config.refresh_token.expose_secret().to_owned();
            row.access_token = None;
            row.access_expires_at = None;
        }
        if let Some(token) = usable(&row) {
            // Another replica refreshed while this one waited for the lock.
            tx.commit().await.map_err(Self::db_error)?;
            return Ok(token);
        }
        if let Some(at) = row.refreshed_at {
            let since = (Utc::now() - at).to_std().unwrap_or_default();
            if since < MIN_REFRESH_INTERVAL {
                return Err(ConnectorError::RateLimited {
                    system: SYSTEM,
                    retry_after: Some(MIN_REFRESH_INTERVAL - since),
                });
            }
        }

        // This replica holds the lock: it alone uses the refresh token.
        let token_url = format!(
            "{}/api/oauth2/token",
            self.config.base_url.as_str().trim_end_matches('/')
        );
        let response = self
            .http
            .post(token_url)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", row.refresh_token.as_str()),
                ("client_id", self.config.client_id.as_str()),
                ("client_secret", self.config.client_secret.expose_secret()),
            ])
            .send()
            .await
            .map_err(|e| send_error(SYSTEM, e))?;
        let status = response.status();
        if status.is_success() {
            let body: TokenResponse = response
                .json()
                .await
                .map_err(|_| malformed("token response is not the expected JSON"))?;
            let expires_in = match &body.expires_in {
                Value::String(s) => s.trim().parse::<i64>().ok(),
                Value::Number(n) => n.as_i64(),
                _ => None,
            }
            .filter(|s| *s > 0)
            .ok_or_else(|| malformed("token response has no usable expires_in"))?;
            sqlx::query(
                "UPDATE oauth_tokens SET access_token = $3, access_expires_at = now() + make_interval(secs => $4), \
                 refresh_token = $5, refreshed_at = now() WHERE system = $1 AND account = $2",
            )
            .bind(SYSTEM.as_str())
            .bind(&account)
            .bind(&body.access_token)
            .bind(expires_in as f64)
            .bind(&body.refresh_token)
            .execute(&mut *tx)
            .await
            .map_err(Self::db_error)?;
            tx.commit().await.map_err(Self::db_error)?;
            tracing::info!(system = %SYSTEM, "access token refreshed");
            return Ok(body.access_token);
        }
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<TokenError>(&text)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED
            || (status == StatusCode::BAD_REQUEST && error == "invalid_grant")
        {
            let reason = format!(
                "Exact Online rejected the refresh token ({}{}); {REAUTHORISE}",
                status.as_u16(),
                if error.is_empty() {
                    String::new()
                } else {
                    format!(" {error}")
                }
            );
            sqlx::query(
                "UPDATE oauth_tokens SET stopped_reason = $3, stopped_at = now(), access_token = NULL, \
                 access_expires_at = NULL WHERE system = $1 AND account = $2",
            )
            .bind(SYSTEM.as_str())
            .bind(&account)
            .bind(&reason)
            .execute(&mut *tx)
            .await
            .map_err(Self::db_error)?;
            tx.commit().await.map_err(Self::db_error)?;
            tracing::error!(system = %SYSTEM, %reason, "Exact Online stopped");
            return Err(Self::stopped_error(&reason));
        }
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => ConnectorError::RateLimited {
                system: SYSTEM,
                retry_after: None,
            },
            s if s.is_server_error() => ConnectorError::Transient {
                system: SYSTEM,
                message: format!("token endpoint answered {s}"),
            },
            s => ConnectorError::Rejected {
                system: SYSTEM,
                status: s.as_u16(),
                message: format!(
                    "token endpoint refused the refresh ({}); check exactonline.client_id and client_secret",
                    if error.is_empty() { "no error code" } else { &error }
                ),
            },
        })
    }

    /// One API call: budget, bearer token, one retry with a fresh token after a 401.
    /// Returns `None` for 404, `Some(Value::Null)` for 204.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ConnectorError> {
        let mut rejected: Option<String> = None;
        loop {
            let token = self.access_token(rejected.as_deref()).await?;
            let wait = self.budget.lock().await.take()?;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let mut request = self
                .http
                .request(method.clone(), url)
                .bearer_auth(&token)
                .header("accept", "application/json");
            if let Some(body) = body {
                request = request.header("prefer", "return=representation").json(body);
            }
            let response = request.send().await.map_err(|e| send_error(SYSTEM, e))?;
            self.budget.lock().await.observe(response.headers());
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && rejected.is_none() {
                // The access token expired or was revoked mid-run: get another once.
                rejected = Some(token);
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                let retry_after = super::http::retry_after(response.headers()).or(self
                    .budget
                    .lock()
                    .await
                    .retry_after());
                return Err(ConnectorError::RateLimited {
                    system: SYSTEM,
                    retry_after,
                });
            }
            let response = check(SYSTEM, response).await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if response.status() == StatusCode::NO_CONTENT {
                return Ok(Some(Value::Null));
            }
            let bytes = response.bytes().await.map_err(|e| send_error(SYSTEM, e))?;
            if bytes.is_empty() {
                return Ok(Some(Value::Null));
            }
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|_| malformed("the body is not JSON"))?;
            return Ok(Some(value));
        }
    }

    /// GETs a collection page: its entities and the `__next` link.
    async fn get_page(&self, url: &str) -> Result<(Vec<Value>, Option<String>), ConnectorError> {
        let value = self
            .call(Method::GET, url, None)
            .await?
            .ok_or_else(|| malformed("collection not found"))?;
        let d = value.get("d").ok_or_else(|| malformed("no `d` envelope"))?;
        let (results, next) = match d {
            Value::Array(items) => (items.clone(), None),
            Value::Object(o) => (
                o.get("results")
                    .and_then(Value::as_array)
                    .cloned()
                    .ok_or_else(|| malformed("no `d.results`"))?,
                o.get("__next").and_then(Value::as_str).map(str::to_owned),
            ),
            _ => return Err(malformed("`d` is neither a list nor an object")),
        };
        // The bearer token goes wherever `__next` points: only follow links to our own base.
        if let Some(link) = &next {
            let base = self.config.base_url.as_str().trim_end_matches('/');
            if !link.starts_with(&format!("{base}/")) {
                return Err(malformed("`__next` points outside exactonline.base_url"));
            }
        }
        Ok((results, next))
    }

    fn single(value: Value) -> Result<Value, ConnectorError> {
        match value {
            Value::Object(mut o) => o.remove("d").ok_or_else(|| malformed("no `d` envelope")),
            _ => Err(malformed("the body is not an object")),
        }
    }
}

/// `list_changed` cursor for types filtered on `Modified` (no sync endpoint): the highest
/// `Modified` seen, the ids already emitted at exactly that time (the filter is inclusive), and
/// a `__next` link while walking a page run of equal timestamps.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ModifiedCursor {
    modified_ms: Option<i64>,
    seen: Vec<String>,
    next: Option<String>,
}

#[async_trait]
impl Connector for ExactOnline {
    fn system(&self) -> SystemId {
        SYSTEM
    }

    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        let def = entity(entity_type, "fetch")?;
        let url = self.url(&def.keyed_path(id)?);
        match self.call(Method::GET, &url, None).await? {
            None | Some(Value::Null) => Ok(None),
            Some(value) => Ok(Some(to_record(&def, &Self::single(value)?)?)),
        }
    }

    async fn create(
        &self,
        entity_type: &str,
        fields: &Map<String, Value>,
        _idempotency_key: &str,
    ) -> Result<Record, ConnectorError> {
        let def = entity(entity_type, "create")?;
        if !def.writable {
            return Err(ConnectorError::Unsupported {
                system: SYSTEM,
                entity_type: entity_type.to_owned(),
                operation: "create",
            });
        }
        let url = self.url(def.path);
        let body = Value::Object(fields.clone());
        match self.call(Method::POST, &url, Some(&body)).await? {
            Some(Value::Object(o)) => to_record(&def, &Self::single(Value::Object(o))?),
            _ => Err(malformed(
                "create returned no entity despite Prefer: return=representation",
            )),
        }
    }

    /// Exact keeps no idempotency key, and no field can safely carry one: `Code` is the account
    /// number people use (fixed-width numeric), `SearchCode` is a short user-visible search field
    /// that people fill themselves, and Departments/Divisions have nothing comparable. Writing a
    /// key into business data would be wrong, so this is unsupported and callers fall back to the
    /// merge criteria (`find_by`).
    async fn find_created(
        &self,
        entity_type: &str,
        _idempotency_key: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        entity(entity_type, "find_created")?;
        Err(ConnectorError::Unsupported {
            system: SYSTEM,
            entity_type: entity_type.to_owned(),
            operation: "find_created",
        })
    }

    async fn update(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        let def = entity(entity_type, "update")?;
        if !def.writable {
            return Err(ConnectorError::Unsupported {
                system: SYSTEM,
                entity_type: entity_type.to_owned(),
                operation: "update",
            });
        }
        let url = self.url(&def.keyed_path(id)?);
        // Exact's PUT is a partial update: only the properties sent change.
        let body = Value::Object(changed.clone());
        if self.call(Method::PUT, &url, Some(&body)).await?.is_none() {
            return Err(ConnectorError::Rejected {
                system: SYSTEM,
                status: 404,
                message: format!("{entity_type} {id} does not exist"),
            });
        }
        self.fetch(entity_type, id)
            .await?
            .ok_or_else(|| ConnectorError::Transient {
                system: SYSTEM,
                message: format!("{entity_type} {id} vanished right after its update"),
            })
    }

    async fn list_changed(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let def = entity(entity_type, "list_changed")?;
        if entity_type == "Accounts" {
            // Sync API: `Timestamp` is a row version; everything above the stored one is new.
            // Exact's row versions start at 1, so `gt 0` is "everything".
            let from: i64 = match cursor {
                None => 0,
                Some(c) => c
                    .parse()
                    .map_err(|_| bad_input(format!("`{c}` is not an Exact sync cursor")))?,
            };
            let url = self.url(&format!(
                "sync/CRM/Accounts?$filter=Timestamp%20gt%20{from}&$orderby=Timestamp"
            ));
            let (results, next) = self.get_page(&url).await?;
            let mut highest = from;
            let mut records = Vec::with_capacity(results.len());
            for item in &results {
                if let Some(ts) = item.get("Timestamp").and_then(Value::as_i64) {
                    highest = highest.max(ts);
                }
                records.push(to_record(&def, item)?);
            }
            return Ok(ChangePage {
                records,
                next_cursor: Some(highest.to_string()),
                has_more: next.is_some(),
            });
        }

        let mut state: ModifiedCursor = match cursor {
            None => ModifiedCursor::default(),
            Some(c) => serde_json::from_str(c)
                .map_err(|_| bad_input(format!("`{c}` is not an Exact Modified cursor")))?,
        };
        let url = match state.next.take() {
            Some(next) => next,
            None => {
                let mut query = String::from("$orderby=Modified");
                if let Some(ms) = state.modified_ms {
                    let at = Utc
                        .timestamp_millis_opt(ms)
                        .single()
                        .ok_or_else(|| bad_input("cursor time out of range".to_owned()))?;
                    // Inclusive, so records sharing the last time are not lost; `seen` skips
                    // the ones already emitted.
                    query.push_str(&format!(
                        "&$filter=Modified%20ge%20datetime'{}'",
                        at.format("%Y-%m-%dT%H:%M:%S%.3f")
                    ));
                }
                self.url(&format!("{}?{query}", def.path))
            }
        };
        let (results, next) = self.get_page(&url).await?;
        let mut records = Vec::new();
        let mut page_max = state.modified_ms;
        let mut parsed = Vec::with_capacity(results.len());
        for item in &results {
            let record = to_record(&def, item)?;
            let ms = record.updated_at.map(|t| t.timestamp_millis());
            page_max = page_max.max(ms);
            parsed.push((ms, record));
        }
        let cursor_ms = state.modified_ms;
        let mut seen_at_max: Vec<String> = if page_max == cursor_ms {
            state.seen.clone()
        } else {
            Vec::new()
        };
        for (ms, record) in parsed {
            let already = ms == cursor_ms && state.seen.contains(&record.id);
            if ms == page_max && !seen_at_max.contains(&record.id) {
                seen_at_max.push(record.id.clone());
            }
            if !already && ms >= cursor_ms {
                records.push(record);
            }
        }
        // A full page that did not move past the cursor's time is a run of equal timestamps:
        // continue it through `__next` instead of re-reading the same page forever.
        let continue_run = page_max == cursor_ms && next.is_some();
        let new_cursor = ModifiedCursor {
            modified_ms: page_max,
            seen: seen_at_max,
            next: if continue_run { next.clone() } else { None },
        };
        Ok(ChangePage {
            records,
            next_cursor: Some(serde_json::to_string(&new_cursor).expect("cursor serialises")),
            has_more: next.is_some(),
        })
    }

    async fn find_by(
        &self,
        entity_type: &str,
        criteria: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError> {
        let def = entity(entity_type, "find_by")?;
        if criteria.is_empty() {
            return Err(bad_input("find_by needs at least one criterion".to_owned()));
        }
        let mut clauses = Vec::new();
        for (name, value) in criteria {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bad_input(format!(
                    "`{name}` is not an Exact Online property name"
                )));
            }
            clauses.push(format!("{name} eq {}", odata_literal(value)?));
        }
        let filter = clauses.join(" and ");
        let mut url = url::Url::parse(&self.url(def.path))
            .map_err(|_| bad_input("exactonline.base_url does not form a valid URL".to_owned()))?;
        url.query_pairs_mut().append_pair("$filter", &filter);
        let mut next = Some(url.to_string());
        let mut out = Vec::new();
        while let Some(page_url) = next.take() {
            let (results, more) = self.get_page(&page_url).await?;
            for item in &results {
                out.push(to_record(&def, item)?);
            }
            next = more;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID_TEXT: &str = "11111111-1111-1111-1111-111111111111";

    #[test]
    fn odata_dates_round_trip() {
        let at = parse_odata_date("/Date(1700000000123)/").unwrap();
        assert_eq!(at.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(odata_date(at), "/Date(1700000000123)/");
        assert!(parse_odata_date("2024-01-01").is_none());
        assert_eq!(
            parse_odata_date("/Date(1700000000123+0100)/")
                .unwrap()
                .timestamp_millis(),
            1_700_000_000_123
        );
    }

    #[test]
    fn keys_are_checked() {
        let accounts = entity("Accounts", "fetch").unwrap();
        assert!(accounts.keyed_path("not-a-guid").is_err());
        assert_eq!(
            accounts
                .keyed_path("11111111-1111-1111-1111-111111111111")
                .unwrap(),
            "crm/Accounts(guid'11111111-1111-1111-1111-111111111111')"
        );
        let divisions = entity("Divisions", "fetch").unwrap();
        assert_eq!(divisions.keyed_path("42").unwrap(), "hrm/Divisions(42)");
        assert!(divisions.keyed_path("x").is_err());
    }

    #[test]
    fn budget_reads_the_headers_and_keeps_a_local_window() {
        let mut headers = reqwest::header::HeaderMap::new();
        let in_an_hour = (Utc::now() + chrono::Duration::hours(1)).timestamp_millis();
        headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset", in_an_hour.to_string().parse().unwrap());
        let mut budget = Budget::default();
        budget.observe(&headers);
        match budget.take() {
            Err(ConnectorError::RateLimited {
                retry_after: Some(wait),
                ..
            }) => assert!(wait > Duration::from_secs(3500)),
            other => panic!("the day's quota is gone, got {other:?}"),
        }

        let mut local = Budget::default();
        for _ in 0..MINUTE_LIMIT {
            assert_eq!(local.take().unwrap(), Duration::ZERO);
        }
        assert!(
            matches!(local.take(), Err(ConnectorError::RateLimited { .. })),
            "the 61st call in a minute waits"
        );
    }

    #[test]
    fn literals_escape_quotes() {
        assert_eq!(odata_literal(&Value::from("O'Neil")).unwrap(), "'O''Neil'");
        assert_eq!(odata_literal(&Value::from(3)).unwrap(), "3");
        assert_eq!(
            odata_literal(&Value::from(GUID_TEXT)).unwrap(),
            format!("guid'{GUID_TEXT}'")
        );
    }
}
