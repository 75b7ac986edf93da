//! One chaos run, start to finish: PostgreSQL, the replicas behind nginx, the simulators with
//! faults, the workload with the fault schedule beside it, then the checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::ExposeSecret as _;

use super::checks::{self, Finding, Property};
use super::cluster::{free_port, Nginx, Replicas};
use super::faults::{self, FaultLog, Schedule};
use super::model::Model;
use super::sims::{chaos_faults, Sims, OVERLAY};
use super::workload::{Plan, Workload};
use crate::db::embedded::EmbeddedPostgres;

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    pub replicas: usize,
    pub plan: Plan,
    /// SIGKILLs, the PostgreSQL restart and the rolling restart (off: a baseline).
    pub faults: bool,
    pub kill_every: Duration,
    /// How long the systems may take to converge after the workload and the last fault.
    pub converge_within: Duration,
    /// How long write counters must stand still once converged.
    pub quiet: Duration,
    /// The `tether` binary (default: next to this one).
    pub tether: Option<PathBuf>,
    /// Keep the working directory (logs, configuration) even when every property held.
    pub keep: bool,
}

/// The outcome: every finding, and whether all held.
pub struct Outcome {
    pub findings: Vec<Finding>,
    pub summary: String,
}

impl Outcome {
    pub fn held(&self) -> bool {
        self.findings.iter().all(|f| f.held)
    }
}

/// Everything a run starts, stopped in reverse order by [`Cluster::stop`].
struct Cluster {
    postgres: Arc<EmbeddedPostgres>,
    /// Handed to the fault schedule while it runs.
    replicas: Option<Replicas>,
    nginx: Nginx,
    sims: Sims,
    pool: sqlx::PgPool,
}

/// Runs the suite in `work` (created and, unless kept or something failed, removed).
pub async fn run(options: Options, work: &Path) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(work)?;
    let mut cluster = start(&options, work).await?;
    println!(
        "[setup] {} replicas behind nginx at {}",
        options.replicas,
        cluster.nginx.url()
    );
    let outcome = exercise(&options, &mut cluster).await;
    if let Some(replicas) = cluster.replicas.as_mut() {
        replicas.stop_all(Duration::from_secs(15)).await;
    }
    cluster.nginx.stop().await;
    cluster.pool.close().await;
    let _ = cluster.postgres.stop().await;
    outcome
}

async fn start(options: &Options, work: &Path) -> anyhow::Result<Cluster> {
    let postgres = EmbeddedPostgres::start(&work.join("pg"))
        .await
        .context("cannot start PostgreSQL")?;
    let url = postgres.url().expose_secret().to_owned();
    let bin = match &options.tether {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    let config = work.join("tether.toml");
    let env = vec![
        ("TETHER_CONFIG".to_owned(), config.display().to_string()),
        ("DATABASE_URL".to_owned(), url.clone()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    let mut replicas = Replicas::new(bin, env, work, options.replicas)?;
    let nginx = Nginx::start(&work.join("nginx"), free_port()?, replicas.ports()).await?;
    let sims = Sims::start(&nginx.url(), 4).await?;
    sims.set_faults(&chaos_faults());
    let overlay = work.join("overlay.toml");
    std::fs::write(&overlay, OVERLAY)?;
    std::fs::write(&config, sims.config_toml(&work.join("data"), &overlay))?;
    for i in 0..replicas.len() {
        replicas.spawn(i)?;
    }
    for i in 0..replicas.len() {
        replicas.wait_ready(i, Duration::from_secs(120)).await?;
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    Ok(Cluster {
        postgres: Arc::new(postgres),
        replicas: Some(replicas),
        nginx,
        sims,
        pool,
    })
}

/// The schedule for a workload of `length`: kills throughout, PostgreSQL at 40%, the rolling
/// restart at 65%.
fn schedule(options: &Options, length: Duration) -> Schedule {
    let on = |share: f64| options.faults.then(|| length.mul_f64(share));
    Schedule {
        kill_every: options.faults.then_some(options.kill_every),
        postgres_restart_at: on(0.4),
        rolling_restart_at: on(0.65),
        until: length,
    }
}

async fn exercise(options: &Options, cluster: &mut Cluster) -> anyhow::Result<Outcome> {
    let length = Duration::from_secs_f64(options.plan.changes as f64 / options.plan.rate);
    let replicas = cluster
        .replicas
        .take()
        .context("the replicas are running")?;
    let fault_task = tokio::spawn(faults::run(
        replicas,
        cluster.postgres.clone(),
        schedule(options, length),
    ));
    let started = Instant::now();
    let mut workload = Workload::new(&cluster.sims, options.plan.clone());
    let total = options.plan.changes;
    workload
        .run(|n| {
            if n % (total / 10).max(1) == 0 {
                println!(
                    "[workload] {n}/{total} changes at {:.0?}",
                    started.elapsed()
                );
            }
        })
        .await;
    let workload_time = started.elapsed();
    let (replicas, fault_log) = fault_task.await??;
    cluster.replicas = Some(replicas);
    println!(
        "[faults] {} SIGKILLs, {} PostgreSQL restart, {} rolling restart",
        fault_log.kills, fault_log.postgres_restarts, fault_log.rolling_restarts
    );
    let mut findings = Vec::new();
    let converged_at = converge(options, cluster, &workload, &mut findings).await;
    quiet(options, cluster, &mut findings).await;
    findings.push(checks::webhooks(&cluster.sims));
    findings.push(checks::limits(&cluster.sims));
    findings.push(checks::dead_letters(&cluster.pool).await);
    let timeline = Timeline {
        started,
        workload_time,
        converged_at,
    };
    findings.push(converge_time(options, &fault_log, &timeline));
    findings.push(throughput(options, workload.model.changes, &timeline));
    let summary = summary(&findings, &workload.model, &fault_log);
    Ok(Outcome { findings, summary })
}

/// Waits until every system holds what the workload expects and the queue is empty; records the
/// converged finding either way and returns when it converged.
async fn converge(
    options: &Options,
    cluster: &Cluster,
    workload: &Workload<'_>,
    findings: &mut Vec<Finding>,
) -> Option<Instant> {
    let deadline = Instant::now() + options.converge_within;
    let mut last_print = Instant::now();
    loop {
        let state = checks::convergence(&workload.model, &cluster.sims);
        let pending = pending_jobs(&cluster.pool).await;
        if state.ok() && pending == Some(0) {
            findings.push(Finding::new(Property::Converged, true, state.summary()));
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            let detail = format!(
                "{}; {pending:?} jobs pending{}",
                state.summary(),
                oldest_pending(&cluster.pool).await
            );
            findings.push(Finding::new(Property::Converged, false, detail));
            return None;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            println!(
                "[converge] {} lost, {} duplicate, {} wrong, {} extra, {pending:?} jobs pending",
                state.lost,
                state.duplicate,
                state.wrong_value + state.wrong_reference,
                state.extra
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Jobs not finished yet (ready or running), or `None` if the queue cannot be read.
async fn pending_jobs(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state IN ('ready', 'running')")
        .fetch_one(pool)
        .await
        .ok()
}

/// The oldest unfinished jobs, described, for a run that did not converge.
async fn oldest_pending(pool: &sqlx::PgPool) -> String {
    let rows: Vec<(i64, String, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, record_key, state, attempts, last_error FROM jobs \
         WHERE state IN ('ready', 'running') ORDER BY id LIMIT 5",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.iter()
        .map(|(id, key, state, attempts, error)| {
            let error = error.as_deref().unwrap_or("-");
            format!("\n       - job {id} {key} {state} after {attempts} attempts: {error}")
        })
        .collect()
}

/// No loops: the write counters stand still for `quiet` after convergence, and the systems are
/// still converged at its end.
async fn quiet(options: &Options, cluster: &Cluster, findings: &mut Vec<Finding>) {
    let before = checks::writes(&cluster.sims);
    let jobs_before = newest_job(&cluster.pool).await;
    tokio::time::sleep(options.quiet).await;
    let after = checks::writes(&cluster.sims);
    let jobs_after = newest_job(&cluster.pool).await;
    // Writes are what a loop makes; a job may still come late without one (a webhook whose
    // earlier deliveries failed, a polled echo), which is not a loop.
    let held = before == after;
    findings.push(Finding::new(
        Property::NoLoops,
        held,
        format!(
            "vendor writes {before} → {after} over {:.0?} after convergence (newest job id {jobs_before:?} → {jobs_after:?})",
            options.quiet
        ),
    ));
}

/// The newest job's id: any job made since (an event, a retry of a poll) moves it; pruning
/// finished rows does not.
async fn newest_job(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM jobs")
        .fetch_one(pool)
        .await
        .ok()
}

fn converge_time(options: &Options, log: &FaultLog, timeline: &Timeline) -> Finding {
    let workload_end = timeline.started + timeline.workload_time;
    let from = log
        .last_fault_end
        .map_or(workload_end, |f| f.max(workload_end));
    match timeline.converged_at {
        Some(at) => Finding::new(
            Property::ConvergeTime,
            true,
            format!(
                "{:.1} s after the last fault and the workload's end (limit {:.0?})",
                at.saturating_duration_since(from).as_secs_f64(),
                options.converge_within
            ),
        ),
        None => Finding::new(
            Property::ConvergeTime,
            false,
            format!("not converged within {:.0?}", options.converge_within),
        ),
    }
}

/// When the run's phases ended.
struct Timeline {
    started: Instant,
    workload_time: Duration,
    converged_at: Option<Instant>,
}

/// Changes a second made (the workload's pace) and settled (made until converged): a figure,
/// never a violation.
fn throughput(options: &Options, changes: u64, timeline: &Timeline) -> Finding {
    let end = timeline.converged_at.unwrap_or_else(Instant::now);
    let settled = changes as f64 / end.duration_since(timeline.started).as_secs_f64();
    let made = timeline.workload_time.as_secs_f64();
    Finding::new(
        Property::Throughput,
        true,
        format!(
            "{changes} changes in {made:.1} s: {:.1}/s made, {settled:.1}/s settled (made until converged), {} replicas",
            changes as f64 / made,
            options.replicas
        ),
    )
}

fn summary(findings: &[Finding], model: &Model, log: &FaultLog) -> String {
    let held = findings.iter().filter(|f| f.held).count();
    let renames = |side| model.renames.get(side).copied().unwrap_or(0);
    format!(
        "summary: {} {held}/{} properties held; {} organizations and {} people made, renamed {} times at the source, {} in Zendesk, {} in the ERP; {} SIGKILLs, {} PostgreSQL restart, {} rolling restart ({} unclean exits, {} ended while starting)",
        if held == findings.len() { "PASS" } else { "FAIL" },
        findings.len(),
        model.orgs.len(),
        model.users.len(),
        renames("source"),
        renames("zendesk"),
        renames("erp"),
        log.kills,
        log.postgres_restarts,
        log.rolling_restarts,
        log.unclean_exits,
        log.ended_while_starting,
    )
}
