//! The fault schedule of a chaos run: a random replica SIGKILLed and restarted every few seconds,
//! PostgreSQL restarted once, and one rolling SIGTERM restart of every replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::cluster::{Exit, Replicas};
use crate::db::embedded::EmbeddedPostgres;

/// When the faults come, measured from the start of the workload.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Pause between two SIGKILLs (`None`: no kills).
    pub kill_every: Option<Duration>,
    /// When PostgreSQL is stopped and started again (`None`: never).
    pub postgres_restart_at: Option<Duration>,
    /// When the rolling SIGTERM restart begins (`None`: never).
    pub rolling_restart_at: Option<Duration>,
    /// No fault starts after this.
    pub until: Duration,
}

/// What the schedule did.
#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    pub kills: u32,
    pub postgres_restarts: u32,
    pub rolling_restarts: u32,
    /// Replicas that exited non-zero or not within the grace time after a SIGTERM.
    pub unclean_exits: u32,
    /// Replicas a SIGTERM ended while they were still starting (before the handler).
    pub ended_while_starting: u32,
    /// When the last fault ended (every replica ready again after it).
    pub last_fault_end: Option<Instant>,
}

/// How long a replica gets to exit after SIGTERM (its `shutdown_timeout` is 10 s).
const TERM_GRACE: Duration = Duration::from_secs(20);
/// How long a replica may take to become ready after a restart.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// Runs the schedule from now; returns the replicas (all running and ready) and what it did.
pub async fn run(
    mut replicas: Replicas,
    postgres: Arc<EmbeddedPostgres>,
    schedule: Schedule,
) -> anyhow::Result<(Replicas, FaultLog)> {
    let start = Instant::now();
    let mut log = FaultLog::default();
    let mut next_kill = schedule.kill_every.map(|every| start + every);
    let (mut pg_due, mut rolling_due) = (schedule.postgres_restart_at, schedule.rolling_restart_at);
    while start.elapsed() < schedule.until {
        let elapsed = start.elapsed();
        if pg_due.is_some_and(|at| elapsed >= at) {
            pg_due = None;
            restart_postgres(&postgres).await?;
            log.postgres_restarts += 1;
            println!("[faults] PostgreSQL restarted at {:.0?}", elapsed);
        } else if rolling_due.is_some_and(|at| elapsed >= at) {
            rolling_due = None;
            rolling_restart(&mut replicas, &mut log).await?;
            log.rolling_restarts += 1;
            println!(
                "[faults] rolling SIGTERM restart done at {:.0?}",
                start.elapsed()
            );
        } else if next_kill.is_some_and(|at| Instant::now() >= at) {
            let i = rand::thread_rng().gen_range(0..replicas.len());
            replicas.kill(i).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            replicas.spawn(i)?;
            log.kills += 1;
            next_kill = schedule.kill_every.map(|every| Instant::now() + every);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        log.last_fault_end = Some(Instant::now());
    }
    for i in 0..replicas.len() {
        replicas.wait_ready(i, READY_WITHIN).await?;
    }
    if log.last_fault_end.is_some() {
        log.last_fault_end = Some(Instant::now());
    }
    Ok((replicas, log))
}

/// A fast stop (open transactions rolled back, connections cut) and a start a second later.
async fn restart_postgres(postgres: &EmbeddedPostgres) -> anyhow::Result<()> {
    postgres.stop().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.restart().await?;
    Ok(())
}

/// SIGTERM to each replica in turn, started again and ready before the next one goes, as a
/// deployment rolls; counts the exits that were not clean.
async fn rolling_restart(replicas: &mut Replicas, log: &mut FaultLog) -> anyhow::Result<()> {
    for i in 0..replicas.len() {
        match replicas.terminate(i, TERM_GRACE).await? {
            Exit::Clean => {}
            Exit::Signalled => log.ended_while_starting += 1,
            other => {
                log.unclean_exits += 1;
                println!("[faults] replica {i} after SIGTERM: {other:?}");
            }
        }
        replicas.spawn(i)?;
        replicas.wait_ready(i, READY_WITHIN).await?;
    }
    Ok(())
}
