//! How this process runs: `[database]`, `[http]`, `[workers]`, `[outbound]`, `[registry]`.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use super::{parse_duration, ConfigError, Source};

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`; `None` means: start the embedded PostgreSQL under `data_dir`.
    pub url: Option<SecretString>,
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before answering 503.
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Serve HTTP (webhooks, health). Off: a workers-only replica.
    pub enabled: bool,
    /// Largest webhook body accepted, in bytes (413 above it).
    pub body_limit: usize,
    /// Allowed clock difference for signed timestamps, either way.
    pub timestamp_tolerance: Duration,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Run queue workers in this process. Off: an HTTP-only replica.
    pub enabled: bool,
    /// Jobs run at once by this process.
    pub concurrency: usize,
    /// Of those, backfill jobs at most (fewer than `concurrency`, so live work always finds a
    /// task; docs/queue.md, "Priorities").
    pub backfill_concurrency: usize,
    /// Jobs claimed per query.
    pub batch_size: usize,
    /// How long a claim is valid without renewal; must exceed the outbound timeout plus a margin.
    pub lease: Duration,
    /// Safety-net poll interval when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Delay before each retry; the number of entries is the number of retries before dead-lettering.
    pub retry_schedule: Vec<Duration>,
    /// Times a job may be rescheduled for back-pressure (429, timeout) without using an attempt.
    pub max_deferrals: u32,
    /// Upper bound on an honoured `Retry-After`.
    pub max_retry_after: Duration,
    /// Finished jobs and events are kept this long (also the deduplication window).
    pub retention: Duration,
}

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Timeout of every call to a vendor API.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The operator's overlay file.
    pub overlay: Option<PathBuf>,
}

pub(super) fn database(s: &mut Source) -> Result<DatabaseConfig, ConfigError> {
    Ok(DatabaseConfig {
        url: s.secret("database.url")?,
        max_connections: s
            .integer("database.max_connections", 2, 1000)?
            .unwrap_or(16) as u32,
        acquire_timeout: s
            .duration("database.acquire_timeout")?
            .unwrap_or(Duration::from_secs(3)),
    })
}

pub(super) fn http(s: &mut Source) -> Result<HttpConfig, ConfigError> {
    Ok(HttpConfig {
        enabled: s.bool("http.enabled")?.unwrap_or(true),
        body_limit: s
            .integer("http.body_limit", 1024, 64 * 1024 * 1024)?
            .unwrap_or(1024 * 1024) as usize,
        timestamp_tolerance: s
            .duration("http.timestamp_tolerance")?
            .unwrap_or(Duration::from_secs(300)),
    })
}

pub(super) fn workers(s: &mut Source) -> Result<WorkerConfig, ConfigError> {
    let default_schedule = || {
        ["1s", "5s", "30s", "2m", "10m", "30m"]
            .iter()
            .map(|d| parse_duration(d).expect("valid"))
            .collect()
    };
    Ok(WorkerConfig {
        enabled: s.bool("workers.enabled")?.unwrap_or(true),
        concurrency: s.integer("workers.concurrency", 1, 1024)?.unwrap_or(8) as usize,
        // 0 stands for "half of `concurrency`", resolved in `Config::check`.
        backfill_concurrency: s
            .integer("workers.backfill_concurrency", 1, 1023)?
            .unwrap_or(0) as usize,
        batch_size: s.integer("workers.batch_size", 1, 10_000)?.unwrap_or(100) as usize,
        lease: s
            .duration("workers.lease")?
            .unwrap_or(Duration::from_secs(60)),
        poll_interval: s
            .duration("workers.poll_interval")?
            .unwrap_or(Duration::from_secs(1)),
        retry_schedule: s
            .duration_list("workers.retry_schedule")?
            .unwrap_or_else(default_schedule),
        max_deferrals: s
            .integer("workers.max_deferrals", 0, 100_000)?
            .unwrap_or(100) as u32,
        max_retry_after: s
            .duration("workers.max_retry_after")?
            .unwrap_or(Duration::from_secs(600)),
        retention: s
            .duration("workers.retention")?
            .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
    })
}

pub(super) fn outbound(s: &mut Source) -> Result<OutboundConfig, ConfigError> {
    Ok(OutboundConfig {
        timeout: s
            .duration("outbound.timeout")?
            .unwrap_or(Duration::from_secs(30)),
    })
}

pub(super) fn registry(s: &mut Source) -> Result<RegistryConfig, ConfigError> {
    Ok(RegistryConfig {
        overlay: s.string("registry.overlay")?.map(PathBuf::from),
    })
}
