//! What every simulator shares: fault knobs, the one fixed-window limiter ([`FixedWindow`]),
//! request counters with the peak rates seen ([`PeakRates`]), the `/_sim/*` control endpoints, an in-order webhook sender, and serving on a pre-bound listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Faults a test or the sandbox can switch on. All default to off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Share of API requests answered with a 500 (0.0 to 1.0).
    pub error_rate: f64,
    /// Share of API requests answered with a 429 regardless of the rate limit.
    pub rate_429: f64,
    /// Added to every API request before it is handled, in milliseconds.
    pub latency_ms: u64,
    /// Share of webhooks silently not sent.
    pub drop_webhooks: f64,
    /// Added before each webhook is delivered, in milliseconds: vendors send webhooks from a
    /// queue of their own, after the change and its answer (Zendesk's arrive seconds later), while
    /// the simulators send at once. A lane's webhooks wait one after the other.
    pub webhook_latency_ms: u64,
    /// Requests allowed per window before 429s (`None`: unlimited).
    pub rate_limit: Option<u32>,
    /// The rate-limit window in milliseconds (default one minute).
    pub rate_window_ms: Option<u64>,
    /// Share of API requests answered late: handled at once (the change is made), the answer held
    /// back `slow_ms`, as a vendor whose answer outlives the client's timeout.
    pub slow_rate: f64,
    /// How long a slow answer is held back, in milliseconds.
    pub slow_ms: u64,
    /// Slow answers only to writes (not GET): a read still answers in time, the write's answer
    /// is lost.
    pub slow_writes_only: bool,
    /// Share of webhooks delivered twice (the same delivery id, as vendors redeliver).
    pub duplicate_webhooks: f64,
    /// Share of webhooks held back and delivered after the next webhook of their lane (out of
    /// order), or after `REORDER_HOLD` when no other webhook comes.
    pub reorder_webhooks: f64,
    /// Delivery attempts of one webhook before it is given up (default 4); vendors retry failed
    /// deliveries for hours, so a run with an outage longer than a few seconds sets more.
    pub webhook_attempts: Option<u32>,
}

/// The longest a webhook held back to be delivered out of order waits for a later one.
pub const REORDER_HOLD: Duration = Duration::from_millis(500);

/// The longest pause between two attempts to deliver a webhook.
const MAX_DELIVERY_PAUSE: Duration = Duration::from_secs(3);

/// Builds the vendor's own error body for a status the kit produces (429, 500, 401).
pub type ErrorBody = fn(StatusCode, &str) -> Response;

/// The one limiter of every simulator: at most `limit` requests per fixed window of `length`
/// (the window starts with its first request after the previous one ended), as vendors that
/// count per window do.
#[derive(Debug, Clone)]
pub struct FixedWindow {
    pub limit: u32,
    pub length: Duration,
    started: Instant,
    used: u32,
}

impl FixedWindow {
    pub fn new(limit: u32, length: Duration) -> Self {
        FixedWindow {
            limit,
            length,
            started: Instant::now(),
            used: 0,
        }
    }

    fn roll(&mut self) {
        if self.started.elapsed() >= self.length {
            self.started = Instant::now();
            self.used = 0;
        }
    }

    /// Counts one request; `Err(time until the window resets)` when the window is used up.
    pub fn take(&mut self) -> Result<(), Duration> {
        self.roll();
        if self.used >= self.limit {
            return Err(self.resets_in());
        }
        self.used += 1;
        Ok(())
    }

    /// Requests left in the current window.
    pub fn remaining(&mut self) -> u32 {
        self.roll();
        self.limit.saturating_sub(self.used)
    }

    /// Time until the current window ends.
    pub fn resets_in(&self) -> Duration {
        self.length.saturating_sub(self.started.elapsed())
    }
}

/// The most API requests a simulator saw in one second and in one minute (fixed windows), for
/// tests that check clients stayed under a vendor's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeakRates {
    pub per_second: u64,
    pub per_minute: u64,
}

struct PeakCounter {
    length: Duration,
    started: Instant,
    count: u64,
    peak: u64,
}

impl PeakCounter {
    fn new(length: Duration) -> Self {
        PeakCounter {
            length,
            started: Instant::now(),
            count: 0,
            peak: 0,
        }
    }

    fn record(&mut self) {
        if self.started.elapsed() >= self.length {
            self.started = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.peak = self.peak.max(self.count);
    }
}

struct ControlInner {
    faults: Mutex<Faults>,
    counters: Mutex<BTreeMap<String, u64>>,
    window: Mutex<FixedWindow>,
    peaks: Mutex<(PeakCounter, PeakCounter)>,
    /// 429 answers given (the rate limit or an injected one).
    throttled: std::sync::atomic::AtomicU64,
    /// Endpoints (`"METHOD /route"`) the vendor's limit does not count (token endpoints): they
    /// are counted, but not in the peak rates.
    unlimited: Mutex<Vec<String>>,
    error_body: ErrorBody,
}

/// Shared handle to a simulator's knobs and counters.
#[derive(Clone)]
pub struct SimControl {
    inner: Arc<ControlInner>,
}

impl SimControl {
    pub fn new(error_body: ErrorBody) -> Self {
        SimControl {
            inner: Arc::new(ControlInner {
                faults: Mutex::new(Faults::default()),
                counters: Mutex::new(BTreeMap::new()),
                window: Mutex::new(FixedWindow::new(u32::MAX, Duration::from_secs(60))),
                peaks: Mutex::new((
                    PeakCounter::new(Duration::from_secs(1)),
                    PeakCounter::new(Duration::from_secs(60)),
                )),
                throttled: std::sync::atomic::AtomicU64::new(0),
                unlimited: Mutex::new(Vec::new()),
                error_body,
            }),
        }
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults.lock().unwrap().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        let window = FixedWindow::new(
            faults.rate_limit.unwrap_or(u32::MAX),
            Duration::from_millis(faults.rate_window_ms.unwrap_or(60_000)),
        );
        *self.inner.faults.lock().unwrap() = faults;
        *self.inner.window.lock().unwrap() = window;
    }

    /// The most API requests seen in one second and in one minute since the start.
    pub fn peak_rates(&self) -> PeakRates {
        let peaks = self.inner.peaks.lock().unwrap();
        PeakRates {
            per_second: peaks.0.peak,
            per_minute: peaks.1.peak,
        }
    }

    /// Requests per endpoint, keyed `"METHOD /route/pattern"` (e.g. `"PUT /api/v2/organizations/{id}"`).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.inner.counters.lock().unwrap().clone()
    }

    /// Requests to one endpoint so far.
    pub fn count(&self, key: &str) -> u64 {
        self.inner
            .counters
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Sum of the counters whose key starts with `method` (e.g. all `PUT`s, all `POST`s).
    pub fn count_method(&self, method: &str) -> u64 {
        self.inner
            .counters
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.split(' ').next() == Some(method))
            .map(|(_, v)| *v)
            .sum()
    }

    /// 429 answers given so far.
    pub fn throttled(&self) -> u64 {
        self.inner
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn reset_counters(&self) {
        self.inner.counters.lock().unwrap().clear();
    }

    /// Counts something that is not a request (no effect on the peak rates).
    fn note(&self, key: &str) {
        *self
            .inner
            .counters
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_insert(0) += 1;
    }

    /// Leaves an endpoint (`"POST /OAuth/Token"`) out of the peak rates, as the vendor's limit
    /// leaves it out (the simulator's own limiter does not apply to it either).
    pub fn leave_out_of_peaks(&self, key: &str) {
        self.inner.unlimited.lock().unwrap().push(key.to_owned());
    }

    fn record(&self, key: String) {
        let unlimited = self.inner.unlimited.lock().unwrap().contains(&key);
        *self.inner.counters.lock().unwrap().entry(key).or_insert(0) += 1;
        if unlimited {
            return;
        }
        let mut peaks = self.inner.peaks.lock().unwrap();
        peaks.0.record();
        peaks.1.record();
    }

    /// The rate-limit window as a vendor reports it in headers: `(limit, remaining, seconds until
    /// the window resets)`, or `None` when no limit is set.
    pub fn rate_status(&self) -> Option<(u32, u32, u64)> {
        let limit = self.faults().rate_limit?;
        let mut window = self.inner.window.lock().unwrap();
        let remaining = window.remaining();
        let reset = window.resets_in().as_secs_f64().ceil() as u64;
        Some((limit, remaining, reset))
    }

    /// Takes one request from the rate-limit window; `Err(seconds to wait)` when it is used up.
    fn take_rate(&self, faults: &Faults) -> Result<(), u64> {
        if faults.rate_limit.is_none() {
            return Ok(());
        }
        let taken = self.inner.window.lock().unwrap().take();
        taken.map_err(|left| left.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Whether to drop this webhook (the `drop_webhooks` knob).
    pub fn should_drop_webhook(&self) -> bool {
        let share = self.faults().drop_webhooks;
        share > 0.0 && rand::thread_rng().gen::<f64>() < share
    }
}

/// Middleware for a simulator's API routes: counts the request, then applies latency, the rate
/// limit and injected faults, in that order.
pub async fn api_layer(
    State(control): State<SimControl>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    control.record(format!("{} {}", request.method(), route));
    let faults = control.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if let Err(wait) = control.take_rate(&faults) {
        return too_many(&control, wait);
    }
    let (forced_429, forced_500) = {
        let mut rng = rand::thread_rng();
        (
            faults.rate_429 > 0.0 && rng.gen::<f64>() < faults.rate_429,
            faults.error_rate > 0.0 && rng.gen::<f64>() < faults.error_rate,
        )
    };
    if forced_429 {
        return too_many(&control, 1);
    }
    if forced_500 {
        return (control.inner.error_body)(StatusCode::INTERNAL_SERVER_ERROR, "injected fault");
    }
    let slow = faults.slow_rate > 0.0
        && !(faults.slow_writes_only && request.method() == axum::http::Method::GET)
        && rand::thread_rng().gen::<f64>() < faults.slow_rate;
    let response = next.run(request).await;
    if slow {
        // The change is made; only the answer is late (a client that gave up never sees it).
        control.note("slow answers");
        tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
    }
    response
}

fn too_many(control: &SimControl, retry_after_secs: u64) -> Response {
    control
        .inner
        .throttled
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut response =
        (control.inner.error_body)(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    response.headers_mut().insert(
        HeaderName::from_static("retry-after"),
        HeaderValue::from(retry_after_secs),
    );
    response
}

/// Wraps a simulator's API router with [`api_layer`] and adds the control endpoints:
/// `GET /_sim/counters`, `PUT /_sim/faults`, `POST /_sim/reset-counters`.
pub fn with_kit(api: Router, control: SimControl) -> Router {
    let api = api.layer(middleware::from_fn_with_state(control.clone(), api_layer));
    let admin = Router::new()
        .route("/_sim/counters", get(get_counters))
        .route("/_sim/peaks", get(get_peaks))
        .route("/_sim/faults", put(put_faults).get(get_faults))
        .route("/_sim/reset-counters", post(reset_counters))
        .with_state(control);
    api.merge(admin)
}

async fn get_counters(State(control): State<SimControl>) -> Json<BTreeMap<String, u64>> {
    Json(control.counters())
}

async fn get_peaks(State(control): State<SimControl>) -> Json<PeakRates> {
    Json(control.peak_rates())
}

async fn get_faults(State(control): State<SimControl>) -> Json<Faults> {
    Json(control.faults())
}

async fn put_faults(State(control): State<SimControl>, Json(faults): Json<Faults>) -> StatusCode {
    control.set_faults(faults);
    StatusCode::NO_CONTENT
}

async fn reset_counters(State(control): State<SimControl>) -> StatusCode {
    control.reset_counters();
    StatusCode::NO_CONTENT
}

/// A simulator serving on a loopback port until stopped or dropped.
pub struct RunningSim {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningSim {
    /// `http://127.0.0.1:port`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `router` on `bind` (use port 0 for any free port).
pub async fn serve(router: Router, bind: SocketAddr) -> std::io::Result<RunningSim> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await;
    });
    Ok(RunningSim {
        addr,
        stop,
        task: Some(task),
    })
}

/// One webhook to deliver: the body and the headers that sign it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub body: Vec<u8>,
    pub headers: HeaderMap,
    /// The record the webhook is about (e.g. `"organization/42"`). Webhooks of one record leave
    /// in the order they were made, whatever the number of lanes.
    pub record: String,
}

/// Sends a simulator's webhooks to a target URL from background tasks ("lanes"). With one lane
/// (the default) every webhook leaves in the order it was made; with more, webhooks of one record
/// still do, while different records are delivered concurrently, as a vendor's delivery fleet
/// does under load. A failed delivery (connection error or 5xx/429) is retried a few times with a
/// short pause, as vendors do; after that it is given up and counted.
#[derive(Clone)]
pub struct WebhookSender {
    /// Each message carries its own URL when the vendor delivers to registered endpoints.
    lanes: Vec<mpsc::UnboundedSender<(Option<String>, Outgoing)>>,
    stats: Arc<Mutex<WebhookStats>>,
}

/// What happened to the webhooks a simulator sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    pub delivered: u64,
    pub dropped: u64,
    pub failed: u64,
    /// Deliveries made a second time on purpose (`Faults::duplicate_webhooks`).
    pub duplicated: u64,
    /// Webhooks sent after a later one (`Faults::reorder_webhooks`).
    pub reordered: u64,
    /// Delivery attempts that failed before a later one succeeded or the webhook was given up.
    pub retried: u64,
}

impl WebhookSender {
    /// One lane: strictly in order. `target`: the full URL (e.g.
    /// `http://127.0.0.1:8080/webhooks/zendesk`); `None` sends nothing.
    pub fn new(target: Option<String>, control: SimControl) -> Self {
        Self::with_lanes(target, control, 1)
    }

    /// `lanes` concurrent deliveries (at least one), in order per record.
    pub fn with_lanes(target: Option<String>, control: SimControl, lanes: usize) -> Self {
        let stats = Arc::new(Mutex::new(WebhookStats::default()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client builds");
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (queue, rx) = mpsc::unbounded_channel::<(Option<String>, Outgoing)>();
                tokio::spawn(deliver_lane(
                    rx,
                    target.clone(),
                    client.clone(),
                    control.clone(),
                    stats.clone(),
                ));
                queue
            })
            .collect();
        WebhookSender { lanes, stats }
    }

    pub fn send(&self, outgoing: Outgoing) {
        self.enqueue(None, outgoing);
    }

    /// Delivers to `url` instead of the sender's target (a vendor with registered webhooks
    /// delivers to each registration's own endpoint).
    pub fn send_to(&self, url: String, outgoing: Outgoing) {
        self.enqueue(Some(url), outgoing);
    }

    fn enqueue(&self, url: Option<String>, outgoing: Outgoing) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        outgoing.record.hash(&mut hasher);
        let lane = &self.lanes[(hasher.finish() % self.lanes.len() as u64) as usize];
        // The receiver lives as long as the runtime; a send error only means shutdown.
        let _ = lane.send((url, outgoing));
    }

    pub fn stats(&self) -> WebhookStats {
        self.stats.lock().unwrap().clone()
    }
}

/// Delivers one lane's webhooks one after the other; with the reorder fault, one is held back and
/// sent after the next one (or after [`REORDER_HOLD`]).
async fn deliver_lane(
    mut rx: mpsc::UnboundedReceiver<(Option<String>, Outgoing)>,
    target: Option<String>,
    client: reqwest::Client,
    control: SimControl,
    stats: Arc<Mutex<WebhookStats>>,
) {
    let lane = Lane {
        target,
        client,
        control,
        stats,
    };
    let mut held: Option<(Option<String>, Outgoing)> = None;
    loop {
        let next = match held {
            Some(_) => match tokio::time::timeout(REORDER_HOLD, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    lane.deliver(held.take().expect("held")).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(outgoing) = next else {
            if let Some(late) = held.take() {
                lane.deliver(late).await;
            }
            return;
        };
        if held.is_none() && lane.roll(lane.control.faults().reorder_webhooks) {
            held = Some(outgoing);
            continue;
        }
        lane.deliver(outgoing).await;
        if let Some(late) = held.take() {
            lane.stats.lock().unwrap().reordered += 1;
            lane.deliver(late).await;
        }
    }
}

struct Lane {
    target: Option<String>,
    client: reqwest::Client,
    control: SimControl,
    stats: Arc<Mutex<WebhookStats>>,
}

impl Lane {
    fn roll(&self, share: f64) -> bool {
        share > 0.0 && rand::thread_rng().gen::<f64>() < share
    }

    /// Delivers one webhook (twice with the duplicate fault), counting what happened.
    async fn deliver(&self, (url, outgoing): (Option<String>, Outgoing)) {
        let Some(url) = url.as_deref().or(self.target.as_deref()) else {
            return;
        };
        if self.control.should_drop_webhook() {
            self.stats.lock().unwrap().dropped += 1;
            return;
        }
        let faults = self.control.faults();
        if faults.webhook_latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.webhook_latency_ms)).await;
        }
        let twice = self.roll(faults.duplicate_webhooks);
        let attempts = faults.webhook_attempts.unwrap_or(4).max(1);
        let delivered = self.attempt(url, &outgoing, attempts).await;
        {
            let mut stats = self.stats.lock().unwrap();
            if delivered {
                stats.delivered += 1;
            } else {
                stats.failed += 1;
            }
        }
        if twice && delivered {
            self.stats.lock().unwrap().duplicated += 1;
            // A redelivery that fails is not a lost webhook: the first one arrived.
            self.attempt(url, &outgoing, attempts).await;
        }
    }

    /// Up to `attempts` tries with a doubling pause (at most [`MAX_DELIVERY_PAUSE`]); whether one
    /// got a 2xx. A 4xx other than 429 is final.
    async fn attempt(&self, url: &str, outgoing: &Outgoing, attempts: u32) -> bool {
        for attempt in 0..attempts {
            let result = self
                .client
                .post(url)
                .headers(outgoing.headers.clone())
                .header("content-type", "application/json")
                .body(outgoing.body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) if r.status().is_client_error() && r.status() != 429 => return false,
                _ => {
                    self.stats.lock().unwrap().retried += 1;
                    let pause = Duration::from_millis(200 << attempt.min(8));
                    tokio::time::sleep(pause.min(MAX_DELIVERY_PAUSE)).await;
                }
            }
        }
        false
    }
}

/// A plain JSON error response, for simulators whose vendor has no richer error shape.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Lets a simulator answer with a prepared response body and status in one expression.
pub fn respond(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

/// Convenience for handlers that need an empty body with a status.
pub fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

/// A strictly increasing change time in microseconds (what the simulated APIs show): now, or one
/// microsecond after the previous stamp when the clock has not moved on.
pub fn next_stamp(last: &mut chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let stamp = now.max(*last + chrono::Duration::microseconds(1));
    *last = stamp;
    stamp
}

/// Whether the request carries `Authorization: Bearer <token>`.
pub fn has_bearer(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_refuses_past_its_limit_until_it_resets() {
        let mut window = FixedWindow::new(2, Duration::from_millis(200));
        assert!(window.take().is_ok());
        assert!(window.take().is_ok());
        assert_eq!(window.remaining(), 0);
        assert!(matches!(window.take(), Err(wait) if wait <= Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(window.remaining(), 2);
        assert!(window.take().is_ok());
    }

    #[test]
    fn peak_rates_keep_the_busiest_second_and_minute() {
        let control = SimControl::new(json_error);
        for _ in 0..3 {
            control.record("GET /x".to_owned());
        }
        std::thread::sleep(Duration::from_millis(1010));
        control.record("GET /x".to_owned());
        assert_eq!(
            control.peak_rates(),
            PeakRates {
                per_second: 3,
                per_minute: 4
            }
        );
    }

    #[test]
    fn peak_rates_leave_out_endpoints_outside_the_vendor_limit() {
        let control = SimControl::new(json_error);
        control.leave_out_of_peaks("POST /OAuth/Token");
        control.record("GET /x".to_owned());
        control.record("POST /OAuth/Token".to_owned());
        assert_eq!(control.peak_rates().per_second, 1);
        assert_eq!(control.count("POST /OAuth/Token"), 1);
    }

    /// A webhook receiver recording bodies in arrival order; the first `fail_first` requests
    /// are answered 503.
    async fn receiver(fail_first: usize) -> (RunningSim, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, count) = (seen.clone(), calls.clone());
        let app = Router::new().route(
            "/",
            post(move |body: String| async move {
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                log.lock().unwrap().push(body);
                StatusCode::OK
            }),
        );
        let running = serve(app, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        (running, seen)
    }

    fn webhook(body: &str) -> Outgoing {
        Outgoing {
            body: body.as_bytes().to_vec(),
            headers: HeaderMap::new(),
            record: "one record".to_owned(),
        }
    }

    async fn wait_for(seen: &Arc<Mutex<Vec<String>>>, count: usize) -> Vec<String> {
        for _ in 0..100 {
            if seen.lock().unwrap().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn the_duplicate_fault_delivers_one_webhook_twice() {
        let (running, seen) = receiver(0).await;
        let control = SimControl::new(json_error);
        control.set_faults(Faults {
            duplicate_webhooks: 1.0,
            ..Faults::default()
        });
        let sender = WebhookSender::new(Some(running.base_url()), control);
        sender.send(webhook("a"));
        assert_eq!(wait_for(&seen, 2).await, ["a", "a"]);
        let stats = sender.stats();
        assert_eq!((stats.delivered, stats.duplicated), (1, 1));
    }

    #[tokio::test]
    async fn the_reorder_fault_sends_a_held_webhook_after_the_next_one() {
        let (running, seen) = receiver(0).await;
        let control = SimControl::new(json_error);
        control.set_faults(Faults {
            reorder_webhooks: 1.0,
            ..Faults::default()
        });
        let sender = WebhookSender::new(Some(running.base_url()), control);
        for body in ["a", "b", "c"] {
            sender.send(webhook(body));
        }
        // `a` waits behind `b`; `c` is held too and goes alone after REORDER_HOLD.
        assert_eq!(wait_for(&seen, 3).await, ["b", "a", "c"]);
        assert_eq!(sender.stats().reordered, 1);
    }

    #[tokio::test]
    async fn failed_deliveries_are_retried_up_to_webhook_attempts() {
        let (running, seen) = receiver(2).await;
        let control = SimControl::new(json_error);
        control.set_faults(Faults {
            webhook_attempts: Some(3),
            ..Faults::default()
        });
        let sender = WebhookSender::new(Some(running.base_url()), control.clone());
        sender.send(webhook("a"));
        assert_eq!(wait_for(&seen, 1).await, ["a"]);
        let stats = sender.stats();
        assert_eq!((stats.delivered, stats.retried, stats.failed), (1, 2, 0));

        let (running, seen) = receiver(5).await;
        let sender = WebhookSender::new(Some(running.base_url()), control);
        sender.send(webhook("b"));
        for _ in 0..100 {
            if sender.stats().failed == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((sender.stats().failed, seen.lock().unwrap().len()), (1, 0));
    }

    #[tokio::test]
    async fn a_slow_answer_makes_the_change_and_answers_after_the_client_gave_up() {
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = made.clone();
        let api = Router::new().route(
            "/things",
            post(move || async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                StatusCode::CREATED
            }),
        );
        let control = SimControl::new(json_error);
        control.set_faults(Faults {
            slow_rate: 1.0,
            slow_ms: 1_000,
            ..Faults::default()
        });
        let running = serve(
            with_kit(api, control),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await
        .unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let answer = client
            .post(format!("{}/things", running.base_url()))
            .send()
            .await;
        assert!(answer.is_err_and(|e| e.is_timeout()));
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
