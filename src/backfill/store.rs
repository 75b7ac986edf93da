//! The SQL of backfill plans: storing a plan and its items, enqueueing its records once,
//! progress, and what the sync engine reads and marks while it carries the items out.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::plan::Plan;
use super::{Summary, VerdictKind};
use crate::queue::JobPriority;

/// Items inserted per statement.
const CHUNK: usize = 5_000;

/// Stores the plan and its items in one transaction; returns the plan's id (also set in the
/// plan's summary).
pub async fn save(pool: &PgPool, plan: &mut Plan) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO backfill_plans (summary, estimated_seconds) VALUES ('{}', $1) RETURNING id",
    )
    .bind(plan.summary.estimated_seconds as i64)
    .fetch_one(&mut *tx)
    .await?;
    plan.summary.plan = id;
    sqlx::query("UPDATE backfill_plans SET summary = $2 WHERE id = $1")
        .bind(id)
        .bind(sqlx::types::Json(&plan.summary))
        .execute(&mut *tx)
        .await?;
    let rows: Vec<_> = plan
        .flows
        .iter()
        .flat_map(|f| f.items.iter().map(move |i| (f, i)))
        .collect();
    for chunk in rows.chunks(CHUNK) {
        let col = |get: &dyn Fn(&(_, _)) -> Option<String>| -> Vec<Option<String>> {
            chunk.iter().map(get).collect()
        };
        sqlx::query(
            "INSERT INTO backfill_items (plan_id, flow_id, stage, source_system, source_type, \
             source_id, source_updated_at, verdict, target_id, reason, detail, writes) \
             SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::text[], $5::text[], $6::text[], \
             $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int[])",
        )
        .bind(id)
        .bind(col(&|(f, _)| Some(f.flow.id.clone())))
        .bind(chunk.iter().map(|(f, _)| f.stage).collect::<Vec<i32>>())
        .bind(col(&|(f, _)| {
            Some(f.flow.source.system.as_str().to_owned())
        }))
        .bind(col(&|(f, _)| Some(f.flow.source.entity_type.clone())))
        .bind(col(&|(_, i)| Some(i.source_id.clone())))
        .bind(
            chunk
                .iter()
                .map(|(_, i)| i.source_updated_at)
                .collect::<Vec<Option<DateTime<Utc>>>>(),
        )
        .bind(col(&|(_, i)| Some(i.verdict.kind().as_str().to_owned())))
        .bind(col(&|(_, i)| i.verdict.target_id().map(str::to_owned)))
        .bind(col(&|(_, i)| i.verdict.reason()))
        .bind(col(&|(_, i)| i.verdict.detail()))
        .bind(
            chunk
                .iter()
                .map(|(_, i)| i.verdict.writes() as i32)
                .collect::<Vec<i32>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// A stored plan's summary, if the plan exists.
pub async fn summary(pool: &PgPool, plan: i64) -> Result<Option<Summary>, sqlx::Error> {
    let row: Option<(sqlx::types::Json<Summary>,)> =
        sqlx::query_as("SELECT summary FROM backfill_plans WHERE id = $1")
            .bind(plan)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(s,)| s.0))
}

/// The newest plan's id.
pub async fn latest(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(id) FROM backfill_plans")
        .fetch_one(pool)
        .await
}

/// One exported item (`--csv`).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub flow: String,
    pub source_id: String,
    pub verdict: String,
    pub target_id: Option<String>,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub writes: i32,
}

/// Every item of a plan, in run order.
pub async fn items(pool: &PgPool, plan: i64) -> Result<Vec<ItemRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT flow_id, source_id, verdict, target_id, reason, detail, writes \
         FROM backfill_items WHERE plan_id = $1 ORDER BY stage, id",
    )
    .bind(plan)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ItemRow {
                flow: r.try_get("flow_id")?,
                source_id: r.try_get("source_id")?,
                verdict: r.try_get("verdict")?,
                target_id: r.try_get("target_id")?,
                reason: r.try_get("reason")?,
                detail: r.try_get("detail")?,
                writes: r.try_get("writes")?,
            })
        })
        .collect()
}

/// What [`enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The plan's records were enqueued now (this many records, in jobs of up to
    /// [`BATCH_RECORDS`]).
    Now(u64),
    /// An earlier run enqueued them; nothing was added.
    Before,
    /// No such plan.
    NoPlan,
}

/// Source records per backfill job. A job carries a page of the plan: its items are read, their
/// links and intents looked up, and the creates that need nothing but the vendor call are
/// recorded a chunk at a time (`sync::backfill`), so the queue's and the log's statements are
/// paid per page, not per record. Small enough that a page's work is a few seconds at a
/// throttled vendor and that progress advances in steps a person sees.
pub const BATCH_RECORDS: usize = 50;

/// Enqueues the source records the plan acts on, [`BATCH_RECORDS`] per job, parents' stages
/// first, once: the plan row is locked and marked in the same transaction, and each event's
/// delivery id names the plan and the page, so running a plan again (or twice at once) adds
/// nothing.
pub async fn enqueue(pool: &PgPool, plan: i64) -> Result<Enqueued, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let state: Option<(Option<DateTime<Utc>>,)> =
        sqlx::query_as("SELECT enqueued_at FROM backfill_plans WHERE id = $1 FOR UPDATE")
            .bind(plan)
            .fetch_optional(&mut *tx)
            .await?;
    match state {
        None => return Ok(Enqueued::NoPlan),
        Some((Some(_),)) => return Ok(Enqueued::Before),
        Some((None,)) => {}
    }
    let records: Vec<(i32, String, String, String)> = sqlx::query_as(
        "SELECT min(stage), source_system, source_type, source_id FROM backfill_items \
         WHERE plan_id = $1 AND verdict IN ('link', 'create') \
         GROUP BY source_system, source_type, source_id ORDER BY min(stage), min(id)",
    )
    .bind(plan)
    .fetch_all(&mut *tx)
    .await?;
    // In the plan's transaction: a page's event and its items' pointers are made together.
    let pick = |f: fn(&(i32, String, String, String)) -> &String| -> Vec<&str> {
        records.iter().map(|r| f(r).as_str()).collect()
    };
    let pages = pages(&records);
    let events: HashMap<i32, i64> = sqlx::query_as(ENQUEUE)
        .bind(plan)
        .bind(pick(|r| &r.1))
        .bind(pick(|r| &r.2))
        .bind(JobPriority::Backfill.as_i16())
        .bind(&pages)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let event_of: Vec<Option<i64>> = pages.iter().map(|p| events.get(p).copied()).collect();
    sqlx::query(POINT_ITEMS)
        .bind(plan)
        .bind(pick(|r| &r.1))
        .bind(pick(|r| &r.2))
        .bind(pick(|r| &r.3))
        .bind(&event_of)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE backfill_plans SET enqueued_at = now(), started_at = coalesce(started_at, now()) \
         WHERE id = $1",
    )
    .bind(plan)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Enqueued::Now(records.len() as u64))
}

/// The page of each record, in order: a new page every [`BATCH_RECORDS`] records and wherever
/// the stage or the record type changes (a job reads one type, and parents' pages come first).
fn pages(records: &[(i32, String, String, String)]) -> Vec<i32> {
    let mut out = Vec::with_capacity(records.len());
    let mut page = 0;
    let mut in_page = 0;
    for (i, r) in records.iter().enumerate() {
        let boundary = i > 0 && {
            let p = &records[i - 1];
            (p.0, &p.1, &p.2) != (r.0, &r.1, &r.2)
        };
        if boundary || in_page == BATCH_RECORDS {
            page += 1;
            in_page = 0;
        }
        in_page += 1;
        out.push(page);
    }
    out
}

/// The record id of a page's event: `backfill:<plan>:<page>` of the page's system and type. Its
/// job's record key is unique, so the page runs beside live jobs of its records; create intents
/// and the links' unique indexes keep each record to one counterpart (docs/backfill.md).
pub fn page_record_id(plan: i64, page: i32) -> String {
    format!("{DELIVERY_PREFIX}{plan}:{page}")
}

/// Whether an event is a backfill page (its record id names the page, not a record).
pub fn is_page_event(event: &crate::domain::ChangeEvent) -> bool {
    is_backfill_event(event) && event.record.record_id.starts_with(DELIVERY_PREFIX)
}

/// One event and one job per page, in the order given (job ids follow it, so the claim takes
/// parents first); returns each page's event. The event's delivery id is
/// `backfill:<plan>:page/<page>`.
const ENQUEUE: &str = "
    WITH p AS (
        SELECT page, min(system) AS system, min(entity_type) AS entity_type, min(ord) AS ord
        FROM UNNEST($2::text[], $3::text[], $5::int[]) WITH ORDINALITY
            AS r(system, entity_type, page, ord)
        GROUP BY page
    ), ev AS (
        INSERT INTO events (system, entity_type, record_id, action, occurred_at, delivery_id)
        SELECT system, entity_type, 'backfill:' || $1 || ':' || page, 'updated', now(),
               'backfill:' || $1 || ':page/' || page
        FROM p ORDER BY ord
        ON CONFLICT (system, delivery_id) DO NOTHING
        RETURNING id, system, entity_type, record_id
    ), jobs_added AS (
        INSERT INTO jobs (event_id, record_key, priority)
        SELECT id, system || '/' || entity_type || '/' || record_id, $4 FROM ev ORDER BY id
        RETURNING event_id
    )
    SELECT split_part(record_id, ':', 3)::int, id FROM ev";

/// The items of each enqueued record pointed at their page's event. A statement of its own
/// with the event of each record given: joined in one statement with the events just
/// inserted, whose row count the planner cannot know, the join was a nested loop comparing
/// every record with every page (0.65 s for 10,000 records, docs/backfill.md).
const POINT_ITEMS: &str = "
    UPDATE backfill_items i SET event_id = r.event_id
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[])
        AS r(system, entity_type, record_id, event_id)
    WHERE i.plan_id = $1 AND i.source_system = r.system AND i.source_type = r.entity_type
      AND i.source_id = r.record_id AND i.verdict IN ('link', 'create')
      AND r.event_id IS NOT NULL";

/// Where a plan's run stands: items to carry out, carried out, failed for good (their job is a
/// dead letter), and how the carried-out ones went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub enqueued: bool,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    /// `followed`, `replanned`, `already_linked` (docs/backfill.md).
    pub results: BTreeMap<String, u64>,
}

impl Progress {
    /// Nothing left to wait for.
    pub fn finished(&self) -> bool {
        self.enqueued && self.done + self.failed >= self.total
    }
}

pub async fn progress(pool: &PgPool, plan: i64) -> Result<Progress, sqlx::Error> {
    let enqueued: Option<bool> =
        sqlx::query_scalar("SELECT enqueued_at IS NOT NULL FROM backfill_plans WHERE id = $1")
            .bind(plan)
            .fetch_optional(pool)
            .await?;
    // Two small statements rather than every item joined to `jobs`, which scanned both tables on
    // every poll (`tether backfill run` polls several times a second): the items by result, and
    // the dead letters (few) with their items found by event.
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT result, count(*) FROM backfill_items \
         WHERE plan_id = $1 AND verdict IN ('link', 'create') GROUP BY 1",
    )
    .bind(plan)
    .fetch_all(pool)
    .await?;
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j JOIN backfill_items i ON i.event_id = j.event_id \
         WHERE j.state = 'dead' AND i.plan_id = $1 AND i.done_at IS NULL \
           AND i.verdict IN ('link', 'create')",
    )
    .bind(plan)
    .fetch_one(pool)
    .await?;
    let mut p = Progress {
        enqueued: enqueued.unwrap_or(false),
        ..Progress::default()
    };
    for (result, n) in rows {
        let n = n as u64;
        p.total += n;
        if let Some(r) = result {
            p.done += n;
            *p.results.entry(r).or_default() += n;
        }
    }
    p.failed = failed as u64;
    Ok(p)
}

/// The newest `n` plans with where each run stands (the console's Backfill page).
pub async fn recent(pool: &PgPool, n: i64) -> Result<Vec<(Summary, Progress)>, sqlx::Error> {
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM backfill_plans ORDER BY id DESC LIMIT $1")
            .bind(n)
            .fetch_all(pool)
            .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(summary) = summary(pool, id).await? {
            out.push((summary, progress(pool, id).await?));
        }
    }
    Ok(out)
}

/// The engine's decisions for a plan's records, by name (`created`, `linked_by_merge_criteria`,
/// `updated`, ...), counted per flow entry: what the run did.
pub async fn decisions(pool: &PgPool, plan: i64) -> Result<BTreeMap<String, u64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT l.decision, count(*) FROM sync_log l \
         WHERE l.event_id IN (SELECT event_id FROM backfill_items \
                              WHERE plan_id = $1 AND event_id IS NOT NULL) \
           AND l.flow_id IS NOT NULL \
         GROUP BY 1 ORDER BY 1",
    )
    .bind(plan)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(d, n)| (d, n as u64)).collect())
}

/// The delivery ids of backfill events start with this (`backfill:<plan>:<record key>`).
pub const DELIVERY_PREFIX: &str = "backfill:";

/// Whether an event was enqueued by a backfill run (also when it is replayed after a pause).
pub fn is_backfill_event(event: &crate::domain::ChangeEvent) -> bool {
    event.delivery_id.starts_with(DELIVERY_PREFIX)
}

/// An item as the engine carries it out.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
    pub id: i64,
    pub plan_id: i64,
    pub flow_id: String,
    /// The source record (a page's items name several).
    pub source_id: String,
    pub action: PlannedAction,
    pub source_updated_at: Option<DateTime<Utc>>,
    pub done: bool,
}

/// What the plan said to do.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedAction {
    /// Link to this target record.
    Link {
        target_id: String,
    },
    Create,
}

/// The items a backfill job carries out (one per flow of each record of its page), found by its
/// event, in plan order.
pub async fn items_of_event(pool: &PgPool, event_id: i64) -> Result<Vec<PlannedItem>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, plan_id, flow_id, source_id, verdict, target_id, source_updated_at, \
         done_at IS NOT NULL AS done FROM backfill_items WHERE event_id = $1 ORDER BY id",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let verdict: String = r.try_get("verdict")?;
        let target: Option<String> = r.try_get("target_id")?;
        let action = match (VerdictKind::parse(&verdict), target) {
            (Some(VerdictKind::Link), Some(target_id)) => PlannedAction::Link { target_id },
            (Some(VerdictKind::Create), _) => PlannedAction::Create,
            // Only link and create items are given an event.
            _ => continue,
        };
        out.push(PlannedItem {
            id: r.try_get("id")?,
            plan_id: r.try_get("plan_id")?,
            flow_id: r.try_get("flow_id")?,
            source_id: r.try_get("source_id")?,
            action,
            source_updated_at: r.try_get("source_updated_at")?,
            done: r.try_get("done")?,
        });
    }
    Ok(out)
}

/// How the engine carried an item out (`backfill_items.result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemResult {
    /// As planned: linked to the planned record, or created.
    Followed,
    /// The record changed since the plan, or the planned match no longer fits: the engine
    /// decided with its own merge criteria, as for a live event.
    Replanned,
    /// The record was linked by the time its job ran (a live event, or an earlier run).
    AlreadyLinked,
    /// The record no longer exists at its system.
    Gone,
}

impl ItemResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemResult::Followed => "followed",
            ItemResult::Replanned => "replanned",
            ItemResult::AlreadyLinked => "already_linked",
            ItemResult::Gone => "gone",
        }
    }
}

/// Marks an item carried out (once: a later run of the same job keeps the first result).
pub async fn item_done(pool: &PgPool, item: i64, result: ItemResult) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE backfill_items SET done_at = now(), result = $2 WHERE id = $1 AND done_at IS NULL",
    )
    .bind(item)
    .bind(result.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks items carried out, inside the caller's transaction (with the links they made), once
/// each as [`item_done`] does.
pub async fn items_done(
    conn: &mut sqlx::PgConnection,
    items: &[(i64, ItemResult)],
) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = items.iter().map(|i| i.0).collect();
    let results: Vec<&str> = items.iter().map(|i| i.1.as_str()).collect();
    sqlx::query(
        "UPDATE backfill_items i SET done_at = now(), result = u.result \
         FROM UNNEST($1::bigint[], $2::text[]) AS u(id, result) \
         WHERE i.id = u.id AND i.done_at IS NULL",
    )
    .bind(&ids)
    .bind(&results)
    .persistent(false)
    .execute(conn)
    .await?;
    Ok(())
}
