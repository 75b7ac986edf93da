//! Load generator for the webhook intake: sends uniquely signed Zendesk webhooks to a running
//! tether at rising concurrency and prints, per level, accepted webhooks per second, p50 and p99
//! latency, tether's peak RSS (with `--tether-pid`), and pgbench's rate for one single-row insert
//! per transaction at the same concurrency on the same cluster (with `--pgbench-url`).
//! Figures, not a pass/fail test: see the README's "Benchmark" section.
//!
//! The generator shares the machine with tether and PostgreSQL, so it keeps its own work out of
//! the way: every body of a level is built and signed before the level starts (a real vendor signs
//! on its own machines), and each simulated sender drives one plain HTTP/1.1 keep-alive
//! connection. It reports its own CPU use, tether's and (with `--postgres-pid`) PostgreSQL's over
//! the measured window, so a reader can see who used the cores. pgbench is run exactly as the
//! issue states (one single-row insert per transaction into a logged table, same concurrency and
//! duration); nothing here favours either side.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tether::measure;

#[derive(Debug, Parser)]
#[command(
    name = "tether-loadgen",
    about = "Sends signed Zendesk webhooks at rising concurrency."
)]
struct Args {
    /// The webhook endpoint of a running tether (plain http).
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
    /// Bodies signed in advance per second of a level. Should the level outrun them, the rest are
    /// signed while sending, and a warning says how many.
    #[arg(long, default_value_t = 30_000)]
    presign: usize,
    /// Tether's process id, to report its peak RSS (VmHWM) after each level and its CPU use.
    #[arg(long)]
    tether_pid: Option<u32>,
    /// The PostgreSQL postmaster's process id, to report the cluster's CPU use (the postmaster
    /// and its children) during each level.
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// A PostgreSQL URL on the same cluster: also run pgbench (single-row insert per
    /// transaction, same concurrency and duration) after each level.
    #[arg(long, env = "LOADGEN_PGBENCH_URL")]
    pgbench_url: Option<String>,
}

/// One signed delivery, ready to send.
struct Signed {
    body: Bytes,
    timestamp: HeaderValue,
    signature: HeaderValue,
}

fn signed(secret: &str, n: u64) -> Signed {
    let id = uuid::Uuid::new_v4();
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let body = format!(
        r#"{{"type":"zen:event-type:ticket.status_changed","account_id":1,"id":"{id}","subject":"zen:ticket:{n}","time":"{now}","zendesk_event_version":"2022-06-20","detail":{{"id":"{n}","status":"open"}},"event":{{"current":"open","previous":"new"}}}}"#,
    );
    let signature = tether::signing::zendesk::sign(secret, &now, body.as_bytes());
    Signed {
        body: Bytes::from(body),
        timestamp: HeaderValue::try_from(now).expect("a timestamp is a valid header"),
        signature: HeaderValue::try_from(signature).expect("base64 is a valid header"),
    }
}

/// The bodies of one level, handed out once each.
struct Bodies {
    signed: Vec<Signed>,
    next: AtomicUsize,
    /// Taken beyond the prepared ones (signed while sending).
    live: AtomicUsize,
}

impl Bodies {
    fn prepare(secret: &str, count: usize) -> Bodies {
        // Record numbers unique across levels too, as the ids are.
        let base = (std::process::id() as u64) << 40 | (chrono::Utc::now().timestamp() as u64) << 8;
        Bodies {
            signed: (0..count)
                .map(|i| signed(secret, base + i as u64))
                .collect(),
            next: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
        }
    }

    fn take(&self, secret: &str, worker: usize) -> (Bytes, HeaderValue, HeaderValue) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let s = match self.signed.get(i) {
            Some(s) => return (s.body.clone(), s.timestamp.clone(), s.signature.clone()),
            None => {
                self.live.fetch_add(1, Ordering::Relaxed);
                signed(secret, (worker as u64) << 48 | i as u64)
            }
        };
        (s.body, s.timestamp, s.signature)
    }
}

struct Target {
    uri: Uri,
    host: HeaderValue,
    addr: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().context("--url is not a URL")?;
        if uri.scheme_str() != Some("http") {
            bail!("--url must be plain http:// (the benchmark runs on loopback)");
        }
        let authority = uri.authority().context("--url has no host")?.clone();
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Target {
            host: HeaderValue::from_str(authority.as_str())?,
            uri,
            addr,
        })
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(&target.addr)
        .await
        .with_context(|| format!("cannot connect to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes the connection.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one delivery and reads the whole answer; `Ok(status)`.
async fn send(
    sender: &mut Sender,
    target: &Target,
    (body, timestamp, signature): (Bytes, HeaderValue, HeaderValue),
) -> anyhow::Result<u16> {
    sender.ready().await?;
    let request = Request::post(target.uri.clone())
        .header(HOST, target.host.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("x-zendesk-webhook-signature", signature)
        .header("x-zendesk-webhook-signature-timestamp", timestamp)
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

struct Level {
    accepted: usize,
    refused: usize,
    latencies_us: Vec<u64>,
    elapsed: Duration,
    live_signed: usize,
    cpu: CpuUse,
}

/// One sender's connection: sends presigned webhooks until `stop`, counting (while `measuring`)
/// the accepted ones with their latency and the refused ones.
struct SenderLoop {
    target: Arc<Target>,
    bodies: Arc<Bodies>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
}

impl SenderLoop {
    async fn run(self, secret: &str, w: usize, mut sender: Sender) -> (usize, usize, Vec<u64>) {
        let (mut accepted, mut refused, mut lat) = (0usize, 0usize, Vec::new());
        while !self.stop.load(Ordering::Relaxed) {
            let delivery = self.bodies.take(secret, w);
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(30),
                send(&mut sender, &self.target, delivery),
            )
            .await;
            let took = started.elapsed();
            let ok = matches!(result, Ok(Ok(202)));
            if !matches!(result, Ok(Ok(_))) {
                // A broken or stuck connection: start a new one, as a sender would.
                match connect(&self.target).await {
                    Ok(s) => sender = s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            if !self.measuring.load(Ordering::Relaxed) {
                continue;
            }
            if ok {
                accepted += 1;
                lat.push(took.as_micros() as u64);
            } else {
                refused += 1;
            }
        }
        (accepted, refused, lat)
    }
}

async fn run_level(args: &Args, target: &Arc<Target>, concurrency: usize) -> anyhow::Result<Level> {
    let bodies = Arc::new(Bodies::prepare(
        &args.secret,
        args.presign.saturating_mul(args.seconds as usize + 2),
    ));
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        senders.push(connect(target).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for (w, sender) in senders.into_iter().enumerate() {
        let (target, bodies, stop, measuring) = (
            target.clone(),
            bodies.clone(),
            stop.clone(),
            measuring.clone(),
        );
        let secret = args.secret.clone();
        workers.spawn(async move {
            let sender_loop = SenderLoop {
                target,
                bodies,
                stop,
                measuring,
            };
            sender_loop.run(&secret, w, sender).await
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = CpuSample::take(args);
    let live_before = bodies.live.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = CpuSample::take(args).since(&cpu_before, elapsed);
    let live_signed = bodies.live.load(Ordering::Relaxed) - live_before;
    stop.store(true, Ordering::Relaxed);
    let mut level = Level {
        accepted: 0,
        refused: 0,
        latencies_us: Vec::new(),
        elapsed,
        live_signed,
        cpu,
    };
    while let Some(Ok((a, r, lat))) = workers.join_next().await {
        level.accepted += a;
        level.refused += r;
        level.latencies_us.extend(lat);
    }
    level.latencies_us.sort_unstable();
    Ok(level)
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

#[derive(Clone, Copy)]
struct CpuSample {
    loadgen: Option<u64>,
    tether: Option<u64>,
    postgres: Option<u64>,
}

impl CpuSample {
    fn take(args: &Args) -> CpuSample {
        CpuSample {
            loadgen: measure::cpu_ticks(std::process::id()),
            tether: args.tether_pid.and_then(measure::cpu_ticks),
            postgres: args.postgres_pid.and_then(measure::tree_cpu_ticks),
        }
    }

    fn since(&self, before: &CpuSample, elapsed: Duration) -> CpuUse {
        let pct = |a: Option<u64>, b: Option<u64>| {
            Some(measure::percent_of_core(a?.saturating_sub(b?), elapsed))
        };
        CpuUse {
            loadgen: pct(self.loadgen, before.loadgen),
            tether: pct(self.tether, before.tether),
            postgres: pct(self.postgres, before.postgres),
        }
    }
}

/// Percent of one core over the measured window.
struct CpuUse {
    loadgen: Option<f64>,
    tether: Option<f64>,
    postgres: Option<f64>,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.0}"))
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
    let target = Arc::new(Target::parse(&args.url)?);
    println!(
        "{:>6} {:>12} {:>9} {:>9} {:>9} {:>10} {:>12} {:>7} {:>9}",
        "conc",
        "accepted/s",
        "p50 ms",
        "p99 ms",
        "refused",
        "rss MiB",
        "pgbench tps",
        "ratio",
        "cpu% l/t/p"
    );
    for &c in &args.levels {
        let level = run_level(&args, &target, c).await?;
        let rate = level.accepted as f64 / level.elapsed.as_secs_f64();
        if level.live_signed > 0 {
            eprintln!(
                "note: {} bodies were signed while measuring (raise --presign)",
                level.live_signed
            );
        }
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
            "{:>6} {:>12.0} {:>9.2} {:>9.2} {:>9} {:>10} {:>12} {:>7} {:>9}",
            c,
            rate,
            percentile(&level.latencies_us, 0.50),
            percentile(&level.latencies_us, 0.99),
            level.refused,
            rss,
            pg,
            ratio,
            format!(
                "{}/{}/{}",
                pct(level.cpu.loadgen),
                pct(level.cpu.tether),
                pct(level.cpu.postgres)
            )
        );
    }
    Ok(())
}
