//! The SQL of the `jobs` table: claim, finish, extend, release, counts, pruning, housekeeping
//! (ANALYZE/VACUUM when the table changed enough), dead letters.
//!
//! Every statement here runs in its own short transaction; no job runs inside one.

use std::ops::RangeInclusive;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{ClaimedJob, JobPriority};
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
///
/// The statement runs under [`CLAIM_PLANNER_SETTINGS`] in its own short transaction, so that its
/// plan does not depend on how fresh the table's statistics are (see there).
pub async fn claim(
    pool: &PgPool,
    owner: Uuid,
    limit: usize,
    lease: Duration,
) -> Result<(Vec<Claim>, Vec<Unreadable>), sqlx::Error> {
    claim_in(
        pool,
        owner,
        limit,
        lease,
        JobPriority::Live..=JobPriority::Backfill,
    )
    .await
}

/// [`claim`] restricted to the jobs whose priority lies in `priorities`, in (priority, id)
/// order: the dispatcher claims live and reconciliation work first and backfill work only with
/// what is left of its batch and its backfill tasks (docs/queue.md, "Priorities").
pub async fn claim_in(
    pool: &PgPool,
    owner: Uuid,
    limit: usize,
    lease: Duration,
    priorities: RangeInclusive<JobPriority>,
) -> Result<(Vec<Claim>, Vec<Unreadable>), sqlx::Error> {
    if limit == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut tx = pool.begin().await?;
    sqlx::query(CLAIM_PLANNER_SETTINGS)
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(CLAIM)
        .bind(limit as i64)
        .bind(owner)
        .bind(lease.as_millis() as i64)
        .bind(priorities.start().as_i16())
        .bind(priorities.end().as_i16())
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;

    let mut claims = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        match claimed_row(&row)? {
            Ok(claim) => claims.push(claim),
            Err(bad) => unreadable.push(bad),
        }
    }
    // Started in (priority, id) order; the statement leaves ordering to us (no sort in its plan:
    // see CLAIM_PLANNER_SETTINGS).
    claims.sort_by_key(|c| (c.job.priority, c.lease.job_id));
    Ok((claims, unreadable))
}

/// One row of [`CLAIM`] as a claim, or as an unreadable job if its event names a system or action
/// this build does not know.
fn claimed_row(row: &sqlx::postgres::PgRow) -> Result<Result<Claim, Unreadable>, sqlx::Error> {
    let lease = Lease {
        job_id: row.try_get("id")?,
        claims: row.try_get("claims")?,
        attempts: row.try_get("attempts")?,
        deferrals: row.try_get("deferrals")?,
    };
    let event_id: i64 = row.try_get("event_id")?;
    // The CHECK constraint allows only known values; an unknown one runs as live work.
    let priority = JobPriority::from_i16(row.try_get("priority")?).unwrap_or_default();
    let system: String = row.try_get("system")?;
    let action: String = row.try_get("action")?;
    let parsed = system
        .parse()
        .map_err(|e: crate::domain::UnknownSystem| e.to_string())
        .and_then(|system| action.parse().map(|action| (system, action)));
    let (system, action) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            return Ok(Err(Unreadable {
                lease,
                error: format!("event {event_id} cannot be read: {error}"),
            }))
        }
    };
    let event = ChangeEvent {
        record: RecordKey {
            system,
            entity_type: row.try_get("entity_type")?,
            record_id: row.try_get("record_id")?,
        },
        action,
        occurred_at: row.try_get::<Option<DateTime<Utc>>, _>("occurred_at")?,
        delivery_id: row.try_get("delivery_id")?,
    };
    Ok(Ok(Claim {
        job: ClaimedJob {
            job_id: lease.job_id,
            event_id,
            event,
            attempt: lease.attempts,
            priority,
        },
        lease,
    }))
}

/// Planner settings for the claim, local to its transaction.
///
/// The one good plan walks `jobs_unfinished` in id order and stops at the LIMIT, probing
/// `jobs_by_key` once per candidate. Right after a burst of enqueues the statistics may still
/// describe an almost empty or all-finished table (autovacuum's ANALYZE comes up to a minute
/// later, and the housekeeper's a second or so later); the planner then expects a handful of ready
/// rows and may prefer a bitmap scan of every unfinished job, checked one by one and then sorted
/// (measured: 225 ms per claim of 500 with 65,000 ready jobs), or a hash join built over all of
/// them. With these paths off, the ordered index walk is the only plan without a penalty, however
/// stale the statistics are. Every scan the statement needs is an index scan and it sorts nothing
/// (the caller orders the claimed rows), so the good plan carries no penalty.
///
/// JIT is off as well: a claim touches a few hundred rows, and compiling it costs far more (seen:
/// 350 ms per claim when a disabled path's penalty pushed a plan's cost over `jit_above_cost`).
pub const CLAIM_PLANNER_SETTINGS: &str = "SELECT set_config('enable_seqscan', 'off', true), \
     set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), \
     set_config('jit', 'off', true)";

/// The claim statement: `$1` limit, `$2` owner, `$3` lease in milliseconds, `$4`..`$5` the
/// priorities to claim ([`JobPriority::as_i16`]). Public so that tests can EXPLAIN it.
///
/// Candidates are walked in (priority, id) order, the key of `jobs_unfinished` (migration
/// 20261204010000), so a live job is taken before an older backfill job.
///
/// The ordering check says `o.state NOT IN ('done', 'dead')` rather than `IN ('ready',
/// 'running')` on purpose: that clause does not imply `jobs_unfinished`'s predicate, so the check
/// can only be served by a keyed probe of `jobs_by_key` (migration 20261123110000 says why).
pub const CLAIM: &str = r#"
    WITH candidates AS (
        SELECT j.id
        FROM jobs j
        WHERE j.state IN ('ready', 'running')
          AND j.priority BETWEEN $4 AND $5
          AND ((j.state = 'ready' AND j.run_at <= now())
               OR (j.state = 'running' AND j.lease_until < now()))
          AND NOT EXISTS (
              SELECT 1 FROM jobs o
              WHERE o.record_key = j.record_key
                AND o.state NOT IN ('done', 'dead')
                AND o.id <> j.id
                -- An expired lease is taken over even if an older job of its record waits:
                -- that job was not yet committed when this one was claimed (group commits of
                -- two replicas can commit in the other order than their ids), and waiting
                -- for it would wait forever, since it in turn waits while this one runs.
                AND (o.state = 'running' OR (o.id < j.id AND j.state = 'ready')))
        ORDER BY j.priority, j.id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE jobs j
        SET state = 'running',
            lease_owner = $2,
            lease_until = now() + $3 * interval '1 millisecond',
            -- Taking over an expired lease (its worker died) keeps the attempt that lease
            -- took: a lease that ran out is not a failed attempt, and a SIGKILLed replica
            -- would otherwise cost an attempt to every job it held, run or not.
            attempts = CASE WHEN j.state = 'running' THEN j.attempts ELSE j.attempts + 1 END,
            claims = j.claims + 1
        FROM candidates c
        WHERE j.id = c.id
        RETURNING j.id, j.event_id, j.attempts, j.deferrals, j.claims, j.priority
    )
    SELECT c.id, c.event_id, c.attempts, c.deferrals, c.claims, c.priority,
           e.system, e.entity_type, e.record_id, e.action, e.occurred_at, e.delivery_id
    FROM claimed c JOIN events e ON e.id = c.event_id
"#;

/// A job's state: the `jobs.state` column, whose CHECK constraint allows exactly these names
/// (migration `20261123040000_queue.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for `run_at` (a retry or deferral is a ready row with attempts/deferrals > 0).
    Ready,
    /// Leased to a worker until `lease_until`.
    Running,
    /// Finished.
    Done,
    /// Failed for good (a dead letter).
    Dead,
}

impl JobState {
    /// The name stored in `jobs.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Dead => "dead",
        }
    }
}

/// What a finished run turns into, decided in Rust from the outcome and the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub lease: Lease,
    pub state: JobState,
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
    let states: Vec<&str> = transitions.iter().map(|t| t.state.as_str()).collect();
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
            -- process (finishing and extending) deadlocked. A keyed lookup, not a join, and
            -- `state NOT IN ('ready', 'done', 'dead')` means 'running' without implying
            -- `jobs_unfinished`'s predicate: with statistics that believe that partial index
            -- empty (right after a burst) a join would scan it whole once per row (see CLAIM).
            SELECT j.id FROM jobs j
            WHERE j.id = ANY($1) AND j.lease_owner = $8
              AND j.state NOT IN ('ready', 'done', 'dead')
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
        -- The locked rows are ours and running until this statement commits; `claims` picks
        -- the exact lease.
        FROM locked l JOIN u ON u.id = l.id
        WHERE j.id = l.id AND j.claims = u.claims
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
    // Planned for these arrays every time (an unnamed statement): the cached generic plan
    // guesses 10 elements per array and joined 1,000 outcomes by a nested loop over the
    // unnested arrays, a million comparisons per batch (150 ms, the benchmark's bottleneck).
    .persistent(false)
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
            -- In id order, like every multi-row lock of this table, and a keyed lookup that
            -- cannot use `jobs_unfinished` (see `finish`).
            SELECT j.id FROM jobs j
            WHERE j.id = ANY($1) AND j.lease_owner = $4
              AND j.state NOT IN ('ready', 'done', 'dead')
            ORDER BY j.id
            FOR UPDATE OF j
        )
        UPDATE jobs j SET lease_until = now() + $3 * interval '1 millisecond'
        FROM locked l JOIN UNNEST($1::bigint[], $2::int[]) AS u(id, claims) ON u.id = l.id
        WHERE j.id = l.id AND j.claims = u.claims
        RETURNING j.id
        "#,
    )
    .bind(&ids)
    .bind(&claims)
    .bind(lease.as_millis() as i64)
    .bind(owner)
    // Planned for these arrays every time (see `finish`).
    .persistent(false)
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
            -- In id order, like every multi-row lock of this table, and a keyed lookup that
            -- cannot use `jobs_unfinished` (see `finish`).
            SELECT j.id FROM jobs j
            WHERE j.id = ANY($1) AND j.lease_owner = $3
              AND j.state NOT IN ('ready', 'done', 'dead')
            ORDER BY j.id
            FOR UPDATE OF j
        )
        UPDATE jobs j
        SET state = 'ready', run_at = now(), attempts = greatest(j.attempts - 1, 0),
            lease_owner = NULL, lease_until = NULL
        FROM locked l JOIN UNNEST($1::bigint[], $2::int[]) AS u(id, claims) ON u.id = l.id
        WHERE j.id = l.id AND j.claims = u.claims
        "#,
    )
    .bind(&ids)
    .bind(&claims)
    .bind(owner)
    // Planned for these arrays every time (see `finish`).
    .persistent(false)
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

/// Housekeeping runs `ANALYZE jobs` once this many rows changed since the last ANALYZE (and
/// [`ANALYZE_CHANGED_FRACTION`] of the live rows): a burst of 10,000 jobs is enough to change
/// which plans are right for the pruning and completion statements, while a trickle of single
/// jobs does not earn a table scan every second.
pub const ANALYZE_MIN_CHANGES: i64 = 10_000;
/// ... and changes amounting to a fifth of the live rows: a burst a quarter the size of the
/// backlog before it is analyzed within a second or two, while a steady drain (two updates and a
/// delete per job) analyzes a few times per backlog rather than every second.
pub const ANALYZE_CHANGED_FRACTION: f64 = 0.2;
/// Housekeeping runs `VACUUM jobs` once this many dead row versions wait (and
/// [`VACUUM_DEAD_FRACTION`] of the live rows). Every job leaves three dead versions behind (claim,
/// completion, deletion by the pruner); vacuuming lets later versions reuse their space, so the
/// table stays near the size of the largest backlog instead of growing by every burst.
pub const VACUUM_MIN_DEAD: i64 = 10_000;
/// ... and a fifth of the live rows, so a VACUUM (which reads the table and all six indexes)
/// runs a few times per backlog rather than every second. `n_dead_tup` undercounts what a VACUUM
/// reclaims here (PostgreSQL prunes dead versions inside a page as it reads it and subtracts them,
/// while their index entries stay until a VACUUM), which is one more reason not to wait for more.
pub const VACUUM_DEAD_FRACTION: f64 = 0.2;

/// The figures housekeeping reads from `pg_stat_user_tables` for `jobs` (the statistics
/// collector's view, which backends update about once a second).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableActivity {
    pub live: i64,
    pub dead: i64,
    /// Rows inserted, updated or deleted since the last ANALYZE (manual or automatic).
    pub modified_since_analyze: i64,
    /// A VACUUM or ANALYZE of `jobs` (ours or autovacuum's) is running right now.
    pub maintenance_running: bool,
}

/// What one housekeeping pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Housekeeping {
    /// The figures it decided on.
    pub before: TableActivity,
    pub analyzed: bool,
    pub vacuumed: bool,
}

/// Whether `activity` calls for ANALYZE and for VACUUM, per the thresholds above.
pub fn housekeeping_due(activity: &TableActivity) -> (bool, bool) {
    if activity.maintenance_running {
        return (false, false);
    }
    let live = activity.live.max(0) as f64;
    let analyze = activity.modified_since_analyze >= ANALYZE_MIN_CHANGES
        && activity.modified_since_analyze as f64 >= ANALYZE_CHANGED_FRACTION * live;
    let vacuum =
        activity.dead >= VACUUM_MIN_DEAD && activity.dead as f64 >= VACUUM_DEAD_FRACTION * live;
    (analyze, vacuum)
}

/// Reads the `jobs` figures of `pg_stat_user_tables`.
pub async fn table_activity(pool: &PgPool) -> Result<TableActivity, sqlx::Error> {
    let row = sqlx::query(
        r#"
        SELECT coalesce(s.n_live_tup, 0) AS live,
               coalesce(s.n_dead_tup, 0) AS dead,
               coalesce(s.n_mod_since_analyze, 0) AS modified,
               EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.relid = 'jobs'::regclass)
               OR EXISTS (SELECT 1 FROM pg_stat_progress_analyze a
                          WHERE a.relid = 'jobs'::regclass) AS busy
        FROM (SELECT 1) one
        LEFT JOIN pg_stat_user_tables s ON s.relid = 'jobs'::regclass
        "#,
    )
    .fetch_one(pool)
    .await?;
    Ok(TableActivity {
        live: row.try_get("live")?,
        dead: row.try_get("dead")?,
        modified_since_analyze: row.try_get("modified")?,
        maintenance_running: row.try_get("busy")?,
    })
}

/// Analyzes and vacuums `jobs` when [`housekeeping_due`] says so, instead of waiting for
/// autovacuum: its launcher visits a database once a minute (`autovacuum_naptime`), which is too
/// late twice over for a queue. Right after a burst the planner works from statistics that
/// describe the table before it, and between back-to-back bursts the space of pruned rows is not
/// reusable yet, so the table grows by every burst (docs/queue.md has the figures). It needs no
/// tuning of the server, so it works on an external PostgreSQL as it is.
///
/// Both commands use `SKIP_LOCKED`: when another replica's housekeeping or autovacuum is already
/// at work on `jobs` this pass skips instead of queueing behind it (the table lock they take is
/// the "one at a time" across replicas). `analyzed`/`vacuumed` say what was issued; a command can
/// still have been skipped that way.
pub async fn housekeep(pool: &PgPool) -> Result<Housekeeping, sqlx::Error> {
    let before = table_activity(pool).await?;
    let (analyze, vacuum) = housekeeping_due(&before);
    let statement = match (analyze, vacuum) {
        (true, true) => "VACUUM (ANALYZE, SKIP_LOCKED) jobs",
        (false, true) => "VACUUM (SKIP_LOCKED) jobs",
        (true, false) => "ANALYZE (SKIP_LOCKED) jobs",
        (false, false) => {
            return Ok(Housekeeping {
                before,
                ..Housekeeping::default()
            })
        }
    };
    // VACUUM cannot run inside a transaction block, so the setting that keeps PostgreSQL's
    // "skipping ... lock not available" warning (an expected outcome here, which sqlx would log as
    // a warning) off this connection is set and reset around it on the session. A connection
    // whose reset may not have happened is closed instead of going back to the pool (a pass cut
    // short at shutdown leaves it set, which only quiets that connection's notices).
    let mut conn = pool.acquire().await?;
    let ran = quietly(&mut conn, statement).await;
    if ran.is_err() {
        conn.close_on_drop();
    }
    ran?;
    Ok(Housekeeping {
        before,
        analyzed: analyze,
        vacuumed: vacuum,
    })
}

/// The tables besides `jobs` that every job's statements read by key, and that grow from empty on
/// a fresh installation, fastest during a backfill: the sync engine's `links`, `link_intents` and
/// `sync_log`, the queue's `events`, the backfill's `backfill_items`.
pub const KEYED_TABLES: [&str; 5] = [
    "links",
    "link_intents",
    "sync_log",
    "events",
    "backfill_items",
];

/// A table of [`KEYED_TABLES`] is analyzed once it holds this many live rows and has grown to
/// [`KEYED_ANALYZE_GROWTH`] times the rows its last ANALYZE (or VACUUM) counted, or was never
/// counted. Never analyzed, such a table has no statistics, and the plans prepared statements
/// cache for it are made for an empty table: the engine's link lookup then walked
/// `links_active_by_flow` (every active link of the flow) instead of the unique index on the
/// record, a cost per job that grew with the table (measured in `tether-backfill-bench`: 10,000
/// records ran at 138 a second, 3,000 at 182). Autovacuum's first ANALYZE of such a table comes up
/// to a minute after it filled; this one within a second or two of the first thousand rows, and
/// each ANALYZE makes PostgreSQL plan the cached statements anew.
pub const KEYED_ANALYZE_MIN_ROWS: i64 = 1_000;

/// Growth, not change, is what calls for another ANALYZE of a keyed table (docs/queue.md,
/// "Housekeeping"): its statements look rows up by unique keys, and those plans only go wrong
/// while the table is much larger than its statistics say. Updates and a steady stream of
/// inserts into a large table change nothing the plans depend on; analyzing on every fifth of the
/// rows changed cost `tether-sync-bench` 0.06–0.24 ms of PostgreSQL's CPU per linked update (the
/// ANALYZE of `events`, `links` and `sync_log` each round). Doubling keeps the ANALYZEs of a table
/// that grows from empty logarithmic in its size; autovacuum's own stays as configured.
pub const KEYED_ANALYZE_GROWTH: f64 = 2.0;

/// Analyzes each table of [`KEYED_TABLES`] that grew enough (see [`KEYED_ANALYZE_MIN_ROWS`] and
/// [`KEYED_ANALYZE_GROWTH`]); returns the tables analyzed. `SKIP_LOCKED` as in [`housekeep`].
pub async fn analyze_keyed_tables(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    // `reltuples` is -1 until the table's first ANALYZE or VACUUM.
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema() AND s.relname = ANY($1) \
           AND s.n_live_tup >= $2 \
           AND (c.reltuples < 0 OR s.n_live_tup >= $3 * c.reltuples) \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_analyze a WHERE a.relid = s.relid) \
         ORDER BY s.relname",
    )
    .bind(&KEYED_TABLES[..])
    .bind(KEYED_ANALYZE_MIN_ROWS)
    .bind(KEYED_ANALYZE_GROWTH)
    .fetch_all(pool)
    .await?;
    if due.is_empty() {
        return Ok(due);
    }
    // Names from the constant list only (the query returns a subset of it).
    let statement = format!("ANALYZE (SKIP_LOCKED) {}", due.join(", "));
    let mut conn = pool.acquire().await?;
    let ran = quietly(&mut conn, &statement).await;
    if ran.is_err() {
        conn.close_on_drop();
    }
    ran?;
    Ok(due)
}

/// Runs `statement` with the session's `client_min_messages` at `error`, then resets it. Plain
/// strings go over the simple query protocol, which VACUUM needs (no implicit transaction).
async fn quietly(conn: &mut sqlx::PgConnection, statement: &str) -> Result<(), sqlx::Error> {
    use sqlx::Executor as _;
    conn.execute("SET client_min_messages = error").await?;
    conn.execute(statement).await?;
    conn.execute("RESET client_min_messages").await?;
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(live: i64, dead: i64, modified: i64) -> TableActivity {
        TableActivity {
            live,
            dead,
            modified_since_analyze: modified,
            maintenance_running: false,
        }
    }

    #[test]
    fn housekeeping_thresholds_need_both_the_minimum_and_the_fraction() {
        // A burst of 100,000 on an empty table: analyze, nothing dead yet.
        assert_eq!(
            housekeeping_due(&activity(100_000, 0, 100_000)),
            (true, false)
        );
        // A trickle: below the minimums.
        assert_eq!(
            housekeeping_due(&activity(50, 9_000, 9_000)),
            (false, false)
        );
        // Above the minimums but small against a large backlog.
        assert_eq!(
            housekeeping_due(&activity(1_000_000, 150_000, 150_000)),
            (false, false)
        );
        // Drained and pruned: everything is dead.
        assert_eq!(
            housekeeping_due(&activity(0, 300_000, 300_000)),
            (true, true)
        );
        // Someone (autovacuum, another replica) is at it already.
        let mut busy = activity(0, 300_000, 300_000);
        busy.maintenance_running = true;
        assert_eq!(housekeeping_due(&busy), (false, false));
    }
}
