//! The guard's durable state: trips, held writes, and what a release or discard does with them
//! (docs/guard.md).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use super::PlannedWrite;
use crate::queue::ClaimedJob;

pub(super) async fn trip(
    tx: &mut PgConnection,
    flow_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO guard_trips (flow_id, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(flow_id)
        .bind(reason)
        .execute(tx)
        .await?;
    Ok(())
}

/// Stores each property of `write` as a held row, in order.
pub(super) async fn hold(
    tx: &mut PgConnection,
    flow_id: &str,
    job: &ClaimedJob,
    write: &PlannedWrite,
) -> Result<(), sqlx::Error> {
    let rec = &job.event.record;
    for item in &write.items {
        sqlx::query(
            "INSERT INTO guard_held (flow_id, event_id, event_system, event_type, \
             event_record_id, link_id, record, property, old, new, is_create) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(flow_id)
        .bind(job.event_id)
        .bind(rec.system.as_str())
        .bind(&rec.entity_type)
        .bind(&rec.record_id)
        .bind(write.link_id)
        .bind(&item.record)
        .bind(&item.property)
        .bind(&item.old)
        .bind(&item.new)
        .bind(write.is_create)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// One held write, as `tether guard list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct HeldWrite {
    /// `<system>/<type>/<id>` of the record the write is for (a create: its source record).
    pub record: String,
    pub property: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    /// The write would create the record's counterpart.
    pub create: bool,
    pub held_at: DateTime<Utc>,
}

/// A flow the guard paused, with what it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrippedFlow {
    pub flow: String,
    pub tripped_at: DateTime<Utc>,
    pub reason: String,
    pub held: Vec<HeldWrite>,
}

/// Every paused flow (or only `only`), oldest trip first, with its held writes in order.
pub async fn list(pool: &PgPool, only: Option<&str>) -> Result<Vec<TrippedFlow>, sqlx::Error> {
    let trips: Vec<(String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT flow_id, tripped_at, reason FROM guard_trips \
         WHERE $1::text IS NULL OR flow_id = $1 ORDER BY tripped_at, flow_id",
    )
    .bind(only)
    .fetch_all(pool)
    .await?;
    let mut flows = Vec::with_capacity(trips.len());
    for (flow, tripped_at, reason) in trips {
        let held = sqlx::query_as(
            "SELECT record, property, old, new, is_create AS create, held_at FROM guard_held \
             WHERE flow_id = $1 ORDER BY id",
        )
        .bind(&flow)
        .fetch_all(pool)
        .await?;
        flows.push(TrippedFlow {
            flow,
            tripped_at,
            reason,
            held,
        });
    }
    Ok(flows)
}

/// The flows the guard paused, for the console's banner and the metric.
pub async fn tripped_flows(pool: &PgPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT flow_id, reason FROM guard_trips ORDER BY tripped_at, flow_id")
        .fetch_all(pool)
        .await
}

/// What a release or discard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Settled {
    /// Held writes (one per property) released or discarded.
    pub writes: u64,
    /// Events put back in the queue (release) or records whose writes were dropped (discard).
    pub events: u64,
}

/// Why a release or discard did nothing.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("the dataflow {0} is not paused by the guard (see `tether guard list`)")]
    NotTripped(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Starts a release or discard: the flow's lock, and its trip removed (an error if none).
async fn settle_begin(
    pool: &PgPool,
    flow_id: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, SettleError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tether-guard:' || $1))")
        .bind(flow_id)
        .execute(&mut *tx)
        .await?;
    let removed = sqlx::query("DELETE FROM guard_trips WHERE flow_id = $1")
        .bind(flow_id)
        .execute(&mut *tx)
        .await?;
    if removed.rows_affected() == 0 {
        return Err(SettleError::NotTripped(flow_id.to_owned()));
    }
    // The flow runs again with a fresh window.
    sqlx::query(
        "WITH values_gone AS (DELETE FROM guard_values WHERE flow_id = $1) \
         DELETE FROM guard_writes WHERE flow_id = $1",
    )
    .bind(flow_id)
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// Ends a release or discard: the held rows go.
async fn settle_end(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    flow_id: &str,
    events: u64,
) -> Result<Settled, SettleError> {
    let writes = sqlx::query("DELETE FROM guard_held WHERE flow_id = $1")
        .bind(flow_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(Settled { writes, events })
}

/// `tether guard release`: the held events go back into the queue in the order their writes
/// were held, and are planned again against the records as they are then (so nothing stale is
/// written, and a record held twice is written once). Their writes are not held again.
pub async fn release(pool: &PgPool, flow_id: &str) -> Result<Settled, SettleError> {
    let mut tx = settle_begin(pool, flow_id).await?;
    sqlx::query(
        "WITH pruned AS (DELETE FROM guard_released WHERE released_at < now() - interval '1 day') \
         INSERT INTO guard_released (flow_id, event_id) \
         SELECT DISTINCT flow_id, event_id FROM guard_held WHERE flow_id = $1 \
         ON CONFLICT DO NOTHING",
    )
    .bind(flow_id)
    .execute(&mut *tx)
    .await?;
    let rows = crate::queue::insert_jobs_sql(
        "SELECT event_id, record_key FROM (SELECT event_id, \
         event_system || '/' || event_type || '/' || event_record_id AS record_key, \
         min(id) AS first FROM guard_held WHERE flow_id = $1 GROUP BY 1, 2) h ORDER BY first",
    );
    let events = sqlx::query(&rows)
        .bind(flow_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tracing::info!(flow = %flow_id, events, "guard released: held events queued again");
    settle_end(tx, flow_id, events).await
}

/// `tether guard discard`: the held writes are dropped, each recorded as a `discarded`
/// decision; the links' snapshots stay as they were, so a later real edit still syncs.
pub async fn discard(pool: &PgPool, flow_id: &str) -> Result<Settled, SettleError> {
    let mut tx = settle_begin(pool, flow_id).await?;
    let events = sqlx::query(
        "INSERT INTO sync_log (event_id, system, entity_type, record_id, flow_id, link_id, \
         decision, detail) \
         SELECT event_id, event_system, event_type, event_record_id, flow_id, link_id, \
         'discarded', format('held write discarded by the operator: %s %s %s -> %s', \
         record, property, coalesce(old::text, 'none'), coalesce(new::text, 'none')) \
         FROM guard_held WHERE flow_id = $1 ORDER BY id",
    )
    .bind(flow_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tracing::info!(flow = %flow_id, writes = events, "guard discarded the held writes");
    settle_end(tx, flow_id, events).await
}
