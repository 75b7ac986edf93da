//! Following a running plan: a progress bar with rate and ETA on a terminal, plain progress
//! lines otherwise. Following only reads; stopping it (Ctrl-C) leaves the work to the workers.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::report::duration;
use super::store::{self, Progress};

/// How following ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    /// Every item is carried out or failed for good.
    Finished(Progress),
    /// Stopped following (Ctrl-C); the workers go on.
    Stopped(Progress),
}

/// How progress is shown.
enum Display {
    Bar(ProgressBar),
    Lines {
        every: Duration,
        last: Option<Instant>,
    },
}

impl Display {
    fn new(total: u64) -> Display {
        if !std::io::stderr().is_terminal() {
            return Display::Lines {
                every: Duration::from_secs(2),
                last: None,
            };
        }
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} records  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Display::Bar(bar)
    }

    fn show(&mut self, plan: i64, p: &Progress, started: Instant, at_start: u64) {
        let passed = p.done + p.failed;
        match self {
            Display::Bar(bar) => {
                bar.set_length(p.total);
                bar.set_position(passed);
                if p.failed > 0 {
                    bar.set_message(format!("{} failed", p.failed));
                }
            }
            Display::Lines { every, last } => {
                if last.is_some_and(|l| l.elapsed() < *every) && !p.finished() {
                    return;
                }
                *last = Some(Instant::now());
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let rate = passed.saturating_sub(at_start) as f64 / secs;
                let eta = if rate > 0.0 {
                    duration(((p.total - passed.min(p.total)) as f64 / rate) as u64)
                } else {
                    "unknown".into()
                };
                eprintln!(
                    "backfill plan {plan}: {passed}/{} records ({} failed), {rate:.0}/s, ETA {eta}",
                    p.total, p.failed
                );
            }
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Shows the plan's progress every `interval` until it is finished or `stop` is cancelled.
pub async fn follow(
    pool: &PgPool,
    plan: i64,
    stop: &CancellationToken,
    interval: Duration,
) -> Result<Followed, sqlx::Error> {
    let first = store::progress(pool, plan).await?;
    let started = Instant::now();
    let at_start = first.done + first.failed;
    let mut display = Display::new(first.total);
    let mut current = first;
    loop {
        display.show(plan, &current, started, at_start);
        if current.finished() {
            display.finish();
            return Ok(Followed::Finished(current));
        }
        tokio::select! {
            _ = stop.cancelled() => {
                display.finish();
                return Ok(Followed::Stopped(current));
            }
            _ = tokio::time::sleep(interval) => {}
        }
        current = store::progress(pool, plan).await?;
    }
}
