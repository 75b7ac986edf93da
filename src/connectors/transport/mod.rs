//! The one way Tether calls a vendor: [`VendorClient`].
//!
//! Every call of every connector goes the same way: rate gates ([`gate`], [`quota`]) →
//! credentials ([`token`], [`refresh`]) → send with the client's timeout → one renewal of the
//! credential on a 401 → on a 429, a pause of every gate for `Retry-After` (or what the quota
//! headers say) → a 5xx to a read tried again up to twice → the answer classified ([`Answer`] or a [`ConnectorError`]) → JSON.
//! Connectors keep only what is vendor-specific: paths, payload mapping, paging, and which gates
//! and token source their vendor needs (docs/vendors.md).
//!
//! May call: `db` (the stored refresh tokens, the shared budgets) and the vendors' HTTP APIs.

pub mod classify;
pub mod gate;
pub mod quota;
pub mod refresh;
pub mod shared;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

pub use classify::{check, malformed, retry_after, send_error};
pub use gate::{Gates, RateGate};
pub use token::{Credential, TokenSource};

use super::ConnectorError;
use crate::domain::SystemId;

/// Where a connector's per-account limits are counted.
#[derive(Clone)]
pub enum Budgets {
    /// In this process only (tests; a single process).
    Local,
    /// In PostgreSQL's `rate_budgets`, shared by every replica ([`shared::SharedGate`]).
    Shared(sqlx::PgPool),
}

impl Budgets {
    /// `calls` per `period` for the budget `name` (vendor, account and limit, no secrets),
    /// letting `burst` calls go at once where the budget is shared.
    pub fn gate(
        &self,
        name: String,
        calls: u32,
        period: Duration,
        burst: u32,
    ) -> Arc<dyn RateGate> {
        match self {
            Budgets::Local => Arc::new(gate::Spacing::new(calls, period)),
            Budgets::Shared(pool) => Arc::new(shared::SharedGate::new(
                pool.clone(),
                name,
                calls,
                period,
                burst,
            )),
        }
    }
}

/// A short, stable name for an account identified by a secret (a subscription key): the first
/// 16 hex digits of its SHA-256, never the secret itself.
pub fn account_tag(secret: &SecretString) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(secret.expose_secret().as_bytes()))[..16].to_owned()
}

/// A gate's wait up to this long is slept inline; a longer one is returned as back-pressure
/// ([`ConnectorError::RateLimited`]) so the worker is not held.
pub const DEFAULT_MAX_INLINE_WAIT: Duration = Duration::from_secs(30);

/// A gate's wait at least this long counts in `tether_vendor_throttled_total` (shorter ones are
/// the ordinary spacing of calls, not throttling).
const COUNTED_WAIT: Duration = Duration::from_secs(1);

/// A 5xx answer to a read is tried again this many times at once (through the gates again, so
/// the vendor's limits hold) before it becomes a failed job attempt. Found by the chaos suite
/// (issue 19): with one call in ten answered 500, a job of three or four calls failed a third of
/// its attempts, and independent faults alone dead-lettered jobs. Writes are still not repeated
/// here: the job retries them after reading the record again (rule 7), and a create's repeat is
/// settled by its intent and idempotency key.
const SERVER_ERROR_RETRIES: u32 = 2;
/// The pause before such a retry, times the retry's number.
const SERVER_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// Whether the call only reads, so repeating it cannot change anything.
fn repeatable(method: &reqwest::Method) -> bool {
    *method == reqwest::Method::GET || *method == reqwest::Method::HEAD
}

/// A client with a timeout on every call (no call may hang a worker past its lease).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client with rustls builds")
}

/// What a successful call returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A 2xx with a JSON body.
    Json(Value),
    /// A 2xx without a body (204, or an empty 200).
    Empty,
    /// 404: the record (or the collection) does not exist.
    NotFound,
}

impl Answer {
    /// `None` for 404, `Some(Value::Null)` for an empty success.
    pub fn found(self) -> Option<Value> {
        match self {
            Answer::Json(value) => Some(value),
            Answer::Empty => Some(Value::Null),
            Answer::NotFound => None,
        }
    }
}

/// One request: method, URL, optional JSON body and headers, and an extra gate that only
/// this kind of call passes (Zendesk's export limit).
pub struct Call<'a> {
    method: Method,
    url: Url,
    body: Option<&'a Value>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    gate: Option<&'a dyn RateGate>,
}

impl<'a> Call<'a> {
    pub fn new(method: Method, url: Url) -> Self {
        Call {
            method,
            url,
            body: None,
            content_type: "application/json",
            headers: Vec::new(),
            gate: None,
        }
    }

    pub fn get(url: Url) -> Self {
        Call::new(Method::GET, url)
    }

    /// Appends query parameters.
    pub fn query(mut self, pairs: &[(&str, String)]) -> Self {
        if !pairs.is_empty() {
            let mut query = self.url.query_pairs_mut();
            for (k, v) in pairs {
                query.append_pair(k, v);
            }
        }
        self
    }

    /// A JSON body, sent as `application/json` unless [`Call::content_type`] says otherwise.
    pub fn json(mut self, body: &'a Value) -> Self {
        self.body = Some(body);
        self
    }

    /// The body's media type (JSON Patch, JSON merge patch).
    pub fn content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = content_type;
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn gate(mut self, gate: &'a dyn RateGate) -> Self {
        self.gate = Some(gate);
        self
    }
}

/// The client of one vendor account. Cheap to share behind the connector.
pub struct VendorClient {
    system: SystemId,
    http: reqwest::Client,
    tokens: Arc<dyn TokenSource>,
    gates: Arc<Gates>,
    /// Headers on every call, kept secret (PowerOffice's subscription key).
    secret_headers: Vec<(HeaderName, SecretString)>,
    max_inline_wait: Duration,
    /// The pause after a 429 that names no time and no quota reset.
    default_retry_after: Option<Duration>,
}

impl std::fmt::Debug for VendorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorClient")
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl VendorClient {
    pub fn new(
        system: SystemId,
        http: reqwest::Client,
        tokens: Arc<dyn TokenSource>,
        gates: Arc<Gates>,
    ) -> Self {
        VendorClient {
            system,
            http,
            tokens,
            gates,
            secret_headers: Vec::new(),
            max_inline_wait: DEFAULT_MAX_INLINE_WAIT,
            default_retry_after: None,
        }
    }

    /// A header sent on every call whose value is a secret.
    pub fn with_secret_header(mut self, name: &'static str, value: SecretString) -> Self {
        self.secret_headers
            .push((HeaderName::from_static(name), value));
        self
    }

    pub fn with_max_inline_wait(mut self, wait: Duration) -> Self {
        self.max_inline_wait = wait;
        self
    }

    pub fn with_default_retry_after(mut self, wait: Duration) -> Self {
        self.default_retry_after = Some(wait);
        self
    }

    pub fn system(&self) -> SystemId {
        self.system
    }

    /// The gates of this client (for a token source that must pass them too).
    pub fn gates(&self) -> &Arc<Gates> {
        &self.gates
    }

    /// Sends one call through the whole path (module docs) and reads its JSON.
    pub async fn send(&self, call: Call<'_>) -> Result<Answer, ConnectorError> {
        let mut credential = self.tokens.current().await?;
        let mut renewed = false;
        let mut server_errors = 0;
        loop {
            let queued = std::time::Instant::now();
            let admitted = self.gates.admit(call.gate, self.max_inline_wait).await;
            if admitted.is_err() || queued.elapsed() >= COUNTED_WAIT {
                crate::ops::metrics::vendor_throttled(self.system);
            }
            admitted.map_err(|wait| ConnectorError::RateLimited {
                system: self.system,
                retry_after: Some(wait),
            })?;
            tracing::debug!(system = %self.system, method = %call.method, path = call.url.path(), "call");
            let sent = std::time::Instant::now();
            let response = self.request(&call, &credential).send().await;
            let status = response.as_ref().ok().map(|r| r.status().as_u16());
            crate::ops::metrics::vendor_request(self.system, status, sent.elapsed());
            let response = response.map_err(|e| send_error(self.system, e))?;
            let status = response.status();
            self.gates.observe(call.gate, status, response.headers());
            if status == StatusCode::UNAUTHORIZED && !renewed {
                // The access token expired or was revoked mid-run: another one, once.
                if let Some(fresh) = self.tokens.renew(&credential).await? {
                    credential = fresh;
                    renewed = true;
                    continue;
                }
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.rate_limited(&call, response.headers()).await);
            }
            if status.is_server_error()
                && repeatable(&call.method)
                && server_errors < SERVER_ERROR_RETRIES
            {
                server_errors += 1;
                tokio::time::sleep(SERVER_ERROR_PAUSE * server_errors).await;
                continue;
            }
            return self.read(response).await;
        }
    }

    fn request(&self, call: &Call<'_>, credential: &Credential) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(call.method.clone(), call.url.clone())
            .header("accept", "application/json");
        request = credential.apply(request);
        for (name, value) in &self.secret_headers {
            if let Ok(mut value) = HeaderValue::from_str(value.expose_secret()) {
                value.set_sensitive(true);
                request = request.header(name.clone(), value);
            }
        }
        for (name, value) in &call.headers {
            request = request.header(*name, value.as_str());
        }
        if let Some(body) = call.body {
            request = request
                .header("content-type", call.content_type)
                .body(body.to_string());
        }
        request
    }

    /// A 429: every gate of the client holds calls for the wait, which is `Retry-After`, else
    /// when the quota headers say the quota comes back, else the vendor's default.
    async fn rate_limited(
        &self,
        call: &Call<'_>,
        headers: &reqwest::header::HeaderMap,
    ) -> ConnectorError {
        let wait = retry_after(headers)
            .or_else(|| self.gates.resume_hint(call.gate))
            .or(self.default_retry_after);
        if let Some(wait) = wait {
            self.gates.pause(call.gate, wait).await;
        }
        ConnectorError::RateLimited {
            system: self.system,
            retry_after: wait,
        }
    }

    async fn read(&self, response: reqwest::Response) -> Result<Answer, ConnectorError> {
        let response = check(self.system, response).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(Answer::NotFound);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| send_error(self.system, e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Answer::Empty);
        }
        serde_json::from_slice(&bytes)
            .map(Answer::Json)
            .map_err(|e| malformed(self.system, format!("the body is not JSON ({e})")))
    }
}
