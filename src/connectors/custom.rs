//! Client of the custom-system contract (README, "The custom-system contract"; docs/vendors.md) that a customer's own ERP
//! (`customerp`) and PMS (`custompms`) implement. One implementation, parametrised by the
//! [`SystemId`] and its [`CustomSystemConfig`].
//!
//! Owns: the HTTP calls of the contract and the connector's poll cursor format.
//! May call: [`super::transport`] only.
//!
//! # The contract, as this client uses it
//! - `GET {base}/{type}/{id}` → the record (`id`, `updated_at` RFC 3339, other fields); 404 → `None`.
//! - `POST {base}/{type}` with `Idempotency-Key` → 201 (a replay of the same key may answer 200
//!   or 201 with the same record; both are accepted).
//! - `PATCH {base}/{type}/{id}` with a JSON merge patch (RFC 7396) of only the changed fields → 200.
//!   A changed field whose new value is `null` therefore removes it, as RFC 7396 says.
//! - `GET {base}/{type}?updated_after=<RFC 3339>&cursor=<c>` → `{"items":[...],"next_cursor":...}`,
//!   `next_cursor` `null` on the last page.
//! - `{type}` is `customer`, `project` or `contact` (the last on `customerp` only);
//!   `Authorization: Bearer <api_token>`.
//!
//! # Contract addition (for the README)
//! - `GET {base}/{type}?idempotency_key=<k>` → `{"items":[record]}` holding the record that a
//!   `POST` with `Idempotency-Key: <k>` created, or `{"items":[]}` if none did. This is what
//!   [`Connector::find_created`] calls after a crash between a create and storing its link: the
//!   POST's own idempotency protects a retried POST, but only this lookup can answer "did it
//!   happen?" without creating. More than one item in the answer means the server ignored the
//!   parameter and is reported as an error rather than guessed at.
//!
//! # Conditional writes (optional, `conditional_writes = true`)
//! - `PATCH` with `If-Match: "<updated_at>"` (the stamp Tether last saw, RFC 3339 UTC with
//!   microseconds) → 412 with nothing changed if the record's `updated_at` is another instant.
//!   [`Connector::update_if_unchanged`] sends it; the engine then need not read the record
//!   before writing it (docs/sync-rules.md, "A write without a read").
//!
//! # Polling
//! The cursor is this module's JSON: the watermark `updated_at` of the last finished pass plus the
//! ids already delivered at exactly that instant, and the server's `cursor` within a pass. Each
//! pass asks for `updated_after` one microsecond before the watermark, so records that share the
//! watermark's timestamp (a coarse clock) are re-read and filtered by id instead of missed.
//! Inside a pass the server's cursor keeps the place, so records changed during a pass (they move
//! to the end of the `updated_at` order) are read later in the same pass. Known limit: a record
//! changed again within the server clock's resolution at the watermark's own instant is seen once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::transport::token::StaticToken;
use super::transport::{http_client, Answer, Call, Credential, Gates, VendorClient};
use super::{get_path, ChangePage, ConditionalWrites, Connector, ConnectorError, Record};
use crate::config::CustomSystemConfig;
use crate::domain::SystemId;

/// The header the contract names for create idempotency.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// A client of one custom system.
pub struct CustomConnector {
    system: SystemId,
    base_url: url::Url,
    client: VendorClient,
    /// `Exact` where the system honours `If-Match` on `PATCH` (the contract's optional
    /// conditional writes, `conditional_writes = true`), for every type.
    conditional: ConditionalWrites,
}

impl std::fmt::Debug for CustomConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomConnector")
            .field("system", &self.system)
            .field("base_url", &self.base_url.as_str())
            .field("conditional", &self.conditional)
            .finish_non_exhaustive()
    }
}

/// The entity types of a custom system and their path segment; `None` for a type the system
/// does not have.
pub fn path_segment(system: SystemId, entity_type: &str) -> Option<&'static str> {
    match (system, entity_type) {
        (SystemId::CustomErp | SystemId::CustomPms, "Customer") => Some("customer"),
        (SystemId::CustomErp | SystemId::CustomPms, "Project") => Some("project"),
        (SystemId::CustomErp, "Contact") => Some("contact"),
        _ => None,
    }
}

/// Joins path segments onto a base URL, percent-encoding each one (ids are caller data).
pub(crate) fn join(base: &url::Url, segments: &[&str]) -> url::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    /// Every record changed before this instant has been delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<DateTime<Utc>>,
    /// Ids delivered whose `updated_at` equals `after`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<String>,
    /// The server's cursor inside the current pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page: Option<String>,
    /// The latest `updated_at` delivered in the current pass, and the ids delivered at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass_max: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pass_seen: Vec<String>,
}

#[derive(Deserialize)]
struct ListBody {
    items: Vec<Value>,
    #[serde(default)]
    next_cursor: Option<String>,
}

impl CustomConnector {
    /// `system` must be [`SystemId::CustomErp`] or [`SystemId::CustomPms`].
    pub fn new(
        system: SystemId,
        config: &CustomSystemConfig,
        timeout: Duration,
    ) -> Result<Self, ConnectorError> {
        if !matches!(system, SystemId::CustomErp | SystemId::CustomPms) {
            return Err(ConnectorError::Unsupported {
                system,
                entity_type: "*".to_owned(),
                operation: "the custom-system contract",
            });
        }
        Ok(CustomConnector {
            system,
            base_url: config.base_url.clone(),
            client: VendorClient::new(
                system,
                http_client(timeout),
                Arc::new(StaticToken(Credential::Bearer(config.api_token.clone()))),
                Arc::new(Gates::default()),
            ),
            conditional: if config.conditional_writes {
                ConditionalWrites::Exact
            } else {
                ConditionalWrites::No
            },
        })
    }

    fn segment(
        &self,
        entity_type: &str,
        operation: &'static str,
    ) -> Result<&'static str, ConnectorError> {
        path_segment(self.system, entity_type).ok_or_else(|| ConnectorError::Unsupported {
            system: self.system,
            entity_type: entity_type.to_owned(),
            operation,
        })
    }

    fn malformed(&self, what: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Transient {
            system: self.system,
            message: format!("answer does not follow the custom-system contract: {what}"),
        }
    }

    /// The JSON of a successful answer; `None` for 404.
    async fn send(&self, call: Call<'_>) -> Result<Option<Value>, ConnectorError> {
        match self.client.send(call).await? {
            Answer::Json(value) => Ok(Some(value)),
            Answer::Empty => Err(self.malformed("an empty answer")),
            Answer::NotFound => Ok(None),
        }
    }

    fn record(&self, value: Value) -> Result<Record, ConnectorError> {
        let Value::Object(mut fields) = value else {
            return Err(self.malformed("a record is not a JSON object"));
        };
        let id = match fields.remove("id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(self.malformed("a record has no `id`")),
        };
        let updated_at = match fields.remove("updated_at") {
            Some(Value::String(s)) => Some(
                DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| self.malformed(format!("`updated_at` {s:?} is not RFC 3339")))?
                    .with_timezone(&Utc),
            ),
            None | Some(Value::Null) => None,
            Some(_) => return Err(self.malformed("`updated_at` is not a string")),
        };
        Ok(Record {
            id,
            updated_at,
            fields,
        })
    }

    fn not_found(&self, what: &str) -> ConnectorError {
        ConnectorError::Rejected {
            system: self.system,
            status: 404,
            message: format!("{what} not found"),
        }
    }

    async fn list_page(
        &self,
        segment: &str,
        query: &[(&str, String)],
    ) -> Result<ListBody, ConnectorError> {
        let url = join(&self.base_url, &[segment]);
        let Some(value) = self.send(Call::get(url).query(query)).await? else {
            return Err(self.not_found(&format!("list endpoint /{segment}")));
        };
        serde_json::from_value(value).map_err(|e| self.malformed(format!("list body: {e}")))
    }

    /// The contract's `PATCH` of the changed fields; with `If-Match` on the stamp `seen` if
    /// given, where 412 means the record changed since.
    async fn patch(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
        seen: Option<DateTime<Utc>>,
    ) -> Result<Record, ConnectorError> {
        let segment = self.segment(entity_type, "update")?;
        let patch = Value::Object(changed.clone());
        let mut call = Call::new(Method::PATCH, join(&self.base_url, &[segment, id]))
            .json(&patch)
            .content_type("application/merge-patch+json");
        if let Some(seen) = seen {
            call = call.header("If-Match", format!("\"{}\"", rfc3339(seen)));
        }
        let value = match self.send(call).await {
            Ok(Some(value)) => value,
            Ok(None) => return Err(self.not_found(&format!("{entity_type} {id}"))),
            Err(ConnectorError::Rejected { status: 412, .. }) if seen.is_some() => {
                return Err(ConnectorError::Changed {
                    system: self.system,
                    entity_type: entity_type.to_owned(),
                    id: id.to_owned(),
                })
            }
            Err(e) => return Err(e),
        };
        self.record(value)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[async_trait]
impl Connector for CustomConnector {
    fn system(&self) -> SystemId {
        self.system
    }

    /// The list is asked for `updated_after` a microsecond before `at`, so `at` is included.
    fn start_cursor(&self, _entity_type: &str, at: DateTime<Utc>) -> Option<String> {
        let cursor = Cursor {
            after: Some(at),
            ..Cursor::default()
        };
        Some(serde_json::to_string(&cursor).expect("cursor serialises"))
    }

    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        let segment = self.segment(entity_type, "fetch")?;
        self.send(Call::get(join(&self.base_url, &[segment, id])))
            .await?
            .map(|value| self.record(value))
            .transpose()
    }

    async fn create(
        &self,
        entity_type: &str,
        fields: &Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<Record, ConnectorError> {
        let segment = self.segment(entity_type, "create")?;
        let body = Value::Object(fields.clone());
        let call = Call::new(Method::POST, join(&self.base_url, &[segment]))
            .header(IDEMPOTENCY_HEADER, idempotency_key)
            .json(&body);
        let Some(value) = self.send(call).await? else {
            return Err(self.not_found(&format!("create endpoint /{segment}")));
        };
        self.record(value)
    }

    async fn find_created(
        &self,
        entity_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        let segment = self.segment(entity_type, "find_created")?;
        let page = self
            .list_page(segment, &[("idempotency_key", idempotency_key.to_owned())])
            .await?;
        if page.items.len() > 1 {
            return Err(self.malformed(
                "the idempotency_key lookup returned several records (is the filter implemented?)",
            ));
        }
        page.items
            .into_iter()
            .next()
            .map(|v| self.record(v))
            .transpose()
    }

    async fn update(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        self.patch(entity_type, id, changed, None).await
    }

    fn conditional_writes(&self, _entity_type: &str) -> ConditionalWrites {
        self.conditional
    }

    async fn update_if_unchanged(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
        seen: DateTime<Utc>,
    ) -> Result<Record, ConnectorError> {
        if self.conditional == ConditionalWrites::No {
            return Err(ConnectorError::no_conditional_update(
                self.system,
                entity_type,
            ));
        }
        self.patch(entity_type, id, changed, Some(seen)).await
    }

    async fn list_changed(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let segment = self.segment(entity_type, "list_changed")?;
        let mut state: Cursor = match cursor {
            None => Cursor::default(),
            Some(text) => serde_json::from_str(text).map_err(|_| ConnectorError::Rejected {
                system: self.system,
                status: 400,
                message: "the poll cursor was not written by this connector".to_owned(),
            })?,
        };
        let mut query = Vec::new();
        if let Some(after) = state.after {
            // One microsecond early: re-read records that share the watermark's instant.
            query.push((
                "updated_after",
                rfc3339(after - chrono::Duration::microseconds(1)),
            ));
        }
        if let Some(page) = &state.page {
            query.push(("cursor", page.clone()));
        }
        let body = self.list_page(segment, &query).await?;
        let mut records = Vec::with_capacity(body.items.len());
        for item in body.items {
            let record = self.record(item)?;
            let Some(at) = record.updated_at else {
                return Err(self.malformed("a listed record has no `updated_at`"));
            };
            if Some(at) == state.after && state.seen.contains(&record.id) {
                continue;
            }
            match state.pass_max {
                Some(max) if at < max => {}
                Some(max) if at == max => state.pass_seen.push(record.id.clone()),
                _ => {
                    state.pass_max = Some(at);
                    state.pass_seen = vec![record.id.clone()];
                }
            }
            records.push(record);
        }
        let has_more = body.next_cursor.is_some();
        if has_more {
            state.page = body.next_cursor;
        } else {
            // The pass is finished: move the watermark to the newest record delivered.
            state.page = None;
            match (state.pass_max.take(), state.after) {
                (Some(max), Some(after)) if max == after => {
                    state.seen.append(&mut state.pass_seen);
                }
                (Some(max), after) if after.is_none_or(|a| max > a) => {
                    state.after = Some(max);
                    state.seen = std::mem::take(&mut state.pass_seen);
                }
                _ => state.pass_seen.clear(),
            }
        }
        let next_cursor = serde_json::to_string(&state).expect("a cursor serialises");
        Ok(ChangePage {
            records,
            next_cursor: Some(next_cursor),
            has_more,
        })
    }

    /// The contract has no field filters, so this scans the list endpoint and compares locally.
    /// Custom systems are the customer's own and small; the scan is bounded by their size.
    async fn find_by(
        &self,
        entity_type: &str,
        criteria: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError> {
        let segment = self.segment(entity_type, "find_by")?;
        let mut found = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let query: Vec<(&str, String)> = page.iter().map(|c| ("cursor", c.clone())).collect();
            let body = self.list_page(segment, &query).await?;
            for item in body.items {
                let record = self.record(item)?;
                if criteria
                    .iter()
                    .all(|(path, want)| get_path(&record.fields, path) == Some(want))
                {
                    found.push(record);
                }
            }
            match body.next_cursor {
                Some(next) => page = Some(next),
                None => return Ok(found),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_per_system() {
        assert_eq!(
            path_segment(SystemId::CustomErp, "Contact"),
            Some("contact")
        );
        assert_eq!(path_segment(SystemId::CustomPms, "Contact"), None);
        assert_eq!(
            path_segment(SystemId::CustomPms, "Project"),
            Some("project")
        );
        assert_eq!(path_segment(SystemId::Zendesk, "Customer"), None);
    }

    #[test]
    fn join_encodes_ids_and_keeps_base_path() {
        let base = url::Url::parse("http://h/api/").unwrap();
        assert_eq!(
            join(&base, &["customer", "a/b c"]).as_str(),
            "http://h/api/customer/a%2Fb%20c"
        );
        let base = url::Url::parse("http://h/api").unwrap();
        assert_eq!(join(&base, &["customer"]).as_str(), "http://h/api/customer");
    }
}
