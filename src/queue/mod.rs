//! The PostgreSQL work queue: one job per stored event, claimed in batches with
//! `FOR UPDATE SKIP LOCKED`, leased to an owner, retried with backoff, dead-lettered at the end.
//!
//! Owns: the `jobs` table and everything that claims, completes, retries or prunes it.
//! May call: `db`. Called by: `intake` and pollers (enqueue), `sync` (as the [`JobHandler`]).

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

/// Enqueues jobs for events stored in the same transaction.
pub async fn enqueue(conn: &mut PgConnection, jobs: &[NewJob<'_>]) -> Result<(), sqlx::Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    let event_ids: Vec<i64> = jobs.iter().map(|j| j.event_id).collect();
    let keys: Vec<String> = jobs.iter().map(|j| j.event.record.to_string()).collect();
    sqlx::query(
        "INSERT INTO jobs (event_id, record_key) SELECT * FROM UNNEST($1::bigint[], $2::text[])",
    )
    .bind(&event_ids)
    .bind(&keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// A job as a worker hands it to the handler.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job_id: i64,
    pub event_id: i64,
    pub event: ChangeEvent,
    /// 1 on the first run.
    pub attempt: i32,
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
