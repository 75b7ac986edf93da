//! Client of CRMOffice (crmoffice.no): Contacts and Activities, and Companies as a reference
//! target (read-only here: no dataflow writes companies).
//!
//! CRMOffice publishes no API documentation (docs/vendors.md, CRMOffice).
//! Known: base `https://api.crmoffice.no/`, OAuth2 bearer tokens, `GET companies` listing under
//! `items` with id field `id`. Everything else this client does rests on the named constants and
//! functions of [`assumptions`]; replacing them with the real API's facts is one edit there.
//!
//! Polling: the cursor holds the newest `updatedAt` delivered and the ids delivered at exactly
//! that instant; each call asks for page 1 from that instant, so records changed during a pass
//! move behind the cursor instead of shifting page boundaries. Only when a whole page shares one
//! instant does the cursor page on by number within it. Known limits, inherent to an
//! updated-since filter: a record changed twice within the server clock's resolution at the
//! cursor's own instant is seen once; more than a page of records at one instant that change
//! while being paged can shift one record past the page being read.
//!
//! Owns: the HTTP calls and the poll cursor format of CRMOffice.
//! May call: [`super::transport`] only.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::custom::join;
use super::transport::refresh::{RefreshConfig, StoredRefreshToken};
use super::transport::token::{StaticToken, TokenSource};
use super::transport::{http_client, Answer, Call, Credential, Gates, VendorClient};
use super::{get_path, ChangePage, Connector, ConnectorError, Record};
use crate::at_rest::Keyring;
use crate::config::{CrmOfficeAuth, CrmOfficeConfig, CrmOfficeOAuth};
use crate::domain::SystemId;
use secrecy::SecretString;
use sqlx::PgPool;

/// Every assumption about CRMOffice's API, in one place. Each constant says what is assumed and
/// why; the simulator ([`crate::simulators::crmoffice`]) implements exactly these.
pub mod assumptions {
    /// Collection path of each entity type, relative to the base URL. `companies` is known (the
    /// Sesam connector reads it); `contacts` and `activities` are assumed by analogy.
    pub fn collection(entity_type: &str) -> Option<&'static str> {
        match entity_type {
            "Contacts" => Some("contacts"),
            "Activities" => Some("activities"),
            "Companies" => Some("companies"),
            _ => None,
        }
    }

    /// Entity types this connector writes. Companies are only a reference target (a contact's
    /// `company.id`); no dataflow creates or updates them, so writes are refused as unsupported.
    pub fn writable(entity_type: &str) -> bool {
        matches!(entity_type, "Contacts" | "Activities")
    }

    /// Lists are JSON objects with the records under this key (known for `companies`/`users`).
    pub const LIST_KEY: &str = "items";

    /// The record id field (known for `companies`). Ids may be strings or numbers; both are
    /// presented as strings.
    pub const ID_FIELD: &str = "id";

    /// The last-change time of a record, RFC 3339. Assumed; no source names it.
    pub const UPDATED_FIELD: &str = "updatedAt";

    /// The updated-since filter: query parameter name, RFC 3339 value.
    pub const UPDATED_SINCE_PARAM: &str = "updatedSince";

    /// Whether the filter includes records changed exactly at the given instant (`>=`). With
    /// `false` the client asks from one millisecond earlier so that equal timestamps are never
    /// lost; records already seen are filtered by id either way.
    pub const UPDATED_SINCE_INCLUSIVE: bool = true;

    /// Sort parameter and value giving ascending last-change order, ties in a stable order (by id).
    pub const SORT_PARAM: &str = "sort";
    pub const SORT_BY_UPDATED_ASC: &str = "updatedAt";

    /// Page-number paging, 1-based, and the page size parameter. A page shorter than the size
    /// asked for is the last one.
    pub const PAGE_PARAM: &str = "page";
    pub const PAGE_SIZE_PARAM: &str = "pageSize";
    pub const DEFAULT_PAGE_SIZE: u32 = 100;

    /// A writable field carrying our idempotency key on create, and a list filter of the same
    /// name (`GET contacts?externalId=<k>`), used by `find_created`. Results are re-checked
    /// locally; if the server ignores the filter the client falls back to scanning the
    /// collection, so a wrong assumption costs requests, never a wrong or missed match.
    pub const EXTERNAL_ID_FIELD: &str = "externalId";
    pub const EXTERNAL_ID_PARAM: &str = "externalId";

    /// `POST {collection}` creates (201 or 200 with the record); `PUT {collection}/{id}` replaces
    /// the whole record (so an update reads the record, applies the changed fields and writes it
    /// back); `GET {collection}/{id}` reads one, 404 when gone.
    pub const UPDATE_REPLACES_WHOLE_RECORD: bool = true;

    /// Field shapes are the registry's names as they stand: a contact's company is the nested
    /// object `company.id`; an activity has top-level `ownerId` and `subject`. No renaming.
    pub const FIELDS_AS_REGISTRY_NAMES: bool = true;
}

use assumptions as a;

/// A client of one CRMOffice tenant.
pub struct CrmOfficeConnector {
    base_url: url::Url,
    client: VendorClient,
    page_size: u32,
}

impl std::fmt::Debug for CrmOfficeConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmOfficeConnector")
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    /// Every record changed before this instant has been delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
    /// Ids delivered whose last change is exactly `since`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<String>,
    /// Page within `since` (only above 1 while whole pages share the `since` instant).
    #[serde(default = "first_page")]
    page: u32,
}

fn first_page() -> u32 {
    1
}

impl Cursor {
    fn parse(cursor: Option<&str>) -> Result<Cursor, ConnectorError> {
        match cursor {
            None => Ok(Cursor {
                page: 1,
                ..Cursor::default()
            }),
            Some(text) => serde_json::from_str(text).map_err(|_| ConnectorError::Rejected {
                system: SYSTEM,
                status: 400,
                message: "the poll cursor was not written by this connector".to_owned(),
            }),
        }
    }

    /// Keeps the page's records this cursor has not delivered yet, and moves the cursor past the
    /// page: to the page's latest change, or (a whole page sharing the `since` instant) on to the
    /// next page of that instant.
    fn advance(
        &mut self,
        page: Vec<Record>,
        full_page: bool,
    ) -> Result<Vec<Record>, ConnectorError> {
        let mut records = Vec::with_capacity(page.len());
        let mut page_max: Option<DateTime<Utc>> = None;
        let mut at_max: Vec<String> = Vec::new();
        for record in page {
            let Some(at) = record.updated_at else {
                return Err(malformed(format!(
                    "a listed record has no `{}`",
                    a::UPDATED_FIELD
                )));
            };
            match page_max {
                Some(max) if at < max => {}
                Some(max) if at == max => at_max.push(record.id.clone()),
                _ => {
                    page_max = Some(at);
                    at_max = vec![record.id.clone()];
                }
            }
            let old = self.since.is_some_and(|s| at < s);
            let seen = self.since == Some(at) && self.seen.contains(&record.id);
            if !old && !seen {
                records.push(record);
            }
        }
        match page_max {
            Some(max) if self.since.is_none_or(|s| max > s) => {
                self.since = Some(max);
                self.seen = at_max;
                self.page = 1;
            }
            Some(_) => {
                // The whole page shares the `since` instant: remember it and page on, or (caught
                // up) start from page 1 next time.
                for id in at_max {
                    if !self.seen.contains(&id) {
                        self.seen.push(id);
                    }
                }
                self.page = if full_page { self.page + 1 } else { 1 };
            }
            None => self.page = 1,
        }
        Ok(records)
    }
}

const SYSTEM: SystemId = SystemId::CrmOffice;

fn malformed(what: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Transient {
        system: SYSTEM,
        message: format!("answer not in the assumed CRMOffice format: {what}"),
    }
}

/// Objects merge recursively; anything else replaces (how changed fields land on a whole record).
fn merge_into(target: &mut Map<String, Value>, changed: &Map<String, Value>) {
    for (key, value) in changed {
        match (target.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(inner)) => merge_into(existing, inner),
            _ => {
                target.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The refresh tokens of CRMOffice's OAuth2 client, kept and rotated in `oauth_tokens` like
/// Exact's (docs/vendors.md, CRMOffice item 9); also what `tether credentials set crmoffice`
/// hands a new refresh token to.
pub fn token_store(
    oauth: &CrmOfficeOAuth,
    pool: PgPool,
    http: reqwest::Client,
    keyring: Option<Arc<Keyring>>,
) -> StoredRefreshToken {
    StoredRefreshToken::new(
        RefreshConfig {
            system: SYSTEM,
            vendor_name: "CRMOffice",
            account: oauth.client_id.clone(),
            token_url: oauth.token_url.to_string(),
            client_id: oauth.client_id.clone(),
            client_secret: oauth.client_secret.clone(),
            seed_refresh_token: oauth.refresh_token.clone(),
            // Nothing documented; a refresh is only asked for near expiry or after a 401.
            min_refresh_interval: Duration::ZERO,
            reauthorise: "re-authorise Tether in CRMOffice and set crmoffice.refresh_token to the \
                          new refresh token, or hand it over with `tether credentials set crmoffice`",
            client_hint: "check crmoffice.client_id and client_secret",
        },
        pool,
        http,
    )
    .with_keyring(keyring)
}

impl CrmOfficeConnector {
    /// The connector as `serve` builds it: a fixed token, or OAuth2 refresh tokens stored in
    /// `pool` (sealed under `keyring`).
    pub fn configured(
        config: &CrmOfficeConfig,
        pool: &PgPool,
        timeout: Duration,
        keyring: Option<Arc<Keyring>>,
    ) -> Self {
        let http = http_client(timeout);
        let tokens: Arc<dyn TokenSource> = match &config.auth {
            CrmOfficeAuth::Token(token) => Arc::new(StaticToken(Credential::Bearer(token.clone()))),
            CrmOfficeAuth::OAuth(oauth) => {
                Arc::new(token_store(oauth, pool.clone(), http.clone(), keyring))
            }
        };
        Self::with_tokens(config.base_url.clone(), http, tokens)
    }

    /// With a fixed bearer token (tests, and a token taken from CRMOffice's Swagger page).
    pub fn with_token(base_url: url::Url, token: SecretString, timeout: Duration) -> Self {
        let tokens = Arc::new(StaticToken(Credential::Bearer(token)));
        Self::with_tokens(base_url, http_client(timeout), tokens)
    }

    fn with_tokens(
        base_url: url::Url,
        http: reqwest::Client,
        tokens: Arc<dyn TokenSource>,
    ) -> Self {
        CrmOfficeConnector {
            base_url,
            client: VendorClient::new(SYSTEM, http, tokens, Arc::new(Gates::default())),
            page_size: a::DEFAULT_PAGE_SIZE,
        }
    }

    /// Page size asked for in lists (tests use small pages to reach page boundaries).
    pub fn with_page_size(mut self, size: u32) -> Self {
        self.page_size = size.max(1);
        self
    }

    fn collection(
        &self,
        entity_type: &str,
        operation: &'static str,
    ) -> Result<&'static str, ConnectorError> {
        a::collection(entity_type).ok_or_else(|| ConnectorError::Unsupported {
            system: SYSTEM,
            entity_type: entity_type.to_owned(),
            operation,
        })
    }

    fn writable(
        &self,
        entity_type: &str,
        operation: &'static str,
    ) -> Result<&'static str, ConnectorError> {
        let collection = self.collection(entity_type, operation)?;
        if !a::writable(entity_type) {
            return Err(ConnectorError::Unsupported {
                system: SYSTEM,
                entity_type: entity_type.to_owned(),
                operation,
            });
        }
        Ok(collection)
    }

    /// The JSON of a successful answer; `None` for 404.
    async fn send(&self, call: Call<'_>) -> Result<Option<Value>, ConnectorError> {
        match self.client.send(call).await? {
            Answer::Json(value) => Ok(Some(value)),
            Answer::Empty => Err(malformed("an empty answer")),
            Answer::NotFound => Ok(None),
        }
    }

    async fn list(
        &self,
        collection: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, ConnectorError> {
        let call = Call::get(join(&self.base_url, &[collection])).query(query);
        let Some(value) = self.send(call).await? else {
            return Err(gone(&format!("list endpoint /{collection}")));
        };
        match value {
            Value::Object(mut body) => match body.remove(a::LIST_KEY) {
                Some(Value::Array(items)) => Ok(items),
                _ => Err(malformed(format!("no `{}` array", a::LIST_KEY))),
            },
            _ => Err(malformed("a list is not a JSON object")),
        }
    }
}

fn gone(what: &str) -> ConnectorError {
    ConnectorError::Rejected {
        system: SYSTEM,
        status: 404,
        message: format!("{what} not found"),
    }
}

fn to_record(value: Value) -> Result<Record, ConnectorError> {
    let Value::Object(mut fields) = value else {
        return Err(malformed("a record is not a JSON object"));
    };
    let id = match fields.remove(a::ID_FIELD) {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(malformed(format!("a record has no `{}`", a::ID_FIELD))),
    };
    let updated_at = match fields.remove(a::UPDATED_FIELD) {
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(&s)
                .map_err(|_| malformed(format!("`{}` {s:?} is not RFC 3339", a::UPDATED_FIELD)))?
                .with_timezone(&Utc),
        ),
        None | Some(Value::Null) => None,
        Some(_) => return Err(malformed(format!("`{}` is not a string", a::UPDATED_FIELD))),
    };
    Ok(Record {
        id,
        updated_at,
        fields,
    })
}

fn since_param(t: DateTime<Utc>) -> String {
    let t = if a::UPDATED_SINCE_INCLUSIVE {
        t
    } else {
        t - chrono::Duration::milliseconds(1)
    };
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[async_trait]
impl Connector for CrmOfficeConnector {
    fn system(&self) -> SystemId {
        SYSTEM
    }

    /// `updated_since` is inclusive; nothing at `at` was delivered yet.
    fn start_cursor(&self, _entity_type: &str, at: DateTime<Utc>) -> Option<String> {
        let cursor = Cursor {
            since: Some(at),
            seen: Vec::new(),
            page: 1,
        };
        Some(serde_json::to_string(&cursor).expect("cursor serialises"))
    }

    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        let collection = self.collection(entity_type, "fetch")?;
        self.send(Call::get(join(&self.base_url, &[collection, id])))
            .await?
            .map(to_record)
            .transpose()
    }

    async fn create(
        &self,
        entity_type: &str,
        fields: &Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<Record, ConnectorError> {
        let collection = self.writable(entity_type, "create")?;
        let mut body = fields.clone();
        body.insert(
            a::EXTERNAL_ID_FIELD.to_owned(),
            Value::String(idempotency_key.to_owned()),
        );
        let body = Value::Object(body);
        let call = Call::new(Method::POST, join(&self.base_url, &[collection])).json(&body);
        let Some(value) = self.send(call).await? else {
            return Err(gone(&format!("create endpoint /{collection}")));
        };
        to_record(value)
    }

    async fn find_created(
        &self,
        entity_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        let collection = self.writable(entity_type, "find_created")?;
        let items = self
            .list(
                collection,
                &[(a::EXTERNAL_ID_PARAM, idempotency_key.to_owned())],
            )
            .await?;
        let mut filter_ignored = false;
        for item in items {
            let record = to_record(item)?;
            if record
                .fields
                .get(a::EXTERNAL_ID_FIELD)
                .and_then(Value::as_str)
                == Some(idempotency_key)
            {
                return Ok(Some(record));
            }
            filter_ignored = true;
        }
        if filter_ignored {
            // The server ignored the filter: only a full scan can answer without guessing.
            let mut criteria = Map::new();
            criteria.insert(
                a::EXTERNAL_ID_FIELD.to_owned(),
                Value::String(idempotency_key.to_owned()),
            );
            return Ok(self
                .find_by(entity_type, &criteria)
                .await?
                .into_iter()
                .next());
        }
        Ok(None)
    }

    async fn update(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        let collection = self.writable(entity_type, "update")?;
        let Some(current) = self.fetch(entity_type, id).await? else {
            return Err(gone(&format!("{entity_type} {id}")));
        };
        let mut body = current.fields;
        merge_into(&mut body, changed);
        let body = Value::Object(body);
        let call = Call::new(Method::PUT, join(&self.base_url, &[collection, id])).json(&body);
        let Some(value) = self.send(call).await? else {
            return Err(gone(&format!("{entity_type} {id}")));
        };
        to_record(value)
    }

    async fn list_changed(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let collection = self.collection(entity_type, "list_changed")?;
        let mut state = Cursor::parse(cursor)?;
        let mut query = vec![
            (a::SORT_PARAM, a::SORT_BY_UPDATED_ASC.to_owned()),
            (a::PAGE_PARAM, state.page.max(1).to_string()),
            (a::PAGE_SIZE_PARAM, self.page_size.to_string()),
        ];
        if let Some(since) = state.since {
            query.push((a::UPDATED_SINCE_PARAM, since_param(since)));
        }
        let items = self.list(collection, &query).await?;
        let full_page = items.len() as u32 >= self.page_size;
        let page = items
            .into_iter()
            .map(to_record)
            .collect::<Result<Vec<_>, _>>()?;
        let records = state.advance(page, full_page)?;
        Ok(ChangePage {
            records,
            next_cursor: Some(serde_json::to_string(&state).expect("a cursor serialises")),
            has_more: full_page,
        })
    }

    /// No field filters are known, so this scans the collection and compares locally.
    async fn find_by(
        &self,
        entity_type: &str,
        criteria: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError> {
        let collection = self.collection(entity_type, "find_by")?;
        let mut found = Vec::new();
        let mut page = 1u32;
        loop {
            let items = self
                .list(
                    collection,
                    &[
                        (a::SORT_PARAM, a::SORT_BY_UPDATED_ASC.to_owned()),
                        (a::PAGE_PARAM, page.to_string()),
                        (a::PAGE_SIZE_PARAM, self.page_size.to_string()),
                    ],
                )
                .await?;
            let last = (items.len() as u32) < self.page_size;
            for item in items {
                let record = to_record(item)?;
                if criteria
                    .iter()
                    .all(|(path, want)| get_path(&record.fields, path) == Some(want))
                {
                    found.push(record);
                }
            }
            if last {
                return Ok(found);
            }
            page += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_fields_merge_into_nested_objects() {
        let mut body = json!({"name": "A", "company": {"id": "1", "name": "X"}})
            .as_object()
            .unwrap()
            .clone();
        let changed = json!({"company": {"id": "2"}}).as_object().unwrap().clone();
        merge_into(&mut body, &changed);
        assert_eq!(
            Value::Object(body),
            json!({"name": "A", "company": {"id": "2", "name": "X"}})
        );
    }

    #[test]
    fn every_entity_type_has_a_collection() {
        for t in ["Contacts", "Activities", "Companies"] {
            assert!(a::collection(t).is_some());
        }
        assert!(!a::writable("Companies"));
    }
}
