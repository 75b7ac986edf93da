//! Pausing a dataflow: durable in PostgreSQL (`flow_pauses`), honoured by every worker, and
//! caught up on resume.
//!
//! While a flow is paused the sync engine records a `paused` decision for it (with the event) and
//! runs the event's other flows as usual. Resuming deletes the pause, waits until every worker has
//! seen that (each reads the pauses at most [`PAUSE_REFRESH`] before deciding), and then puts the
//! events that met the pause back in the queue, so nothing that happened meanwhile is lost. A
//! replayed event runs all its flows again; the others find nothing to do (echo and unchanged
//! detection), so the replay writes only what the paused flow missed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// How stale a worker's view of the pauses may be when it decides about an event.
pub const PAUSE_REFRESH: Duration = Duration::from_secs(1);

/// The `sync_log` decision a paused flow leaves: the name of `sync::Decision::Paused` (a test in src/sync/decision.rs checks they agree).
pub const PAUSED_DECISION: &str = "paused";

/// One paused flow.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Pause {
    pub flow_id: String,
    pub paused_at: DateTime<Utc>,
    pub reason: Option<String>,
}

/// Pauses `flow_id` (a no-op if it is paused already). Returns the pause as stored.
pub async fn pause(
    pool: &PgPool,
    flow_id: &str,
    reason: Option<&str>,
) -> Result<Pause, sqlx::Error> {
    let (paused_at, reason): (DateTime<Utc>, Option<String>) = sqlx::query_as(
        "INSERT INTO flow_pauses (flow_id, reason, log_from) \
         VALUES ($1, $2, (SELECT COALESCE(max(id), 0) FROM sync_log)) \
         ON CONFLICT (flow_id) DO UPDATE SET flow_id = EXCLUDED.flow_id \
         RETURNING paused_at, reason",
    )
    .bind(flow_id)
    .bind(reason)
    .fetch_one(pool)
    .await?;
    Ok(Pause {
        flow_id: flow_id.to_owned(),
        paused_at,
        reason,
    })
}

/// What a resume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Resumed {
    /// False when the flow was not paused (nothing was done).
    pub was_paused: bool,
    /// Events put back in the queue because they met the pause.
    pub events_replayed: u64,
}

/// Resumes `flow_id`: deletes the pause, waits `settle` (at least [`PAUSE_REFRESH`] plus a margin
/// in production, so no worker still decides with the old view), then re-enqueues every event
/// that left a `paused` entry for this flow since the pause began. Events already pruned
/// (older than `workers.retention`) cannot be replayed; reconciliation polls find those changes.
pub async fn resume(
    pool: &PgPool,
    flow_id: &str,
    settle: Duration,
) -> Result<Resumed, sqlx::Error> {
    let log_from: Option<i64> =
        sqlx::query_scalar("DELETE FROM flow_pauses WHERE flow_id = $1 RETURNING log_from")
            .bind(flow_id)
            .fetch_optional(pool)
            .await?;
    let Some(log_from) = log_from else {
        return Ok(Resumed {
            was_paused: false,
            events_replayed: 0,
        });
    };
    tokio::time::sleep(settle).await;
    let rows = crate::queue::insert_jobs_sql(
        "SELECT DISTINCT l.event_id, l.system || '/' || l.entity_type || '/' || l.record_id \
         AS record_key FROM sync_log l JOIN events e ON e.id = l.event_id \
         WHERE l.id > $1 AND l.flow_id = $2 AND l.decision = $3 ORDER BY 1",
    );
    let replayed = sqlx::query(&rows)
        .bind(log_from)
        .bind(flow_id)
        .bind(PAUSED_DECISION)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(Resumed {
        was_paused: true,
        events_replayed: replayed,
    })
}

/// Every paused flow, oldest pause first.
pub async fn list(pool: &PgPool) -> Result<Vec<Pause>, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>, Option<String>)> = sqlx::query_as(
        "SELECT flow_id, paused_at, reason FROM flow_pauses ORDER BY paused_at, flow_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(flow_id, paused_at, reason)| Pause {
            flow_id,
            paused_at,
            reason,
        })
        .collect())
}

/// A worker's view of the paused flows, read again when older than [`PAUSE_REFRESH`]: one small
/// query per second per process instead of one per job.
pub struct PausedFlows {
    pool: PgPool,
    cached: Mutex<Option<(Instant, Arc<BTreeSet<String>>)>>,
}

impl PausedFlows {
    pub fn new(pool: PgPool) -> PausedFlows {
        PausedFlows {
            pool,
            cached: Mutex::new(None),
        }
    }

    /// The paused flow ids, at most [`PAUSE_REFRESH`] old. A failed read keeps the last view
    /// (and the caller's job fails on the database anyway if it is down).
    pub async fn current(&self) -> Arc<BTreeSet<String>> {
        let stale = {
            let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            match &*cached {
                Some((at, set)) if at.elapsed() < PAUSE_REFRESH => return set.clone(),
                other => other.as_ref().map(|(_, set)| set.clone()),
            }
        };
        let read_at = Instant::now();
        match sqlx::query_scalar::<_, String>("SELECT flow_id FROM flow_pauses")
            .fetch_all(&self.pool)
            .await
        {
            Ok(ids) => {
                let set = Arc::new(ids.into_iter().collect::<BTreeSet<_>>());
                *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((read_at, set.clone()));
                set
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the paused dataflows; using the last view");
                stale.unwrap_or_default()
            }
        }
    }
}
