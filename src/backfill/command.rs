//! `tether backfill plan|run|status`: the operator's side of a backfill (docs/backfill.md).
//! Planning reads both systems and stores the plan; running enqueues it once and follows the
//! workers of `tether serve` as they carry it out; status shows where a plan stands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::follow::{self, Followed};
use super::store::{self, Enqueued};
use super::{plan, report};
use crate::config::Config;
use crate::registry::Registry;

#[derive(Debug, Subcommand)]
pub enum BackfillCommand {
    /// Read every record of both sides of each enabled flow whose systems are connected, match
    /// them by the flow's merge criteria and store a plan to review. Writes nothing to a vendor.
    Plan {
        /// Only this flow (repeatable), by id: `zendesk.Organizations->customerp.Customer`.
        #[arg(long = "flow", value_name = "ID")]
        flows: Vec<String>,
        /// Print the summary as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write every record's verdict to this CSV file.
        #[arg(long, value_name = "FILE")]
        csv: Option<PathBuf>,
    },
    /// Carry a plan out through the service's workers, and follow it to the end (Ctrl-C stops
    /// following, not the work). Running a plan again only follows it.
    Run {
        /// The plan's id (printed by `tether backfill plan`).
        plan: i64,
        /// Enqueue and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Where a plan stands (the newest plan without an id).
    Status { plan: Option<i64> },
}

/// Runs the command; migrates first (planning writes the plan tables).
pub async fn run(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
    cmd: BackfillCommand,
) -> anyhow::Result<ExitCode> {
    crate::db::migrate(pool)
        .await
        .context("migrations failed")?;
    match cmd {
        BackfillCommand::Plan { flows, json, csv } => {
            make_plan(config, pool, registry, &flows, json, csv).await
        }
        BackfillCommand::Run { plan, detach } => run_plan(pool, plan, detach).await,
        BackfillCommand::Status { plan } => status(pool, plan).await,
    }
}

async fn make_plan(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
    flows: &[String],
    json: bool,
    csv: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let summary = match plan::make_and_store(config, pool, registry, flows).await {
        Ok(summary) => summary,
        Err(e @ (plan::PlanError::UnknownFlow(_) | plan::PlanError::FlowNotRunnable { .. })) => {
            eprintln!("tether: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e).context("no plan was made"),
    };
    let id = summary.plan;
    if let Some(path) = csv {
        let items = store::items(pool, id).await?;
        std::fs::write(&path, report::csv(&items)).with_context(|| {
            format!(
                "plan {id} is stored, but {} cannot be written",
                path.display()
            )
        })?;
    }
    if json {
        println!("{}", report::json(&summary));
    } else {
        print!("{}", report::table(&summary));
        println!("\nreview it, then: tether backfill run {id}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_plan(pool: &PgPool, plan: i64, detach: bool) -> anyhow::Result<ExitCode> {
    match store::enqueue(pool, plan).await? {
        Enqueued::NoPlan => {
            eprintln!("tether: there is no backfill plan {plan} (`tether backfill status` shows the newest)");
            return Ok(ExitCode::from(2));
        }
        Enqueued::Now(n) => eprintln!(
            "backfill plan {plan}: {n} record(s) queued for the workers of `tether serve`"
        ),
        Enqueued::Before => eprintln!("backfill plan {plan} was queued before; following it"),
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    // Ctrl-C stops following only: the jobs are in the queue and the workers go on.
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    match follow::follow(pool, plan, &stop, Duration::from_millis(500)).await? {
        Followed::Finished(p) => {
            eprintln!(
                "backfill plan {plan}: finished, {} carried out, {} failed",
                p.done, p.failed
            );
            Ok(if p.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Followed::Stopped(p) => {
            eprintln!(
                "stopped following plan {plan} at {}/{}; the workers go on (`tether backfill status {plan}`)",
                p.done + p.failed,
                p.total
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn status(pool: &PgPool, plan: Option<i64>) -> anyhow::Result<ExitCode> {
    let id = match plan {
        Some(id) => id,
        None => match store::latest(pool).await? {
            Some(id) => id,
            None => {
                println!("no backfill plan yet (`tether backfill plan` makes one)");
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let Some(summary) = store::summary(pool, id).await? else {
        eprintln!("tether: there is no backfill plan {id}");
        return Ok(ExitCode::from(2));
    };
    let progress = store::progress(pool, id).await?;
    let decisions = store::decisions(pool, id).await?;
    print!("{}", report::status(&summary, &progress, &decisions));
    Ok(ExitCode::SUCCESS)
}
