//! Credentials for vendor calls: the [`TokenSource`] trait and the sources that need no
//! storage (a fixed token; OAuth2 client credentials). Rotating refresh tokens kept in
//! PostgreSQL are in [`super::refresh`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::classify::{check, malformed, send_error};
use super::gate::Gates;
use crate::connectors::ConnectorError;
use crate::domain::SystemId;

/// What authenticates one call. `Debug` never shows the secret.
#[derive(Clone)]
pub enum Credential {
    /// `Authorization: Bearer <token>`
    Bearer(SecretString),
    /// `Authorization: Basic base64(user:password)` (Zendesk's `{email}/token` + API token).
    Basic {
        user: String,
        password: SecretString,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(<secret>)"),
            Credential::Basic { user, .. } => write!(f, "Basic({user}, <secret>)"),
        }
    }
}

impl Credential {
    pub fn bearer(token: impl Into<String>) -> Self {
        Credential::Bearer(SecretString::from(token.into()))
    }

    pub(super) fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Credential::Bearer(token) => request.bearer_auth(token.expose_secret()),
            Credential::Basic { user, password } => {
                request.basic_auth(user, Some(password.expose_secret()))
            }
        }
    }

    /// Whether two credentials carry the same secret (to never reuse one a vendor refused).
    pub fn same_as(&self, other: &Credential) -> bool {
        match (self, other) {
            (Credential::Bearer(a), Credential::Bearer(b)) => {
                a.expose_secret() == b.expose_secret()
            }
            (
                Credential::Basic { user, password },
                Credential::Basic {
                    user: u2,
                    password: p2,
                },
            ) => user == u2 && password.expose_secret() == p2.expose_secret(),
            _ => false,
        }
    }
}

/// Where a client's credentials come from.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// The credential for the next call.
    async fn current(&self) -> Result<Credential, ConnectorError>;

    /// The vendor answered 401 to `rejected`: a different credential to try once more, or `None`
    /// when there is none (the 401 then stands as [`ConnectorError::Unauthorized`]).
    async fn renew(&self, _rejected: &Credential) -> Result<Option<Credential>, ConnectorError> {
        Ok(None)
    }
}

/// A fixed credential from the configuration (API tokens). A 401 is final.
pub struct StaticToken(pub Credential);

#[async_trait]
impl TokenSource for StaticToken {
    async fn current(&self) -> Result<Credential, ConnectorError> {
        Ok(self.0.clone())
    }
}

/// An access token cached in memory until shortly before it expires.
struct Cached {
    token: SecretString,
    valid_until: Instant,
}

/// OAuth2 client credentials (PowerOffice Go): `POST token_url` with
/// `grant_type=client_credentials`, client id and secret as Basic auth; the access token is kept
/// in memory and fetched again before `expires_in` runs out or after a 401. Nothing rotates, so
/// nothing is stored.
pub struct ClientCredentials {
    pub system: SystemId,
    pub http: reqwest::Client,
    pub token_url: String,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    /// Headers the token endpoint needs too (PowerOffice's subscription key).
    pub headers: Vec<(&'static str, SecretString)>,
    /// The token endpoint counts against the same limits as the API.
    pub gates: Option<Arc<Gates>>,
    /// What the operator should check when the endpoint refuses the keys.
    pub refused_hint: &'static str,
    cached: Mutex<Option<Cached>>,
}

/// How long a token call may wait for the client's rate gates.
const TOKEN_MAX_WAIT: Duration = Duration::from_secs(60);
/// When the token endpoint names no lifetime.
const DEFAULT_LIFETIME: u64 = 600;
/// Fetch a new token this long before the old one expires, so none expires in flight.
const RENEW_EARLY: u64 = 30;

impl ClientCredentials {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        system: SystemId,
        http: reqwest::Client,
        token_url: String,
        client_id: SecretString,
        client_secret: SecretString,
        headers: Vec<(&'static str, SecretString)>,
        gates: Option<Arc<Gates>>,
        refused_hint: &'static str,
    ) -> Self {
        ClientCredentials {
            system,
            http,
            token_url,
            client_id,
            client_secret,
            headers,
            gates,
            refused_hint,
            cached: Mutex::new(None),
        }
    }

    async fn token(&self, rejected: Option<&Credential>) -> Result<Credential, ConnectorError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let credential = Credential::Bearer(c.token.clone());
            if c.valid_until > Instant::now() && !rejected.is_some_and(|r| r.same_as(&credential)) {
                return Ok(credential);
            }
        }
        if let Some(gates) = &self.gates {
            gates.admit(None, TOKEN_MAX_WAIT).await.map_err(|wait| {
                ConnectorError::RateLimited {
                    system: self.system,
                    retry_after: Some(wait),
                }
            })?;
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.client_id.expose_secret(),
            self.client_secret.expose_secret()
        ));
        let mut request = self
            .http
            .post(&self.token_url)
            .header("authorization", format!("Basic {basic}"));
        for (name, value) in &self.headers {
            request = request.header(*name, value.expose_secret());
        }
        let response = request
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| send_error(self.system, e))?;
        let status = response.status();
        if status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED {
            crate::ops::metrics::credentials_failure(self.system);
            return Err(ConnectorError::Unauthorized {
                system: self.system,
                message: format!(
                    "the token endpoint refused our keys ({}); {}",
                    status.as_u16(),
                    self.refused_hint
                ),
            });
        }
        let body: Value = check(self.system, response)
            .await?
            .json()
            .await
            .map_err(|_| malformed(self.system, "token response is not JSON"))?;
        let token = body
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(self.system, "token response has no access_token"))?
            .to_owned();
        let expires_in = match body.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(DEFAULT_LIFETIME);
        let lifetime = Duration::from_secs(expires_in.saturating_sub(RENEW_EARLY).max(1));
        let token = SecretString::from(token);
        *cached = Some(Cached {
            token: token.clone(),
            valid_until: Instant::now() + lifetime,
        });
        Ok(Credential::Bearer(token))
    }
}

#[async_trait]
impl TokenSource for ClientCredentials {
    async fn current(&self) -> Result<Credential, ConnectorError> {
        self.token(None).await
    }

    async fn renew(&self, rejected: &Credential) -> Result<Option<Credential>, ConnectorError> {
        self.token(Some(rejected)).await.map(Some)
    }
}
