//! A rate gate shared by every replica through PostgreSQL: one `rate_budgets` row per vendor
//! account and limit, updated with GCRA arithmetic in one statement.
//!
//! A vendor's limit is per account (PowerOffice's 10 a second per subscription key, Zendesk's
//! plan limit per minute, Exact's 60 a minute per division), not per process: three replicas
//! with a gate each would send three times the limit. Here every call's place comes from the
//! row's theoretical arrival time (`tat`), read and moved in one `UPDATE` under the row lock, on
//! PostgreSQL's one clock.
//!
//! The spacing is `period / (limit - burst)`, not `period / limit`: any window of `period` then
//! holds at most `limit` places, and `limit + 1` places span a whole interval more than
//! `period`, so a call that reaches the vendor up to one interval late (network, scheduling)
//! still cannot make a window count `limit + 1`. A caller that wakes more than half an interval
//! after its place (a starved machine) gives the place up and takes a new one, so lateness
//! stays inside that margin.
//!
//! One process's callers share one statement: the places wanted while a take is on its way are
//! taken together by the next one (`n` consecutive places, one `UPDATE`), so a process's workers
//! never queue on the row's lock. With 64 workers calling a vendor whose limit is tens of
//! thousands a minute, a statement per call made that one row PostgreSQL's largest cost and
//! the lock queue made callers late (README, "Benchmark" of "How records are kept in sync").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::gate::RateGate;

/// Takes `$5` consecutive places when the last comes within `max_wait`: answers whether they were
/// granted and `base`, the seconds from now to the first place before the burst tolerance
/// (the first's wait is `base - tolerance`, the i-th's `i` spacings more, none below zero).
/// `$2` the spacing, `$3` the tolerance (burst - 1 spacings), `$4` the longest wait, in seconds.
/// The `SET` expressions read the row as it was; `RETURNING` reads it as written. Times are
/// `clock_timestamp()`, the time the row is read under its lock, not `now()` (the statement's
/// start, which may be long before when it waited for the lock or a connection): the wait is
/// then counted from about when the answer leaves, and a slow start cannot bunch calls.
const TAKE: &str = "\
UPDATE rate_budgets SET
    granted = greatest(tat, clock_timestamp()) - clock_timestamp()
              <= make_interval(secs => $3 + $4 - $2 * ($5 - 1)),
    tat = CASE WHEN greatest(tat, clock_timestamp()) - clock_timestamp()
                    <= make_interval(secs => $3 + $4 - $2 * ($5 - 1))
               THEN greatest(tat, clock_timestamp()) + make_interval(secs => $2 * $5)
               ELSE tat END
WHERE budget = $1
RETURNING extract(epoch FROM
              CASE WHEN granted THEN tat - make_interval(secs => $2 * $5)
                   ELSE greatest(tat, clock_timestamp()) END
              - clock_timestamp())::float8 AS base,
          granted";

/// No places before `$2` seconds from now (a 429's `Retry-After`), for every replica.
const PAUSE: &str =
    "UPDATE rate_budgets SET tat = greatest(tat, clock_timestamp() + make_interval(secs => $2)) \
     WHERE budget = $1";

const CREATE: &str = "INSERT INTO rate_budgets (budget, tat) VALUES ($1, clock_timestamp()) \
     ON CONFLICT (budget) DO NOTHING";

/// `limit` calls per `period` for one vendor account, across every replica.
pub struct SharedGate {
    inner: Arc<Inner>,
    /// How late after its place a call may still go (see [`LATENESS_FLOOR`]).
    lateness: Duration,
}

/// What the statement needs, and the places wanted meanwhile (see the module doc).
struct Inner {
    pool: PgPool,
    budget: String,
    spacing: Duration,
    tolerance: f64,
    wanted: Mutex<Wanted>,
}

#[derive(Default)]
struct Wanted {
    waiting: Vec<Want>,
    /// A task is taking places for this process; it takes the waiting ones before it ends.
    taking: bool,
}

/// One caller's wish for a place.
struct Want {
    max_wait: Duration,
    answer: oneshot::Sender<Result<Taken, Arc<sqlx::Error>>>,
}

/// A place, or a refusal with the wait until the next place.
#[derive(Debug, Clone, Copy)]
enum Taken {
    At(Place),
    Refused(Duration),
}

/// Where a place falls on this process's clock. PostgreSQL read the row at some instant between
/// sending the statement and reading its answer, so the place lies between `earliest` (counted
/// from the send) and `latest` (counted from the answer). A call goes no earlier than `latest`
/// and no later than the lateness allowed after `earliest`: never before its place, and late
/// by at most what the spare slots pay for, however long the statement took.
#[derive(Debug, Clone, Copy)]
struct Place {
    earliest: Instant,
    latest: Instant,
}

/// The least lateness a call may have and still use its place. Half a spacing alone is below a
/// database round trip once the spacing is under a few milliseconds (a limit of thousands a
/// minute), and below a busy machine's scheduling delay well before that: every place would then
/// be given up and no call would ever go. The places this allows late are paid for with spare
/// slots (see [`SharedGate::new`]); it changes nothing for limits under 2,400 a minute.
const LATENESS_FLOOR: Duration = Duration::from_millis(25);

/// Places given up for lateness before the call is handed back as back-pressure.
const MAX_RETAKES: usize = 4;

/// The most places one statement takes (the others wait for the next).
const MAX_PLACES_AT_ONCE: usize = 64;

impl SharedGate {
    /// `budget` names the account and limit (e.g. `poweroffice:<key hash>:second`); `burst`
    /// calls may go at once (at least 1, less than `limit`).
    pub fn new(pool: PgPool, budget: String, limit: u32, period: Duration, burst: u32) -> Self {
        let burst = burst.clamp(1, limit.saturating_sub(1).max(1));
        let slots = limit.saturating_sub(burst).max(1);
        let spacing = period / slots;
        let lateness = (spacing / 2).max(LATENESS_FLOOR);
        // A call up to `lateness` late may share a window with places `lateness` later than
        // the spacing promises: that many slots are kept spare, so no window exceeds `limit`.
        let spare = (lateness.as_secs_f64() / spacing.as_secs_f64()).ceil() as u32;
        let spacing = match spare {
            0 | 1 => spacing,
            _ => period / slots.saturating_sub(spare).max(1),
        };
        let inner = Inner {
            pool,
            budget,
            spacing,
            tolerance: spacing.as_secs_f64() * f64::from(burst - 1),
            wanted: Mutex::new(Wanted::default()),
        };
        SharedGate {
            inner: Arc::new(inner),
            lateness,
        }
    }

    /// A place for this caller, taken with those of the other callers waiting now.
    async fn take(&self, max_wait: Duration) -> Result<Taken, Arc<sqlx::Error>> {
        let (answer, taken) = oneshot::channel();
        let lead = {
            let mut wanted = self.inner.wanted.lock().unwrap_or_else(|e| e.into_inner());
            wanted.waiting.push(Want { max_wait, answer });
            !std::mem::replace(&mut wanted.taking, true)
        };
        if lead {
            // A task of its own, so a caller that gives up (a dropped future) strands no one.
            tokio::spawn(self.inner.clone().take_while_wanted());
        }
        taken
            .await
            .unwrap_or_else(|_| Err(Arc::new(sqlx::Error::PoolClosed)))
    }
}

/// What [`TAKE`] answered, and when it was sent and its answer read (PostgreSQL read the row
/// in between).
struct Read {
    base: f64,
    granted: bool,
    sent: Instant,
    received: Instant,
}

impl Inner {
    /// Takes places until no caller waits for one.
    async fn take_while_wanted(self: Arc<Self>) {
        loop {
            let batch = {
                let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
                if wanted.waiting.is_empty() {
                    wanted.taking = false;
                    return;
                }
                let n = wanted.waiting.len().min(MAX_PLACES_AT_ONCE);
                wanted.waiting.drain(..n).collect::<Vec<_>>()
            };
            self.give(batch).await;
        }
    }

    /// Consecutive places for `batch` in one statement. If they do not all come within the
    /// shortest wait asked, each caller is answered on its own, as if it had asked alone.
    async fn give(&self, batch: Vec<Want>) {
        let max_wait = batch.iter().map(|w| w.max_wait).min().unwrap_or_default();
        match self.statement(batch.len(), max_wait).await {
            Ok(Read {
                base,
                granted: true,
                sent,
                received,
            }) => {
                for (i, want) in batch.into_iter().enumerate() {
                    let wait = base + self.spacing.as_secs_f64() * i as f64 - self.tolerance;
                    let wait = Duration::from_secs_f64(wait.max(0.0));
                    let place = Place {
                        earliest: sent + wait,
                        latest: received + wait,
                    };
                    let _ = want.answer.send(Ok(Taken::At(place)));
                }
            }
            Ok(Read {
                base,
                granted: false,
                ..
            }) if batch.len() == 1 => {
                let wait = Duration::from_secs_f64((base - self.tolerance).max(0.0));
                for want in batch {
                    let _ = want.answer.send(Ok(Taken::Refused(wait)));
                }
            }
            Ok(Read { granted: false, .. }) => {
                for want in batch {
                    Box::pin(self.give(vec![want])).await;
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for want in batch {
                    let _ = want.answer.send(Err(error.clone()));
                }
            }
        }
    }

    /// Runs [`TAKE`] for `n` places (creating the budget's row the first time).
    async fn statement(&self, n: usize, max_wait: Duration) -> Result<Read, sqlx::Error> {
        // The connection first: a wait for one (a busy pool, a database starting again) is
        // before the read, and counted from the send it made every place that much early.
        let mut connection = self.pool.acquire().await?;
        for _ in 0..2 {
            let sent = Instant::now();
            let row: Option<(f64, bool)> = sqlx::query_as(TAKE)
                .bind(&self.budget)
                .bind(self.spacing.as_secs_f64())
                .bind(self.tolerance)
                .bind(max_wait.as_secs_f64().min(1e9))
                .bind(n as i32)
                .fetch_optional(&mut *connection)
                .await?;
            if let Some((base, granted)) = row {
                return Ok(Read {
                    base,
                    granted,
                    sent,
                    received: Instant::now(),
                });
            }
            sqlx::query(CREATE)
                .bind(&self.budget)
                .execute(&mut *connection)
                .await?;
        }
        Err(sqlx::Error::RowNotFound)
    }
}

#[async_trait]
impl RateGate for SharedGate {
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration> {
        let deadline = Instant::now().checked_add(max_wait);
        for _ in 0..MAX_RETAKES {
            let left = deadline.map_or(max_wait, |d| d.saturating_duration_since(Instant::now()));
            match self.take(left).await {
                Ok(Taken::At(place)) => {
                    tokio::time::sleep_until(place.latest).await;
                    // A call that may go well after its place would bunch with the next ones:
                    // it gives the place up and takes a new one instead. That includes a
                    // statement whose answer took longer than the lateness allowed (where in
                    // that time PostgreSQL read the row is unknown).
                    if place.earliest.elapsed() <= self.lateness {
                        return Ok(());
                    }
                }
                Ok(Taken::Refused(wait)) => return Err(wait),
                Err(error) => {
                    // Without the database there is no shared budget; the call is given back
                    // as back-pressure rather than sent uncounted.
                    tracing::warn!(budget = %self.inner.budget, %error, "shared rate budget unavailable");
                    return Err(Duration::from_secs(1));
                }
            }
        }
        Err(self.inner.spacing)
    }

    async fn pause(&self, delay: Duration) {
        let paused = sqlx::query(PAUSE)
            .bind(&self.inner.budget)
            .bind(delay.as_secs_f64())
            .execute(&self.inner.pool)
            .await;
        if let Err(error) = paused {
            tracing::warn!(budget = %self.inner.budget, %error, "could not share a vendor's pause");
        }
    }
}
