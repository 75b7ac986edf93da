//! `tether guard list|release|discard` and `tether undo` (docs/guard.md).

use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::json;
use sqlx::PgPool;

use super::held::{self, TrippedFlow};
use super::undo::{self, Action, UndoPlan};
use crate::config::Config;
use crate::registry::{Dataflow, Registry};

#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// The flows the guard paused, why, and the writes each holds (record, property, old, new).
    List {
        /// Only this flow, by id: `zendesk.Organizations->customerp.Customer`.
        #[arg(long = "flow", value_name = "ID")]
        flow: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Send the flow's held writes (in order, planned again against the records as they are now)
    /// and let the flow run again with a fresh window.
    Release { flow: String },
    /// Drop the flow's held writes (each logged as `discarded`; links left as they were) and let
    /// the flow run again.
    Discard { flow: String },
}

/// `tether undo`: write back what a flow's writes replaced.
#[derive(Debug, Args)]
pub struct UndoArgs {
    /// The flow whose writes to undo, by id.
    #[arg(long = "flow", value_name = "ID")]
    pub flow: String,
    /// Undo the writes made since then: an RFC 3339 time (`2026-12-04T06:00:00Z`) or a span
    /// back from now (`30m`, `2h`).
    #[arg(long, value_name = "TIME")]
    pub since: String,
    /// Show the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why a command was refused before it did anything.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("`{0}` is not a dataflow of the registry; `tether registry export` lists them (ids look like `zendesk.Organizations->customerp.Customer`)")]
    UnknownFlow(String),
    #[error(
        "`--since {0}` is neither an RFC 3339 time (2026-12-04T06:00:00Z) nor a span such as 30m"
    )]
    Since(String),
}

fn flow_of<'r>(registry: &'r Registry, id: &str) -> Result<&'r Dataflow, CommandError> {
    registry
        .dataflows
        .iter()
        .find(|f| f.id == id)
        .ok_or_else(|| CommandError::UnknownFlow(id.to_owned()))
}

/// `--since`: a time, or a span back from `now`.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, CommandError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let span = crate::config::parse_duration(text).map_err(|_| CommandError::Since(text.into()))?;
    let span = chrono::Duration::from_std(span).map_err(|_| CommandError::Since(text.into()))?;
    Ok(now - span)
}

pub async fn run_guard(
    pool: &PgPool,
    registry: &Registry,
    cmd: GuardCommand,
) -> anyhow::Result<ExitCode> {
    crate::db::migrate(pool)
        .await
        .context("migrations failed")?;
    match cmd {
        GuardCommand::List { flow, json } => {
            if let Some(id) = &flow {
                flow_of(registry, id)?;
            }
            let flows = held::list(pool, flow.as_deref()).await?;
            if json {
                println!("{}", json!({ "flows": flows }));
            } else {
                print_list(&flows);
            }
        }
        GuardCommand::Release { flow } => {
            flow_of(registry, &flow)?;
            let done = held::release(pool, &flow).await?;
            println!(
                "{flow}: released {} held write(s); {} event(s) queued again, planned against the records as they are now",
                done.writes, done.events
            );
        }
        GuardCommand::Discard { flow } => {
            flow_of(registry, &flow)?;
            let done = held::discard(pool, &flow).await?;
            println!(
                "{flow}: discarded {} held write(s), each logged as `discarded`; the flow runs again",
                done.writes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_list(flows: &[TrippedFlow]) {
    if flows.is_empty() {
        println!("no dataflow is paused by the guard");
    }
    for f in flows {
        println!(
            "{} — paused {}: {}",
            f.flow,
            f.tripped_at.to_rfc3339(),
            f.reason
        );
        for h in &f.held {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref().map_or("(none)".to_owned(), ToString::to_string)
            };
            let what = if h.create { " (create)" } else { "" };
            println!(
                "  {}{what} {}: {} -> {}",
                h.record,
                h.property,
                show(&h.old),
                show(&h.new)
            );
        }
    }
}

pub async fn run_undo(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
    args: UndoArgs,
) -> anyhow::Result<ExitCode> {
    crate::db::migrate(pool)
        .await
        .context("migrations failed")?;
    let flow = flow_of(registry, &args.flow)?;
    let since = parse_since(&args.since, Utc::now())?;
    let connectors = crate::service::build_connectors(config, pool)?;
    let plan = undo::plan(pool, &connectors, flow, since).await?;
    if args.json {
        println!("{}", serde_json::to_string(&plan)?);
    } else {
        print_undo(&plan);
    }
    if args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let done = undo::carry_out(pool, &connectors, flow, &plan).await?;
    println!(
        "undone: {} value(s) written back on {} record(s)",
        done.values, done.records
    );
    Ok(ExitCode::SUCCESS)
}

fn print_undo(plan: &UndoPlan) {
    let restore = plan.items.iter().filter(|i| i.action == Action::Restore);
    println!(
        "undo {} since {}: {} value(s) to write back",
        plan.flow,
        plan.since.to_rfc3339(),
        restore.count()
    );
    for i in &plan.items {
        let what = match &i.action {
            Action::Restore => format!("{} -> {}", i.written, i.restore),
            Action::ChangedSince { now } => {
                format!(
                    "left as it is: changed to {now} after the flow wrote {}",
                    i.written
                )
            }
            Action::AlreadyRestored => format!("already {}", i.restore),
        };
        println!("  {} {}: {what}", i.record, i.property);
    }
    if plan.created_not_undone > 0 {
        println!(
            "  {} record(s) the flow created since then stay (undo does not delete)",
            plan.created_not_undone
        );
    }
    for gone in &plan.gone {
        println!("  {gone}: gone, nothing to write back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_time_or_a_span_back() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T06:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_since("2026-12-04T05:00:00+00:00", now).unwrap(),
            now - chrono::Duration::hours(1)
        );
        assert_eq!(
            parse_since("30m", now).unwrap(),
            now - chrono::Duration::minutes(30)
        );
        assert!(matches!(
            parse_since("yesterday", now),
            Err(CommandError::Since(_))
        ));
    }
}
