//! Exact Online: the connector against its simulator for every operation, and against wiremock
//! for the token lifecycle (expiry mid-run, two replicas, a rejected refresh token) and for 429,
//! 5xx and timeouts.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tether::connectors::exactonline::ExactOnline;
use tether::connectors::{Connector, ConnectorError};
use tether::signing;
use tether::simulators::exactonline::{self as sim, ExactSimConfig};
use tether::testing;
use wiremock::matchers::{body_string_contains, header, method, path, query_param_contains};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::exactonline::{config, DIVISION};
use crate::support::obj;

mod credentials;
mod vendor;

const GUID: &str = "11111111-1111-1111-1111-111111111111";

/// Stores a token row as if an earlier run had obtained `access` `refreshed_secs_ago`.
async fn store_token(
    pool: &PgPool,
    access: &str,
    expires_in_secs: i64,
    refresh: &str,
    refreshed_secs_ago: i64,
) {
    sqlx::query(
        "INSERT INTO oauth_tokens (system, account, access_token, access_expires_at, refresh_token, \
         refreshed_at, seed_sha256) VALUES ('exactonline', $1, $2, now() + make_interval(secs => $3), \
         $4, now() - make_interval(secs => $5), 'seeded-by-test')",
    )
    .bind(DIVISION.to_string())
    .bind(access)
    .bind(expires_in_secs as f64)
    .bind(refresh)
    .bind(refreshed_secs_ago as f64)
    .execute(pool)
    .await
    .unwrap();
}

async fn stored_refresh_token(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT refresh_token FROM oauth_tokens WHERE system = 'exactonline'")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn token_body(access: &str, refresh: &str) -> Value {
    json!({"access_token": access, "token_type": "bearer", "expires_in": "600", "refresh_token": refresh})
}

/// An account as Exact answers the connector's lookup (`$filter=ID eq guid'…'&$top=1`).
fn account_body(name: &str) -> Value {
    json!({"d": {"results": [{"ID": GUID, "Name": name, "Modified": "/Date(1700000000000)/"}]}})
}

#[tokio::test]
async fn exact_connector_against_simulator_every_operation() {
    let db = testing::database().await;
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hooks)
        .await;
    let (exact, running) = sim::start(
        ExactSimConfig {
            webhook_target: Some(format!("{}/webhooks/exactonline", hooks.uri())),
            min_refresh_interval: Duration::ZERO,
            ..ExactSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let seeded = exact.seed_account(json!({"Name": "Seeded BV", "Code": "                 1"}));
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );

    // fetch
    let record = connector.fetch("Accounts", &seeded).await.unwrap().unwrap();
    assert_eq!(record.id, seeded);
    assert_eq!(record.fields["Name"], json!("Seeded BV"));
    assert!(record.updated_at.is_some());
    assert!(record.fields["Modified"].as_str().unwrap().ends_with('Z'));
    assert!(connector
        .fetch("Accounts", "22222222-2222-2222-2222-222222222222")
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        connector.fetch("Accounts", "not-a-guid").await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));

    // create, update, find_by
    let created = connector
        .create("Accounts", &obj(json!({"Name": "Nordic AS"})), "key-1")
        .await
        .unwrap();
    assert_eq!(created.fields["Name"], json!("Nordic AS"));
    let updated = connector
        .update(
            "Accounts",
            &created.id,
            &obj(json!({"Name": "Nordic O'Brien AS"})),
        )
        .await
        .unwrap();
    assert_eq!(updated.fields["Name"], json!("Nordic O'Brien AS"));
    let found = connector
        .find_by("Accounts", &obj(json!({"Name": "Nordic O'Brien AS"})))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, created.id);
    assert!(matches!(
        connector.find_created("Accounts", "key-1").await,
        Err(ConnectorError::Unsupported { .. })
    ));

    // list_changed through the sync API: everything, then nothing, then only the changed one.
    let page = connector.list_changed("Accounts", None).await.unwrap();
    let ids: BTreeSet<_> = page.records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, BTreeSet::from([seeded.clone(), created.id.clone()]));
    let cursor = page.next_cursor.unwrap();
    let empty = connector
        .list_changed("Accounts", Some(&cursor))
        .await
        .unwrap();
    assert!(empty.records.is_empty());
    connector
        .update("Accounts", &seeded, &obj(json!({"City": "Utrecht"})))
        .await
        .unwrap();
    let again = connector
        .list_changed("Accounts", Some(&cursor))
        .await
        .unwrap();
    assert_eq!(again.records.len(), 1);
    assert_eq!(again.records[0].id, seeded);
    assert_eq!(again.records[0].fields["Name"], json!("Seeded BV"));

    // Departments: GET only in Exact (docs/vendors.md, Exact item 1): listed by Modified, never
    // written.
    let department = exact.seed_department(json!({"Code": "D1", "Description": "Support"}));
    let page = connector.list_changed("Departments", None).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].id, department);
    let later = connector
        .list_changed("Departments", page.next_cursor.as_deref())
        .await
        .unwrap();
    assert!(
        later.records.is_empty(),
        "an unchanged department is not listed again"
    );
    assert!(matches!(
        connector
            .create("Departments", &obj(json!({"Description": "x"})), "k2")
            .await,
        Err(ConnectorError::Unsupported { .. })
    ));
    assert!(matches!(
        connector
            .update(
                "Departments",
                &department,
                &obj(json!({"Description": "x"}))
            )
            .await,
        Err(ConnectorError::Unsupported { .. })
    ));

    // Divisions: read-only, integer keys.
    exact.seed_division(json!({"Code": 7, "Description": "Main"}));
    let division = connector.fetch("Divisions", "7").await.unwrap().unwrap();
    assert_eq!(division.fields["Description"], json!("Main"));
    let page = connector.list_changed("Divisions", None).await.unwrap();
    assert_eq!(page.records[0].id, "7");
    assert!(matches!(
        connector
            .create("Divisions", &obj(json!({"Description": "x"})), "k")
            .await,
        Err(ConnectorError::Unsupported { .. })
    ));

    // Access token expiry mid-run: the stored token is stale, the refresh rotates the token.
    let before = stored_refresh_token(&db.pool).await;
    exact.expire_access_tokens();
    sqlx::query("UPDATE oauth_tokens SET refreshed_at = now() - interval '10 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    connector.fetch("Accounts", &seeded).await.unwrap().unwrap();
    assert_eq!(exact.token_calls(), 2);
    let after = stored_refresh_token(&db.pool).await;
    assert_ne!(before, after);
    assert_eq!(after, exact.current_refresh_token());

    // Webhooks for the account changes, each signed with the HashCode.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if exact.webhook_stats().delivered >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = hooks.received_requests().await.unwrap();
    let mut actions = Vec::new();
    for request in &received {
        let body = std::str::from_utf8(&request.body).unwrap();
        let content = body
            .strip_prefix("{\"Content\":")
            .and_then(|rest| rest.rsplit_once(",\"HashCode\":\""))
            .unwrap();
        let hash = content.1.trim_end_matches("\"}");
        assert!(signing::exact::verify(
            "sim-webhook-secret",
            content.0.as_bytes(),
            hash
        ));
        let parsed: Value = serde_json::from_str(content.0).unwrap();
        assert_eq!(parsed["Topic"], json!("Accounts"));
        assert!(parsed["ExactOnlineEndpoint"]
            .as_str()
            .unwrap()
            .contains("crm/Accounts(guid'"));
        actions.push(parsed["Action"].as_str().unwrap().to_owned());
    }
    assert_eq!(actions, ["Create", "Update", "Update"]);
}

#[tokio::test]
async fn exact_listing_pages_through_next_links_and_equal_modified_times() {
    let db = testing::database().await;
    let (exact, running) = sim::start(ExactSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // 130 departments sharing one Modified time: more than two pages of 60.
    let mut expected = BTreeSet::new();
    for i in 0..130 {
        expected.insert(exact.seed_at(
            "Departments",
            json!({"Code": format!("D{i}"), "Description": format!("Dept {i}")}),
            1_700_000_000_000,
        ));
    }
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let page = connector
            .list_changed("Departments", cursor.as_deref())
            .await
            .unwrap();
        seen.extend(page.records.iter().map(|r| r.id.clone()));
        cursor = page.next_cursor;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen.len(), 130, "every department exactly once");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let after = connector
        .list_changed("Departments", cursor.as_deref())
        .await
        .unwrap();
    assert!(after.records.is_empty(), "nothing is re-emitted");
    // find_by follows __next to the end.
    let all = connector
        .find_by("Departments", &obj(json!({"Division": DIVISION})))
        .await
        .unwrap();
    assert_eq!(all.len(), 130);
}

#[tokio::test]
async fn exact_access_token_expiring_mid_run_is_refreshed_once() {
    let db = testing::database().await;
    let server = MockServer::start().await;
    // The stored access token still looks valid locally, but Exact has expired it.
    store_token(&db.pool, "A1", 300, "R1", 600).await;
    Mock::given(method("GET"))
        .and(header("authorization", "Bearer A1"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(header("authorization", "Bearer A2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(account_body("Acme")))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/oauth2/token"))
        .and(body_string_contains("refresh_token=R1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("A2", "R2")))
        .expect(1)
        .mount(&server)
        .await;
    let connector = ExactOnline::new(
        config(&server.uri(), "R0"),
        db.pool.clone(),
        Duration::from_secs(5),
    );
    let record = connector.fetch("Accounts", GUID).await.unwrap().unwrap();
    assert_eq!(record.fields["Name"], json!("Acme"));
    // The second call reuses A2 without another token call.
    connector.fetch("Accounts", GUID).await.unwrap().unwrap();
    assert_eq!(stored_refresh_token(&db.pool).await, "R2");
}

#[tokio::test]
async fn exact_two_replicas_use_a_rotated_refresh_token_once() {
    let db = testing::database().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/oauth2/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body("A1", "R1"))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(header("authorization", "Bearer A1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(account_body("Acme")))
        .expect(2)
        .mount(&server)
        .await;
    let first = ExactOnline::new(
        config(&server.uri(), "R0"),
        db.pool.clone(),
        Duration::from_secs(5),
    );
    let second = ExactOnline::new(
        config(&server.uri(), "R0"),
        db.pool.clone(),
        Duration::from_secs(5),
    );
    let (a, b) = tokio::join!(
        first.fetch("Accounts", GUID),
        second.fetch("Accounts", GUID)
    );
    assert!(a.unwrap().is_some());
    assert!(b.unwrap().is_some());
    assert_eq!(stored_refresh_token(&db.pool).await, "R1");
    server.verify().await;
}

#[tokio::test]
async fn exact_rejected_refresh_token_stops_the_system_without_a_retry_storm() {
    let db = testing::database().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/oauth2/token"))
        .and(body_string_contains("refresh_token=R-old"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "invalid_grant", "error_description": "Old or invalid refresh token"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/oauth2/token"))
        .and(body_string_contains("refresh_token=R-new"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("A9", "R-next")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(header("authorization", "Bearer A9"))
        .respond_with(ResponseTemplate::new(200).set_body_json(account_body("Acme")))
        .mount(&server)
        .await;
    let connector = ExactOnline::new(
        config(&server.uri(), "R-old"),
        db.pool.clone(),
        Duration::from_secs(5),
    );
    for _ in 0..5 {
        match connector.fetch("Accounts", GUID).await {
            Err(ConnectorError::Unauthorized { message, .. }) => {
                assert!(
                    message.contains(
                        "re-authorise Tether in Exact Online and set exactonline.refresh_token"
                    ),
                    "{message}"
                );
                assert!(!message.contains("R-old"), "no secret in the message");
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }
    let reason: Option<String> =
        sqlx::query_scalar("SELECT stopped_reason FROM oauth_tokens WHERE system = 'exactonline'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(reason.unwrap().contains("invalid_grant"));

    // The operator re-authorises and configures the new refresh token: the system restarts.
    let restarted = ExactOnline::new(
        config(&server.uri(), "R-new"),
        db.pool.clone(),
        Duration::from_secs(5),
    );
    // Exact's 570 s rule still applies to the first refresh after the stop; pretend it passed.
    sqlx::query("UPDATE oauth_tokens SET refreshed_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(restarted.fetch("Accounts", GUID).await.unwrap().is_some());
    assert_eq!(stored_refresh_token(&db.pool).await, "R-next");
    server.verify().await;
}

#[tokio::test]
async fn exact_429_5xx_and_timeouts_are_classified() {
    let db = testing::database().await;
    let server = MockServer::start().await;
    store_token(&db.pool, "A1", 600, "R1", 10).await;
    let reset_ms = chrono::Utc::now().timestamp_millis() + 30_000;
    Mock::given(method("GET"))
        .and(query_param_contains("$filter", "guid'11111111-"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-ratelimit-minutely-remaining", "0")
                .insert_header("x-ratelimit-minutely-reset", reset_ms.to_string().as_str()),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(query_param_contains("$filter", "guid'22222222-"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(query_param_contains("$filter", "guid'33333333-"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let connector = ExactOnline::new(
        config(&server.uri(), "R0"),
        db.pool.clone(),
        Duration::from_millis(500),
    );
    match connector.fetch("Accounts", GUID).await {
        Err(ConnectorError::RateLimited {
            retry_after: Some(wait),
            ..
        }) => {
            assert!(
                wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
                "{wait:?}"
            );
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    // The headers said the minute is used up: the next call waits for the reset without
    // calling Exact (the 429 mock expects exactly one call).
    assert!(matches!(
        connector
            .fetch("Accounts", "22222222-2222-2222-2222-222222222222")
            .await,
        Err(ConnectorError::RateLimited { .. })
    ));
    let fresh = ExactOnline::new(
        config(&server.uri(), "R0"),
        db.pool.clone(),
        Duration::from_millis(500),
    );
    assert!(matches!(
        fresh
            .fetch("Accounts", "22222222-2222-2222-2222-222222222222")
            .await,
        Err(ConnectorError::Transient { .. })
    ));
    assert!(matches!(
        fresh
            .fetch("Accounts", "33333333-3333-3333-3333-333333333333")
            .await,
        Err(ConnectorError::Timeout { .. })
    ));
    server.verify().await;
}

#[tokio::test]
async fn exact_simulator_refuses_reused_and_early_refreshes() {
    let (exact, running) = sim::start(ExactSimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let refresh = |token: String| {
        let http = http.clone();
        let url = format!("{}/api/oauth2/token", running.base_url());
        async move {
            let response = http
                .post(url)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                    ("client_id", "sim-client"),
                    ("client_secret", "sim-client-secret"),
                ])
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = refresh("sim-refresh-0".to_owned()).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], json!("600"));
    // A second access token within 570 s is refused.
    let (status, body) = refresh(body["refresh_token"].as_str().unwrap().to_owned()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], json!("invalid_request"));
    assert_eq!(exact.token_calls(), 2);
}

#[tokio::test]
async fn exact_budget_stops_before_the_division_limit_is_hit() {
    let db = testing::database().await;
    let (exact, running) = sim::start(
        ExactSimConfig {
            minutely_limit: 5,
            ..ExactSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let id = exact.seed_account(json!({"Name": "Budget BV"}));
    let connector = ExactOnline::new(
        config(&running.base_url(), "sim-refresh-0"),
        db.pool.clone(),
        Duration::from_secs(10),
    );
    for _ in 0..5 {
        connector.fetch("Accounts", &id).await.unwrap().unwrap();
    }
    // The last answer said no calls are left this minute: the connector reports back-pressure
    // with the time to the reset instead of calling and earning a 429.
    match connector.fetch("Accounts", &id).await {
        Err(ConnectorError::RateLimited {
            retry_after: Some(wait),
            ..
        }) => assert!(wait <= Duration::from_secs(60), "{wait:?}"),
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(
        exact
            .control
            .count("GET /api/v1/{division}/{module}/{segment}"),
        5,
        "the sixth call never reached Exact"
    );
}

#[tokio::test]
async fn exact_simulator_rotates_refresh_tokens() {
    let (_exact, running) = sim::start(
        ExactSimConfig {
            min_refresh_interval: Duration::ZERO,
            ..ExactSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/api/oauth2/token", running.base_url());
    let refresh = |token: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let response = http
                .post(url)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.as_str()),
                    ("client_id", "sim-client"),
                    ("client_secret", "sim-client-secret"),
                ])
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let token = |body: &Value| body["refresh_token"].as_str().unwrap().to_owned();
    let (_, first) = refresh("sim-refresh-0".to_owned()).await;
    let r1 = token(&first);
    // A lost response: the old token still works while its successor is unused.
    let (status, retried) = refresh("sim-refresh-0".to_owned()).await;
    assert_eq!(status, 200);
    let r1b = token(&retried);
    assert_ne!(r1, r1b);
    // Using the newest token retires everything before it.
    let (status, _) = refresh(r1b.clone()).await;
    assert_eq!(status, 200);
    for old in ["sim-refresh-0".to_owned(), r1] {
        let (status, body) = refresh(old).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], json!("invalid_grant"));
    }
}

#[tokio::test]
async fn exact_simulator_signs_webhooks_for_user_changes_and_deletes() {
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/webhooks/exactonline"))
        .respond_with(ResponseTemplate::new(200))
        .expect(2)
        .mount(&hooks)
        .await;
    let (exact, _running) = sim::start(
        ExactSimConfig {
            webhook_target: Some(format!("{}/webhooks/exactonline", hooks.uri())),
            ..ExactSimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let id = exact.seed_account(json!({"Name": "Quiet seed"}));
    assert!(exact.change_account(&id, json!({"Name": "Edited in Exact"})));
    assert!(exact.delete_account(&id));
    assert!(!exact.delete_account(&id));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exact.webhook_stats().delivered < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhooks not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let actions: Vec<String> = hooks
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["Content"]["Key"], json!(id));
            assert_eq!(body["HashCode"].as_str().unwrap().len(), 64);
            body["Content"]["Action"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(actions, ["Update", "Delete"]);
}
