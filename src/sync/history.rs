//! A record's links and their history of decisions, as `tether links show` prints them.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use super::Decision;
use crate::domain::RecordKey;

/// One link of a record, active or ended.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LinkView {
    pub id: i64,
    pub flow_id: String,
    pub source: String,
    pub target: String,
    pub state: String,
    pub end_reason: Option<String>,
    pub snapshot: Value,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// One `sync_log` row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LogView {
    pub at: DateTime<Utc>,
    pub record: String,
    pub flow_id: Option<String>,
    pub link_id: Option<i64>,
    #[sqlx(try_from = "String")]
    pub decision: Decision,
    pub read: Option<Value>,
    pub written: Option<Value>,
    pub detail: Option<String>,
    pub error: Option<String>,
}

/// The record's links (either side, any state).
pub async fn links_of(pool: &PgPool, key: &RecordKey) -> Result<Vec<LinkView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, flow_id, source_system || '/' || source_type || '/' || source_id AS source, \
         target_system || '/' || target_type || '/' || target_id AS target, state, end_reason, \
         snapshot, created_at, ended_at FROM links \
         WHERE (source_system = $1 AND source_type = $2 AND source_id = $3) \
            OR (target_system = $1 AND target_type = $2 AND target_id = $3) ORDER BY id",
    )
    .bind(key.system.as_str())
    .bind(&key.entity_type)
    .bind(&key.record_id)
    .fetch_all(pool)
    .await
}

/// Every decision about the record itself or about any of its links, oldest first.
pub async fn history_of(
    pool: &PgPool,
    key: &RecordKey,
    link_ids: &[i64],
) -> Result<Vec<LogView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT at, system || '/' || entity_type || '/' || record_id AS record, flow_id, link_id, \
         decision, read, written, detail, error FROM sync_log \
         WHERE (system = $1 AND entity_type = $2 AND record_id = $3) OR link_id = ANY($4) \
         ORDER BY id",
    )
    .bind(key.system.as_str())
    .bind(&key.entity_type)
    .bind(&key.record_id)
    .bind(link_ids)
    .fetch_all(pool)
    .await
}

/// The text `tether links show` prints.
pub async fn render(pool: &PgPool, key: &RecordKey) -> Result<String, sqlx::Error> {
    let links = links_of(pool, key).await?;
    let ids: Vec<i64> = links.iter().map(|l| l.id).collect();
    let history = history_of(pool, key, &ids).await?;
    let mut out = String::new();
    let _ = writeln!(out, "Record {key}");
    if links.is_empty() {
        let _ = writeln!(out, "  no links");
    }
    for l in &links {
        let _ = writeln!(
            out,
            "  link #{} [{}] {}: {} -> {} (since {}{})",
            l.id,
            l.state,
            l.flow_id,
            l.source,
            l.target,
            l.created_at.to_rfc3339(),
            match (&l.ended_at, &l.end_reason) {
                (Some(at), reason) => format!(
                    ", ended {} ({})",
                    at.to_rfc3339(),
                    reason.as_deref().unwrap_or("no reason recorded")
                ),
                _ => String::new(),
            }
        );
        let _ = writeln!(out, "    snapshot {}", l.snapshot);
    }
    let _ = writeln!(out, "History ({} decisions)", history.len());
    for h in &history {
        let _ = write!(
            out,
            "  {} {} on {}",
            h.at.to_rfc3339(),
            h.decision,
            h.record
        );
        if let Some(flow) = &h.flow_id {
            let _ = write!(out, " [{flow}]");
        }
        if let Some(link) = h.link_id {
            let _ = write!(out, " link #{link}");
        }
        let _ = writeln!(out);
        for (label, v) in [("read", &h.read), ("written", &h.written)] {
            if let Some(v) = v {
                let _ = writeln!(out, "      {label}: {v}");
            }
        }
        if let Some(d) = &h.detail {
            let _ = writeln!(out, "      why: {d}");
        }
        if let Some(e) = &h.error {
            let _ = writeln!(out, "      error: {e}");
        }
    }
    Ok(out)
}
