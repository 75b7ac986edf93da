//! Credentials at rest against a real PostgreSQL and the Exact Online simulator: tokens the
//! connector stores are encrypted and still work, clear rows are encrypted at start, a key is
//! rotated, and a start without the key is refused with one sentence.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::PgPool;
use tether::at_rest::{self, AtRestError, Keyring};
use tether::connectors::exactonline::ExactOnline;
use tether::connectors::{Connector, ConnectorError};
use tether::simulators::exactonline::{self as sim, ExactSimConfig};
use tether::testing;

use crate::support::exactonline::{config, DIVISION};

fn key(byte: u8) -> SecretString {
    SecretString::from(base64::engine::general_purpose::STANDARD.encode([byte; 32]))
}

fn ring(keys: &[SecretString]) -> Keyring {
    Keyring::from_config(keys).unwrap()
}

async fn stored(pool: &PgPool) -> (Option<String>, String) {
    sqlx::query_as(
        "SELECT access_token, refresh_token FROM oauth_tokens WHERE system = 'exactonline'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn exact_tokens_are_stored_encrypted_and_only_a_keyed_connector_can_use_them() {
    let db = testing::database().await;
    let (exact, running) = sim::start(
        ExactSimConfig {
            min_refresh_interval: Duration::ZERO,
            ..ExactSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let account = exact.seed_account(json!({"Name": "Sealed BV"}));
    let keyring = Some(Arc::new(ring(&[key(1)])));
    let connector = ExactOnline::with_keyring(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
        keyring.clone(),
    );
    let record = connector
        .fetch("Accounts", &account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.fields["Name"], json!("Sealed BV"));

    let (access, refresh) = stored(&db.pool).await;
    let access = access.expect("an access token was stored");
    assert!(
        at_rest::is_sealed(&access) && at_rest::is_sealed(&refresh),
        "{access} {refresh}"
    );
    assert!(
        !refresh.contains("sim-refresh"),
        "no clear text in the column"
    );
    let context = at_rest::token_context("exactonline", &DIVISION.to_string(), "refresh_token");
    let opened = keyring.as_ref().unwrap().open(&refresh, &context).unwrap();
    assert!(!opened.expose_secret().is_empty());

    // Another replica with the key reuses the stored access token (no second refresh needed).
    let replica = ExactOnline::with_keyring(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
        keyring,
    );
    assert!(replica.fetch("Accounts", &account).await.unwrap().is_some());
    // One without it cannot read the sealed tokens: a clear error naming the missing key.
    let keyless = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    match keyless.fetch("Accounts", &account).await {
        Err(ConnectorError::Unauthorized { message, .. }) => {
            assert!(message.contains("secrets.key"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn insert_clear_row(pool: &PgPool) {
    sqlx::query(
        "INSERT INTO oauth_tokens (system, account, access_token, access_expires_at, refresh_token, \
         seed_sha256) VALUES ('exactonline', $1, 'clear-access', now() + interval '10 minutes', \
         'clear-refresh', 'seed')",
    )
    .bind(DIVISION.to_string())
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn clear_rows_are_sealed_at_start_keys_rotate_and_a_start_without_the_key_is_refused() {
    let db = testing::database().await;
    insert_clear_row(&db.pool).await;
    let division = DIVISION.to_string();
    let context = |column| at_rest::token_context("exactonline", &division, column);

    // No key yet and clear rows: nothing to refuse, nothing changed.
    let none = at_rest::seal_stored_credentials(&db.pool, None)
        .await
        .unwrap();
    assert_eq!(none.values, 0);
    assert_eq!(stored(&db.pool).await.1, "clear-refresh");

    let first = ring(&[key(1)]);
    let sealed = at_rest::seal_stored_credentials(&db.pool, Some(&first))
        .await
        .unwrap();
    assert_eq!(sealed.values, 2, "access and refresh token");
    let (access, refresh) = stored(&db.pool).await;
    let opened = first.open(&refresh, &context("refresh_token")).unwrap();
    assert_eq!(opened.expose_secret(), "clear-refresh");
    let opened = first
        .open(&access.unwrap(), &context("access_token"))
        .unwrap();
    assert_eq!(opened.expose_secret(), "clear-access");
    // A second start has nothing to do.
    let again = at_rest::seal_stored_credentials(&db.pool, Some(&first))
        .await
        .unwrap();
    assert_eq!(again.values, 0);

    // Rotation: the new key first, the old one after it; the start re-encrypts under the new one.
    let rotated = ring(&[key(2), key(1)]);
    let resealed = at_rest::seal_stored_credentials(&db.pool, Some(&rotated))
        .await
        .unwrap();
    assert_eq!(resealed.values, 2);
    let only_new = ring(&[key(2)]);
    let (_, refresh) = stored(&db.pool).await;
    assert_eq!(
        only_new
            .open(&refresh, &context("refresh_token"))
            .unwrap()
            .expose_secret(),
        "clear-refresh"
    );

    // Without the key: refused, in one sentence that names the setting and no secret.
    let refused = at_rest::seal_stored_credentials(&db.pool, None)
        .await
        .unwrap_err();
    assert!(matches!(refused, AtRestError::NoKey));
    let message = refused.to_string();
    assert!(
        message.contains("`secrets.key`") && !message.contains('\n'),
        "{message}"
    );
    // With only the old key: refused, naming the unknown key by id.
    let old_only = ring(&[key(1)]);
    let refused = at_rest::seal_stored_credentials(&db.pool, Some(&old_only))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, AtRestError::UnknownKey { .. }),
        "{refused}"
    );

    // The service itself does not start without the key.
    let config = tether::config::Config::from_source(tether::config::Source::empty()).unwrap();
    let (registry, _) = tether::registry::load(None).unwrap();
    let outcome = tether::service::run(
        Arc::new(config),
        db.pool.clone(),
        Arc::new(registry),
        None,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let error = outcome
        .expect_err("a start without the key is refused")
        .to_string();
    assert!(error.contains("no `secrets.key` is configured"), "{error}");
}
