//! A worker process for the queue's reliability tests and benchmark: runs the real workers against
//! `DATABASE_URL` with a handler that records each run as `(job_id, record_key, seq)` in the
//! `probe_log` table the test created (`seq` is the number after the last `:` of the event's
//! delivery id), after sleeping `PROBE_SLEEP_MS`. With `PROBE_NOOP=1` the handler does nothing.
//! Runs until SIGTERM/SIGINT.
//!
//! Settings (environment): `PROBE_CONCURRENCY` (4), `PROBE_BATCH` (20), `PROBE_LEASE_MS` (3000),
//! `PROBE_POLL_MS` (200), `PROBE_SLEEP_MS` (0), `PROBE_NOOP` (0), `PROBE_RETENTION_MS` (3600000).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tether::config::WorkerConfig;
use tether::queue::{ClaimedJob, JobHandler, JobOutcome};
use tokio_util::sync::CancellationToken;

struct Recorder {
    pool: PgPool,
    sleep: Duration,
    noop: bool,
}

#[async_trait::async_trait]
impl JobHandler for Recorder {
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
        if self.noop {
            return JobOutcome::Done;
        }
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        let seq: i64 = match job
            .event
            .delivery_id
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok())
        {
            Some(seq) => seq,
            None => {
                return JobOutcome::Dead {
                    error: format!("delivery id {:?} has no sequence", job.event.delivery_id),
                }
            }
        };
        let recorded = sqlx::query(
            "INSERT INTO probe_log (job_id, record_key, seq, pid) VALUES ($1, $2, $3, $4)",
        )
        .bind(job.job_id)
        .bind(job.event.record.to_string())
        .bind(seq)
        .bind(std::process::id() as i32)
        .execute(&self.pool)
        .await;
        match recorded {
            Ok(_) => JobOutcome::Done,
            Err(e) => JobOutcome::Later {
                after: Some(Duration::from_millis(200)),
                reason: format!("cannot record: {e}"),
            },
        }
    }
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name} must be a whole number, not {v:?}")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROBE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL must be set")?;
    let concurrency = env_u64("PROBE_CONCURRENCY", 4)? as usize;
    let cfg = WorkerConfig {
        enabled: true,
        concurrency,
        backfill_concurrency: 1,
        batch_size: env_u64("PROBE_BATCH", 20)? as usize,
        lease: Duration::from_millis(env_u64("PROBE_LEASE_MS", 3000)?),
        poll_interval: Duration::from_millis(env_u64("PROBE_POLL_MS", 200)?),
        retry_schedule: vec![Duration::from_millis(100); 10],
        max_deferrals: 1000,
        max_retry_after: Duration::from_secs(5),
        retention: Duration::from_millis(env_u64("PROBE_RETENTION_MS", 3_600_000)?),
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(concurrency as u32 + 4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&url)?;
    let handler = Arc::new(Recorder {
        pool: pool.clone(),
        sleep: Duration::from_millis(env_u64("PROBE_SLEEP_MS", 0)?),
        noop: env_u64("PROBE_NOOP", 0)? == 1,
    });
    let shutdown = CancellationToken::new();
    tether::shutdown::cancel_on_signal(shutdown.clone());
    let workers =
        tether::queue::start_workers(pool.clone(), cfg, handler, shutdown, Duration::from_secs(5));
    workers.await?;
    pool.close().await;
    Ok(())
}
