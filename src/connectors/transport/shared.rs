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

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::time::Instant;

use super::gate::RateGate;

/// Takes a place when it comes within `max_wait`: answers whether it was granted and the wait.
/// `$2` the spacing, `$3` the tolerance (burst - 1 spacings), `$4` the longest wait, in seconds.
/// The `SET` expressions read the row as it was; `RETURNING` reads it as written. Times are
/// `clock_timestamp()`, the time the row is read under its lock, not `now()` (the statement's
/// start, which may be long before when it waited for the lock or a connection): the wait is
/// then counted from about when the answer leaves, and a slow start cannot bunch calls.
const TAKE: &str = "\
UPDATE rate_budgets SET
    granted = greatest(tat, clock_timestamp()) - clock_timestamp()
              <= make_interval(secs => $3 + $4),
    tat = CASE WHEN greatest(tat, clock_timestamp()) - clock_timestamp()
                    <= make_interval(secs => $3 + $4)
               THEN greatest(tat, clock_timestamp()) + make_interval(secs => $2)
               ELSE tat END
WHERE budget = $1
RETURNING greatest(extract(epoch FROM
                       CASE WHEN granted THEN tat - make_interval(secs => $2)
                            ELSE greatest(tat, clock_timestamp()) END
                       - clock_timestamp())::float8 - $3, 0) AS wait,
          granted";

/// No places before `$2` seconds from now (a 429's `Retry-After`), for every replica.
const PAUSE: &str =
    "UPDATE rate_budgets SET tat = greatest(tat, clock_timestamp() + make_interval(secs => $2)) \
     WHERE budget = $1";

const CREATE: &str = "INSERT INTO rate_budgets (budget, tat) VALUES ($1, clock_timestamp()) \
     ON CONFLICT (budget) DO NOTHING";

/// `limit` calls per `period` for one vendor account, across every replica.
pub struct SharedGate {
    pool: PgPool,
    budget: String,
    spacing: Duration,
    tolerance: f64,
    /// How late after its place a call may still go (see [`LATENESS_FLOOR`]).
    lateness: Duration,
}

/// The least lateness a call may have and still use its place. Half a spacing alone is below a
/// database round trip once the spacing is under a few milliseconds (a limit of thousands a
/// minute), and below a busy machine's scheduling delay well before that: every place would then
/// be given up and no call would ever go. The places this allows late are paid for with spare
/// slots (see [`SharedGate::new`]); it changes nothing for limits under 2,400 a minute.
const LATENESS_FLOOR: Duration = Duration::from_millis(25);

/// Places given up for lateness before the call is handed back as back-pressure.
const MAX_RETAKES: usize = 4;

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
        SharedGate {
            pool,
            budget,
            spacing,
            tolerance: spacing.as_secs_f64() * f64::from(burst - 1),
            lateness,
        }
    }

    async fn take(&self, max_wait: Duration) -> Result<(f64, bool), sqlx::Error> {
        for _ in 0..2 {
            let row: Option<(f64, bool)> = sqlx::query_as(TAKE)
                .bind(&self.budget)
                .bind(self.spacing.as_secs_f64())
                .bind(self.tolerance)
                .bind(max_wait.as_secs_f64().min(1e9))
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = row {
                return Ok(row);
            }
            sqlx::query(CREATE)
                .bind(&self.budget)
                .execute(&self.pool)
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
            // The wait counts from when PostgreSQL read the row, which is after `sent`: counting
            // it from `sent` errs early by at most the round trip, and every delay after the
            // read (the answer's way back, a busy machine) shows as lateness below.
            let sent = Instant::now();
            match self.take(left).await {
                Ok((wait, true)) => {
                    let place = sent + Duration::from_secs_f64(wait);
                    tokio::time::sleep_until(place).await;
                    // A call that goes well after its place would bunch with the next ones: it
                    // gives the place up and takes a new one instead.
                    if place.elapsed() <= self.lateness {
                        return Ok(());
                    }
                }
                Ok((wait, false)) => return Err(Duration::from_secs_f64(wait)),
                Err(error) => {
                    // Without the database there is no shared budget; the call is given back
                    // as back-pressure rather than sent uncounted.
                    tracing::warn!(budget = %self.budget, %error, "shared rate budget unavailable");
                    return Err(Duration::from_secs(1));
                }
            }
        }
        Err(self.spacing)
    }

    async fn pause(&self, delay: Duration) {
        let paused = sqlx::query(PAUSE)
            .bind(&self.budget)
            .bind(delay.as_secs_f64())
            .execute(&self.pool)
            .await;
        if let Err(error) = paused {
            tracing::warn!(budget = %self.budget, %error, "could not share a vendor's pause");
        }
    }
}
