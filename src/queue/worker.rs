//! Workers: a dispatcher that claims batches into a small local buffer and runs them on up to
//! `workers.concurrency` tasks, a completer that writes outcomes back in batches, a lease extender,
//! a LISTEN task for wake-ups, a pruner, and housekeeping (ANALYZE/VACUUM of `jobs` when it changed
//! enough). One cancellation token stops them all.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rand::Rng as _;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::{self, Claim, JobState, Lease, Transition};
use super::{JobHandler, JobOutcome, JobPriority};
use crate::config::WorkerConfig;

/// Rows per pruning statement.
const PRUNE_BATCH: i64 = 1000;
/// Outcomes written back per statement at most.
const FINISH_BATCH: usize = 1000;

/// The queue as one worker process sees it: the pool, the settings and this process's lease owner
/// id.
#[derive(Clone)]
pub struct Queue {
    pool: PgPool,
    cfg: Arc<WorkerConfig>,
    owner: Uuid,
}

/// What [`Queue::run_once`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOnce {
    /// Nothing was due.
    Empty,
    /// One job ran. `applied` is false if its lease had been taken over before it finished (its
    /// outcome was then discarded).
    Ran {
        job_id: i64,
        outcome: JobOutcome,
        applied: bool,
    },
}

impl Queue {
    /// A queue handle with a fresh lease owner id.
    pub fn new(pool: PgPool, cfg: WorkerConfig) -> Queue {
        Queue {
            pool,
            cfg: Arc::new(cfg),
            owner: Uuid::new_v4(),
        }
    }

    /// The lease owner id of this handle (one per worker process).
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Claims one due job, runs it and records the outcome: one unit of work, so tests can drain
    /// the queue deterministically (docs/queue.md).
    pub async fn run_once(&self, handler: &dyn JobHandler) -> Result<RunOnce, sqlx::Error> {
        let (claims, unreadable) = store::claim(&self.pool, self.owner, 1, self.cfg.lease).await?;
        if let Some(bad) = unreadable.into_iter().next() {
            let outcome = JobOutcome::Dead { error: bad.error };
            let t = transition(&self.cfg, bad.lease, &outcome, jitter());
            let applied = store::finish(&self.pool, self.owner, &[t]).await?;
            return Ok(RunOnce::Ran {
                job_id: bad.lease.job_id,
                outcome,
                applied: !applied.is_empty(),
            });
        }
        let Some(claim) = claims.into_iter().next() else {
            return Ok(RunOnce::Empty);
        };
        let outcome = run_handler(handler, &claim).await;
        let t = transition(&self.cfg, claim.lease, &outcome, jitter());
        crate::ops::metrics::job_finished(claim.job.event.record.system, job_end(&t));
        let applied = store::finish(&self.pool, self.owner, &[t]).await?;
        Ok(RunOnce::Ran {
            job_id: claim.lease.job_id,
            outcome,
            applied: !applied.is_empty(),
        })
    }

    /// Runs [`Queue::run_once`] until nothing is due; returns the runs.
    pub async fn drain(&self, handler: &dyn JobHandler) -> Result<Vec<RunOnce>, sqlx::Error> {
        let mut runs = Vec::new();
        loop {
            match self.run_once(handler).await? {
                RunOnce::Empty => return Ok(runs),
                ran => runs.push(ran),
            }
        }
    }
}

/// Starts the workers of this process; they run until `shutdown` is cancelled, then stop
/// claiming, give in-flight jobs up to `drain` to finish, release the leases of the rest (and of
/// claimed jobs not yet started), write back what finished, and return.
pub fn start_workers(
    pool: PgPool,
    cfg: WorkerConfig,
    handler: Arc<dyn JobHandler>,
    shutdown: CancellationToken,
    drain: Duration,
) -> JoinHandle<()> {
    let queue = Queue::new(pool, cfg);
    tokio::spawn(queue.run(handler, shutdown, drain))
}

/// A finished run on its way to the database.
struct Finished {
    lease: Lease,
    outcome: JobOutcome,
    /// The job's system, for `tether_jobs_finished_total` (`None`: its event was unreadable).
    system: Option<crate::domain::SystemId>,
}

/// State shared by the dispatcher and its helpers.
struct Shared {
    queue: Queue,
    /// Every lease this process holds (buffered, running, or waiting for its outcome to be
    /// written): the extender renews exactly these.
    held: Mutex<HashMap<i64, Lease>>,
    /// Jobs whose handler is running, so that the ones cut off at shutdown can be released.
    running: Mutex<HashMap<i64, Lease>>,
    /// Wakes the dispatcher: a NOTIFY arrived, capacity freed, or outcomes were written.
    wake: Notify,
    /// Backfill jobs whose handler is running (bounded by `workers.backfill_concurrency`).
    background_running: AtomicUsize,
}

impl Queue {
    async fn run(self, handler: Arc<dyn JobHandler>, shutdown: CancellationToken, drain: Duration) {
        let cfg = self.cfg.clone();
        tracing::info!(
            owner = %self.owner,
            concurrency = cfg.concurrency,
            batch_size = cfg.batch_size,
            "queue workers started"
        );
        let shared = Arc::new(Shared {
            queue: self,
            held: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            background_running: AtomicUsize::new(0),
        });
        // Helpers stop on their own token, cancelled after the dispatcher has drained, so that
        // leases keep being extended while in-flight jobs finish.
        let helpers_stop = CancellationToken::new();
        let mut helpers = JoinSet::new();
        helpers.spawn(listen(shared.clone(), helpers_stop.clone()));
        helpers.spawn(extend_leases(shared.clone(), helpers_stop.clone()));
        helpers.spawn(prune(shared.clone(), helpers_stop.clone()));
        helpers.spawn(housekeeping(shared.clone(), helpers_stop.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(complete(shared.clone(), rx, shutdown.clone(), drain));

        dispatch(shared.clone(), handler, tx, shutdown, drain).await;

        // The dispatcher dropped its sender; the completer ends once it has written everything.
        if let Err(e) = completer.await {
            tracing::error!(error = %e, "queue completer failed");
        }
        helpers_stop.cancel();
        while helpers.join_next().await.is_some() {}
        let left: Vec<Lease> = shared
            .held
            .lock()
            .expect("lock")
            .values()
            .copied()
            .collect();
        if !left.is_empty() {
            // Outcomes that could not be written (the database is away): their leases expire and
            // the jobs run again elsewhere.
            tracing::warn!(
                jobs = left.len(),
                "stopping with unwritten outcomes; those jobs run again after their lease"
            );
        }
        tracing::info!("queue workers stopped");
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    handler: Arc<dyn JobHandler>,
    tx: mpsc::UnboundedSender<Finished>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let cfg = shared.queue.cfg.clone();
    let permits = Arc::new(Semaphore::new(cfg.concurrency));
    let mut buffer = Buffer::default();
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        // Refill the local buffer when it runs low: one claim query serves many jobs
        // (docs/queue.md); `batch_size` bounds how many leases wait here unstarted.
        let mut claimed_full = false;
        // Leases held but not yet written back (buffered, running, or waiting for the
        // completer). Without this bound a completer that falls behind (a slow database) lets
        // the dispatcher claim on and on, since no-op jobs finish at once: seen, 96,000 leases
        // held by one process, all extended in one statement.
        let outstanding = shared.held.lock().expect("lock").len();
        let room = max_outstanding(&cfg).saturating_sub(outstanding);
        if buffer.len() <= cfg.batch_size / 2 && room > 0 {
            let want = (cfg.batch_size - buffer.len()).min(room);
            match refill(&shared, &mut buffer, want, &tx).await {
                Ok(full) => {
                    backoff = Duration::from_millis(100);
                    claimed_full = full;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "claiming jobs failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        // Start what capacity allows, live work first.
        while let Some(claim) = buffer.pop() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                buffer.put_back(claim);
                break;
            };
            spawn_job(&shared, &handler, &tx, &mut tasks, claim, permit);
        }
        if claimed_full && buffer.len() <= cfg.batch_size / 2 {
            // More is probably due right now.
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(cfg.poll_interval) => {}
        }
    }

    release_unstarted(&shared, &buffer).await;
    drain_running(&shared, tasks, drain).await;
}

/// Shutdown: claimed jobs that never started go back at once.
async fn release_unstarted(shared: &Shared, buffer: &Buffer) {
    let q = &shared.queue;
    let unstarted: Vec<Lease> = buffer.leases();
    if unstarted.is_empty() {
        return;
    }
    match store::release(&q.pool, q.owner, &unstarted).await {
        Ok(n) => tracing::info!(jobs = n, "released claimed jobs that had not started"),
        Err(e) => {
            tracing::warn!(error = %e, "could not release unstarted jobs; their leases will expire")
        }
    }
    forget(shared, &unstarted);
}

/// Shutdown: in-flight jobs get the drain bound to finish; those still running are cut off and
/// their jobs released.
async fn drain_running(shared: &Shared, mut tasks: JoinSet<()>, drain: Duration) {
    let finished_in_time =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_ok();
    if finished_in_time {
        return;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let cut: Vec<Lease> = shared
        .running
        .lock()
        .expect("lock")
        .drain()
        .map(|(_, l)| l)
        .collect();
    tracing::warn!(jobs = cut.len(), bound = ?drain, "jobs still running at the shutdown bound; releasing them");
    let q = &shared.queue;
    if let Err(e) = store::release(&q.pool, q.owner, &cut).await {
        tracing::warn!(error = %e, "could not release cut-off jobs; their leases will expire")
    }
    forget(shared, &cut);
}

/// Claimed jobs waiting for a task: live and reconciliation work apart from backfill work, so a
/// live job claimed later still starts first.
#[derive(Default)]
struct Buffer {
    fore: VecDeque<Claim>,
    back: VecDeque<Claim>,
}

impl Buffer {
    fn len(&self) -> usize {
        self.fore.len() + self.back.len()
    }

    fn push(&mut self, claim: Claim) {
        if claim.job.priority.is_background() {
            self.back.push_back(claim);
        } else {
            self.fore.push_back(claim);
        }
    }

    fn pop(&mut self) -> Option<Claim> {
        self.fore.pop_front().or_else(|| self.back.pop_front())
    }

    fn put_back(&mut self, claim: Claim) {
        if claim.job.priority.is_background() {
            self.back.push_front(claim);
        } else {
            self.fore.push_front(claim);
        }
    }

    fn leases(&self) -> Vec<Lease> {
        self.fore
            .iter()
            .chain(&self.back)
            .map(|c| c.lease)
            .collect()
    }
}

/// Claims up to `want` jobs into the buffer: live and reconciliation work first; backfill work
/// only with what is left of `want`, and only as many as this process's backfill tasks have
/// room for (buffered and running backfill jobs count), so backfill never fills the buffer
/// ahead of live work or holds more leases than it can run. Returns whether the claim came back
/// full (more is probably due).
async fn refill(
    shared: &Shared,
    buffer: &mut Buffer,
    want: usize,
    tx: &mpsc::UnboundedSender<Finished>,
) -> Result<bool, sqlx::Error> {
    let q = &shared.queue;
    let fore = JobPriority::Live..=JobPriority::Reconcile;
    let (mut claims, mut unreadable) =
        store::claim_in(&q.pool, q.owner, want, q.cfg.lease, fore).await?;
    let got = claims.len() + unreadable.len();
    let background_held = buffer.back.len() + shared.background_running.load(Ordering::SeqCst);
    let background_room = q.cfg.backfill_concurrency.saturating_sub(background_held);
    if got < want && background_room > 0 {
        let back = JobPriority::Backfill..=JobPriority::Backfill;
        let limit = (want - got).min(background_room);
        let (more, bad) = store::claim_in(&q.pool, q.owner, limit, q.cfg.lease, back).await?;
        claims.extend(more);
        unreadable.extend(bad);
    }
    let full = claims.len() + unreadable.len() >= want;
    let mut held = shared.held.lock().expect("lock");
    for bad in unreadable {
        held.insert(bad.lease.job_id, bad.lease);
        let _ = tx.send(Finished {
            lease: bad.lease,
            outcome: JobOutcome::Dead { error: bad.error },
            system: None,
        });
    }
    for claim in claims {
        held.insert(claim.lease.job_id, claim.lease);
        buffer.push(claim);
    }
    Ok(full)
}

/// Runs one claimed job on its own task.
fn spawn_job(
    shared: &Arc<Shared>,
    handler: &Arc<dyn JobHandler>,
    tx: &mpsc::UnboundedSender<Finished>,
    tasks: &mut JoinSet<()>,
    claim: Claim,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let background = claim.job.priority.is_background();
    if background {
        shared.background_running.fetch_add(1, Ordering::SeqCst);
    }
    shared
        .running
        .lock()
        .expect("lock")
        .insert(claim.lease.job_id, claim.lease);
    let (shared, handler, tx) = (shared.clone(), handler.clone(), tx.clone());
    tasks.spawn(async move {
        let outcome = run_handler(handler.as_ref(), &claim).await;
        // No await between these two: an abort at shutdown either finds the job in
        // `running` (and releases it) or finds its outcome sent, never both or neither.
        shared
            .running
            .lock()
            .expect("lock")
            .remove(&claim.lease.job_id);
        let _ = tx.send(Finished {
            lease: claim.lease,
            outcome,
            system: Some(claim.job.event.record.system),
        });
        if background {
            shared.background_running.fetch_sub(1, Ordering::SeqCst);
        }
        drop(permit);
        shared.wake.notify_one();
    });
}

/// How many leases one process holds at most before its completer has written them back: a full
/// buffer, a full buffer's worth running, and two write batches.
fn max_outstanding(cfg: &WorkerConfig) -> usize {
    2 * cfg.batch_size + cfg.concurrency + 2 * FINISH_BATCH
}

fn forget(shared: &Shared, leases: &[Lease]) {
    let mut held = shared.held.lock().expect("lock");
    for l in leases {
        held.remove(&l.job_id);
    }
}

/// Runs the handler, turning a panic into a failed attempt.
async fn run_handler(handler: &dyn JobHandler, claim: &Claim) -> JobOutcome {
    match AssertUnwindSafe(handler.handle(&claim.job))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::error!(job_id = claim.job.job_id, "the job handler panicked");
            JobOutcome::Retry {
                error: "the job handler panicked".to_owned(),
            }
        }
    }
}

/// Writes outcomes back in batches. A failed write is retried (the database may be restarting);
/// after shutdown it gives up at the drain bound, and the leases expire instead.
async fn complete(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Finished>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let cfg = shared.queue.cfg.clone();
    let q = &shared.queue;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < FINISH_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let transitions: Vec<Transition> = batch
            .iter()
            .map(|f| transition(&cfg, f.lease, &f.outcome, jitter()))
            .collect();
        for (f, t) in batch.iter().zip(&transitions) {
            if let Some(system) = f.system {
                crate::ops::metrics::job_finished(system, job_end(t));
            }
        }
        let mut backoff = Duration::from_millis(50);
        let mut given_up_at: Option<Instant> = None;
        loop {
            match store::finish(&q.pool, q.owner, &transitions).await {
                Ok(applied) => {
                    if applied.len() < transitions.len() {
                        tracing::warn!(
                            lost = transitions.len() - applied.len(),
                            "some leases were taken over before their jobs finished; their outcomes were discarded"
                        );
                    }
                    forget(
                        &shared,
                        &transitions.iter().map(|t| t.lease).collect::<Vec<_>>(),
                    );
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        let since = *given_up_at.get_or_insert_with(Instant::now);
                        if since.elapsed() >= drain {
                            tracing::warn!(error = %e, jobs = transitions.len(), "giving up writing outcomes at shutdown");
                            break;
                        }
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "writing job outcomes failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        batch.clear();
        // Finished jobs may unblock the next job of their record key.
        shared.wake.notify_one();
    }
}

/// Renews every held lease at a third of the lease length, so long jobs keep theirs.
async fn extend_leases(shared: Arc<Shared>, stop: CancellationToken) {
    let q = &shared.queue;
    let every = q.cfg.lease / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leases: Vec<Lease> = shared
            .held
            .lock()
            .expect("lock")
            .values()
            .copied()
            .collect();
        if leases.is_empty() {
            continue;
        }
        match store::extend(&q.pool, q.owner, &leases, q.cfg.lease).await {
            // Leases not extended were either finished meanwhile (the usual case: the snapshot
            // above races the completer) or taken over; the completer warns about the latter.
            Ok(ids) if ids.len() < leases.len() => tracing::debug!(
                not_extended = leases.len() - ids.len(),
                "some leases were finished or taken over before they could be extended"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "extending leases failed"),
        }
    }
}

/// LISTENs for the enqueue trigger's notifications; reconnects on its own. Every (re)connection
/// wakes the dispatcher, since notifications sent meanwhile are lost.
async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(&shared.queue.pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(store::CHANNEL).await {
            tracing::debug!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        shared.wake.notify_one();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(_) => shared.wake.notify_one(),
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// How often housekeeping reads the table's activity figures (a cheap read of the statistics
/// views): a burst is analyzed about a second after its statistics arrive, not up to a minute
/// later as with autovacuum alone.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Prunes finished jobs and old events every quarter of the retention (between 1 s and 60 s).
async fn prune(shared: Arc<Shared>, stop: CancellationToken) {
    let q = &shared.queue;
    let every = (q.cfg.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Shutdown does not wait for a pruning pass; it is safe to cut one short.
        let pruned = tokio::select! {
            _ = stop.cancelled() => return,
            pruned = store::prune(&q.pool, q.cfg.retention, PRUNE_BATCH) => pruned,
        };
        match pruned {
            Ok(p) if p.jobs + p.events > 0 => {
                tracing::debug!(jobs = p.jobs, events = p.events, "pruned")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed"),
        }
    }
}

/// Every second, analyzes and vacuums `jobs` when it changed enough ([`store::housekeep`]), and
/// analyzes the engine's keyed tables that grew ([`store::analyze_keyed_tables`]). Its
/// own task, not part of pruning: under sustained load a pruning pass keeps finding a full batch
/// and runs on, and housekeeping waiting behind it did not run for whole benchmark runs.
async fn housekeeping(shared: Arc<Shared>, stop: CancellationToken) {
    let q = &shared.queue;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
        let started = Instant::now();
        // Shutdown does not wait for a VACUUM; it is safe to cut one short.
        let done = tokio::select! {
            _ = stop.cancelled() => return,
            done = store::housekeep(&q.pool) => done,
        };
        match done {
            Ok(h) if h.analyzed || h.vacuumed => tracing::debug!(
                live = h.before.live,
                dead = h.before.dead,
                modified_since_analyze = h.before.modified_since_analyze,
                analyzed = h.analyzed,
                vacuumed = h.vacuumed,
                took_ms = started.elapsed().as_millis() as u64,
                "queue housekeeping"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "queue housekeeping failed"),
        }
        let analyzed = tokio::select! {
            _ = stop.cancelled() => return,
            analyzed = store::analyze_keyed_tables(&q.pool) => analyzed,
        };
        match analyzed {
            Ok(tables) if !tables.is_empty() => tracing::debug!(?tables, "analyzed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "analyzing the engine's tables failed"),
        }
    }
}

/// How a transition ends a run, for `tether_jobs_finished_total`.
fn job_end(t: &Transition) -> crate::ops::metrics::JobEnd {
    use crate::ops::metrics::JobEnd;
    match t.state {
        store::JobState::Done => JobEnd::Done,
        store::JobState::Dead => JobEnd::Dead,
        _ if t.deferral_delta > 0 => JobEnd::Deferred,
        _ => JobEnd::Retried,
    }
}

/// A jitter factor in 0.8..1.2, so retries of a burst do not all come back at once.
fn jitter() -> f64 {
    rand::thread_rng().gen_range(0.8..1.2)
}

/// What an outcome does to a job, given its lease: the retry schedule, the deferral bound and the
/// `Retry-After` cap.
pub fn transition(
    cfg: &WorkerConfig,
    lease: Lease,
    outcome: &JobOutcome,
    jitter: f64,
) -> Transition {
    match outcome {
        JobOutcome::Done => settled(lease, JobState::Done, None),
        JobOutcome::Dead { error } => settled(lease, JobState::Dead, Some(error.clone())),
        JobOutcome::Retry { error } => failed(cfg, lease, error.clone(), jitter),
        JobOutcome::Later { after, reason } => deferred(cfg, lease, *after, reason, jitter),
    }
}

/// Done or dead at once: no delay, no counter changed.
fn settled(lease: Lease, state: JobState, error: Option<String>) -> Transition {
    Transition {
        lease,
        state,
        delay: Duration::ZERO,
        attempt_delta: 0,
        deferral_delta: 0,
        error,
    }
}

/// A failed run: ready again after the schedule's next delay, or dead after its last entry.
fn failed(cfg: &WorkerConfig, lease: Lease, error: String, jitter: f64) -> Transition {
    // `attempts` includes the run that just failed; the schedule has one entry per retry.
    let used = lease.attempts.max(1) as usize;
    match cfg.retry_schedule.get(used - 1) {
        Some(delay) => Transition {
            delay: delay.mul_f64(jitter),
            ..settled(lease, JobState::Ready, Some(error))
        },
        None => settled(lease, JobState::Dead, Some(error)),
    }
}

/// Back-pressure: ready again after `after` (or the schedule's first delay) without using up an
/// attempt, until the deferrals run out; then it counts as a failure.
fn deferred(
    cfg: &WorkerConfig,
    lease: Lease,
    after: Option<Duration>,
    reason: &str,
    jitter: f64,
) -> Transition {
    if lease.deferrals >= cfg.max_deferrals as i32 {
        let error = format!(
            "deferred {} times (the limit); last reason: {reason}",
            lease.deferrals
        );
        return failed(cfg, lease, error, jitter);
    }
    let delay = after.unwrap_or_else(|| {
        cfg.retry_schedule
            .first()
            .copied()
            .unwrap_or(Duration::from_secs(1))
            .mul_f64(jitter)
    });
    Transition {
        delay: delay.min(cfg.max_retry_after),
        // Back-pressure is not the job's fault: give back the attempt the claim took.
        attempt_delta: -1,
        deferral_delta: 1,
        ..settled(lease, JobState::Ready, Some(reason.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkerConfig {
        WorkerConfig {
            enabled: true,
            concurrency: 1,
            backfill_concurrency: 1,
            batch_size: 10,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            retry_schedule: vec![Duration::from_secs(1), Duration::from_secs(10)],
            max_deferrals: 2,
            max_retry_after: Duration::from_secs(60),
            retention: Duration::from_secs(3600),
        }
    }

    fn lease(attempts: i32, deferrals: i32) -> Lease {
        Lease {
            job_id: 1,
            claims: 1,
            attempts,
            deferrals,
        }
    }

    fn retry() -> JobOutcome {
        JobOutcome::Retry {
            error: "boom".into(),
        }
    }

    #[test]
    fn retries_follow_the_schedule_with_jitter_then_dead() {
        let c = cfg();
        let t = transition(&c, lease(1, 0), &retry(), 1.1);
        assert_eq!(
            (t.state, t.delay),
            (JobState::Ready, Duration::from_millis(1100))
        );
        let t = transition(&c, lease(2, 0), &retry(), 0.9);
        assert_eq!(
            (t.state, t.delay),
            (JobState::Ready, Duration::from_secs(9))
        );
        let t = transition(&c, lease(3, 0), &retry(), 1.0);
        assert_eq!(t.state, JobState::Dead);
        assert_eq!(t.error.as_deref(), Some("boom"));
    }

    #[test]
    fn later_gives_back_the_attempt_and_caps_retry_after() {
        let c = cfg();
        let later = JobOutcome::Later {
            after: Some(Duration::from_secs(3600)),
            reason: "429".into(),
        };
        let t = transition(&c, lease(1, 0), &later, 1.0);
        assert_eq!(t.state, JobState::Ready);
        assert_eq!(t.delay, c.max_retry_after);
        assert_eq!((t.attempt_delta, t.deferral_delta), (-1, 1));
        // At the deferral bound it counts as a failure.
        let t = transition(&c, lease(3, 2), &later, 1.0);
        assert_eq!(t.state, JobState::Dead);
        assert!(t.error.unwrap().contains("deferred 2 times"));
    }
}
