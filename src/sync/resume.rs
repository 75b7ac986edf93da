//! Lifting a stop without a restart: the operator handed a system new credentials
//! (`tether credentials set`, see `crate::credentials`), so this process stops leaving it alone
//! and the jobs it put off because of the stop run now rather than an hour later.

use sqlx::PgPool;

use super::{Fail, SyncEngine};
use crate::connectors::ConnectorError;
use crate::domain::SystemId;

/// The start of every `last_error` a job gets when it is put off because `system` refused its
/// credentials: the refusal itself, and the deferral of a job while the system is stopped.
fn stop_error_prefixes(system: SystemId) -> [String; 2] {
    let refused = ConnectorError::Unauthorized {
        system,
        message: String::new(),
    }
    .to_string();
    let stopped = Fail::Stopped {
        system,
        remaining: std::time::Duration::ZERO,
    }
    .to_string();
    // Both texts begin with what names the system and the cause; the rest varies per job.
    let head = |text: &str| {
        let end = text.find(':').map_or(text.len(), |i| i + 1);
        text[..end].to_owned()
    };
    [head(&refused), head(&stopped)]
}

/// Moves to now the ready jobs put off because `system` refused its credentials; returns how many.
pub(crate) async fn bring_forward(pool: &PgPool, system: SystemId) -> Result<u64, sqlx::Error> {
    let [refused, stopped] = stop_error_prefixes(system);
    let moved = sqlx::query(
        "UPDATE jobs SET run_at = now() WHERE state = 'ready' AND run_at > now() \
         AND (starts_with(last_error, $1) OR starts_with(last_error, $2))",
    )
    .bind(refused)
    .bind(stopped)
    .execute(pool)
    .await?;
    Ok(moved.rows_affected())
}

impl SyncEngine {
    /// `system` has new credentials: forget this process's stop and run the jobs it put off.
    pub async fn resume(&self, system: SystemId) -> Result<u64, sqlx::Error> {
        self.stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&system);
        let moved = bring_forward(&self.pool, system).await?;
        tracing::info!(%system, jobs = moved, "new credentials: {} resumed", system.display_name());
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefixes_name_the_system_and_the_refusal() {
        let [refused, stopped] = stop_error_prefixes(SystemId::ExactOnline);
        assert_eq!(refused, "exactonline refused our credentials:");
        assert_eq!(stopped, "Exact Online is stopped:");
        let other = stop_error_prefixes(SystemId::CrmOffice);
        assert!(!other.contains(&refused) && !other.contains(&stopped));
    }
}
