//! Outbound HTTP shared by every connector: the client with its timeout, a client-side rate
//! limiter, and the mapping of vendor answers to [`ConnectorError`].

use std::time::Duration;

use tokio::time::Instant;

use reqwest::header::HeaderMap;
use reqwest::{Response, StatusCode};
use tokio::sync::Mutex;

use super::ConnectorError;
use crate::domain::SystemId;

/// A client with a timeout on every call (no call may hang a worker past its lease).
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client with rustls builds")
}

/// `Retry-After` in seconds (the form vendors here use), if present and sane.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Maps a transport error.
pub fn send_error(system: SystemId, error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::Timeout { system }
    } else {
        ConnectorError::Transient {
            system,
            message: format!("request failed: {}", without_url(&error)),
        }
    }
}

/// reqwest's messages include the URL, which may carry a query with tokens; keep only the kind.
fn without_url(error: &reqwest::Error) -> String {
    let mut owned = error.to_string();
    if let Some(url) = error.url() {
        owned = owned.replace(url.as_str(), "<url>");
    }
    owned
}

/// Passes a success through and turns every other answer into the right [`ConnectorError`].
/// 404 is returned as `Ok` so callers can decide whether it means "gone".
pub async fn check(system: SystemId, response: Response) -> Result<Response, ConnectorError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_FOUND {
        return Ok(response);
    }
    let retry = retry_after(response.headers());
    let body = response.text().await.unwrap_or_default();
    let message: String = body.chars().take(300).collect();
    Err(match status {
        StatusCode::TOO_MANY_REQUESTS => ConnectorError::RateLimited {
            system,
            retry_after: retry,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ConnectorError::Unauthorized { system, message }
        }
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
            ConnectorError::Timeout { system }
        }
        s if s.is_server_error() => ConnectorError::Transient {
            system,
            message: format!("{s}: {message}"),
        },
        s => ConnectorError::Rejected {
            system,
            status: s.as_u16(),
            message,
        },
    })
}

/// Keeps a client under a vendor's request rate: at most `per_window` calls per `window`,
/// spaced evenly, and paused outright when the vendor says to wait (`Retry-After`, or its
/// remaining-quota header running low).
pub struct RateLimiter {
    interval: Duration,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    next_slot: Instant,
    paused_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        RateLimiter {
            interval: window / per_window.max(1),
            state: Mutex::new(LimiterState {
                next_slot: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        let wait_until = {
            let mut state = self.state.lock().await;
            let now = Instant::now();
            let mut slot = state.next_slot.max(now);
            if let Some(paused) = state.paused_until {
                if paused > slot {
                    slot = paused;
                } else if paused <= now {
                    state.paused_until = None;
                }
            }
            state.next_slot = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(wait_until).await;
    }

    /// No calls before `delay` has passed.
    pub async fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut state = self.state.lock().await;
        if state.paused_until.is_none_or(|p| p < until) {
            state.paused_until = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_calls_and_honours_pauses() {
        let limiter = RateLimiter::new(60, Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(1));
        limiter.pause_for(Duration::from_secs(5)).await;
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(6));
    }
}
