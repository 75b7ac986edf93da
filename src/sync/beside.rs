//! The `idle` entry of an event (rule 10, docs/sync-rules.md) written in the same statement as the
//! decision of the event's one running flow, instead of a statement of its own.
//!
//! While an event with exactly one running flow is processed, its `idle` entry waits here (a
//! task-local of the job's future, so nothing outlives the job or crosses to another one). The
//! engine's plain log and the link-and-log statement of a linked pair take it and insert it as
//! a second row after the flow's decision, so the log keeps its order (decision, then `idle`).
//! Whatever has not taken it by the end of the event (creation, the guard holding a write, an
//! echo settled by its stamp) leaves it to be written alone, as before. A job that fails writes
//! no `idle` entry, as before: its `error` entry says what happened, and its retry logs both.

use std::cell::RefCell;
use std::future::Future;

use super::decision::Decision;
use super::store::{self, Entry};
use super::SyncEngine;
use crate::queue::ClaimedJob;

tokio::task_local! {
    static BESIDE: RefCell<Option<Entry<'static>>>;
}

/// Runs `f` with `entry` waiting to be written beside the next decision entry that takes it.
pub(super) async fn scope<F: Future>(entry: Option<Entry<'static>>, f: F) -> F::Output {
    BESIDE.scope(RefCell::new(entry), f).await
}

/// The waiting entry, if any (it is then the caller's to write); none outside [`scope`].
pub(super) fn take() -> Option<Entry<'static>> {
    BESIDE
        .try_with(|waiting| waiting.borrow_mut().take())
        .ok()
        .flatten()
}

/// Gives back an entry taken for a statement that did not write it (a link that changed
/// meanwhile), so that the next entry, or the end of the event, writes it.
pub(super) fn put_back(entry: Entry<'static>) {
    let _ = BESIDE.try_with(|waiting| *waiting.borrow_mut() = Some(entry));
}

/// The flows of an event that cannot run beside those that do, and whether their entry is
/// carried by a decision of the event (see the module doc).
#[derive(Clone, Copy)]
pub(super) struct Idle<'a> {
    pub flows: &'a [String],
    pub carried: bool,
}

impl Idle<'_> {
    /// The `idle` entry of these flows; `None` if every flow runs.
    pub fn entry(&self) -> Option<Entry<'static>> {
        (!self.flows.is_empty())
            .then(|| idle_entry("other dataflows of this record are idle", self.flows))
    }
}

/// The entry naming the flows of an event that cannot run, and why (rule 10).
fn idle_entry(what: &str, idle: &[String]) -> Entry<'static> {
    Entry {
        detail: Some(format!("{what}: {}", idle.join("; "))),
        ..Entry::new(Decision::Idle)
    }
}

impl SyncEngine {
    /// Rule 10 for the flows that did not run beside those that did: the `idle` entry, unless a
    /// decision of the event carried it already.
    pub(super) async fn log_idle_beside(
        &self,
        job: &ClaimedJob,
        idle: Idle<'_>,
    ) -> Result<(), sqlx::Error> {
        let entry = if idle.carried { take() } else { idle.entry() };
        match entry {
            Some(entry) => store::log(&self.pool, job, &entry).await,
            None => Ok(()),
        }
    }

    /// One log entry for the flows of an event that cannot run, and why (no flow runs).
    pub(super) async fn log_idle(
        &self,
        job: &ClaimedJob,
        what: &str,
        idle: &[String],
    ) -> Result<(), sqlx::Error> {
        store::log(&self.pool, job, &idle_entry(what, idle)).await
    }
}
