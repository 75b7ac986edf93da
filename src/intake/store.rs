//! Group commit: the events of concurrently arriving deliveries are inserted and enqueued by one
//! statement (one implicit transaction, one round trip), and each request is answered only after
//! that statement committed.
//!
//! Requests hand their event to a channel. One committer takes whatever has queued up (at least
//! one, at most [`MAX_BATCH`]), commits it, answers every request of the batch, and goes again;
//! while it commits, the next batch accumulates, so the batch size follows the load. Each request
//! learns through its own oneshot whether its event was new (202) or a duplicate (200).
//!
//! One batch in flight, not several: measured on the 2-core machine (README, "Benchmark"), one
//! committer did as well or better than two to eight at every concurrency, and costs PostgreSQL
//! the least CPU per event (bigger batches, fewer statements). Under load it keeps its connection
//! between batches and lingers briefly for the senders it just answered (see [`dispatch`]).
//!
//! Failure handling: a batch that fails on a connection problem is answered "unavailable" for
//! every member (nothing was committed; the vendor retries). A batch that fails for a database
//! error about its data is retried row by row, so one bad row cannot fail or misreport the others.

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};

use crate::domain::{ChangeEvent, SystemId};
use crate::queue;
use crate::sync::delivery::Delivered;
use crate::sync::{IntakeEcho, IntakeEchoes};

/// The most events in one transaction: a bound on statement size and on the latency one commit
/// adds to the first request of its batch.
pub const MAX_BATCH: usize = 512;
/// How long the committer keeps its connection without work before giving it back to the pool.
const HOLD_IDLE: Duration = Duration::from_secs(1);
/// The longest the committer waits, after answering a batch, for as many requests as that batch
/// had (see [`dispatch`]). Long enough for a sender to see its answer and send again on a busy
/// machine; short next to the commit (one fsync) a request arriving just too late would wait.
const LINGER: Duration = Duration::from_millis(1);
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
    /// What the delivery says of its record, kept with the event (`events.delivered`).
    delivered: Option<Delivered>,
    /// The echo it may be, settled by the batch's statement if the link says so.
    echo: Option<IntakeEcho>,
    reply: oneshot::Sender<Result<Stored, StoreError>>,
}

/// The handle requests use; cheap to clone. The batcher stops once every handle is dropped,
/// after committing what it already took (so in-flight requests of a graceful shutdown finish).
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Pending>,
    echoes: std::sync::Arc<IntakeEchoes>,
}

impl GroupCommit {
    /// Starts the batcher on the current tokio runtime.
    pub fn start(pool: PgPool) -> GroupCommit {
        GroupCommit::start_settling(pool, IntakeEchoes::default())
    }

    /// [`GroupCommit::start`], settling the custom-system echoes `echoes` names in the batch's
    /// statement instead of enqueueing them (see [`INSERT_BATCH_SQL`]).
    pub fn start_settling(pool: PgPool, echoes: IntakeEchoes) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(pool, rx));
        GroupCommit {
            tx,
            echoes: std::sync::Arc::new(echoes),
        }
    }

    /// Stores one event (with its job) and returns once its transaction committed.
    pub async fn store(&self, event: ChangeEvent) -> Result<Stored, StoreError> {
        self.store_with(event, None).await
    }

    /// [`GroupCommit::store`] with what the delivery says of its record's state
    /// (docs/sync-rules.md, "An echo without a read").
    pub async fn store_with(
        &self,
        event: ChangeEvent,
        delivered: Option<Delivered>,
    ) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        let echo = self.echoes.of(&event);
        if echo.is_some() {
            self.echoes.wait_for_store(&event).await;
        }
        self.tx
            .send(Pending {
                event,
                delivered,
                echo,
                reply,
            })
            .await
            .map_err(|_| StoreError::Unavailable)?;
        // A dropped reply means the batch task died (a panic): nothing is known to be committed,
        // so the sender must retry, and a retry is deduplicated if it was.
        answer.await.unwrap_or(Err(StoreError::Unavailable))
    }
}

/// The committer. Two refinements over "take what is there, commit, repeat":
///
/// - Its connection is kept from one batch to the next while batches keep coming (a pool
///   checkout pings the server first, a round trip a busy intake need not pay every batch), and
///   given back after [`HOLD_IDLE`] without work, or at once after a connection error.
/// - Linger: the senders just answered tend to send again a moment later. Committing whichever
///   arrives first alone would make all the others wait a whole commit (one fsync) for the next
///   batch, halving the rate; so after taking at least one event it waits, at most until
///   [`LINGER`] after the last answer, until as many events as the last batch had are here. A
///   steady single sender (last batch: one) never waits, nor does a request after a quiet spell.
async fn dispatch(pool: PgPool, mut rx: mpsc::Receiver<Pending>) {
    let mut held: Option<PoolConnection<Postgres>> = None;
    // Size of the last batch and when it was answered.
    let mut last = (0usize, Instant::now());
    loop {
        let mut batch = Vec::with_capacity(last.0.clamp(16, MAX_BATCH));
        let taken = if held.is_some() {
            // recv_many is cancel safe: a timeout loses no message.
            match tokio::time::timeout(HOLD_IDLE, rx.recv_many(&mut batch, MAX_BATCH)).await {
                Ok(taken) => taken,
                Err(_) => {
                    held = None;
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut batch, MAX_BATCH).await
        };
        if taken == 0 {
            // Every handle dropped and the channel drained.
            return;
        }
        let deadline = tokio::time::Instant::from_std(last.1 + LINGER);
        while batch.len() < last.0 {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let size = batch.len();
        let conn = match held.take() {
            Some(conn) => conn,
            None => match pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error.cause_chain = ?e, size, "group commit failed: no database connection");
                    for p in batch {
                        let _ = p.reply.send(Err(StoreError::Unavailable));
                    }
                    continue;
                }
            },
        };
        // Its own task, so a panic fails only this batch (its requests see their reply dropped:
        // 503, nothing known to be committed) and not the intake.
        held = tokio::spawn(commit_and_reply(conn, batch))
            .await
            .ok()
            .flatten();
        last = (size, Instant::now());
    }
}

/// Commits the batch and answers its requests; gives the connection back if it is still usable.
async fn commit_and_reply(
    mut conn: PoolConnection<Postgres>,
    mut batch: Vec<Pending>,
) -> Option<PoolConnection<Postgres>> {
    // A fixed lock order (by key) keeps two concurrent batches holding the same delivery ids
    // from deadlocking on each other's unique-index entries.
    batch.sort_unstable_by(|a, b| {
        (a.event.record.system, &a.event.delivery_id)
            .cmp(&(b.event.record.system, &b.event.delivery_id))
    });
    let events: Vec<NewEvent<'_>> = batch.iter().map(Pending::as_new).collect();
    match insert_batch_with(&mut conn, &events).await {
        Ok(results) => {
            reply_all(batch, results);
            Some(conn)
        }
        Err(e) if is_unavailable(&e) => {
            tracing::warn!(error.cause_chain = ?e, size = batch.len(), "group commit failed: database unavailable");
            for p in batch {
                let _ = p.reply.send(Err(StoreError::Unavailable));
            }
            // Do not hand a broken connection back to the pool.
            conn.close_on_drop();
            None
        }
        Err(e) => {
            // Something about the data (or a deadlock/serialization failure): retry one by one so
            // each request gets its own true answer.
            tracing::warn!(error.cause_chain = ?e, size = batch.len(), "group commit failed; retrying its events one by one");
            let mut usable = true;
            for p in batch {
                let one = p.as_new();
                let result = match insert_batch_with(&mut conn, &[one]).await {
                    Ok(mut r) => Ok(r.pop().expect("one result per event")),
                    Err(e) if is_unavailable(&e) => {
                        usable = false;
                        Err(StoreError::Unavailable)
                    }
                    Err(e) => {
                        tracing::error!(error.cause_chain = ?e, record = %p.event.record, "event refused by the database");
                        Err(StoreError::Refused)
                    }
                };
                let _ = p.reply.send(result);
            }
            if !usable {
                conn.close_on_drop();
            }
            usable.then_some(conn)
        }
    }
}

impl Pending {
    fn as_new(&self) -> NewEvent<'_> {
        NewEvent {
            event: &self.event,
            delivered: self.delivered.as_ref(),
            echo: self.echo.as_ref(),
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
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
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

/// The group commit's one statement: store the batch's events (`ON CONFLICT DO NOTHING` on the
/// delivery id) and enqueue a job for each new one. Arrays as parameters keep the text constant,
/// so it is prepared once per connection. Sent alone, it runs in its own implicit transaction:
/// one round trip and one commit per batch, and the job rows come from `queue`'s one definition.
///
/// Both inserts see the statement's snapshot, and the `jobs.event_id` foreign key is checked at
/// the end of the statement, when the new events exist. `n` is the input position, so the answer
/// maps back to the requests without returning (and allocating) the keys themselves. `stored`
/// carries the input columns the echo check needs, so no later step joins `input` again: the
/// planner estimates such CTEs at one row and joined them by nested loops, batch size squared.
///
/// A custom system's echo (`echo_flow` set: `sync::IntakeEchoes`) whose delivered stamp is the
/// stamp of Tether's own settled write of that side of its flow's active link, the flow not paused,
/// gets its `echo` entry here and no job (docs/sync-rules.md, "An echo without a read"): exactly
/// what the sync engine's `echo_by_stamp` would record, without a job to claim and finish. Its
/// event row is stored as every other. Any other event, or a link not (yet) showing that write,
/// is enqueued as before and the engine decides.
static INSERT_BATCH_SQL: LazyLock<String> = LazyLock::new(|| {
    let jobs = queue::insert_jobs_sql(
        "SELECT event_id, record_key FROM stored s \
         WHERE NOT EXISTS (SELECT 1 FROM settled t WHERE t.event_id = s.event_id) \
         ORDER BY event_id",
    );
    format!(
        "WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                 $5::timestamptz[], $6::text[], $7::text[], $8::text[],
                                 $9::text[], $10::text[], $11::text[])
                WITH ORDINALITY
                AS i(system, entity_type, record_id, action, occurred_at, delivery_id, record_key,
                     delivered, echo_flow, echo_side, echo_detail, n)
        ), inserted AS (
            INSERT INTO events (system, entity_type, record_id, action, occurred_at, delivery_id,
                                delivered)
            SELECT system, entity_type, record_id, action, occurred_at, delivery_id,
                   delivered::jsonb
            FROM input ORDER BY n
            ON CONFLICT ON CONSTRAINT events_delivery_once DO NOTHING
            RETURNING id, system, delivery_id
        ), stored AS (
            SELECT ins.id AS event_id, i.record_key, i.n, i.system, i.entity_type, i.record_id,
                   i.occurred_at, i.echo_flow, i.echo_side, i.echo_detail
            FROM inserted ins JOIN input i USING (system, delivery_id)
        ), own_writes AS (
            SELECT s.*, l.id AS link_id
            FROM stored s
            JOIN links l ON l.source_system = s.system AND l.source_type = s.entity_type
                AND l.source_id = s.record_id AND l.flow_id = s.echo_flow
            WHERE s.echo_side = 'source' AND l.state = 'active' AND l.last_write_side = 'source'
                AND l.last_write_settled AND l.source_seen_at = s.occurred_at
            UNION ALL
            SELECT s.*, l.id AS link_id
            FROM stored s
            JOIN links l ON l.target_system = s.system AND l.target_type = s.entity_type
                AND l.target_id = s.record_id AND l.flow_id = s.echo_flow
            WHERE s.echo_side = 'target' AND l.state = 'active' AND l.last_write_side = 'target'
                AND l.last_write_settled AND l.target_seen_at = s.occurred_at
        ), settled AS (
            INSERT INTO sync_log (event_id, system, entity_type, record_id, flow_id, link_id,
                                  decision, detail)
            SELECT o.event_id, o.system, o.entity_type, o.record_id, o.echo_flow, o.link_id,
                   'echo', o.echo_detail
            FROM own_writes o
            WHERE NOT EXISTS (SELECT 1 FROM flow_pauses p WHERE p.flow_id = o.echo_flow)
            ORDER BY o.n
            RETURNING event_id, flow_id
        ), enqueued AS (
            {jobs}
        )
        SELECT s.n, s.event_id, t.flow_id AS echo_of
        FROM stored s LEFT JOIN settled t ON t.event_id = s.event_id"
    )
});

/// One event for [`insert_batch_with`]: with what its delivery says of its record
/// (`events.delivered`) and the echo it may be (settled by the statement, with no job).
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub event: &'a ChangeEvent,
    pub delivered: Option<&'a Delivered>,
    pub echo: Option<&'a IntakeEcho>,
}

/// Inserts the events (ON CONFLICT DO NOTHING on `(system, delivery_id)`) and enqueues a job for
/// each new one, in one statement and so one transaction, which has committed when this returns
/// `Ok`. Returns one result per event, in order. Within the batch, the first copy of a delivery
/// id is the new one and later copies are duplicates.
///
/// Concurrent statements inserting the same key wait on each other and the loser skips it, so a
/// delivery is stored once also when copies arrive at once; callers pass the events sorted by key
/// so two such statements lock in the same order and cannot deadlock.
pub async fn insert_batch(
    conn: &mut PgConnection,
    events: &[&ChangeEvent],
) -> Result<Vec<Stored>, sqlx::Error> {
    let events: Vec<_> = events
        .iter()
        .map(|event| NewEvent {
            event,
            delivered: None,
            echo: None,
        })
        .collect();
    insert_batch_with(conn, &events).await
}

/// [`insert_batch`] of [`NewEvent`]s: an echo settled by the statement is `Stored::New` too (its
/// event is stored), with no job.
pub async fn insert_batch_with(
    conn: &mut PgConnection,
    events: &[NewEvent<'_>],
) -> Result<Vec<Stored>, sqlx::Error> {
    let n = events.len();
    // In-batch copies are answered here: the statement gets each key once, so every row it
    // returns belongs to exactly one input row (and one job).
    let mut seen: HashSet<(SystemId, &str)> = HashSet::with_capacity(n);
    let mut rows = Rows::with_capacity(n);
    // Index into `events` of each row sent.
    let mut sent = Vec::with_capacity(n);
    for (i, e) in events.iter().enumerate() {
        if !seen.insert((e.event.record.system, e.event.delivery_id.as_str())) {
            continue; // a later copy: stays Duplicate
        }
        sent.push(i);
        rows.push(e);
    }
    // `fetch_all` returns only after PostgreSQL's ReadyForQuery, which follows the implicit
    // commit: an error committing comes back as an error here, never as rows.
    let stored: Vec<(i64, i64, Option<String>)> = rows
        .bind(sqlx::query_as(&INSERT_BATCH_SQL))
        .fetch_all(conn)
        .await?;
    let mut results = vec![Stored::Duplicate; n];
    for (ordinal, id, echo_of) in stored {
        if let Some(flow) = echo_of {
            crate::ops::metrics::sync_decision(Some(&flow), "echo");
        }
        let i = usize::try_from(ordinal - 1)
            .ok()
            .and_then(|k| sent.get(k))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!("the batch insert returned row {ordinal} of {n}"))
            })?;
        results[*i] = Stored::New(id);
    }
    Ok(results)
}

/// The batch statement's parameter arrays, one element per event sent.
struct Rows<'a> {
    systems: Vec<&'a str>,
    types: Vec<&'a str>,
    records: Vec<&'a str>,
    actions: Vec<&'a str>,
    times: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    deliveries: Vec<&'a str>,
    keys: Vec<String>,
    delivered: Vec<Option<String>>,
    echo_flows: Vec<Option<&'a str>>,
    echo_sides: Vec<Option<&'a str>>,
    echo_details: Vec<Option<&'a str>>,
}

type BatchQuery<'q> =
    sqlx::query::QueryAs<'q, Postgres, (i64, i64, Option<String>), sqlx::postgres::PgArguments>;

impl<'a> Rows<'a> {
    fn with_capacity(n: usize) -> Rows<'a> {
        Rows {
            systems: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            records: Vec::with_capacity(n),
            actions: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            deliveries: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            delivered: Vec::with_capacity(n),
            echo_flows: Vec::with_capacity(n),
            echo_sides: Vec::with_capacity(n),
            echo_details: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, e: &NewEvent<'a>) {
        let event = e.event;
        self.systems.push(event.record.system.as_str());
        self.types.push(event.record.entity_type.as_str());
        self.records.push(event.record.record_id.as_str());
        self.actions.push(event.action.as_str());
        self.times.push(event.occurred_at);
        self.deliveries.push(event.delivery_id.as_str());
        self.keys.push(queue::record_key(event));
        self.delivered
            .push(e.delivered.and_then(|d| serde_json::to_string(d).ok()));
        self.echo_flows.push(e.echo.map(|x| x.flow_id.as_str()));
        self.echo_sides.push(e.echo.map(|x| x.side));
        self.echo_details.push(e.echo.map(|x| x.detail.as_str()));
    }

    /// Binds the arrays as `$1` to `$11` of [`INSERT_BATCH_SQL`].
    fn bind<'q>(&'q self, query: BatchQuery<'q>) -> BatchQuery<'q> {
        query
            .bind(&self.systems)
            .bind(&self.types)
            .bind(&self.records)
            .bind(&self.actions)
            .bind(&self.times)
            .bind(&self.deliveries)
            .bind(&self.keys)
            .bind(&self.delivered)
            .bind(&self.echo_flows)
            .bind(&self.echo_sides)
            .bind(&self.echo_details)
    }
}
