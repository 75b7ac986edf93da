//! Writes being stored: the records the engine is writing, from the moment it sends a write
//! until the link state that write produced is committed (docs/sync-rules.md, "An echo without a
//! read").
//!
//! A custom system sends its webhook as soon as it made the change, often before Tether has its
//! answer and nearly always before the worker has stored the stamp the write answered with. The
//! intake's statement then cannot see the echo and enqueues a job, which the engine settles by
//! the same stamp a moment later: a job inserted, claimed and finished for nothing. So the engine
//! marks the record while it writes and stores, and the intake, for an event that may be such an
//! echo, waits for the mark to go before it commits the event.
//!
//! A mark has two phases, and the intake waits differently in each:
//! - [`Phase::Sending`]: the write is sent and not answered. A system may send its webhook before
//!   it answers, and even wait for that delivery before answering; waiting for the answer would
//!   then hold both sides until the bound. So this phase is waited on only briefly
//!   (the `sending_wait` of [`StoringWrites::with_waits`], 50 ms by default): long enough for a system that answers
//!   at once, short enough to cost a system that does not at most that much per write.
//! - [`Phase::Answered`]: the vendor answered and the link's store is running: a batched
//!   statement, normally a few milliseconds, waited on up to its `store_wait` (1 s).
//!
//! Whatever the wait ends with, the event is committed then; if its link does not show the write
//! yet, it becomes a job as before. Marks are per process: a webhook that reaches another replica
//! goes the job path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::RecordKey;

type Marks = Arc<Mutex<HashMap<RecordKey, watch::Receiver<Phase>>>>;

/// Where a marked write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sent to the vendor, not answered yet.
    Sending,
    /// Answered; the link's new state is being stored.
    Answered,
}

/// The records being written and stored; cheap to clone, shared by the engine and the intake of
/// a process.
#[derive(Debug, Clone)]
pub struct StoringWrites {
    marks: Marks,
    sending_wait: Duration,
    store_wait: Duration,
}

impl Default for StoringWrites {
    fn default() -> Self {
        StoringWrites::with_waits(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// The mark of one record; dropping it (once the store returned or the write failed) releases
/// whoever waits for it.
#[derive(Debug)]
pub struct Storing {
    marks: Marks,
    record: RecordKey,
    phase: watch::Sender<Phase>,
}

impl StoringWrites {
    /// Marks whose intake waits at most `sending_wait` for a write's answer and `store_wait` for
    /// its store (the defaults: 50 ms and 1 s).
    pub fn with_waits(sending_wait: Duration, store_wait: Duration) -> StoringWrites {
        StoringWrites {
            marks: Marks::default(),
            sending_wait,
            store_wait,
        }
    }

    /// Marks `record` as being written, until the mark is dropped.
    pub fn mark(&self, record: RecordKey) -> Storing {
        let (phase, waiting) = watch::channel(Phase::Sending);
        lock(&self.marks).insert(record.clone(), waiting);
        Storing {
            marks: self.marks.clone(),
            record,
            phase,
        }
    }

    /// Returns once `record` is not marked, or once a wait of its phase ran out; answers whether
    /// there was a mark to wait for.
    pub async fn wait(&self, record: &RecordKey) -> bool {
        let Some(mut waiting) = lock(&self.marks).get(record).cloned() else {
            return false;
        };
        if *waiting.borrow_and_update() == Phase::Sending {
            let answered = waiting.wait_for(|phase| *phase == Phase::Answered);
            match tokio::time::timeout(self.sending_wait, answered).await {
                Ok(Ok(_)) => {}
                // No answer in time, or the mark is gone (the write failed): commit now.
                Ok(Err(_)) | Err(_) => return true,
            }
        }
        // `changed` fails once the mark's sender is gone: the store returned.
        let stored = async { while waiting.changed().await.is_ok() {} };
        let _ = tokio::time::timeout(self.store_wait, stored).await;
        true
    }

    /// How many records are marked.
    #[cfg(test)]
    fn marked(&self) -> usize {
        lock(&self.marks).len()
    }
}

impl Storing {
    /// The vendor answered the write: from now on the intake waits for the store.
    pub fn answered(&self) {
        self.phase.send_replace(Phase::Answered);
    }
}

impl Drop for Storing {
    fn drop(&mut self) {
        let mut marks = lock(&self.marks);
        // A later mark of the same record (another flow's write) stays.
        if marks
            .get(&self.record)
            .is_some_and(|waiting| waiting.same_channel(&self.phase.subscribe()))
        {
            marks.remove(&self.record);
        }
    }
}

/// The map, even if a panic elsewhere poisoned its lock (it holds no invariant a panic breaks).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SystemId;

    fn record(id: &str) -> RecordKey {
        RecordKey {
            system: SystemId::CustomErp,
            entity_type: "Customer".into(),
            record_id: id.into(),
        }
    }

    fn long_waits() -> StoringWrites {
        StoringWrites::with_waits(Duration::from_secs(60), Duration::from_secs(60))
    }

    /// A task waiting on record 1.
    fn spawn_wait(writes: &StoringWrites) -> tokio::task::JoinHandle<bool> {
        let writes = writes.clone();
        tokio::spawn(async move { writes.wait(&record("1")).await })
    }

    /// What the waiter answered, once the mark it waits on is dropped.
    async fn returned(waiter: tokio::task::JoinHandle<bool>) -> bool {
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter returns once the mark is dropped")
            .unwrap()
    }

    #[tokio::test]
    async fn a_wait_for_an_unmarked_record_returns_at_once() {
        assert!(!long_waits().wait(&record("1")).await);
    }

    #[tokio::test]
    async fn a_wait_lasts_through_the_answer_and_ends_when_the_mark_is_dropped() {
        let writes = long_waits();
        let mark = writes.mark(record("1"));
        let waiter = spawn_wait(&writes);
        tokio::task::yield_now().await;
        mark.answered();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the store has not returned yet");
        drop(mark);
        assert!(returned(waiter).await);
        assert_eq!(writes.marked(), 0);
    }

    #[tokio::test]
    async fn a_write_that_fails_before_its_answer_releases_the_wait() {
        let writes = long_waits();
        let mark = writes.mark(record("1"));
        let waiter = spawn_wait(&writes);
        tokio::task::yield_now().await;
        drop(mark);
        assert!(returned(waiter).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_write_is_waited_for_only_the_sending_bound() {
        let writes = StoringWrites::with_waits(Duration::from_millis(50), Duration::from_secs(60));
        let _mark = writes.mark(record("1"));
        let started = tokio::time::Instant::now();
        assert!(writes.wait(&record("1")).await);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_write_is_waited_for_at_most_the_store_bound() {
        let writes =
            StoringWrites::with_waits(Duration::from_millis(50), Duration::from_millis(500));
        let mark = writes.mark(record("1"));
        mark.answered();
        let started = tokio::time::Instant::now();
        assert!(writes.wait(&record("1")).await);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_older_mark_dropped_after_a_newer_one_of_the_same_record_leaves_the_newer() {
        let writes = long_waits();
        let older = writes.mark(record("1"));
        let newer = writes.mark(record("1"));
        drop(older);
        assert_eq!(writes.marked(), 1);
        drop(newer);
        assert_eq!(writes.marked(), 0);
    }
}
