//! Group commit: the events of concurrently arriving deliveries are inserted and enqueued in one
//! transaction, and each request is answered only after that transaction committed.
//!
//! Requests hand their event to a channel. A dispatcher takes whatever has queued up (at least
//! one, at most [`MAX_BATCH`]) and commits it on one of up to [`COMMITTERS`] concurrent transactions;
//! while those are in flight the next batch accumulates, so the batch size follows the load with
//! no added waiting when idle. Each request learns through its own oneshot whether its event was
//! new (202) or a duplicate (200).
//!
//! Failure handling: a batch that fails on a connection problem is answered "unavailable" for
//! every member (nothing was committed; the vendor retries). A batch that fails for a database
//! error about its data is retried row by row, so one bad row cannot fail or misreport the others.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::domain::ChangeEvent;
use crate::queue::{self, NewJob};

/// The most events in one transaction: a bound on statement size and on the latency one commit
/// adds to the first request of its batch.
pub const MAX_BATCH: usize = 512;
/// Most transactions in flight at once: overlaps one batch's round trips with the next batch's
/// collection, and lets PostgreSQL share one WAL flush among several commits. Each holds a pool
/// connection, so at most half the pool is used (the rest serves workers and health checks).
pub const COMMITTERS: usize = 8;
/// Requests waiting for a batch, beyond which new requests wait to enqueue (back-pressure).
const QUEUE_DEPTH: usize = 8192;

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored with its job; `events.id`.
    New(i64),
    /// The delivery id was already stored (now or earlier).
    Duplicate,
}

/// Why an event could not be stored. Neither case committed anything for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable or the intake is stopping: the sender should retry (503).
    #[error("the database is unavailable")]
    Unavailable,
    /// The database refused this event's row itself (500; the cause is logged).
    #[error("the database refused the event")]
    Refused,
}

struct Pending {
    event: ChangeEvent,
    reply: oneshot::Sender<Result<Stored, StoreError>>,
}

/// The handle requests use; cheap to clone. The batcher stops once every handle is dropped,
/// after committing what it already took (so in-flight requests of a graceful shutdown finish).
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the batcher on the current tokio runtime.
    pub fn start(pool: PgPool) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(pool, rx));
        GroupCommit { tx }
    }

    /// Stores one event (with its job) and returns once its transaction committed.
    pub async fn store(&self, event: ChangeEvent) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { event, reply })
            .await
            .map_err(|_| StoreError::Unavailable)?;
        // A dropped reply means the batch task died (a panic): nothing is known to be committed,
        // so the sender must retry, and a retry is deduplicated if it was.
        answer.await.unwrap_or(Err(StoreError::Unavailable))
    }
}

async fn dispatch(pool: PgPool, mut rx: mpsc::Receiver<Pending>) {
    let committers = (pool.options().get_max_connections() as usize / 2).clamp(1, COMMITTERS);
    let permits = Arc::new(Semaphore::new(committers));
    loop {
        // Take a committer slot first, so requests keep accumulating while all are busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(16);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            // Every handle dropped and the channel drained; wait for running commits.
            let _ = permits.acquire_many(committers as u32).await;
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit_and_reply(&pool, batch).await;
            drop(permit);
        });
    }
}

async fn commit_and_reply(pool: &PgPool, mut batch: Vec<Pending>) {
    // A fixed lock order (by key) keeps two concurrent batches holding the same delivery ids
    // from deadlocking on each other's unique-index entries.
    batch.sort_unstable_by(|a, b| {
        (a.event.record.system, &a.event.delivery_id)
            .cmp(&(b.event.record.system, &b.event.delivery_id))
    });
    let events: Vec<&ChangeEvent> = batch.iter().map(|p| &p.event).collect();
    match insert_batch(pool, &events).await {
        Ok(results) => reply_all(batch, results),
        Err(e) if is_unavailable(&e) => {
            tracing::warn!(error.cause_chain = ?e, size = batch.len(), "group commit failed: database unavailable");
            for p in batch {
                let _ = p.reply.send(Err(StoreError::Unavailable));
            }
        }
        Err(e) => {
            // Something about the data (or a deadlock/serialization failure): retry one by one so
            // each request gets its own true answer.
            tracing::warn!(error.cause_chain = ?e, size = batch.len(), "group commit failed; retrying its events one by one");
            for p in batch {
                let result = match insert_batch(pool, &[&p.event]).await {
                    Ok(mut r) => Ok(r.pop().expect("one result per event")),
                    Err(e) if is_unavailable(&e) => Err(StoreError::Unavailable),
                    Err(e) => {
                        tracing::error!(error.cause_chain = ?e, record = %p.event.record, "event refused by the database");
                        Err(StoreError::Refused)
                    }
                };
                let _ = p.reply.send(result);
            }
        }
    }
}

fn reply_all(batch: Vec<Pending>, results: Vec<Stored>) {
    for (p, r) in batch.into_iter().zip(results) {
        // The requester may have gone (client hung up); the event is committed regardless.
        let _ = p.reply.send(Ok(r));
    }
}

/// Connection-level trouble (the sender should retry), as opposed to an error about the rows.
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            // Class 08: connection exception; 57P: operator intervention (shutdown, crash);
            // 53: insufficient resources. 40xxx (deadlock, serialization) is retried per row.
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        }
        sqlx::Error::Protocol(_) | sqlx::Error::Decode(_) | sqlx::Error::TypeNotFound { .. } => {
            false
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::ColumnNotFound(_) => false,
        // Io, Tls, PoolTimedOut, PoolClosed, WorkerCrashed, Configuration and the rest: the
        // database could not be reached or used.
        _ => true,
    }
}

/// Inserts the events (ON CONFLICT DO NOTHING on `(system, delivery_id)`) and enqueues a job for
/// each new one, in one transaction. Returns one result per event, in order. Within the batch,
/// the first copy of a delivery id is the new one and later copies are duplicates.
pub async fn insert_batch(
    pool: &PgPool,
    events: &[&ChangeEvent],
) -> Result<Vec<Stored>, sqlx::Error> {
    let n = events.len();
    let mut systems = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut deliveries = Vec::with_capacity(n);
    for e in events {
        systems.push(e.record.system.as_str());
        types.push(e.record.entity_type.as_str());
        records.push(e.record.record_id.as_str());
        actions.push(e.action.as_str());
        times.push(e.occurred_at);
        deliveries.push(e.delivery_id.as_str());
    }
    let mut tx = pool.begin().await?;
    // ON CONFLICT DO NOTHING also skips a later row of the same statement that conflicts with an
    // earlier one, so in-batch copies are stored once; concurrent transactions inserting the same
    // key wait on each other and the loser skips.
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(
        "INSERT INTO events (system, entity_type, record_id, action, occurred_at, delivery_id)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
         ON CONFLICT ON CONSTRAINT events_delivery_once DO NOTHING
         RETURNING id, system, delivery_id",
    )
    .bind(&systems)
    .bind(&types)
    .bind(&records)
    .bind(&actions)
    .bind(&times)
    .bind(&deliveries)
    .fetch_all(&mut *tx)
    .await?;
    let mut new_ids: HashMap<(&str, &str), i64> = inserted
        .iter()
        .map(|(id, system, delivery)| ((system.as_str(), delivery.as_str()), *id))
        .collect();
    let results: Vec<Stored> = events
        .iter()
        .map(
            |e| match new_ids.remove(&(e.record.system.as_str(), e.delivery_id.as_str())) {
                Some(id) => Stored::New(id),
                None => Stored::Duplicate,
            },
        )
        .collect();
    let jobs: Vec<NewJob<'_>> = events
        .iter()
        .zip(&results)
        .filter_map(|(e, r)| match r {
            Stored::New(id) => Some(NewJob {
                event_id: *id,
                event: e,
            }),
            Stored::Duplicate => None,
        })
        .collect();
    queue::enqueue(&mut tx, &jobs).await?;
    tx.commit().await?;
    Ok(results)
}
