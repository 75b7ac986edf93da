//! The SQL of the `jobs` table: claim, finish, extend, release, counts, pruning, dead letters.
//!
//! Every statement here runs in its own short transaction; no job runs inside one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::ClaimedJob;
use crate::domain::{ChangeEvent, RecordKey};

/// The channel the `jobs_notify` trigger notifies.
pub const CHANNEL: &str = "tether_jobs";

/// One lease on one job: `(job_id, claims)` names it; `attempts` and `deferrals` are the values
/// at claim time, used to decide what a failure leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: i64,
    pub claims: i32,
    pub attempts: i32,
    pub deferrals: i32,
}

/// A claimed job and its lease.
#[derive(Debug, Clone)]
pub struct Claim {
    pub job: ClaimedJob,
    pub lease: Lease,
}

/// A claimed row whose event could not be read back (an unknown system or action): it can never
/// run, so the claimer dead-letters it at once.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub lease: Lease,
    pub error: String,
}

/// Claims up to `limit` jobs for `owner` with a lease of `lease`.
///
/// The CTE selects candidates `FOR UPDATE SKIP LOCKED` with a LIMIT and the UPDATE touches only
/// those (without the CTE the planner may update more rows than the limit). A candidate is a ready
/// job that is due, or a running job whose lease expired (its worker died), and only if no other
/// unfinished job of the same record key is running or older: so one key's jobs run one at a time
/// and in id order, while other keys run in parallel. The check reads this statement's snapshot:
/// a job seen unfinished blocks its successors, and a job only leaves `ready`/`running` by being
/// finished, so a successor is never claimed early.
pub async fn claim(
    pool: &PgPool,
    owner: Uuid,
    limit: usize,
    lease: Duration,
) -> Result<(Vec<Claim>, Vec<Unreadable>), sqlx::Error> {
    let rows = sqlx::query(
        r#"
        WITH candidates AS (
            SELECT j.id
            FROM jobs j
            WHERE j.state IN ('ready', 'running')
              AND ((j.state = 'ready' AND j.run_at <= now())
                   OR (j.state = 'running' AND j.lease_until < now()))
              AND NOT EXISTS (
                  SELECT 1 FROM jobs o
                  WHERE o.record_key = j.record_key
                    AND o.state IN ('ready', 'running')
                    AND o.id <> j.id
                    AND (o.state = 'running' OR o.id < j.id))
            ORDER BY j.id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE jobs j
            SET state = 'running',
                lease_owner = $2,
                lease_until = now() + $3 * interval '1 millisecond',
                attempts = j.attempts + 1,
                claims = j.claims + 1
            FROM candidates c
            WHERE j.id = c.id
            RETURNING j.id, j.event_id, j.attempts, j.deferrals, j.claims
        )
        SELECT c.id, c.event_id, c.attempts, c.deferrals, c.claims,
               e.system, e.entity_type, e.record_id, e.action, e.occurred_at, e.delivery_id
        FROM claimed c JOIN events e ON e.id = c.event_id
        ORDER BY c.id
        "#,
    )
    .bind(limit as i64)
    .bind(owner)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;

    let mut claims = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        let lease = Lease {
            job_id: row.try_get("id")?,
            claims: row.try_get("claims")?,
            attempts: row.try_get("attempts")?,
            deferrals: row.try_get("deferrals")?,
        };
        let event_id: i64 = row.try_get("event_id")?;
        let system: String = row.try_get("system")?;
        let action: String = row.try_get("action")?;
        let parsed = system
            .parse()
            .map_err(|e: crate::domain::UnknownSystem| e.to_string())
            .and_then(|system| action.parse().map(|action| (system, action)));
        match parsed {
            Ok((system, action)) => claims.push(Claim {
                job: ClaimedJob {
                    job_id: lease.job_id,
                    event_id,
                    event: ChangeEvent {
                        record: RecordKey {
                            system,
                            entity_type: row.try_get("entity_type")?,
                            record_id: row.try_get("record_id")?,
                        },
                        action,
                        occurred_at: row.try_get::<Option<DateTime<Utc>>, _>("occurred_at")?,
                        delivery_id: row.try_get("delivery_id")?,
                    },
                    attempt: lease.attempts,
                },
                lease,
            }),
            Err(error) => unreadable.push(Unreadable {
                lease,
                error: format!("event {event_id} cannot be read: {error}"),
            }),
        }
    }
    Ok((claims, unreadable))
}

/// What a finished run turns into, decided in Rust from the outcome and the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub lease: Lease,
    pub state: &'static str,
    /// For `ready`: run again after this long.
    pub delay: Duration,
    /// Added to `attempts` (-1 gives back the attempt the claim took).
    pub attempt_delta: i32,
    pub deferral_delta: i32,
    pub error: Option<String>,
}

/// Applies transitions in one statement, each only where `owner` still holds that exact lease.
/// Returns the ids that were applied (the others were taken over after their lease expired).
pub async fn finish(
    pool: &PgPool,
    owner: Uuid,
    transitions: &[Transition],
) -> Result<Vec<i64>, sqlx::Error> {
    if transitions.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = transitions.iter().map(|t| t.lease.job_id).collect();
    let claims: Vec<i32> = transitions.iter().map(|t| t.lease.claims).collect();
    let states: Vec<&str> = transitions.iter().map(|t| t.state).collect();
    let delays: Vec<i64> = transitions
        .iter()
        .map(|t| t.delay.as_millis() as i64)
        .collect();
    let attempt_deltas: Vec<i32> = transitions.iter().map(|t| t.attempt_delta).collect();
    let deferral_deltas: Vec<i32> = transitions.iter().map(|t| t.deferral_delta).collect();
    let errors: Vec<Option<String>> = transitions.iter().map(|t| t.error.clone()).collect();
    sqlx::query_scalar(
        r#"
        WITH u AS (
            SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::bigint[], $5::int[],
                                 $6::int[], $7::text[])
                AS u(id, claims, state, delay_ms, attempt_delta, deferral_delta, error)
        ), locked AS (
            -- Rows are locked in id order, as the claim and the lease extension lock them:
            -- a multi-row UPDATE alone locks in join order, and two such statements of one
            -- process (finishing and extending) deadlocked.
            SELECT j.id FROM jobs j JOIN u ON u.id = j.id
            WHERE j.claims = u.claims AND j.lease_owner = $8 AND j.state = 'running'
            ORDER BY j.id
            FOR UPDATE OF j
        )
        UPDATE jobs j
        SET state = u.state,
            run_at = CASE WHEN u.state = 'ready'
                          THEN now() + u.delay_ms * interval '1 millisecond'
                          ELSE j.run_at END,
            attempts = j.attempts + u.attempt_delta,
            deferrals = j.deferrals + u.deferral_delta,
            last_error = COALESCE(u.error, j.last_error),
            finished_at = CASE WHEN u.state IN ('done', 'dead') THEN now() END,
            lease_owner = NULL,
            lease_until = NULL
        FROM locked l JOIN u ON u.id = l.id
        WHERE j.id = l.id AND j.claims = u.claims AND j.lease_owner = $8
          AND j.state = 'running'
        RETURNING j.id
        "#,
    )
    .bind(&ids)
    .bind(&claims)
    .bind(&states)
    .bind(&delays)
    .bind(&attempt_deltas)
    .bind(&deferral_deltas)
    .bind(&errors)
    .bind(owner)
    .fetch_all(pool)
    .await
}

/// Extends the leases `owner` still holds to `lease` from now. Returns the ids extended.
pub async fn extend(
    pool: &PgPool,
    owner: Uuid,
    leases: &[Lease],
    lease: Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = leases.iter().map(|l| l.job_id).collect();
    let claims: Vec<i32> = leases.iter().map(|l| l.claims).collect();
    sqlx::query_scalar(
        r#"
        WITH locked AS (
            -- In id order, like every multi-row lock of this table (see `finish`).
            SELECT j.id FROM jobs j JOIN UNNEST($1::bigint[], $2::int[]) AS u(id, claims)
                 ON u.id = j.id
            WHERE j.claims = u.claims AND j.lease_owner = $4 AND j.state = 'running'
            ORDER BY j.id
            FOR UPDATE OF j
        )
        UPDATE jobs j SET lease_until = now() + $3 * interval '1 millisecond'
        FROM locked l
        WHERE j.id = l.id AND j.lease_owner = $4 AND j.state = 'running'
        RETURNING j.id
        "#,
    )
    .bind(&ids)
    .bind(&claims)
    .bind(lease.as_millis() as i64)
    .bind(owner)
    .fetch_all(pool)
    .await
}

/// Gives leases back unrun (shutdown): the jobs are ready again at once and the claim's attempt
/// is returned. Returns how many were released.
pub async fn release(pool: &PgPool, owner: Uuid, leases: &[Lease]) -> Result<u64, sqlx::Error> {
    if leases.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = leases.iter().map(|l| l.job_id).collect();
    let claims: Vec<i32> = leases.iter().map(|l| l.claims).collect();
    let done = sqlx::query(
        r#"
        WITH locked AS (
            -- In id order, like every multi-row lock of this table (see `finish`).
            SELECT j.id, u.claims FROM jobs j
                 JOIN UNNEST($1::bigint[], $2::int[]) AS u(id, claims) ON u.id = j.id
            WHERE j.claims = u.claims AND j.lease_owner = $3 AND j.state = 'running'
            ORDER BY j.id
            FOR UPDATE OF j
        )
        UPDATE jobs j
        SET state = 'ready', run_at = now(), attempts = greatest(j.attempts - 1, 0),
            lease_owner = NULL, lease_until = NULL
        FROM locked l
        WHERE j.id = l.id AND j.claims = l.claims AND j.lease_owner = $3
          AND j.state = 'running'
        "#,
    )
    .bind(&ids)
    .bind(&claims)
    .bind(owner)
    .execute(pool)
    .await?;
    // Other workers may be idle waiting; the released jobs are due now.
    notify(pool).await?;
    Ok(done.rows_affected())
}

/// Wakes idle workers (after making jobs due by other means than an INSERT).
pub async fn notify(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(pool)
        .await?;
    Ok(())
}

/// Jobs per queue state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for their first run.
    pub ready: i64,
    /// Leased to a worker.
    pub running: i64,
    /// Waiting to run again after a failure or a back-pressure deferral.
    pub retrying: i64,
    /// Dead letters.
    pub dead: i64,
    /// Finished and not yet pruned.
    pub done: i64,
}

/// Counts jobs per state.
pub async fn counts(pool: &PgPool) -> Result<QueueCounts, sqlx::Error> {
    let row = sqlx::query(
        r#"
        SELECT count(*) FILTER (WHERE state = 'ready' AND attempts = 0 AND deferrals = 0) AS ready,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) FILTER (WHERE state = 'ready' AND (attempts > 0 OR deferrals > 0))
                   AS retrying,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               count(*) FILTER (WHERE state = 'done') AS done
        FROM jobs
        "#,
    )
    .fetch_one(pool)
    .await?;
    Ok(QueueCounts {
        ready: row.try_get("ready")?,
        running: row.try_get("running")?,
        retrying: row.try_get("retrying")?,
        dead: row.try_get("dead")?,
        done: row.try_get("done")?,
    })
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub events: u64,
}

/// Deletes finished jobs older than `retention`, then events older than `retention` that no live
/// (ready, running or dead) job needs, `batch` rows per statement so no statement holds many
/// locks or runs long. Events are the deduplication window, so they go by age too.
///
/// One pruner at a time across all processes (a transaction-level advisory lock; a process that
/// does not get it skips the round): two pruners would delete the same rows from both ends (jobs
/// directly, and jobs through the events' cascade) and deadlock.
pub async fn prune(pool: &PgPool, retention: Duration, batch: i64) -> Result<Pruned, sqlx::Error> {
    let retention_ms = retention.as_millis() as i64;
    // [finished jobs, events]
    let mut removed = [0u64; 2];
    for (which, statement) in [PRUNE_JOBS, PRUNE_EVENTS].into_iter().enumerate() {
        loop {
            let mut tx = pool.begin().await?;
            let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(PRUNE_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !ours {
                break;
            }
            // The statistics of a table this busy are often stale (it looked empty when last
            // analysed): the planner then picks a sequential scan of `jobs` inside the anti-join
            // and one pruning statement turns quadratic (seen: minutes for 1,000 events). The
            // indexes serve these statements in every case.
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query(statement)
                .bind(retention_ms)
                .bind(batch)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            removed[which] += n;
            if n < batch as u64 {
                break;
            }
        }
    }
    Ok(Pruned {
        jobs: removed[0],
        events: removed[1],
    })
}

const PRUNE_JOBS: &str = r#"
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs
        WHERE state = 'done'
          AND finished_at < now() - $1 * interval '1 millisecond'
        LIMIT $2)
"#;

/// Deleting an event cascades to its finished jobs younger than the retention, if any (a job is
/// never older than its event).
const PRUNE_EVENTS: &str = r#"
    DELETE FROM events WHERE id IN (
        SELECT e.id FROM events e
        WHERE e.received_at < now() - $1 * interval '1 millisecond'
          AND NOT EXISTS (SELECT 1 FROM jobs j
                          WHERE j.event_id = e.id AND j.state <> 'done')
        LIMIT $2)
"#;

/// The advisory lock key of the pruner ("tether prune").
const PRUNE_LOCK: i64 = 0x7465_7468_7072_756e;

/// A dead letter as `tether dead-letters list` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub event_id: i64,
    pub record_key: String,
    pub attempts: i32,
    pub deferrals: i32,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Dead letters, oldest first.
pub async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, event_id, record_key, attempts, deferrals, last_error, finished_at \
         FROM jobs WHERE state = 'dead' ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Puts dead letters back as fresh jobs (all attempts available again; the last error is kept
/// for reference). `None` retries every dead letter. Returns the ids put back.
pub async fn retry_dead(pool: &PgPool, id: Option<i64>) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = sqlx::query_scalar(
        r#"
        UPDATE jobs
        SET state = 'ready', attempts = 0, deferrals = 0, run_at = now(), finished_at = NULL
        WHERE state = 'dead' AND ($1::bigint IS NULL OR id = $1)
        RETURNING id
        "#,
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    if !ids.is_empty() {
        notify(pool).await?;
    }
    Ok(ids)
}
