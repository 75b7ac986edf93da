//! `tether undo --flow <id> --since <time> [--dry-run]` (docs/guard.md): for the records a flow
//! wrote since then, the values from before its first write are written back, as one plan the
//! operator can review first (`--dry-run`).
//!
//! Where the values come from: every `updated` entry of the sync log keeps what both sides held
//! before the write (`read`) and what was written (`written`). Per record and property the
//! earliest write since `--since` gives the value to restore, the latest the value the flow left.
//! A property someone changed after the flow wrote it is left as it is (nothing stale is written).
//! Creates are not undone (the records stay), references are not restored (their ids are the
//! link's business), and ended links are skipped.
//!
//! The writes go through the connectors like every write, are logged as `undone`, and leave the
//! link's snapshot as it was: the echo of an undo is then a change of the written side, which a
//! one-way flow does not copy back and a two-way flow carries to the other side like any edit.
//! Undo's own writes are never held by the guard.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sqlx::PgPool;

use crate::connectors::{set_path, Connector, ConnectorError, Record};
use crate::domain::SystemId;
use crate::registry::{Dataflow, EntityRef};
use crate::sync::merge::normalize;

/// What undo does with one property of one record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Write `restore` back.
    Restore,
    /// Changed after the flow wrote it: left as it is.
    ChangedSince { now: Value },
    /// Already holds the value from before.
    AlreadyRestored,
}

/// One property of one record the flow wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UndoItem {
    pub link: i64,
    /// `<system>/<type>/<id>`.
    pub record: String,
    pub property: String,
    /// What the flow wrote last.
    pub written: Value,
    /// The value before the flow's first write since `--since`.
    pub restore: Value,
    #[serde(flatten)]
    pub action: Action,
}

/// The reviewable plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UndoPlan {
    pub flow: String,
    pub since: DateTime<Utc>,
    pub items: Vec<UndoItem>,
    /// Records the flow created since then; undo does not delete them.
    pub created_not_undone: i64,
    /// Records the flow wrote that are gone now.
    pub gone: Vec<String>,
}

/// Why undo could not plan or finish.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{system} is not connected, so the flow's writes to it cannot be undone")]
    NotConnected { system: SystemId },
    #[error("{0}")]
    Vendor(#[from] ConnectorError),
}

/// One record the flow wrote: its side's entity and id, and per property (restore, written).
struct Touched<'f> {
    link: i64,
    entity: &'f EntityRef,
    id: String,
    properties: BTreeMap<String, (Value, Value)>,
}

type Connectors = HashMap<SystemId, Arc<dyn Connector>>;

/// Reads the log and the records as they are now, and says what undo would do.
pub async fn plan(
    pool: &PgPool,
    connectors: &Connectors,
    flow: &Dataflow,
    since: DateTime<Utc>,
) -> Result<UndoPlan, UndoError> {
    let touched = touched(pool, flow, since).await?;
    let mut plan = UndoPlan {
        flow: flow.id.clone(),
        since,
        items: Vec::new(),
        created_not_undone: created_since(pool, flow, since).await?,
        gone: Vec::new(),
    };
    for t in touched {
        let conn = connector(connectors, t.entity.system)?;
        let record = format!("{}/{}/{}", t.entity.system, t.entity.entity_type, t.id);
        let Some(current) = conn.fetch(&t.entity.entity_type, &t.id).await? else {
            plan.gone.push(record);
            continue;
        };
        for (property, (restore, written)) in t.properties {
            let action = action_for(&current, &property, &restore, &written);
            plan.items.push(UndoItem {
                link: t.link,
                record: record.clone(),
                property,
                written,
                restore,
                action,
            });
        }
    }
    Ok(plan)
}

fn action_for(current: &Record, property: &str, restore: &Value, written: &Value) -> Action {
    let now = normalize(current.get_path(property));
    if now == *restore {
        Action::AlreadyRestored
    } else if now == normalize(Some(written)) {
        Action::Restore
    } else {
        Action::ChangedSince { now }
    }
}

fn connector(connectors: &Connectors, system: SystemId) -> Result<&Arc<dyn Connector>, UndoError> {
    connectors
        .get(&system)
        .ok_or(UndoError::NotConnected { system })
}

async fn created_since(
    pool: &PgPool,
    flow: &Dataflow,
    since: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM sync_log WHERE flow_id = $1 AND at >= $2 AND decision = 'created'",
    )
    .bind(&flow.id)
    .bind(since)
    .fetch_one(pool)
    .await
}

/// The records of active links the flow updated since `since`, with the values per property.
async fn touched<'f>(
    pool: &PgPool,
    flow: &'f Dataflow,
    since: DateTime<Utc>,
) -> Result<Vec<Touched<'f>>, sqlx::Error> {
    let rows: Vec<(i64, String, String, Value, Value)> = sqlx::query_as(
        "SELECT l.link_id, k.source_id, k.target_id, l.read, l.written FROM sync_log l \
         JOIN links k ON k.id = l.link_id AND k.state = 'active' \
         WHERE l.flow_id = $1 AND l.at >= $2 AND l.decision = 'updated' \
         AND l.written IS NOT NULL AND l.read IS NOT NULL ORDER BY l.id",
    )
    .bind(&flow.id)
    .bind(since)
    .fetch_all(pool)
    .await?;
    let mut by_record: BTreeMap<(i64, &'static str), Touched<'f>> = BTreeMap::new();
    for (link, source_id, target_id, read, written) in rows {
        for (side, entity, id) in [
            ("source", &flow.source, source_id),
            ("target", &flow.target, target_id),
        ] {
            let Some(fields) = written.get(side).and_then(Value::as_object) else {
                continue;
            };
            let t = by_record.entry((link, side)).or_insert_with(|| Touched {
                link,
                entity,
                id,
                properties: BTreeMap::new(),
            });
            for path in plain_paths(flow, side) {
                let Some(value) = value_at(fields, path) else {
                    continue;
                };
                let before = normalize(read.get(side).and_then(|r| r["values"].get(path)));
                let entry = t.properties.entry(path.to_owned());
                // The earliest write gives the value before; the latest what the flow left.
                entry
                    .and_modify(|(_, written)| *written = value.clone())
                    .or_insert((before, value.clone()));
            }
        }
    }
    Ok(by_record.into_values().collect())
}

/// The side's paths of the flow's synced properties that are not references.
fn plain_paths<'f>(flow: &'f Dataflow, side: &str) -> impl Iterator<Item = &'f str> {
    let source = side == "source";
    flow.properties
        .iter()
        .filter(|p| p.syncs_to_target() && p.reference.is_none())
        .map(move |p| {
            if source {
                p.source.as_str()
            } else {
                p.target.as_str()
            }
        })
}

/// The value at a dotted path of written fields.
fn value_at<'a>(fields: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = fields.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    Some(value)
}

/// What carrying out a plan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Undone {
    pub records: usize,
    pub values: usize,
}

/// Writes back every `Restore` item, one update per record, each logged as `undone`.
pub async fn carry_out(
    pool: &PgPool,
    connectors: &Connectors,
    flow: &Dataflow,
    plan: &UndoPlan,
) -> Result<Undone, UndoError> {
    let mut per_record: BTreeMap<(&str, i64), Map<String, Value>> = BTreeMap::new();
    for item in plan.items.iter().filter(|i| i.action == Action::Restore) {
        let fields = per_record.entry((&item.record, item.link)).or_default();
        set_path(fields, &item.property, item.restore.clone());
    }
    let mut done = Undone {
        records: 0,
        values: 0,
    };
    for ((record, link), fields) in per_record {
        let (entity, id) = entity_of(flow, record);
        let conn = connector(connectors, entity.system)?;
        conn.update(&entity.entity_type, id, &fields).await?;
        log_undone(pool, flow, (entity, id), link, &fields, plan.since).await?;
        done.records += 1;
        done.values += fields.len();
    }
    Ok(done)
}

/// The flow's entity a `<system>/<type>/<id>` of the plan belongs to, and the id.
fn entity_of<'a>(flow: &'a Dataflow, record: &'a str) -> (&'a EntityRef, &'a str) {
    for e in [&flow.target, &flow.source] {
        let prefix = format!("{}/{}/", e.system, e.entity_type);
        if let Some(id) = record.strip_prefix(&prefix) {
            return (e, id);
        }
    }
    unreachable!("the plan's records are the flow's")
}

async fn log_undone(
    pool: &PgPool,
    flow: &Dataflow,
    (entity, id): (&EntityRef, &str),
    link: i64,
    fields: &Map<String, Value>,
    since: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let side = if *entity == flow.target {
        "target"
    } else {
        "source"
    };
    sqlx::query(
        "INSERT INTO sync_log (system, entity_type, record_id, flow_id, link_id, decision, \
         written, detail) VALUES ($1, $2, $3, $4, $5, 'undone', $6, $7)",
    )
    .bind(entity.system.as_str())
    .bind(&entity.entity_type)
    .bind(id)
    .bind(&flow.id)
    .bind(link)
    .bind(json!({ side: fields }))
    .bind(format!(
        "`tether undo --since {}`: the values from before the flow's writes written back",
        since.to_rfc3339()
    ))
    .execute(pool)
    .await?;
    Ok(())
}
