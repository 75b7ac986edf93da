//! Webhook intake against a real PostgreSQL: every system's happy path, a table of malformed
//! deliveries, deduplication (also concurrent), 503 without a database, secret rotation.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use tether::config::Config;
use tether::http::AppState;
use tether::signing;
use tether::testing;

const ZD_SECRET: &str = "zd-current-secret";
const ZD_OLD_SECRET: &str = "zd-previous-secret";
const EXACT_SECRET: &str = "exact-webhook-secret";
const ERP_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PMS_SECRET: &str = "whsec_c2Vjb25kLWN1c3RvbS1zZWNyZXQ=";
const BODY_LIMIT: usize = 4096;

fn config(toml: &str) -> Arc<Config> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.toml");
    std::fs::write(&path, toml).unwrap();
    Arc::new(Config::load(Some(&path)).unwrap())
}

fn full_config() -> Arc<Config> {
    config(&format!(
        r#"
[http]
body_limit = {BODY_LIMIT}

[zendesk]
base_url = "http://127.0.0.1:1"
email = "a@example.com"
api_token = "t"
webhook_secrets = ["{ZD_SECRET}", "{ZD_OLD_SECRET}"]

[exactonline]
base_url = "http://127.0.0.1:1"
division = 123456
client_id = "c"
client_secret = "s"
refresh_token = "r"
webhook_secret = "{EXACT_SECRET}"

[customerp]
base_url = "http://127.0.0.1:1"
api_token = "t"
webhook_secret = "{ERP_SECRET}"

[custompms]
base_url = "http://127.0.0.1:1"
api_token = "t"
webhook_secret = "{PMS_SECRET}"
"#
    ))
}

/// The registry `serve` would load for `config`.
fn registry_of(config: &Config) -> Arc<tether::registry::Registry> {
    let (registry, _) = tether::registry::load(config.registry.overlay.as_deref()).unwrap();
    Arc::new(registry)
}

fn app(pool: PgPool, config: Arc<Config>) -> Router {
    app_storing(pool, config, Default::default())
}

/// [`app`] whose intake waits on the engine's writes `storing` marks.
fn app_storing(pool: PgPool, config: Arc<Config>, storing: tether::sync::StoringWrites) -> Router {
    tether::http::router(AppState {
        registry: registry_of(&config),
        storing,
        pool,
        config,
        shutdown: CancellationToken::new(),
    })
}

/// A Custom ERP customer, as the engine marks the one it writes.
fn erp_customer(id: &str) -> tether::domain::RecordKey {
    tether::domain::RecordKey {
        system: tether::domain::SystemId::CustomErp,
        entity_type: "Customer".into(),
        record_id: id.into(),
    }
}

/// One delivery to send.
#[derive(Clone)]
struct Delivery {
    system: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

async fn send(app: &Router, d: &Delivery) -> (StatusCode, serde_json::Value) {
    let mut req =
        Request::post(format!("/webhooks/{}", d.system)).header("content-type", "application/json");
    for (k, v) in &d.headers {
        req = req.header(*k, v.as_bytes());
    }
    let response = app
        .clone()
        .oneshot(req.body(Body::from(d.body.clone())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "non-JSON answer {status}: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, json)
}

fn iso(offset_secs: i64) -> String {
    (Utc::now() + chrono::Duration::seconds(offset_secs))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn zendesk_body(kind: &str, id: &str, record: &str) -> Vec<u8> {
    format!(
        r#"{{"type":"zen:event-type:{kind}","account_id":1,"id":"{id}","subject":"zen:x:{record}","time":"2024-05-01T10:00:00Z","zendesk_event_version":"2022-06-20","detail":{{"id":"{record}"}},"event":{{}}}}"#
    )
    .into_bytes()
}

fn zendesk_signed(secret: &str, ts: &str, body: Vec<u8>) -> Delivery {
    Delivery {
        system: "zendesk",
        headers: vec![
            (
                "x-zendesk-webhook-signature",
                signing::zendesk::sign(secret, ts, &body),
            ),
            ("x-zendesk-webhook-signature-timestamp", ts.to_owned()),
        ],
        body,
    }
}

fn zendesk(body: Vec<u8>) -> Delivery {
    zendesk_signed(ZD_SECRET, &iso(0), body)
}

fn exact_content(action: &str, key: &str) -> String {
    format!(
        r#"{{"Topic":"Accounts","ClientId":"00000000-0000-0000-0000-000000000001","Division":123456,"Action":"{action}","Key":"{key}","ExactOnlineEndpoint":"https://start.exactonline.nl/api/v1/123456/crm/Accounts(guid'{key}')","EventCreatedOn":"2024-01-01T12:00:00.000"}}"#
    )
}

fn exact_with(content: &str, hash: &str) -> Delivery {
    Delivery {
        system: "exactonline",
        headers: vec![],
        body: format!(r#"{{"Content":{content},"HashCode":"{hash}"}}"#).into_bytes(),
    }
}

fn exact(content: &str) -> Delivery {
    exact_with(
        content,
        &signing::exact::sign(EXACT_SECRET, content.as_bytes()),
    )
}

fn standard_signed(system: &'static str, secret: &str, id: &str, ts: i64, body: &[u8]) -> Delivery {
    let key = signing::standard::secret_key(secret).unwrap();
    let ts = ts.to_string();
    Delivery {
        system,
        headers: vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.clone()),
            (
                "webhook-signature",
                signing::standard::sign(&key, id, &ts, body),
            ),
        ],
        body: body.to_vec(),
    }
}

fn custom(system: &'static str, id: &str, body: &str) -> Delivery {
    let secret = if system == "customerp" {
        ERP_SECRET
    } else {
        PMS_SECRET
    };
    standard_signed(system, secret, id, Utc::now().timestamp(), body.as_bytes())
}

fn without(mut d: Delivery, header: &str) -> Delivery {
    d.headers.retain(|(k, _)| *k != header);
    d
}

fn with_header(mut d: Delivery, header: &'static str, value: &str) -> Delivery {
    d.headers.retain(|(k, _)| *k != header);
    d.headers.push((header, value.to_owned()));
    d
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

type Row = (
    String,
    String,
    String,
    String,
    Option<chrono::DateTime<Utc>>,
);

async fn stored(pool: &PgPool, system: &str, delivery_id: &str) -> Row {
    sqlx::query_as(
        "SELECT e.entity_type, e.record_id, e.action, j.record_key, e.occurred_at
         FROM events e JOIN jobs j ON j.event_id = e.id
         WHERE e.system = $1 AND e.delivery_id = $2",
    )
    .bind(system)
    .bind(delivery_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn zendesk_events_are_stored_with_their_job() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());

    let (status, body) = send(
        &app,
        &zendesk(zendesk_body("organization.created", "zd-1", "42")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "accepted");
    let (t, id, action, key, at) = stored(&db.pool, "zendesk", "zd-1").await;
    assert_eq!(
        (t.as_str(), id.as_str(), action.as_str()),
        ("Organizations", "42", "created")
    );
    assert_eq!(key, "zendesk/Organizations/42");
    assert_eq!(at.unwrap().to_rfc3339(), "2024-05-01T10:00:00+00:00");

    let (status, _) = send(
        &app,
        &zendesk(zendesk_body("user.name_changed", "zd-2", "7")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (t, _, action, _, _) = stored(&db.pool, "zendesk", "zd-2").await;
    assert_eq!((t.as_str(), action.as_str()), ("Users", "updated"));

    let (status, _) = send(&app, &zendesk(zendesk_body("ticket.deleted", "zd-3", "9"))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (t, _, action, _, _) = stored(&db.pool, "zendesk", "zd-3").await;
    assert_eq!((t.as_str(), action.as_str()), ("Tickets", "deleted"));

    let comment = br#"{"type":"zen:event-type:ticket.comment_added","id":"zd-4","subject":"zen:ticket:9","time":"2024-05-01T10:00:00Z","detail":{"id":"9"},"event":{"comment":{"id":555,"body":"hi","is_public":true}}}"#;
    let (status, _) = send(&app, &zendesk(comment.to_vec())).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (t, id, action, _, _) = stored(&db.pool, "zendesk", "zd-4").await;
    assert_eq!(
        (t.as_str(), id.as_str(), action.as_str()),
        ("Ticketcomments", "9:555", "created")
    );

    // Event types no dataflow needs: 200, not stored.
    for ignored in [
        zendesk_body("user.last_login_changed", "zd-5", "7"),
        zendesk_body("group.created", "zd-6", "1"),
    ] {
        let (status, body) = send(&app, &zendesk(ignored)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ignored");
    }
    assert_eq!(count(&db.pool, "events").await, 4);
    assert_eq!(count(&db.pool, "jobs").await, 4);
}

#[tokio::test]
async fn exact_online_accounts_are_stored_and_other_topics_ignored() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    // Spacing as Exact might send it: the HashCode covers these exact bytes.
    let content =
        exact_content("Create", "11111111-1111-1111-1111-111111111111").replace(",\"", ", \"");
    let (status, body) = send(&app, &exact(&content)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let delivery = body["delivery_id"].as_str().unwrap().to_owned();
    let (t, id, action, _, _) = stored(&db.pool, "exactonline", &delivery).await;
    assert_eq!(
        (t.as_str(), id.as_str(), action.as_str()),
        (
            "Accounts",
            "11111111-1111-1111-1111-111111111111",
            "created"
        )
    );
    // The same Content again is the same delivery.
    let (status, body) = send(&app, &exact(&content)).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );

    let delete = exact_content("Delete", "22222222-2222-2222-2222-222222222222");
    assert_eq!(send(&app, &exact(&delete)).await.0, StatusCode::ACCEPTED);

    let sales = exact_content("Update", "33333333-3333-3333-3333-333333333333")
        .replace("Accounts", "SalesOrders");
    let (status, body) = send(&app, &exact(&sales)).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ignored"))
    );
    assert_eq!(count(&db.pool, "events").await, 2);
}

#[tokio::test]
async fn custom_systems_use_standard_webhooks() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    let cases = [
        (
            "customerp",
            "msg_1",
            r#"{"type":"customer.updated","data":{"id":"c-1"}}"#,
            "Customer",
            "updated",
        ),
        (
            "customerp",
            "msg_2",
            r#"{"type":"contact.created","data":{"id":17}}"#,
            "Contact",
            "created",
        ),
        (
            "custompms",
            "msg_1",
            r#"{"type":"project.deleted","data":{"id":"p-9"}}"#,
            "Project",
            "deleted",
        ),
    ];
    for (system, id, body, entity, action) in cases {
        let (status, answer) = send(&app, &custom(system, id, body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{system} {answer}");
        let (t, _, a, _, _) = stored(&db.pool, system, id).await;
        assert_eq!((t.as_str(), a.as_str()), (entity, action));
    }
    // Custom PMS has no contacts in any dataflow.
    let (status, answer) = send(
        &app,
        &custom(
            "custompms",
            "msg_3",
            r#"{"type":"contact.updated","data":{"id":"x"}}"#,
        ),
    )
    .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (StatusCode::OK, Some("ignored"))
    );
    assert_eq!(count(&db.pool, "events").await, 3);
}

#[tokio::test]
async fn malformed_deliveries_are_refused_and_nothing_is_stored() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    // One stored delivery for the duplicate case.
    let original = zendesk(zendesk_body("organization.created", "dup-1", "1"));
    assert_eq!(send(&app, &original).await.0, StatusCode::ACCEPTED);

    let good = || zendesk(zendesk_body("organization.created", "bad-1", "1"));
    let sig = || good().headers[0].1.clone();
    let now = Utc::now().timestamp();
    let erp_body = br#"{"type":"customer.updated","data":{"id":"c-1"}}"#;
    let content = exact_content("Update", "11111111-1111-1111-1111-111111111111");
    let spaced = content.replace(",\"", ", \"");
    let reserialised =
        serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&spaced).unwrap())
            .unwrap();
    let mut changed = good();
    changed.body[10] ^= 1;

    let cases: Vec<(&str, Delivery, StatusCode, &str)> = vec![
        (
            "zendesk: no signature header",
            without(good(), "x-zendesk-webhook-signature"),
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "zendesk: no timestamp header",
            without(good(), "x-zendesk-webhook-signature-timestamp"),
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "zendesk: no headers at all",
            Delivery {
                headers: vec![],
                ..good()
            },
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "zendesk: wrong secret",
            zendesk_signed("not-the-secret", &iso(0), good().body),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: truncated signature",
            with_header(good(), "x-zendesk-webhook-signature", &sig()[..20]),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: signature not base64",
            with_header(good(), "x-zendesk-webhook-signature", "%%%not-base64%%%"),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: empty signature",
            with_header(good(), "x-zendesk-webhook-signature", ""),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: body changed by one byte",
            changed,
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: signature of another timestamp",
            with_header(good(), "x-zendesk-webhook-signature-timestamp", &iso(-1)),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: timestamp 6 minutes old",
            zendesk_signed(ZD_SECRET, &iso(-360), good().body),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "zendesk: timestamp 6 minutes ahead",
            zendesk_signed(ZD_SECRET, &iso(360), good().body),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "zendesk: unix-seconds timestamp",
            zendesk_signed(ZD_SECRET, &now.to_string(), good().body),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "zendesk: body+timestamp order (old doc)",
            with_header(good(), "x-zendesk-webhook-signature", &{
                let ts = iso(0);
                let mut m = good().body;
                m.extend_from_slice(ts.as_bytes());
                signing::zendesk::sign(ZD_SECRET, "", &m)
            }),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "zendesk: empty body, unsigned",
            Delivery {
                headers: vec![],
                body: vec![],
                ..good()
            },
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "zendesk: empty body, signed",
            zendesk(vec![]),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: not JSON, signed",
            zendesk(b"type=organization.created".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: JSON array, signed",
            zendesk(b"[1,2,3]".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: no event id",
            zendesk(
                br#"{"type":"zen:event-type:organization.created","detail":{"id":"1"}}"#.to_vec(),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: type without prefix",
            zendesk(br#"{"type":"organization.created","id":"x","detail":{"id":"1"}}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: no record id",
            zendesk(br#"{"type":"zen:event-type:user.created","id":"x"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: comment_added without comment",
            zendesk(zendesk_body("ticket.comment_added", "x", "9")),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: NUL in event id",
            zendesk(
                br#"{"type":"zen:event-type:user.created","id":"a\u0000b","detail":{"id":"1"}}"#
                    .to_vec(),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "zendesk: duplicate delivery",
            original.clone(),
            StatusCode::OK,
            "",
        ),
        (
            "exact: HashCode of re-serialised Content, not the raw text",
            exact_with(
                &spaced,
                &signing::exact::sign(EXACT_SECRET, reserialised.as_bytes()),
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "exact: wrong secret",
            exact_with(&content, &signing::exact::sign("other", content.as_bytes())),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "exact: HashCode not hex",
            exact_with(&content, "zz-not-hex"),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "exact: no HashCode",
            Delivery {
                system: "exactonline",
                headers: vec![],
                body: format!(r#"{{"Content":{content}}}"#).into_bytes(),
            },
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "exact: not JSON",
            Delivery {
                system: "exactonline",
                headers: vec![],
                body: b"Content=1".to_vec(),
            },
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "exact: empty body",
            Delivery {
                system: "exactonline",
                headers: vec![],
                body: vec![],
            },
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "exact: signed Content without Key",
            exact(r#"{"Topic":"Accounts","Action":"Update"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "exact: signed Content with unknown Action",
            exact(&content.replace("Update", "Merge")),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "exact: signed Content that is a string",
            exact(r#""Accounts""#),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "customerp: no webhook-id",
            without(
                custom("customerp", "m1", std::str::from_utf8(erp_body).unwrap()),
                "webhook-id",
            ),
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "customerp: no webhook-signature",
            without(
                custom("customerp", "m1", std::str::from_utf8(erp_body).unwrap()),
                "webhook-signature",
            ),
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            "customerp: webhook-id swapped after signing",
            with_header(
                custom("customerp", "m1", std::str::from_utf8(erp_body).unwrap()),
                "webhook-id",
                "m2",
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "customerp: signed with the PMS secret",
            standard_signed("customerp", PMS_SECRET, "m1", now, erp_body),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "customerp: timestamp 6 minutes old",
            standard_signed("customerp", ERP_SECRET, "m1", now - 360, erp_body),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "customerp: timestamp 6 minutes ahead",
            standard_signed("customerp", ERP_SECRET, "m1", now + 360, erp_body),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "customerp: ISO timestamp",
            with_header(
                custom("customerp", "m1", std::str::from_utf8(erp_body).unwrap()),
                "webhook-timestamp",
                &iso(0),
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_timestamp",
        ),
        (
            "customerp: only a v2 signature",
            with_header(
                custom("customerp", "m1", std::str::from_utf8(erp_body).unwrap()),
                "webhook-signature",
                &format!(
                    "v2,{}",
                    base64::engine::general_purpose::STANDARD.encode([0u8; 32])
                ),
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "customerp: signed, wrong shape",
            custom("customerp", "m1", r#"{"event":"customer.updated"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "customerp: signed, unknown action",
            custom(
                "customerp",
                "m1",
                r#"{"type":"customer.archived","data":{"id":"1"}}"#,
            ),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "custompms: signed, not JSON",
            custom("custompms", "m1", "customer.updated"),
            StatusCode::BAD_REQUEST,
            "invalid_payload",
        ),
        (
            "body over the limit",
            zendesk(vec![b' '; BODY_LIMIT + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "unknown system",
            Delivery {
                system: "salesforce",
                ..good()
            },
            StatusCode::NOT_FOUND,
            "unknown_system",
        ),
        (
            "polled system has no webhooks",
            Delivery {
                system: "poweroffice",
                ..good()
            },
            StatusCode::NOT_FOUND,
            "unknown_system",
        ),
    ];
    assert!(cases.len() >= 25);
    for (name, delivery, expected, code) in &cases {
        let (status, body) = send(&app, delivery).await;
        assert_eq!(status, *expected, "{name}: {body}");
        if !code.is_empty() {
            assert_eq!(body["error"], *code, "{name}: {body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{name}"
            );
        }
        let text = body.to_string();
        for secret in [
            ZD_SECRET,
            ZD_OLD_SECRET,
            EXACT_SECRET,
            ERP_SECRET,
            PMS_SECRET,
        ] {
            assert!(!text.contains(secret), "{name} echoes a secret");
        }
        assert_eq!(
            count(&db.pool, "events").await,
            1,
            "{name} stored something"
        );
        assert_eq!(
            count(&db.pool, "jobs").await,
            1,
            "{name} enqueued something"
        );
    }
}

#[tokio::test]
async fn systems_that_are_not_connected_answer_404() {
    let db = testing::database().await;
    let cfg = config(
        "[zendesk]\nbase_url = \"http://127.0.0.1:1\"\nemail = \"a@b.c\"\napi_token = \"t\"\n\n[customerp]\nbase_url = \"http://127.0.0.1:1\"\napi_token = \"t\"\n",
    );
    let app = app(db.pool.clone(), cfg);
    for d in [
        zendesk(zendesk_body("organization.created", "n-1", "1")),
        exact(&exact_content("Update", "k")),
        custom(
            "customerp",
            "m",
            r#"{"type":"customer.updated","data":{"id":"1"}}"#,
        ),
        custom(
            "custompms",
            "m",
            r#"{"type":"customer.updated","data":{"id":"1"}}"#,
        ),
    ] {
        let (status, body) = send(&app, &d).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}: {body}", d.system);
        assert_eq!(body["error"], "system_not_connected");
    }
    assert_eq!(count(&db.pool, "events").await, 0);
}

#[tokio::test]
async fn concurrent_copies_of_one_delivery_are_stored_once() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    let d = zendesk(zendesk_body("organization.created", "same-1", "5"));
    let e = custom(
        "customerp",
        "same-2",
        r#"{"type":"customer.updated","data":{"id":"1"}}"#,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let app = app.clone();
        let d = if i % 2 == 0 { d.clone() } else { e.clone() };
        tasks.spawn(async move { send(&app, &d).await.0 });
    }
    let mut accepted = 0;
    let mut duplicates = 0;
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::OK => duplicates += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((accepted, duplicates), (2, 38));
    assert_eq!(count(&db.pool, "events").await, 2);
    assert_eq!(count(&db.pool, "jobs").await, 2);
}

#[tokio::test]
async fn many_concurrent_deliveries_are_each_stored_once() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let app = app.clone();
        tasks.spawn(async move {
            let d = zendesk(zendesk_body(
                "ticket.status_changed",
                &format!("many-{i}"),
                &i.to_string(),
            ));
            send(&app, &d).await.0
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::ACCEPTED);
    }
    assert_eq!(count(&db.pool, "events").await, 300);
    assert_eq!(count(&db.pool, "jobs").await, 300);
}

#[tokio::test]
async fn unreachable_database_answers_503() {
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&format!("postgres://tether:pw@127.0.0.1:{port}/tether"))
        .unwrap();
    let app = app(pool, full_config());
    let (status, body) = send(
        &app,
        &zendesk(zendesk_body("organization.created", "down-1", "1")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "database_unavailable");
    assert!(!body.to_string().contains("pw"), "{body}");
}

#[tokio::test]
async fn zendesk_secret_rotation_accepts_every_configured_secret() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    let ts = iso(0);
    let new = zendesk_signed(ZD_SECRET, &ts, zendesk_body("user.created", "rot-1", "1"));
    let old = zendesk_signed(
        ZD_OLD_SECRET,
        &ts,
        zendesk_body("user.created", "rot-2", "2"),
    );
    let retired = zendesk_signed(
        "zd-retired-secret",
        &ts,
        zendesk_body("user.created", "rot-3", "3"),
    );
    assert_eq!(send(&app, &new).await.0, StatusCode::ACCEPTED);
    assert_eq!(send(&app, &old).await.0, StatusCode::ACCEPTED);
    assert_eq!(send(&app, &retired).await.0, StatusCode::UNAUTHORIZED);

    // After the rotation completes, only the new secret is configured.
    let rotated = config(&format!(
        "[zendesk]\nbase_url = \"http://127.0.0.1:1\"\nemail = \"a@b.c\"\napi_token = \"t\"\nwebhook_secrets = [\"{ZD_SECRET}\"]\n"
    ));
    let app = self::app(db.pool.clone(), rotated);
    let old = zendesk_signed(
        ZD_OLD_SECRET,
        &iso(0),
        zendesk_body("user.created", "rot-4", "4"),
    );
    assert_eq!(send(&app, &old).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(count(&db.pool, "events").await, 2);
}

#[tokio::test]
async fn served_over_tcp_the_answer_comes_after_commit() {
    let db = testing::database().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let state = AppState {
        pool: db.pool.clone(),
        registry: registry_of(&full_config()),
        storing: Default::default(),
        config: full_config(),
        shutdown: shutdown.clone(),
    };
    let server = tokio::spawn(tether::http::serve(listener, state));
    let d = zendesk(zendesk_body("organization.created", "tcp-1", "1"));
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/zendesk"))
        .body(d.body.clone());
    for (k, v) in &d.headers {
        req = req.header(*k, v);
    }
    let response = req.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    // Acknowledged means committed: visible to another connection at once.
    stored(&db.pool, "zendesk", "tcp-1").await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
    // The intake gives every connection back once the server stopped (the pool can close).
    tokio::time::timeout(Duration::from_secs(20), db.pool.close())
        .await
        .expect("the pool closes after the server stopped");
}

#[tokio::test]
async fn a_refused_row_fails_only_its_own_request() {
    use tether::intake::store::{GroupCommit, StoreError, Stored};
    let db = testing::database().await;
    let commit = GroupCommit::start(db.pool.clone());
    let event = user_event;
    // PostgreSQL text refuses NUL: this row fails the batch it lands in. (The parsers refuse
    // such ids; this drives the store directly to prove the fallback.)
    let mut calls = Vec::new();
    for i in 0..50 {
        let record = if i == 25 {
            "bad\0id".to_owned()
        } else {
            i.to_string()
        };
        let commit = commit.clone();
        let e = event(&format!("d-{i}"), &record);
        calls.push(tokio::spawn(async move { commit.store(e).await }));
    }
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    for (i, r) in results.iter().enumerate() {
        if i == 25 {
            assert_eq!(*r, Err(StoreError::Refused));
        } else {
            assert!(matches!(r, Ok(Stored::New(_))), "{i}: {r:?}");
        }
    }
    assert_eq!(count(&db.pool, "events").await, 49);
    assert_eq!(count(&db.pool, "jobs").await, 49);
    // A second store of a stored delivery reports a duplicate.
    assert_eq!(commit.store(event("d-1", "1")).await, Ok(Stored::Duplicate));
}

/// An update of Zendesk user `record`, delivered as `delivery`.
fn user_event(delivery: &str, record: &str) -> tether::domain::ChangeEvent {
    use tether::domain::{Action, ChangeEvent, RecordKey, SystemId};
    ChangeEvent {
        record: RecordKey {
            system: SystemId::Zendesk,
            entity_type: "Users".to_owned(),
            record_id: record.to_owned(),
        },
        action: Action::Updated,
        occurred_at: None,
        delivery_id: delivery.to_owned(),
    }
}

#[tokio::test]
async fn one_batch_statement_stores_each_delivery_once_with_one_job() {
    use tether::intake::store::{insert_batch, Stored};
    let db = testing::database().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let earlier = user_event("b-earlier", "9");
    let first = insert_batch(&mut conn, &[&earlier]).await.unwrap();
    let [Stored::New(earlier_id)] = first[..] else {
        panic!("{first:?}")
    };

    // Two new deliveries, an in-batch copy of one, and a copy of one stored before.
    let (a, b) = (user_event("b-a", "1"), user_event("b-b", "2"));
    let a_copy = user_event("b-a", "1");
    let again = user_event("b-earlier", "9");
    let results = insert_batch(&mut conn, &[&a, &b, &a_copy, &again])
        .await
        .unwrap();
    let [Stored::New(a_id), Stored::New(b_id), Stored::Duplicate, Stored::Duplicate] = results[..]
    else {
        panic!("{results:?}")
    };
    assert!(
        earlier_id < a_id && a_id < b_id,
        "ids follow the input order"
    );
    assert_eq!(count(&db.pool, "events").await, 3);
    // One job per stored event, in event order, with the queue's record key.
    let jobs: Vec<(i64, String)> =
        sqlx::query_as("SELECT event_id, record_key FROM jobs ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        jobs,
        vec![
            (earlier_id, "zendesk/Users/9".to_owned()),
            (a_id, "zendesk/Users/1".to_owned()),
            (b_id, "zendesk/Users/2".to_owned()),
        ]
    );
    // Autocommit: what it answered is visible to another connection at once.
    let other: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(other, 3);
}

#[tokio::test]
async fn a_stored_batch_wakes_the_workers() {
    use tether::intake::store::{GroupCommit, Stored};
    let db = testing::database().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener
        .listen(tether::queue::store::CHANNEL)
        .await
        .unwrap();
    let commit = GroupCommit::start(db.pool.clone());
    let stored = commit.store(user_event("wake-1", "1")).await;
    assert!(matches!(stored, Ok(Stored::New(_))), "{stored:?}");
    let notification = tokio::time::timeout(Duration::from_secs(20), listener.recv())
        .await
        .expect("the jobs trigger notifies once the batch committed")
        .unwrap();
    assert_eq!(notification.channel(), tether::queue::store::CHANNEL);
}

#[tokio::test]
async fn a_lost_database_connection_fails_at_most_one_batch() {
    use sqlx::Connection as _;
    use tether::intake::store::{GroupCommit, StoreError, Stored};
    let db = testing::database().await;
    let commit = GroupCommit::start(db.pool.clone());
    assert!(matches!(
        commit.store(user_event("lost-1", "1")).await,
        Ok(Stored::New(_))
    ));
    // Kill every other session of this database, the committer's (kept between batches) too.
    let mut admin = sqlx::PgConnection::connect(secrecy::ExposeSecret::expose_secret(&db.url))
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!killed.is_empty());
    // The next batch may find its connection dead (503: nothing stored, the sender retries)...
    let second = commit.store(user_event("lost-2", "2")).await;
    assert!(
        matches!(second, Ok(Stored::New(_)) | Err(StoreError::Unavailable)),
        "{second:?}"
    );
    // ...but the one after that runs on a fresh connection.
    assert!(matches!(
        commit.store(user_event("lost-3", "3")).await,
        Ok(Stored::New(_))
    ));
    if second.is_err() {
        assert!(matches!(
            commit.store(user_event("lost-2", "2")).await,
            Ok(Stored::New(_))
        ));
    }
    assert_eq!(count(&db.pool, "events").await, 3);
    assert_eq!(count(&db.pool, "jobs").await, 3);
}

/// The echo of a write the engine has not stored yet is held by the intake while the write is
/// being answered and then stored, and settled without a job once the store returned
/// (`sync::storing`): here the "engine" is the test, which marks the record, takes the answer,
/// stores the link's stamp, and drops the mark. The waits are long, so that only the mark ends
/// them.
#[tokio::test]
async fn a_custom_echo_of_a_write_being_stored_waits_for_the_store_and_needs_no_job() {
    let db = testing::database().await;
    let storing =
        tether::sync::StoringWrites::with_waits(Duration::from_secs(30), Duration::from_secs(30));
    let app = app_storing(db.pool.clone(), full_config(), storing.clone());
    let stamp = "2026-12-04T10:00:00.123456Z";
    // The link as it was before the write: the ERP side last seen at an older stamp.
    let link_id: i64 = sqlx::query_scalar(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side, \
         last_write_settled) VALUES ('zendesk.Organizations->customerp.Customer', 'zendesk', \
         'Organizations', '42', 'customerp', 'Customer', 'c-7', '{}', now(), \
         '2026-12-04T09:00:00Z', 'source', true) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mark = storing.mark(erp_customer("c-7"));
    let body =
        format!(r#"{{"type":"customer.updated","data":{{"id":"c-7","updated_at":"{stamp}"}}}}"#);
    let delivery = custom("customerp", "msg_early_echo", &body);
    let answered = tokio::spawn({
        let app = app.clone();
        async move { send(&app, &delivery).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!answered.is_finished(), "answered before the write was");
    // The vendor's answer: now the store.
    mark.answered();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !answered.is_finished(),
        "answered before the store returned"
    );
    assert_eq!(count(&db.pool, "events").await, 0);

    // The engine's store: the write's stamp, settled, then the mark goes.
    sqlx::query(
        "UPDATE links SET target_seen_at = $1::timestamptz, last_write_side = 'target', \
         last_write_settled = true WHERE id = $2",
    )
    .bind(stamp)
    .bind(link_id)
    .execute(&db.pool)
    .await
    .unwrap();
    drop(mark);
    let status = tokio::time::timeout(Duration::from_secs(20), answered)
        .await
        .expect("answered once the store returned")
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(count(&db.pool, "jobs").await, 0, "the echo needs no job");
    let decisions: Vec<String> = sqlx::query_scalar("SELECT decision FROM sync_log")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(decisions, ["echo"]);

    // A delivery of another record is not held by that mark's record.
    let _other_mark = storing.mark(erp_customer("c-8"));
    let body =
        r#"{"type":"customer.updated","data":{"id":"c-9","updated_at":"2026-12-04T10:00:02Z"}}"#;
    let other = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, &custom("customerp", "msg_other_record", body)),
    )
    .await
    .expect("not held by another record's mark");
    assert_eq!(other.0, StatusCode::ACCEPTED);
}

/// A system may send its webhook before it answers the write, and even wait for its delivery
/// before answering: with the default waits, a write that is not answered holds its record's
/// webhook only briefly (50 ms), and the webhook is then committed with its job.
#[tokio::test]
async fn a_webhook_of_a_write_never_answered_is_held_only_briefly_and_gets_its_job() {
    let db = testing::database().await;
    let storing = tether::sync::StoringWrites::default();
    let app = app_storing(db.pool.clone(), full_config(), storing.clone());
    let _never_answered = storing.mark(erp_customer("c-7"));
    let body =
        r#"{"type":"customer.updated","data":{"id":"c-7","updated_at":"2026-12-04T10:00:00Z"}}"#;
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, &custom("customerp", "msg_sync_sender", body)),
    )
    .await
    .expect("not held until the write's answer");
    assert_eq!(answered.0, StatusCode::ACCEPTED);
    assert_eq!(count(&db.pool, "jobs").await, 1);
}

/// A custom system's echo is settled by the group commit itself (docs/sync-rules.md, "An echo
/// without a read"): a delivery whose `updated_at` is the stamp of Tether's own settled write of
/// that side of its one flow's link is stored with its `echo` entry and no job; another stamp, or
/// the flow paused, is enqueued as before for the engine to decide.
#[tokio::test]
async fn a_custom_echo_carrying_tethers_stamp_is_settled_at_intake_without_a_job() {
    let db = testing::database().await;
    let app = app(db.pool.clone(), full_config());
    let stamp = "2026-12-04T10:00:00.123456Z";
    let link_id: i64 = sqlx::query_scalar(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot, source_seen_at, target_seen_at, last_write_side, \
         last_write_settled) VALUES ('zendesk.Organizations->customerp.Customer', 'zendesk', \
         'Organizations', '42', 'customerp', 'Customer', 'c-7', '{}', now(), $1::timestamptz, \
         'target', true) RETURNING id",
    )
    .bind(stamp)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let echo = |id: &str, at: &str| {
        let body =
            format!(r#"{{"type":"customer.updated","data":{{"id":"c-7","updated_at":"{at}"}}}}"#);
        custom("customerp", id, &body)
    };
    let jobs_of = |delivery: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM jobs j JOIN events e ON e.id = j.event_id \
                 WHERE e.system = 'customerp' AND e.delivery_id = $1",
            )
            .bind(delivery)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    assert_eq!(
        send(&app, &echo("msg_echo", stamp)).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(jobs_of("msg_echo").await, 0, "the echo needs no job");
    let logged: Vec<(String, Option<i64>, Option<i64>, String)> = sqlx::query_as(
        "SELECT l.decision, l.link_id, l.job_id, l.flow_id FROM sync_log l \
         JOIN events e ON e.id = l.event_id WHERE e.delivery_id = 'msg_echo'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        logged,
        vec![(
            "echo".to_owned(),
            Some(link_id),
            None,
            "zendesk.Organizations->customerp.Customer".to_owned()
        )]
    );

    // Another stamp is a change of the system's own: a job, nothing logged at intake.
    let other = "2026-12-04T10:00:01Z";
    assert_eq!(
        send(&app, &echo("msg_other", other)).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(jobs_of("msg_other").await, 1);
    // A paused flow records `paused` in the engine, so intake leaves the event to it.
    sqlx::query("INSERT INTO flow_pauses (flow_id, log_from) VALUES ($1, 0)")
        .bind("zendesk.Organizations->customerp.Customer")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        send(&app, &echo("msg_paused", stamp)).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(jobs_of("msg_paused").await, 1);
    assert_eq!(count(&db.pool, "sync_log").await, 1);
}
