//! The chaos suite (issue 19; README "Chaos suite"): replicas of `tether serve` behind a private
//! nginx, the Zendesk, PowerOffice Go, Exact Online and Custom ERP simulators with faults, a
//! steady workload, SIGKILLs, a PostgreSQL restart and a rolling SIGTERM restart; then one line
//! per checked property and a summary. Exit 0 only if every property held.
//!
//! `tether-chaos` runs the full version (10,000 changes); `--short` the CI version (~2 minutes).
//! Needs PostgreSQL's server binaries and nginx (`scripts/chaos.sh` installs nginx-light).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tether::chaos::run::{self, Options};
use tether::chaos::workload::Plan;

#[derive(Parser, Debug)]
#[command(
    name = "tether-chaos",
    about = "Tether under faults at scale (issue 19)"
)]
struct Args {
    /// The CI version: fewer changes, the same faults, about two minutes.
    #[arg(long)]
    short: bool,
    /// Replicas of `tether serve` behind nginx.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Changes to make (default 10,000; 600 with --short).
    #[arg(long)]
    changes: Option<u64>,
    /// Changes a second.
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Seconds between two SIGKILLs of a random replica.
    #[arg(long, default_value_t = 5)]
    kill_every: u64,
    /// No SIGKILLs or restarts (the simulators' faults stay): a baseline.
    #[arg(long)]
    no_faults: bool,
    /// The `tether` binary (default: the one next to this program).
    #[arg(long)]
    tether: Option<PathBuf>,
    /// Keep the working directory (replica logs, nginx, configuration) after a passing run.
    #[arg(long)]
    keep: bool,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 19)]
    seed: u64,
}

impl Args {
    fn options(&self) -> Options {
        let changes = self
            .changes
            .unwrap_or(if self.short { 600 } else { 10_000 });
        Options {
            replicas: self.replicas.max(1),
            plan: Plan {
                changes,
                rate: self.rate,
                cooldown: Duration::from_secs(20),
                poweroffice_rate: 2.0,
                exact_per_minute: 4.0,
                seed: self.seed,
            },
            faults: !self.no_faults,
            kill_every: Duration::from_secs(self.kill_every.max(1)),
            converge_within: Duration::from_secs(if self.short { 180 } else { 600 }),
            quiet: Duration::from_secs(if self.short { 10 } else { 20 }),
            tether: self.tether.clone(),
            keep: self.keep,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let options = args.options();
    let work = std::env::temp_dir().join(format!("tether-chaos-{}", std::process::id()));
    println!("[setup] working directory {}", work.display());
    let outcome = run::run(options.clone(), &work).await;
    match outcome {
        Err(e) => {
            eprintln!("tether-chaos: the run could not be carried out: {e:#}");
            println!("logs kept in {}", work.display());
            ExitCode::from(2)
        }
        Ok(outcome) => {
            for finding in &outcome.findings {
                println!("{}", finding.line());
            }
            println!("{}", outcome.summary);
            if outcome.held() && !options.keep {
                let _ = std::fs::remove_dir_all(&work);
            } else {
                println!("logs kept in {}", work.display());
            }
            if outcome.held() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
