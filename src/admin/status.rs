//! What the admin API and the console show: systems, dataflows, the queue and dead letters, read
//! from the configuration, the registry and PostgreSQL. One set of queries for both surfaces.
//!
//! Reads stay cheap on a large installation: per-flow decision counts and errors come from the
//! most recent [`LOG_WINDOW`] decisions (a primary-key range, never the whole log), the last
//! webhook of a system from the newest events backwards.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use super::AdminState;
use crate::domain::SystemId;

/// How many of the newest `sync_log` entries the per-flow figures cover.
pub const LOG_WINDOW: i64 = 100_000;

/// Errors shown per flow.
const ERRORS_PER_FLOW: i64 = 3;

/// A refusal of credentials newer than this makes `credentials_ok` false (the sync engine leaves a
/// system alone for as long after a 401).
const CREDENTIALS_MEMORY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// One system as an operator sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SystemStatus {
    /// `zendesk`, `exactonline`, ...
    pub system: String,
    pub name: String,
    /// The configuration has the system's section.
    pub connected: bool,
    /// No credential refusal in the last hour (as this replica saw it), and no stored token
    /// stopped by the vendor.
    pub credentials_ok: bool,
    /// Why the credentials are not ok, in a sentence without secrets.
    pub credentials_problem: Option<String>,
    /// Paused dataflows that read or write this system.
    pub paused_flows: Vec<String>,
    /// The newest webhook delivery stored (polled changes excluded).
    pub last_delivery: Option<DateTime<Utc>>,
    /// The newest poll page committed, over the system's cursors.
    pub last_poll: Option<DateTime<Utc>>,
    /// The last poll error of any of its cursors, if the last poll failed.
    pub last_poll_error: Option<String>,
}

pub async fn systems(state: &AdminState) -> Result<Vec<SystemStatus>, sqlx::Error> {
    let pauses = super::pause::list(&state.pool).await?;
    let mut out = Vec::new();
    for system in SystemId::ALL {
        let s = system.as_str();
        let last_delivery: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT received_at FROM events WHERE system = $1 AND delivery_id NOT LIKE 'poll:%' \
             ORDER BY received_at DESC LIMIT 1",
        )
        .bind(s)
        .fetch_optional(&state.pool)
        .await?;
        let (last_poll, last_poll_error): (Option<DateTime<Utc>>, Option<String>) = sqlx::query_as(
            "SELECT max(polled_at), (array_agg(last_error) FILTER (WHERE last_error IS NOT NULL))[1] \
             FROM poll_cursors WHERE system = $1",
        )
        .bind(s)
        .fetch_one(&state.pool)
        .await?;
        let credentials_problem = credentials_problem(&state.pool, system).await?;
        let paused_flows = state
            .registry
            .dataflows
            .iter()
            .filter(|f| f.source.system == system || f.target.system == system)
            .filter(|f| pauses.iter().any(|p| p.flow_id == f.id))
            .map(|f| f.id.clone())
            .collect();
        out.push(SystemStatus {
            system: s.to_owned(),
            name: system.display_name().to_owned(),
            connected: state.config.systems.is_connected(system),
            credentials_ok: credentials_problem.is_none(),
            credentials_problem,
            paused_flows,
            last_delivery,
            last_poll,
            last_poll_error,
        });
    }
    Ok(out)
}

async fn credentials_problem(
    pool: &PgPool,
    system: SystemId,
) -> Result<Option<String>, sqlx::Error> {
    let stopped: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT stopped_at FROM oauth_tokens WHERE system = $1 AND stopped_reason IS NOT NULL \
         ORDER BY stopped_at DESC NULLS LAST LIMIT 1",
    )
    .bind(system.as_str())
    .fetch_optional(pool)
    .await?
    .flatten();
    if let Some(at) = stopped {
        return Ok(Some(format!(
            "the vendor rejected the stored refresh token at {}; configure a new one",
            at.format("%Y-%m-%d %H:%M UTC")
        )));
    }
    Ok(crate::ops::metrics::last_credentials_failure(system)
        .filter(|at| Utc::now() - *at < CREDENTIALS_MEMORY)
        .map(|at| {
            format!(
                "credentials refused at {}; calls are held for an hour or until a restart",
                at.format("%Y-%m-%d %H:%M UTC")
            )
        }))
}

/// One dataflow with what it did lately.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlowStatus {
    pub id: String,
    /// `system/EntityType`.
    pub source: String,
    pub target: String,
    /// The registry's `enabled` switch.
    pub enabled: bool,
    pub paused: bool,
    pub paused_at: Option<DateTime<Utc>>,
    pub links_active: i64,
    pub links_ended: i64,
    /// Decisions among the newest [`LOG_WINDOW`] log entries, by decision.
    pub decisions: BTreeMap<String, i64>,
    /// The newest errors among them, newest first.
    pub last_errors: Vec<FlowError>,
    /// Set while the guard holds the flow's writes after a mass change (docs/guard.md).
    pub guard: Option<GuardStatus>,
}

/// A flow the guard paused.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GuardStatus {
    pub tripped_at: DateTime<Utc>,
    pub reason: String,
    /// Held writes, one per property.
    pub held: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlowError {
    pub at: DateTime<Utc>,
    /// `system/EntityType/id` of the event's record.
    pub record: String,
    pub error: String,
}

pub async fn flows(state: &AdminState) -> Result<Vec<FlowStatus>, sqlx::Error> {
    let facts = FlowFacts::read(&state.pool).await?;
    Ok(state
        .registry
        .dataflows
        .iter()
        .map(|f| facts.status_of(f))
        .collect())
}

/// What the database says about every flow, read in a few grouped queries.
struct FlowFacts {
    pauses: Vec<super::pause::Pause>,
    /// flow, tripped at, reason, held writes.
    trips: Vec<(String, DateTime<Utc>, String, i64)>,
    /// flow, active links, ended links.
    links: Vec<(String, i64, i64)>,
    /// flow, decision, count among the newest [`LOG_WINDOW`] entries.
    decisions: Vec<(String, String, i64)>,
    /// flow, at, record, error: the newest [`ERRORS_PER_FLOW`] per flow.
    errors: Vec<(String, DateTime<Utc>, String, String)>,
}

impl FlowFacts {
    async fn read(pool: &PgPool) -> Result<FlowFacts, sqlx::Error> {
        Ok(FlowFacts {
            pauses: super::pause::list(pool).await?,
            trips: sqlx::query_as(
                "SELECT t.flow_id, t.tripped_at, t.reason, \
                 (SELECT count(*) FROM guard_held h WHERE h.flow_id = t.flow_id) FROM guard_trips t",
            )
            .fetch_all(pool)
            .await?,
            links: sqlx::query_as(
                "SELECT flow_id, count(*) FILTER (WHERE state = 'active'), \
                 count(*) FILTER (WHERE state = 'ended') FROM links GROUP BY flow_id",
            )
            .fetch_all(pool)
            .await?,
            decisions: sqlx::query_as(
                "SELECT flow_id, decision, count(*) FROM sync_log \
                 WHERE id > (SELECT COALESCE(max(id), 0) FROM sync_log) - $1 AND flow_id IS NOT NULL \
                 GROUP BY flow_id, decision",
            )
            .bind(LOG_WINDOW)
            .fetch_all(pool)
            .await?,
            errors: sqlx::query_as(
                "SELECT flow_id, at, record, error FROM (\
                   SELECT flow_id, at, system || '/' || entity_type || '/' || record_id AS record, error, \
                          row_number() OVER (PARTITION BY flow_id ORDER BY id DESC) AS n \
                   FROM sync_log WHERE id > (SELECT COALESCE(max(id), 0) FROM sync_log) - $1 \
                     AND flow_id IS NOT NULL AND error IS NOT NULL) e \
                 WHERE n <= $2 ORDER BY flow_id, at DESC",
            )
            .bind(LOG_WINDOW)
            .bind(ERRORS_PER_FLOW)
            .fetch_all(pool)
            .await?,
        })
    }

    fn status_of(&self, f: &crate::registry::Dataflow) -> FlowStatus {
        let (links_active, links_ended) = self
            .links
            .iter()
            .find(|(id, ..)| *id == f.id)
            .map_or((0, 0), |(_, a, e)| (*a, *e));
        let pause = self.pauses.iter().find(|p| p.flow_id == f.id);
        let mine = |id: &String| *id == f.id;
        FlowStatus {
            id: f.id.clone(),
            source: format!("{}/{}", f.source.system, f.source.entity_type),
            target: format!("{}/{}", f.target.system, f.target.entity_type),
            enabled: f.switches.enabled,
            paused: pause.is_some(),
            paused_at: pause.map(|p| p.paused_at),
            links_active,
            links_ended,
            decisions: self
                .decisions
                .iter()
                .filter(|(id, ..)| mine(id))
                .map(|(_, d, n)| (d.clone(), *n))
                .collect(),
            last_errors: self
                .errors
                .iter()
                .filter(|(id, ..)| mine(id))
                .map(|(_, at, record, error)| FlowError {
                    at: *at,
                    record: record.clone(),
                    error: error.clone(),
                })
                .collect(),
            guard: self.trips.iter().find(|(id, ..)| mine(id)).map(
                |(_, tripped_at, reason, held)| GuardStatus {
                    tripped_at: *tripped_at,
                    reason: reason.clone(),
                    held: *held,
                },
            ),
        }
    }
}

/// A dead letter with its record spelled out.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// The job id (what `retry` takes).
    pub id: i64,
    pub event_id: i64,
    /// `system/EntityType/id`.
    pub record: String,
    pub attempts: i32,
    pub deferrals: i32,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetterView>, sqlx::Error> {
    Ok(crate::queue::store::dead_letters(pool)
        .await?
        .into_iter()
        .map(|d| DeadLetterView {
            id: d.id,
            event_id: d.event_id,
            record: d.record_key,
            attempts: d.attempts,
            deferrals: d.deferrals,
            last_error: d.last_error,
            finished_at: d.finished_at,
        })
        .collect())
}
