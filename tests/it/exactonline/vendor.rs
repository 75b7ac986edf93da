//! Exact Online as the vendor documents it (docs/vendors.md, Exact Online items 1–5): each test
//! drives the simulator the way Exact behaves and checks the connector copes.

use std::time::Duration;

use serde_json::{json, Value};
use tether::connectors::exactonline::ExactOnline;
use tether::connectors::{Connector, ConnectorError};
use tether::simulators::exactonline::{self as sim, ExactSim, ExactSimConfig};
use tether::simulators::kit::RunningSim;
use tether::testing;
use wiremock::matchers::{method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::exactonline::{config, DIVISION};
use crate::support::obj;

async fn simulator(config: ExactSimConfig) -> (ExactSim, RunningSim) {
    sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// An access token straight from the simulator's token endpoint, for raw API calls.
async fn access_token(base: &str) -> String {
    let body: Value = reqwest::Client::new()
        .post(format!("{base}/api/oauth2/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "sim-refresh-0"),
            ("client_id", "sim-client"),
            ("client_secret", "sim-client-secret"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// A raw API call as Exact would answer it: status and body.
async fn raw(
    base: &str,
    token: &str,
    verb: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(verb, format!("{base}/api/v1/{DIVISION}/{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn exact_departments_and_divisions_refuse_writes_with_405() {
    let (exact, running) = simulator(ExactSimConfig::default()).await;
    let base = running.base_url();
    let department = exact.seed_department(json!({"Code": "D1", "Description": "Support"}));
    exact.seed_division(json!({"Code": 7, "Description": "Main"}));
    let token = access_token(&base).await;
    let writes = [
        (reqwest::Method::POST, "hrm/Departments".to_owned()),
        (
            reqwest::Method::PUT,
            format!("hrm/Departments(guid'{department}')"),
        ),
        (
            reqwest::Method::DELETE,
            format!("hrm/Departments(guid'{department}')"),
        ),
        (reqwest::Method::POST, "hrm/Divisions".to_owned()),
        (reqwest::Method::PUT, "hrm/Divisions(7)".to_owned()),
    ];
    for (verb, path) in writes {
        let (status, body) = raw(
            &base,
            &token,
            verb.clone(),
            &path,
            Some(json!({"Description": "x"})),
        )
        .await;
        assert_eq!(status, 405, "{verb} {path}");
        assert_eq!(
            body["error"]["message"]["value"],
            json!("Method not allowed")
        );
    }
    let (status, body) = raw(&base, &token, reqwest::Method::GET, "hrm/Departments", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["d"]["results"][0]["Description"], json!("Support"));
}

#[tokio::test]
async fn exact_connector_refuses_to_write_read_only_types() {
    let db = testing::database().await;
    let (exact, running) = simulator(ExactSimConfig::default()).await;
    let department = exact.seed_department(json!({"Code": "D1", "Description": "Support"}));
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    for result in [
        connector
            .create("Departments", &obj(json!({"Description": "x"})), "k")
            .await,
        connector
            .update(
                "Departments",
                &department,
                &obj(json!({"Description": "x"})),
            )
            .await,
    ] {
        assert!(matches!(result, Err(ConnectorError::Unsupported { .. })));
    }
    assert_eq!(
        exact.token_calls(),
        0,
        "a refused write never reaches Exact"
    );
}

#[tokio::test]
async fn exact_sync_timestamps_arrive_as_strings_and_the_cursor_follows_them() {
    let db = testing::database().await;
    let (exact, running) = simulator(ExactSimConfig {
        min_refresh_interval: Duration::ZERO,
        ..ExactSimConfig::default()
    })
    .await;
    let base = running.base_url();
    let first = exact.seed_account(json!({"Name": "First BV"}));
    let token = access_token(&base).await;
    let (status, body) = raw(
        &base,
        &token,
        reqwest::Method::GET,
        "sync/CRM/Accounts?$filter=Timestamp%20gt%201L",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let stamp = &body["d"]["results"][0]["Timestamp"];
    assert!(stamp.is_string(), "Edm.Int64 is a JSON string: {stamp}");
    let stamp: i64 = stamp.as_str().unwrap().parse().unwrap();
    assert!(stamp > 1 << 53, "beyond what a float holds exactly");

    let connector = ExactOnline::new(
        config(&base, "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    let page = connector.list_changed("Accounts", None).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].id, first);
    let cursor = page.next_cursor.unwrap();
    assert_eq!(
        cursor,
        stamp.to_string(),
        "the cursor is the string's Int64"
    );
    // One change and one new account later, exactly those two come, and the cursor moves past.
    exact.change_account(&first, json!({"City": "Utrecht"}));
    let second = exact.seed_account(json!({"Name": "Second BV"}));
    let page = connector
        .list_changed("Accounts", Some(&cursor))
        .await
        .unwrap();
    let ids: Vec<_> = page.records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, [first.clone(), second.clone()]);
    let after: i64 = page.next_cursor.as_deref().unwrap().parse().unwrap();
    assert_eq!(after, stamp + 2);
    let empty = connector
        .list_changed("Accounts", page.next_cursor.as_deref())
        .await
        .unwrap();
    assert!(empty.records.is_empty());
}

#[tokio::test]
async fn exact_sync_cursor_accepts_numbers_and_fails_loudly_on_an_unreadable_timestamp() {
    let db = testing::database().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/oauth2/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "A1", "token_type": "bearer", "expires_in": "600", "refresh_token": "R2"
        })))
        .mount(&server)
        .await;
    let row = |stamp: Value| json!({"ID": "11111111-1111-1111-1111-111111111111", "Name": "A", "Timestamp": stamp});
    for (filter, stamp) in [
        ("Timestamp gt 1L", json!(42)),
        ("Timestamp gt 42L", json!("forty-three")),
    ] {
        Mock::given(method("GET"))
            .and(path_regex("/sync/CRM/Accounts$"))
            .and(query_param("$filter", filter))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"d": {"results": [row(stamp)]}})),
            )
            .mount(&server)
            .await;
    }
    let connector = ExactOnline::new(
        config(&server.uri(), "R1"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    let page = connector.list_changed("Accounts", None).await.unwrap();
    assert_eq!(page.next_cursor.as_deref(), Some("42"));
    let error = connector
        .list_changed("Accounts", Some("42"))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("Timestamp"),
        "an unreadable Timestamp is an error, not a kept cursor: {error}"
    );
}

#[tokio::test]
async fn exact_simulator_blocks_an_endpoint_after_ten_errors_in_an_hour() {
    let (exact, running) = simulator(ExactSimConfig::default()).await;
    let base = running.base_url();
    let kept = exact.seed_account(json!({"Name": "Kept BV"}));
    exact.seed_department(json!({"Code": "D1", "Description": "Support"}));
    let token = access_token(&base).await;
    let missing = "crm/Accounts(guid'22222222-2222-2222-2222-222222222222')";
    for _ in 0..sim::ERRORS_PER_ENDPOINT_AND_HOUR + 1 {
        let (status, _) = raw(&base, &token, reqwest::Method::GET, missing, None).await;
        assert_eq!(status, 404, "a read by key of a missing account is a 404");
    }
    assert_eq!(exact.errors_this_hour("crm/Accounts"), 11);
    // Blocked now, even for a record that exists; other endpoints still answer.
    let (status, body) = raw(
        &base,
        &token,
        reqwest::Method::GET,
        &format!("crm/Accounts(guid'{kept}')"),
        None,
    )
    .await;
    assert_eq!(status, 429);
    assert!(body["error"]["message"]["value"]
        .as_str()
        .unwrap()
        .contains("blocked"));
    let (status, _) = raw(&base, &token, reqwest::Method::GET, "hrm/Departments", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn exact_reads_of_deleted_accounts_cost_no_errors() {
    let db = testing::database().await;
    let (exact, running) = simulator(ExactSimConfig::default()).await;
    let gone = exact.seed_account(json!({"Name": "Gone BV"}));
    let kept = exact.seed_account(json!({"Name": "Kept BV"}));
    exact.delete_account(&gone);
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    // More reads of the deleted account than Exact's error allowance: each is a `$filter` with
    // `$top=1`, an empty 200, never a 404.
    for _ in 0..sim::ERRORS_PER_ENDPOINT_AND_HOUR + 5 {
        assert!(connector.fetch("Accounts", &gone).await.unwrap().is_none());
    }
    assert_eq!(exact.errors_this_hour("crm/Accounts"), 0);
    let record = connector.fetch("Accounts", &kept).await.unwrap().unwrap();
    assert_eq!(record.fields["Name"], json!("Kept BV"));
    assert!(
        connector.deletes_are_final(),
        "a Delete webhook needs no read"
    );
}

/// An Exact simulator with strict refresh-token rotation, one account, and a connector whose next
/// refresh answer will be lost (Exact rotates, the connector times out).
struct Rotating {
    db: testing::TestDb,
    exact: ExactSim,
    running: RunningSim,
    account: String,
    connector: ExactOnline,
}

async fn rotating_with_a_lost_refresh(account_name: &str) -> Rotating {
    let db = testing::database().await;
    let (exact, running) = simulator(ExactSimConfig {
        strict_rotation: true,
        min_refresh_interval: Duration::ZERO,
        ..ExactSimConfig::default()
    })
    .await;
    let account = exact.seed_account(json!({ "Name": account_name }));
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_millis(500),
    );
    exact.lose_next_token_response(Duration::from_secs(2));
    Rotating {
        db,
        exact,
        running,
        account,
        connector,
    }
}

/// Exact rotates refresh tokens; with strict rotation the used one is dead at once. A refresh
/// whose answer is lost (Exact rotated, Tether timed out) leaves Tether with a dead token: it
/// tries it once, stops with one operator message, and makes no further token calls until a new
/// refresh token is configured (docs/vendors.md, Exact Online item 5).
#[tokio::test]
async fn exact_lost_refresh_response_stops_once_without_looping() {
    let Rotating {
        db,
        exact,
        running,
        account,
        connector,
    } = rotating_with_a_lost_refresh("Acme BV").await;
    let lost = connector.fetch("Accounts", &account).await.unwrap_err();
    assert!(
        matches!(lost, ConnectorError::Timeout { .. }),
        "a timeout: {lost:?}"
    );
    assert_eq!(exact.token_calls(), 1);
    let stopped = connector.fetch("Accounts", &account).await.unwrap_err();
    let message = stopped.to_string();
    assert!(
        matches!(stopped, ConnectorError::Unauthorized { .. })
            && message.contains("invalid_grant")
            && message.contains("exactonline.refresh_token"),
        "{message}"
    );
    for _ in 0..5 {
        assert!(connector.fetch("Accounts", &account).await.is_err());
    }
    assert_eq!(
        exact.token_calls(),
        2,
        "the dead token was tried once, not looped"
    );
    assert!(!message.contains("sim-refresh"), "no token in the message");

    // The operator hands a new refresh token (a re-authorisation): the system runs again.
    let fresh = ExactOnline::new(
        config(&running.base_url(), &exact.current_refresh_token()),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    let record = fresh.fetch("Accounts", &account).await.unwrap().unwrap();
    assert_eq!(record.fields["Name"], json!("Acme BV"));
}

/// Exact refuses a refresh sooner than 570 s after the last with `400 invalid_request`. Where the
/// old refresh token stays valid until its successor is used, a refresh whose answer was lost
/// leaves Tether with a good token that Exact will take only later: a wait, never a rejection that
/// dead-letters the jobs (found by the chaos suite's short run), and no token call per job meanwhile.
#[tokio::test]
async fn exact_refresh_refused_as_too_soon_after_a_lost_answer_waits_instead_of_failing() {
    let db = testing::database().await;
    let (exact, running) = simulator(ExactSimConfig {
        strict_rotation: false,
        ..ExactSimConfig::default()
    })
    .await;
    let account = exact.seed_account(json!({ "Name": "Soon BV" }));
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_millis(500),
    );
    exact.lose_next_token_response(Duration::from_secs(2));
    let lost = connector.fetch("Accounts", &account).await.unwrap_err();
    assert!(matches!(lost, ConnectorError::Timeout { .. }), "{lost:?}");
    let too_soon = connector.fetch("Accounts", &account).await.unwrap_err();
    assert!(
        matches!(
            too_soon,
            ConnectorError::RateLimited {
                retry_after: Some(after),
                ..
            } if after == Duration::from_secs(60)
        ),
        "a wait of 60 s, not a rejection: {too_soon:?}"
    );
    assert_eq!(exact.token_calls(), 2);
    for _ in 0..3 {
        let waiting = connector.fetch("Accounts", &account).await.unwrap_err();
        assert!(waiting.is_back_pressure(), "{waiting:?}");
    }
    assert_eq!(
        exact.token_calls(),
        2,
        "no token call while the wait lasts (Exact limits token calls a day)"
    );
    let stopped: Option<String> =
        sqlx::query_scalar("SELECT stopped_reason FROM oauth_tokens WHERE system = 'exactonline'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stopped, None, "Exact is not stopped");
}

/// Issue 16 item 5: after a lost refresh response stopped Exact, the operator re-authorises and
/// hands the new refresh token to the running installation with `tether credentials set
/// exactonline` (token on standard input). The connector that was stopped, not a new one, works
/// again at its next call; the token appears in no output.
#[tokio::test]
async fn exact_a_refresh_token_handed_over_with_the_cli_resumes_the_stopped_connector() {
    let Rotating {
        db,
        exact,
        running,
        account,
        connector,
    } = rotating_with_a_lost_refresh("Resumed BV").await;
    assert!(connector.fetch("Accounts", &account).await.is_err());
    let stopped = connector.fetch("Accounts", &account).await.unwrap_err();
    assert!(stopped
        .to_string()
        .contains("tether credentials set exactonline"));

    let dir = std::env::temp_dir().join(format!("tether-credentials-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = format!(
        "[exactonline]\nbase_url = \"{}\"\ndivision = {DIVISION}\nclient_id = \"sim-client\"\n\
         client_secret = \"sim-client-secret\"\nrefresh_token = \"sim-refresh-0\"\n",
        running.base_url()
    );
    std::fs::write(dir.join("tether.toml"), toml).unwrap();
    let token = exact.current_refresh_token();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["credentials", "set", "exactonline", "--config"])
        .arg(dir.join("tether.toml"))
        .env(
            "DATABASE_URL",
            secrecy::ExposeSecret::expose_secret(&db.url),
        )
        .env("TETHER_LOG_LEVEL", "debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{token}\n").as_bytes())
            .await
            .unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(&token), "the token leaked: {text}");

    let record = connector
        .fetch("Accounts", &account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.fields["Name"], json!("Resumed BV"));
    std::fs::remove_dir_all(&dir).ok();
}
