//! The sync engine: for each event, read the registry, the links and both sides, decide what to
//! write (three-way merge, references through links, no echoes), write it and record why. The
//! rules as implemented are described in `docs/sync-rules.md`.
//!
//! Owns: the `links`, `link_intents` and `sync_log` tables. Implements [`crate::queue::JobHandler`].
//! May call: `registry`, `connectors`, `queue::enqueue` (fan-out, references synced first), `db`.
//!
//! Layout:
//! - this module: one event end to end: which flows it concerns, the record's current state
//!   (never the event's data), then per flow [`SyncEngine::on_record`] over the record's side;
//! - [`plan`]: the pure planner for a linked pair (no I/O, no clock) and [`apply`] performing
//!   its plan (writes, the link's new state, fan-out);
//! - [`create`]: linking or creating the counterpart of an unlinked source record, with the
//!   create intent committed before the vendor call;
//! - [`echo`]: a custom system's echo recognised by the stamp its webhook carries, unread;
//! - [`unread`]: a custom system's counterpart written without a read, on the stamp Tether's
//!   own settled write left it at;
//! - [`delivery`]: a Zendesk echo recognised by what its webhook says, unread;
//! - [`beside`]: an event's `idle` entry written in the statement of its one flow's decision;
//! - [`noted`]: what a flow decides that sends nothing (only its log entry);
//! - [`references`]: translating ids through links; [`mapping`]: how a flow reads a record;
//! - [`store`]: every statement on `links`, `link_intents` and `sync_log`; [`combine`]: the
//!   per-record ones batched across workers (one statement and one commit per batch);
//! - [`decision`]: the decisions a log entry can record; [`merge`]: the per-property rule;
//!   [`history`]: `tether links show`.
//!
//! Concurrency: the queue runs one job per record at a time, but the two records of a link have
//! different keys. A link's snapshot is therefore replaced optimistically (`version`): a job whose
//! snapshot changed under it returns `Later` and re-reads both sides, which then look converged.

mod apply;
mod backfill;
mod beside;
mod combine;
mod create;
pub mod decision;
pub mod delivery;
mod echo;
pub use echo::{IntakeEcho, IntakeEchoes};
mod guarded;
pub mod history;
mod mapping;
pub mod merge;
mod noted;
mod page_store;
mod plan;
#[cfg(test)]
mod plan_tests;
mod references;
mod resume;
mod store;
pub mod storing;
pub use storing::StoringWrites;
mod unread;
mod unsure;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backfill::store as plans;
use crate::connectors::{ConditionalWrites, Connector, ConnectorError, Record};
use crate::domain::{Action, SystemId};
use crate::queue::{ClaimedJob, JobHandler, JobOutcome};
use crate::registry::{Dataflow, Registry};

/// How the engine learned a record is gone.
#[derive(Debug, Clone, Copy)]
enum Gone {
    /// Reading it found nothing.
    NotFound,
    /// Its system said so in a delete notification it declares final.
    Notified,
}
use beside::Idle;
pub use decision::Decision;
use mapping::entity;
use merge::Side;
use plan::settled_by_one_read;
use sqlx::PgPool;
use store::{Entry, Link};

/// How long a job waits for a referenced record to be synced first.
const REFERENCE_WAIT: Duration = Duration::from_secs(2);
/// How long a system whose credentials were refused is left alone before the next try.
const UNAUTHORIZED_WAIT: Duration = Duration::from_secs(3600);

/// See the module doc.
pub struct SyncEngine {
    pub pool: PgPool,
    pub registry: Arc<Registry>,
    /// Configured systems only: a missing system leaves its flows idle (logged, not an error).
    pub connectors: HashMap<SystemId, Arc<dyn Connector>>,
    /// Systems whose credentials were refused, and until when this process leaves them alone:
    /// every job that needs one is put off without calling it, so one bad token does not become
    /// a 401 per queued job. New credentials (`tether credentials set`, seen by
    /// `crate::credentials::watch`) or a restart clear it.
    stopped: std::sync::Mutex<HashMap<SystemId, std::time::Instant>>,
    /// Dataflows an operator paused (`admin::pause`): recorded as `paused`, replayed on resume.
    paused: crate::admin::pause::PausedFlows,
    /// Counts each flow's writes and holds them past a threshold (`crate::guard`).
    guard: crate::guard::Guard,
    /// The per-record statements batched across workers (`combine`).
    batches: store::Batches,
    /// Records a vendor answered a write of, until the link state is stored (`storing`).
    storing: StoringWrites,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Fail {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "{} is stopped: its credentials were refused; hand it new ones (`tether credentials set`) or wait",
        system.display_name()
    )]
    Stopped {
        system: SystemId,
        remaining: Duration,
    },
    /// The counterpart planned unread had changed: its conditional write wrote nothing, and the
    /// engine reads it and plans again (`unread`).
    #[error("the counterpart changed since Tether wrote it; nothing was written")]
    UnreadChanged,
}

/// The result of one flow for one event.
pub(crate) enum Step {
    Done,
    Later(String),
}

/// A flow that runs for an event: the flow, the record's side and the other side's connector.
type ActiveFlow<'a> = (&'a Dataflow, Side, &'a Arc<dyn Connector>);

/// The flows of one event: those that run (with the record's side and the other side's
/// connector) and why the others cannot.
struct Flows<'a> {
    active: Vec<ActiveFlow<'a>>,
    idle: Vec<String>,
}

impl SyncEngine {
    pub fn new(
        pool: PgPool,
        registry: Arc<Registry>,
        connectors: HashMap<SystemId, Arc<dyn Connector>>,
    ) -> SyncEngine {
        SyncEngine {
            paused: crate::admin::pause::PausedFlows::new(pool.clone()),
            guard: crate::guard::Guard::new(pool.clone(), crate::guard::GuardSettings::default()),
            pool,
            registry,
            connectors,
            stopped: std::sync::Mutex::new(HashMap::new()),
            batches: store::Batches::default(),
            storing: StoringWrites::default(),
        }
    }

    /// The engine marking its writes in `storing`, which the process's intake waits on.
    pub fn with_storing(mut self, storing: StoringWrites) -> SyncEngine {
        self.storing = storing;
        self
    }

    /// The engine with the configuration's `[guard]` settings (the default ones otherwise).
    pub fn with_guard(mut self, settings: crate::guard::GuardSettings) -> SyncEngine {
        self.guard = crate::guard::Guard::new(self.pool.clone(), settings);
        self
    }

    fn connector(&self, system: SystemId) -> Option<&Arc<dyn Connector>> {
        self.connectors.get(&system)
    }

    /// Refuses to go on if one of `systems` is stopped (see [`SyncEngine::stopped`]).
    fn check_not_stopped(&self, systems: impl IntoIterator<Item = SystemId>) -> Result<(), Fail> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        stopped.retain(|_, until| *until > now);
        for system in systems {
            if let Some(until) = stopped.get(&system) {
                return Err(Fail::Stopped {
                    system,
                    remaining: *until - now,
                });
            }
        }
        Ok(())
    }

    fn stop_system(&self, system: SystemId) {
        let until = std::time::Instant::now() + UNAUTHORIZED_WAIT;
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        stopped.insert(system, until);
    }

    /// Logs a decision of the event, with its waiting `idle` entry if there is one
    /// ([`beside`]) in the same statement.
    async fn log(&self, job: &ClaimedJob, e: Entry<'_>) -> Result<(), sqlx::Error> {
        let idle = beside::take();
        store::log_beside(&self.pool, job, &e, idle.as_ref()).await
    }

    /// The flows that have the event's record type on either side; `None` if there are none.
    /// Flows that cannot run (switched off, or a side not connected) are set aside, so that an
    /// event only they would handle costs no API call and one log entry.
    fn flows_of(&self, job: &ClaimedJob) -> Option<Flows<'_>> {
        let rec = &job.event.record;
        let mut flows = Flows {
            active: Vec::new(),
            idle: Vec::new(),
        };
        let mut any = false;
        for flow in &self.registry.dataflows {
            for side in [Side::Source, Side::Target] {
                let e = entity(flow, side);
                if e.system != rec.system || e.entity_type != rec.entity_type {
                    continue;
                }
                any = true;
                if !flow.switches.enabled {
                    flows.idle.push(format!("{} is switched off", flow.id));
                    continue;
                }
                let other = entity(flow, side.other()).system;
                let missing = match (self.connector(rec.system), self.connector(other)) {
                    (Some(_), Some(other_conn)) => {
                        flows.active.push((flow, side, other_conn));
                        continue;
                    }
                    (None, _) => rec.system,
                    (_, None) => other,
                };
                flows.idle.push(format!(
                    "{} ({} is not connected)",
                    flow.id,
                    missing.display_name()
                ));
            }
        }
        any.then_some(flows)
    }

    async fn run(&self, job: &ClaimedJob) -> Result<Option<String>, Fail> {
        let rec = &job.event.record;
        let Some(flows) = self.flows_of(job) else {
            let detail = format!(
                "no dataflow has {}/{} on either side",
                rec.system, rec.entity_type
            );
            self.log(
                job,
                Entry {
                    detail: Some(detail),
                    ..Entry::new(Decision::NoDataflow)
                },
            )
            .await?;
            return Ok(None);
        };
        let (Some(conn), false) = (self.connector(rec.system), flows.active.is_empty()) else {
            self.log_idle(job, "every dataflow of this record is idle", &flows.idle)
                .await?;
            return Ok(None);
        };
        let active = self.set_aside_paused(job, flows.active).await?;
        // A backfill job runs exactly the flows its plan items name (docs/backfill.md).
        let planned = self.planned_items(job).await?;
        let active = backfill::restrict_to_plan(active, &planned);
        if active.is_empty() {
            return Ok(None);
        }
        self.check_not_stopped(
            std::iter::once(rec.system).chain(
                active
                    .iter()
                    .map(|(f, side, _)| entity(f, side.other()).system),
            ),
        )?;
        // A backfill page reads its records itself, all at once.
        if plans::is_page_event(&job.event) {
            return self.run_page(job, conn, active, &planned).await;
        }
        // A final delete needs no read (docs/vendors.md, Exact Online item 3): its links end.
        if job.event.action == Action::Deleted && conn.deletes_are_final() {
            self.record_deleted(job, Gone::Notified).await?;
            return Ok(None);
        }
        // With one flow running, its decision carries the `idle` entry (one statement, not two).
        let idle = Idle {
            flows: &flows.idle,
            carried: active.len() == 1,
        };
        let waiting = idle.carried.then(|| idle.entry()).flatten();
        beside::scope(waiting, self.run_flows(job, conn, active, &planned, idle)).await
    }

    /// The flows of an event that run: the record read once (or an echo settled unread), then
    /// each flow over the record's side; then the `idle` entry if no decision carried it.
    async fn run_flows(
        &self,
        job: &ClaimedJob,
        conn: &Arc<dyn Connector>,
        active: Vec<ActiveFlow<'_>>,
        planned: &[plans::PlannedItem],
        idle: Idle<'_>,
    ) -> Result<Option<String>, Fail> {
        let rec = &job.event.record;
        // A custom system's own echo, recognised by the stamp its webhook carries.
        if planned.is_empty() && self.echo_by_stamp(job, &active, idle).await? {
            return Ok(None);
        }
        // A Zendesk echo, recognised by the value and stamp its webhook carries.
        let (mut looked, mut described) = (None, None);
        if planned.is_empty() {
            match self.echo_by_delivery(job, &active).await? {
                delivery::ByDelivery::Echo => {
                    self.log_idle_beside(job, idle).await?;
                    return Ok(None);
                }
                delivery::ByDelivery::Looked(link, d) => (looked, described) = (Some(link), d),
                delivery::ByDelivery::NotTried => {}
            }
        }
        // Rule 7: the current state, never the event's data; or the state a Zendesk delivery
        // describes, newer than anything the link has seen (docs/sync-rules.md).
        let current = match described {
            Some(record) => Some(*record),
            None => conn.fetch(&rec.entity_type, &rec.record_id).await?,
        };
        let Some(current) = current else {
            self.record_deleted(job, Gone::NotFound).await?;
            self.planned_record_gone(planned).await?;
            return Ok(None);
        };
        let mut later: Vec<String> = Vec::new();
        for (flow, side, other_conn) in active {
            let step = match planned.iter().find(|i| i.flow_id == flow.id) {
                Some(item) => {
                    self.on_planned(job, flow, &current, other_conn, item)
                        .await?
                }
                None => {
                    let record = (side, &current);
                    self.on_record_with(job, flow, record, other_conn, looked.take())
                        .await?
                }
            };
            if let Step::Later(reason) = step {
                later.push(format!("{}: {reason}", flow.id));
            }
        }
        self.log_idle_beside(job, idle).await?;
        Ok((!later.is_empty()).then(|| later.join("; ")))
    }

    /// Records a `paused` entry for each active flow an operator paused and returns the others
    /// (`admin::pause` replays the recorded events on resume).
    async fn set_aside_paused<'f>(
        &self,
        job: &ClaimedJob,
        active: Vec<ActiveFlow<'f>>,
    ) -> Result<Vec<ActiveFlow<'f>>, sqlx::Error> {
        let paused = self.paused.current().await;
        let (held, run): (Vec<_>, Vec<_>) = active
            .into_iter()
            .partition(|(f, _, _)| paused.contains(&f.id));
        for (flow, _, _) in held {
            let entry = Entry {
                flow: Some(&flow.id),
                detail: Some("the dataflow is paused by an operator".to_owned()),
                ..Entry::new(Decision::Paused)
            };
            self.log(job, entry).await?;
        }
        Ok(run)
    }

    /// Rule 9: a deleted record's links end; the counterparts stay.
    async fn record_deleted(&self, job: &ClaimedJob, gone: Gone) -> Result<(), sqlx::Error> {
        let what = match gone {
            Gone::NotFound => "record not found at its system",
            Gone::Notified => "its system says the record was deleted (final, not re-read)",
        };
        let ended = store::end_links_of(&self.pool, &job.event.record).await?;
        if ended.is_empty() {
            let detail = match gone {
                Gone::NotFound => {
                    format!("{what} (deleted, or never of this type); it had no active links")
                }
                Gone::Notified => format!("{what}; it had no active links"),
            };
            let entry = Entry {
                detail: Some(detail),
                ..Entry::new(Decision::NotFound)
            };
            self.log(job, entry).await?;
        }
        for (link_id, flow) in ended {
            let entry = Entry {
                flow: Some(&flow),
                link: Some(link_id),
                detail: Some(format!("{what}: link ended, counterpart kept")),
                ..Entry::new(Decision::Deleted)
            };
            self.log(job, entry).await?;
        }
        Ok(())
    }

    /// The event's record (`record`, on `side` of `flow`), whose counterpart lives behind
    /// `other_conn`: a linked record is settled by its own read when it matches the snapshot,
    /// else merged with its counterpart; an unlinked source record is linked or created; an
    /// unlinked target record is never created back (rule 1).
    async fn on_record(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        side: Side,
        record: &Record,
        other_conn: &Arc<dyn Connector>,
    ) -> Result<Step, Fail> {
        self.on_record_with(job, flow, (side, record), other_conn, None)
            .await
    }

    /// [`SyncEngine::on_record`] with the flow's link as already looked up for this event, if
    /// it was (`Some`): it is then not looked up again.
    async fn on_record_with(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        (side, record): (Side, &Record),
        other_conn: &Arc<dyn Connector>,
        looked: Option<Option<Link>>,
    ) -> Result<Step, Fail> {
        if side == Side::Source && private_and_held_back(flow, record) {
            return self.private_comment(job, flow, record).await;
        }
        let link = match looked {
            Some(link) => link,
            None => store::find_link(&self.pool, flow, side, &record.id).await?,
        };
        let Some(link) = link else {
            return match side {
                Side::Source => self.create_or_link(job, flow, record, other_conn).await,
                Side::Target => self.not_created_back(job, flow, record).await,
            };
        };
        if let Some(decision) = settled_by_one_read(flow, &link, record, side) {
            return self
                .nothing_to_send(job, flow, &link, record, side, decision)
                .await;
        }
        let other = side.other();
        let other_type = &entity(flow, other).entity_type;
        if other_conn.conditional_writes(other_type) == ConditionalWrites::Exact {
            if let Some(step) = self.write_unread(job, flow, &link, (side, record)).await? {
                return Ok(step);
            }
        }
        let Some(counterpart) = other_conn.fetch(other_type, link.id_on(other)).await? else {
            return self.counterpart_gone(job, flow, &link, other).await;
        };
        let (src, tgt) = match side {
            Side::Source => (record, &counterpart),
            Side::Target => (&counterpart, record),
        };
        self.sync_linked(job, flow, link.clone(), src, tgt, side)
            .await
    }

    /// What the queue does with a job whose event failed, and the decision logged for it.
    fn outcome_of(&self, job: &ClaimedJob, failure: &Fail) -> (JobOutcome, Decision) {
        let message = failure.to_string();
        let e = match failure {
            Fail::Db(_) => return (JobOutcome::Retry { error: message }, Decision::Error),
            // Put off without a call: the refusal that stopped the system was logged once.
            Fail::Stopped { remaining, .. } => {
                let later = JobOutcome::Later {
                    after: Some(*remaining),
                    reason: message,
                };
                return (later, Decision::SystemStopped);
            }
            // Not reached: the engine reads the counterpart instead.
            Fail::UnreadChanged => {
                let later = JobOutcome::Later {
                    after: Some(REFERENCE_WAIT),
                    reason: message,
                };
                return (later, Decision::Conflict);
            }
            Fail::Connector(e) => e,
        };
        let later = |after: Duration| JobOutcome::Later {
            after: Some(after),
            reason: message.clone(),
        };
        let outcome = match e {
            ConnectorError::RateLimited { retry_after, .. } => {
                later(retry_after.unwrap_or(Duration::from_secs(30)))
            }
            ConnectorError::Timeout { .. } => later(Duration::from_secs(10)),
            ConnectorError::Transient { .. } => JobOutcome::Retry {
                error: message.clone(),
            },
            ConnectorError::Rejected { .. } | ConnectorError::Unsupported { .. } => {
                JobOutcome::Dead {
                    error: format!("{message} (retrying the same request would not help)"),
                }
            }
            // A decision, not a failure: the record refuses every write in its state
            // (docs/vendors.md, Zendesk "Closed tickets refuse updates").
            ConnectorError::TargetClosed { .. } => {
                return (JobOutcome::Done, Decision::TargetClosed)
            }
            ConnectorError::Unauthorized { system, .. } => {
                self.stop_system(*system);
                tracing::error!(
                    %system,
                    record = %job.event.record,
                    "credentials refused: {} is stopped until the operator fixes them",
                    system.display_name()
                );
                later(UNAUTHORIZED_WAIT)
            }
            ConnectorError::NotConfigured { .. } => {
                return (JobOutcome::Done, Decision::NotConnected)
            }
            // The record changed between the read and the write, which named its stamp: its own
            // event follows, and this one is synced again on fresh reads.
            ConnectorError::Changed { .. } => return (later(REFERENCE_WAIT), Decision::Conflict),
        };
        (outcome, Decision::Error)
    }
}

#[async_trait]
impl JobHandler for SyncEngine {
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
        let failure = match self.run(job).await {
            Ok(None) => return JobOutcome::Done,
            Ok(Some(reason)) => {
                return JobOutcome::Later {
                    after: Some(REFERENCE_WAIT),
                    reason,
                }
            }
            Err(failure) => failure,
        };
        let (outcome, decision) = self.outcome_of(job, &failure);
        let entry = Entry {
            error: Some(failure.to_string()),
            ..Entry::new(decision)
        };
        if let Err(e) = self.log(job, entry).await {
            tracing::warn!(error = %e, "could not record a sync error in sync_log");
        }
        outcome
    }
}

/// Whether `record` is a private Zendesk ticket comment that `flow` does not carry onwards
/// (`public: false`, and the flow's `sync_private_comments` switch off).
fn private_and_held_back(flow: &Dataflow, record: &Record) -> bool {
    flow.source.system == crate::domain::SystemId::Zendesk
        && flow.source.entity_type == "Ticketcomments"
        && !flow.switches.sync_private_comments
        && record.fields.get("public") == Some(&serde_json::Value::Bool(false))
}
