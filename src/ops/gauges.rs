//! The gauges read from PostgreSQL at scrape time (and shown by the admin queue endpoint): queue
//! depth per state, the oldest due job, paused flows, poll lag.
//!
//! Every query reads only what a partial index covers (unfinished jobs, dead jobs) or a small
//! table (`flow_pauses`, `poll_cursors`): never the finished jobs kept for `workers.retention`.

use serde::Serialize;
use sqlx::PgPool;

/// The queue as an operator sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct QueueState {
    /// Waiting for their first run.
    pub ready: i64,
    /// Leased to a worker now.
    pub running: i64,
    /// Waiting to run again after a failure or a back-pressure deferral.
    pub retrying: i64,
    /// Dead letters.
    pub dead: i64,
    /// Age in seconds of the oldest job that is due and not claimed (0 when none).
    pub oldest_ready_seconds: f64,
    /// Dataflows paused by an operator.
    pub flows_paused: i64,
}

impl QueueState {
    /// `(state label, count)` for `tether_queue_jobs{state}`.
    pub fn by_state(&self) -> [(&'static str, i64); 4] {
        [
            ("ready", self.ready),
            ("running", self.running),
            ("retrying", self.retrying),
            ("dead", self.dead),
        ]
    }
}

pub async fn read(pool: &PgPool) -> Result<QueueState, sqlx::Error> {
    let (ready, running, retrying, oldest, dead, flows_paused): (i64, i64, i64, f64, i64, i64) =
        sqlx::query_as(
            r#"
        SELECT count(*) FILTER (WHERE state = 'ready' AND attempts = 0 AND deferrals = 0),
               count(*) FILTER (WHERE state = 'running'),
               count(*) FILTER (WHERE state = 'ready' AND (attempts > 0 OR deferrals > 0)),
               COALESCE(EXTRACT(EPOCH FROM now() - min(run_at)
                   FILTER (WHERE state = 'ready' AND run_at <= now())), 0)::float8,
               (SELECT count(*) FROM jobs WHERE state = 'dead'),
               (SELECT count(*) FROM flow_pauses)
        FROM jobs WHERE state IN ('ready', 'running')
        "#,
        )
        .fetch_one(pool)
        .await?;
    Ok(QueueState {
        ready,
        running,
        retrying,
        dead,
        oldest_ready_seconds: oldest,
        flows_paused,
    })
}

/// The lag of one poll cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct PollLag {
    /// `SystemId::as_str` of a cursor row (written only by the pollers).
    pub system: String,
    pub entity_type: String,
    pub seconds: f64,
}

/// Cursors that have passed at least one timestamped change.
pub async fn poll_lags(pool: &PgPool) -> Result<Vec<PollLag>, sqlx::Error> {
    let rows: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT system, entity_type, EXTRACT(EPOCH FROM now() - newest_change_at)::float8 \
         FROM poll_cursors WHERE newest_change_at IS NOT NULL ORDER BY system, entity_type",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(system, entity_type, seconds)| PollLag {
            system,
            entity_type,
            seconds: seconds.max(0.0),
        })
        .collect())
}
