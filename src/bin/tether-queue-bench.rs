//! Queue benchmark (figures, not a test): drains 100,000 no-op jobs with 1, 2 and 4 worker tasks
//! in 1 and 2 processes, keeps going until over 1,000,000 jobs have passed (to show whether bloat
//! slows it down), measures the idle commit-to-claim latency, and prints pgbench's single-row
//! insert rate on the same cluster in the same run as the yardstick. After each run it prints the
//! size of the `jobs` relation (with its indexes, and the table alone) and how often it was
//! vacuumed and analyzed (by the workers' housekeeping and by autovacuum), to show whether the hot
//! table stays small under sustained load.
//!
//! Uses `DATABASE_URL` if set (the database is used as is: run it on a scratch database), else a
//! private cluster in the temp directory. Run: `cargo run --release --bin tether-queue-bench`.
//! `BENCH_JOBS` (100000), `BENCH_TOTAL` (1000000) and `BENCH_BATCH` (200) change the sizes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tether::config::WorkerConfig;
use tether::queue::{ClaimedJob, JobHandler, JobOutcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct NoOp(Option<mpsc::UnboundedSender<Instant>>);

#[async_trait::async_trait]
impl JobHandler for NoOp {
    async fn handle(&self, _job: &ClaimedJob) -> JobOutcome {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Instant::now());
        }
        JobOutcome::Done
    }
}

fn worker_config(tasks: usize) -> WorkerConfig {
    WorkerConfig {
        enabled: true,
        concurrency: tasks,
        backfill_concurrency: 1,
        batch_size: batch(),
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_millis(200),
        retry_schedule: vec![Duration::from_secs(1)],
        max_deferrals: 10,
        max_retry_after: Duration::from_secs(60),
        // Finished rows go at once (the pruner runs every second), so the table stays small.
        retention: Duration::ZERO,
    }
}

/// Jobs claimed per query (`BENCH_BATCH`, default 200).
fn batch() -> usize {
    env_usize("BENCH_BATCH", 200).unwrap_or(200)
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}: {v:?}")),
        Err(_) => Ok(default),
    }
}

/// Stores `n` events with their jobs, each for its own record, 10,000 per transaction.
async fn fill(pool: &PgPool, round: usize, n: usize) -> anyhow::Result<()> {
    let mut start = 0;
    while start < n {
        let count = (n - start).min(10_000);
        sqlx::query(
            "WITH e AS (
                 INSERT INTO events (system, entity_type, record_id, action, delivery_id)
                 SELECT 'customerp', 'Customer', $1 || '-' || g, 'updated', $1 || '-' || g
                 FROM generate_series($2::bigint, $3::bigint) g
                 RETURNING id, system, entity_type, record_id)
             INSERT INTO jobs (event_id, record_key)
             SELECT id, system || '/' || entity_type || '/' || record_id FROM e ORDER BY id",
        )
        .bind(format!("r{round}"))
        .bind(start as i64)
        .bind((start + count - 1) as i64)
        .execute(pool)
        .await?;
        start += count;
    }
    Ok(())
}

/// Whether any job is unfinished. An EXISTS, not a count: polled every 10 ms during the drain, a
/// count of 100,000 rows would itself take a good share of the machine.
async fn unfinished(pool: &PgPool) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('ready', 'running'))",
        )
        .fetch_one(pool)
        .await?,
    )
}

/// Drains the queue with `procs` processes of `tasks` worker tasks; returns jobs per second.
async fn drain(
    pool: &PgPool,
    url: &SecretString,
    procs: usize,
    tasks: usize,
    jobs: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let mut children = Vec::new();
    let mut inproc = None;
    if procs == 1 {
        let workers_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(tasks as u32 + 6)
            .connect(url.expose_secret())
            .await?;
        inproc = Some(tether::queue::start_workers(
            workers_pool,
            worker_config(tasks),
            Arc::new(NoOp(None)),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
    } else {
        let probe: PathBuf = std::env::current_exe()?
            .parent()
            .context("no binary directory")?
            .join("tether-queue-probe");
        for _ in 0..procs {
            children.push(
                tokio::process::Command::new(&probe)
                    .env("DATABASE_URL", url.expose_secret())
                    .env("PROBE_NOOP", "1")
                    .env("PROBE_CONCURRENCY", tasks.to_string())
                    .env("PROBE_BATCH", batch().to_string())
                    .env("PROBE_RETENTION_MS", "0")
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("cannot start {}", probe.display()))?,
            );
        }
    }
    while unfinished(pool).await? {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    if let Some(w) = inproc {
        w.await?;
    }
    for mut c in children {
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        c.wait().await?;
    }
    Ok(rate)
}

/// The `jobs` relation after a run: rows left, bytes with indexes and TOAST, bytes of the table
/// alone, and how many VACUUMs and ANALYZEs ran on it so far by command (the workers'
/// housekeeping) and by autovacuum.
struct TableFigures {
    rows: i64,
    total_bytes: i64,
    table_bytes: i64,
    vacuums: i64,
    autovacuums: i64,
    analyzes: i64,
    autoanalyzes: i64,
}

async fn table_figures(pool: &PgPool) -> anyhow::Result<TableFigures> {
    let (rows, total_bytes, table_bytes, vacuums, autovacuums, analyzes, autoanalyzes) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM jobs), pg_total_relation_size('jobs'),
                    pg_relation_size('jobs'), vacuum_count, autovacuum_count, analyze_count,
                    autoanalyze_count
             FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
        )
        .fetch_one(pool)
        .await?;
    Ok(TableFigures {
        rows,
        total_bytes,
        table_bytes,
        vacuums,
        autovacuums,
        analyzes,
        autoanalyzes,
    })
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// pgbench, 32 clients, one single-row INSERT per transaction, 10 s.
async fn pgbench(url: &SecretString, dir: &std::path::Path) -> anyhow::Result<String> {
    let pool = PgPool::connect(url.expose_secret()).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_insert (id BIGSERIAL PRIMARY KEY, v INT)")
        .execute(&pool)
        .await?;
    pool.close().await;
    let script = dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO bench_insert (v) VALUES (1);\n")?;
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "32", "-j", "2", "-T", "10", "-f"])
        .arg(&script)
        .arg(url.expose_secret())
        .output()
        .await
        .context("pgbench could not run (is /usr/bin/pgbench installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.starts_with("tps ="))
        .map(|l| l.to_owned())
        .unwrap_or_else(|| format!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr))))
}

/// Idle commit-to-claim latency: one job at a time into idle workers, `n` samples.
async fn idle_latency(
    pool: &PgPool,
    url: &SecretString,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let mut cfg = worker_config(1);
    cfg.poll_interval = Duration::from_secs(1);
    let workers_pool = PgPool::connect(url.expose_secret()).await?;
    let workers = tether::queue::start_workers(
        workers_pool,
        cfg,
        Arc::new(NoOp(Some(tx))),
        shutdown.clone(),
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        // Let the workers go idle (waiting on NOTIFY) first.
        tokio::time::sleep(Duration::from_millis(30)).await;
        fill_one(pool, i).await?;
        let committed = Instant::now();
        let ran = rx.recv().await.context("workers stopped")?;
        samples.push(ran.saturating_duration_since(committed));
    }
    shutdown.cancel();
    workers.await?;
    samples.sort();
    Ok(samples)
}

async fn fill_one(pool: &PgPool, i: usize) -> anyhow::Result<()> {
    sqlx::query(
        "WITH e AS (INSERT INTO events (system, entity_type, record_id, action, delivery_id)
                    VALUES ('customerp', 'Customer', $1, 'updated', $1) RETURNING id)
         INSERT INTO jobs (event_id, record_key) SELECT id, 'customerp/Customer/' || $1 FROM e",
    )
    .bind(format!("lat-{i}"))
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = env_usize("BENCH_JOBS", 100_000)?;
    let total = env_usize("BENCH_TOTAL", 1_000_000)?;
    let dir = std::env::temp_dir().join(format!("tether-queue-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let (url, pg) = match std::env::var("DATABASE_URL") {
        Ok(url) => (SecretString::from(url), None),
        Err(_) => {
            let pg = tether::db::embedded::EmbeddedPostgres::start(&dir.join("pg")).await?;
            (pg.url(), Some(pg))
        }
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url.expose_secret())
        .await?;
    tether::db::migrate(&pool).await?;

    println!(
        "pgbench single-row INSERT, 32 clients: {}",
        pgbench(&url, &dir).await?
    );
    let samples = idle_latency(&pool, &url, 100).await?;
    println!(
        "idle commit-to-claim latency over {} jobs: p50 {:.2} ms, p90 {:.2} ms",
        samples.len(),
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[samples.len() * 9 / 10].as_secs_f64() * 1e3
    );

    println!("{jobs} no-op jobs per run (batch {}):", batch());
    println!(
        "processes  tasks/process  jobs/s  | rows after  total MiB  table MiB  |  passed  \
         VACUUM cmd/auto  ANALYZE cmd/auto"
    );
    let mut passed = 0usize;
    let mut round = 0usize;
    let plan = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)];
    let mut runs: Vec<(usize, usize)> = plan.to_vec();
    while passed + runs.len().saturating_sub(round) * jobs < total {
        runs.push((1, 4));
    }
    for (procs, tasks) in runs {
        fill(&pool, round, jobs).await?;
        let rate = drain(&pool, &url, procs, tasks, jobs).await?;
        passed += jobs;
        round += 1;
        let t = table_figures(&pool).await?;
        println!(
            "{procs:>9}  {tasks:>13}  {rate:>6.0}  | {:>10}  {:>9.1}  {:>9.1}  | {passed:>7}  \
             {:>8}/{:<6}  {:>9}/{}",
            t.rows,
            mib(t.total_bytes),
            mib(t.table_bytes),
            t.vacuums,
            t.autovacuums,
            t.analyzes,
            t.autoanalyzes,
        );
    }
    pool.close().await;
    if let Some(pg) = pg {
        pg.stop().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
