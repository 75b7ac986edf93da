//! Exact Online connector: `Accounts` (`crm/Accounts`), `Departments` (`hrm/Departments`) and
//! `Divisions` (`hrm/Divisions`) of one division.
//!
//! Owns: which token source (rotating refresh tokens stored in PostgreSQL, 10-minute access
//! tokens) and gates (60 calls a minute and 5,000 a day per division, read from the
//! `X-RateLimit-*` headers) its calls use, and the OData v2 JSON translation (`d.results`,
//! `__next`, `/Date(ms)/`). Vendor facts: docs/vendors.md, Exact Online.
//! May call: [`super::transport`] only.
//!
//! Field names in a [`Record`] are Exact's own (`Name`, `Description`, ...), which are the
//! registry's names for these types. `/Date(ms)/` values are presented as RFC 3339 strings.

mod deleted;
pub mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;

use super::transport::gate::Window;
use super::transport::quota::{LowQuota, QuotaGate, QuotaHeaders, ResetFormat};
use super::transport::refresh::{RefreshConfig, StoredRefreshToken};
use super::transport::{http_client, Budgets, Call, Gates, RateGate, VendorClient};
use super::{ChangePage, Connector, ConnectorError, DeletionPage, Record, DELETIONS};
use crate::config::ExactConfig;
use crate::domain::SystemId;

const SYSTEM: SystemId = SystemId::ExactOnline;

/// Exact refuses a new access token sooner than 9 min 30 s after the previous one.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(570);
/// Calls a minute Exact allows per division and app.
const MINUTE_LIMIT: u32 = 60;
/// Exact's quota headers (docs/vendors.md, Exact Online "API limits"): the minute's and the
/// day's calls left, resets as epoch milliseconds.
const MINUTELY_QUOTA: QuotaHeaders = QuotaHeaders {
    remaining: "x-ratelimit-minutely-remaining",
    limit: Some("x-ratelimit-minutely-limit"),
    reset: "x-ratelimit-minutely-reset",
    reset_format: ResetFormat::EpochTime,
    window: Duration::from_secs(60),
    low: LowQuota::StopAtZero,
};
const DAILY_QUOTA: QuotaHeaders = QuotaHeaders {
    remaining: "x-ratelimit-remaining",
    limit: Some("x-ratelimit-limit"),
    reset: "x-ratelimit-reset",
    reset_format: ResetFormat::EpochTime,
    window: Duration::from_secs(86_400),
    low: LowQuota::StopAtZero,
};
/// A budget wait up to this long is slept inline; longer ones are returned as back-pressure so
/// the worker is not held.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(2);

/// The operator-facing instruction when the refresh token is gone.
const REAUTHORISE: &str =
    "re-authorise Tether in Exact Online and set exactonline.refresh_token to the new refresh token, \
     or hand it to the running service with `tether credentials set exactonline`";

/// Calls that may go at once when the minute's budget is shared (the rest are spaced so that
/// no minute holds more than [`MINUTE_LIMIT`]).
const SHARED_MINUTE_BURST: u32 = 30;

/// The minute's limit: a sliding window in this process (bursts up to the limit), or a budget
/// shared by every replica.
fn minute_gate(budgets: &Budgets, division: i64) -> Arc<dyn RateGate> {
    match budgets {
        Budgets::Local => Arc::new(Window::per_minute(MINUTE_LIMIT)),
        Budgets::Shared(_) => budgets.gate(
            format!("exactonline:{division}:minute"),
            MINUTE_LIMIT,
            Duration::from_secs(60),
            SHARED_MINUTE_BURST,
        ),
    }
}

/// One entity type's shape in Exact's API.
struct EntityDef {
    /// Path under `/api/v1/{division}/`.
    path: &'static str,
    /// The key property (`ID` GUID or `Code` integer).
    key: &'static str,
    guid_key: bool,
    /// Whether the API accepts creates and updates (departments and divisions are GET only).
    writable: bool,
    /// The sync API's path under `sync/`, where the type has one.
    sync_path: Option<&'static str>,
}

fn entity(entity_type: &str, operation: &'static str) -> Result<EntityDef, ConnectorError> {
    Ok(match entity_type {
        "Accounts" => EntityDef {
            path: "crm/Accounts",
            key: "ID",
            guid_key: true,
            writable: true,
            sync_path: Some("CRM/Accounts"),
        },
        // GET only in Exact's REST API (docs/vendors.md, Exact item 1).
        "Departments" => EntityDef {
            path: "hrm/Departments",
            key: "ID",
            guid_key: true,
            writable: false,
            sync_path: None,
        },
        "Divisions" => EntityDef {
            path: "hrm/Divisions",
            key: "Code",
            guid_key: false,
            writable: false,
            sync_path: None,
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
        Ok(format!("{}({})", self.path, self.key_literal(id)?))
    }

    /// The key as an OData literal (`guid'…'` or an integer), after checking its form.
    fn key_literal(&self, id: &str) -> Result<String, ConnectorError> {
        if self.guid_key {
            let guid = uuid::Uuid::parse_str(id).map_err(|_| {
                bad_input(format!(
                    "`{id}` is not an Exact Online GUID key for {}",
                    self.path
                ))
            })?;
            Ok(format!("guid'{}'", guid.hyphenated()))
        } else {
            let code: i64 = id.parse().map_err(|_| {
                bad_input(format!(
                    "`{id}` is not an Exact Online integer key for {}",
                    self.path
                ))
            })?;
            Ok(code.to_string())
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

/// The Exact Online client of one division.
pub struct ExactOnline {
    config: ExactConfig,
    client: VendorClient,
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
    /// `timeout` bounds every call (the `outbound.timeout` setting). Tokens are stored in clear.
    pub fn new(config: ExactConfig, pool: PgPool, timeout: Duration) -> Self {
        Self::configured(config, pool, timeout, None, Budgets::Local)
    }

    /// Like [`ExactOnline::new`], storing the tokens encrypted under `keyring` (`secrets.key`).
    pub fn with_keyring(
        config: ExactConfig,
        pool: PgPool,
        timeout: Duration,
        keyring: Option<Arc<crate::at_rest::Keyring>>,
    ) -> Self {
        Self::configured(config, pool, timeout, keyring, Budgets::Local)
    }

    /// Like [`ExactOnline::new`], with the minute's limit counted in `budgets` (shared by
    /// every replica when [`Budgets::Shared`]: Exact counts per division for the whole app).
    pub fn with_budgets(
        config: ExactConfig,
        pool: PgPool,
        timeout: Duration,
        budgets: Budgets,
    ) -> Self {
        Self::configured(config, pool, timeout, None, budgets)
    }

    /// The connector as `tether serve` builds it: tokens under `keyring`, limits in `budgets`.
    pub fn configured(
        config: ExactConfig,
        pool: PgPool,
        timeout: Duration,
        keyring: Option<Arc<crate::at_rest::Keyring>>,
        budgets: Budgets,
    ) -> Self {
        let http = http_client(timeout);
        let tokens = token_store(&config, pool, http.clone(), keyring);
        let gates = Gates::new(vec![
            // Exact counts per division for the whole app; the calls are kept under the minute's
            // limit even before the first answer's headers arrive.
            minute_gate(&budgets, config.division),
            Arc::new(QuotaGate::new(MINUTELY_QUOTA)),
            Arc::new(QuotaGate::new(DAILY_QUOTA)),
        ]);
        let client = VendorClient::new(SYSTEM, http, Arc::new(tokens), Arc::new(gates))
            .with_max_inline_wait(MAX_INLINE_WAIT);
        ExactOnline { config, client }
    }
}

/// The division's rotating refresh token as every replica shares it in `oauth_tokens`; also what
/// `tether credentials set exactonline` hands a new refresh token to.
pub fn token_store(
    config: &ExactConfig,
    pool: PgPool,
    http: reqwest::Client,
    keyring: Option<Arc<crate::at_rest::Keyring>>,
) -> StoredRefreshToken {
    StoredRefreshToken::new(
        RefreshConfig {
            system: SYSTEM,
            vendor_name: "Exact Online",
            account: config.division.to_string(),
            token_url: format!(
                "{}/api/oauth2/token",
                config.base_url.as_str().trim_end_matches('/')
            ),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            seed_refresh_token: config.refresh_token.clone(),
            min_refresh_interval: MIN_REFRESH_INTERVAL,
            reauthorise: REAUTHORISE,
            client_hint: "check exactonline.client_id and client_secret",
        },
        pool,
        http,
    )
    .with_keyring(keyring)
}

impl ExactOnline {
    fn url(&self, path_and_query: &str) -> String {
        format!(
            "{}/api/v1/{}/{}",
            self.config.base_url.as_str().trim_end_matches('/'),
            self.config.division,
            path_and_query
        )
    }

    /// One API call. Returns `None` for 404, `Some(Value::Null)` for 204.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ConnectorError> {
        let url = url::Url::parse(url)
            .map_err(|_| bad_input("exactonline.base_url does not form a valid URL".to_owned()))?;
        let mut call = Call::new(method, url);
        if let Some(body) = body {
            call = call.header("prefer", "return=representation").json(body);
        }
        Ok(self.client.send(call).await?.found())
    }

    /// GETs a collection page: its entities and the `__next` link.
    /// The first page of a type filtered on `Modified`, from `modified_ms` on (inclusive, so
    /// records sharing the last time are not lost; the cursor's `seen` skips those emitted).
    fn modified_since_url(
        &self,
        def: &EntityDef,
        modified_ms: Option<i64>,
    ) -> Result<String, ConnectorError> {
        let mut query = String::from("$orderby=Modified");
        if let Some(ms) = modified_ms {
            let at = Utc
                .timestamp_millis_opt(ms)
                .single()
                .ok_or_else(|| bad_input("cursor time out of range".to_owned()))?;
            query.push_str(&format!(
                "&$filter=Modified%20ge%20datetime'{}'",
                at.format("%Y-%m-%dT%H:%M:%S%.3f")
            ));
        }
        Ok(self.url(&format!("{}?{query}", def.path)))
    }

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

/// Exact's first sync call of a division filters `Timestamp gt 1` (docs/vendors.md, Exact item 2).
const FIRST_SYNC_TIMESTAMP: i64 = 1;

/// A sync row's `Timestamp`: an Edm.Int64, which OData v2 sends as a JSON string; a number is
/// accepted too. Anything else is an error, never a silently kept cursor.
pub fn sync_timestamp(item: &Value) -> Result<i64, ConnectorError> {
    match item.get("Timestamp") {
        Some(Value::String(s)) => s.trim().trim_end_matches('L').parse().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| malformed("a sync row has no Int64 `Timestamp`"))
}

/// Where a sync API read stands. Between runs it is the highest `Timestamp` seen, stored as plain
/// digits. Within a run of `__next` pages it also keeps the link and the highest seen so far:
/// the vendor does not promise the rows come sorted, so the run's start stays the cursor until
/// its last page (a restart repeats the run, which is harmless).
#[derive(Debug, Serialize, Deserialize)]
struct SyncCursor {
    from: i64,
    highest: i64,
    next: Option<String>,
    /// First pass after the first connection: rows last modified before this (ms since the
    /// epoch) are passed over, not emitted. A row version (`Timestamp`) says nothing about time,
    /// so the first pass reads the rows once to move past them; dropped once it is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_ms: Option<i64>,
}

impl SyncCursor {
    fn parse(text: Option<&str>) -> Result<SyncCursor, ConnectorError> {
        let Some(text) = text else {
            return Ok(SyncCursor::at(FIRST_SYNC_TIMESTAMP));
        };
        if let Ok(from) = text.trim().parse::<i64>() {
            return Ok(SyncCursor::at(from));
        }
        serde_json::from_str(text)
            .map_err(|_| bad_input(format!("`{text}` is not an Exact sync cursor")))
    }

    fn at(from: i64) -> SyncCursor {
        SyncCursor {
            from,
            highest: from,
            next: None,
            since_ms: None,
        }
    }

    fn to_text(&self) -> String {
        match (&self.next, self.since_ms) {
            (None, None) => self.highest.to_string(),
            _ => serde_json::to_string(self).expect("cursor serialises"),
        }
    }
}

impl ExactOnline {
    /// One page of a sync API (`sync/CRM/Accounts`): rows whose row version `Timestamp` is above
    /// the cursor's. The vendor documents only the Timestamp filter for sync APIs, so no
    /// `$orderby` is sent.
    async fn list_synced(
        &self,
        def: &EntityDef,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let mut state = SyncCursor::parse(cursor)?;
        let url = match state.next.take() {
            Some(next) => next,
            None => self.url(&format!(
                "sync/{}?$filter=Timestamp%20gt%20{}L",
                def.sync_path.unwrap_or(def.path),
                state.from
            )),
        };
        let (results, next) = self.get_page(&url).await?;
        let mut records = Vec::with_capacity(results.len());
        for item in &results {
            state.highest = state.highest.max(sync_timestamp(item)?);
            let mut record = to_record(def, item)?;
            record.fields.remove("Timestamp");
            let before_start = match (state.since_ms, record.updated_at) {
                (Some(since), Some(at)) => at.timestamp_millis() < since,
                _ => false,
            };
            if !before_start {
                records.push(record);
            }
        }
        let has_more = next.is_some();
        state.next = next;
        if !has_more {
            state.from = state.highest;
            // Every row modified before the start now has a row version at or below `from`.
            state.since_ms = None;
        }
        Ok(ChangePage {
            records,
            next_cursor: Some(state.to_text()),
            has_more,
        })
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

impl ModifiedCursor {
    /// Keeps the page's records not emitted yet and returns the cursor past the page.
    fn advance(self, page: Vec<Record>, next: Option<&str>) -> (Vec<Record>, ModifiedCursor) {
        let cursor_ms = self.modified_ms;
        let page_max = page
            .iter()
            .map(|r| r.updated_at.map(|t| t.timestamp_millis()))
            .fold(cursor_ms, Option::max);
        let mut seen_at_max: Vec<String> = if page_max == cursor_ms {
            self.seen.clone()
        } else {
            Vec::new()
        };
        let mut records = Vec::new();
        for record in page {
            let ms = record.updated_at.map(|t| t.timestamp_millis());
            let already = ms == cursor_ms && self.seen.contains(&record.id);
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
        let cursor = ModifiedCursor {
            modified_ms: page_max,
            seen: seen_at_max,
            next: next.filter(|_| continue_run).map(str::to_owned),
        };
        (records, cursor)
    }
}

#[async_trait]
impl Connector for ExactOnline {
    fn system(&self) -> SystemId {
        SYSTEM
    }

    /// Accounts (sync API): a first pass from the oldest row version that passes over rows last
    /// modified before `at`. Other types: their `Modified` filter starts at `at`.
    fn start_cursor(&self, entity_type: &str, at: DateTime<Utc>) -> Option<String> {
        if entity_type == "Accounts" || entity_type == DELETIONS {
            let mut cursor = SyncCursor::at(FIRST_SYNC_TIMESTAMP);
            cursor.since_ms = Some(at.timestamp_millis());
            return Some(cursor.to_text());
        }
        let cursor = ModifiedCursor {
            modified_ms: Some(at.timestamp_millis()),
            ..ModifiedCursor::default()
        };
        Some(serde_json::to_string(&cursor).expect("cursor serialises"))
    }

    async fn list_deleted(&self, cursor: Option<&str>) -> Result<DeletionPage, ConnectorError> {
        self.deleted_page(cursor).await
    }

    /// Exact sends `Delete` only for records it deleted, and a GUID never comes back.
    fn deletes_are_final(&self) -> bool {
        true
    }

    /// Looked up with `$filter` on the key and `$top=1`, never by key in the path: a missing
    /// record is then an empty 200 instead of a 404, which Exact counts among the 10 errors per
    /// endpoint and hour that block the app (docs/vendors.md, Exact Online item 3).
    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        let def = entity(entity_type, "fetch")?;
        let filter = format!("{} eq {}", def.key, def.key_literal(id)?);
        let mut url = url::Url::parse(&self.url(def.path))
            .map_err(|_| bad_input("exactonline.base_url does not form a valid URL".to_owned()))?;
        url.query_pairs_mut()
            .append_pair("$filter", &filter)
            .append_pair("$top", "1");
        let (results, _) = self.get_page(url.as_str()).await?;
        results
            .first()
            .map(|item| to_record(&def, item))
            .transpose()
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
            return self.list_synced(&def, cursor).await;
        }

        let mut state: ModifiedCursor = match cursor {
            None => ModifiedCursor::default(),
            Some(c) => serde_json::from_str(c)
                .map_err(|_| bad_input(format!("`{c}` is not an Exact Modified cursor")))?,
        };
        let url = match state.next.take() {
            Some(next) => next,
            None => self.modified_since_url(&def, state.modified_ms)?,
        };
        let (results, next) = self.get_page(&url).await?;
        let page = results
            .iter()
            .map(|item| to_record(&def, item))
            .collect::<Result<Vec<_>, _>>()?;
        let (records, new_cursor) = state.advance(page, next.as_deref());
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

    #[tokio::test]
    async fn gates_read_the_headers_and_keep_a_local_window() {
        let mut headers = reqwest::header::HeaderMap::new();
        let in_an_hour = (Utc::now() + chrono::Duration::hours(1)).timestamp_millis();
        headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset", in_an_hour.to_string().parse().unwrap());
        let daily = QuotaGate::new(DAILY_QUOTA);
        daily.observe(reqwest::StatusCode::OK, &headers);
        match daily.admit(MAX_INLINE_WAIT).await {
            Err(wait) => assert!(wait > Duration::from_secs(3500)),
            other => panic!("the day's quota is gone, got {other:?}"),
        }

        let local = Window::per_minute(MINUTE_LIMIT);
        let start = tokio::time::Instant::now();
        for _ in 0..MINUTE_LIMIT {
            local.admit(MAX_INLINE_WAIT).await.unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(1), "60 calls at once");
        assert!(
            local.admit(MAX_INLINE_WAIT).await.is_err(),
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
