//! The work queue on a real PostgreSQL: deterministic draining, leases, retries and dead letters,
//! deferrals, per-record order, shutdown, wake-up, pruning, housekeeping (ANALYZE/VACUUM) and the
//! claim plan after a burst, and the reliability runs with worker
//! processes (`tether-queue-probe`) that are killed, run three at a time, or see the database
//! restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use tether::config::WorkerConfig;
use tether::domain::{Action, ChangeEvent, RecordKey, SystemId};
use tether::queue::{
    self, store, ClaimedJob, JobHandler, JobOutcome, JobPriority, NewJob, Queue, RunOnce,
};
use tether::testing;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::eventually;

fn cfg() -> WorkerConfig {
    WorkerConfig {
        enabled: true,
        concurrency: 8,
        backfill_concurrency: 1,
        batch_size: 20,
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
        retry_schedule: vec![Duration::ZERO, Duration::ZERO],
        max_deferrals: 3,
        max_retry_after: Duration::from_secs(600),
        retention: Duration::from_secs(3600),
    }
}

/// Stores events for `(record_id, seq)` pairs and enqueues their jobs, `chunk` per transaction.
/// The delivery id is `"{record_id}:{seq}"`. Returns the ids of all jobs in the table, in order.
pub(crate) async fn enqueue(pool: &PgPool, items: &[(String, i64)], chunk: usize) -> Vec<i64> {
    enqueue_at(pool, items, chunk, JobPriority::Live).await
}

/// [`enqueue`] at a priority.
async fn enqueue_at(
    pool: &PgPool,
    items: &[(String, i64)],
    chunk: usize,
    priority: JobPriority,
) -> Vec<i64> {
    for part in items.chunks(chunk.max(1)) {
        let mut tx = pool.begin().await.unwrap();
        let events: Vec<ChangeEvent> = part
            .iter()
            .map(|(record_id, seq)| ChangeEvent {
                record: RecordKey {
                    system: SystemId::CustomErp,
                    entity_type: "Customer".into(),
                    record_id: record_id.clone(),
                },
                action: Action::Updated,
                occurred_at: None,
                delivery_id: format!("{record_id}:{seq}"),
            })
            .collect();
        let event_ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events (system, entity_type, record_id, action, delivery_id)
             SELECT 'customerp', 'Customer', r, 'updated', d
             FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u(r, d, n) ORDER BY n
             RETURNING id",
        )
        .bind(
            events
                .iter()
                .map(|e| e.record.record_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.delivery_id.clone())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let jobs: Vec<NewJob> = event_ids
            .iter()
            .zip(&events)
            .map(|(&event_id, event)| NewJob { event_id, event })
            .collect();
        queue::enqueue_with_priority(&mut tx, &jobs, priority)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query_scalar("SELECT id FROM jobs ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Answers with a fixed outcome and counts calls.
struct Fixed(JobOutcome, AtomicUsize);

impl Fixed {
    fn new(outcome: JobOutcome) -> Fixed {
        Fixed(outcome, AtomicUsize::new(0))
    }
}

#[async_trait::async_trait]
impl JobHandler for Fixed {
    async fn handle(&self, _job: &ClaimedJob) -> JobOutcome {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.clone()
    }
}

pub(crate) async fn job_row(pool: &PgPool, id: i64) -> (String, i32, i32, Option<String>) {
    sqlx::query_as("SELECT state, attempts, deferrals, last_error FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn all_done(pool: &PgPool, total: i64) -> bool {
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'done'")
        .fetch_one(pool)
        .await
        .unwrap_or(0);
    done == total
}

#[tokio::test]
async fn run_once_drains_deterministically() {
    let db = testing::database().await;
    let items: Vec<_> = (0..3).map(|i| (format!("r{i}"), 1)).collect();
    let ids = enqueue(&db.pool, &items, 10).await;
    let q = Queue::new(db.pool.clone(), cfg());
    let handler = Fixed::new(JobOutcome::Done);
    for id in &ids {
        assert_eq!(
            q.run_once(&handler).await.unwrap(),
            RunOnce::Ran {
                job_id: *id,
                outcome: JobOutcome::Done,
                applied: true
            }
        );
    }
    assert_eq!(q.run_once(&handler).await.unwrap(), RunOnce::Empty);
    let counts = store::counts(&db.pool).await.unwrap();
    assert_eq!((counts.done, counts.ready, counts.running), (3, 0, 0));
}

#[tokio::test]
async fn expired_lease_is_claimed_again_and_only_the_holder_completes() {
    let db = testing::database().await;
    enqueue(&db.pool, &[("a".into(), 1), ("b".into(), 1)], 10).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());

    // A live lease keeps the job from others.
    let (held, _) = store::claim(&db.pool, a, 1, Duration::from_secs(60))
        .await
        .unwrap();
    let (other, _) = store::claim(&db.pool, b, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(other.len(), 1, "only the unleased job is claimable");
    assert_ne!(other[0].lease.job_id, held[0].lease.job_id);

    // An expired lease (as if its worker died) is claimed again, by anyone.
    enqueue(&db.pool, &[("c".into(), 1)], 10).await;
    let (dying, _) = store::claim(&db.pool, a, 1, Duration::ZERO).await.unwrap();
    let dying = dying.unwrap_or_default_first();
    // The claim's now() is later than the expired lease's end once any time has passed.
    let mut taken = Vec::new();
    for _ in 0..200 {
        taken = store::claim(&db.pool, b, 1, Duration::from_secs(60))
            .await
            .unwrap()
            .0;
        if !taken.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken = &taken[0];
    assert_eq!(taken.lease.job_id, dying.lease.job_id);
    assert_eq!(taken.lease.claims, dying.lease.claims + 1);

    // The former holder can neither complete nor extend it; the new one can.
    let done = |lease| store::Transition {
        lease,
        state: store::JobState::Done,
        delay: Duration::ZERO,
        attempt_delta: 0,
        deferral_delta: 0,
        error: None,
    };
    assert!(store::finish(&db.pool, a, &[done(dying.lease)])
        .await
        .unwrap()
        .is_empty());
    assert!(
        store::extend(&db.pool, a, &[dying.lease], Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    // Not even the same owner with a stale lease (it was taken over, then handed back to it).
    assert!(store::finish(&db.pool, b, &[done(dying.lease)])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store::finish(&db.pool, b, &[done(taken.lease)])
            .await
            .unwrap(),
        vec![taken.lease.job_id]
    );
    assert_eq!(job_row(&db.pool, taken.lease.job_id).await.0, "done");
}

/// Regression (issue 19): a replica that is SIGKILLed held its claimed jobs, and each takeover of
/// an expired lease used to count as one more attempt, so kills alone dead-lettered healthy jobs.
#[tokio::test]
async fn lease_expiry_takeover_is_not_a_failed_attempt() {
    let db = testing::database().await;
    let ids = enqueue(&db.pool, &[("x".into(), 1)], 10).await;
    let mut c = cfg();
    c.retry_schedule = vec![Duration::ZERO];
    // Far more takeovers than the schedule allows attempts: each lease expires unused.
    let mut last_claims = 0;
    for owner in (0..5).map(|_| Uuid::new_v4()) {
        let taken = claim_eventually(&db.pool, owner, Duration::ZERO).await;
        assert_eq!(
            taken.lease.attempts, 1,
            "a takeover keeps the first attempt"
        );
        assert!(taken.lease.claims > last_claims);
        last_claims = taken.lease.claims;
    }
    assert_eq!(job_row(&db.pool, ids[0]).await.1, 1);
    // The job still runs with its attempts intact: one real failure retries, it is not dead.
    let q = Queue::new(db.pool.clone(), c);
    let failing = Fixed::new(JobOutcome::Retry {
        error: "boom".into(),
    });
    let ran = claim_then_run(&q, &failing).await;
    assert_eq!(
        ran,
        JobOutcome::Retry {
            error: "boom".into()
        }
    );
    let (state, attempts, _, error) = job_row(&db.pool, ids[0]).await;
    assert_eq!((state.as_str(), attempts), ("ready", 1));
    assert_eq!(error.as_deref(), Some("boom"));
    // The second real failure exhausts the one-entry schedule: only real failures count.
    claim_then_run(&q, &failing).await;
    assert_eq!(job_row(&db.pool, ids[0]).await.0, "dead");
}

/// Live events come before reconciliation, which comes before backfill: a live job enqueued
/// after a thousand backfill jobs is claimed first, and a worker with one backfill task claims
/// no more backfill work than it can run.
#[tokio::test]
async fn live_work_is_claimed_before_reconciliation_and_backfill() {
    let db = testing::database().await;
    let backlog: Vec<(String, i64)> = (0..1000).map(|i| (format!("b{i}"), 1)).collect();
    enqueue_at(&db.pool, &backlog, 500, JobPriority::Backfill).await;
    enqueue_at(&db.pool, &[("r".into(), 1)], 1, JobPriority::Reconcile).await;
    let ids = enqueue_at(&db.pool, &[("live".into(), 1)], 1, JobPriority::Live).await;
    let live_id = *ids.last().unwrap();

    let owner = Uuid::new_v4();
    let lease = Duration::from_secs(60);
    let (first, _) = store::claim(&db.pool, owner, 1, lease).await.unwrap();
    assert_eq!(
        first[0].lease.job_id, live_id,
        "the live job is claimed first"
    );
    assert_eq!(first[0].job.priority, JobPriority::Live);
    let (second, _) = store::claim(&db.pool, owner, 1, lease).await.unwrap();
    assert_eq!(second[0].job.event.record.record_id, "r");
    assert_eq!(second[0].job.priority, JobPriority::Reconcile);
    let (third, _) = store::claim(&db.pool, owner, 1, lease).await.unwrap();
    assert_eq!(third[0].job.event.record.record_id, "b0");
    assert_eq!(third[0].job.priority, JobPriority::Backfill);

    // The workers: backfill runs on at most `backfill_concurrency` tasks at once.
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    struct Slow(Arc<AtomicUsize>, Arc<AtomicUsize>);
    #[async_trait::async_trait]
    impl JobHandler for Slow {
        async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
            if job.priority != JobPriority::Backfill {
                return JobOutcome::Done;
            }
            let now = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            self.1.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.0.fetch_sub(1, Ordering::SeqCst);
            JobOutcome::Done
        }
    }
    let claimed = [&first[0], &second[0], &third[0]].map(|c| c.lease);
    store::release(&db.pool, owner, &claimed).await.unwrap();
    let mut c = cfg();
    c.backfill_concurrency = 2;
    let shutdown = CancellationToken::new();
    let handler = Arc::new(Slow(running.clone(), peak.clone()));
    let drain = Duration::from_secs(5);
    let workers = queue::start_workers(db.pool.clone(), c, handler, shutdown.clone(), drain);
    eventually("every job done", Duration::from_secs(60), || {
        all_done(&db.pool, 1002)
    })
    .await;
    shutdown.cancel();
    workers.await.unwrap();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "two backfill tasks at most, and both used"
    );
}

/// Claims the one job for `owner` once its previous lease has expired.
async fn claim_eventually(pool: &PgPool, owner: Uuid, lease: Duration) -> store::Claim {
    for _ in 0..200 {
        let (taken, _) = store::claim(pool, owner, 1, lease).await.unwrap();
        if let Some(claim) = taken.into_iter().next() {
            return claim;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the expired lease was never taken over");
}

/// Runs the one job through `run_once` once its previous lease has expired; the outcome.
async fn claim_then_run(q: &Queue, handler: &Fixed) -> JobOutcome {
    for _ in 0..200 {
        if let RunOnce::Ran { outcome, .. } = q.run_once(handler).await.unwrap() {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the job was never run");
}

trait FirstClaim {
    fn unwrap_or_default_first(self) -> store::Claim;
}
impl FirstClaim for Vec<store::Claim> {
    fn unwrap_or_default_first(self) -> store::Claim {
        self.into_iter().next().expect("a job was claimed")
    }
}

#[tokio::test]
async fn retries_then_dead_letter_then_retry_from_dead() {
    let db = testing::database().await;
    let ids = enqueue(&db.pool, &[("a".into(), 1)], 10).await;
    let id = ids[0];
    let q = Queue::new(db.pool.clone(), cfg());
    let failing = Fixed::new(JobOutcome::Retry {
        error: "HTTP 500 from custom ERP".into(),
    });
    // Two retries on the schedule (both zero here), so three runs, then dead.
    for attempt in 1..=3 {
        let ran = q.run_once(&failing).await.unwrap();
        assert!(matches!(ran, RunOnce::Ran { job_id, applied: true, .. } if job_id == id));
        let (state, attempts, _, error) = job_row(&db.pool, id).await;
        assert_eq!(attempts, attempt);
        assert_eq!(state, if attempt < 3 { "ready" } else { "dead" });
        assert_eq!(error.as_deref(), Some("HTTP 500 from custom ERP"));
    }
    assert_eq!(q.run_once(&failing).await.unwrap(), RunOnce::Empty);
    let dead = store::dead_letters(&db.pool).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("HTTP 500 from custom ERP")
    );
    assert_eq!(store::counts(&db.pool).await.unwrap().dead, 1);

    assert_eq!(
        store::retry_dead(&db.pool, Some(id)).await.unwrap(),
        vec![id]
    );
    assert_eq!(
        store::retry_dead(&db.pool, Some(id)).await.unwrap(),
        Vec::<i64>::new()
    );
    let ok = Fixed::new(JobOutcome::Done);
    assert!(matches!(
        q.run_once(&ok).await.unwrap(),
        RunOnce::Ran { applied: true, .. }
    ));
    assert_eq!(job_row(&db.pool, id).await.0, "done");
    assert!(store::dead_letters(&db.pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn retry_waits_for_its_scheduled_time() {
    let db = testing::database().await;
    enqueue(&db.pool, &[("a".into(), 1)], 10).await;
    let mut c = cfg();
    c.retry_schedule = vec![Duration::from_secs(3600)];
    let q = Queue::new(db.pool.clone(), c);
    let failing = Fixed::new(JobOutcome::Retry {
        error: "boom".into(),
    });
    assert!(matches!(
        q.run_once(&failing).await.unwrap(),
        RunOnce::Ran { .. }
    ));
    assert_eq!(q.run_once(&failing).await.unwrap(), RunOnce::Empty);
    let counts = store::counts(&db.pool).await.unwrap();
    assert_eq!((counts.retrying, counts.ready), (1, 0));
}

#[tokio::test]
async fn later_reschedules_without_using_an_attempt_up_to_the_bound() {
    let db = testing::database().await;
    let id = enqueue(&db.pool, &[("a".into(), 1)], 10).await[0];
    let q = Queue::new(db.pool.clone(), cfg());
    let later = Fixed::new(JobOutcome::Later {
        after: Some(Duration::ZERO),
        reason: "429 from Zendesk".into(),
    });
    // max_deferrals = 3: three deferrals cost no attempt.
    for deferral in 1..=3 {
        q.run_once(&later).await.unwrap();
        let (state, attempts, deferrals, _) = job_row(&db.pool, id).await;
        assert_eq!(
            (state.as_str(), attempts, deferrals),
            ("ready", 0, deferral)
        );
    }
    // The next one is a failed attempt (the schedule still has retries).
    q.run_once(&later).await.unwrap();
    let (state, attempts, deferrals, error) = job_row(&db.pool, id).await;
    assert_eq!((state.as_str(), attempts, deferrals), ("ready", 1, 3));
    assert!(error.unwrap().contains("deferred 3 times"));

    // A Retry-After is honoured up to `max_retry_after` (ten minutes here).
    let db = testing::database().await;
    let id = enqueue(&db.pool, &[("a".into(), 1)], 10).await[0];
    let q = Queue::new(db.pool.clone(), cfg());
    let wait = Fixed::new(JobOutcome::Later {
        after: Some(Duration::from_secs(3600)),
        reason: "Retry-After: 3600".into(),
    });
    q.run_once(&wait).await.unwrap();
    assert_eq!(q.run_once(&wait).await.unwrap(), RunOnce::Empty);
    let due_in: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM run_at - now())::float8 FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!((590.0..=600.0).contains(&due_in), "{due_in}");
}

/// Records, per key, the order runs happened in, and whether two runs of one key overlapped.
#[derive(Default)]
struct OrderProbe {
    active: Mutex<HashSet<String>>,
    seen: Mutex<BTreeMap<String, Vec<i64>>>,
    overlap: AtomicUsize,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
}

#[async_trait::async_trait]
impl JobHandler for OrderProbe {
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
        let key = job.event.record.to_string();
        if !self.active.lock().unwrap().insert(key.clone()) {
            self.overlap.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        let seq: i64 = job
            .event
            .delivery_id
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.seen
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(seq);
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        self.active.lock().unwrap().remove(&key);
        JobOutcome::Done
    }
}

#[tokio::test]
async fn per_record_order_holds_and_keys_run_in_parallel() {
    let db = testing::database().await;
    // Interleaved: r0:1, r1:1, ..., r19:1, r0:2, ...
    let items: Vec<_> = (1..=10)
        .flat_map(|seq| (0..20).map(move |k| (format!("r{k}"), seq)))
        .collect();
    enqueue(&db.pool, &items, 50).await;
    let probe = Arc::new(OrderProbe::default());
    let shutdown = CancellationToken::new();
    let workers = queue::start_workers(
        db.pool.clone(),
        cfg(),
        probe.clone(),
        shutdown.clone(),
        Duration::from_secs(5),
    );
    eventually("all 200 jobs to finish", Duration::from_secs(60), || {
        all_done(&db.pool, 200)
    })
    .await;
    shutdown.cancel();
    workers.await.unwrap();
    assert_eq!(
        probe.overlap.load(Ordering::SeqCst),
        0,
        "one key ran twice at once"
    );
    let seen = probe.seen.lock().unwrap();
    assert_eq!(seen.len(), 20);
    for (key, seqs) in seen.iter() {
        assert_eq!(seqs, &(1..=10).collect::<Vec<_>>(), "order of {key}");
    }
    assert!(
        probe.max_concurrent.load(Ordering::SeqCst) > 1,
        "different keys should run in parallel"
    );
}

#[tokio::test]
async fn a_dead_job_stops_blocking_its_record() {
    let db = testing::database().await;
    let ids = enqueue(&db.pool, &[("a".into(), 1), ("a".into(), 2)], 10).await;
    let q = Queue::new(db.pool.clone(), cfg());
    let dead = Fixed::new(JobOutcome::Dead {
        error: "rejected: invalid VAT number".into(),
    });
    assert!(
        matches!(q.run_once(&dead).await.unwrap(), RunOnce::Ran { job_id, .. } if job_id == ids[0])
    );
    let ok = Fixed::new(JobOutcome::Done);
    assert!(
        matches!(q.run_once(&ok).await.unwrap(), RunOnce::Ran { job_id, .. } if job_id == ids[1])
    );
}

/// Never finishes on its own.
struct Stuck;

#[async_trait::async_trait]
impl JobHandler for Stuck {
    async fn handle(&self, _job: &ClaimedJob) -> JobOutcome {
        std::future::pending::<()>().await;
        JobOutcome::Done
    }
}

#[tokio::test]
async fn shutdown_releases_jobs_cut_off_at_the_bound() {
    let db = testing::database().await;
    let items: Vec<_> = (0..5).map(|k| (format!("r{k}"), 1)).collect();
    enqueue(&db.pool, &items, 10).await;
    let mut c = cfg();
    c.concurrency = 2;
    let shutdown = CancellationToken::new();
    let workers = queue::start_workers(
        db.pool.clone(),
        c,
        Arc::new(Stuck),
        shutdown.clone(),
        Duration::from_millis(200),
    );
    eventually("jobs to be claimed", Duration::from_secs(30), || async {
        store::counts(&db.pool).await.unwrap().running == 5
    })
    .await;
    shutdown.cancel();
    workers.await.unwrap();
    let counts = store::counts(&db.pool).await.unwrap();
    assert_eq!((counts.ready, counts.running), (5, 0), "{counts:?}");
    let attempts: i64 = sqlx::query_scalar("SELECT sum(attempts) FROM jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "released jobs get their attempt back");
}

#[tokio::test]
async fn notify_wakes_idle_workers_without_polling() {
    let db = testing::database().await;
    let mut c = cfg();
    // Polling would take an hour: only the NOTIFY can get these jobs run.
    c.poll_interval = Duration::from_secs(3600);
    let handler = Arc::new(Fixed::new(JobOutcome::Done));
    let shutdown = CancellationToken::new();
    let workers = queue::start_workers(
        db.pool.clone(),
        c,
        handler.clone(),
        shutdown.clone(),
        Duration::from_secs(5),
    );
    // Wait until the worker listens.
    eventually("the worker to LISTEN", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n > 0
    })
    .await;
    for round in 1..=3 {
        enqueue(&db.pool, &[(format!("r{round}"), 1)], 1).await;
        eventually("the notified job to run", Duration::from_secs(30), || {
            all_done(&db.pool, round)
        })
        .await;
    }
    shutdown.cancel();
    workers.await.unwrap();
}

#[tokio::test]
async fn pruning_removes_old_finished_jobs_and_their_events_only() {
    let db = testing::database().await;
    let ids = enqueue(
        &db.pool,
        &[("a".into(), 1), ("b".into(), 1), ("c".into(), 1)],
        10,
    )
    .await;
    let q = Queue::new(db.pool.clone(), cfg());
    q.run_once(&Fixed::new(JobOutcome::Done)).await.unwrap();
    q.run_once(&Fixed::new(JobOutcome::Dead { error: "no".into() }))
        .await
        .unwrap();
    // The third stays ready. Age everything by two hours.
    sqlx::query("UPDATE jobs SET finished_at = finished_at - interval '2 hours'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET received_at = received_at - interval '2 hours'")
        .execute(&db.pool)
        .await
        .unwrap();
    let pruned = store::prune(&db.pool, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    assert_eq!(pruned, store::Pruned { jobs: 1, events: 1 });
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM jobs ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, ids[1..].to_vec());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 2, "the dead and the ready job keep their events");
}

// ---- Housekeeping and the claim plan after a burst -----------------------------------------------

/// Stores `n` events with their jobs (one record each) in one statement, on one connection, and
/// asks that connection to report its statistics at once (they are otherwise sent at most once a
/// second, and up to 10 s later when the connection goes idle).
/// Inserts `n` events with their jobs and returns once the statistics views show the inserts.
/// `pg_stat_force_next_flush` flushes when the backend next goes idle, which sqlx does not wait
/// for before it hands the connection back: another connection may read the views first.
async fn burst(pool: &PgPool, tag: &str, n: i64) {
    let inserted_before = events_inserted(pool).await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(
        "WITH e AS (
             INSERT INTO events (system, entity_type, record_id, action, delivery_id)
             SELECT 'customerp', 'Customer', $1 || '-' || g, 'updated', $1 || '-' || g || ':1'
             FROM generate_series(1, $2::bigint) g
             RETURNING id, record_id)
         INSERT INTO jobs (event_id, record_key)
         SELECT id, 'customerp/Customer/' || record_id FROM e ORDER BY id",
    )
    .bind(tag)
    .bind(n)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    eventually(
        "the burst in the statistics",
        Duration::from_secs(30),
        || async { events_inserted(pool).await >= inserted_before + n },
    )
    .await;
}

async fn events_inserted(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'events'::regclass")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `pg_stat_user_tables` for `jobs`: (analyze_count, vacuum_count, n_mod_since_analyze, n_dead_tup).
async fn jobs_stats(pool: &PgPool) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT analyze_count, vacuum_count, n_mod_since_analyze, n_dead_tup
         FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Autovacuum off for `jobs`, so that whatever analyzes or vacuums it in these tests is ours.
async fn without_autovacuum(pool: &PgPool) {
    sqlx::query("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
}

/// `events` as the statistics see it: (analyze_count, n_live_tup), after `conn` reported its own.
async fn events_stats(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_as(
        "SELECT analyze_count, n_live_tup FROM pg_stat_user_tables WHERE relid = 'events'::regclass",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn keyed_tables_are_analyzed_as_they_grow_and_not_as_their_rows_change() {
    let db = testing::database().await;
    for table in store::KEYED_TABLES {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    burst(&db.pool, "small", 500).await;
    assert!(store::analyze_keyed_tables(&db.pool)
        .await
        .unwrap()
        .is_empty());

    burst(&db.pool, "first", 1_000).await;
    assert_eq!(
        store::analyze_keyed_tables(&db.pool).await.unwrap(),
        ["events"],
        "1,500 rows never counted"
    );
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(events_stats(&mut conn).await, (1, 1_500));

    // Every row changed twice over, none added: the plans have nothing new to learn.
    for _ in 0..2 {
        sqlx::query("UPDATE events SET action = 'created'")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    assert_eq!(events_stats(&mut conn).await.0, 1);
    assert!(store::analyze_keyed_tables(&db.pool)
        .await
        .unwrap()
        .is_empty());

    burst(&db.pool, "second", 1_400).await;
    assert!(
        store::analyze_keyed_tables(&db.pool)
            .await
            .unwrap()
            .is_empty(),
        "2,900 rows are less than twice the 1,500 counted"
    );
    burst(&db.pool, "third", 100).await;
    assert_eq!(
        store::analyze_keyed_tables(&db.pool).await.unwrap(),
        ["events"]
    );
    assert_eq!(events_stats(&mut conn).await, (2, 3_000));
}

#[tokio::test]
async fn housekeeping_analyzes_after_a_burst_and_vacuums_after_pruning() {
    let db = testing::database().await;
    without_autovacuum(&db.pool).await;
    // Below the thresholds nothing runs.
    burst(&db.pool, "small", 100).await;
    let h = store::housekeep(&db.pool).await.unwrap();
    assert!(!h.analyzed && !h.vacuumed, "{h:?}");

    burst(&db.pool, "big", 20_000).await;
    eventually(
        "the burst in the statistics",
        Duration::from_secs(30),
        || async {
            store::table_activity(&db.pool)
                .await
                .unwrap()
                .modified_since_analyze
                >= 20_000
        },
    )
    .await;
    let (analyzes_before, _, _, _) = jobs_stats(&db.pool).await;
    let h = store::housekeep(&db.pool).await.unwrap();
    assert!(h.analyzed, "{h:?}");
    assert!(!h.vacuumed, "nothing is dead yet: {h:?}");
    let (analyzes, _, modified, _) = jobs_stats(&db.pool).await;
    assert_eq!(analyzes, analyzes_before + 1);
    assert!(
        modified < 1_000,
        "n_mod_since_analyze after ANALYZE: {modified}"
    );

    // Finish and prune everything: 20,100 dead rows (more than the live ones, which are none).
    sqlx::query("UPDATE jobs SET state = 'done', finished_at = now() - interval '1 day'")
        .execute(&db.pool)
        .await
        .unwrap();
    store::prune(&db.pool, Duration::from_secs(3600), 5_000)
        .await
        .unwrap();
    // The pruner's connections report on their own schedule; any query on them flushes within a
    // second or so, and the pool hands them out again while we poll. Wait for every update and
    // delete to be counted: the dead-row count alone passes 20,000 on the UPDATE's old row
    // versions, and a delete batch reported after the VACUUM would then count as left dead.
    eventually(
        "the pruning in the statistics",
        Duration::from_secs(30),
        || async {
            sqlx::query("SELECT pg_stat_force_next_flush()")
                .execute(&db.pool)
                .await
                .unwrap();
            let (updated, deleted): (i64, i64) = sqlx::query_as(
                "SELECT n_tup_upd, n_tup_del FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            updated >= 20_100 && deleted >= 20_100
        },
    )
    .await;
    let (_, vacuums_before, _, _) = jobs_stats(&db.pool).await;
    let h = store::housekeep(&db.pool).await.unwrap();
    assert!(h.vacuumed, "{h:?}");
    let (_, vacuums, _, dead) = jobs_stats(&db.pool).await;
    assert_eq!(vacuums, vacuums_before + 1);
    assert!(dead < 1_000, "n_dead_tup after VACUUM: {dead}");
}

#[tokio::test]
async fn workers_refresh_statistics_after_a_burst_without_autovacuum() {
    let db = testing::database().await;
    without_autovacuum(&db.pool).await;
    let (analyzes_before, _, _, _) = jobs_stats(&db.pool).await;
    let shutdown = CancellationToken::new();
    let workers = queue::start_workers(
        db.pool.clone(),
        cfg(),
        Arc::new(Fixed::new(JobOutcome::Done)),
        shutdown.clone(),
        Duration::from_secs(5),
    );
    burst(&db.pool, "w", 20_000).await;
    eventually(
        "the workers' housekeeping to ANALYZE jobs",
        Duration::from_secs(60),
        || async { jobs_stats(&db.pool).await.0 > analyzes_before },
    )
    .await;
    eventually("all jobs done", Duration::from_secs(120), || {
        all_done(&db.pool, 20_000)
    })
    .await;
    shutdown.cancel();
    workers.await.unwrap();
}

/// The claim's plan right after a burst that followed an ANALYZE of an all-finished table (the
/// planner then believes there is nothing unfinished): still the ordered walk of
/// `jobs_unfinished` with one keyed probe of `jobs_by_key` per candidate. Before migration
/// 20261123110000 this plan scanned the whole index per candidate (7.6 s for one claim of 500).
#[tokio::test]
async fn claim_plan_walks_the_index_in_order_with_stale_statistics() {
    let db = testing::database().await;
    without_autovacuum(&db.pool).await;
    burst(&db.pool, "old", 3_000).await;
    for sql in [
        "UPDATE jobs SET state = 'done', finished_at = now()",
        "ANALYZE jobs",
        "DELETE FROM events",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    burst(&db.pool, "new", 20_000).await;

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(store::CLAIM_PLANNER_SETTINGS)
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) {}", store::CLAIM))
        .bind(500i64)
        .bind(Uuid::new_v4())
        .bind(60_000i64)
        .bind(0i16)
        .bind(2i16)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using jobs_unfinished on jobs j"),
        "{plan}"
    );
    assert!(
        plan.contains("Index Scan using jobs_by_key on jobs o")
            && plan.contains("Index Cond: (record_key = j.record_key)"),
        "{plan}"
    );
    assert!(
        !plan.contains("Bitmap") && !plan.contains("Seq Scan") && !plan.contains("Hash"),
        "{plan}"
    );
    assert!(!plan.contains("Sort"), "{plan}");
}

// ---- Reliability: worker processes --------------------------------------------------------------

/// Tables the probe writes to, and a trigger counting every transition to `done`, so a job
/// completed twice would show.
async fn prepare_probe_tables(pool: &PgPool) {
    for sql in [
        "CREATE TABLE probe_log (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             job_id BIGINT NOT NULL, record_key TEXT NOT NULL, seq BIGINT NOT NULL, pid INT)",
        "CREATE TABLE probe_done (job_id BIGINT NOT NULL)",
        "CREATE FUNCTION probe_done() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO probe_done VALUES (NEW.id); RETURN NULL; END $$",
        "CREATE TRIGGER probe_done AFTER UPDATE ON jobs FOR EACH ROW
         WHEN (OLD.state <> 'done' AND NEW.state = 'done') EXECUTE FUNCTION probe_done()",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
}

fn probe(url: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-queue-probe"));
    cmd.env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the probe binary starts")
}

/// Every job done, completed exactly once, recorded at least once (exactly once if `exact`), and
/// each key's records in sequence order.
async fn check_probe_results(pool: &PgPool, total: i64, exact: bool) {
    assert!(all_done(pool, total).await);
    let twice: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM probe_done GROUP BY job_id HAVING count(*) <> 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "jobs completed more than once: {twice:?}");
    let completed: i64 = sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM probe_done")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(completed, total);
    let runs: Vec<(i64, i64)> =
        sqlx::query_as("SELECT job_id, count(*) FROM probe_log GROUP BY job_id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(runs.len() as i64, total, "every job ran");
    if exact {
        let again: Vec<_> = runs.iter().filter(|(_, n)| *n != 1).collect();
        assert!(again.is_empty(), "jobs run more than once: {again:?}");
    }
    let log: Vec<(String, i64)> =
        sqlx::query_as("SELECT record_key, seq FROM probe_log ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, seq) in log {
        per_key.entry(key).or_default().push(seq);
    }
    for (key, seqs) in per_key {
        // A rerun after a crash repeats a sequence number; it never goes back.
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "order broken for {key}: {seqs:?}"
        );
        if exact {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key}: {seqs:?}");
        }
    }
}

fn keyed(keys: usize, per_key: i64) -> Vec<(String, i64)> {
    (1..=per_key)
        .flat_map(|seq| (0..keys).map(move |k| (format!("k{k}"), seq)))
        .collect()
}

#[tokio::test]
async fn kill_9_of_a_worker_holding_jobs_loses_nothing_and_completes_each_once() {
    let db = testing::database().await;
    prepare_probe_tables(&db.pool).await;
    let items = keyed(10, 4);
    enqueue(&db.pool, &items, 100).await;
    let url = db.url.expose_secret().to_owned();
    // Slow jobs, short lease: the victim holds claimed jobs for a while.
    let mut victim = probe(
        &url,
        &[
            ("PROBE_SLEEP_MS", "2000"),
            ("PROBE_CONCURRENCY", "4"),
            ("PROBE_BATCH", "8"),
            ("PROBE_LEASE_MS", "1500"),
        ],
    );
    eventually(
        "the victim to hold jobs",
        Duration::from_secs(60),
        || async { store::counts(&db.pool).await.unwrap().running >= 4 },
    )
    .await;
    let held: Vec<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'running'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    victim.start_kill().unwrap(); // SIGKILL
    victim.wait().await.unwrap();

    let _survivor = probe(
        &url,
        &[("PROBE_CONCURRENCY", "4"), ("PROBE_LEASE_MS", "1500")],
    );
    eventually("every job to complete", Duration::from_secs(120), || {
        all_done(&db.pool, items.len() as i64)
    })
    .await;
    check_probe_results(&db.pool, items.len() as i64, false).await;
    let reclaimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND claims >= 2")
            .bind(&held)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        reclaimed,
        held.len() as i64,
        "the victim's jobs were taken over"
    );
}

#[tokio::test]
async fn three_worker_processes_run_10000_jobs_once_each_in_record_order() {
    let db = testing::database().await;
    prepare_probe_tables(&db.pool).await;
    let items = keyed(500, 20);
    enqueue(&db.pool, &items, 1000).await;
    let url = db.url.expose_secret().to_owned();
    let _workers: Vec<_> = (0..3)
        .map(|_| {
            probe(
                &url,
                &[
                    ("PROBE_CONCURRENCY", "4"),
                    ("PROBE_BATCH", "50"),
                    ("PROBE_POLL_MS", "100"),
                ],
            )
        })
        .collect();
    eventually("10,000 jobs to complete", Duration::from_secs(600), || {
        all_done(&db.pool, 10_000)
    })
    .await;
    check_probe_results(&db.pool, 10_000, true).await;
}

/// Records runs like the probe, in process.
struct Recorder(PgPool);

#[async_trait::async_trait]
impl JobHandler for Recorder {
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
        let seq: i64 = job
            .event
            .delivery_id
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        match sqlx::query("INSERT INTO probe_log (job_id, record_key, seq) VALUES ($1, $2, $3)")
            .bind(job.job_id)
            .bind(job.event.record.to_string())
            .bind(seq)
            .execute(&self.0)
            .await
        {
            Ok(_) => JobOutcome::Done,
            Err(e) => JobOutcome::Later {
                after: Some(Duration::from_millis(200)),
                reason: e.to_string(),
            },
        }
    }
}

#[tokio::test]
async fn workers_recover_on_their_own_when_the_database_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let pg = tether::db::embedded::EmbeddedPostgres::start(&dir.path().join("pg"))
        .await
        .unwrap();
    let url = pg.url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(1))
        .connect(url.expose_secret())
        .await
        .unwrap();
    tether::db::migrate(&pool).await.unwrap();
    prepare_probe_tables(&pool).await;
    let items = keyed(100, 20);
    enqueue(&pool, &items, 500).await;
    let mut c = cfg();
    c.concurrency = 4;
    c.lease = Duration::from_secs(5);
    let shutdown = CancellationToken::new();
    let workers = queue::start_workers(
        pool.clone(),
        c,
        Arc::new(Recorder(pool.clone())),
        shutdown.clone(),
        Duration::from_secs(5),
    );
    eventually(
        "a few hundred jobs to run",
        Duration::from_secs(120),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_log")
                .fetch_one(&pool)
                .await
                .unwrap();
            n >= 300
        },
    )
    .await;
    pg.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart().await.unwrap();
    eventually(
        "every job to complete after the restart",
        Duration::from_secs(300),
        || all_done(&pool, items.len() as i64),
    )
    .await;
    shutdown.cancel();
    workers.await.unwrap();
    check_probe_results(&pool, items.len() as i64, false).await;
    pool.close().await;
    pg.stop().await.unwrap();
}

async fn tether_cli(url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("TETHER_LOG_FORMAT", "pretty")
        .env("TETHER_LOG_LEVEL", "warn")
        .output()
        .await
        .expect("tether runs")
}

#[tokio::test]
async fn dead_letters_cli_lists_and_retries() {
    let db = testing::database().await;
    let ids = enqueue(&db.pool, &[("a".into(), 1), ("b".into(), 1)], 10).await;
    let q = Queue::new(db.pool.clone(), cfg());
    let dead = Fixed::new(JobOutcome::Dead {
        error: "rejected: unknown country code".into(),
    });
    q.drain(&dead).await.unwrap();
    let url = db.url.expose_secret().to_owned();

    let out = tether_cli(&url, &["dead-letters", "list"]).await;
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert!(
        listing.contains("rejected: unknown country code"),
        "{listing}"
    );
    assert!(listing.contains("customerp/Customer/a"), "{listing}");

    let out = tether_cli(&url, &["dead-letters", "retry", &ids[0].to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(job_row(&db.pool, ids[0]).await.0, "ready");
    assert_eq!(job_row(&db.pool, ids[1]).await.0, "dead");

    let out = tether_cli(&url, &["dead-letters", "retry", "999999"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a dead letter"));

    let out = tether_cli(&url, &["dead-letters", "retry", "--all"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(store::counts(&db.pool).await.unwrap().dead, 0);

    let out = tether_cli(&url, &["dead-letters", "retry"]).await;
    assert_eq!(out.status.code(), Some(2), "an id or --all is required");
}
