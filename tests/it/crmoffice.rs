//! The CRMOffice connector against its simulator (every operation, paging at equal timestamps)
//! and against `wiremock` for the assumed request shapes and rate limiting.

use std::time::Duration;

use serde_json::json;
use tether::connectors::{Connector, ConnectorError};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::crmoffice::{connector, sim, TOKEN};
use crate::support::{at, drain, obj};

#[tokio::test]
async fn connector_does_every_operation_against_the_simulator() {
    let (sim, running) = sim().await;
    let c = connector(&running.base_url(), 100);
    let company = sim.insert("companies", obj(json!({"name": "Acme"})), None);

    let contact = c
        .create(
            "Contacts",
            &obj(json!({"name": "Kari", "company": {"id": company}})),
            "intent-1",
        )
        .await
        .unwrap();
    assert_eq!(contact.get_path("company.id"), Some(&json!(company)));
    assert_eq!(contact.fields["externalId"], json!("intent-1"));

    let activity = c
        .create(
            "Activities",
            &obj(json!({"subject": "Printer on fire", "ownerId": contact.id})),
            "intent-2",
        )
        .await
        .unwrap();

    assert_eq!(
        c.fetch("Contacts", &contact.id).await.unwrap().unwrap(),
        contact
    );
    assert_eq!(c.fetch("Activities", "999").await.unwrap(), None);
    let fetched_company = c.fetch("Companies", &company).await.unwrap().unwrap();
    assert_eq!(fetched_company.fields["name"], json!("Acme"));

    assert_eq!(
        c.find_created("Activities", "intent-2")
            .await
            .unwrap()
            .unwrap()
            .id,
        activity.id
    );
    assert_eq!(
        c.find_created("Activities", "intent-x").await.unwrap(),
        None
    );

    // PUT replaces the whole record: the connector keeps the fields it did not change.
    let updated = c
        .update(
            "Activities",
            &activity.id,
            &obj(json!({"subject": "Printer fixed"})),
        )
        .await
        .unwrap();
    assert_eq!(updated.fields["subject"], json!("Printer fixed"));
    assert_eq!(updated.fields["ownerId"], json!(contact.id));
    assert_eq!(updated.fields["externalId"], json!("intent-2"));
    assert_eq!(
        sim.get("activities", &activity.id).unwrap()["subject"],
        json!("Printer fixed")
    );

    let by = c
        .find_by("Contacts", &obj(json!({"company.id": company})))
        .await
        .unwrap();
    assert_eq!(by.len(), 1);
    assert_eq!(by[0].id, contact.id);

    let page = c.list_changed("Activities", None).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert!(!page.has_more);

    // Companies are a reference target only.
    let err = c
        .create("Companies", &obj(json!({"name": "B"})), "k")
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Unsupported { .. }), "{err:?}");
    let err = c.fetch("Tickets", "1").await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unsupported { .. }), "{err:?}");
    let err = c
        .update("Contacts", "424242", &obj(json!({"name": "x"})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Rejected { status: 404, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn list_changed_survives_whole_pages_of_equal_timestamps() {
    let (sim, running) = sim().await;
    let c = connector(&running.base_url(), 2);
    let t = at("2026-01-01T00:00:00Z");
    let mut expected: Vec<String> = (0..5)
        .map(|i| sim.insert("contacts", obj(json!({"n": i})), Some(t)))
        .collect();
    expected.push(sim.insert(
        "contacts",
        obj(json!({"n": 5})),
        Some(at("2026-01-01T00:00:01Z")),
    ));
    let (ids, cursor) = drain(&c, "Contacts", None).await.into_ids();
    assert_eq!(ids, expected);

    let (ids, cursor) = drain(&c, "Contacts", cursor).await.into_ids();
    assert!(ids.is_empty(), "{ids:?}");

    let late = sim.insert(
        "contacts",
        obj(json!({"n": 6})),
        Some(at("2026-01-01T00:00:01Z")),
    );
    sim.touch("contacts", &expected[0], obj(json!({"n": 10})), None);
    let (ids, cursor) = drain(&c, "Contacts", cursor).await.into_ids();
    assert_eq!(ids, vec![late, expected[0].clone()]);
    let (ids, _) = drain(&c, "Contacts", cursor).await.into_ids();
    assert!(ids.is_empty(), "{ids:?}");
}

#[tokio::test]
async fn requests_follow_the_named_assumptions_and_429_is_back_pressure() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/contacts"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .and(query_param("sort", "updatedAt"))
        .and(query_param("page", "1"))
        .and(query_param("pageSize", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"items": [
            {"id": 11, "updatedAt": "2026-01-01T00:00:00Z", "company": {"id": 5}},
        ]})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/activities"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "30"))
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(&server.uri(), 2);
    let page = c.list_changed("Contacts", None).await.unwrap();
    assert_eq!(page.records[0].id, "11");
    assert_eq!(page.records[0].get_path("company.id"), Some(&json!(5)));
    let err = c.list_changed("Activities", None).await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(30)),
        "{err:?}"
    );
}

#[tokio::test]
async fn find_created_falls_back_to_a_scan_when_the_external_id_filter_is_ignored() {
    let server = MockServer::start().await;
    let items = json!({"items": [
        {"id": "1", "updatedAt": "2026-01-01T00:00:00Z", "externalId": "other"},
        {"id": "2", "updatedAt": "2026-01-01T00:00:01Z", "externalId": "mine"},
    ]});
    Mock::given(method("GET"))
        .and(path("/contacts"))
        .and(query_param("externalId", "mine"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"items": [items["items"][0]]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/contacts"))
        .and(query_param("page", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(items))
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(&server.uri(), 10);
    let found = c.find_created("Contacts", "mine").await.unwrap().unwrap();
    assert_eq!(found.id, "2");
}

/// Issue 16 item 9: CRMOffice access tokens come from OAuth2 refresh tokens (Sesam's connector:
/// `/connect/token`, scopes `crmoffice offline_access`), live about an hour and rotate. The
/// connector refreshes once, reuses the access token (also from another replica, through
/// `oauth_tokens`), refreshes once more after a 401 of an expired token, and stores the rotated
/// refresh token; the simulator refuses a used refresh token.
#[tokio::test]
async fn oauth_refresh_tokens_rotate_and_an_expired_access_token_is_renewed_once() {
    use tether::config::{CrmOfficeAuth, CrmOfficeConfig, CrmOfficeOAuth};
    use tether::connectors::crmoffice::CrmOfficeConnector;

    let db = tether::testing::database().await;
    let (sim, running) = sim().await;
    let lifetime = tether::simulators::crmoffice::oauth::DEFAULT_ACCESS_LIFETIME;
    sim.enable_oauth("crm-client", "crm-secret", "crm-refresh-0", lifetime);
    let base = running.base_url();
    let config = CrmOfficeConfig {
        base_url: base.parse().unwrap(),
        auth: CrmOfficeAuth::OAuth(CrmOfficeOAuth {
            token_url: format!("{base}/connect/token").parse().unwrap(),
            client_id: "crm-client".into(),
            client_secret: secrecy::SecretString::from("crm-secret"),
            refresh_token: secrecy::SecretString::from("crm-refresh-0"),
        }),
        poll_interval: Duration::from_secs(60),
    };
    let timeout = Duration::from_secs(5);
    let replica_a = CrmOfficeConnector::configured(&config, &db.pool, timeout, None);
    let replica_b = CrmOfficeConnector::configured(&config, &db.pool, timeout, None);
    let company = sim.insert("companies", obj(json!({"name": "Acme"})), None);

    assert!(replica_a
        .fetch("Companies", &company)
        .await
        .unwrap()
        .is_some());
    assert!(replica_b
        .fetch("Companies", &company)
        .await
        .unwrap()
        .is_some());
    assert_eq!(sim.token_calls(), 1, "one refresh, shared by both replicas");

    sim.expire_access_tokens();
    assert!(replica_b
        .fetch("Companies", &company)
        .await
        .unwrap()
        .is_some());
    assert!(replica_a
        .fetch("Companies", &company)
        .await
        .unwrap()
        .is_some());
    assert_eq!(sim.token_calls(), 2, "the 401 renewed the token once");

    let stored: String =
        sqlx::query_scalar("SELECT refresh_token FROM oauth_tokens WHERE system = 'crmoffice'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        Some(stored),
        sim.current_refresh_token(),
        "the rotated token is kept"
    );
    assert_ne!(
        sim.current_refresh_token().as_deref(),
        Some("crm-refresh-0")
    );
}
