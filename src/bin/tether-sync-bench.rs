//! End-to-end benchmark of linked updates: an organization renamed in the Zendesk simulator
//! becomes a signed webhook to a real `tether serve` process, which reads the organization back,
//! writes the linked Custom ERP customer, and then recognises that customer's own webhook as the
//! echo of its write. Measured per round: linked updates per second (rename issued to counterpart
//! written), end-to-end latency, API calls per update, the engine's decisions, and the CPU split
//! between tether, PostgreSQL and the simulators (plus what else ran on the machine), and where
//! PostgreSQL's time went: the run's cluster loads pg_stat_statements, reset before each round.
//!
//! Three kinds of process, so the CPU split can be read from `/proc`:
//! - this process: the Zendesk and Custom ERP simulators and the driver (renames, checks);
//! - `tether serve` (the release binary beside this one), with its log level at `warn`;
//! - a private PostgreSQL cluster started for the run (the postmaster and its backends).
//!
//! Figures, not a pass/fail test: see the README's "Benchmarks" section.
//! Run: `cargo build --release --bins && ./target/release/tether-sync-bench`

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::Parser;
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::PgPool;

use tether::db::embedded::EmbeddedPostgres;
use tether::domain::SystemId;
use tether::measure;

#[path = "sync_bench/pg_cpu.rs"]
mod pg_cpu;
use tether::simulators::custom::{CustomSim, CustomSimConfig};
use tether::simulators::kit::RunningSim;
use tether::simulators::zendesk::{Kind, SimCredentials, SimOptions, ZendeskSim, ZendeskSimHandle};

/// The mark of the benchmark's own statements, which the per-round figures leave out
/// (pg_stat_statements keeps a statement's leading comment in its text).
macro_rules! bench_sql {
    () => {
        "/* tether-sync-bench */ "
    };
}

const FLOW: &str = "zendesk.Organizations->customerp.Customer";
const ZENDESK_EMAIL: &str = "bench@tether.test";
const ZENDESK_TOKEN: &str = "bench-zendesk-token";
const ZENDESK_SECRET: &str = "bench-zendesk-webhook-secret";
const ERP_TOKEN: &str = "bench-customerp-token";

/// The seed of this flow maps no properties; the benchmark carries the organization's name.
const OVERLAY: &str = r#"# Written by tether-sync-bench.
[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"

# Five flows can write an organization's name; the registry asks which one wins.
[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;

#[derive(Debug, Parser)]
#[command(
    name = "tether-sync-bench",
    about = "Linked updates per second end to end: Zendesk simulator -> tether -> Custom ERP simulator."
)]
struct Args {
    /// Linked organization/customer pairs; each round renames every organization once.
    #[arg(long, default_value_t = 2000)]
    records: usize,
    /// Measured rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Renames per second; 0 issues a round's renames all at once (capacity; the latency is then
    /// mostly queueing). A rate below capacity shows the latency of a steady load.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Webhooks each simulator delivers at once (in order per record), as a vendor's fleet does.
    #[arg(long, default_value_t = 64)]
    webhook_lanes: usize,
    /// tether's `workers.concurrency`. Jobs mostly wait on HTTP and PostgreSQL, so more of them
    /// at once than cores pays: 64 gave the best rate here (32: about 15% fewer).
    #[arg(long, default_value_t = 64)]
    worker_concurrency: usize,
    /// tether's `database.max_connections`.
    #[arg(long, default_value_t = 32)]
    max_connections: usize,
    /// Do not load pg_stat_statements (by default it is loaded for the run, and each round prints
    /// the statements and PostgreSQL time per linked update and the top statements).
    #[arg(long)]
    no_statements: bool,
    /// How many of the statements that took most of PostgreSQL's time each round prints.
    #[arg(long, default_value_t = 6)]
    top: usize,
    /// Run with the guard on (docs/guard.md), at thresholds no round reaches: what its counting
    /// costs per write, never a trip. By default the guard is off.
    #[arg(long)]
    guard: bool,
    /// The tether binary (default: `tether` beside this binary).
    #[arg(long)]
    tether: Option<PathBuf>,
    /// Configure the Custom ERP without `conditional_writes`, as a system whose `PATCH` ignores
    /// `If-Match`: every write to it is then preceded by a read (docs/sync-rules.md, "A write
    /// without a read").
    #[arg(long)]
    read_before_write: bool,
}

/// CPU time used so far, in ticks, by each group of processes.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTicks {
    tether: u64,
    postgres: u64,
    simulators: u64,
    machine_busy: u64,
}

impl CpuTicks {
    fn read(tether_pid: u32, postmaster_pid: u32) -> CpuTicks {
        CpuTicks {
            tether: measure::cpu_ticks(tether_pid).unwrap_or(0),
            postgres: measure::tree_cpu_ticks(postmaster_pid).unwrap_or(0),
            simulators: measure::cpu_ticks(std::process::id()).unwrap_or(0),
            machine_busy: measure::machine_busy_ticks().unwrap_or(0),
        }
    }

    fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            tether: self.tether.saturating_sub(earlier.tether),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            simulators: self.simulators.saturating_sub(earlier.simulators),
            machine_busy: self.machine_busy.saturating_sub(earlier.machine_busy),
        }
    }
}

struct Bench {
    args: Args,
    zendesk: ZendeskSimHandle,
    erp: CustomSim,
    pool: PgPool,
    tether_pid: u32,
    postmaster_pid: u32,
    /// PostgreSQL's CPU by kind of process.
    pg_cpu: pg_cpu::PgCpu,
    /// Zendesk organization id -> Custom ERP customer id.
    links: Vec<(u64, String)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("tether-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run(args, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(args: Args, work: &Path) -> anyhow::Result<()> {
    let pg = start_postgres(&args, work).await?;
    let postmaster_pid = pg.postmaster_pid().context("no postmaster pid")? as u32;
    let url = pg.url().expose_secret().to_owned();

    let tether_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let tether_url = format!("http://{tether_addr}");
    let sims = Simulators::start(&args, &tether_url).await?;
    let config_path = write_config(
        work,
        &args,
        tether_addr,
        &sims.zendesk_running,
        &sims.erp_running,
        &sims.erp_secret,
    )?;
    let mut tether = spawn_tether(&args, &config_path, &url)?;
    let tether_pid = tether.id().context("tether exited at once")?;

    let outcome = async {
        wait_ready(&tether_url, &mut tether).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        let mut bench = Bench {
            args,
            zendesk: sims.zendesk,
            erp: sims.erp,
            pool,
            tether_pid,
            postmaster_pid,
            pg_cpu: pg_cpu::PgCpu::start(postmaster_pid),
            links: Vec::new(),
        };
        bench.run_rounds().await
    }
    .await;

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tether_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), tether.wait()).await;
    sims.zendesk_running.stop().await;
    sims.erp_running.stop().await;
    let _ = pg.stop().await;
    outcome
}

/// The private PostgreSQL cluster, with pg_stat_statements loaded unless `--no-statements`.
async fn start_postgres(args: &Args, work: &Path) -> anyhow::Result<EmbeddedPostgres> {
    let pg = EmbeddedPostgres::start(&work.join("pg"))
        .await
        .context("cannot start PostgreSQL")?;
    if !args.no_statements {
        pg.preload_libraries(
            &["pg_stat_statements"],
            // Planning is timed too: the batched statements are planned on every call.
            &[("pg_stat_statements.track_planning", "on")],
        )
        .await
        .context("cannot load pg_stat_statements")?;
    }
    Ok(pg)
}

/// The Zendesk and Custom ERP simulators, in this process, sending their webhooks to tether.
struct Simulators {
    zendesk: ZendeskSimHandle,
    zendesk_running: RunningSim,
    erp: CustomSim,
    erp_running: RunningSim,
    erp_secret: String,
}

impl Simulators {
    async fn start(args: &Args, tether_url: &str) -> anyhow::Result<Simulators> {
        let (zendesk_running, zendesk) = ZendeskSim::start(SimOptions {
            bind: "127.0.0.1:0".parse()?,
            credentials: SimCredentials {
                email: ZENDESK_EMAIL.to_owned(),
                api_token: ZENDESK_TOKEN.to_owned(),
                oauth_token: None,
            },
            webhook_target: Some(format!("{tether_url}/webhooks/zendesk")),
            webhook_secret: ZENDESK_SECRET.to_owned(),
            webhook_lanes: args.webhook_lanes,
        })
        .await?;
        let erp_secret = format!(
            "whsec_{}",
            base64_standard(b"tether-sync-bench-customerp-secret")
        );
        let (erp, erp_running) = CustomSim::start(
            CustomSimConfig {
                webhook_lanes: args.webhook_lanes,
                system: SystemId::CustomErp,
                api_token: ERP_TOKEN.to_owned(),
                webhook_secret: Some(erp_secret.clone()),
                webhook_target: Some(format!("{tether_url}/webhooks/customerp")),
            },
            "127.0.0.1:0".parse()?,
        )
        .await?;
        Ok(Simulators {
            zendesk,
            zendesk_running,
            erp,
            erp_running,
            erp_secret,
        })
    }
}

/// A release `tether serve` child process; its warnings and errors go to a file kept after the
/// run.
fn spawn_tether(
    args: &Args,
    config_path: &Path,
    database_url: &str,
) -> anyhow::Result<tokio::process::Child> {
    let tether_bin = match &args.tether {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    let log_path = std::env::temp_dir().join("tether-sync-bench-tether.log");
    let log = std::fs::File::create(&log_path)?;
    println!(
        "tether's log: {} (guard {})",
        log_path.display(),
        if args.guard {
            "on, at thresholds no round reaches"
        } else {
            "off: [guard] enabled = false"
        }
    );
    tokio::process::Command::new(&tether_bin)
        .arg("serve")
        .env("TETHER_CONFIG", config_path)
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", tether_bin.display()))
}

impl Bench {
    /// Seeds the links, then runs and prints every round.
    async fn run_rounds(&mut self) -> anyhow::Result<()> {
        self.seed().await?;
        if !self.args.no_statements {
            sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .execute(&self.pool)
                .await?;
        }
        self.print_header();
        for round in 1..=self.args.rounds {
            self.round(round).await?;
        }
        Ok(())
    }
}

/// PostgreSQL's CPU per update by kind of process (see `pg_cpu`).
fn print_pg_split(split: &pg_cpu::Split, n: f64) {
    let ms = |ticks: u64| ticks as f64 * 1000.0 / measure::TICKS_PER_SECOND / n;
    let kinds: Vec<String> = split
        .by_kind
        .iter()
        .map(|(kind, (ticks, sys))| {
            format!("{} {:.3} ({:.3} sys)", kind.label(), ms(*ticks), ms(*sys))
        })
        .collect();
    println!(
        "      PostgreSQL CPU per linked update by process (ms): {}, exited unsampled and postmaster {:.3}; sampler {:.3} (left out of the simulators')",
        kinds.join(", "),
        ms(split.unsampled),
        ms(split.sampler)
    );
}

/// CPU per update, which the rest of the machine's load changes less than the rate: and what
/// the three parts would need of two idle cores.
fn print_cpu_per_update(cpu: CpuTicks, n: f64) {
    let ms = |ticks: u64| ticks as f64 * 1000.0 / measure::TICKS_PER_SECOND / n;
    let total = ms(cpu.tether) + ms(cpu.postgres) + ms(cpu.simulators);
    println!(
        "      CPU per linked update: tether {:.3} ms, PostgreSQL {:.3} ms, simulators {:.3} ms; {:.3} ms in all (2 idle cores: {:.0} updates/s)",
        ms(cpu.tether),
        ms(cpu.postgres),
        ms(cpu.simulators),
        total,
        2000.0 / total
    );
}

fn base64_standard(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn write_config(
    work: &Path,
    args: &Args,
    listen: std::net::SocketAddr,
    zendesk: &RunningSim,
    erp: &RunningSim,
    erp_secret: &str,
) -> anyhow::Result<PathBuf> {
    let overlay = work.join("overlay.toml");
    std::fs::write(&overlay, OVERLAY)?;
    // Only the two systems of the measured flow are connected, so no other flow adds work. The
    // Zendesk limiter is set to its highest value: the simulator has no limit, and the point is
    // tether's own capacity (a real Zendesk account allows 200 to 2,500 requests a minute).
    let guard = if args.guard {
        // On, but never tripped: unique names, and no limit a round of renames reaches.
        "[guard]\nenabled = true\nmax_writes = 4294967295\nmax_same_value = 4294967295\n\
         max_changed_fraction = 1.0"
    } else {
        "# Off: the benchmark measures sync throughput, and its rounds are mass changes by design.\n\
         [guard]\nenabled = false"
    };
    let config = format!(
        r#"listen = "{listen}"
log_format = "json"
log_level = "warn"

[database]
max_connections = {max_connections}

[workers]
concurrency = {concurrency}

[registry]
overlay = {overlay:?}

{guard}

[zendesk]
base_url = "{zendesk}"
email = "{ZENDESK_EMAIL}"
api_token = "{ZENDESK_TOKEN}"
webhook_secrets = ["{ZENDESK_SECRET}"]
rate_limit_per_minute = 100000

[customerp]
base_url = "{erp}"
api_token = "{ERP_TOKEN}"
webhook_secret = "{erp_secret}"
conditional_writes = {conditional_writes}
"#,
        conditional_writes = !args.read_before_write,
        max_connections = args.max_connections,
        concurrency = args.worker_concurrency,
        overlay = overlay.display().to_string(),
        zendesk = zendesk.base_url(),
        erp = erp.base_url(),
    );
    let path = work.join("tether.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

async fn wait_ready(tether_url: &str, tether: &mut tokio::process::Child) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("{tether_url}/readyz");
    wait_until("tether to be ready", Duration::from_secs(60), async || {
        if let Some(status) = tether.try_wait()? {
            bail!("tether exited before it was ready ({status})");
        }
        let ready = client.get(&url).send().await;
        Ok(ready.is_ok_and(|r| r.status().is_success()))
    })
    .await
}

async fn wait_until<F>(what: &str, limit: Duration, mut done: F) -> anyhow::Result<()>
where
    F: AsyncFnMut() -> anyhow::Result<bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Bench {
    /// Creates the organizations in Zendesk (as agents would, with webhooks) and waits until tether
    /// has created and linked every Custom ERP customer and the queue is empty.
    async fn seed(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        for i in 0..self.args.records {
            let response = self.zendesk.create(
                Kind::Organization,
                json!({"name": format!("Bench organization {i}")}),
            );
            if !response.status().is_success() {
                bail!(
                    "the Zendesk simulator refused an organization: {}",
                    response.status()
                );
            }
        }
        let expected = self.args.records as i64;
        let pool = self.pool.clone();
        wait_until(
            "every organization to be linked",
            Duration::from_secs(600),
            async || {
                let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM links WHERE flow_id = $1")
                    .bind(FLOW)
                    .fetch_one(&pool)
                    .await?;
                Ok(n == expected)
            },
        )
        .await?;
        self.settle().await?;
        // The tables just grew from nothing: without fresh statistics the plans tether's
        // connections cached while they were empty stay until autovacuum's next ANALYZE (a minute
        // or more), and one link lookup read hundreds of blocks a call meanwhile.
        sqlx::query(concat!(bench_sql!(), "ANALYZE"))
            .execute(&self.pool)
            .await?;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT source_id, target_id FROM links WHERE flow_id = $1 ORDER BY id")
                .bind(FLOW)
                .fetch_all(&self.pool)
                .await?;
        self.links = rows
            .into_iter()
            .map(|(s, t)| Ok((s.parse()?, t)))
            .collect::<anyhow::Result<_>>()?;
        println!(
            "seeded {} linked organization/customer pairs in {:.1} s (creates through the same path)",
            self.links.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Waits until no job is unfinished and both simulators have delivered every webhook.
    async fn settle(&self) -> anyhow::Result<()> {
        let pool = self.pool.clone();
        let zendesk = self.zendesk.clone();
        let erp = self.erp.clone();
        let mut last = (0, 0);
        let mut quiet_checks = 0;
        wait_until("the queue to drain", Duration::from_secs(600), async || {
            let (open,): (i64,) = sqlx::query_as(concat!(
                bench_sql!(),
                "SELECT count(*) FROM jobs WHERE state IN ('ready', 'running')"
            ))
            .fetch_one(&pool)
            .await?;
            let sent = (
                zendesk.webhook_stats().delivered,
                erp.webhook_stats().delivered,
            );
            quiet_checks = if open == 0 && sent == last {
                quiet_checks + 1
            } else {
                0
            };
            last = sent;
            // Five quiet checks in a row (100 ms): no webhook was still on its way to tether.
            Ok(quiet_checks >= 5)
        })
        .await
    }

    fn print_header(&self) {
        println!(
            "tether: workers.concurrency {}, database.max_connections {}, log_level warn; webhook lanes per simulator {}; renames {}",
            self.args.worker_concurrency,
            self.args.max_connections,
            self.args.webhook_lanes,
            if self.args.rate > 0.0 {
                format!("at {} a second", self.args.rate)
            } else {
                "all at once".to_owned()
            }
        );
        println!(
            "{:>5} {:>8} {:>10} {:>10} {:>8} {:>8} | {:>7} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6} {:>6}",
            "round", "updates", "written/s", "settled/s", "p50 ms", "p99 ms",
            "tether", "pg", "sims", "other",
            "zdGET", "erpW", "erpGET", "zdW"
        );
    }

    /// Renames every organization once, as fast as the driver can, and measures until every
    /// counterpart carries the new name and the echoes have been handled.
    async fn round(&self, round: usize) -> anyhow::Result<()> {
        let counters_before = (
            self.zendesk.control().counters(),
            self.erp.control.counters(),
        );
        let log_before = self.last_ids().await?;
        if !self.args.no_statements {
            sqlx::query(concat!(bench_sql!(), "SELECT pg_stat_statements_reset()"))
                .execute(&self.pool)
                .await?;
        }
        let sampler_before = self.pg_cpu.sampler_ticks();
        self.pg_cpu.start_round();
        let cpu_before = CpuTicks::read(self.tether_pid, self.postmaster_pid);
        let started = Instant::now();
        let issued_at = self.issue_renames(round).await?;
        let issue_time = started.elapsed();
        self.wait_for_writes(&counters_before.1).await?;
        let written = started.elapsed();
        let latencies_ms = self.latencies_ms(round, &issued_at)?;
        self.settle().await?;
        let settled = started.elapsed();
        let mut cpu = CpuTicks::read(self.tether_pid, self.postmaster_pid).since(cpu_before);
        let split = self.pg_cpu.finish_round(cpu.postgres, sampler_before);
        // The sampler runs in this process: its time is not the simulators'.
        cpu.simulators = cpu.simulators.saturating_sub(split.sampler);
        self.print_round(RoundFigures {
            round,
            written,
            settled,
            latencies_ms,
            cpu,
            counters_before,
        });
        print_pg_split(&split, self.links.len() as f64);
        self.print_decisions(log_before, issue_time).await?;
        if !self.args.no_statements {
            self.print_statements(cpu.postgres).await?;
        }
        Ok(())
    }

    /// Renames every linked organization once, paced at `--rate`, and returns when each rename
    /// was made. On a blocking thread, so the simulators' async workers keep serving tether while
    /// the renames are issued.
    async fn issue_renames(&self, round: usize) -> anyhow::Result<Vec<DateTime<Utc>>> {
        let zendesk = self.zendesk.clone();
        let orgs: Vec<u64> = self.links.iter().map(|(org, _)| *org).collect();
        let rate = self.args.rate;
        tokio::task::spawn_blocking(move || {
            let mut issued_at = Vec::with_capacity(orgs.len());
            let pace_from = Instant::now();
            for (i, org) in orgs.into_iter().enumerate() {
                if rate > 0.0 {
                    let due = pace_from + Duration::from_secs_f64(i as f64 / rate);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                issued_at.push(Utc::now());
                let name = json!({"name": format!("Bench organization {i} round {round}")});
                let response = zendesk.update(Kind::Organization, org, name);
                if !response.status().is_success() {
                    bail!(
                        "the Zendesk simulator refused a rename: {}",
                        response.status()
                    );
                }
            }
            Ok(issued_at)
        })
        .await?
    }

    /// Waits until the Custom ERP simulator has taken one write per customer (its request
    /// counters are cheap to read; the records are checked once, by [`Self::latencies_ms`]).
    async fn wait_for_writes(&self, before: &Counters) -> anyhow::Result<()> {
        let writes_before = non_get_calls(before);
        let expected = self.links.len() as u64;
        let erp = self.erp.clone();
        wait_until(
            "every counterpart to be written",
            Duration::from_secs(600),
            async || Ok(non_get_calls(&erp.control.counters()) - writes_before >= expected),
        )
        .await
    }

    /// Latency per record: the customer's change stamp (set by the simulator when tether's write
    /// arrived) minus the moment the rename was made. Every customer must carry its new name.
    fn latencies_ms(&self, round: usize, issued_at: &[DateTime<Utc>]) -> anyhow::Result<Vec<f64>> {
        let mut latencies_ms: Vec<f64> = Vec::with_capacity(self.links.len());
        for (i, (_, customer)) in self.links.iter().enumerate() {
            let record = self
                .erp
                .get("customer", customer)
                .context("a customer vanished")?;
            let name = format!("Bench organization {i} round {round}");
            if record.get("name").and_then(|v| v.as_str()) != Some(name.as_str()) {
                bail!("customer {customer} does not carry the new name after the round");
            }
            let stamped: DateTime<Utc> = record
                .get("updated_at")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .context("a customer without updated_at")?;
            latencies_ms
                .push((stamped - issued_at[i]).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
        latencies_ms.sort_by(f64::total_cmp);
        Ok(latencies_ms)
    }

    /// The round's line of the table: rates, latency percentiles, CPU shares, calls per update.
    fn print_round(&self, figures: RoundFigures) {
        let RoundFigures {
            round,
            written,
            settled,
            latencies_ms,
            cpu,
            counters_before,
        } = figures;
        let n = self.links.len() as f64;
        let calls = |after: &Counters, before: &Counters, pick: &dyn Fn(&str) -> bool| {
            after
                .iter()
                .filter(|(k, _)| pick(k))
                .map(|(k, v)| v - before.get(k).copied().unwrap_or(0))
                .sum::<u64>() as f64
                / n
        };
        let (zd_after, erp_after) = (
            self.zendesk.control().counters(),
            self.erp.control.counters(),
        );
        let is_get = |k: &str| k.starts_with("GET ");
        let zd_get = calls(&zd_after, &counters_before.0, &is_get);
        let zd_write = calls(&zd_after, &counters_before.0, &|k| !is_get(k));
        let erp_get = calls(&erp_after, &counters_before.1, &is_get);
        let erp_write = calls(&erp_after, &counters_before.1, &|k| !is_get(k));
        let pct = |p: f64| {
            latencies_ms
                .get(((latencies_ms.len().saturating_sub(1)) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        // CPU as a share of one core over the round (200% = both cores of this machine).
        let share = |ticks: u64| measure::percent_of_core(ticks, settled);
        let other = cpu
            .machine_busy
            .saturating_sub(cpu.tether + cpu.postgres + cpu.simulators);
        println!(
            "{:>5} {:>8} {:>10.0} {:>10.0} {:>8.1} {:>8.1} | {:>6.0}% {:>6.0}% {:>6.0}% {:>6.0}% | {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            round,
            self.links.len(),
            n / written.as_secs_f64(),
            n / settled.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            share(cpu.tether),
            share(cpu.postgres),
            share(cpu.simulators),
            share(other),
            zd_get,
            erp_write,
            erp_get,
            zd_write,
        );
        print_cpu_per_update(cpu, n);
    }

    /// The last ids of `sync_log`, `events` and `jobs` (identities: what came after is the
    /// round's).
    async fn last_ids(&self) -> anyhow::Result<LastIds> {
        let (sync_log, events, jobs): (i64, i64, i64) = sqlx::query_as(concat!(
            bench_sql!(),
            "SELECT (SELECT coalesce(max(id), 0) FROM sync_log), \
                    (SELECT coalesce(max(id), 0) FROM events), \
                    (SELECT coalesce(max(id), 0) FROM jobs)"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(LastIds {
            sync_log,
            events,
            jobs,
        })
    }

    /// How long issuing the renames took, the events and jobs per update (an echo the intake
    /// settles has no job), and the engine's decisions of the round.
    async fn print_decisions(&self, before: LastIds, issue_time: Duration) -> anyhow::Result<()> {
        let after = self.last_ids().await?;
        let n = self.links.len() as f64;
        println!(
            "      events per update {:.2}, jobs per update {:.2}",
            (after.events - before.events) as f64 / n,
            (after.jobs - before.jobs) as f64 / n
        );
        let log_before = before.sync_log;
        let decisions: Vec<(String, i64)> = sqlx::query_as(
            concat!(bench_sql!(), "SELECT decision, count(*) FROM sync_log WHERE id > $1 GROUP BY decision ORDER BY decision"),
        )
        .bind(log_before)
        .fetch_all(&self.pool)
        .await?;
        let decisions: Vec<String> = decisions.iter().map(|(d, c)| format!("{d} {c}")).collect();
        println!(
            "      renames issued in {:.2} s; engine decisions: {}",
            issue_time.as_secs_f64(),
            decisions.join(", ")
        );
        // Errors are retried (a round ends only when every customer carries its new name), but
        // what they were belongs in the figures.
        let errors: Vec<(String, i64)> = sqlx::query_as(concat!(
            bench_sql!(),
            "SELECT left(coalesce(error, ''), 160), count(*) FROM sync_log \
             WHERE id > $1 AND decision = 'error' GROUP BY 1 ORDER BY 2 DESC LIMIT 3"
        ))
        .bind(log_before)
        .fetch_all(&self.pool)
        .await?;
        for (error, count) in errors {
            println!("      error {count}x: {error}");
        }
        Ok(())
    }

    /// Where PostgreSQL's time went this round (pg_stat_statements, reset before the round; the
    /// benchmark's own statements left out): statements and execution time per linked update,
    /// against PostgreSQL's CPU time per update, and the statements that took most of it.
    async fn print_statements(&self, postgres_ticks: u64) -> anyhow::Result<()> {
        let rows: Vec<(String, i64, f64, f64, i64)> = sqlx::query_as(concat!(
            bench_sql!(),
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, \
             total_plan_time, shared_blks_hit + shared_blks_read \
             FROM pg_stat_statements WHERE query NOT LIKE '/* tether-sync-bench */%' \
             ORDER BY total_exec_time + total_plan_time DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        let n = self.links.len() as f64;
        let calls: i64 = rows.iter().map(|r| r.1).sum();
        let exec_ms: f64 = rows.iter().map(|r| r.2).sum();
        let plan_ms: f64 = rows.iter().map(|r| r.3).sum();
        let cpu_ms = postgres_ticks as f64 * 1000.0 / measure::TICKS_PER_SECOND;
        println!(
            "      PostgreSQL per linked update: {:.1} statements, {:.3} ms executing and {:.3} ms planning them, {:.3} ms of CPU (all processes); top statements (executing + planning):",
            calls as f64 / n,
            exec_ms / n,
            plan_ms / n,
            cpu_ms / n
        );
        for (query, calls, exec, plan, blocks) in rows.into_iter().take(self.args.top) {
            let query: String = query.chars().take(90).collect();
            println!(
                "        {:>6.3} + {:>5.3} ms {:>5.2}x {:>6.1} blocks/call  {query}",
                exec / n,
                plan / n,
                calls as f64 / n,
                blocks as f64 / calls.max(1) as f64
            );
        }
        Ok(())
    }
}

/// A simulator's request counters: `"<METHOD> <path pattern>"` to calls.
type Counters = std::collections::BTreeMap<String, u64>;

/// Calls other than reads: the writes a simulator has taken.
fn non_get_calls(counters: &Counters) -> u64 {
    counters
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| *v)
        .sum()
}

/// The last ids of the tables a round adds to, read before and after it.
#[derive(Debug, Clone, Copy)]
struct LastIds {
    sync_log: i64,
    events: i64,
    jobs: i64,
}

/// What one round measured, for its line of the table.
struct RoundFigures {
    round: usize,
    /// From the first rename to the last counterpart written.
    written: Duration,
    /// From the first rename until the queue was empty again.
    settled: Duration,
    /// Sorted.
    latencies_ms: Vec<f64>,
    cpu: CpuTicks,
    /// The Zendesk and Custom ERP simulators' counters before the round.
    counters_before: (Counters, Counters),
}
