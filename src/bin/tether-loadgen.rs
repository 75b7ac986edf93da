//! Load generator for the webhook intake: sends uniquely signed Zendesk webhooks to a running
//! tether at rising concurrency and prints, per level, accepted webhooks per second, p50 and p99
//! latency, tether's peak RSS (with `--tether-pid`), and pgbench's rate for one single-row insert
//! per transaction at the same concurrency on the same cluster (with `--pgbench-url`).
//! Figures, not a pass/fail test: see the README's "Benchmark" section.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "tether-loadgen",
    about = "Sends signed Zendesk webhooks at rising concurrency."
)]
struct Args {
    /// The webhook endpoint of a running tether.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/zendesk")]
    url: String,
    /// A Zendesk webhook secret tether is configured with.
    #[arg(long, env = "LOADGEN_ZENDESK_SECRET")]
    secret: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64,128")]
    levels: Vec<usize>,
    /// Seconds per level (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Tether's process id, to report its peak RSS (VmHWM) after each level.
    #[arg(long)]
    tether_pid: Option<u32>,
    /// A PostgreSQL URL on the same cluster: also run pgbench (single-row insert per
    /// transaction, same concurrency and duration) after each level.
    #[arg(long, env = "LOADGEN_PGBENCH_URL")]
    pgbench_url: Option<String>,
}

struct Level {
    accepted: usize,
    refused: usize,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

fn body_for(n: u64) -> Vec<u8> {
    let id = uuid::Uuid::new_v4().to_string();
    let body = format!(
        r#"{{"type":"zen:event-type:ticket.status_changed","account_id":1,"id":"{id}","subject":"zen:ticket:{n}","time":"{}","zendesk_event_version":"2022-06-20","detail":{{"id":"{n}","status":"open"}},"event":{{"current":"open","previous":"new"}}}}"#,
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    );
    body.into_bytes()
}

async fn run_level(args: &Args, client: &reqwest::Client, concurrency: usize) -> Level {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let client = client.clone();
        let url = args.url.clone();
        let secret = args.secret.clone();
        let stop = stop.clone();
        let measuring = measuring.clone();
        workers.spawn(async move {
            let (mut accepted, mut refused, mut lat) = (0usize, 0usize, Vec::new());
            let mut n = (w as u64) << 32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = body_for(n);
                let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
                let sig = tether::signing::zendesk::sign(&secret, &ts, &body);
                let started = Instant::now();
                let result = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-zendesk-webhook-signature", sig)
                    .header("x-zendesk-webhook-signature-timestamp", ts)
                    .body(body)
                    .send()
                    .await;
                let took = started.elapsed();
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match result {
                    Ok(r) if r.status().as_u16() == 202 => {
                        accepted += 1;
                        lat.push(took.as_micros() as u64);
                    }
                    _ => refused += 1,
                }
            }
            (accepted, refused, lat)
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut level = Level {
        accepted: 0,
        refused: 0,
        latencies_us: Vec::new(),
        elapsed,
    };
    while let Some(Ok((a, r, lat))) = workers.join_next().await {
        level.accepted += a;
        level.refused += r;
        level.latencies_us.extend(lat);
    }
    level.latencies_us.sort_unstable();
    level
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

async fn pgbench(url: &str, concurrency: usize, seconds: u64) -> anyhow::Result<f64> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("pgbench: cannot connect")?;
    // A table shaped like a small event row; unlogged would flatter pgbench, so it is logged.
    sqlx::query("CREATE TABLE IF NOT EXISTS loadgen_pgbench (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    let script: PathBuf = std::env::temp_dir().join(format!("loadgen-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO loadgen_pgbench (v) VALUES (md5(random()::text));\n",
    )?;
    let output = tokio::process::Command::new("pgbench")
        .args(["-n", "-T", &seconds.to_string()])
        .args(["-c", &concurrency.to_string(), "-j", "2", "-f"])
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("pgbench could not be started (is it on the PATH?)")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(tps) = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|t| t.parse().ok())
    else {
        bail!(
            "pgbench gave no rate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    Ok(tps)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    println!(
        "{:>6} {:>12} {:>9} {:>9} {:>9} {:>10} {:>12} {:>7}",
        "conc", "accepted/s", "p50 ms", "p99 ms", "refused", "rss MiB", "pgbench tps", "ratio"
    );
    for &c in &args.levels {
        let level = run_level(&args, &client, c).await;
        let rate = level.accepted as f64 / level.elapsed.as_secs_f64();
        let rss = args
            .tether_pid
            .and_then(peak_rss_mib)
            .map_or("-".to_owned(), |m| format!("{m:.1}"));
        let (pg, ratio) = match &args.pgbench_url {
            Some(url) => match pgbench(url, c, args.seconds).await {
                Ok(tps) => (format!("{tps:.0}"), format!("{:.2}", rate / tps)),
                Err(e) => {
                    eprintln!("{e:#}");
                    ("-".to_owned(), "-".to_owned())
                }
            },
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:>6} {:>12.0} {:>9.2} {:>9.2} {:>9} {:>10} {:>12} {:>7}",
            c,
            rate,
            percentile(&level.latencies_us, 0.50),
            percentile(&level.latencies_us, 0.99),
            level.refused,
            rss,
            pg,
            ratio
        );
    }
    Ok(())
}
