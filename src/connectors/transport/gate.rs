//! Rate gates: what keeps calls to a vendor under its limits. One trait, one implementation per
//! kind of limit, composed per client ([`Gates`]).
//!
//! | kind | type | for |
//! |---|---|---|
//! | N calls per period, evenly spaced | [`Spacing`] (governor's GCRA, burst 1) | PowerOffice's 10 a second, Zendesk's plan limit per minute and its export limit |
//! | at most N calls in any window, bursts allowed | [`Window`] (a sliding log) | Exact's 60 a minute |
//! | what the vendor's quota headers say is left | [`super::quota::QuotaGate`] | Zendesk `X-Rate-Limit-Remaining`, Exact `X-RateLimit-*` |
//! | "wait" from the vendor | [`Pause`] | `Retry-After` on a 429 |
//! | a budget shared by every replica | [`super::shared::SharedGate`] (PostgreSQL) | per-account limits across replicas |
//!
//! Why two in-process kinds: a vendor that counts calls per window refuses the call that makes
//! it N+1 in the window. Evenly spaced calls (GCRA with a burst of one) can never do that; GCRA
//! with a larger burst can (a full burst at the end of a window plus the refill inside the next),
//! so where bursts matter (Exact's 60 a minute) a sliding log gives them without that risk.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use tokio::time::Instant;

/// One kind of limit on calls to a vendor.
///
/// `admit` is called before every call. A gate that would make the call wait longer than
/// `max_wait` takes nothing and answers `Err(wait)`: the caller then gives the job back as
/// back-pressure instead of holding a worker. Composed gates are asked in order, so a place
/// taken in an earlier gate is used up even when a later one refuses (erring on the slow side).
#[async_trait]
pub trait RateGate: Send + Sync {
    /// Waits until one call may go, if that is within `max_wait`.
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration>;

    /// Sees every answer's status and headers (for gates that read quota headers).
    fn observe(&self, _status: StatusCode, _headers: &HeaderMap) {}

    /// The vendor asked for no calls during `delay` (a 429's `Retry-After`).
    async fn pause(&self, _delay: Duration) {}

    /// After a 429 without `Retry-After`: how long until this gate knows the quota comes back.
    fn resume_hint(&self) -> Option<Duration> {
        None
    }
}

/// Every gate of one client, asked in order; a [`Pause`] always comes first.
pub struct Gates {
    pause: Pause,
    gates: Vec<std::sync::Arc<dyn RateGate>>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates::new(Vec::new())
    }
}

impl Gates {
    pub fn new(gates: Vec<std::sync::Arc<dyn RateGate>>) -> Self {
        Gates {
            pause: Pause::default(),
            gates,
        }
    }

    /// Waits for every gate (and `extra`, a gate of this call only); `Err(wait)` as in
    /// [`RateGate::admit`].
    pub async fn admit(
        &self,
        extra: Option<&dyn RateGate>,
        max_wait: Duration,
    ) -> Result<(), Duration> {
        self.pause.admit(max_wait).await?;
        for gate in &self.gates {
            gate.admit(max_wait).await?;
        }
        if let Some(gate) = extra {
            gate.admit(max_wait).await?;
        }
        Ok(())
    }

    pub fn observe(&self, extra: Option<&dyn RateGate>, status: StatusCode, headers: &HeaderMap) {
        for gate in self.gates.iter().map(|g| g.as_ref()).chain(extra) {
            gate.observe(status, headers);
        }
    }

    pub async fn pause(&self, extra: Option<&dyn RateGate>, delay: Duration) {
        self.pause.pause(delay).await;
        for gate in self.gates.iter().map(|g| g.as_ref()).chain(extra) {
            gate.pause(delay).await;
        }
    }

    /// The longest time any gate knows the vendor's quota to be gone for.
    pub fn resume_hint(&self, extra: Option<&dyn RateGate>) -> Option<Duration> {
        self.gates
            .iter()
            .map(|g| g.as_ref())
            .chain(extra)
            .filter_map(|g| g.resume_hint())
            .max()
    }
}

/// `calls` per `period`, evenly spaced (governor's GCRA with a burst of one): never more than
/// `calls` in any window of length `period`.
pub struct Spacing {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl Spacing {
    pub fn new(calls: u32, period: Duration) -> Self {
        let interval = (period / calls.max(1)).max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .expect("a non-zero interval")
            .allow_burst(NonZeroU32::MIN);
        let clock = DefaultClock::default();
        Spacing {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    pub fn per_second(calls: u32) -> Self {
        Spacing::new(calls, Duration::from_secs(1))
    }

    pub fn per_minute(calls: u32) -> Self {
        Spacing::new(calls, Duration::from_secs(60))
    }
}

#[async_trait]
impl RateGate for Spacing {
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration> {
        let deadline = Instant::now().checked_add(max_wait);
        loop {
            match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    if deadline.is_some_and(|d| Instant::now() + wait > d) {
                        return Err(wait);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// At most `limit` calls in any window of `length`, bursts allowed: a log of the calls of the
/// last window. A call past the limit is given the place when the oldest one leaves the window.
pub struct Window {
    limit: usize,
    length: Duration,
    recent: Mutex<VecDeque<Instant>>,
}

impl Window {
    pub fn new(limit: u32, length: Duration) -> Self {
        Window {
            limit: limit.max(1) as usize,
            length,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn per_minute(limit: u32) -> Self {
        Window::new(limit, Duration::from_secs(60))
    }
}

#[async_trait]
impl RateGate for Window {
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration> {
        let place = {
            let mut recent = self.recent.lock().expect("window lock");
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= self.length)
            {
                recent.pop_front();
            }
            let mut place = now;
            if recent.len() >= self.limit {
                place = recent[recent.len() - self.limit] + self.length;
            }
            if let Some(last) = recent.back() {
                place = place.max(*last);
            }
            let wait = place.saturating_duration_since(now);
            if wait > max_wait {
                return Err(wait);
            }
            // Counted at once, so the other tasks of this process see the place as taken.
            recent.push_back(place);
            place
        };
        tokio::time::sleep_until(place).await;
        Ok(())
    }
}

/// No calls until a time the vendor named.
#[derive(Default)]
pub struct Pause {
    until: Mutex<Option<Instant>>,
}

impl Pause {
    fn hold_until(&self, until: Instant) {
        let mut current = self.until.lock().expect("pause lock");
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
    }

    fn wait(&self) -> Duration {
        let current = *self.until.lock().expect("pause lock");
        current.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }
}

#[async_trait]
impl RateGate for Pause {
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration> {
        wait_at_most(self.wait(), max_wait).await
    }

    async fn pause(&self, delay: Duration) {
        self.hold_until(Instant::now() + delay);
    }
}

/// Sleeps `wait` if it is at most `max_wait`, else says how long it would be.
pub(super) async fn wait_at_most(wait: Duration, max_wait: Duration) -> Result<(), Duration> {
    if wait > max_wait {
        return Err(wait);
    }
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn window_allows_a_burst_then_waits_for_the_oldest_to_leave() {
        let window = Window::new(3, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..3 {
            window.admit(LONG).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "a burst up to the limit");
        assert_eq!(
            window.admit(Duration::from_secs(2)).await,
            Err(Duration::from_secs(10)),
            "the fourth call in the window is refused when that wait is too long"
        );
        window.admit(LONG).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn spacing_spreads_calls_evenly() {
        let spacing = Spacing::new(20, Duration::from_secs(1));
        let start = std::time::Instant::now();
        for _ in 0..5 {
            spacing.admit(LONG).await.unwrap();
        }
        // 50 ms apart: the fifth call goes 200 ms after the first.
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
        let refused = spacing.admit(Duration::ZERO).await;
        assert!(
            matches!(refused, Err(wait) if wait > Duration::ZERO),
            "{refused:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_call_until_it_ends() {
        let gates = Gates::default();
        let start = Instant::now();
        gates.pause(None, Duration::from_secs(5)).await;
        assert_eq!(
            gates.admit(None, Duration::from_secs(1)).await,
            Err(Duration::from_secs(5))
        );
        gates.admit(None, LONG).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
