//! Group commit across the engine's workers: the per-record statements each worker issues one at a
//! time (the Zendesk event's link lookup, the link-and-log update) are collected by a combiner
//! task and sent as one statement over arrays, one round trip and one commit per batch, each
//! worker answered through its own oneshot (docs/sync-rules.md, "Statements in batches").
//!
//! The engine's per-record logic does not change: a worker submits its item and awaits its own
//! answer, as it awaited its own statement before. Each row keeps its own condition inside the
//! batch statement (a link update's optimistic version check fails for that row alone), and two
//! items with the same key (the same link) never share a batch: the later one waits for the next.
//!
//! Collecting: the combiner takes what has queued up and then, for at most [`WINDOW`] after that,
//! whatever else arrives, up to [`MAX_BATCH`] items; one batch runs at a time, and the next one
//! collects meanwhile, so the batch size follows the load and an idle combiner's lone item waits
//! at most the window. Its connection is kept from one batch to the next while work is waiting (a
//! pool checkout pings the server first) and given back as soon as none is.
//!
//! Failure: a batch that fails on a connection problem gives every member an error (nothing
//! committed: one statement); one that fails for anything else (a row's data, a deadlock) is run
//! again item by item, so each worker gets its own statement's true answer or error.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};

use crate::intake::store::is_unavailable;

/// How long a combiner collects after taking its first items.
pub(crate) const WINDOW: Duration = Duration::from_millis(1);
/// The link-and-log update's: none. Its batch takes only what queued while the previous one ran,
/// because a write's new link state must be stored as soon as the vendor answered: the written
/// system's webhook of that write (its echo) races it, and an echo that finds the link without the
/// write is read on both sides and its link update conflicts (docs/sync-rules.md). With a 1 ms
/// window, a throttled backfill spent a third more of Zendesk's budget on such reads.
pub(crate) const STORE_WINDOW: Duration = Duration::ZERO;
/// The most items of one statement: a bound on its size and on what one failure re-runs.
pub(crate) const MAX_BATCH: usize = 256;
/// Items waiting beyond which submitters wait to enqueue (back-pressure).
const QUEUE_DEPTH: usize = 4096;

/// A statement that can run for many items at once.
#[async_trait]
pub(crate) trait Statement: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Answer: Send + 'static;

    /// Items of the same key never run in one batch (`None`: no constraint).
    fn key(&self, _item: &Self::Item) -> Option<i64> {
        None
    }

    /// Runs the statement for `items` in one round trip: one answer per item, in their order.
    async fn run(
        &self,
        conn: &mut PgConnection,
        items: &[Self::Item],
    ) -> Result<Vec<Self::Answer>, sqlx::Error>;
}

struct Pending<S: Statement> {
    item: S::Item,
    reply: oneshot::Sender<Result<S::Answer, sqlx::Error>>,
}

/// The handle workers submit through; cheap to clone. The combiner stops once every handle is
/// dropped, after running what it already took.
pub(crate) struct Combiner<S: Statement> {
    tx: mpsc::Sender<Pending<S>>,
}

impl<S: Statement> Clone for Combiner<S> {
    fn clone(&self) -> Self {
        Combiner {
            tx: self.tx.clone(),
        }
    }
}

impl<S: Statement> Combiner<S> {
    /// Starts the combiner task on the current tokio runtime.
    pub fn start(pool: PgPool, statement: S, window: Duration) -> Combiner<S> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(pool, std::sync::Arc::new(statement), rx, window));
        Combiner { tx }
    }

    /// Runs `item` in the next batch and returns its answer once that statement has committed.
    pub async fn submit(&self, item: S::Item) -> Result<S::Answer, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { item, reply })
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        // A dropped reply: the batch's task panicked; nothing is known of its statement.
        answer.await.unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(
                "the batched statement's task failed".to_owned(),
            ))
        })
    }
}

/// The combiner task (see the module doc).
async fn dispatch<S: Statement>(
    pool: PgPool,
    statement: std::sync::Arc<S>,
    mut rx: mpsc::Receiver<Pending<S>>,
    window: Duration,
) {
    let mut held: Option<PoolConnection<Postgres>> = None;
    // Items that met an item of their key in the previous batch: first in the next one.
    let mut carried: Vec<Pending<S>> = Vec::new();
    loop {
        let mut arrived = Vec::new();
        if carried.is_empty() && rx.recv_many(&mut arrived, MAX_BATCH).await == 0 {
            // Every handle dropped and the channel drained.
            return;
        }
        if window.is_zero() {
            // No waiting: what queued while the previous batch ran.
            while carried.len() + arrived.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => arrived.push(p),
                    Err(_) => break,
                }
            }
        }
        let deadline = tokio::time::Instant::now() + window;
        while !window.is_zero() && carried.len() + arrived.len() < MAX_BATCH {
            let room = MAX_BATCH - carried.len() - arrived.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut arrived, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let (batch, rest) = split_by_key(&*statement, carried.drain(..).chain(arrived));
        carried = rest;
        let conn = match held.take() {
            Some(conn) => conn,
            None => match pool.acquire().await {
                Ok(conn) => conn,
                Err(e) => {
                    reply_error(batch, &e);
                    continue;
                }
            },
        };
        // Its own task, so a panic fails only this batch (its workers see an error).
        held = tokio::spawn(run_and_reply(statement.clone(), conn, batch))
            .await
            .ok()
            .flatten();
        if carried.is_empty() && rx.is_empty() {
            // No work waiting: the pool's other users may need the connection.
            held = None;
        }
    }
}

/// The items that can run together (the first of each key) and those that must wait.
fn split_by_key<S: Statement>(
    statement: &S,
    items: impl Iterator<Item = Pending<S>>,
) -> (Vec<Pending<S>>, Vec<Pending<S>>) {
    let mut keys = HashSet::new();
    let (mut batch, mut rest) = (Vec::new(), Vec::new());
    for p in items {
        match statement.key(&p.item) {
            Some(k) if !keys.insert(k) => rest.push(p),
            _ => batch.push(p),
        }
    }
    (batch, rest)
}

/// Runs one batch and answers its workers; gives the connection back if it is still usable.
async fn run_and_reply<S: Statement>(
    statement: std::sync::Arc<S>,
    mut conn: PoolConnection<Postgres>,
    batch: Vec<Pending<S>>,
) -> Option<PoolConnection<Postgres>> {
    let (items, replies): (Vec<S::Item>, Vec<_>) =
        batch.into_iter().map(|p| (p.item, p.reply)).unzip();
    let outcome = statement.run(&mut conn, &items).await.and_then(|answers| {
        if answers.len() == items.len() {
            Ok(answers)
        } else {
            Err(sqlx::Error::Protocol(format!(
                "a batched statement answered {} of {} items",
                answers.len(),
                items.len()
            )))
        }
    });
    match outcome {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The worker may be gone; its statement committed regardless.
                let _ = reply.send(Ok(answer));
            }
            Some(conn)
        }
        Err(e) if items.len() == 1 || is_unavailable(&e) => {
            let usable = !is_unavailable(&e);
            if !usable {
                // Do not hand a broken connection back to the pool.
                conn.close_on_drop();
            }
            if items.len() == 1 {
                let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
            } else {
                for reply in replies {
                    let _ = reply.send(Err(copy_error(&e)));
                }
            }
            usable.then_some(conn)
        }
        Err(e) => {
            tracing::warn!(error.cause_chain = ?e, size = items.len(), "batched statement failed; running its items one by one");
            one_by_one(&*statement, conn, &items, replies).await
        }
    }
}

/// Runs each item as a batch of its own, so each worker gets its own answer or error.
async fn one_by_one<S: Statement>(
    statement: &S,
    mut conn: PoolConnection<Postgres>,
    items: &[S::Item],
    replies: Vec<oneshot::Sender<Result<S::Answer, sqlx::Error>>>,
) -> Option<PoolConnection<Postgres>> {
    let mut usable = true;
    for (item, reply) in items.iter().zip(replies) {
        let result = match statement.run(&mut conn, std::slice::from_ref(item)).await {
            Ok(mut answers) if answers.len() == 1 => Ok(answers.pop().expect("one answer")),
            Ok(_) => Err(sqlx::Error::Protocol(
                "a batched statement answered the wrong number of items".to_owned(),
            )),
            Err(e) => {
                usable &= !is_unavailable(&e);
                Err(e)
            }
        };
        let _ = reply.send(result);
    }
    if !usable {
        conn.close_on_drop();
    }
    usable.then_some(conn)
}

/// Every worker of a batch that could not run gets an error.
fn reply_error<S: Statement>(batch: Vec<Pending<S>>, e: &sqlx::Error) {
    for p in batch {
        let _ = p.reply.send(Err(copy_error(e)));
    }
}

/// An error for each worker of a failed batch (`sqlx::Error` is not `Clone`): the same variant
/// where it carries nothing, else its message.
fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(format!("the batched statement failed: {other}")),
    }
}

#[cfg(test)]
#[path = "combine_tests.rs"]
mod tests;
