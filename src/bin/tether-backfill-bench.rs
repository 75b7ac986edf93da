//! Backfill benchmark: Zendesk organizations against a Custom ERP that already holds matching
//! customers. Plans the backfill of `zendesk.Organizations->customerp.Customer`, runs it through
//! the service's workers (in this process, against a private PostgreSQL and the simulators), and
//! prints plan and run time, records per second, vendor calls per record and 429s.
//!
//! Two scenarios: unthrottled simulators (Tether's Zendesk limit at its maximum), then a smaller
//! one with the Zendesk simulator counting a plan limit per minute and Tether configured to the
//! same limit, which compares the run time with the plan's estimate.
//!
//! Each scenario runs on a database of its own in a private PostgreSQL cluster started by the
//! benchmark with pg_stat_statements loaded, so the report can say where PostgreSQL's time went
//! (the statements that took most of it during the run) and how the CPU was shared between this
//! process (Tether and the simulators) and PostgreSQL.
//!
//! Figures, not a pass/fail test: see the README's "Benchmarks" section.
//! Run: `cargo run --release --bin tether-backfill-bench`

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use secrecy::ExposeSecret;
use tether::backfill::{plan, store, Summary};
use tether::config::{Config, Source};
use tether::db::embedded::EmbeddedPostgres;
use tether::measure;
use tether::sandbox::Simulators;
use tether::simulators::kit::{Faults, SimControl};

const FLOW: &str = "zendesk.Organizations->customerp.Customer";

/// The shipped flow maps nothing and matches on nothing: carry and match the name.
const OVERLAY: &str = r#"# Written by tether-backfill-bench.
[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"
[[dataflow.merge]]
source = "name"
target = "name"

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;

#[derive(Debug, Parser)]
#[command(
    name = "tether-backfill-bench",
    about = "Backfill plan and run figures."
)]
struct Args {
    /// Zendesk organizations in the unthrottled scenario.
    #[arg(long, default_value_t = 10_000)]
    orgs: usize,
    /// Of those, how many the Custom ERP already holds (names differ in case and spacing).
    #[arg(long, default_value_t = 3_000)]
    matching: usize,
    /// Organizations in the throttled scenario (0: skip it). A page of 50 is one Zendesk read,
    /// so it takes thousands of records for the limit to set the run's time rather than round
    /// it to a second.
    #[arg(long, default_value_t = 3_000)]
    throttled_orgs: usize,
    /// The Zendesk plan limit per minute in the throttled scenario (200: Zendesk's smallest).
    #[arg(long, default_value_t = 200)]
    zendesk_limit: u32,
    /// `workers.concurrency` (backfill runs on half of it).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Statements printed per scenario (by PostgreSQL execution time during the run).
    #[arg(long, default_value_t = 12)]
    top: usize,
}

/// One run's shape.
struct Scenario {
    orgs: usize,
    matching: usize,
    /// Zendesk's plan limit per minute, at the simulator and in Tether's configuration.
    zendesk_limit: Option<u32>,
    concurrency: usize,
}

/// Vendor calls and 429s of one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    zendesk: u64,
    customerp: u64,
    throttled: u64,
}

struct Figures {
    summary: Summary,
    plan: Duration,
    run: Duration,
    plan_calls: Calls,
    run_calls: Calls,
    /// The run's Custom ERP requests by endpoint.
    erp_endpoints: BTreeMap<String, u64>,
    /// The run's Zendesk requests by endpoint.
    zendesk_endpoints: BTreeMap<String, u64>,
    cpu: Cpu,
    /// The run's statements: text, calls, total execution time (ms), by time.
    statements: Vec<(String, i64, f64)>,
    /// The scans reading most rows: what and of which table or index, scans, rows read,
    /// whether the table was analyzed (true for indexes).
    scans: Vec<(String, i64, i64, bool)>,
    quiet: Quiet,
}

/// When the run's consequences were carried out too: the Custom ERP's webhooks of its writes
/// delivered and handled (their echoes), no job left. Timed and counted from the run's start.
struct Quiet {
    after: Duration,
    erp_endpoints: BTreeMap<String, u64>,
    cpu: Cpu,
}

/// CPU ticks spent during the run.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    /// This process: Tether's workers and the simulators.
    process: u64,
    postgres: u64,
    machine: u64,
}

impl Cpu {
    fn now(postmaster: u32) -> Cpu {
        Cpu {
            process: measure::cpu_ticks(std::process::id()).unwrap_or(0),
            postgres: measure::tree_cpu_ticks(postmaster).unwrap_or(0),
            machine: measure::machine_busy_ticks().unwrap_or(0),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            process: self.process.saturating_sub(before.process),
            postgres: self.postgres.saturating_sub(before.postgres),
            machine: self.machine.saturating_sub(before.machine),
        }
    }
}

/// The benchmark's own PostgreSQL: one cluster, a fresh database per scenario.
struct Cluster {
    pg: EmbeddedPostgres,
    postmaster: u32,
    dir: std::path::PathBuf,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        // A directory the unprivileged postgres user can reach; removed by `stop`, not on drop.
        let temp = tether::testing::shared_tempdir();
        let dir = temp.path().to_owned();
        std::mem::forget(temp);
        let pg = EmbeddedPostgres::start(&dir.join("pg"))
            .await
            .context("cannot start PostgreSQL")?;
        pg.preload_libraries(&["pg_stat_statements"], &[])
            .await
            .context("cannot load pg_stat_statements")?;
        let postmaster = pg.postmaster_pid().context("no postmaster pid")? as u32;
        Ok(Cluster {
            pg,
            postmaster,
            dir,
        })
    }

    /// A new, migrated database with pg_stat_statements.
    async fn database(&self, name: &str) -> anyhow::Result<sqlx::PgPool> {
        let admin = sqlx::PgPool::connect(self.pg.url().expose_secret()).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(self.pg.url_for(name).expose_secret())
            .await?;
        tether::db::migrate(&pool).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await?;
        Ok(pool)
    }

    async fn stop(self) {
        let _ = self.pg.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        print_machine();
        let cluster = Cluster::start().await?;
        let result = scenarios(&args, &cluster).await;
        cluster.stop().await;
        result
    })
}

async fn scenarios(args: &Args, cluster: &Cluster) -> anyhow::Result<()> {
    {
        let open = Scenario {
            orgs: args.orgs,
            matching: args.matching,
            zendesk_limit: None,
            concurrency: args.concurrency,
        };
        let figures = run_scenario(cluster, "bench_open", &open).await?;
        report("unthrottled simulators", &figures, args.top);
        if args.throttled_orgs > 0 {
            let throttled = Scenario {
                orgs: args.throttled_orgs,
                matching: args.throttled_orgs * 3 / 10,
                zendesk_limit: Some(args.zendesk_limit),
                concurrency: args.concurrency,
            };
            let figures = run_scenario(cluster, "bench_throttled", &throttled).await?;
            report(
                &format!("Zendesk limited to {} a minute", args.zendesk_limit),
                &figures,
                args.top,
            );
        }
        anyhow::Ok(())
    }
}

fn trace(what: &str) {
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("{what}");
    }
}

fn print_machine() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} cores, load average {} (guard off: the benchmark measures the run, not the guard)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}

/// `tether serve` in this process (HTTP on `listener`, workers, pollers) until the token is
/// cancelled.
fn start_service(
    config: &Arc<Config>,
    pool: &sqlx::PgPool,
    registry: &Arc<tether::registry::Registry>,
    listener: tokio::net::TcpListener,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    CancellationToken,
) {
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(tether::service::run(
        config.clone(),
        pool.clone(),
        registry.clone(),
        Some(listener),
        shutdown.clone(),
    ));
    (service, shutdown)
}

async fn run_scenario(cluster: &Cluster, name: &str, s: &Scenario) -> anyhow::Result<Figures> {
    let pool = cluster.database(name).await?;
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await?;
    let addr = listener.local_addr()?;
    let sims = Simulators::start(addr.ip(), &format!("http://{addr}")).await?;
    let config = Arc::new(configure(&sims, addr, s)?);
    let (registry, _) = tether::registry::load(config.registry.overlay.as_deref())?;
    tether::sandbox::install_webhooks(&config, &pool, &registry).await?;
    tether::service::record_first_connections(&config, &pool).await?;
    trace("webhooks installed; seeding");
    seed(&sims, s);
    if let Some(limit) = s.zendesk_limit {
        sims.zendesk.control().set_faults(Faults {
            rate_limit: Some(limit),
            ..Faults::default()
        });
    }
    let registry = Arc::new(registry);
    let (service, shutdown) = start_service(&config, &pool, &registry, listener);

    trace("service started; planning");
    let started = Instant::now();
    let summary = plan::make_and_store(&config, &pool, &registry, &[FLOW.to_owned()]).await?;
    let plan_time = started.elapsed();
    let plan_calls = calls(&sims);
    trace("planned; running");

    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&pool)
        .await?;
    let cpu_before = Cpu::now(cluster.postmaster);
    let erp_before = sims.customerp.control.counters();
    let zendesk_before = sims.zendesk.control().counters();
    let started = Instant::now();
    store::enqueue(&pool, summary.plan).await?;
    wait_for_the_end(&pool, summary.plan).await?;
    let run_time = started.elapsed();
    let cpu = Cpu::now(cluster.postmaster).since(cpu_before);
    let run_calls = minus(calls(&sims), plan_calls);
    let erp_endpoints = endpoints_since(&sims, &erp_before);
    let zendesk_endpoints = since(sims.zendesk.control(), &zendesk_before);
    let statements = statements(&pool).await?;
    let scans = scans(&pool).await?;
    wait_for_quiet(&pool, &sims, &erp_before).await?;
    if std::env::var_os("BENCH_TRACE").is_some() {
        print_trace(&pool).await?;
    }
    let quiet = Quiet {
        after: started.elapsed(),
        erp_endpoints: endpoints_since(&sims, &erp_before),
        cpu: Cpu::now(cluster.postmaster).since(cpu_before),
    };
    shutdown.cancel();
    service.await??;
    Ok(Figures {
        summary,
        plan: plan_time,
        run: run_time,
        plan_calls,
        run_calls,
        erp_endpoints,
        zendesk_endpoints,
        cpu,
        statements,
        scans,
        quiet,
    })
}

/// With `BENCH_TRACE`: the run's events by system and action and the log's decisions (what
/// showed, for one, the throttled run's extra Zendesk reads).
async fn print_trace(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let events: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT system, entity_type, action, count(*) FROM events GROUP BY 1, 2, 3 \
         ORDER BY 4 DESC",
    )
    .fetch_all(pool)
    .await?;
    eprintln!("events: {events:?}");
    let decisions: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT system, decision, count(*) FROM sync_log GROUP BY 1, 2 ORDER BY 3 DESC",
    )
    .fetch_all(pool)
    .await?;
    eprintln!("decisions: {decisions:?}");
    Ok(())
}

/// The Custom ERP's requests since `before`, by endpoint.
fn endpoints_since(sims: &Simulators, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    since(&sims.customerp.control, before)
}

/// A simulator's requests since `before`, by endpoint.
fn since(control: &SimControl, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    control
        .counters()
        .into_iter()
        .map(|(k, n)| (n - before.get(&k).copied().unwrap_or(0), k))
        .filter(|(n, _)| *n > 0)
        .map(|(n, k)| (k, n))
        .collect()
}

/// Waits until the Custom ERP has delivered the webhook of every write of the run (each `POST`
/// and `PATCH` changes a customer) and no job is left: the run's echoes are carried out too.
/// Its webhooks go one after the other per lane, so they can trail the run's end.
async fn wait_for_quiet(
    pool: &sqlx::PgPool,
    sims: &Simulators,
    before: &BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let writes: u64 = endpoints_since(sims, before)
            .iter()
            .filter(|(k, _)| k.starts_with("POST") || k.starts_with("PATCH"))
            .map(|(_, n)| n)
            .sum();
        let w = sims.customerp.webhook_stats();
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('ready', 'running'))",
        )
        .fetch_one(pool)
        .await?;
        if w.delivered + w.dropped + w.failed >= writes && !busy {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "not quiet after 300 s: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scans that read the most rows (since the database was made: the plan's reading included),
/// sequential scans of tables (with whether the table was ever analyzed) and index scans: a scan
/// that reads more rows per call as a table grows makes the rate fall with the run's size.
async fn scans(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64, i64, bool)>> {
    Ok(sqlx::query_as(
        "SELECT 'sequential scans of ' || relname::text, seq_scan, seq_tup_read, \
         coalesce(last_analyze, last_autoanalyze) IS NOT NULL \
         FROM pg_stat_user_tables WHERE seq_tup_read > 0 \
         UNION ALL SELECT 'index scans of ' || indexrelname::text, idx_scan, idx_tup_read, true \
         FROM pg_stat_user_indexes WHERE idx_tup_read > 0 ORDER BY 3 DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await?)
}

/// The statements of the run by total execution time (the benchmark's own progress query
/// included: `tether backfill run` follows a run with the same query).
async fn statements(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64, f64)>> {
    Ok(sqlx::query_as(
        "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database \
         WHERE datname = current_database()) ORDER BY total_exec_time DESC",
    )
    .fetch_all(pool)
    .await?)
}

/// The sandbox's configuration of the simulators, with the bench's overlay, workers and limit.
fn configure(sims: &Simulators, addr: SocketAddr, s: &Scenario) -> anyhow::Result<Config> {
    let dir = std::env::temp_dir();
    let overlay = dir.join(format!("tether-backfill-bench-{}.toml", std::process::id()));
    std::fs::write(&overlay, OVERLAY)?;
    let mut base = sims.config_toml(addr, &dir, "1s");
    base.push_str(&format!(
        "\n[registry]\noverlay = {:?}\n",
        overlay.display().to_string()
    ));
    let layer = format!(
        "[log]\nlevel = \"warn\"\n[guard]\nenabled = false\n[workers]\nconcurrency = {}\n\
         [zendesk]\nrate_limit_per_minute = {}\n",
        s.concurrency,
        s.zendesk_limit.unwrap_or(100_000)
    );
    let mut source = Source::empty();
    source.add_toml(&base, Path::new("(bench)"))?;
    source.add_toml(&layer, Path::new("(bench layer)"))?;
    Config::from_source(source).context("the bench configuration")
}

fn seed(sims: &Simulators, s: &Scenario) {
    for i in 0..s.orgs {
        sims.zendesk
            .insert_organization(json!({ "name": format!("Existing Org {i}") }));
    }
    for i in 0..s.matching {
        let fields = json!({ "name": format!("existing  ORG {i}") });
        let serde_json::Value::Object(fields) = fields else {
            unreachable!("a JSON object")
        };
        sims.customerp.insert("customer", fields, None);
    }
}

/// Waits until every item is carried out. Progress is read every 500 ms, as `tether backfill run`
/// follows a run (`backfill::command`); the end is noticed within 50 ms by asking whether any
/// backfill job is unfinished (the queue's index, not a count of the plan's items).
async fn wait_for_the_end(pool: &sqlx::PgPool, plan: i64) -> anyhow::Result<()> {
    let mut last_progress = Instant::now();
    loop {
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('ready', 'running') \
             AND priority = $1)",
        )
        .bind(tether::queue::JobPriority::Backfill.as_i16())
        .fetch_one(pool)
        .await?;
        if !busy || last_progress.elapsed() >= Duration::from_millis(500) {
            last_progress = Instant::now();
            let progress = store::progress(pool, plan).await?;
            if progress.finished() {
                anyhow::ensure!(progress.failed == 0, "{} items failed", progress.failed);
                return Ok(());
            }
            trace(&format!("progress {progress:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn total(control: &SimControl) -> u64 {
    control.counters().values().sum()
}

fn calls(sims: &Simulators) -> Calls {
    Calls {
        zendesk: total(sims.zendesk.control()),
        customerp: total(&sims.customerp.control),
        throttled: sims.zendesk.control().throttled() + sims.customerp.control.throttled(),
    }
}

fn minus(a: Calls, b: Calls) -> Calls {
    Calls {
        zendesk: a.zendesk - b.zendesk,
        customerp: a.customerp - b.customerp,
        throttled: a.throttled - b.throttled,
    }
}

fn report(title: &str, f: &Figures, top: usize) {
    let counts = &f.summary.flows[0];
    let items = counts.link + counts.create;
    let per = |n: u64| n as f64 / items.max(1) as f64;
    println!("\n== {title}");
    println!(
        "plan: {} records read and matched in {:.2}s ({} link, {} create, {} conflict); calls zendesk {} customerp {}",
        counts.linked + counts.link + counts.create + counts.conflict + counts.skip,
        f.plan.as_secs_f64(),
        counts.link,
        counts.create,
        counts.conflict,
        f.plan_calls.zendesk,
        f.plan_calls.customerp
    );
    println!(
        "run:  {items} records in {:.2}s = {:.0} records/s; per record: zendesk {:.2} calls, customerp {:.2} calls; 429s: {}",
        f.run.as_secs_f64(),
        items as f64 / f.run.as_secs_f64().max(0.001),
        per(f.run_calls.zendesk),
        per(f.run_calls.customerp),
        f.run_calls.throttled + f.plan_calls.throttled
    );
    println!(
        "estimate: {}s for the run (plan's vendor_calls {:?}); actual {:.0}s ({:+.0}%)",
        f.summary.estimated_seconds,
        f.summary.vendor_calls,
        f.run.as_secs_f64(),
        (f.run.as_secs_f64() / (f.summary.estimated_seconds.max(1) as f64) - 1.0) * 100.0
    );
    let by_endpoint: Vec<String> = f
        .erp_endpoints
        .iter()
        .map(|(k, n)| format!("{k} {:.2}", per(*n)))
        .collect();
    println!(
        "customerp per record by request: {}",
        by_endpoint.join(", ")
    );
    let zendesk: Vec<String> = f
        .zendesk_endpoints
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("zendesk requests: {}", zendesk.join(", "));
    print_quiet(&f.quiet, items);
    print_cpu(f, items);
    print_statements(f, items, top);
}

fn print_quiet(q: &Quiet, items: u64) {
    let per = |n: u64| n as f64 / items.max(1) as f64;
    let ms = |ticks: u64| ticks as f64 * 1000.0 / measure::TICKS_PER_SECOND / items.max(1) as f64;
    let erp: u64 = q.erp_endpoints.values().sum();
    let by_endpoint: Vec<String> = q
        .erp_endpoints
        .iter()
        .map(|(k, n)| format!("{k} {:.2}", per(*n)))
        .collect();
    println!(
        "with the echoes (the ERP's webhooks of the run's writes handled, no job left): {:.2}s = \
         {:.0} records/s; customerp {:.2} calls per record ({}); cpu per record {:.2} ms this \
         process, {:.2} ms PostgreSQL",
        q.after.as_secs_f64(),
        items as f64 / q.after.as_secs_f64().max(0.001),
        per(erp),
        by_endpoint.join(", "),
        ms(q.cpu.process),
        ms(q.cpu.postgres)
    );
}

fn print_cpu(f: &Figures, items: u64) {
    let ms = |ticks: u64| ticks as f64 * 1000.0 / measure::TICKS_PER_SECOND / items.max(1) as f64;
    let run = f.run.as_secs_f64().max(0.001);
    let cores = |ticks: u64| ticks as f64 / measure::TICKS_PER_SECOND / run;
    println!(
        "cpu per record: this process (Tether and simulators) {:.2} ms, PostgreSQL {:.2} ms, \
         machine {:.2} ms; cores busy: {:.2} + {:.2} of {:.2}",
        ms(f.cpu.process),
        ms(f.cpu.postgres),
        ms(f.cpu.machine),
        cores(f.cpu.process),
        cores(f.cpu.postgres),
        cores(f.cpu.machine)
    );
}

fn print_statements(f: &Figures, items: u64, top: usize) {
    let n = items.max(1) as f64;
    let calls: i64 = f.statements.iter().map(|s| s.1).sum();
    let exec: f64 = f.statements.iter().map(|s| s.2).sum();
    println!(
        "PostgreSQL per record: {:.1} statements, {:.3} ms executing them; top statements:",
        calls as f64 / n,
        exec / n
    );
    for (query, calls, total) in f.statements.iter().take(top) {
        let query: String = query.chars().take(110).collect();
        println!(
            "  {:>7.3} ms {:>6.2}x  {query}",
            total / n,
            *calls as f64 / n
        );
    }
    for (table, scans, rows, analyzed) in &f.scans {
        println!(
            "  {table}: {scans}, {rows} rows read{}",
            if *analyzed { "" } else { " (never analyzed)" }
        );
    }
}
