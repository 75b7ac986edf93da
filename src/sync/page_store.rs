//! The SQL of a backfill page (docs/backfill.md, "Running a plan"): the statements of
//! [`super::store`] for many records at once, so that a page of plain creates costs a handful of
//! statements instead of several per record. Same tables, same rules (rule 8: intents committed
//! before the creates are sent).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::store::*;
use crate::connectors::Record;
use crate::domain::SystemId;
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

/// Of `ids` (records of `system`/`entity_type`), those in any active link, on either side of
/// any flow: a backfill page leaves them to the engine's full path per record (linked already,
/// or linked by a flow the other way: rule 1), in one statement for the page.
pub(crate) async fn linked_among(
    pool: &PgPool,
    (system, entity_type): (SystemId, &str),
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT source_id FROM links WHERE state = 'active' AND source_system = $1 \
           AND source_type = $2 AND source_id = ANY($3) \
         UNION \
         SELECT target_id FROM links WHERE state = 'active' AND target_system = $1 \
           AND target_type = $2 AND target_id = ANY($3)",
    )
    .bind(system.as_str())
    .bind(entity_type)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(found.into_iter().collect())
}

/// Of `ids` (source records of `flow`), those with an open create intent (rule 8: the engine's
/// full path deals with it, by its idempotency key).
pub(crate) async fn intents_among(
    pool: &PgPool,
    flow: &Dataflow,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT source_id FROM link_intents WHERE state = 'pending' AND source_system = $1 \
         AND source_type = $2 AND source_id = ANY($3) AND flow_id = $4",
    )
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(ids)
    .bind(&flow.id)
    .fetch_all(pool)
    .await?;
    Ok(found.into_iter().collect())
}

/// [`insert_intent`] for several source records in one statement (committed before any of
/// their creates is sent, rule 8); returns the intent id of each record that got one (a record
/// another job recorded an intent for first gets none).
pub(crate) async fn insert_intents(
    pool: &PgPool,
    flow: &Dataflow,
    rows: &[(&str, Uuid, &Map<String, Value>)],
    job_id: i64,
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let keys: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    let written: Vec<Value> = rows.iter().map(|r| Value::Object(r.2.clone())).collect();
    let made: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO link_intents (flow_id, source_system, source_type, source_id, \
         idempotency_key, owner_job_id, lease_until, written) \
         SELECT $1, $2, $3, u.source_id, u.key, $6, now() + make_interval(secs => $7), u.written \
         FROM UNNEST($4::text[], $5::uuid[], $8::jsonb[]) AS u(source_id, key, written) \
         ON CONFLICT DO NOTHING RETURNING source_id, id",
    )
    .bind(&flow.id)
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(&ids)
    .bind(&keys)
    .bind(job_id)
    .bind(INTENT_LEASE_SECS)
    .bind(&written)
    .persistent(false)
    .fetch_all(pool)
    .await?;
    Ok(made.into_iter().collect())
}

/// A counterpart just created for a backfill page: the source record, what was created, the
/// snapshot of the values sent, the intent it closes, and its log entry.
pub(crate) struct CreatedLink<'a> {
    pub job: ClaimedJob,
    pub src: &'a Record,
    pub created: Record,
    pub snapshot: Map<String, Value>,
    pub intent: i64,
    pub entry: Entry<'a>,
    /// The create's answer showed every synced value as the snapshot has it, with its stamp:
    /// the link remembers the create as its settled write of the target side
    /// (`links.last_write_settled`), so the target's webhook of it is settled without a read.
    pub settled: bool,
}

/// [`insert_link`] and [`log`] for several created counterparts of one flow, in the caller's
/// transaction: one statement for the links and their intents, one for the entries.
pub(crate) async fn insert_created_links(
    tx: &mut PgConnection,
    flow: &Dataflow,
    made: &[CreatedLink<'_>],
) -> Result<(), sqlx::Error> {
    if made.is_empty() {
        return Ok(());
    }
    let col =
        |f: &dyn Fn(&CreatedLink<'_>) -> String| -> Vec<String> { made.iter().map(f).collect() };
    let link_ids: Vec<(i64, String)> = sqlx::query_as(
        "WITH u AS (SELECT * FROM UNNEST($5::text[], $6::text[], $7::jsonb[], \
                                         $8::timestamptz[], $9::timestamptz[], $10::bigint[], \
                                         $12::bool[]) \
                    WITH ORDINALITY AS u(source_id, target_id, snapshot, s_at, t_at, intent, \
                                         settled, ord)), \
              closed AS (UPDATE link_intents SET state = 'done', done_at = now() \
                         WHERE id IN (SELECT intent FROM u)) \
         INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side, \
         last_write_settled) \
         SELECT $1, $2, $3, source_id, $4, $11, target_id, snapshot, s_at, t_at, 'target', settled \
         FROM u ORDER BY ord RETURNING id, source_id",
    )
    .bind(&flow.id)
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(flow.target.system.as_str())
    .bind(col(&|m| m.src.id.clone()))
    .bind(col(&|m| m.created.id.clone()))
    .bind(
        made.iter()
            .map(|m| Value::Object(m.snapshot.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(made.iter().map(|m| m.src.updated_at).collect::<Vec<_>>())
    .bind(
        made.iter()
            .map(|m| m.created.updated_at)
            .collect::<Vec<_>>(),
    )
    .bind(made.iter().map(|m| m.intent).collect::<Vec<_>>())
    .bind(&flow.target.entity_type)
    .bind(made.iter().map(|m| m.settled).collect::<Vec<_>>())
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    // A flow's source record has one item in a page, so its id names its new link.
    let by_source: HashMap<String, i64> = link_ids.into_iter().map(|(id, s)| (s, id)).collect();
    let entries: Vec<(&ClaimedJob, Entry<'_>)> = made
        .iter()
        .map(|m| {
            let mut e = m.entry.clone();
            e.link = by_source.get(&m.src.id).copied();
            (&m.job, e)
        })
        .collect();
    log_many(tx, &entries).await
}

/// A planned link of a backfill page, its target re-read and still matching: the source
/// record, the target as it is now, the merge base (the target's own values) and the log entry.
pub(crate) struct PlannedLink<'a> {
    pub job: ClaimedJob,
    pub src: &'a Record,
    pub target: Record,
    pub base: Map<String, Value>,
    pub entry: Entry<'a>,
}

/// [`insert_link`] and [`log`] for several planned links of one flow, in the caller's
/// transaction: one statement for the links, one for the entries of those stored. The links'
/// unique indexes decide (never one record linked to two): a link whose source or target was
/// linked meanwhile is not stored, logged nor returned, and its record is checked again by the
/// caller. Returns the new link of each source record stored.
pub(crate) async fn insert_planned_links(
    tx: &mut PgConnection,
    flow: &Dataflow,
    links: &[PlannedLink<'_>],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    if links.is_empty() {
        return Ok(HashMap::new());
    }
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side) \
         SELECT $1, $2, $3, source_id, $4, $5, target_id, snapshot, s_at, t_at, 'target' \
         FROM UNNEST($6::text[], $7::text[], $8::jsonb[], $9::timestamptz[], \
                     $10::timestamptz[]) WITH ORDINALITY \
              AS u(source_id, target_id, snapshot, s_at, t_at, ord) \
         ORDER BY ord ON CONFLICT DO NOTHING RETURNING id, source_id",
    )
    .bind(&flow.id)
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(flow.target.system.as_str())
    .bind(&flow.target.entity_type)
    .bind(links.iter().map(|l| l.src.id.as_str()).collect::<Vec<_>>())
    .bind(
        links
            .iter()
            .map(|l| l.target.id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        links
            .iter()
            .map(|l| Value::Object(l.base.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(links.iter().map(|l| l.src.updated_at).collect::<Vec<_>>())
    .bind(
        links
            .iter()
            .map(|l| l.target.updated_at)
            .collect::<Vec<_>>(),
    )
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    // A flow's source record has one item in a page, so its id names its new link.
    let by_source: HashMap<String, i64> = stored.into_iter().map(|(id, s)| (s, id)).collect();
    let entries: Vec<(&ClaimedJob, Entry<'_>)> = links
        .iter()
        .filter_map(|l| {
            let mut e = l.entry.clone();
            e.link = Some(*by_source.get(&l.src.id)?);
            Some((&l.job, e))
        })
        .collect();
    log_many(tx, &entries).await?;
    Ok(by_source)
}

/// Several log entries in one statement (each counted as [`log`] counts it).
pub(crate) async fn log_many(
    conn: &mut PgConnection,
    entries: &[(&ClaimedJob, Entry<'_>)],
) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    for (_, e) in entries {
        crate::ops::metrics::sync_decision(e.flow, e.decision.as_str());
    }
    let text = |f: &dyn Fn(&ClaimedJob, &Entry<'_>) -> Option<String>| -> Vec<Option<String>> {
        entries.iter().map(|(j, e)| f(j, e)).collect()
    };
    let json = |f: &dyn Fn(&Entry<'_>) -> Option<Value>| -> Vec<Option<Value>> {
        entries.iter().map(|(_, e)| f(e)).collect()
    };
    sqlx::query(&format!(
        "INSERT INTO sync_log {LOG_COLUMNS} SELECT * FROM UNNEST($1::bigint[], $2::bigint[], \
         $3::int[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[], \
         $10::jsonb[], $11::jsonb[], $12::text[], $13::text[])"
    ))
    .bind(entries.iter().map(|(j, _)| j.event_id).collect::<Vec<_>>())
    .bind(entries.iter().map(|(j, _)| j.job_id).collect::<Vec<_>>())
    .bind(entries.iter().map(|(j, _)| j.attempt).collect::<Vec<_>>())
    .bind(text(&|j, _| {
        Some(j.event.record.system.as_str().to_owned())
    }))
    .bind(text(&|j, _| Some(j.event.record.entity_type.clone())))
    .bind(text(&|j, _| Some(j.event.record.record_id.clone())))
    .bind(text(&|_, e| e.flow.map(str::to_owned)))
    .bind(entries.iter().map(|(_, e)| e.link).collect::<Vec<_>>())
    .bind(text(&|_, e| Some(e.decision.as_str().to_owned())))
    .bind(json(&|e| e.read.clone()))
    .bind(json(&|e| e.written.clone()))
    .bind(text(&|_, e| e.detail.clone()))
    .bind(text(&|_, e| e.error.clone()))
    .persistent(false)
    .execute(conn)
    .await?;
    Ok(())
}
