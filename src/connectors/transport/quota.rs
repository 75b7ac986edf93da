//! The vendor's own count of what is left: quota headers on every answer, read into a gate.
//!
//! Zendesk sends `X-Rate-Limit` / `X-Rate-Limit-Remaining` and `ratelimit-reset` (seconds);
//! Exact Online sends `X-RateLimit-Minutely-Remaining` / `-Reset` and `X-RateLimit-Remaining` /
//! `-Reset` (the day), resets as epoch milliseconds (docs/vendors.md). The two vendors are
//! treated differently when little is left, see [`LowQuota`].

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use tokio::time::Instant;

use super::gate::{wait_at_most, RateGate};

/// How a reset header states its time.
#[derive(Debug, Clone, Copy)]
pub enum ResetFormat {
    /// Seconds from now (Zendesk's `ratelimit-reset`).
    SecondsFromNow,
    /// A point in time since the epoch, in milliseconds (values that look like seconds are
    /// accepted too) (Exact's `X-RateLimit-Reset`).
    EpochTime,
}

/// What to do when the quota runs low.
#[derive(Debug, Clone, Copy)]
pub enum LowQuota {
    /// At most a tenth of the limit left (or 10 without a limit header): spread the calls left
    /// over the time until the reset, so the client slows down before it earns a 429.
    Spread,
    /// Call until none is left, counting this process's calls in between; then wait for the
    /// reset (or give the job back when that is further away than the caller may wait).
    StopAtZero,
}

/// Which headers carry one quota, and what to do when it runs low.
#[derive(Debug, Clone, Copy)]
pub struct QuotaHeaders {
    pub remaining: &'static str,
    pub limit: Option<&'static str>,
    pub reset: &'static str,
    pub reset_format: ResetFormat,
    /// The quota's window when no reset header came.
    pub window: Duration,
    pub low: LowQuota,
}

#[derive(Default)]
struct QuotaState {
    remaining: Option<i64>,
    limit: Option<i64>,
    reset_at: Option<DateTime<Utc>>,
    /// `Spread`: no call before this.
    hold_until: Option<Instant>,
}

/// A gate fed by one quota's headers.
pub struct QuotaGate {
    headers: QuotaHeaders,
    state: Mutex<QuotaState>,
}

impl QuotaGate {
    pub fn new(headers: QuotaHeaders) -> Self {
        QuotaGate {
            headers,
            state: Mutex::new(QuotaState::default()),
        }
    }

    fn until_reset(state: &QuotaState) -> Option<Duration> {
        let reset = state.reset_at?;
        let now = Utc::now();
        (reset > now).then(|| (reset - now).to_std().unwrap_or_default())
    }

    /// `Spread`: the pause before the next call when the quota is low.
    fn spread_pause(&self, state: &QuotaState) -> Option<Duration> {
        spread(
            state.remaining?,
            state.limit,
            Self::until_reset(state).unwrap_or(self.headers.window),
        )
    }
}

/// The pause that spreads the calls left over the time to the reset, once at most a tenth of
/// `limit` (or 10 without a limit) is left.
fn spread(remaining: i64, limit: Option<i64>, to_reset: Duration) -> Option<Duration> {
    let remaining = remaining.max(0);
    let low_mark = limit.map_or(10, |l| (l / 10).max(1));
    if remaining > low_mark {
        return None;
    }
    Some(to_reset / (remaining as u32 + 1))
}

fn header_int(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn epoch(value: i64) -> Option<DateTime<Utc>> {
    if value > 1_000_000_000_000 {
        Utc.timestamp_millis_opt(value).single()
    } else {
        Utc.timestamp_opt(value, 0).single()
    }
}

#[async_trait]
impl RateGate for QuotaGate {
    async fn admit(&self, max_wait: Duration) -> Result<(), Duration> {
        let wait = {
            let mut state = self.state.lock().expect("quota lock");
            match self.headers.low {
                LowQuota::Spread => state.hold_until.map_or(Duration::ZERO, |until| {
                    until.saturating_duration_since(Instant::now())
                }),
                LowQuota::StopAtZero => {
                    let exhausted = state.remaining.is_some_and(|r| r <= 0);
                    let wait = Self::until_reset(&state)
                        .filter(|_| exhausted)
                        .unwrap_or_default();
                    if wait <= max_wait {
                        // Count this call at once, so calls made before its answer arrives
                        // (other tasks of this process) see it; the answer's headers then
                        // replace the estimate.
                        if let Some(r) = state.remaining.as_mut() {
                            *r -= 1;
                        }
                    }
                    wait
                }
            }
        };
        wait_at_most(wait, max_wait).await
    }

    fn observe(&self, _status: StatusCode, headers: &HeaderMap) {
        let names = self.headers;
        let mut state = self.state.lock().expect("quota lock");
        if let Some(remaining) = header_int(headers, names.remaining) {
            state.remaining = Some(remaining);
        }
        if let Some(limit) = names.limit.and_then(|n| header_int(headers, n)) {
            state.limit = Some(limit);
        }
        if let Some(reset) = header_int(headers, names.reset) {
            state.reset_at = match names.reset_format {
                ResetFormat::SecondsFromNow => {
                    Some(Utc::now() + chrono::Duration::seconds(reset.max(0)))
                }
                ResetFormat::EpochTime => epoch(reset),
            };
        }
        if let LowQuota::Spread = names.low {
            let pause = self.spread_pause(&state);
            if let Some(pause) = pause {
                tracing::debug!(?pause, "rate quota low; slowing down");
                let until = Instant::now() + pause;
                if state.hold_until.is_none_or(|h| h < until) {
                    state.hold_until = Some(until);
                }
            }
        }
    }

    fn resume_hint(&self) -> Option<Duration> {
        let state = self.state.lock().expect("quota lock");
        if state.remaining.is_some_and(|r| r <= 0) {
            Self::until_reset(&state)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn spread_divides_the_time_to_reset_among_the_calls_left() {
        let secs = Duration::from_secs;
        assert_eq!(spread(500, Some(700), secs(60)), None);
        assert_eq!(spread(9, Some(700), secs(30)), Some(secs(3)));
        assert_eq!(spread(0, Some(700), secs(30)), Some(secs(30)));
        assert_eq!(spread(10, None, secs(60)), Some(secs(60) / 11));
        assert_eq!(spread(11, None, secs(60)), None);
    }

    #[test]
    fn spread_reads_zendesk_headers_and_holds_calls() {
        let gate = QuotaGate::new(crate::connectors::zendesk::QUOTA_HEADERS);
        let mut headers = HeaderMap::new();
        headers.insert("x-rate-limit", HeaderValue::from(700));
        headers.insert("x-rate-limit-remaining", HeaderValue::from(0));
        gate.observe(StatusCode::OK, &headers);
        // No reset header: the quota's window (a minute) is spread over the one call left.
        let state = gate.state.lock().unwrap();
        assert_eq!(gate.spread_pause(&state), Some(Duration::from_secs(60)));
        assert!(state.hold_until.is_some());
    }

    #[tokio::test]
    async fn stop_at_zero_refuses_until_the_reset_and_counts_locally() {
        let gate = QuotaGate::new(QuotaHeaders {
            remaining: "x-ratelimit-remaining",
            limit: None,
            reset: "x-ratelimit-reset",
            reset_format: ResetFormat::EpochTime,
            window: Duration::from_secs(86_400),
            low: LowQuota::StopAtZero,
        });
        let in_an_hour = (Utc::now() + chrono::Duration::hours(1)).timestamp_millis();
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining", HeaderValue::from(2));
        headers.insert("x-ratelimit-reset", HeaderValue::from(in_an_hour));
        gate.observe(StatusCode::OK, &headers);
        gate.admit(Duration::ZERO).await.unwrap();
        gate.admit(Duration::ZERO).await.unwrap();
        match gate.admit(Duration::from_secs(2)).await {
            Err(wait) => assert!(wait > Duration::from_secs(3500), "{wait:?}"),
            Ok(()) => panic!("the third call of two left must wait for the reset"),
        }
        assert!(gate.resume_hint().unwrap() > Duration::from_secs(3500));
    }
}
