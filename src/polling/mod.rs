//! Polling for systems and entity types that send no webhooks (PowerOffice, CRMOffice, Exact types
//! without a topic, custom systems' reconciliation): generic over any [`Connector`].
//!
//! Owns: the `poll_cursors` table. For each page that `list_changed` returns, one transaction
//! stores the page's records as `events`, enqueues their jobs with [`queue::enqueue`], and moves
//! the cursor; so a crash keeps either the page and the new cursor or neither (nothing missed,
//! nothing doubled). The cursor row is taken with `FOR UPDATE SKIP LOCKED` for the page, so only
//! one replica polls a given (system, type) at a time; the others skip their round.
//!
//! Unchanged records are never re-emitted: an event's `delivery_id` is a hash of system, type, id
//! and the record's `updated_at` (or, for records without one, of its fields), and the events
//! table is unique on it. A record a connector returns again (an overlap re-read at a page
//! boundary) is stored once.
//!
//! May call: `connectors` (through the trait), `queue::enqueue`, `db`.

pub mod connections;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::connectors::{Connector, ConnectorError, Record, DELETIONS};
use crate::domain::{Action, ChangeEvent, RecordKey, SystemId};
use crate::queue::{self, NewJob};

/// Pages one round may commit before yielding until the next interval: a connector that keeps
/// saying "more" (a vendor bug, or a huge backlog) cannot pin a poller and its connection forever;
/// the stored cursor resumes it next round.
pub const MAX_PAGES_PER_ROUND: u32 = 1000;

/// Why a type is read on an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollKind {
    /// The system sends no webhooks for the type: polling is how its changes arrive.
    Poll,
    /// Reconciliation of a webhook-driven type (`reconcile_interval`): finds the changes whose
    /// webhook never arrived. Its first round comes one interval after start, so a start does
    /// not spend the vendor's export budget at once; its cursor is durable, so a change made
    /// while Tether was down is still found within one interval of the restart.
    Reconcile,
}

impl PollKind {
    /// Where the jobs of the changes found rank in the queue.
    pub fn priority(self) -> queue::JobPriority {
        match self {
            PollKind::Poll => queue::JobPriority::Live,
            PollKind::Reconcile => queue::JobPriority::Reconcile,
        }
    }
}

/// One thing to poll: a connector, one of its entity types, and how often.
#[derive(Clone)]
pub struct PollerSpec {
    pub connector: Arc<dyn Connector>,
    /// The registry's name for the type (`Customers`, `Contacts`, ...).
    pub entity_type: String,
    pub interval: Duration,
    pub kind: PollKind,
}

impl std::fmt::Debug for PollerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollerSpec")
            .field("system", &self.connector.system())
            .field("entity_type", &self.entity_type)
            .field("interval", &self.interval)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Why a poll stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("poll cursor storage failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// What one [`poll_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Another replica holds the cursor: this round was skipped.
    pub busy: bool,
    /// Pages committed.
    pub pages: u32,
    /// Records the connector returned.
    pub records: u64,
    /// Events stored and enqueued (records not seen before in this state).
    pub emitted: u64,
}

/// The deduplication key of a polled record: stable while the record is unchanged.
pub fn delivery_id(system: SystemId, entity_type: &str, record: &Record) -> String {
    let mut hash = Sha256::new();
    for part in [system.as_str(), entity_type, record.id.as_str()] {
        hash.update(part.len().to_le_bytes());
        hash.update(part.as_bytes());
    }
    match record.updated_at {
        Some(at) => {
            hash.update(b"t");
            hash.update(at.timestamp_micros().to_le_bytes());
        }
        None => {
            hash.update(b"f");
            let mut canonical = String::new();
            write_canonical(&Value::Object(record.fields.clone()), &mut canonical);
            hash.update(canonical.as_bytes());
        }
    }
    format!("poll:{}", hex::encode(hash.finalize()))
}

/// JSON with object keys sorted at every level, so equal content always hashes equally
/// whatever map ordering serde_json was built with.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// One page read from a connector, as the events it stands for.
struct FoundPage {
    events: Vec<ChangeEvent>,
    next_cursor: Option<String>,
    has_more: bool,
}

/// Reads the next page of the spec's type: changed records, or (for [`DELETIONS`]) the
/// vendor's stream of deletions.
async fn read_page(spec: &PollerSpec, cursor: Option<&str>) -> Result<FoundPage, ConnectorError> {
    let system = spec.connector.system();
    if spec.entity_type == DELETIONS {
        let page = spec.connector.list_deleted(cursor).await?;
        let events = page
            .deletions
            .into_iter()
            .map(|deletion| ChangeEvent {
                delivery_id: deletion_id(system, &deletion.entity_type, &deletion.id),
                record: RecordKey {
                    system,
                    entity_type: deletion.entity_type,
                    record_id: deletion.id,
                },
                action: Action::Deleted,
                occurred_at: deletion.deleted_at,
            })
            .collect();
        return Ok(FoundPage {
            events,
            next_cursor: page.next_cursor,
            has_more: page.has_more,
        });
    }
    let page = spec
        .connector
        .list_changed(&spec.entity_type, cursor)
        .await?;
    let events = page
        .records
        .iter()
        .map(|record| ChangeEvent {
            record: RecordKey {
                system,
                entity_type: spec.entity_type.clone(),
                record_id: record.id.clone(),
            },
            // A poll cannot tell a create from an update; the sync engine fetches and decides.
            action: Action::Updated,
            occurred_at: record.updated_at,
            delivery_id: delivery_id(system, &spec.entity_type, record),
        })
        .collect();
    Ok(FoundPage {
        events,
        next_cursor: page.next_cursor,
        has_more: page.has_more,
    })
}

/// The deduplication key of a reported deletion: a record is deleted once.
fn deletion_id(system: SystemId, entity_type: &str, id: &str) -> String {
    let mut hash = Sha256::new();
    for part in [system.as_str(), entity_type, id] {
        hash.update(part.len().to_le_bytes());
        hash.update(part.as_bytes());
    }
    format!("poll-deleted:{}", hex::encode(hash.finalize()))
}

/// Polls one (system, type) until the connector says it is caught up (or [`MAX_PAGES_PER_ROUND`]),
/// one transaction per page.
/// Returns `busy` at once if another replica holds the cursor.
#[tracing::instrument(skip_all, fields(system = %spec.connector.system(), entity_type = %spec.entity_type))]
pub async fn poll_once(pool: &PgPool, spec: &PollerSpec) -> Result<PollReport, PollError> {
    let system = spec.connector.system();
    ensure_cursor(pool, spec).await?;

    let mut report = PollReport::default();
    loop {
        let mut tx = pool.begin().await?;
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT cursor FROM poll_cursors WHERE system = $1 AND entity_type = $2 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(system.as_str())
        .bind(&spec.entity_type)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((cursor,)) = row else {
            report.busy = report.pages == 0;
            return Ok(report);
        };
        // The row stays locked while the vendor is asked: the call is bounded by the outbound
        // timeout, and no other replica may poll the same cursor meanwhile.
        let page = match read_page(spec, cursor.as_deref()).await {
            Ok(page) => page,
            Err(error) => {
                drop(tx);
                record_error(pool, system, &spec.entity_type, &error).await;
                return Err(error.into());
            }
        };
        report.pages += 1;
        report.records += page.events.len() as u64;
        let events = page.events;
        let found = store_page(&mut tx, spec, &events).await?;
        report.emitted += found;

        // newest_change_at: the age of the newest change passed is `tether_poll_lag_seconds`.
        sqlx::query(
            "UPDATE poll_cursors SET cursor = COALESCE($3, cursor), polled_at = now(), last_error = NULL, \
             newest_change_at = GREATEST(newest_change_at, $4) \
             WHERE system = $1 AND entity_type = $2",
        )
        .bind(system.as_str())
        .bind(&spec.entity_type)
        .bind(page.next_cursor.as_deref())
        .bind(events.iter().filter_map(|e| e.occurred_at).max())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::ops::metrics::poll_changes(system, &spec.entity_type, found);

        if !page.has_more || report.pages >= MAX_PAGES_PER_ROUND {
            return Ok(report);
        }
    }
}

/// Stores one page's events (a change already stored, by its delivery id, is skipped) and
/// enqueues a job per new one, in the page's transaction; returns how many were enqueued.
async fn store_page(
    tx: &mut sqlx::PgConnection,
    spec: &PollerSpec,
    events: &[ChangeEvent],
) -> Result<u64, sqlx::Error> {
    let system = spec.connector.system();
    let mut stored: Vec<(i64, &ChangeEvent)> = Vec::new();
    for event in events {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (system, entity_type, record_id, action, occurred_at, delivery_id) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (system, delivery_id) DO NOTHING RETURNING id",
        )
        .bind(system.as_str())
        .bind(&event.record.entity_type)
        .bind(&event.record.record_id)
        .bind(event.action.as_str())
        .bind(event.occurred_at)
        .bind(&event.delivery_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = id {
            stored.push((id, event));
        }
    }
    let jobs: Vec<NewJob<'_>> = stored
        .iter()
        .map(|(event_id, event)| NewJob {
            event_id: *event_id,
            event,
        })
        .collect();
    // The one place polled and reconciled changes are enqueued: a change found by
    // reconciliation ranks below live work and above backfill (docs/queue.md, "Priorities").
    queue::enqueue_with_priority(tx, &jobs, spec.kind.priority()).await?;
    Ok(jobs.len() as u64)
}

/// Creates the cursor row on the first round. A system with a recorded first connection starts
/// at that moment, in the connector's own cursor form, so its past is not read as new changes
/// (loading the past is the backfill's job). Without one (a poll run outside `serve`), the
/// cursor starts empty: from the beginning.
async fn ensure_cursor(pool: &PgPool, spec: &PollerSpec) -> Result<(), PollError> {
    let system = spec.connector.system();
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM poll_cursors WHERE system = $1 AND entity_type = $2")
            .bind(system.as_str())
            .bind(&spec.entity_type)
            .fetch_optional(pool)
            .await?;
    if exists.is_some() {
        return Ok(());
    }
    let start = match connections::first_connected_at(pool, system).await? {
        Some(at) => spec.connector.start_cursor(&spec.entity_type, at),
        None => None,
    };
    sqlx::query(
        "INSERT INTO poll_cursors (system, entity_type, cursor) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(system.as_str())
    .bind(&spec.entity_type)
    .bind(start)
    .execute(pool)
    .await?;
    Ok(())
}

async fn record_error(pool: &PgPool, system: SystemId, entity_type: &str, error: &ConnectorError) {
    let result = sqlx::query(
        "UPDATE poll_cursors SET last_error = $3 WHERE system = $1 AND entity_type = $2",
    )
    .bind(system.as_str())
    .bind(entity_type)
    .bind(error.to_string())
    .execute(pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(error.cause_chain = ?e, "could not record the poll error");
    }
}

/// The stored cursor of a (system, type), for operators and tests.
pub async fn cursor(
    pool: &PgPool,
    system: SystemId,
    entity_type: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT cursor FROM poll_cursors WHERE system = $1 AND entity_type = $2")
            .bind(system.as_str())
            .bind(entity_type)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(c,)| c))
}

/// Starts one task per spec: poll, then wait `interval` (or the vendor's `Retry-After` after a
/// 429), until `shutdown` is cancelled. The returned handle finishes once every poller has
/// stopped. A poll in flight at shutdown is abandoned: its uncommitted page rolls back with its
/// transaction and is polled again from the stored cursor next time, so nothing is lost.
pub fn start_pollers(
    pool: PgPool,
    pollers: Vec<PollerSpec>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut set = tokio::task::JoinSet::new();
    for spec in pollers {
        let pool = pool.clone();
        let shutdown = shutdown.clone();
        set.spawn(async move { run_poller(pool, spec, shutdown).await });
    }
    tokio::spawn(async move { while set.join_next().await.is_some() {} })
}

async fn run_poller(pool: PgPool, spec: PollerSpec, shutdown: CancellationToken) {
    tracing::info!(system = %spec.connector.system(), entity_type = %spec.entity_type,
        interval = ?spec.interval, kind = ?spec.kind, "poller started");
    if spec.kind == PollKind::Reconcile {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(spec.interval) => {}
        }
    }
    loop {
        let wait = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = poll_once(&pool, &spec) => match result {
                Ok(report) => {
                    if report.emitted > 0 {
                        tracing::info!(system = %spec.connector.system(), entity_type = %spec.entity_type,
                            pages = report.pages, records = report.records, emitted = report.emitted, "polled");
                    }
                    spec.interval
                }
                Err(PollError::Connector(e)) if e.is_back_pressure() => {
                    tracing::info!(system = %spec.connector.system(), entity_type = %spec.entity_type,
                        error = %e, "poll deferred by back-pressure");
                    e.retry_after().unwrap_or(spec.interval).max(Duration::from_millis(100))
                }
                Err(e) => {
                    tracing::warn!(system = %spec.connector.system(), entity_type = %spec.entity_type,
                        error.cause_chain = ?e, "poll failed");
                    spec.interval
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(system = %spec.connector.system(), entity_type = %spec.entity_type, "poller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str, fields: Value, at: Option<&str>) -> Record {
        Record {
            id: id.to_owned(),
            updated_at: at.map(|t| t.parse().unwrap()),
            fields: fields.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn delivery_id_is_stable_and_tracks_changes() {
        let a = record("1", json!({"b": 1, "a": {"y": 2, "x": 1}}), None);
        let b = record("1", json!({"a": {"x": 1, "y": 2}, "b": 1}), None);
        let c = record("1", json!({"a": {"x": 1, "y": 3}, "b": 1}), None);
        let sys = SystemId::CrmOffice;
        assert_eq!(
            delivery_id(sys, "Contacts", &a),
            delivery_id(sys, "Contacts", &b)
        );
        assert_ne!(
            delivery_id(sys, "Contacts", &a),
            delivery_id(sys, "Contacts", &c)
        );
        assert_ne!(
            delivery_id(sys, "Contacts", &a),
            delivery_id(sys, "Activities", &a)
        );
        let t1 = record("1", json!({}), Some("2026-01-01T00:00:00Z"));
        let t2 = record("1", json!({"changed": true}), Some("2026-01-01T00:00:00Z"));
        let t3 = record("1", json!({}), Some("2026-01-01T00:00:01Z"));
        assert_eq!(
            delivery_id(sys, "Contacts", &t1),
            delivery_id(sys, "Contacts", &t2)
        );
        assert_ne!(
            delivery_id(sys, "Contacts", &t1),
            delivery_id(sys, "Contacts", &t3)
        );
    }
}
