//! Clients of the six systems, behind one trait.
//!
//! Owns: outbound HTTP to vendor APIs (auth, paging, rate limits, timeouts) and the translation
//! between a vendor's JSON and a [`Record`] whose field names are the registry's property names
//! (for example PowerOffice v2's `ContactId` is presented as the seed's `partyId`).
//! May call: `db` (token storage, poll cursors). Must not call: `sync`, `queue`, `http`.

pub mod crmoffice;
pub mod custom;
pub mod exactonline;
pub mod memory;
pub mod poweroffice;
pub mod schema;
pub mod transport;
pub mod zendesk;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::SystemId;

/// A record as a connector presents it: the id, the vendor's last-change time if it has one, and
/// its fields under the registry's property names. Nested objects stay nested, so the path
/// `company.id` reads `fields["company"]["id"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub updated_at: Option<DateTime<Utc>>,
    pub fields: Map<String, Value>,
}

impl Record {
    /// The value at a dotted path (`company.id`), if present.
    pub fn get_path(&self, path: &str) -> Option<&Value> {
        get_path(&self.fields, path)
    }
}

/// Reads a dotted path (`company.id`) out of a JSON object.
pub fn get_path<'a>(fields: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = fields.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// Writes a dotted path (`company.id`) into a JSON object, creating the intermediate objects.
pub fn set_path(fields: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            fields.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let child = fields
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            if let Value::Object(map) = child {
                set_path(map, rest, value);
            }
        }
    }
}

/// One page of records changed since a cursor. The cursor is opaque to callers: each connector
/// decides what it holds (a timestamp plus the ids already seen at it, an OData skiptoken, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePage {
    pub records: Vec<Record>,
    /// Pass this back to continue. Store it only once the page's records are safely enqueued.
    pub next_cursor: Option<String>,
    /// More pages are ready now; `false` means the caller is caught up until the next poll.
    pub has_more: bool,
}

/// The entity type name of a system's stream of deletions (Exact's `sync/Deleted`, one stream
/// for all types): what [`Connector::list_deleted`] reads, under its own poll cursor.
pub const DELETIONS: &str = "sync/Deleted";

/// One record the vendor reports deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Deletion {
    /// The registry's name for the record's type.
    pub entity_type: String,
    pub id: String,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// One page of a deletion stream; the cursor works as [`ChangePage`]'s does.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletionPage {
    pub deletions: Vec<Deletion>,
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

/// How a system can refuse a write to a record that changed since a stamp Tether names
/// ([`Connector::update_if_unchanged`]; docs/sync-rules.md, "Conditional writes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConditionalWrites {
    /// It cannot: a write lands whatever happened to the record since it was read.
    #[default]
    No,
    /// It can, and its stamps tell every change apart (a custom system's `If-Match` on
    /// microseconds): a record Tether wrote last may be written on that write's stamp without
    /// being read first.
    Exact,
    /// It can, but its stamps are whole seconds (Zendesk tickets' `safe_update`): a change made
    /// in the same second as the stamp passes unseen, so only a stamp just read is named. That
    /// narrows the window between the read and the write to that second; it never replaces the read.
    AfterRead,
}

/// Why a call to a vendor failed, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The vendor asked us to slow down (429). Back-pressure: retry after the delay, not a failure.
    #[error("rate limited by {system}; retry after {retry_after:?}")]
    RateLimited {
        system: SystemId,
        retry_after: Option<Duration>,
    },
    /// The call did not complete in time. Back-pressure: retry later.
    #[error("call to {system} timed out")]
    Timeout { system: SystemId },
    /// A failure worth retrying (5xx, connection reset, malformed response).
    #[error("{system} failed transiently: {message}")]
    Transient { system: SystemId, message: String },
    /// The vendor refused the request as invalid (4xx other than 401/403/404/429). Retrying the same
    /// request will not help.
    #[error("{system} rejected the request ({status}): {message}")]
    Rejected {
        system: SystemId,
        status: u16,
        message: String,
    },
    /// Credentials are wrong, expired beyond refresh, or revoked: the operator must act. The system
    /// is stopped rather than retried in a storm.
    #[error("{system} refused our credentials: {message}")]
    Unauthorized { system: SystemId, message: String },
    /// The connector or the vendor cannot do this (for example, editing an immutable comment).
    #[error("{system} does not support {operation} on {entity_type}")]
    Unsupported {
        system: SystemId,
        entity_type: String,
        operation: &'static str,
    },
    /// The record refuses this change for good because of its state: a closed Zendesk ticket
    /// (docs/vendors.md, Zendesk "Closed tickets refuse updates"). Not an error of the request
    /// and never worth a retry; the caller records the decision and moves on.
    #[error("{system} {entity_type} {id} is closed and refuses the change")]
    TargetClosed {
        system: SystemId,
        entity_type: String,
        id: String,
    },
    /// The system has no configuration section: its dataflows are idle.
    #[error("{system} is not configured")]
    NotConfigured { system: SystemId },
    /// A conditional write ([`Connector::update_if_unchanged`]) found the record changed since
    /// the stamp it named (412): nothing was written. The caller reads the record again.
    #[error("{system} {entity_type} {id} changed since it was last seen; nothing was written")]
    Changed {
        system: SystemId,
        entity_type: String,
        id: String,
    },
}

impl ConnectorError {
    /// A conditional update asked of a type [`Connector::conditional_writes`] offers none for.
    pub fn no_conditional_update(system: SystemId, entity_type: &str) -> ConnectorError {
        ConnectorError::Unsupported {
            system,
            entity_type: entity_type.to_owned(),
            operation: "a conditional update",
        }
    }

    /// Back-pressure errors reschedule a job without using up an attempt.
    pub fn is_back_pressure(&self) -> bool {
        matches!(
            self,
            ConnectorError::RateLimited { .. } | ConnectorError::Timeout { .. }
        )
    }

    /// The delay the vendor asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The one interface every system's client implements.
///
/// `entity_type` is the registry's name for the type (`Organizations`, `Accounts`, `Customer`).
/// Field maps use the registry's property names and may be nested (`company.id`).
/// Reads [`fetch_each`] has in flight at once.
const FETCHES_AT_ONCE: usize = 8;

/// The default of [`Connector::fetch_many`]: one [`Connector::fetch`] per id,
/// [`FETCHES_AT_ONCE`] at a time.
pub async fn fetch_each<C: Connector + ?Sized>(
    conn: &C,
    entity_type: &str,
    ids: &[String],
) -> Result<Vec<Record>, ConnectorError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(FETCHES_AT_ONCE) {
        let found =
            futures::future::try_join_all(chunk.iter().map(|id| conn.fetch(entity_type, id)))
                .await?;
        out.extend(found.into_iter().flatten());
    }
    Ok(out)
}

#[async_trait]
pub trait Connector: Send + Sync + 'static {
    fn system(&self) -> SystemId;

    /// Whether this system's delete notifications are final, so the engine ends a record's links
    /// on one without reading the record first (a deleted record cannot come back, and reading
    /// it would only cost a call, or, where the vendor counts 404s, an error: Exact Online,
    /// docs/vendors.md item 3).
    fn deletes_are_final(&self) -> bool {
        false
    }

    /// The record's current state, or `None` if it does not exist (any more).
    async fn fetch(&self, entity_type: &str, id: &str) -> Result<Option<Record>, ConnectorError>;

    /// The current state of the records with these ids, in no particular order; a record that
    /// does not exist (any more) is absent. A backfill page reads its records this way
    /// (docs/backfill.md, "Running a plan"). By default one [`Connector::fetch`] each, a few at
    /// once; a vendor with a call reading many records by id overrides it.
    async fn fetch_many(
        &self,
        entity_type: &str,
        ids: &[String],
    ) -> Result<Vec<Record>, ConnectorError> {
        fetch_each(self, entity_type, ids).await
    }

    /// Creates a record. `idempotency_key` is stable across retries of the same intended create:
    /// the connector sends it the way the vendor supports (`external_id`, `Idempotency-Key`, an
    /// external reference field) so that [`Connector::find_created`] can find the record later.
    async fn create(
        &self,
        entity_type: &str,
        fields: &Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<Record, ConnectorError>;

    /// Finds the record an earlier [`Connector::create`] with this key made, if it made one.
    /// Returns `Unsupported` where the vendor keeps no trace of the key; callers then fall back
    /// to merge criteria.
    async fn find_created(
        &self,
        entity_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Record>, ConnectorError>;

    /// Writes only the given (changed) fields and returns the record as stored.
    async fn update(
        &self,
        entity_type: &str,
        id: &str,
        changed: &Map<String, Value>,
    ) -> Result<Record, ConnectorError>;

    /// Whether and how [`Connector::update_if_unchanged`] is offered for the type: the system
    /// refuses a write whose record changed since a given stamp (docs/sync-rules.md,
    /// "Conditional writes").
    fn conditional_writes(&self, _entity_type: &str) -> ConditionalWrites {
        ConditionalWrites::No
    }

    /// [`Connector::update`], made only if the record's change stamp is still `seen`; otherwise
    /// nothing is written and the answer is [`ConnectorError::Changed`]. Only called where
    /// [`Connector::conditional_writes`] offers it.
    async fn update_if_unchanged(
        &self,
        entity_type: &str,
        _id: &str,
        _changed: &Map<String, Value>,
        _seen: DateTime<Utc>,
    ) -> Result<Record, ConnectorError> {
        Err(ConnectorError::no_conditional_update(
            self.system(),
            entity_type,
        ))
    }

    /// Records changed after the cursor (`None`: from the beginning), one page at a time.
    async fn list_changed(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError>;

    /// Every record of the type, one page at a time from `None` (the backfill's reading,
    /// docs/backfill.md). The same as [`Connector::list_changed`] from the beginning, except
    /// where a vendor's change feed cannot list everything at once: Zendesk's time-based
    /// organization export holds back the newest minute and allows 10 calls a minute, so its
    /// cursor-paginated list is read instead.
    async fn list_existing(
        &self,
        entity_type: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        self.list_changed(entity_type, cursor).await
    }

    /// Records deleted after the cursor, for a vendor with a stream of deletions (read as the
    /// type [`DELETIONS`]); `Unsupported` elsewhere, where deletes arrive by webhook or in the
    /// change lists themselves.
    async fn list_deleted(&self, cursor: Option<&str>) -> Result<DeletionPage, ConnectorError> {
        let _ = cursor;
        Err(ConnectorError::Unsupported {
            system: self.system(),
            entity_type: DELETIONS.to_owned(),
            operation: "list_deleted",
        })
    }

    /// A [`Connector::list_changed`] cursor meaning "changes at or after `at`", in the vendor's
    /// own cursor form: where polling and reconciliation of a system start when it is first
    /// connected, so its past is not read as new changes. `None`: this connector cannot start
    /// at a time and reads from the beginning.
    fn start_cursor(&self, entity_type: &str, at: DateTime<Utc>) -> Option<String> {
        let _ = (entity_type, at);
        None
    }

    /// Records whose fields equal all the given values (merge criteria), for linking records that
    /// already exist on both sides.
    async fn find_by(
        &self,
        entity_type: &str,
        criteria: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_paths_read_and_write() {
        let mut fields = Map::new();
        set_path(&mut fields, "company.id", json!("42"));
        set_path(&mut fields, "subject", json!("Hi"));
        assert_eq!(get_path(&fields, "company.id"), Some(&json!("42")));
        assert_eq!(get_path(&fields, "subject"), Some(&json!("Hi")));
        assert_eq!(get_path(&fields, "company.name"), None);
        assert_eq!(get_path(&fields, "subject.x"), None);
    }
}
