//! Writes being stored: the records a vendor has answered a write of, while the link state that
//! write produced is not yet committed (docs/sync-rules.md, "An echo without a read").
//!
//! A custom system sends its webhook of Tether's own write as soon as it made the change, and
//! the webhook can reach the intake before the worker has stored the link's new stamp. The
//! intake's statement then cannot see the echo and enqueues a job, which the engine settles by
//! the same stamp a moment later: a job inserted, claimed and finished for nothing (measured in
//! `tether-sync-bench`: about 0.45 jobs per linked update). So the worker marks the record from
//! the vendor's answer until its store returns, and the intake, for an event that may be such an
//! echo, waits for the mark to go (at most [`StoringWrites::wait`]'s bound) before it commits the
//! event.
//!
//! The mark begins only once the vendor answered, never before the write is sent: a system that
//! sends its webhook before answering the write would otherwise make each wait for the other.
//! Marks are per process; a webhook that reaches another replica goes the job path, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::RecordKey;

/// The records being stored; cheap to clone, shared by the engine and the intake of a process.
#[derive(Debug, Clone, Default)]
pub struct StoringWrites {
    marks: Arc<Mutex<HashMap<RecordKey, watch::Receiver<()>>>>,
}

/// The mark of one record; dropping it (once the store returned, whatever it returned) releases
/// whoever waits for it.
#[derive(Debug)]
pub struct Storing {
    marks: Arc<Mutex<HashMap<RecordKey, watch::Receiver<()>>>>,
    record: RecordKey,
    /// Dropped with the mark: the waiters' `changed()` then returns.
    _done: watch::Sender<()>,
}

impl StoringWrites {
    /// Marks `record` as written by the vendor and not yet stored, until the mark is dropped.
    pub fn mark(&self, record: RecordKey) -> Storing {
        let (done, waiting) = watch::channel(());
        lock(&self.marks).insert(record.clone(), waiting);
        Storing {
            marks: self.marks.clone(),
            record,
            _done: done,
        }
    }

    /// Returns once `record` is not marked, or after `bound`; answers whether it waited.
    pub async fn wait(&self, record: &RecordKey, bound: Duration) -> bool {
        let Some(mut waiting) = lock(&self.marks).get(record).cloned() else {
            return false;
        };
        // `changed` fails once the mark's sender is gone: the store returned.
        let _ = tokio::time::timeout(bound, waiting.changed()).await;
        true
    }

    /// How many records are marked (for tests).
    pub fn len(&self) -> usize {
        lock(&self.marks).len()
    }

    /// No record is marked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Storing {
    fn drop(&mut self) {
        let mut marks = lock(&self.marks);
        // A later mark of the same record (another flow's write) stays.
        if marks
            .get(&self.record)
            .is_some_and(|waiting| waiting.same_channel(&self._done.subscribe()))
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

    #[tokio::test]
    async fn a_wait_for_an_unmarked_record_returns_at_once() {
        let writes = StoringWrites::default();
        assert!(!writes.wait(&record("1"), Duration::from_secs(60)).await);
    }

    #[tokio::test]
    async fn a_wait_returns_when_the_mark_is_dropped() {
        let writes = StoringWrites::default();
        let mark = writes.mark(record("1"));
        let waiter = {
            let writes = writes.clone();
            tokio::spawn(async move { writes.wait(&record("1"), Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(mark);
        let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter returns once the mark is dropped")
            .unwrap();
        assert!(waited);
        assert!(writes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_gives_up_after_its_bound() {
        let writes = StoringWrites::default();
        let _mark = writes.mark(record("1"));
        let started = tokio::time::Instant::now();
        assert!(writes.wait(&record("1"), Duration::from_millis(500)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_older_mark_dropped_after_a_newer_one_of_the_same_record_leaves_the_newer() {
        let writes = StoringWrites::default();
        let older = writes.mark(record("1"));
        let newer = writes.mark(record("1"));
        drop(older);
        assert_eq!(writes.len(), 1);
        drop(newer);
        assert!(writes.is_empty());
    }
}
