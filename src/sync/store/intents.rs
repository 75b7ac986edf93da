//! The statements on `link_intents`: a create intent committed before the vendor call
//! (docs/sync-rules.md, "Creation and intents").

use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::registry::Dataflow;

/// A create intent's lease: another job seeing it live waits rather than creating concurrently.
pub(crate) const INTENT_LEASE_SECS: f64 = 120.0;

/// An open create intent of a source record and flow.
pub(crate) struct Intent {
    pub id: i64,
    pub idempotency_key: Uuid,
    pub owner_job_id: Option<i64>,
    /// Its lease has not expired and its owner job is running (claimed, its lease not expired).
    /// An owner waiting to retry is not creating anything: its intent is an earlier attempt's,
    /// which the next job of the record takes over (asking the vendor first by its key).
    /// Waiting on it instead could stall both: the queue runs a record's jobs in id order, so a
    /// younger owner's retry waits behind the older job that waits on its intent (seen in the
    /// chaos suite: two minutes, the intent's lease).
    pub live: bool,
    /// The snapshot of the values the create sent (`None` on intents of older versions).
    pub written: Option<Map<String, Value>>,
}

/// The open create intent of `src_id` in `flow`, if there is one.
pub(crate) async fn pending_intent(
    pool: &PgPool,
    flow: &Dataflow,
    src_id: &str,
) -> Result<Option<Intent>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT i.id, i.idempotency_key, i.owner_job_id, \
         i.lease_until > now() AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = i.owner_job_id \
           AND j.state = 'running' AND j.lease_until > now()) AS live, \
         i.written \
         FROM link_intents i WHERE i.state = 'pending' AND i.source_system = $1 \
         AND i.source_type = $2 AND i.source_id = $3 AND i.flow_id = $4",
    )
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(src_id)
    .bind(&flow.id)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(Intent {
            id: row.try_get("id")?,
            idempotency_key: row.try_get("idempotency_key")?,
            owner_job_id: row.try_get("owner_job_id")?,
            live: row.try_get("live")?,
            written: match row.try_get::<Option<Value>, _>("written")? {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            },
        })
    })
    .transpose()
}

/// Takes over an open intent for `job_id` with a fresh lease, about to create with the values
/// whose snapshot is `written`.
pub(crate) async fn renew_intent(
    pool: &PgPool,
    id: i64,
    job_id: i64,
    written: &Map<String, Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE link_intents SET owner_job_id = $2, \
         lease_until = now() + make_interval(secs => $3), written = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(job_id)
    .bind(INTENT_LEASE_SECS)
    .bind(Value::Object(written.clone()))
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a new intent with `key` to create with the values whose snapshot is `written`; `None`
/// if another job recorded one for the record first.
pub(crate) async fn insert_intent(
    pool: &PgPool,
    flow: &Dataflow,
    (src_id, written): (&str, &Map<String, Value>),
    key: Uuid,
    job_id: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO link_intents (flow_id, source_system, source_type, source_id, \
         idempotency_key, owner_job_id, lease_until, written) \
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(&flow.id)
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(src_id)
    .bind(key)
    .bind(job_id)
    .bind(INTENT_LEASE_SECS)
    .bind(Value::Object(written.clone()))
    .fetch_optional(pool)
    .await
}
