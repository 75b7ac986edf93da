//! Prometheus metrics: the families Tether exports, the hooks the rest of the code calls, and the
//! `GET /metrics` scrape.
//!
//! Counters and the vendor-latency histogram are kept in this process by the `metrics` crate's
//! global recorder (`metrics-exporter-prometheus` renders them). Gauges that describe shared state
//! (queue depth, the oldest due job, poll lag) are read from PostgreSQL at scrape time, at most
//! once per [`GAUGE_REFRESH`], so every replica reports the same cluster-wide figures and a busy
//! scraper cannot load the database. Every label value comes from a closed set (systems, outcome
//! codes, registry flow ids, HTTP status codes): never a record id.
//!
//! The family names are constants here and listed in [`FAMILIES`]; the alert rules in
//! `deploy/prometheus/alerts.yml` are checked against that list by a test (README, "Metrics").

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::domain::SystemId;

pub const WEBHOOKS_RECEIVED: &str = "tether_webhooks_received_total";
pub const QUEUE_JOBS: &str = "tether_queue_jobs";
pub const QUEUE_OLDEST_READY: &str = "tether_queue_oldest_ready_seconds";
pub const JOBS_FINISHED: &str = "tether_jobs_finished_total";
pub const VENDOR_REQUESTS: &str = "tether_vendor_requests_total";
pub const VENDOR_REQUEST_DURATION: &str = "tether_vendor_request_duration_seconds";
pub const VENDOR_THROTTLED: &str = "tether_vendor_throttled_total";
pub const SYNC_DECISIONS: &str = "tether_sync_decisions_total";
pub const POLL_LAG: &str = "tether_poll_lag_seconds";
pub const POLL_CHANGES: &str = "tether_poll_changes_total";
pub const CREDENTIALS_FAILURES: &str = "tether_credentials_failures_total";
pub const FLOWS_PAUSED: &str = "tether_flows_paused";
pub const GUARD_TRIPPED: &str = "tether_guard_tripped";

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family Tether exports, with its type and help text (the `# HELP` line).
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        WEBHOOKS_RECEIVED,
        Kind::Counter,
        "Webhook deliveries by system and outcome (accepted, duplicate, ignored, or the refusal code).",
    ),
    (
        QUEUE_JOBS,
        Kind::Gauge,
        "Jobs in the queue by state (ready, running, retrying, dead), cluster-wide.",
    ),
    (
        QUEUE_OLDEST_READY,
        Kind::Gauge,
        "Age of the oldest job that is due and not yet claimed, cluster-wide (0 when none).",
    ),
    (
        JOBS_FINISHED,
        Kind::Counter,
        "Job runs by system and outcome (done, retried, deferred, dead), in this process.",
    ),
    (
        VENDOR_REQUESTS,
        Kind::Counter,
        "Calls to vendor APIs by system and HTTP status (`error` when no answer came).",
    ),
    (
        VENDOR_REQUEST_DURATION,
        Kind::Histogram,
        "Duration of calls to vendor APIs, by system.",
    ),
    (
        VENDOR_THROTTLED,
        Kind::Counter,
        "Calls a vendor answered with 429, and waits Tether took before a call to stay under a limit.",
    ),
    (
        SYNC_DECISIONS,
        Kind::Counter,
        "Decisions of the sync engine by dataflow and decision.",
    ),
    (
        POLL_LAG,
        Kind::Gauge,
        "Age of the newest change a poll cursor has passed, by system and entity type.",
    ),
    (
        POLL_CHANGES,
        Kind::Counter,
        "Changes that polling (or reconciliation) found and enqueued, by system and entity type.",
    ),
    (
        CREDENTIALS_FAILURES,
        Kind::Counter,
        "Credentials a vendor refused (401, or a rejected refresh token), by system.",
    ),
    (
        FLOWS_PAUSED,
        Kind::Gauge,
        "Dataflows an operator has paused, cluster-wide."),
    (
        GUARD_TRIPPED,
        Kind::Gauge,
        "1 for each dataflow the guard paused after a mass change (held writes await `tether guard release` or `discard`), cluster-wide.",
    ),
];

/// Vendor latency buckets, in seconds: from a fast simulator call to the outbound timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How old the PostgreSQL-derived gauges may be when a scrape comes.
pub const GAUGE_REFRESH: Duration = Duration::from_secs(2);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle). Counters
/// recorded before this are lost, so `service::run` calls it first.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(VENDOR_REQUEST_DURATION.to_owned()),
                DURATION_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (an embedding program's): this handle then renders
        // nothing, which is visible at once on /metrics, rather than failing the service.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        for (name, kind, help) in FAMILIES {
            match kind {
                Kind::Counter => metrics::describe_counter!(*name, *help),
                Kind::Gauge => metrics::describe_gauge!(*name, *help),
                Kind::Histogram => {
                    metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help)
                }
            }
        }
        for system in SystemId::ALL {
            // Zero series exist from the start, so `rate()` and `increase()` in alert rules see
            // the first failure instead of a series that appears from nothing.
            let s = system.as_str();
            counter!(VENDOR_THROTTLED, "system" => s).increment(0);
            counter!(CREDENTIALS_FAILURES, "system" => s).increment(0);
        }
        handle
    })
}

/// What became of one webhook delivery, for [`WEBHOOKS_RECEIVED`]. `outcome` is `accepted`,
/// `duplicate`, `ignored` or the error code of the answer (a fixed set in `intake`).
pub fn webhook_received(system: &str, outcome: &str) {
    // The path segment is the caller's text: only known systems become label values.
    let system = system
        .parse::<SystemId>()
        .map(SystemId::as_str)
        .unwrap_or("unknown");
    counter!(WEBHOOKS_RECEIVED, "system" => system, "outcome" => outcome.to_owned()).increment(1);
}

/// How a job run ended, for [`JOBS_FINISHED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Done,
    /// Failed; another attempt is scheduled.
    Retried,
    /// Back-pressure; runs again without using an attempt.
    Deferred,
    /// Failed for good: a dead letter.
    Dead,
}

impl JobEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            JobEnd::Done => "done",
            JobEnd::Retried => "retried",
            JobEnd::Deferred => "deferred",
            JobEnd::Dead => "dead",
        }
    }
}

pub fn job_finished(system: SystemId, end: JobEnd) {
    counter!(JOBS_FINISHED, "system" => system.as_str(), "outcome" => end.as_str()).increment(1);
}

/// One call to a vendor API: its status (`None` when no answer came) and how long it took.
pub fn vendor_request(system: SystemId, status: Option<u16>, took: Duration) {
    let label = match status {
        Some(code) => code.to_string(),
        None => "error".to_owned(),
    };
    let s = system.as_str();
    counter!(VENDOR_REQUESTS, "system" => s, "status" => label).increment(1);
    histogram!(VENDOR_REQUEST_DURATION, "system" => s).record(took.as_secs_f64());
    if status == Some(429) {
        vendor_throttled(system);
    }
}

/// A 429, or a wait Tether took before a call to stay under the vendor's limit.
pub fn vendor_throttled(system: SystemId) {
    counter!(VENDOR_THROTTLED, "system" => system.as_str()).increment(1);
}

/// One decision of the sync engine (`flow` is a registry flow id, `-` for record-level entries).
pub fn sync_decision(flow: Option<&str>, decision: &str) {
    counter!(
        SYNC_DECISIONS,
        "flow" => flow.unwrap_or("-").to_owned(),
        "decision" => decision.to_owned()
    )
    .increment(1);
}

/// Changes a poll found and enqueued (records new or changed since the cursor).
pub fn poll_changes(system: SystemId, entity_type: &str, n: u64) {
    counter!(POLL_CHANGES, "system" => system.as_str(), "entity_type" => entity_type.to_owned())
        .increment(n);
}

/// A vendor refused credentials. Also remembered with the time, for the admin API's
/// `credentials_ok` (as this process saw it).
pub fn credentials_failure(system: SystemId) {
    counter!(CREDENTIALS_FAILURES, "system" => system.as_str()).increment(1);
    LAST_CREDENTIALS_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(system, chrono::Utc::now());
}

static LAST_CREDENTIALS_FAILURE: Mutex<BTreeMap<SystemId, chrono::DateTime<chrono::Utc>>> =
    Mutex::new(BTreeMap::new());

/// When this process last saw `system` refuse credentials.
pub fn last_credentials_failure(system: SystemId) -> Option<chrono::DateTime<chrono::Utc>> {
    LAST_CREDENTIALS_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&system)
        .copied()
}

/// The scrape: refreshes the PostgreSQL-derived gauges if they are older than [`GAUGE_REFRESH`],
/// then renders every family.
pub async fn scrape(State(pool): State<PgPool>) -> Response {
    let handle = install();
    if let Err(e) = refresh_gauges(&pool).await {
        // The counters are still worth serving; the stale gauges say so in the log.
        tracing::warn!(error = %e, "metrics: queue gauges could not be read from PostgreSQL");
    }
    handle.run_upkeep();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

static LAST_REFRESH: Mutex<Option<Instant>> = Mutex::new(None);

/// Flows this process reported as tripped, so a released one goes back to 0.
static GUARD_REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

async fn refresh_guard_gauge(pool: &PgPool) -> Result<(), sqlx::Error> {
    let tripped: Vec<String> = crate::guard::held::tripped_flows(pool)
        .await?
        .into_iter()
        .map(|(flow, _)| flow)
        .collect();
    let mut reported = GUARD_REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    for flow in reported.iter().filter(|f| !tripped.contains(f)) {
        gauge!(GUARD_TRIPPED, "flow" => flow.clone()).set(0.0);
    }
    for flow in &tripped {
        gauge!(GUARD_TRIPPED, "flow" => flow.clone()).set(1.0);
    }
    *reported = tripped;
    Ok(())
}

async fn refresh_gauges(pool: &PgPool) -> Result<(), sqlx::Error> {
    {
        let mut last = LAST_REFRESH.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < GAUGE_REFRESH) {
            return Ok(());
        }
        *last = Some(Instant::now());
    }
    let queue = crate::ops::gauges::read(pool).await?;
    for (state, n) in queue.by_state() {
        gauge!(QUEUE_JOBS, "state" => state).set(n as f64);
    }
    gauge!(QUEUE_OLDEST_READY).set(queue.oldest_ready_seconds);
    gauge!(FLOWS_PAUSED).set(queue.flows_paused as f64);
    refresh_guard_gauge(pool).await?;
    for lag in crate::ops::gauges::poll_lags(pool).await? {
        gauge!(POLL_LAG, "system" => lag.system, "entity_type" => lag.entity_type).set(lag.seconds);
    }
    Ok(())
}
