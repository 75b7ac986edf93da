//! First connection of each system: the moment Tether started watching it.
//!
//! Owns: the `system_connections` table. `tether serve` records every configured system the first
//! time it starts with it ([`record_first`]); a later start keeps the first moment. Poll and
//! reconciliation cursors start there ([`crate::connectors::Connector::start_cursor`]), so the
//! first round reads only what changed since, and never creates counterparts for a system's
//! whole past: that is what a reviewed backfill plan is for.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::SystemId;

/// Records `at` as the first connection of each system that has none yet. Idempotent: the
/// moment a system was first connected never moves.
pub async fn record_first(
    pool: &PgPool,
    systems: impl IntoIterator<Item = SystemId>,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    for system in systems {
        sqlx::query(
            "INSERT INTO system_connections (system, first_connected_at) VALUES ($1, $2) \
             ON CONFLICT (system) DO NOTHING",
        )
        .bind(system.as_str())
        .bind(at)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// When the system was first connected, if it ever was.
pub async fn first_connected_at(
    pool: &PgPool,
    system: SystemId,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT first_connected_at FROM system_connections WHERE system = $1")
        .bind(system.as_str())
        .fetch_optional(pool)
        .await
}
