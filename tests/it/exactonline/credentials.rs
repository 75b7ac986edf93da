//! Issue 16 item 5 against a running service (docs/vendors.md, Exact Online item 5): a dead
//! refresh token stops Exact with one operator message; `tether credentials set exactonline`
//! hands the running service a new one, stored sealed, and Exact resumes within seconds, without
//! a restart and without waiting out the engine's hour-long stop.

use std::process::Stdio;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tether::simulators::zendesk::Kind;
use tokio::io::AsyncWriteExt;

use crate::support::{eventually, probe, Service};

const KEY_TOML: &str = "\n[secrets]\nkey = \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"\n";
const WAIT: Duration = Duration::from_secs(60);
/// What "within seconds" means here: the watch interval, a worker poll and one sync.
const RESUMED_WITHIN: Duration = Duration::from_secs(15);

async fn stopped_reason(h: &Service) -> Option<String> {
    sqlx::query_scalar("SELECT stopped_reason FROM oauth_tokens WHERE system = 'exactonline'")
        .fetch_optional(&h.db.pool)
        .await
        .unwrap()
        .flatten()
}

/// Jobs of Exact records put off for minutes (the stop's hour, capped by workers.max_retry_after).
async fn exact_jobs_put_off(h: &Service) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE state = 'ready' AND record_key LIKE 'exactonline/%' \
         AND run_at > now() + interval '5 minutes'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap()
}

/// Runs `tether credentials set exactonline` with `token` on standard input.
async fn credentials_set(h: &Service, token: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("tether-credentials-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: std::net::SocketAddr = h.base.trim_start_matches("http://").parse().unwrap();
    let config = dir.join("tether.toml");
    std::fs::write(&config, h.sims.config_toml(listen, &dir, "1s") + KEY_TOML).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["credentials", "set", "exactonline", "--config"])
        .arg(&config)
        .env("DATABASE_URL", h.db.url.expose_secret())
        .env("TETHER_LOG_LEVEL", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{token}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

#[tokio::test]
async fn a_refresh_token_handed_to_a_running_service_resumes_exact_without_a_restart() {
    let h = Service::start(None, KEY_TOML).await;
    let account = h.sims.exact.seed_account(json!({"Name": "Draft BV"}));
    // Exact no longer knows Tether's tokens (as after a lost refresh response, or a user who
    // withdrew the app). Exact's least time between refreshes is taken as passed.
    h.sims.exact.revoke_grant();
    sqlx::query("UPDATE oauth_tokens SET refreshed_at = NULL WHERE system = 'exactonline'")
        .execute(&h.db.pool)
        .await
        .unwrap();
    assert!(h
        .sims
        .exact
        .change_account(&account, json!({"Name": "Handed Over BV"})));
    let reason = eventually("Exact stopped", WAIT, || stopped_reason(&h)).await;
    assert!(
        reason.contains("tether credentials set exactonline"),
        "{reason}"
    );
    eventually("the webhook's job put off by the stop", WAIT, || async {
        (exact_jobs_put_off(&h).await > 0).then_some(())
    })
    .await;

    // Bad input changes nothing: an empty token is refused with a clear message.
    let empty = credentials_set(&h, "").await;
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("the refresh token read is empty"));
    assert!(stopped_reason(&h).await.is_some());

    let fresh = h.sims.exact.current_refresh_token();
    let out = credentials_set(&h, &fresh).await;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains(&fresh), "the token leaked: {printed}");
    let stored: String =
        sqlx::query_scalar("SELECT refresh_token FROM oauth_tokens WHERE system = 'exactonline'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_ne!(stored, fresh, "stored sealed under secrets.key");

    // The running service resumes: the put-off job runs now, not in an hour.
    let org = eventually(
        "the Zendesk organization for the account",
        RESUMED_WITHIN,
        probe(|| {
            h.sims
                .zendesk
                .all(Kind::Organization)
                .into_iter()
                .find(|o| o.get("name").and_then(Value::as_str) == Some("Handed Over BV"))
        }),
    )
    .await;
    assert!(org.get("id").is_some());
    assert_eq!(stopped_reason(&h).await, None);
    assert_eq!(exact_jobs_put_off(&h).await, 0);
    h.stop().await;
}
