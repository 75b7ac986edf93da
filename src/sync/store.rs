//! Every statement of the sync engine: links, create intents, the decision log (`sync_log`) and
//! the synthetic events it enqueues. Nothing else in `sync` writes SQL.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgExecutor, PgPool, Row};
use uuid::Uuid;

use super::decision::Decision;
use super::delivery::Delivered;
use super::mapping::entity;
use super::merge::Side;
use crate::connectors::Record;
use crate::domain::{Action, ChangeEvent, RecordKey, SystemId};
use crate::queue::{self, ClaimedJob, JobPriority, NewJob};
use crate::registry::Dataflow;

mod batch;
pub(crate) use batch::Batches;
mod intents;
pub(crate) use intents::*;

/// An active link as the engine reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Link {
    pub id: i64,
    pub source_id: String,
    pub target_id: String,
    /// The last synced value of every mapped property (the merge base).
    pub snapshot: Map<String, Value>,
    pub source_seen_at: Option<DateTime<Utc>>,
    pub target_seen_at: Option<DateTime<Utc>>,
    /// The side Tether wrote last, to tell an echo from an unchanged record.
    pub last_write_side: Option<Side>,
    /// That side's write answered with every synced property as the snapshot has it, at the
    /// stamp `seen_on` that side: a delivery carrying that stamp is the echo, settled unread.
    pub last_write_settled: bool,
    /// Optimistic concurrency: the snapshot is only replaced by a writer that read this version.
    pub version: i64,
    /// A write whose answer was lost, until the pair's next stored sync (`sync::unsure`).
    pub unsure_write: Option<super::unsure::UnsureWrite>,
}

impl Link {
    /// The record id on one side.
    pub fn id_on(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.source_id,
            Side::Target => &self.target_id,
        }
    }

    /// The change stamp last seen on one side.
    pub fn seen_on(&self, side: Side) -> Option<DateTime<Utc>> {
        match side {
            Side::Source => self.source_seen_at,
            Side::Target => self.target_seen_at,
        }
    }
}

/// A link's state after a sync: the snapshot, the change stamps last seen on each side
/// (source, target), and the side written last, if one was.
pub(crate) struct LinkState {
    pub snapshot: Map<String, Value>,
    pub seen: [Option<DateTime<Utc>>; 2],
    pub last_write: Option<Side>,
    /// See [`Link::last_write_settled`]; false unless this sync wrote `last_write` and its
    /// answer showed the new snapshot.
    pub last_write_settled: bool,
}

/// One `sync_log` row (the record is the event's).
#[derive(Debug, Clone)]
pub(crate) struct Entry<'a> {
    pub flow: Option<&'a str>,
    pub link: Option<i64>,
    pub decision: Decision,
    pub read: Option<Value>,
    pub written: Option<Value>,
    pub detail: Option<String>,
    pub error: Option<String>,
}

impl<'a> Entry<'a> {
    /// An entry with only a decision; the other fields are set with struct update syntax.
    pub fn new(decision: Decision) -> Entry<'a> {
        Entry {
            flow: None,
            link: None,
            decision,
            read: None,
            written: None,
            detail: None,
            error: None,
        }
    }
}

/// The columns of a `sync_log` row and their parameters, shared by the plain log insert and the
/// one that commits with a link's new state.
pub(super) const LOG_COLUMNS: &str =
    "(event_id, job_id, attempt, system, entity_type, record_id, flow_id, \
                           link_id, decision, read, written, detail, error)";
const LOG_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13";

/// A log entry on its own.
static LOG_SQL: LazyLock<String> =
    LazyLock::new(|| format!("INSERT INTO sync_log {LOG_COLUMNS} VALUES ({LOG_VALUES})"));

/// The parameters of a second entry of the same event (see [`bind_beside`]), from `$n`: the
/// event's columns are the first entry's `$1` to `$6`.
fn beside_values(n: usize) -> String {
    let own: Vec<String> = (n..n + 7).map(|i| format!("${i}")).collect();
    format!("$1, $2, $3, $4, $5, $6, {}", own.join(", "))
}

/// A log entry and a second one of the same event (its `idle` entry: `sync::beside`), in one
/// statement; the rows are inserted in this order, so ids keep the order of the decisions.
static LOG_TWO_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO sync_log {LOG_COLUMNS} VALUES ({LOG_VALUES}), ({})",
        beside_values(14)
    )
});

/// The `UPDATE` of a linked record's new state, as the CTE `updated` of [`STORE_SYNC_SQL`].
const UPDATE_LINK_CTE: &str = "WITH updated AS (\
    UPDATE links SET snapshot = $14, source_seen_at = $15, target_seen_at = $16, \
    last_write_side = COALESCE($17, last_write_side), last_write_settled = $20, \
    unsure_write = NULL, version = version + 1, updated_at = now() \
    WHERE id = $18 AND version = $19 AND state = 'active' RETURNING id)";

/// A linked record's new state and its log entry, in one statement (see [`store_sync`]); the
/// entry is written only if the link was updated.
static STORE_SYNC_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("{UPDATE_LINK_CTE} INSERT INTO sync_log {LOG_COLUMNS} SELECT {LOG_VALUES} FROM updated")
});

/// [`STORE_SYNC_SQL`] with a second entry of the event after the first (`UNION ALL` appends its
/// branches in order), also only if the link was updated.
static STORE_SYNC_TWO_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{UPDATE_LINK_CTE} INSERT INTO sync_log {LOG_COLUMNS} \
         SELECT {LOG_VALUES} FROM updated UNION ALL SELECT {} FROM updated",
        beside_values(21)
    )
});

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds a log entry as parameters $1 to $13 (see [`LOG_COLUMNS`]) and counts its decision.
fn bind_entry<'q>(query: PgQuery<'q>, job: &'q ClaimedJob, e: &'q Entry<'q>) -> PgQuery<'q> {
    crate::ops::metrics::sync_decision(e.flow, e.decision.as_str());
    bind_entry_uncounted(query, job, e)
}

/// [`bind_entry`] for a statement that may write no entry: the caller counts one it wrote.
fn bind_entry_uncounted<'q>(
    query: PgQuery<'q>,
    job: &'q ClaimedJob,
    e: &'q Entry<'q>,
) -> PgQuery<'q> {
    let r = &job.event.record;
    query
        .bind(job.event_id)
        .bind(job.job_id)
        .bind(job.attempt)
        .bind(r.system.as_str())
        .bind(&r.entity_type)
        .bind(&r.record_id)
        .bind(e.flow)
        .bind(e.link)
        .bind(e.decision.as_str())
        .bind(&e.read)
        .bind(&e.written)
        .bind(&e.detail)
        .bind(&e.error)
}

/// Binds the own columns of a second entry of the event (see [`beside_values`]).
fn bind_beside<'q>(query: PgQuery<'q>, e: &'q Entry<'q>) -> PgQuery<'q> {
    query
        .bind(e.flow)
        .bind(e.link)
        .bind(e.decision.as_str())
        .bind(&e.read)
        .bind(&e.written)
        .bind(&e.detail)
        .bind(&e.error)
}

/// [`log`] with, when given, a second entry of the same event after it, in one statement.
pub(crate) async fn log_beside(
    conn: impl PgExecutor<'_>,
    job: &ClaimedJob,
    e: &Entry<'_>,
    beside: Option<&Entry<'_>>,
) -> Result<(), sqlx::Error> {
    let Some(second) = beside else {
        return log(conn, job, e).await;
    };
    bind_beside(bind_entry(sqlx::query(&LOG_TWO_SQL), job, e), second)
        .execute(conn)
        .await?;
    crate::ops::metrics::sync_decision(second.flow, second.decision.as_str());
    Ok(())
}

/// Stores one decision (inside the caller's transaction when given one, so a decision and the
/// state it produced commit together).
pub(crate) async fn log(
    conn: impl PgExecutor<'_>,
    job: &ClaimedJob,
    e: &Entry<'_>,
) -> Result<(), sqlx::Error> {
    bind_entry(sqlx::query(&LOG_SQL), job, e)
        .execute(conn)
        .await?;
    Ok(())
}

/// Stores a linked record's new snapshot and change stamps, and logs the decision, in one
/// statement (one round trip and one commit when the caller passes the pool). False when the link
/// changed meanwhile (its version moved on): then nothing was stored or logged.
/// With `beside`, a second entry of the event is written after `entry` in the same statement,
/// also only if the link was stored.
pub(crate) async fn store_sync(
    conn: impl PgExecutor<'_>,
    job: &ClaimedJob,
    (entry, beside): (&Entry<'_>, Option<&Entry<'_>>),
    link: &Link,
    state: LinkState,
) -> Result<bool, sqlx::Error> {
    let sql: &str = if beside.is_some() {
        &STORE_SYNC_TWO_SQL
    } else {
        &STORE_SYNC_SQL
    };
    let mut query = bind_entry(sqlx::query(sql), job, entry)
        .bind(Value::Object(state.snapshot))
        .bind(state.seen[0])
        .bind(state.seen[1])
        .bind(state.last_write.map(Side::as_str))
        .bind(link.id)
        .bind(link.version)
        .bind(state.last_write_settled);
    if let Some(second) = beside {
        query = bind_beside(query, second);
    }
    let done = query.execute(conn).await?;
    let stored = done.rows_affected() >= 1;
    if let (true, Some(second)) = (stored, beside) {
        crate::ops::metrics::sync_decision(second.flow, second.decision.as_str());
    }
    Ok(stored)
}

/// The columns of a [`Link`], as [`link_of_row`] reads them.
const LINK_COLUMNS: &str = "id, source_id, target_id, snapshot, source_seen_at, target_seen_at, \
     last_write_side, last_write_settled, version, unsure_write";

/// The `WHERE` clause finding the active link of a flow ($4) whose record on `side` is of
/// system $1, type $2 and id $3.
fn link_where(side: Side) -> &'static str {
    match side {
        Side::Source => {
            "state = 'active' AND source_system = $1 AND source_type = $2 AND source_id = $3 \
             AND flow_id = $4"
        }
        Side::Target => {
            "state = 'active' AND target_system = $1 AND target_type = $2 AND target_id = $3 \
             AND flow_id = $4"
        }
    }
}

/// The active link of `flow` whose record on `side` is `id`.
pub(crate) async fn find_link(
    pool: &PgPool,
    flow: &Dataflow,
    side: Side,
    id: &str,
) -> Result<Option<Link>, sqlx::Error> {
    let e = entity(flow, side);
    let sql = format!(
        "SELECT {LINK_COLUMNS} FROM links WHERE {}",
        link_where(side)
    );
    let row = sqlx::query(&sql)
        .bind(e.system.as_str())
        .bind(&e.entity_type)
        .bind(id)
        .bind(&flow.id)
        .fetch_optional(pool)
        .await?;
    row.map(|row| link_of_row(&row)).transpose()
}

/// A [`Link`] from a row with [`LINK_COLUMNS`].
fn link_of_row(row: &sqlx::postgres::PgRow) -> Result<Link, sqlx::Error> {
    let snapshot: Value = row.try_get("snapshot")?;
    let last_write: Option<String> = row.try_get("last_write_side")?;
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
        last_write_side: match last_write.as_deref() {
            Some("source") => Some(Side::Source),
            Some("target") => Some(Side::Target),
            _ => None,
        },
        last_write_settled: row.try_get("last_write_settled")?,
        version: row.try_get("version")?,
        unsure_write: row
            .try_get::<Option<Value>, _>("unsure_write")?
            .as_ref()
            .and_then(super::unsure::UnsureWrite::from_json),
    })
}

/// Ends one link (its counterpart is gone).
pub(crate) async fn end_link(pool: &PgPool, link_id: i64, reason: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE links SET state = 'ended', ended_at = now(), updated_at = now(), end_reason = $2 \
         WHERE id = $1 AND state = 'active'",
    )
    .bind(link_id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends every active link of a deleted record; returns each ended link's id and flow.
pub(crate) async fn end_links_of(
    pool: &PgPool,
    r: &RecordKey,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
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
    .fetch_all(pool)
    .await
}

/// The id on system `to` (one of `to_types`) linked to record `id` of `from` (one of
/// `from_types`) by any active link, in either direction of whichever flow made it.
pub(crate) async fn linked_id(
    pool: &PgPool,
    from: SystemId,
    from_types: &[String],
    id: &str,
    to: SystemId,
    to_types: &[String],
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
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
    .fetch_optional(pool)
    .await
}

/// A link to insert: the pair, its snapshot, and whether Tether's create of the target is
/// its settled write (`links.last_write_settled`).
pub(crate) struct NewLink<'a> {
    pub src: &'a Record,
    pub tgt: &'a Record,
    pub snapshot: &'a Map<String, Value>,
    pub settled: bool,
}

/// Inserts a new link (Tether just wrote or linked the target) and closes its create intent,
/// inside the caller's transaction; returns the link's id.
pub(crate) async fn insert_link(
    tx: &mut PgConnection,
    flow: &Dataflow,
    NewLink {
        src,
        tgt,
        snapshot,
        settled,
    }: NewLink<'_>,
    intent: Option<i64>,
) -> Result<i64, sqlx::Error> {
    let link_id: i64 = sqlx::query_scalar(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side, \
         last_write_settled) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'target', $11) RETURNING id",
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
    .bind(settled)
    .fetch_one(&mut *tx)
    .await?;
    if let Some(intent) = intent {
        sqlx::query("UPDATE link_intents SET state = 'done', done_at = now() WHERE id = $1")
            .bind(intent)
            .execute(&mut *tx)
            .await?;
    }
    Ok(link_id)
}

/// Enqueues a synthetic event per record (rule 5: sync the referenced record first; rule 6:
/// process a written record's other flows without waiting for its webhook). `once_per` makes the
/// delivery id deterministic (`tether:{why}:{once_per}:{record}`), so a job that waits and
/// retries enqueues its referenced records once, not on every retry; `None` makes it unique.
pub(crate) async fn enqueue_records(
    conn: &mut PgConnection,
    keys: &[RecordKey],
    why: &str,
    once_per: Option<i64>,
    priority: JobPriority,
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
        queue::enqueue_with_priority(
            conn,
            &[NewJob {
                event_id,
                event: &event,
            }],
            priority,
        )
        .await?;
    }
    Ok(())
}
