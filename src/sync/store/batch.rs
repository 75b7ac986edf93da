//! The batched forms of the engine's two per-record statements, run by `sync::combine` for many
//! workers at once (docs/sync-rules.md, "Statements in batches"): the Zendesk event's link lookup
//! ([`LookupBatch`]) and the link-and-log update ([`StoreBatch`]). Arrays as parameters keep each
//! text constant (prepared once per connection); `ord` maps rows back to the items.

use std::sync::{LazyLock, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use super::{entity, link_of_row, Delivered, Entry, Link, LinkState, LINK_COLUMNS, LOG_COLUMNS};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;
use crate::sync::combine::{Combiner, Statement, STORE_WINDOW, WINDOW};
use crate::sync::merge::Side;

/// A `sync_log` row, owned, for a batched statement.
#[derive(Debug, Clone)]
pub(crate) struct LogRow {
    event_id: i64,
    job_id: i64,
    attempt: i32,
    system: &'static str,
    entity_type: String,
    record_id: String,
    flow: Option<String>,
    link: Option<i64>,
    decision: &'static str,
    read: Option<Value>,
    written: Option<Value>,
    detail: Option<String>,
    error: Option<String>,
}

impl LogRow {
    /// Entry `e` of `job`'s event.
    pub fn of(job: &ClaimedJob, e: &Entry<'_>) -> LogRow {
        let r = &job.event.record;
        LogRow {
            event_id: job.event_id,
            job_id: job.job_id,
            attempt: job.attempt,
            system: r.system.as_str(),
            entity_type: r.entity_type.clone(),
            record_id: r.record_id.clone(),
            flow: e.flow.map(str::to_owned),
            link: e.link,
            decision: e.decision.as_str(),
            read: e.read.clone(),
            written: e.written.clone(),
            detail: e.detail.clone(),
            error: e.error.clone(),
        }
    }
}

/// One link-and-log update: the link's new state if it is still at `version`, and its entries
/// (the decision, then the event's `idle` entry if it carries one), written only if it was.
pub(crate) struct LinkUpdate {
    pub link_id: i64,
    pub version: i64,
    pub snapshot: Value,
    pub seen: [Option<DateTime<Utc>>; 2],
    pub last_write: Option<&'static str>,
    pub settled: bool,
    pub entries: Vec<LogRow>,
}

impl LinkUpdate {
    /// `link`'s new `state`, with the entries to log if it is stored.
    pub fn new(link: &Link, state: LinkState, entries: Vec<LogRow>) -> LinkUpdate {
        LinkUpdate {
            link_id: link.id,
            version: link.version,
            snapshot: Value::Object(state.snapshot),
            seen: state.seen,
            last_write: state.last_write.map(Side::as_str),
            settled: state.last_write_settled,
            entries,
        }
    }
}

/// The link-and-log update for many links: each row's own optimistic check (`version`), its
/// entries inserted only with its update (in item order, so ids keep the decisions' order), and
/// the updated items returned. The combiner never puts one link twice in a batch.
static STORE_BATCH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH input AS (SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::jsonb[], \
         $5::timestamptz[], $6::timestamptz[], $7::text[], $8::bool[]) \
         AS u(ord, link_id, version, snapshot, source_seen_at, target_seen_at, last_write_side, \
         settled)), \
         updated AS (UPDATE links l SET snapshot = u.snapshot, \
         source_seen_at = u.source_seen_at, target_seen_at = u.target_seen_at, \
         last_write_side = COALESCE(u.last_write_side, l.last_write_side), \
         last_write_settled = u.settled, unsure_write = NULL, version = l.version + 1, \
         updated_at = now() FROM input u \
         WHERE l.id = u.link_id AND l.version = u.version AND l.state = 'active' \
         RETURNING u.ord), \
         entries AS (SELECT * FROM unnest($9::int[], $10::int[], $11::bigint[], $12::bigint[], \
         $13::int[], $14::text[], $15::text[], $16::text[], $17::text[], $18::bigint[], \
         $19::text[], $20::jsonb[], $21::jsonb[], $22::text[], $23::text[]) \
         AS e(ord, pos, event_id, job_id, attempt, system, entity_type, record_id, flow_id, \
         link_id, decision, read, written, detail, error)), \
         logged AS (INSERT INTO sync_log {LOG_COLUMNS} \
         SELECT e.event_id, e.job_id, e.attempt, e.system, e.entity_type, e.record_id, \
         e.flow_id, e.link_id, e.decision, e.read, e.written, e.detail, e.error \
         FROM entries e JOIN updated u ON u.ord = e.ord ORDER BY e.ord, e.pos) \
         SELECT ord FROM updated"
    )
});

/// [`STORE_BATCH_SQL`] for the combiner: answers whether each item's link was stored.
pub(crate) struct StoreBatch;

#[async_trait]
impl Statement for StoreBatch {
    type Item = LinkUpdate;
    type Answer = bool;

    fn key(&self, item: &LinkUpdate) -> Option<i64> {
        Some(item.link_id)
    }

    async fn run(
        &self,
        conn: &mut PgConnection,
        items: &[LinkUpdate],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let ords: Vec<i32> = (0..items.len() as i32).collect();
        fn col<'a, T>(items: &'a [LinkUpdate], f: impl Fn(&'a LinkUpdate) -> T) -> Vec<T> {
            items.iter().map(f).collect()
        }
        let entries: Vec<(i32, i32, &LogRow)> = items
            .iter()
            .zip(&ords)
            .flat_map(|(u, &ord)| u.entries.iter().zip(0..).map(move |(e, pos)| (ord, pos, e)))
            .collect();
        let query = sqlx::query(&STORE_BATCH_SQL)
            .bind(&ords)
            .bind(col(items, |u| u.link_id))
            .bind(col(items, |u| u.version))
            .bind(col(items, |u| &u.snapshot))
            .bind(col(items, |u| u.seen[0]))
            .bind(col(items, |u| u.seen[1]))
            .bind(col(items, |u| u.last_write))
            .bind(col(items, |u| u.settled));
        let rows = bind_log_rows(query, &entries).fetch_all(conn).await?;
        let mut stored = vec![false; items.len()];
        for row in rows {
            let ord: i32 = row.try_get(0)?;
            if let Some(s) = stored.get_mut(ord as usize) {
                *s = true;
            }
        }
        Ok(stored)
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the log rows of a batch as the next 15 arrays (`$9` to `$23` of [`STORE_BATCH_SQL`]).
fn bind_log_rows<'q>(query: PgQuery<'q>, rows: &[(i32, i32, &'q LogRow)]) -> PgQuery<'q> {
    fn col<'q, T>(
        rows: &[(i32, i32, &'q LogRow)],
        f: impl Fn(&(i32, i32, &'q LogRow)) -> T,
    ) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    query
        .bind(col(rows, |r| r.0))
        .bind(col(rows, |r| r.1))
        .bind(col(rows, |r| r.2.event_id))
        .bind(col(rows, |r| r.2.job_id))
        .bind(col(rows, |r| r.2.attempt))
        .bind(col(rows, |r| r.2.system))
        .bind(col(rows, |r| r.2.entity_type.as_str()))
        .bind(col(rows, |r| r.2.record_id.as_str()))
        .bind(col(rows, |r| r.2.flow.as_deref()))
        .bind(col(rows, |r| r.2.link))
        .bind(col(rows, |r| r.2.decision))
        .bind(col(rows, |r| r.2.read.as_ref()))
        .bind(col(rows, |r| r.2.written.as_ref()))
        .bind(col(rows, |r| r.2.detail.as_deref()))
        .bind(col(rows, |r| r.2.error.as_deref()))
}

/// One Zendesk event's link lookup (see [`Batches::find_link_for_event`]).
pub(crate) struct LinkLookup {
    pub system: &'static str,
    pub entity_type: String,
    pub record_id: String,
    pub flow_id: String,
    pub event_id: i64,
}

/// The active links of many records on one side, each with what its event's delivery said.
pub(crate) struct LookupBatch {
    sql: String,
}

impl LookupBatch {
    pub fn new(side: Side) -> LookupBatch {
        let s = side.as_str();
        let sql = format!(
            "SELECT q.q_ord, {cols}, (SELECT delivered FROM events WHERE id = q.q_event) \
             AS delivered FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[]) AS q(q_ord, q_system, q_type, q_id, q_flow, q_event) \
             JOIN links l ON l.state = 'active' AND l.{s}_system = q.q_system \
             AND l.{s}_type = q.q_type AND l.{s}_id = q.q_id AND l.flow_id = q.q_flow",
            cols = LINK_COLUMNS
                .split(", ")
                .map(|c| format!("l.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        LookupBatch { sql }
    }
}

#[async_trait]
impl Statement for LookupBatch {
    type Item = LinkLookup;
    type Answer = (Option<Link>, Option<Delivered>);

    async fn run(
        &self,
        conn: &mut PgConnection,
        items: &[LinkLookup],
    ) -> Result<Vec<Self::Answer>, sqlx::Error> {
        let rows = sqlx::query(&self.sql)
            .bind((0..items.len() as i32).collect::<Vec<_>>())
            .bind(items.iter().map(|i| i.system).collect::<Vec<_>>())
            .bind(
                items
                    .iter()
                    .map(|i| i.entity_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|i| i.record_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(items.iter().map(|i| i.flow_id.as_str()).collect::<Vec<_>>())
            .bind(items.iter().map(|i| i.event_id).collect::<Vec<_>>())
            .fetch_all(conn)
            .await?;
        let mut found: Vec<Self::Answer> = (0..items.len()).map(|_| (None, None)).collect();
        for row in rows {
            let ord: i32 = row.try_get("q_ord")?;
            let delivered = row
                .try_get::<Option<Value>, _>("delivered")?
                .and_then(|d| serde_json::from_value(d).ok());
            if let Some(slot) = found.get_mut(ord as usize) {
                *slot = (Some(link_of_row(&row)?), delivered);
            }
        }
        Ok(found)
    }
}

/// One custom-system echo to settle by its stamp (see [`Batches::log_if_own_stamp`]).
pub(crate) struct OwnStamp {
    entry: LogRow,
    system: &'static str,
    entity_type: String,
    record_id: String,
    flow_id: String,
    side: &'static str,
    stamp: DateTime<Utc>,
}

/// `store::log_if_own_stamp` for many events of one side: each entry is inserted (with its
/// link's id) only where its own link shows Tether's settled write of that side at its stamp.
pub(crate) struct OwnStampBatch {
    sql: String,
}

impl OwnStampBatch {
    pub fn new(side: Side) -> OwnStampBatch {
        let s = side.as_str();
        let sql = format!(
            "WITH q AS (SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::timestamptz[]) \
             AS q(ord, q_system, q_type, q_id, q_flow, q_side, q_stamp)), \
             matched AS (SELECT q.ord, l.id AS link_id FROM q JOIN links l ON l.state = 'active' \
             AND l.{s}_system = q.q_system AND l.{s}_type = q.q_type AND l.{s}_id = q.q_id \
             AND l.flow_id = q.q_flow AND l.last_write_side = q.q_side AND l.last_write_settled \
             AND l.{s}_seen_at = q.q_stamp), \
             entries AS (SELECT * FROM unnest($8::int[], $9::int[], $10::bigint[], $11::bigint[], \
             $12::int[], $13::text[], $14::text[], $15::text[], $16::text[], $17::bigint[], \
             $18::text[], $19::jsonb[], $20::jsonb[], $21::text[], $22::text[]) \
             AS e(ord, pos, event_id, job_id, attempt, system, entity_type, record_id, flow_id, \
             link_id, decision, read, written, detail, error)), \
             logged AS (INSERT INTO sync_log {LOG_COLUMNS} \
             SELECT e.event_id, e.job_id, e.attempt, e.system, e.entity_type, e.record_id, \
             e.flow_id, m.link_id, e.decision, e.read, e.written, e.detail, e.error \
             FROM entries e JOIN matched m ON m.ord = e.ord ORDER BY e.ord) \
             SELECT ord FROM matched"
        );
        OwnStampBatch { sql }
    }
}

#[async_trait]
impl Statement for OwnStampBatch {
    type Item = OwnStamp;
    type Answer = bool;

    async fn run(
        &self,
        conn: &mut PgConnection,
        items: &[OwnStamp],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let ords: Vec<i32> = (0..items.len() as i32).collect();
        fn col<'a, T>(items: &'a [OwnStamp], f: impl Fn(&'a OwnStamp) -> T) -> Vec<T> {
            items.iter().map(f).collect()
        }
        let entries: Vec<(i32, i32, &LogRow)> = items
            .iter()
            .zip(&ords)
            .map(|(i, &ord)| (ord, 0, &i.entry))
            .collect();
        let query = sqlx::query(&self.sql)
            .bind(&ords)
            .bind(col(items, |i| i.system))
            .bind(col(items, |i| i.entity_type.as_str()))
            .bind(col(items, |i| i.record_id.as_str()))
            .bind(col(items, |i| i.flow_id.as_str()))
            .bind(col(items, |i| i.side))
            .bind(col(items, |i| i.stamp));
        let rows = bind_log_rows(query, &entries).fetch_all(conn).await?;
        let mut logged = vec![false; items.len()];
        for row in rows {
            let ord: i32 = row.try_get(0)?;
            if let Some(l) = logged.get_mut(ord as usize) {
                *l = true;
            }
        }
        Ok(logged)
    }
}

/// The engine's combiners (`sync::combine`), started on first use, on the runtime of the
/// engine's jobs; they stop when the engine is dropped.
#[derive(Default)]
pub(crate) struct Batches {
    started: OnceLock<Started>,
}

struct Started {
    store: Combiner<StoreBatch>,
    /// By side: source, target.
    lookup: [Combiner<LookupBatch>; 2],
    /// By side: source, target.
    own_stamp: [Combiner<OwnStampBatch>; 2],
}

impl Batches {
    fn get(&self, pool: &PgPool) -> &Started {
        self.started.get_or_init(|| {
            let lookup = |side| Combiner::start(pool.clone(), LookupBatch::new(side), WINDOW);
            let own = |side| Combiner::start(pool.clone(), OwnStampBatch::new(side), WINDOW);
            Started {
                store: Combiner::start(pool.clone(), StoreBatch, STORE_WINDOW),
                lookup: [lookup(Side::Source), lookup(Side::Target)],
                own_stamp: [own(Side::Source), own(Side::Target)],
            }
        })
    }

    /// [`super::store_sync`] on the pool, batched with other workers' (one statement, one commit
    /// per batch): the same rows, the same answer (false when the link changed meanwhile).
    pub(crate) async fn store_sync(
        &self,
        pool: &PgPool,
        job: &ClaimedJob,
        (entry, beside): (&Entry<'_>, Option<&Entry<'_>>),
        link: &Link,
        state: LinkState,
    ) -> Result<bool, sqlx::Error> {
        // Counted as the single statement counts them: the decision always, `beside` if written.
        crate::ops::metrics::sync_decision(entry.flow, entry.decision.as_str());
        let mut entries = vec![LogRow::of(job, entry)];
        entries.extend(beside.map(|b| LogRow::of(job, b)));
        let update = LinkUpdate::new(link, state, entries);
        let stored = self.get(pool).store.submit(update).await?;
        if let (true, Some(second)) = (stored, beside) {
            crate::ops::metrics::sync_decision(second.flow, second.decision.as_str());
        }
        Ok(stored)
    }

    /// The active link of `flow` whose record on `side` is `id` and, in the same statement, what
    /// the delivery of event `event_id` said about the record (`events.delivered`,
    /// docs/sync-rules.md "An echo without a read"), if the link exists; a delivered state that
    /// cannot be read counts as none. Batched with other workers' lookups of the same side.
    pub(crate) async fn find_link_for_event(
        &self,
        pool: &PgPool,
        flow: &Dataflow,
        side: Side,
        id: &str,
        event_id: i64,
    ) -> Result<(Option<Link>, Option<Delivered>), sqlx::Error> {
        let e = entity(flow, side);
        let lookup = LinkLookup {
            system: e.system.as_str(),
            entity_type: e.entity_type.clone(),
            record_id: id.to_owned(),
            flow_id: flow.id.clone(),
            event_id,
        };
        self.get(pool).lookup[side_index(side)].submit(lookup).await
    }
    /// `store::log_if_own_stamp`, batched with other workers' of the same side: logs `entry`
    /// (its link taken from the row) if the active link of `flow` whose record on `side` is `id`
    /// shows Tether's settled write of that side at `stamp`; answers whether it did.
    pub(crate) async fn log_if_own_stamp(
        &self,
        pool: &PgPool,
        job: &ClaimedJob,
        entry: &Entry<'_>,
        (flow, side, id): (&Dataflow, Side, &str),
        stamp: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let e = entity(flow, side);
        let item = OwnStamp {
            entry: LogRow::of(job, entry),
            system: e.system.as_str(),
            entity_type: e.entity_type.clone(),
            record_id: id.to_owned(),
            flow_id: flow.id.clone(),
            side: side.as_str(),
            stamp,
        };
        let logged = self.get(pool).own_stamp[side_index(side)]
            .submit(item)
            .await?;
        if logged {
            crate::ops::metrics::sync_decision(entry.flow, entry.decision.as_str());
        }
        Ok(logged)
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Target => 1,
    }
}
