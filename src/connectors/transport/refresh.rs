//! OAuth2 refresh tokens that rotate (Exact Online), kept in PostgreSQL's `oauth_tokens` table
//! and shared by every replica.
//!
//! Every refresh returns a new refresh token and may invalidate the old one at once, so the
//! current one must live where all replicas see it, and only one replica may use it at a time:
//! the refresh happens under `SELECT … FOR UPDATE` on the row. The configured refresh token
//! only seeds the row; when the vendor rejects the stored one, the system is stopped (no more
//! token calls) until the operator configures a different one (its hash differs from the seed's).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};

use super::classify::{classify, malformed, send_error};
use super::token::{Credential, TokenSource};
use crate::at_rest::{self, token_context, Keyring};
use crate::connectors::ConnectorError;
use crate::domain::SystemId;

/// An access token this close to expiry is treated as expired (a call may take a while).
const EXPIRY_MARGIN: chrono::Duration = chrono::Duration::seconds(30);

/// The vendor facts and configuration of one rotating refresh token.
pub struct RefreshConfig {
    pub system: SystemId,
    /// The vendor's name as an operator reads it ("Exact Online").
    pub vendor_name: &'static str,
    /// The account the tokens are for (Exact: the division).
    pub account: String,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    /// The configured refresh token: seeds the row, and reseeds it after a stop.
    pub seed_refresh_token: SecretString,
    /// The vendor refuses a new access token sooner than this after the previous one.
    pub min_refresh_interval: Duration,
    /// What the operator must do when the refresh token is gone.
    pub reauthorise: &'static str,
    /// What the operator should check when the endpoint refuses the client.
    pub client_hint: &'static str,
}

/// A [`TokenSource`] over a rotating refresh token stored in PostgreSQL.
pub struct StoredRefreshToken {
    config: RefreshConfig,
    pool: PgPool,
    http: reqwest::Client,
    /// `secrets.key`: token columns are sealed on write and opened on read (`at_rest`).
    keyring: Option<Arc<Keyring>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: String,
    /// Exact sends it as a string (`"600"`); a number is accepted too.
    expires_in: Value,
}

#[derive(Deserialize)]
struct TokenError {
    error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    access_token: Option<String>,
    access_expires_at: Option<DateTime<Utc>>,
    refresh_token: String,
    refreshed_at: Option<DateTime<Utc>>,
    seed_sha256: String,
    stopped_reason: Option<String>,
}

const SELECT_ROW: &str = "SELECT access_token, access_expires_at, refresh_token, refreshed_at, \
     seed_sha256, stopped_reason FROM oauth_tokens WHERE system = $1 AND account = $2";

impl StoredRefreshToken {
    pub fn new(config: RefreshConfig, pool: PgPool, http: reqwest::Client) -> Self {
        StoredRefreshToken {
            config,
            pool,
            http,
            keyring: None,
        }
    }

    /// Stores the tokens encrypted under `keyring` (`secrets.key`).
    pub fn with_keyring(mut self, keyring: Option<Arc<Keyring>>) -> Self {
        self.keyring = keyring;
        self
    }

    /// The one place token columns are written: sealed when a keyring is configured.
    fn seal(&self, column: &str, plain: &str) -> String {
        let context = token_context(self.system().as_str(), &self.config.account, column);
        at_rest::seal_token(self.keyring.as_deref(), plain, &context)
    }

    /// The one place token columns are read: a stored row with its tokens opened.
    fn open(&self, mut row: TokenRow) -> Result<TokenRow, ConnectorError> {
        let open = |column: &str, stored: &str| {
            let context = token_context(self.system().as_str(), &self.config.account, column);
            at_rest::open_token(self.keyring.as_deref(), stored, &context)
                .map(|s| s.expose_secret().to_owned())
                .map_err(|e| ConnectorError::Unauthorized {
                    system: self.system(),
                    message: e.to_string(),
                })
        };
        row.refresh_token = open("refresh_token", &row.refresh_token)?;
        row.access_token = row
            .access_token
            .as_deref()
            .map(|a| open("access_token", a))
            .transpose()?;
        Ok(row)
    }

    fn system(&self) -> SystemId {
        self.config.system
    }

    fn seed_hash(&self) -> String {
        hex::encode(Sha256::digest(
            self.config.seed_refresh_token.expose_secret().as_bytes(),
        ))
    }

    fn stopped_error(&self, reason: &str) -> ConnectorError {
        ConnectorError::Unauthorized {
            system: self.system(),
            message: format!("{} is stopped: {reason}", self.config.vendor_name),
        }
    }

    fn db_error(&self) -> impl Fn(sqlx::Error) -> ConnectorError {
        let system = self.system();
        move |error| ConnectorError::Transient {
            system,
            message: format!("token storage failed: {error}"),
        }
    }

    /// A usable access token of the row, unless it is the one just refused.
    fn usable(row: &TokenRow, rejected: Option<&Credential>) -> Option<Credential> {
        let token = row.access_token.as_ref()?;
        let expires = row.access_expires_at?;
        let credential = Credential::bearer(token.clone());
        (expires - EXPIRY_MARGIN > Utc::now() && !rejected.is_some_and(|r| r.same_as(&credential)))
            .then_some(credential)
    }

    /// A valid access token. `rejected` is a token the API just refused with 401: it is not
    /// reused. Only the replica holding the row lock calls the token endpoint; the others wait
    /// for the lock and then reuse what it stored.
    async fn access_token(
        &self,
        rejected: Option<&Credential>,
    ) -> Result<Credential, ConnectorError> {
        let seed = self.seed_hash();
        // Fast path without a lock: most calls find a valid token.
        let row: Option<TokenRow> = sqlx::query_as(SELECT_ROW)
            .bind(self.system().as_str())
            .bind(&self.config.account)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.db_error())?
            .map(|row| self.open(row))
            .transpose()?;
        match &row {
            Some(row) => {
                if let Some(reason) = &row.stopped_reason {
                    if row.seed_sha256 == seed {
                        return Err(self.stopped_error(reason));
                    }
                } else if let Some(token) = Self::usable(row, rejected) {
                    return Ok(token);
                }
            }
            None => self.seed_row(&seed).await?,
        }
        self.refresh_locked(rejected, &seed).await
    }

    /// Hands over a new refresh token (`tether credentials set`, after a re-authorisation): it
    /// replaces the stored one and lifts a stop, so every replica's next call refreshes with it,
    /// without a restart. `refreshed_at` stays: the vendor's least time between refreshes still
    /// holds (docs/vendors.md, Exact Online item 5).
    pub async fn hand_over(&self, refresh_token: &SecretString) -> Result<(), ConnectorError> {
        sqlx::query(
            "INSERT INTO oauth_tokens (system, account, refresh_token, seed_sha256, replaced_at) \
             VALUES ($1, $2, $3, $4, now()) ON CONFLICT (system, account) DO UPDATE SET \
             refresh_token = EXCLUDED.refresh_token, access_token = NULL, \
             access_expires_at = NULL, stopped_reason = NULL, stopped_at = NULL, \
             replaced_at = now()",
        )
        .bind(self.system().as_str())
        .bind(&self.config.account)
        .bind(self.seal("refresh_token", refresh_token.expose_secret()))
        .bind(self.seed_hash())
        .execute(&self.pool)
        .await
        .map_err(self.db_error())?;
        tracing::info!(system = %self.system(), "refresh token handed over; the system resumes");
        Ok(())
    }

    /// The configured refresh token seeds the row only when none exists yet.
    async fn seed_row(&self, seed: &str) -> Result<(), ConnectorError> {
        sqlx::query(
            "INSERT INTO oauth_tokens (system, account, refresh_token, seed_sha256) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (system, account) DO NOTHING",
        )
        .bind(self.system().as_str())
        .bind(&self.config.account)
        .bind(self.seal(
            "refresh_token",
            self.config.seed_refresh_token.expose_secret(),
        ))
        .bind(seed)
        .execute(&self.pool)
        .await
        .map_err(self.db_error())?;
        Ok(())
    }

    /// Slow path: takes the row lock. Holding it across the token call is what makes one
    /// replica the only user of the refresh token; the others wait here and then find the new
    /// access token. If the call times out or the commit fails after the vendor rotated, the
    /// old refresh token is what stays stored (see docs/vendors.md on Exact's rotation).
    async fn refresh_locked(
        &self,
        rejected: Option<&Credential>,
        seed: &str,
    ) -> Result<Credential, ConnectorError> {
        let mut tx = self.pool.begin().await.map_err(self.db_error())?;
        let mut row: TokenRow = sqlx::query_as(&format!("{SELECT_ROW} FOR UPDATE"))
            .bind(self.system().as_str())
            .bind(&self.config.account)
            .fetch_one(&mut *tx)
            .await
            .map_err(self.db_error())
            .and_then(|row| self.open(row))?;
        if let Some(reason) = &row.stopped_reason {
            if row.seed_sha256 == seed {
                return Err(self.stopped_error(reason));
            }
            self.reseed(&mut tx, seed).await?;
            row.refresh_token = self.config.seed_refresh_token.expose_secret().to_owned();
            row.access_token = None;
            row.access_expires_at = None;
        }
        if let Some(token) = Self::usable(&row, rejected) {
            // Another replica refreshed while this one waited for the lock.
            tx.commit().await.map_err(self.db_error())?;
            return Ok(token);
        }
        if let Some(at) = row.refreshed_at {
            let since = (Utc::now() - at).to_std().unwrap_or_default();
            if since < self.config.min_refresh_interval {
                return Err(ConnectorError::RateLimited {
                    system: self.system(),
                    retry_after: Some(self.config.min_refresh_interval - since),
                });
            }
        }
        self.call_token_endpoint(tx, &row.refresh_token).await
    }

    /// The operator configured a new refresh token after a stop: start over with it.
    /// `refreshed_at` stays, so the minimum refresh interval still holds across the reseed.
    async fn reseed(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        seed: &str,
    ) -> Result<(), ConnectorError> {
        sqlx::query(
            "UPDATE oauth_tokens SET refresh_token = $3, seed_sha256 = $4, access_token = NULL, \
             access_expires_at = NULL, stopped_reason = NULL, stopped_at = NULL \
             WHERE system = $1 AND account = $2",
        )
        .bind(self.system().as_str())
        .bind(&self.config.account)
        .bind(self.seal(
            "refresh_token",
            self.config.seed_refresh_token.expose_secret(),
        ))
        .bind(seed)
        .execute(&mut **tx)
        .await
        .map_err(self.db_error())?;
        tracing::info!(system = %self.system(), "configured refresh token changed; {} restarted", self.config.vendor_name);
        Ok(())
    }

    /// Uses the refresh token (this replica holds the row lock) and stores what comes back.
    async fn call_token_endpoint(
        &self,
        mut tx: Transaction<'_, Postgres>,
        refresh_token: &str,
    ) -> Result<Credential, ConnectorError> {
        let response = self
            .http
            .post(&self.config.token_url)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", self.config.client_id.as_str()),
                ("client_secret", self.config.client_secret.expose_secret()),
            ])
            .send()
            .await
            .map_err(|e| send_error(self.system(), e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(self.refused(tx, status, &text).await);
        }
        let body: TokenResponse = response
            .json()
            .await
            .map_err(|_| malformed(self.system(), "token response is not the expected JSON"))?;
        let expires_in = match &body.expires_in {
            Value::String(s) => s.trim().parse::<i64>().ok(),
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
        .filter(|s| *s > 0)
        .ok_or_else(|| malformed(self.system(), "token response has no usable expires_in"))?;
        sqlx::query(
            "UPDATE oauth_tokens SET access_token = $3, \
             access_expires_at = now() + make_interval(secs => $4), \
             refresh_token = $5, refreshed_at = now() WHERE system = $1 AND account = $2",
        )
        .bind(self.system().as_str())
        .bind(&self.config.account)
        .bind(self.seal("access_token", &body.access_token))
        .bind(expires_in as f64)
        .bind(self.seal("refresh_token", &body.refresh_token))
        .execute(&mut *tx)
        .await
        .map_err(self.db_error())?;
        tx.commit().await.map_err(self.db_error())?;
        tracing::info!(system = %self.system(), "access token refreshed");
        Ok(Credential::bearer(body.access_token))
    }

    /// The token endpoint said no. A rejected refresh token stops the system (stored, so every
    /// replica stops); anything else is classified like an API answer.
    async fn refused(
        &self,
        mut tx: Transaction<'_, Postgres>,
        status: StatusCode,
        text: &str,
    ) -> ConnectorError {
        let error = serde_json::from_str::<TokenError>(text)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default();
        let system = self.system();
        if status == StatusCode::UNAUTHORIZED
            || (status == StatusCode::BAD_REQUEST && error == "invalid_grant")
        {
            crate::ops::metrics::credentials_failure(system);
            let code = if error.is_empty() {
                String::new()
            } else {
                format!(" {error}")
            };
            let reason = format!(
                "{} rejected the refresh token ({}{code}); {}",
                self.config.vendor_name,
                status.as_u16(),
                self.config.reauthorise
            );
            let stored = sqlx::query(
                "UPDATE oauth_tokens SET stopped_reason = $3, stopped_at = now(), \
                 access_token = NULL, access_expires_at = NULL WHERE system = $1 AND account = $2",
            )
            .bind(system.as_str())
            .bind(&self.config.account)
            .bind(&reason)
            .execute(&mut *tx)
            .await;
            if let Err(e) = stored {
                return self.db_error()(e);
            }
            if let Err(e) = tx.commit().await {
                return self.db_error()(e);
            }
            tracing::error!(%system, %reason, "{} stopped", self.config.vendor_name);
            return self.stopped_error(&reason);
        }
        if status == StatusCode::BAD_REQUEST && error == "invalid_request" {
            return self.refreshed_too_soon(tx).await;
        }
        match status {
            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                classify(system, s, None, "from the token endpoint".to_owned())
            }
            s => ConnectorError::Rejected {
                system,
                status: s.as_u16(),
                message: format!(
                    "token endpoint refused the refresh ({}); {}",
                    if error.is_empty() {
                        "no error code"
                    } else {
                        &error
                    },
                    self.config.client_hint
                ),
            },
        }
    }
}

impl StoredRefreshToken {
    /// The vendor refused a refresh as too soon after the last (Exact: `400 invalid_request`,
    /// "no sooner than 570 s", docs/vendors.md, Exact Online). Tether's own `refreshed_at` did not
    /// say so, so a refresh whose answer was lost (a kill, a timeout) reached the vendor after
    /// all. The request itself is always well formed, so this is a wait, not a rejection: the
    /// attempt is stored as the last refresh, backdated so that every replica tries again
    /// [`TOO_SOON_RETRY`] from now (not at once: token calls have a daily limit too), and the
    /// caller's job is put off meanwhile.
    async fn refreshed_too_soon(&self, mut tx: Transaction<'_, Postgres>) -> ConnectorError {
        let backdate = self
            .config
            .min_refresh_interval
            .saturating_sub(TOO_SOON_RETRY);
        let stored = sqlx::query(
            "UPDATE oauth_tokens SET refreshed_at = now() - make_interval(secs => $3) \
             WHERE system = $1 AND account = $2",
        )
        .bind(self.system().as_str())
        .bind(&self.config.account)
        .bind(backdate.as_secs_f64())
        .execute(&mut *tx)
        .await;
        if let Err(e) = stored {
            return self.db_error()(e);
        }
        if let Err(e) = tx.commit().await {
            return self.db_error()(e);
        }
        tracing::warn!(
            system = %self.system(),
            "{} refused a refresh as too soon after the last one (most likely one whose answer \
             was lost); trying again in {} s",
            self.config.vendor_name,
            TOO_SOON_RETRY.as_secs()
        );
        ConnectorError::RateLimited {
            system: self.system(),
            retry_after: Some(TOO_SOON_RETRY),
        }
    }
}

/// How long after a refresh refused as too soon the next one is tried.
const TOO_SOON_RETRY: Duration = Duration::from_secs(60);

#[async_trait]
impl TokenSource for StoredRefreshToken {
    async fn current(&self) -> Result<Credential, ConnectorError> {
        self.access_token(None).await
    }

    async fn renew(&self, rejected: &Credential) -> Result<Option<Credential>, ConnectorError> {
        self.access_token(Some(rejected)).await.map(Some)
    }
}
