//! The command line (`tether --help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Database;

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Keeps Zendesk and your business systems in sync, both ways."
)]
pub struct Cli {
    /// Configuration file (TOML). Every key can also be set as TETHER_<SECTION>__<KEY>.
    #[arg(long, global = true, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: webhooks, health checks and the sync workers.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Jobs that failed for good: list them, or put them back in the queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead-lettered jobs with their last error.
    List,
    /// Put dead-lettered jobs back in the queue with all their attempts.
    Retry {
        /// The job id (from `tether dead-letters list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(config.log_format, &config.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::DeadLetters(cmd) => dead_letters(config, cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error.cause_chain = ?e, "tether stopped: {e:#}");
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    let db = Database::open(&config).await?;
    let result = crate::db::migrate(&db.pool)
        .await
        .context("migrations failed");
    db.close().await;
    result?;
    tracing::info!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(config: Config, cmd: DeadLetters) -> anyhow::Result<ExitCode> {
    let db = Database::open(&config).await?;
    let result = dead_letters_on(&db.pool, cmd).await;
    db.close().await;
    result
}

async fn dead_letters_on(pool: &sqlx::PgPool, cmd: DeadLetters) -> anyhow::Result<ExitCode> {
    use crate::queue::store;
    match cmd {
        DeadLetters::List => {
            let letters = store::dead_letters(pool)
                .await
                .context("cannot read the dead letters")?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for d in letters {
                println!(
                    "{}\tevent {}\t{}\tattempts {}\tdeferrals {}\t{}\t{}",
                    d.id,
                    d.event_id,
                    d.record_key,
                    d.attempts,
                    d.deferrals,
                    d.finished_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    d.last_error.unwrap_or_default().replace('\n', " ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetters::Retry { id, all } => {
            let id = if all { None } else { id };
            let ids = store::retry_dead(pool, id)
                .await
                .context("cannot retry dead letters")?;
            match (id, ids.len()) {
                (Some(id), 0) => {
                    eprintln!(
                        "tether: job {id} is not a dead letter (see `tether dead-letters list`)"
                    );
                    Ok(ExitCode::from(1))
                }
                (_, n) => {
                    println!("{n} dead letter(s) put back in the queue");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

/// Stands in for the sync engine until it is wired: every job is dead-lettered with a message
/// saying why, so nothing pretends to have been synced and `tether dead-letters retry --all`
/// replays them once the engine is there.
struct NoSyncEngine;

#[async_trait::async_trait]
impl crate::queue::JobHandler for NoSyncEngine {
    async fn handle(&self, _job: &crate::queue::ClaimedJob) -> crate::queue::JobOutcome {
        crate::queue::JobOutcome::Dead {
            error: "no sync engine configured".to_owned(),
        }
    }
}

/// `tether serve`: runs until SIGTERM/SIGINT, then shuts down within `shutdown_timeout`.
pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());

    let db = Database::open(&config).await?;
    crate::db::migrate(&db.pool)
        .await
        .context("migrations failed")?;

    let mut tasks = tokio::task::JoinSet::new();
    if config.http.enabled {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(address = %listener.local_addr()?, "listening");
        let state = crate::http::AppState {
            pool: db.pool.clone(),
            config: config.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(async move {
            if let Err(e) = crate::http::serve(listener, state).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }

    if config.workers.enabled {
        // The workers get most of the shutdown bound to drain in-flight jobs, keeping some to
        // release the leases of the rest and write outcomes back.
        let drain = config.shutdown_timeout.mul_f64(0.8);
        let workers = crate::queue::start_workers(
            db.pool.clone(),
            config.workers.clone(),
            Arc::new(NoSyncEngine),
            shutdown.clone(),
            drain,
        );
        tasks.spawn(async move {
            if let Err(e) = workers.await {
                tracing::error!(error = %e, "queue workers failed");
            }
        });
    }

    shutdown.cancelled().await;
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout = ?config.shutdown_timeout,
            "shutdown bound reached; leaving the rest (unfinished jobs are released by their leases)"
        );
        tasks.abort_all();
    }
    db.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
