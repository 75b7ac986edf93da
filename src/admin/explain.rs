//! A record's explanation: its links, every decision about it (what `tether links show` prints),
//! and, when it has no active link, why it is not synced.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::domain::RecordKey;
use crate::sync::{history, Decision};

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RecordExplanation {
    /// `system/EntityType/id`.
    pub record: String,
    pub links: Vec<LinkInfo>,
    /// Every decision about the record or its links, oldest first.
    pub history: Vec<DecisionInfo>,
    /// Jobs of this record waiting or running.
    pub jobs_pending: i64,
    /// Jobs of this record that are dead letters.
    pub jobs_dead: i64,
    /// Set when the record has no active link.
    pub not_synced: Option<NotSynced>,
    /// The same explanation as `tether links show` prints it.
    pub text: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LinkInfo {
    pub id: i64,
    pub flow_id: String,
    pub source: String,
    pub target: String,
    /// `active` or `ended`.
    pub state: String,
    pub end_reason: Option<String>,
    /// The last synced value of every mapped property.
    #[schema(value_type = Object)]
    pub snapshot: Value,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DecisionInfo {
    pub at: DateTime<Utc>,
    pub record: String,
    pub flow_id: Option<String>,
    pub link_id: Option<i64>,
    pub decision: String,
    #[schema(value_type = Option<Object>)]
    pub read: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub written: Option<Value>,
    pub detail: Option<String>,
    pub error: Option<String>,
}

/// Why a record has no active link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotSyncedReason {
    /// Tether has no event and no decision about the record.
    NeverSeen,
    /// An event of it waits in the queue and nothing was decided yet.
    Queued,
    /// It references a record that is not synced yet; it runs again after that one.
    WaitingForReference,
    /// No dataflow runs for it: switched off, the other system not connected, or no dataflow
    /// has its type.
    Filtered,
    /// A dataflow looked at it and chose not to create or link (no merge match, a flow that does
    /// not create back, linked through another flow).
    SkippedByPlan,
    /// Its dataflow is paused by an operator.
    Paused,
    /// Syncing it failed (see the last error; a dead letter can be retried).
    Failed,
    /// The last decision is none of the above (see `detail`).
    Other,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NotSynced {
    pub reason: NotSyncedReason,
    /// One sentence for the operator.
    pub detail: String,
}

pub async fn explain(pool: &PgPool, key: &RecordKey) -> Result<RecordExplanation, sqlx::Error> {
    let links = history::links_of(pool, key).await?;
    let ids: Vec<i64> = links.iter().map(|l| l.id).collect();
    let log = history::history_of(pool, key, &ids).await?;
    let (jobs_pending, jobs_dead): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('ready', 'running')), \
         count(*) FILTER (WHERE state = 'dead') FROM jobs WHERE record_key = $1",
    )
    .bind(key.to_string()) // a job's record_key is its record's `system/type/id`
    .fetch_one(pool)
    .await?;
    let record = key.to_string();
    let not_synced = if links.iter().any(|l| l.state == "active") {
        None
    } else {
        let own_last = log.iter().rev().find(|e| e.record == record);
        Some(why_not_synced(
            own_last.map(|e| (e.decision, e.detail.as_deref(), e.error.as_deref())),
            jobs_pending,
            jobs_dead,
        ))
    };
    Ok(RecordExplanation {
        text: history::render(pool, key).await?,
        record,
        links: links.into_iter().map(link_info).collect(),
        history: log.into_iter().map(decision_info).collect(),
        jobs_pending,
        jobs_dead,
        not_synced,
    })
}

/// Classifies the record's last own decision (decision, detail, error).
pub fn why_not_synced(
    last: Option<(Decision, Option<&str>, Option<&str>)>,
    jobs_pending: i64,
    jobs_dead: i64,
) -> NotSynced {
    use NotSyncedReason::*;
    let said = |d: Option<&str>| d.map(|d| format!(": {d}")).unwrap_or_default();
    if jobs_dead > 0 {
        let error = last.and_then(|(_, _, e)| e);
        return NotSynced {
            reason: Failed,
            detail: format!("{jobs_dead} job(s) of it are dead letters{}", said(error)),
        };
    }
    let Some((decision, detail, error)) = last else {
        return if jobs_pending > 0 {
            NotSynced {
                reason: Queued,
                detail: format!("{jobs_pending} event(s) of it wait in the queue"),
            }
        } else {
            NotSynced {
                reason: NeverSeen,
                detail: "Tether has received no change of this record".to_owned(),
            }
        };
    };
    let reason = match decision {
        Decision::WaitingForReference | Decision::WaitingForCreate => WaitingForReference,
        Decision::Idle | Decision::NotConnected | Decision::NoDataflow => Filtered,
        Decision::NoMatch
        | Decision::NotCreatedBack
        | Decision::LinkedByOtherFlow
        | Decision::TargetClosed => SkippedByPlan,
        Decision::Paused => Paused,
        Decision::Error | Decision::SystemStopped => Failed,
        _ => Other,
    };
    NotSynced {
        reason,
        detail: format!("last decision `{decision}`{}", said(error.or(detail))),
    }
}

fn link_info(l: history::LinkView) -> LinkInfo {
    LinkInfo {
        id: l.id,
        flow_id: l.flow_id,
        source: l.source,
        target: l.target,
        state: l.state,
        end_reason: l.end_reason,
        snapshot: l.snapshot,
        created_at: l.created_at,
        ended_at: l.ended_at,
    }
}

fn decision_info(e: history::LogView) -> DecisionInfo {
    DecisionInfo {
        at: e.at,
        record: e.record,
        flow_id: e.flow_id,
        link_id: e.link_id,
        decision: e.decision.to_string(),
        read: e.read,
        written: e.written,
        detail: e.detail,
        error: e.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_the_last_decision_and_the_queue() {
        assert_eq!(
            why_not_synced(None, 0, 0).reason,
            NotSyncedReason::NeverSeen
        );
        assert_eq!(why_not_synced(None, 2, 0).reason, NotSyncedReason::Queued);
        let waiting = why_not_synced(Some((Decision::WaitingForReference, Some("x"), None)), 1, 0);
        assert_eq!(waiting.reason, NotSyncedReason::WaitingForReference);
        assert_eq!(
            why_not_synced(Some((Decision::Idle, None, None)), 0, 0).reason,
            NotSyncedReason::Filtered
        );
        assert_eq!(
            why_not_synced(Some((Decision::NoMatch, None, None)), 0, 0).reason,
            NotSyncedReason::SkippedByPlan
        );
        assert_eq!(
            why_not_synced(Some((Decision::Paused, None, None)), 0, 0).reason,
            NotSyncedReason::Paused
        );
        let dead = why_not_synced(Some((Decision::Error, None, Some("boom"))), 0, 1);
        assert_eq!(dead.reason, NotSyncedReason::Failed);
        assert!(dead.detail.contains("boom"));
    }
}
