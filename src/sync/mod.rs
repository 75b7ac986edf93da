//! The sync engine: for each event, read the registry, the links and both sides, decide what to
//! write (three-way merge, references through links, no echoes), write it and record why.
//!
//! Owns: the `links`, `link_intents` and `sync_log` tables. Implements [`crate::queue::JobHandler`].
//! May call: `registry`, `connectors`, `queue::enqueue` (fan-out, references synced first), `db`.
//!
//! How one event is handled (product.md section 3):
//! - the record's current state is fetched; the event's own data is never applied, so stale or
//!   out-of-order events are harmless (rule 7), and "not found" means deleted: its links end and
//!   the counterpart stays (rule 9);
//! - for every flow whose source is the record's type: a linked record is merged with its
//!   counterpart both ways (rules 2-4); an unlinked one is linked by the idempotency key of an
//!   earlier attempt, then by merge criteria, else created (rules 1, 8), with the intent committed
//!   before the vendor call;
//! - for every flow whose target is the record's type: a linked record is merged the same way; an
//!   unlinked one is never created back (rule 1);
//! - a reference is translated through links; an unlinked referenced record is enqueued first and
//!   the event waits (`Later`); a reference no flow can link is left unset and counted (rule 5);
//! - a record written in system X is enqueued (synthetic event) when X's type takes part in other
//!   flows, so chains run without waiting for X's webhook (rule 6);
//! - every decision is a `sync_log` row (rule 10).
//!
//! Concurrency: the queue runs one job per record at a time, but the two records of a link have
//! different keys. A link's snapshot is therefore replaced optimistically (`version`): a job whose
//! snapshot changed under it returns `Later` and re-reads both sides, which then look converged.

pub mod history;
pub mod merge;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::connectors::{set_path, Connector, ConnectorError, Record};
use crate::domain::{Action, ChangeEvent, RecordKey, SystemId};
use crate::queue::{self, ClaimedJob, JobHandler, JobOutcome, NewJob};
use crate::registry::{Dataflow, Direction, EntityRef, PropertyMapping, Registry, Resolution};
use merge::{decide, normalize, ref_id, Decision, PropertyFacts, Side};

/// How long a job waits for a referenced record to be synced first.
const REFERENCE_WAIT: Duration = Duration::from_secs(2);
/// How long a system whose credentials were refused is left alone before the next try.
const UNAUTHORIZED_WAIT: Duration = Duration::from_secs(3600);
/// A create intent's lease: another job seeing it live waits rather than creating concurrently.
const INTENT_LEASE_SECS: i64 = 120;

/// See the module doc.
pub struct SyncEngine {
    pub pool: PgPool,
    pub registry: Arc<Registry>,
    /// Configured systems only: a missing system leaves its flows idle (logged, not an error).
    pub connectors: HashMap<SystemId, Arc<dyn Connector>>,
    /// Systems whose credentials were refused, and until when this process leaves them alone:
    /// every job that needs one is put off without calling it, so one bad token does not become
    /// a 401 per queued job. A restart (after fixing the credentials) clears it.
    stopped: std::sync::Mutex<HashMap<SystemId, std::time::Instant>>,
    /// Dataflows an operator paused (`admin::pause`): recorded as `paused`, replayed on resume.
    paused: crate::admin::pause::PausedFlows,
}

#[derive(Debug, thiserror::Error)]
enum Fail {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "{} is stopped: its credentials were refused; fix them and restart, or wait",
        system.display_name()
    )]
    Stopped {
        system: SystemId,
        remaining: Duration,
    },
}

/// The result of one flow for one event.
enum Step {
    Done,
    Later(String),
}

/// An active link as the engine reads it.
#[derive(Debug, Clone)]
struct Link {
    id: i64,
    source_id: String,
    target_id: String,
    snapshot: Map<String, Value>,
    source_seen_at: Option<DateTime<Utc>>,
    target_seen_at: Option<DateTime<Utc>>,
    last_write_side: Option<String>,
    version: i64,
}

/// A referenced id translated to the other side.
#[derive(Debug, Clone, PartialEq)]
enum Translation {
    Found(String),
    /// Not linked yet, but a flow could link it: these records are synced first.
    Pending(Vec<RecordKey>),
    /// No flow links these types: the reference is left unset.
    Impossible,
}

/// One `sync_log` row (the record is the event's).
#[derive(Default)]
struct Entry<'a> {
    flow: Option<&'a str>,
    link: Option<i64>,
    decision: &'a str,
    read: Option<Value>,
    written: Option<Value>,
    detail: Option<String>,
    error: Option<String>,
}

/// Values to build a create with.
struct Built {
    fields: Map<String, Value>,
    snapshot: Map<String, Value>,
    pending: Vec<RecordKey>,
    unset: Vec<String>,
}

fn key(p: &PropertyMapping) -> String {
    format!("{}>{}", p.source, p.target)
}

fn path(p: &PropertyMapping, side: Side) -> &str {
    match side {
        Side::Source => &p.source,
        Side::Target => &p.target,
    }
}

fn entity(flow: &Dataflow, side: Side) -> &EntityRef {
    match side {
        Side::Source => &flow.source,
        Side::Target => &flow.target,
    }
}

/// The flow's property mappings that are synced at all (the registry keeps seed mappings that
/// cannot be synced, such as one onto Zendesk's read-only `url`, marked `Off`).
fn synced(flow: &Dataflow) -> impl Iterator<Item = &PropertyMapping> {
    flow.properties.iter().filter(|p| p.syncs_to_target())
}

/// The entity types a reference may point at on one side.
fn ref_types(p: &PropertyMapping, side: Side) -> Vec<String> {
    match (&p.reference, side) {
        (Some(r), Side::Source) => r.source_types.clone(),
        (Some(r), Side::Target) => vec![r.target_type.clone()],
        (None, _) => Vec::new(),
    }
}

/// The mapped values of one side, for the log.
fn mapped(flow: &Dataflow, side: Side, record: &Record) -> Value {
    let mut out = Map::new();
    for p in synced(flow) {
        let path = path(p, side);
        out.insert(path.to_owned(), normalize(record.get_path(path)));
    }
    json!({ "id": record.id, "updated_at": record.updated_at, "values": out })
}

fn ref_pair(s: Option<&str>, t: Option<&str>) -> Value {
    json!({ "s": s, "t": t })
}

fn ref_part(base: Option<&Value>, part: &str) -> Option<String> {
    base.and_then(|b| b.get(part)).and_then(|v| ref_id(Some(v)))
}

/// The snapshot of a counterpart an earlier attempt created: its own values, and for references
/// the pair the source would give now if it still translates to the counterpart's id.
fn base_from_created(
    flow: &Dataflow,
    built: &Map<String, Value>,
    created: &Record,
) -> Map<String, Value> {
    let mut base = Map::new();
    for p in synced(flow) {
        let k = key(p);
        if p.reference.is_none() {
            base.insert(k, normalize(created.get_path(&p.target)));
            continue;
        }
        let t = ref_id(created.get_path(&p.target));
        let pair = match built.get(&k) {
            Some(pair) if ref_part(Some(pair), "t") == t => pair.clone(),
            _ => ref_pair(None, t.as_deref()),
        };
        base.insert(k, pair);
    }
    base
}

/// Whether a linked record, just read, shows every synced property as the link's snapshot has it,
/// so it has nothing to send (rule 3; usually the echo of Tether's own write). Then the other side
/// need not be read: a change there is that record's own event, handled when it arrives. A read
/// older than the state last synced is not trusted here; the full comparison retries it.
fn matches_snapshot(flow: &Dataflow, link: &Link, record: &Record, side: Side) -> bool {
    let (seen, part) = match side {
        Side::Source => (link.source_seen_at, "s"),
        Side::Target => (link.target_seen_at, "t"),
    };
    if stale(record.updated_at, seen) {
        return false;
    }
    synced(flow).all(|p| {
        let base = link.snapshot.get(&key(p));
        let value = record.get_path(path(p, side));
        match &p.reference {
            None => base == Some(&normalize(value)),
            Some(_) => base.is_some() && ref_part(base, part) == ref_id(value),
        }
    })
}

/// The columns of a `sync_log` row and their parameters, shared by the plain log insert and the
/// one that commits with a link's new state.
const LOG_COLUMNS: &str = "(event_id, job_id, attempt, system, entity_type, record_id, flow_id, \
                           link_id, decision, read, written, detail, error)";
const LOG_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13";

/// A log entry on its own.
static LOG_SQL: LazyLock<String> =
    LazyLock::new(|| format!("INSERT INTO sync_log {LOG_COLUMNS} VALUES ({LOG_VALUES})"));

/// A linked record's new state and its log entry, in one statement (see
/// [`SyncEngine::store_sync`]); the entry is written only if the link was updated.
static STORE_SYNC_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH updated AS (\
            UPDATE links SET snapshot = $14, source_seen_at = $15, target_seen_at = $16, \
            last_write_side = COALESCE($17, last_write_side), version = version + 1, \
            updated_at = now() WHERE id = $18 AND version = $19 AND state = 'active' \
            RETURNING id) \
         INSERT INTO sync_log {LOG_COLUMNS} SELECT {LOG_VALUES} FROM updated"
    )
});

/// Binds a log entry as parameters $1 to $13 (see [`LOG_COLUMNS`]).
fn bind_entry<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    job: &'q ClaimedJob,
    e: &'q Entry<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let r = &job.event.record;
    crate::ops::metrics::sync_decision(e.flow, e.decision);
    query
        .bind(job.event_id)
        .bind(job.job_id)
        .bind(job.attempt)
        .bind(r.system.as_str())
        .bind(&r.entity_type)
        .bind(&r.record_id)
        .bind(e.flow)
        .bind(e.link)
        .bind(e.decision)
        .bind(&e.read)
        .bind(&e.written)
        .bind(&e.detail)
        .bind(&e.error)
}

/// A link's state after a sync: the snapshot, the change stamps last seen on each side
/// (source, target), and the side written last, if one was.
struct LinkState {
    snapshot: Map<String, Value>,
    seen: [Option<DateTime<Utc>>; 2],
    last_write: Option<Side>,
}

/// `seen` is newer than what was just read: the read is stale.
fn stale(read: Option<DateTime<Utc>>, seen: Option<DateTime<Utc>>) -> bool {
    matches!((read, seen), (Some(r), Some(s)) if r < s)
}

impl SyncEngine {
    pub fn new(
        pool: PgPool,
        registry: Arc<Registry>,
        connectors: HashMap<SystemId, Arc<dyn Connector>>,
    ) -> SyncEngine {
        SyncEngine {
            pool: pool.clone(),
            registry,
            connectors,
            stopped: std::sync::Mutex::new(HashMap::new()),
            paused: crate::admin::pause::PausedFlows::new(pool.clone()),
        }
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

    async fn log(&self, job: &ClaimedJob, e: Entry<'_>) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        Self::log_in(&mut conn, job, e).await
    }

    /// Logs inside the caller's transaction, so a decision and the state it produced commit
    /// together.
    async fn log_in(
        conn: &mut PgConnection,
        job: &ClaimedJob,
        e: Entry<'_>,
    ) -> Result<(), sqlx::Error> {
        bind_entry(sqlx::query(&LOG_SQL), job, &e)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Stores a linked record's new snapshot and change stamps, and logs the decision, in one
    /// statement (one round trip and one commit when the caller passes the pool). False when the
    /// link changed meanwhile (its version moved on): then nothing was stored or logged.
    async fn store_sync(
        conn: impl sqlx::PgExecutor<'_>,
        job: &ClaimedJob,
        entry: &Entry<'_>,
        link: &Link,
        state: LinkState,
    ) -> Result<bool, sqlx::Error> {
        let done = bind_entry(sqlx::query(&STORE_SYNC_SQL), job, entry)
            .bind(Value::Object(state.snapshot))
            .bind(state.seen[0])
            .bind(state.seen[1])
            .bind(state.last_write.map(Side::as_str))
            .bind(link.id)
            .bind(link.version)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn run(&self, job: &ClaimedJob) -> Result<Option<String>, Fail> {
        let rec = &job.event.record;
        let involved: Vec<(&Dataflow, Side)> = self
            .registry
            .dataflows
            .iter()
            .flat_map(|f| {
                let mut v = Vec::new();
                if f.source.system == rec.system && f.source.entity_type == rec.entity_type {
                    v.push((f, Side::Source));
                }
                if f.target.system == rec.system && f.target.entity_type == rec.entity_type {
                    v.push((f, Side::Target));
                }
                v
            })
            .collect();
        if involved.is_empty() {
            self.log(
                job,
                Entry {
                    decision: "no_dataflow",
                    detail: Some(format!(
                        "no dataflow has {}/{} on either side",
                        rec.system, rec.entity_type
                    )),
                    ..Entry::default()
                },
            )
            .await?;
            return Ok(None);
        }
        let involved = self.set_aside_paused(job, involved).await?;
        if involved.is_empty() {
            return Ok(None);
        }
        // Flows that cannot run (switched off, or a side not connected) are set aside first, so
        // that an event only they would handle costs no API call and one log line.
        let mut idle: Vec<String> = Vec::new();
        let mut active: Vec<(&Dataflow, Side, &Arc<dyn Connector>)> = Vec::new();
        for (flow, side) in involved {
            if !flow.switches.enabled {
                idle.push(format!("{} is switched off", flow.id));
                continue;
            }
            let other = entity(flow, side.other()).system;
            let missing = match (self.connector(rec.system), self.connector(other)) {
                (Some(_), Some(other_conn)) => {
                    active.push((flow, side, other_conn));
                    continue;
                }
                (None, _) => rec.system,
                (_, None) => other,
            };
            idle.push(format!(
                "{} ({} is not connected)",
                flow.id,
                missing.display_name()
            ));
        }
        let (Some(conn), false) = (self.connector(rec.system), active.is_empty()) else {
            self.log_idle(job, "every dataflow of this record is idle", &idle)
                .await?;
            return Ok(None);
        };
        self.check_not_stopped(
            std::iter::once(rec.system).chain(
                active
                    .iter()
                    .map(|(f, side, _)| entity(f, side.other()).system),
            ),
        )?;
        // Rule 7: the current state, never the event's data.
        let current = conn.fetch(&rec.entity_type, &rec.record_id).await?;
        let Some(current) = current else {
            self.record_deleted(job).await?;
            return Ok(None);
        };
        let mut later: Vec<String> = Vec::new();
        for (flow, side, other_conn) in active {
            let step = match side {
                Side::Source => {
                    self.on_source_record(job, flow, &current, other_conn)
                        .await?
                }
                Side::Target => {
                    self.on_target_record(job, flow, &current, other_conn)
                        .await?
                }
            };
            if let Step::Later(reason) = step {
                later.push(format!("{}: {reason}", flow.id));
            }
        }
        // Rule 10 for the flows that did not run beside those that did.
        if !idle.is_empty() {
            self.log_idle(job, "other dataflows of this record are idle", &idle)
                .await?;
        }
        Ok((!later.is_empty()).then(|| later.join("; ")))
    }

    /// Records a `paused` entry for each involved flow an operator paused and returns the others
    /// (`admin::pause` replays the recorded events on resume).
    async fn set_aside_paused<'f>(
        &self,
        job: &ClaimedJob,
        involved: Vec<(&'f Dataflow, Side)>,
    ) -> Result<Vec<(&'f Dataflow, Side)>, sqlx::Error> {
        let paused = self.paused.current().await;
        let (held, run): (Vec<_>, Vec<_>) = involved
            .into_iter()
            .partition(|(f, _)| paused.contains(&f.id));
        for (flow, _) in held {
            let entry = Entry {
                flow: Some(&flow.id),
                decision: crate::admin::pause::PAUSED_DECISION,
                detail: Some("the dataflow is paused by an operator".to_owned()),
                ..Entry::default()
            };
            self.log(job, entry).await?;
        }
        Ok(run)
    }

    /// One log entry for the flows of this event that cannot run, and why.
    async fn log_idle(
        &self,
        job: &ClaimedJob,
        what: &str,
        idle: &[String],
    ) -> Result<(), sqlx::Error> {
        self.log(
            job,
            Entry {
                decision: "idle",
                detail: Some(format!("{what}: {}", idle.join("; "))),
                ..Entry::default()
            },
        )
        .await
    }

    /// Rule 9: a deleted record's links end; the counterparts stay.
    async fn record_deleted(&self, job: &ClaimedJob) -> Result<(), sqlx::Error> {
        let r = &job.event.record;
        let ended = sqlx::query(
            "UPDATE links SET state = 'ended', ended_at = now(), updated_at = now(), \
             end_reason = CASE WHEN source_system = $1 AND source_type = $2 AND source_id = $3 \
                THEN 'source record deleted' ELSE 'target record deleted' END \
             WHERE state = 'active' AND ((source_system = $1 AND source_type = $2 AND source_id = $3) \
                OR (target_system = $1 AND target_type = $2 AND target_id = $3)) \
             RETURNING id, flow_id",
        )
        .bind(r.system.as_str())
        .bind(&r.entity_type)
        .bind(&r.record_id)
        .fetch_all(&self.pool)
        .await?;
        if ended.is_empty() {
            self.log(
                job,
                Entry {
                    decision: "not_found",
                    detail: Some(
                        "record not found at its system (deleted, or never of this type); \
                         it had no active links"
                            .into(),
                    ),
                    ..Entry::default()
                },
            )
            .await?;
        }
        for row in ended {
            let flow: String = row.try_get("flow_id")?;
            self.log(
                job,
                Entry {
                    flow: Some(&flow),
                    link: Some(row.try_get("id")?),
                    decision: "deleted",
                    detail: Some(
                        "record not found at its system: link ended, counterpart kept".into(),
                    ),
                    ..Entry::default()
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn find_link(
        &self,
        flow: &Dataflow,
        side: Side,
        id: &str,
    ) -> Result<Option<Link>, sqlx::Error> {
        let (col_sys, col_type, col_id) = match side {
            Side::Source => ("source_system", "source_type", "source_id"),
            Side::Target => ("target_system", "target_type", "target_id"),
        };
        let e = entity(flow, side);
        let row = sqlx::query(&format!(
            "SELECT id, source_id, target_id, snapshot, source_seen_at, target_seen_at, \
             last_write_side, version FROM links \
             WHERE state = 'active' AND {col_sys} = $1 AND {col_type} = $2 AND {col_id} = $3 \
             AND flow_id = $4"
        ))
        .bind(e.system.as_str())
        .bind(&e.entity_type)
        .bind(id)
        .bind(&flow.id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let snapshot: Value = row.try_get("snapshot")?;
            Ok(Link {
                id: row.try_get("id")?,
                source_id: row.try_get("source_id")?,
                target_id: row.try_get("target_id")?,
                snapshot: match snapshot {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
                source_seen_at: row.try_get("source_seen_at")?,
                target_seen_at: row.try_get("target_seen_at")?,
                last_write_side: row.try_get("last_write_side")?,
                version: row.try_get("version")?,
            })
        })
        .transpose()
    }

    async fn end_link(&self, link: &Link, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE links SET state = 'ended', ended_at = now(), updated_at = now(), end_reason = $2 \
             WHERE id = $1 AND state = 'active'",
        )
        .bind(link.id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The event's record is the flow's source.
    async fn on_source_record(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
    ) -> Result<Step, Fail> {
        match self.find_link(flow, Side::Source, &src.id).await? {
            Some(link) if matches_snapshot(flow, &link, src, Side::Source) => {
                self.nothing_to_send(job, flow, &link, src, Side::Source)
                    .await
            }
            Some(link) => match tconn
                .fetch(&flow.target.entity_type, &link.target_id)
                .await?
            {
                Some(tgt) => {
                    self.sync_linked(job, flow, link, src, &tgt, Side::Source)
                        .await
                }
                None => self.counterpart_gone(job, flow, &link, Side::Target).await,
            },
            None => self.create_or_link(job, flow, src, tconn).await,
        }
    }

    /// The event's record is the flow's target.
    async fn on_target_record(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        tgt: &Record,
        sconn: &Arc<dyn Connector>,
    ) -> Result<Step, Fail> {
        match self.find_link(flow, Side::Target, &tgt.id).await? {
            Some(link) if matches_snapshot(flow, &link, tgt, Side::Target) => {
                self.nothing_to_send(job, flow, &link, tgt, Side::Target)
                    .await
            }
            Some(link) => match sconn
                .fetch(&flow.source.entity_type, &link.source_id)
                .await?
            {
                Some(src) => {
                    self.sync_linked(job, flow, link, &src, tgt, Side::Target)
                        .await
                }
                None => self.counterpart_gone(job, flow, &link, Side::Source).await,
            },
            None => {
                self.log(
                    job,
                    Entry {
                        flow: Some(&flow.id),
                        decision: "not_created_back",
                        read: Some(mapped(flow, Side::Target, tgt)),
                        detail: Some(
                            "unlinked record on the flow's target side: creation only follows \
                             the flow's direction"
                                .into(),
                        ),
                        ..Entry::default()
                    },
                )
                .await?;
                Ok(Step::Done)
            }
        }
    }

    /// Logs the event of a linked record that [`matches_snapshot`]: an echo of Tether's own write
    /// when Tether last wrote this side, otherwise a change outside the mapping.
    async fn nothing_to_send(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        record: &Record,
        side: Side,
    ) -> Result<Step, Fail> {
        let echo = link.last_write_side.as_deref() == Some(side.as_str());
        self.log(
            job,
            Entry {
                flow: Some(&flow.id),
                link: Some(link.id),
                decision: if echo { "echo" } else { "unchanged" },
                read: Some(json!({ side.as_str(): mapped(flow, side, record) })),
                detail: Some(
                    "every mapped value is as last synced; the other side was not read".into(),
                ),
                ..Entry::default()
            },
        )
        .await?;
        Ok(Step::Done)
    }

    async fn counterpart_gone(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        gone: Side,
    ) -> Result<Step, Fail> {
        let reason = format!("{} record deleted", gone.as_str());
        self.end_link(link, &reason).await?;
        self.log(
            job,
            Entry {
                flow: Some(&flow.id),
                link: Some(link.id),
                decision: "deleted",
                detail: Some(format!(
                    "the counterpart was not found: link ended ({reason}), this record kept"
                )),
                ..Entry::default()
            },
        )
        .await?;
        Ok(Step::Done)
    }

    /// Translates a reference id from one side of a flow to the other through active links, in
    /// either direction of whichever flow links them.
    async fn translate(
        &self,
        from: SystemId,
        from_types: &[String],
        id: &str,
        to: SystemId,
        to_types: &[String],
    ) -> Result<Translation, sqlx::Error> {
        let found: Option<String> = sqlx::query_scalar(
            "(SELECT target_id FROM links WHERE state = 'active' AND source_system = $1 \
               AND source_type = ANY($2) AND source_id = $3 AND target_system = $4 \
               AND target_type = ANY($5) LIMIT 1) \
             UNION ALL \
             (SELECT source_id FROM links WHERE state = 'active' AND target_system = $1 \
               AND target_type = ANY($2) AND target_id = $3 AND source_system = $4 \
               AND source_type = ANY($5) LIMIT 1) \
             LIMIT 1",
        )
        .bind(from.as_str())
        .bind(from_types)
        .bind(id)
        .bind(to.as_str())
        .bind(to_types)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(found) = found {
            return Ok(Translation::Found(found));
        }
        let mut candidates: Vec<RecordKey> = Vec::new();
        for f in self
            .registry
            .dataflows
            .iter()
            .filter(|f| f.switches.enabled)
        {
            let from_type = if f.source.system == from
                && from_types.contains(&f.source.entity_type)
                && f.target.system == to
                && to_types.contains(&f.target.entity_type)
            {
                &f.source.entity_type
            } else if f.target.system == from
                && from_types.contains(&f.target.entity_type)
                && f.source.system == to
                && to_types.contains(&f.source.entity_type)
            {
                &f.target.entity_type
            } else {
                continue;
            };
            let key = RecordKey {
                system: from,
                entity_type: from_type.clone(),
                record_id: id.to_owned(),
            };
            if !candidates.contains(&key) {
                candidates.push(key);
            }
        }
        Ok(if candidates.is_empty() {
            Translation::Impossible
        } else {
            Translation::Pending(candidates)
        })
    }

    /// Translates the reference of property `p` read on `from` to the other side.
    async fn translate_prop(
        &self,
        flow: &Dataflow,
        p: &PropertyMapping,
        from: Side,
        id: &str,
    ) -> Result<Translation, sqlx::Error> {
        self.translate(
            entity(flow, from).system,
            &ref_types(p, from),
            id,
            entity(flow, from.other()).system,
            &ref_types(p, from.other()),
        )
        .await
    }

    /// Enqueues a synthetic event per record (rule 5: sync the referenced record first; rule 6:
    /// process a written record's other flows without waiting for its webhook). `once_per` makes
    /// the delivery id deterministic (`tether:{why}:{once_per}:{record}`), so a job that waits and
    /// retries enqueues its referenced records once, not on every retry; `None` makes it unique.
    async fn enqueue_records(
        conn: &mut PgConnection,
        keys: &[RecordKey],
        why: &str,
        once_per: Option<i64>,
    ) -> Result<(), sqlx::Error> {
        for key in keys {
            let delivery_id = match once_per {
                Some(scope) => format!("tether:{why}:{scope}:{key}"),
                None => format!("tether:{why}:{}", Uuid::new_v4()),
            };
            let event = ChangeEvent {
                record: key.clone(),
                action: Action::Updated,
                occurred_at: Some(Utc::now()),
                delivery_id,
            };
            let event_id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO events (system, entity_type, record_id, action, occurred_at, delivery_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (system, delivery_id) DO NOTHING RETURNING id",
            )
            .bind(key.system.as_str())
            .bind(&key.entity_type)
            .bind(&key.record_id)
            .bind(event.action.as_str())
            .bind(event.occurred_at)
            .bind(&event.delivery_id)
            .fetch_optional(&mut *conn)
            .await?;
            let Some(event_id) = event_id else {
                continue; // already enqueued for this scope
            };
            queue::enqueue(
                conn,
                &[NewJob {
                    event_id,
                    event: &event,
                }],
            )
            .await?;
        }
        Ok(())
    }

    /// The record of `e` written by `flow` takes part in other flows: it is processed next.
    fn fan_out_key(&self, flow: &Dataflow, e: &EntityRef, id: &str) -> Option<RecordKey> {
        let other_flows =
            self.registry.dataflows.iter().any(|f| {
                f.id != flow.id && f.switches.enabled && (&f.source == e || &f.target == e)
            });
        other_flows.then(|| RecordKey {
            system: e.system,
            entity_type: e.entity_type.clone(),
            record_id: id.to_owned(),
        })
    }

    async fn wait_for_references(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: Option<i64>,
        pending: &[RecordKey],
    ) -> Result<Step, Fail> {
        let mut tx = self.pool.begin().await?;
        Self::enqueue_records(&mut tx, pending, "reference", Some(job.event_id)).await?;
        tx.commit().await?;
        let names: Vec<String> = pending.iter().map(ToString::to_string).collect();
        let detail = format!(
            "referenced record not linked yet; syncing it first: {}",
            names.join(", ")
        );
        self.log(
            job,
            Entry {
                flow: Some(&flow.id),
                link,
                decision: "waiting_for_reference",
                detail: Some(detail.clone()),
                ..Entry::default()
            },
        )
        .await?;
        Ok(Step::Later(detail))
    }

    /// The target-side fields (references translated) and snapshot for creating a counterpart.
    async fn build_create(&self, flow: &Dataflow, src: &Record) -> Result<Built, sqlx::Error> {
        let mut b = Built {
            fields: Map::new(),
            snapshot: Map::new(),
            pending: Vec::new(),
            unset: Vec::new(),
        };
        for p in synced(flow) {
            let k = key(p);
            if p.reference.is_none() {
                let v = normalize(src.get_path(&p.source));
                if !v.is_null() {
                    set_path(&mut b.fields, &p.target, v.clone());
                }
                b.snapshot.insert(k, v);
                continue;
            }
            let Some(id) = ref_id(src.get_path(&p.source)) else {
                b.snapshot.insert(k, ref_pair(None, None));
                continue;
            };
            match self.translate_prop(flow, p, Side::Source, &id).await? {
                Translation::Found(t) => {
                    set_path(&mut b.fields, &p.target, Value::String(t.clone()));
                    b.snapshot.insert(k, ref_pair(Some(&id), Some(&t)));
                }
                Translation::Pending(keys) => b.pending.extend(keys),
                Translation::Impossible => {
                    b.unset.push(p.source.clone());
                    b.snapshot.insert(k, ref_pair(Some(&id), None));
                }
            }
        }
        Ok(b)
    }

    /// Rules 1 and 8: link or create the counterpart of an unlinked source record.
    async fn create_or_link(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
    ) -> Result<Step, Fail> {
        let tt = &flow.target.entity_type;
        // A flow running the other way may already link this record to one of the target type
        // (rule 1: "unless a dataflow runs that way too" must not make a second counterpart).
        if let Translation::Found(other) = self
            .translate(
                flow.source.system,
                std::slice::from_ref(&flow.source.entity_type),
                &src.id,
                flow.target.system,
                std::slice::from_ref(tt),
            )
            .await?
        {
            self.log(
                job,
                Entry {
                    flow: Some(&flow.id),
                    decision: "linked_by_other_flow",
                    detail: Some(format!(
                        "already linked to {}/{tt}/{other} by another dataflow; not created again",
                        flow.target.system
                    )),
                    ..Entry::default()
                },
            )
            .await?;
            return Ok(Step::Done);
        }
        let built = self.build_create(flow, src).await?;
        if !built.pending.is_empty() {
            return self
                .wait_for_references(job, flow, None, &built.pending)
                .await;
        }
        let intent = sqlx::query(
            "SELECT id, idempotency_key, owner_job_id, lease_until > now() AS live \
             FROM link_intents WHERE state = 'pending' AND source_system = $1 \
             AND source_type = $2 AND source_id = $3 AND flow_id = $4",
        )
        .bind(flow.source.system.as_str())
        .bind(&flow.source.entity_type)
        .bind(&src.id)
        .bind(&flow.id)
        .fetch_optional(&self.pool)
        .await?;
        let intent: Option<(i64, Uuid)> = match intent {
            None => None,
            Some(row) => {
                let owner: Option<i64> = row.try_get("owner_job_id")?;
                let live: bool = row.try_get("live")?;
                if live && owner != Some(job.job_id) {
                    let reason = "another job is creating this record's counterpart".to_owned();
                    self.log(
                        job,
                        Entry {
                            flow: Some(&flow.id),
                            decision: "waiting_for_create",
                            detail: Some(reason.clone()),
                            ..Entry::default()
                        },
                    )
                    .await?;
                    return Ok(Step::Later(reason));
                }
                let id: i64 = row.try_get("id")?;
                let key: Uuid = row.try_get("idempotency_key")?;
                // An earlier attempt may have created the record and died before the link.
                match tconn.find_created(tt, &key.to_string()).await {
                    Ok(Some(found)) => {
                        // The base is what the earlier attempt created, so a source edit made
                        // since then is a source change (written), never reverted.
                        let base = base_from_created(flow, &built.snapshot, &found);
                        return self
                            .link_existing(
                                job,
                                flow,
                                src,
                                found,
                                Some(id),
                                base,
                                "linked_after_retry",
                            )
                            .await;
                    }
                    Ok(None) | Err(ConnectorError::Unsupported { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                Some((id, key))
            }
        };
        if !flow.merge_criteria.is_empty() {
            let mut criteria = Map::new();
            let mut complete = true;
            for c in &flow.merge_criteria {
                match normalize(src.get_path(&c.source)) {
                    Value::Null => complete = false,
                    v => set_path(&mut criteria, &c.target, v),
                }
            }
            if complete {
                for found in tconn.find_by(tt, &criteria).await? {
                    if self
                        .find_link(flow, Side::Target, &found.id)
                        .await?
                        .is_none()
                    {
                        return self
                            .link_existing(
                                job,
                                flow,
                                src,
                                found,
                                intent.map(|i| i.0),
                                Map::new(),
                                "linked_by_merge_criteria",
                            )
                            .await;
                    }
                }
            }
        }
        if !flow.switches.create_in_target {
            self.log(
                job,
                Entry {
                    flow: Some(&flow.id),
                    decision: "no_match",
                    read: Some(mapped(flow, Side::Source, src)),
                    detail: Some(
                        "no record matched the merge criteria and creating in the target is off"
                            .into(),
                    ),
                    ..Entry::default()
                },
            )
            .await?;
            return Ok(Step::Done);
        }
        // Rule 8: the intent is committed before the vendor call.
        let (intent_id, idem) = match intent {
            Some((id, key)) => {
                sqlx::query(
                    "UPDATE link_intents SET owner_job_id = $2, \
                     lease_until = now() + make_interval(secs => $3) WHERE id = $1",
                )
                .bind(id)
                .bind(job.job_id)
                .bind(INTENT_LEASE_SECS as f64)
                .execute(&self.pool)
                .await?;
                (id, key)
            }
            None => {
                let key = Uuid::new_v4();
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO link_intents (flow_id, source_system, source_type, source_id, \
                     idempotency_key, owner_job_id, lease_until) \
                     VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) \
                     ON CONFLICT DO NOTHING RETURNING id",
                )
                .bind(&flow.id)
                .bind(flow.source.system.as_str())
                .bind(&flow.source.entity_type)
                .bind(&src.id)
                .bind(key)
                .bind(job.job_id)
                .bind(INTENT_LEASE_SECS as f64)
                .fetch_optional(&self.pool)
                .await?;
                let Some(id) = id else {
                    let reason = "another job recorded a create intent for this record first";
                    self.log(
                        job,
                        Entry {
                            flow: Some(&flow.id),
                            decision: "waiting_for_create",
                            detail: Some(reason.into()),
                            ..Entry::default()
                        },
                    )
                    .await?;
                    return Ok(Step::Later(reason.into()));
                };
                (id, key)
            }
        };
        let created = tconn.create(tt, &built.fields, &idem.to_string()).await?;
        let mut detail = format!("created {}/{}/{}", flow.target.system, tt, created.id);
        if !built.unset.is_empty() {
            detail.push_str(&format!(
                "; {} reference(s) left unset (no dataflow links their types): {}",
                built.unset.len(),
                built.unset.join(", ")
            ));
        }
        let entry = Entry {
            flow: Some(&flow.id),
            decision: "created",
            read: Some(mapped(flow, Side::Source, src)),
            written: Some(json!({ "target": built.fields })),
            detail: Some(detail),
            ..Entry::default()
        };
        self.store_link(
            job,
            entry,
            flow,
            src,
            &created,
            &built.snapshot,
            Some(intent_id),
        )
        .await?;
        Ok(Step::Done)
    }

    /// Stores a new link, closes the intent, fans out and logs `entry` in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn store_link(
        &self,
        job: &ClaimedJob,
        mut entry: Entry<'_>,
        flow: &Dataflow,
        src: &Record,
        tgt: &Record,
        snapshot: &Map<String, Value>,
        intent: Option<i64>,
    ) -> Result<i64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let link_id: i64 = sqlx::query_scalar(
            "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
             target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'target') RETURNING id",
        )
        .bind(&flow.id)
        .bind(flow.source.system.as_str())
        .bind(&flow.source.entity_type)
        .bind(&src.id)
        .bind(flow.target.system.as_str())
        .bind(&flow.target.entity_type)
        .bind(&tgt.id)
        .bind(Value::Object(snapshot.clone()))
        .bind(src.updated_at)
        .bind(tgt.updated_at)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(intent) = intent {
            sqlx::query("UPDATE link_intents SET state = 'done', done_at = now() WHERE id = $1")
                .bind(intent)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(k) = self.fan_out_key(flow, &flow.target, &tgt.id) {
            Self::enqueue_records(&mut tx, &[k], "fan-out", None).await?;
        }
        entry.link = Some(link_id);
        Self::log_in(&mut tx, job, entry).await?;
        tx.commit().await?;
        Ok(link_id)
    }

    /// Links an existing target record (found by an earlier attempt's key or by merge criteria),
    /// then merges the pair from `base`.
    #[allow(clippy::too_many_arguments)]
    async fn link_existing(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tgt: Record,
        intent: Option<i64>,
        base: Map<String, Value>,
        decision: &str,
    ) -> Result<Step, Fail> {
        let entry = Entry {
            flow: Some(&flow.id),
            decision,
            read: Some(json!({
                "source": mapped(flow, Side::Source, src),
                "target": mapped(flow, Side::Target, &tgt),
            })),
            detail: Some(format!(
                "linked to existing {}/{}/{}",
                flow.target.system, flow.target.entity_type, tgt.id
            )),
            ..Entry::default()
        };
        let link_id = self
            .store_link(job, entry, flow, src, &tgt, &base, intent)
            .await?;
        let link = Link {
            id: link_id,
            source_id: src.id.clone(),
            target_id: tgt.id.clone(),
            snapshot: base,
            source_seen_at: src.updated_at,
            target_seen_at: tgt.updated_at,
            last_write_side: Some("target".into()),
            version: 0,
        };
        self.sync_linked(job, flow, link, src, &tgt, Side::Source)
            .await
    }

    /// Why the registry does not let `flow` write property `p` to side `to` of a linked record,
    /// if it does not: write-back switched off, a one-way mapping, or a rule naming another flow
    /// as the property's owner (creation is not held back by owners: a new record needs its
    /// fields, and there is no value of the owner's to protect yet).
    fn write_refused(&self, flow: &Dataflow, p: &PropertyMapping, to: Side) -> Option<String> {
        if to == Side::Source && !flow.switches.write_back_to_source {
            return Some("writing back to the source is off".into());
        }
        if to == Side::Source && !p.syncs_to_source() {
            return Some("the registry syncs this property only towards the target".into());
        }
        let direction = match to {
            Side::Target => Direction::ToTarget,
            Side::Source => Direction::ToSource,
        };
        let entity = entity(flow, to);
        if !self.registry.may_write(flow, direction, path(p, to)) {
            let owner = match self.registry.rule(entity, path(p, to)).map(|r| &r.resolve) {
                Some(Resolution::Owner(owner)) => owner.as_str(),
                _ => "another flow",
            };
            return Some(format!(
                "{}.{}.{} is owned by {owner} (registry rule)",
                entity.system,
                entity.entity_type,
                path(p, to)
            ));
        }
        None
    }

    /// Rules 2-5 for a linked pair: the three-way merge per property, writes of changed
    /// properties only, then the new snapshot.
    async fn sync_linked(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: Link,
        src: &Record,
        tgt: &Record,
        event_side: Side,
    ) -> Result<Step, Fail> {
        let read = json!({
            "source": mapped(flow, Side::Source, src),
            "target": mapped(flow, Side::Target, tgt),
        });
        if stale(src.updated_at, link.source_seen_at) || stale(tgt.updated_at, link.target_seen_at)
        {
            let reason = "a side returned a state older than the one last synced".to_owned();
            self.log(
                job,
                Entry {
                    flow: Some(&flow.id),
                    link: Some(link.id),
                    decision: "stale",
                    read: Some(read),
                    detail: Some(reason.clone()),
                    ..Entry::default()
                },
            )
            .await?;
            return Ok(Step::Later(reason));
        }
        let mut changes = [Map::new(), Map::new()]; // [to source, to target]
        let mut snap_on_write: [Vec<(String, Value)>; 2] = [Vec::new(), Vec::new()];
        let mut snapshot = link.snapshot.clone();
        let mut pending: Vec<RecordKey> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut converged = false;
        let idx = |s: Side| match s {
            Side::Source => 0,
            Side::Target => 1,
        };
        for p in synced(flow) {
            let k = key(p);
            let base = link.snapshot.get(&k);
            let mut facts = PropertyFacts {
                source_changed: false,
                target_changed: false,
                equal: false,
                source_empty: false,
                target_empty: false,
                source_updated_at: src.updated_at,
                target_updated_at: tgt.updated_at,
                event_side,
            };
            if p.reference.is_none() {
                let sv = normalize(src.get_path(&p.source));
                let tv = normalize(tgt.get_path(&p.target));
                facts.source_changed = base != Some(&sv);
                facts.target_changed = base != Some(&tv);
                facts.equal = sv == tv;
                facts.source_empty = sv.is_null();
                facts.target_empty = tv.is_null();
                match decide(&facts) {
                    Decision::Unchanged => {}
                    Decision::Converged => {
                        converged = true;
                        snapshot.insert(k, sv);
                    }
                    Decision::KeepNonEmpty => notes.push(format!(
                        "{k}: an empty value is not written over a non-empty one"
                    )),
                    Decision::WriteTo(to) => {
                        let v = if to == Side::Target { sv } else { tv };
                        if let Some(why) = self.write_refused(flow, p, to) {
                            notes.push(format!("{k}: {why}"));
                            continue;
                        }
                        set_path(&mut changes[idx(to)], path(p, to), v.clone());
                        snap_on_write[idx(to)].push((k, v));
                    }
                }
                continue;
            }
            // A reference: compared per side with the snapshot's id of that side.
            let rs = ref_id(src.get_path(&p.source));
            let rt = ref_id(tgt.get_path(&p.target));
            let (bs, bt) = (ref_part(base, "s"), ref_part(base, "t"));
            facts.source_changed = base.is_none() || rs != bs;
            facts.target_changed = base.is_none() || rt != bt;
            facts.source_empty = rs.is_none();
            facts.target_empty = rt.is_none();
            let mut ts: Option<Translation> = None;
            facts.equal = match (&rs, &rt) {
                (None, None) => true,
                (Some(s), Some(t)) if facts.source_changed || facts.target_changed => {
                    let tr = self.translate_prop(flow, p, Side::Source, s).await?;
                    let eq = tr == Translation::Found(t.clone());
                    ts = Some(tr);
                    eq
                }
                _ => false,
            };
            match decide(&facts) {
                Decision::Unchanged => {}
                Decision::Converged => {
                    converged = true;
                    snapshot.insert(k, ref_pair(rs.as_deref(), rt.as_deref()));
                }
                Decision::KeepNonEmpty => notes.push(format!(
                    "{k}: an empty reference is not written over a non-empty one"
                )),
                Decision::WriteTo(to) => {
                    if let Some(why) = self.write_refused(flow, p, to) {
                        notes.push(format!("{k}: {why}"));
                        continue;
                    }
                    let from = to.other();
                    let id = match from {
                        Side::Source => rs.clone(),
                        Side::Target => rt.clone(),
                    }
                    .unwrap_or_default();
                    let tr = match (from, ts) {
                        (Side::Source, Some(tr)) => tr,
                        _ => self.translate_prop(flow, p, from, &id).await?,
                    };
                    match tr {
                        Translation::Found(other_id) => {
                            set_path(
                                &mut changes[idx(to)],
                                path(p, to),
                                Value::String(other_id.clone()),
                            );
                            let pair = match to {
                                Side::Target => ref_pair(Some(&id), Some(&other_id)),
                                Side::Source => ref_pair(Some(&other_id), Some(&id)),
                            };
                            snap_on_write[idx(to)].push((k, pair));
                        }
                        Translation::Pending(keys) => pending.extend(keys),
                        Translation::Impossible => {
                            notes.push(format!(
                                "{k}: reference left unset (no dataflow links its types)"
                            ));
                            // Record the unlinkable value so it is not retried on every event.
                            let pair = match from {
                                Side::Source => ref_pair(Some(&id), bt.as_deref()),
                                Side::Target => ref_pair(bs.as_deref(), Some(&id)),
                            };
                            snapshot.insert(k, pair);
                        }
                    }
                }
            }
        }
        if !pending.is_empty() {
            return self
                .wait_for_references(job, flow, Some(link.id), &pending)
                .await;
        }

        // Writes: one call per side with only the changed properties.
        let mut written = Map::new();
        let mut seen = [src.updated_at, tgt.updated_at];
        let mut last_write: Option<Side> = None;
        let mut fan_out: Vec<RecordKey> = Vec::new();
        for to in [Side::Target, Side::Source] {
            let i = idx(to);
            if changes[i].is_empty() {
                continue;
            }
            let e = entity(flow, to);
            let Some(conn) = self.connector(e.system) else {
                continue;
            };
            let id = match to {
                Side::Source => &link.source_id,
                Side::Target => &link.target_id,
            };
            match conn.update(&e.entity_type, id, &changes[i]).await {
                Ok(stored) => {
                    seen[i] = stored.updated_at;
                    written.insert(to.as_str().into(), Value::Object(changes[i].clone()));
                    for (k, v) in std::mem::take(&mut snap_on_write[i]) {
                        snapshot.insert(k, v);
                    }
                    last_write = Some(to);
                    fan_out.extend(self.fan_out_key(flow, e, id));
                }
                Err(ConnectorError::Unsupported { .. }) => notes.push(format!(
                    "the {} side ({}/{}) cannot be written: skipped",
                    to.as_str(),
                    e.system,
                    e.entity_type
                )),
                Err(err) => return Err(err.into()),
            }
        }

        let decision = if !written.is_empty() {
            "updated"
        } else if converged {
            "converged"
        } else if notes.is_empty() && link.last_write_side.as_deref() == Some(event_side.as_str()) {
            "echo"
        } else {
            "unchanged"
        };
        let written = (!written.is_empty()).then_some(Value::Object(written));
        let entry = Entry {
            flow: Some(&flow.id),
            link: Some(link.id),
            decision,
            read: Some(read),
            written,
            detail: (!notes.is_empty()).then(|| notes.join("; ")),
            ..Entry::default()
        };
        let changed_snapshot = snapshot != link.snapshot;
        let seen_moved = seen[0] != link.source_seen_at || seen[1] != link.target_seen_at;
        if !(changed_snapshot || seen_moved || entry.written.is_some()) {
            self.log(job, entry).await?;
            return Ok(Step::Done);
        }
        let state = LinkState {
            snapshot,
            seen,
            last_write,
        };
        // The fan-out's jobs must commit with the link; without them the pool's implicit
        // transaction of the one statement is enough.
        let stored = if fan_out.is_empty() {
            Self::store_sync(&self.pool, job, &entry, &link, state).await?
        } else {
            let mut tx = self.pool.begin().await?;
            let stored = Self::store_sync(&mut *tx, job, &entry, &link, state).await?;
            if stored {
                Self::enqueue_records(&mut tx, &fan_out, "fan-out", None).await?;
                tx.commit().await?;
            }
            stored
        };
        if !stored {
            let reason =
                "the link changed while this event was processed; re-reading both sides".to_owned();
            self.log(
                job,
                Entry {
                    decision: "conflict",
                    detail: Some(reason.clone()),
                    ..entry
                },
            )
            .await?;
            return Ok(Step::Later(reason));
        }
        Ok(Step::Done)
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
        let message = failure.to_string();
        let outcome = match &failure {
            Fail::Db(_) => JobOutcome::Retry {
                error: message.clone(),
            },
            // Put off without a call: the refusal that stopped the system was logged once.
            Fail::Stopped { remaining, .. } => JobOutcome::Later {
                after: Some(*remaining),
                reason: message.clone(),
            },
            Fail::Connector(e) => match e {
                ConnectorError::RateLimited { retry_after, .. } => JobOutcome::Later {
                    after: Some(retry_after.unwrap_or(Duration::from_secs(30))),
                    reason: message.clone(),
                },
                ConnectorError::Timeout { .. } => JobOutcome::Later {
                    after: Some(Duration::from_secs(10)),
                    reason: message.clone(),
                },
                ConnectorError::Transient { .. } => JobOutcome::Retry {
                    error: message.clone(),
                },
                ConnectorError::Rejected { .. }
                | ConnectorError::Unsupported { .. }
                | ConnectorError::TargetClosed { .. } => JobOutcome::Dead {
                    error: format!("{message} (retrying the same request would not help)"),
                },
                ConnectorError::Unauthorized { system, .. } => {
                    crate::ops::metrics::credentials_failure(*system);
                    self.stop_system(*system);
                    tracing::error!(
                        %system,
                        record = %job.event.record,
                        "credentials refused: {} is stopped until the operator fixes them",
                        system.display_name()
                    );
                    JobOutcome::Later {
                        after: Some(UNAUTHORIZED_WAIT),
                        reason: message.clone(),
                    }
                }
                ConnectorError::NotConfigured { .. } => JobOutcome::Done,
            },
        };
        let decision = match failure {
            Fail::Connector(ConnectorError::NotConfigured { .. }) => "not_connected",
            Fail::Stopped { .. } => "system_stopped",
            _ => "error",
        };
        if let Err(e) = self
            .log(
                job,
                Entry {
                    decision,
                    error: Some(message),
                    ..Entry::default()
                },
            )
            .await
        {
            tracing::warn!(error = %e, "could not record a sync error in sync_log");
        }
        outcome
    }
}
