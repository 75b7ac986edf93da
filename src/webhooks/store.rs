//! The `webhook_registrations` table and the signing secrets intake reads from it.
//!
//! [`StoredSecrets`] is the source intake's Zendesk verifier reads besides `zendesk.webhook_secrets`:
//! it reloads from PostgreSQL every [`REFRESH`] and, when a delivery verifies with none of the
//! secrets it holds, once more unless the last load is younger than [`RELOAD_GAP`], so a secret `tether webhooks install` stored is
//! accepted by a running `tether serve` within a second or two, without a restart.

use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

use crate::at_rest::{self, AtRestError, Keyring};
use crate::domain::SystemId;

/// How often a running service reloads the stored secrets.
pub const REFRESH: Duration = Duration::from_secs(2);
/// The least time between two reloads a failed verification asks for (so forged deliveries
/// cannot turn into a query each).
pub const RELOAD_GAP: Duration = Duration::from_millis(250);

/// One registration as stored.
#[derive(Debug, Clone)]
pub struct Registration {
    pub system: SystemId,
    pub vendor_id: String,
    pub endpoint: String,
    pub topics: Vec<String>,
    pub created_by_tether: bool,
}

fn secret_context(system: SystemId, vendor_id: &str) -> String {
    format!("webhook_registrations/{system}/{vendor_id}/signing_secret")
}

/// Records (or updates) a registration and its signing secret, sealed when a key is configured.
pub async fn save(
    pool: &PgPool,
    keyring: Option<&Keyring>,
    registration: &Registration,
    secret: Option<&SecretString>,
) -> Result<(), sqlx::Error> {
    let context = secret_context(registration.system, &registration.vendor_id);
    let sealed = secret.map(|s| at_rest::seal_token(keyring, s.expose_secret(), &context));
    sqlx::query(
        "INSERT INTO webhook_registrations \
           (system, vendor_id, endpoint, topics, signing_secret, created_by_tether) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (system, vendor_id) DO UPDATE SET endpoint = EXCLUDED.endpoint, \
           topics = EXCLUDED.topics, signing_secret = EXCLUDED.signing_secret, updated_at = now()",
    )
    .bind(registration.system.to_string())
    .bind(&registration.vendor_id)
    .bind(&registration.endpoint)
    .bind(&registration.topics)
    .bind(sealed)
    .bind(registration.created_by_tether)
    .execute(pool)
    .await?;
    Ok(())
}

/// The registrations of one system.
pub async fn list(pool: &PgPool, system: SystemId) -> Result<Vec<Registration>, sqlx::Error> {
    let rows: Vec<(String, String, Vec<String>, bool)> = sqlx::query_as(
        "SELECT vendor_id, endpoint, topics, created_by_tether FROM webhook_registrations \
         WHERE system = $1 ORDER BY installed_at",
    )
    .bind(system.to_string())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(vendor_id, endpoint, topics, created_by_tether)| Registration {
                system,
                vendor_id,
                endpoint,
                topics,
                created_by_tether,
            },
        )
        .collect())
}

pub async fn forget(pool: &PgPool, system: SystemId, vendor_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM webhook_registrations WHERE system = $1 AND vendor_id = $2")
        .bind(system.to_string())
        .bind(vendor_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// When Tether last stored a delivery from `system`.
pub async fn last_delivery(
    pool: &PgPool,
    system: SystemId,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(received_at) FROM events WHERE system = $1")
        .bind(system.to_string())
        .fetch_one(pool)
        .await
}

/// Every stored signing secret of `system`, opened.
pub async fn secrets(
    pool: &PgPool,
    keyring: Option<&Keyring>,
    system: SystemId,
) -> Result<Vec<SecretString>, SecretsError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT vendor_id, signing_secret FROM webhook_registrations \
         WHERE system = $1 AND signing_secret IS NOT NULL",
    )
    .bind(system.to_string())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, stored)| {
            at_rest::open_token(keyring, &stored, &secret_context(system, &id))
                .map_err(SecretsError::AtRest)
        })
        .collect()
}

/// Why stored secrets could not be read. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("database error reading webhook registrations: {0}")]
    Database(#[from] sqlx::Error),
    #[error("a stored webhook signing secret cannot be opened: {0}")]
    AtRest(AtRestError),
}

/// The stored signing secrets of one system, kept fresh for intake. Cheap to clone.
#[derive(Clone)]
pub struct StoredSecrets {
    inner: Arc<Shared>,
}

struct Shared {
    system: SystemId,
    pool: PgPool,
    keyring: Option<Keyring>,
    secrets: RwLock<Vec<SecretString>>,
    /// When the last load finished; held while a load runs, so callers wait for it.
    loaded: tokio::sync::Mutex<Option<Instant>>,
}

impl StoredSecrets {
    /// Starts empty; [`StoredSecrets::spawn_refresh`] or [`StoredSecrets::reload`] fill it.
    pub fn new(system: SystemId, pool: PgPool, keyring: Option<Keyring>) -> StoredSecrets {
        StoredSecrets {
            inner: Arc::new(Shared {
                system,
                pool,
                keyring,
                secrets: RwLock::new(Vec::new()),
                loaded: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The secrets as last loaded.
    pub fn current(&self) -> Vec<SecretString> {
        self.inner.secrets.read().unwrap().clone()
    }

    /// Reads the table now. A failure keeps the secrets held so far (and is logged without them).
    pub async fn reload(&self) {
        let mut loaded = self.inner.loaded.lock().await;
        self.load().await;
        *loaded = Some(Instant::now());
    }

    async fn load(&self) {
        let s = &self.inner;
        match secrets(&s.pool, s.keyring.as_ref(), s.system).await {
            Ok(list) => *s.secrets.write().unwrap() = list,
            Err(e) => {
                tracing::warn!(system = %s.system, error = %e, "stored webhook secrets not reloaded")
            }
        }
    }

    /// Makes sure the secrets held are at most [`RELOAD_GAP`] old: waits for a load under way,
    /// and loads unless the last one finished within the gap.
    pub async fn ensure_fresh(&self) {
        let mut loaded = self.inner.loaded.lock().await;
        if loaded.is_some_and(|at| at.elapsed() < RELOAD_GAP) {
            return;
        }
        self.load().await;
        *loaded = Some(Instant::now());
    }

    /// Reloads every [`REFRESH`] for as long as any clone of `self` lives.
    pub fn spawn_refresh(&self) {
        let weak: Weak<Shared> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                StoredSecrets { inner }.reload().await;
                tokio::time::sleep(REFRESH).await;
            }
        });
    }
}
