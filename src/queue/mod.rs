//! The PostgreSQL work queue: one job per stored event (but an echo that intake settles itself:
//! `intake::store`), claimed in batches with `FOR UPDATE SKIP LOCKED`, leased to an owner, retried
//! with backoff, dead-lettered at the end.
//!
//! Owns: the `jobs` table and everything that claims, completes, retries or prunes it.
//! May call: `db`. Called by: `intake` and pollers (enqueue), `sync` (as the [`JobHandler`]),
//! `cli` (`tether serve` starts the workers; `tether dead-letters`).
//!
//! - [`store`]: the SQL (claim, finish, extend, release, counts, prune, housekeeping, dead
//!   letters).
//! - [`worker`]: [`start_workers`] and the one-job [`Queue::run_once`] that tests drain with.
//!
//! Guarantees: a job is claimed with a lease `(owner, claims)`; only that lease's holder can finish
//! or extend it, and an expired lease lets another worker take the job (so a dead worker's jobs
//! run again). Jobs of one record key never run at once and run in id order (a dead-lettered job
//! stops blocking its successors). Execution is at least once: a worker killed after its handler's
//! effects but before writing the outcome leaves the job to run again, so handlers are idempotent.

pub mod store;
pub mod worker;

pub use store::{DeadLetter, JobState, QueueCounts};
pub use worker::{start_workers, Queue, RunOnce};

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::domain::ChangeEvent;

/// A stored event to enqueue, inside the caller's transaction (so the event and its job commit
/// together or not at all).
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    /// `events.id` of the stored event.
    pub event_id: i64,
    pub event: &'a ChangeEvent,
}

/// Enqueues jobs for events stored in the same transaction, as live work.
pub async fn enqueue(conn: &mut PgConnection, jobs: &[NewJob<'_>]) -> Result<(), sqlx::Error> {
    enqueue_with_priority(conn, jobs, JobPriority::Live).await
}

/// Enqueues jobs for events stored in the same transaction, at `priority`.
pub async fn enqueue_with_priority(
    conn: &mut PgConnection,
    jobs: &[NewJob<'_>],
    priority: JobPriority,
) -> Result<(), sqlx::Error> {
    const SQL: &str = "INSERT INTO jobs (event_id, record_key, priority) \
         SELECT event_id, record_key, $3 \
         FROM UNNEST($1::bigint[], $2::text[]) AS j(event_id, record_key)";
    if jobs.is_empty() {
        return Ok(());
    }
    let event_ids: Vec<i64> = jobs.iter().map(|j| j.event_id).collect();
    let keys: Vec<String> = jobs.iter().map(|j| record_key(j.event)).collect();
    sqlx::query(SQL)
        .bind(&event_ids)
        .bind(&keys)
        .bind(priority.as_i16())
        .execute(conn)
        .await?;
    Ok(())
}

/// Which work a job is, and so when it is claimed: live events first, then reconciliation, then
/// backfill (docs/queue.md, "Priorities"). Stored in `jobs.priority` as [`JobPriority::as_i16`]
/// under a CHECK constraint (migration `20261204010000_backfill.sql`); claims walk the
/// unfinished jobs in (priority, id) order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobPriority {
    /// A webhook or a poll: a change someone is waiting for.
    #[default]
    Live,
    /// A change found by reconciliation (a webhook that never arrived).
    Reconcile,
    /// Loading the past (`tether backfill run`): runs only when no live job is ready, on at most
    /// `workers.backfill_concurrency` tasks, so at most that many backfill calls wait at a
    /// vendor's rate gate ahead of a live call (docs/queue.md, "Priorities").
    Backfill,
}

impl JobPriority {
    pub const ALL: [JobPriority; 3] = [
        JobPriority::Live,
        JobPriority::Reconcile,
        JobPriority::Backfill,
    ];

    /// The value stored in `jobs.priority` (lower is claimed first).
    pub fn as_i16(self) -> i16 {
        match self {
            JobPriority::Live => 0,
            JobPriority::Reconcile => 1,
            JobPriority::Backfill => 2,
        }
    }

    /// The priority stored as `value`, if it is one.
    pub fn from_i16(value: i16) -> Option<JobPriority> {
        JobPriority::ALL.into_iter().find(|p| p.as_i16() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobPriority::Live => "live",
            JobPriority::Reconcile => "reconcile",
            JobPriority::Backfill => "backfill",
        }
    }

    /// Work that gives way to live work, in the queue and at the vendors' rate gates.
    pub fn is_background(self) -> bool {
        self == JobPriority::Backfill
    }
}

/// The one definition of a new job row, for [`enqueue`] and for statements that store events and
/// enqueue their jobs at once (the webhook intake's single-statement group commit).
///
/// `rows` is a query yielding `event_id BIGINT` and `record_key TEXT` (made by [`record_key`]),
/// in the order the jobs should get their ids; every other column takes its default. The
/// statement-level `jobs_notify` trigger wakes the workers once per statement.
pub fn insert_jobs_sql(rows: &str) -> String {
    format!(
        "INSERT INTO jobs (event_id, record_key) SELECT event_id, record_key FROM ({rows}) AS new_jobs"
    )
}

/// The `record_key` of an event's job: jobs with one key run one at a time, in id order.
pub fn record_key(event: &ChangeEvent) -> String {
    event.record.to_string()
}

/// A job as a worker hands it to the handler.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job_id: i64,
    pub event_id: i64,
    pub event: ChangeEvent,
    /// 1 on the first run.
    pub attempt: i32,
    /// Live, reconciliation or backfill work.
    pub priority: JobPriority,
}

/// What became of one run of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Finished; never run again.
    Done,
    /// Failed; retry on the backoff schedule, using up an attempt; dead-letter after the last.
    Retry { error: String },
    /// Back-pressure (429, timeout, a referenced record not synced yet): run again after the delay
    /// without using up an attempt, up to a bound.
    Later {
        after: Option<Duration>,
        reason: String,
    },
    /// Will never succeed: dead-letter now, with the error.
    Dead { error: String },
}

/// Does the work of one job. The sync engine implements this; tests implement no-op handlers.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome;
}
