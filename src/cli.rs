//! The command line (`tether --help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Database;
use crate::domain::SystemId;
use crate::registry::{self, Severity};

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
    /// Everything on one machine: embedded PostgreSQL, a simulator of each of the six systems,
    /// and the service wired to them, with a few records already in the source systems.
    Sandbox {
        /// Walk every dataflow once, print a report and exit (0 only if every flow behaved).
        #[arg(long)]
        demo: bool,
    },
    /// Inspect the mapping registry (the shipped dataflows plus `registry.overlay`). Needs no database.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Inspect links between records.
    Links {
        #[command(subcommand)]
        command: LinksCommand,
    },
    /// Jobs that failed for good: list them, or put them back in the queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
    /// Register, inspect and remove the vendor-side webhooks that send Tether changes.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Load the records that existed before Tether: plan (reviewed first), run, status.
    #[command(subcommand)]
    Backfill(crate::backfill::command::BackfillCommand),
    /// Hand a running installation a new refresh token (read from standard input) without a
    /// restart.
    #[command(subcommand)]
    Credentials(crate::credentials::CredentialsCommand),
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Create (or update, found by its endpoint `<public_url>/webhooks/<system>`) the webhook,
    /// subscribed to the events the enabled dataflows need, and store its signing secret.
    Install { system: SystemId },
    /// The vendor's view of the installed webhooks and when Tether last received a delivery.
    Status { system: SystemId },
    /// Remove the webhooks install created (only those) and forget their secrets.
    Uninstall { system: SystemId },
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Validate the registry against the connectors; print every finding with file and line.
    /// Exits 1 on errors, 0 when there are only warnings.
    Check,
    /// Print the effective registry as JSON.
    Export,
}

#[derive(Debug, Subcommand)]
pub enum LinksCommand {
    /// A record's links (active and ended) and their whole history of sync decisions.
    Show {
        /// zendesk, exactonline, poweroffice, crmoffice, customerp or custompms.
        system: crate::domain::SystemId,
        /// The registry's entity type (`Organizations`, `Customers`, ...).
        entity_type: String,
        /// The record's id in that system.
        id: String,
    },
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
    // People read the sandbox's output: readable lines unless JSON was asked for.
    let default_format = match cli.command {
        Command::Sandbox { .. } => crate::config::LogFormat::Text,
        _ => crate::config::LogFormat::Json,
    };
    crate::telemetry::init(
        config.log_format.unwrap_or(default_format),
        &config.log_level,
    );
    if let Command::Registry { command } = &cli.command {
        return registry_command(command, &config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::Sandbox { demo } => crate::sandbox::run(&config, demo).await,
            Command::Registry { .. } => unreachable!("handled before the runtime starts"),
            Command::Links {
                command:
                    LinksCommand::Show {
                        system,
                        entity_type,
                        id,
                    },
            } => links_show(config, system, entity_type, id).await,
            Command::DeadLetters(cmd) => dead_letters(config, cmd).await,
            Command::Webhooks(cmd) => webhooks_command(config, cmd).await,
            Command::Backfill(cmd) => backfill_command(config, cmd).await,
            Command::Credentials(cmd) => {
                let db = Database::open(&config).await?;
                let result = crate::credentials::run(&config, &db.pool, cmd).await;
                db.close().await;
                result
            }
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

/// Whether the configuration connects a system (has its section).
fn connected(config: &Config, system: SystemId) -> bool {
    config.systems.is_connected(system)
}

/// `tether registry check|export`: pure file work, no runtime and no database.
fn registry_command(command: &RegistryCommand, config: &Config) -> ExitCode {
    let overlay = config.registry.overlay.as_deref();
    let (registry, mut findings) = match registry::load::read(overlay) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    match command {
        RegistryCommand::Check => {
            findings.extend(registry::check::idle_systems(&registry, |s| {
                connected(config, s)
            }));
            for finding in &findings {
                println!("{finding}");
            }
            println!(
                "{} dataflows, {} property mappings: {errors} error(s), {} warning(s).",
                registry.dataflows.len(),
                registry
                    .dataflows
                    .iter()
                    .map(|f| f.properties.len())
                    .sum::<usize>(),
                findings.len() - errors
            );
        }
        RegistryCommand::Export => {
            if errors == 0 {
                println!("{}", registry::export::to_json(&registry));
            } else {
                for finding in findings.iter().filter(|f| f.severity == Severity::Error) {
                    eprintln!("{finding}");
                }
                eprintln!(
                    "the registry has errors; nothing exported (see `tether registry check`)"
                );
            }
        }
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn links_show(
    config: Config,
    system: crate::domain::SystemId,
    entity_type: String,
    id: String,
) -> anyhow::Result<ExitCode> {
    let db = Database::open(&config).await?;
    let key = crate::domain::RecordKey {
        system,
        entity_type,
        record_id: id,
    };
    let result = async {
        // A read-only command: it never migrates, it says what to do instead.
        let migrated: bool = sqlx::query_scalar("SELECT to_regclass('links') IS NOT NULL")
            .fetch_one(&db.pool)
            .await?;
        if !migrated {
            anyhow::bail!("the database is not migrated: run `tether migrate` first");
        }
        Ok(crate::sync::history::render(&db.pool, &key).await?)
    }
    .await;
    db.close().await;
    print!("{}", result.context("cannot read the record's links")?);
    Ok(ExitCode::SUCCESS)
}

/// `tether webhooks ...`: migrates first (install writes the registrations table).
async fn webhooks_command(config: Config, cmd: WebhooksCommand) -> anyhow::Result<ExitCode> {
    let (registry, _) = registry::load(config.registry.overlay.as_deref())
        .context("the mapping registry cannot be used")?;
    let db = Database::open(&config).await?;
    let result = async {
        crate::db::migrate(&db.pool).await.context("migrations failed")?;
        use crate::webhooks::{self, Removed};
        match cmd {
            WebhooksCommand::Install { system } => {
                let installed = webhooks::install(&config, &db.pool, &registry, system).await?;
                println!("{installed}");
            }
            WebhooksCommand::Status { system } => {
                println!("{}", webhooks::status(&config, &db.pool, system).await?);
            }
            WebhooksCommand::Uninstall { system } => {
                let removed = webhooks::uninstall(&config, &db.pool, system).await?;
                if removed.is_empty() {
                    println!("{system}: nothing installed by Tether");
                }
                for r in removed {
                    match r {
                        Removed::Deleted(id) => println!("{system} webhook {id} deleted"),
                        Removed::LeftInPlace(id) => println!(
                            "{system} webhook {id} existed before Tether took it over: left in place, forgotten here"
                        ),
                    }
                }
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    }
    .await;
    db.close().await;
    result
}

/// `tether backfill ...` (docs/backfill.md).
async fn backfill_command(
    config: Config,
    cmd: crate::backfill::command::BackfillCommand,
) -> anyhow::Result<ExitCode> {
    let (registry, _) = registry::load(config.registry.overlay.as_deref())
        .context("the mapping registry cannot be used")?;
    let db = Database::open(&config).await?;
    let result = crate::backfill::command::run(&config, &db.pool, &registry, cmd).await;
    db.close().await;
    result
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

/// `tether serve`: runs until SIGTERM/SIGINT, then shuts down within `shutdown_timeout`.
pub async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    // The registry first: a registry with errors must not run, and that needs no database.
    let (registry, warnings) = registry::load(config.registry.overlay.as_deref())
        .context("the mapping registry cannot be used")?;
    let idle = registry::check::idle_systems(&registry, |s| connected(&config, s));
    for finding in warnings.iter().chain(&idle) {
        let location = finding
            .location
            .as_ref()
            .map_or_else(|| "configuration".to_owned(), |l| l.to_string());
        tracing::warn!(%location, "registry: {}", finding.message);
    }
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());

    let db = Database::open(&config).await?;
    crate::db::migrate(&db.pool)
        .await
        .context("migrations failed")?;
    let listener = if config.http.enabled {
        Some(
            tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        )
    } else {
        None
    };
    let result = crate::service::run(
        config.clone(),
        db.pool.clone(),
        Arc::new(registry),
        listener,
        shutdown,
    )
    .await;
    db.close().await;
    result?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
