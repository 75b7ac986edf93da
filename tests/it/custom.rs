//! The custom-system connector against its simulator (every operation, webhooks) and against
//! `wiremock` (429, 5xx, timeouts, the Idempotency-Key header).

use std::time::Duration;

use serde_json::{json, Value};
use tether::connectors::custom::CustomConnector;
use tether::connectors::{ConditionalWrites, Connector, ConnectorError};
use tether::domain::SystemId;
use tether::signing::standard;
use tether::simulators::kit;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::custom::{self as support_custom, connector, sim, SECRET, TOKEN};
use crate::support::{at, drain, obj, WebhookReceiver};

#[tokio::test]
async fn connector_does_every_operation_against_the_simulator() {
    let (sim, running) = sim(SystemId::CustomErp, None).await;
    let c = connector(
        SystemId::CustomErp,
        &running.base_url(),
        Duration::from_secs(5),
    );

    let created = c
        .create(
            "Customer",
            &obj(json!({"name": "Acme", "address": {"city": "Oslo", "zip": "0150"}})),
            "key-1",
        )
        .await
        .unwrap();
    assert!(created.updated_at.is_some());
    assert_eq!(created.fields["name"], json!("Acme"));
    // A retried create with the same key is the same record, not a second one.
    let again = c
        .create(
            "Customer",
            &obj(json!({"name": "Acme", "address": {"city": "Oslo", "zip": "0150"}})),
            "key-1",
        )
        .await
        .unwrap();
    assert_eq!(again.id, created.id);
    assert_eq!(sim.len("customer"), 1);

    let fetched = c.fetch("Customer", &created.id).await.unwrap().unwrap();
    assert_eq!(fetched, created);
    assert_eq!(c.fetch("Customer", "no-such-id").await.unwrap(), None);

    let found = c.find_created("Customer", "key-1").await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    assert_eq!(
        c.find_created("Customer", "key-never-used").await.unwrap(),
        None
    );

    // Only the changed nested field is sent; the merge patch keeps the rest.
    let updated = c
        .update(
            "Customer",
            &created.id,
            &obj(json!({"address": {"city": "Bergen"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        updated.fields["address"],
        json!({"city": "Bergen", "zip": "0150"})
    );
    assert_eq!(updated.fields["name"], json!("Acme"));
    assert!(updated.updated_at > created.updated_at);

    let other = c
        .create("Contact", &obj(json!({"email": "a@b.no"})), "key-2")
        .await
        .unwrap();
    let by = c
        .find_by("Customer", &obj(json!({"address.city": "Bergen"})))
        .await
        .unwrap();
    assert_eq!(
        by.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![created.id.clone()]
    );
    assert!(c
        .find_by("Contact", &obj(json!({"email": "x@y.no"})))
        .await
        .unwrap()
        .is_empty());

    let page = c.list_changed("Contact", None).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].id, other.id);
    assert!(!page.has_more);

    let err = c
        .update("Customer", "missing", &obj(json!({"name": "x"})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Rejected { status: 404, .. }),
        "{err:?}"
    );

    // Custom PMS has no Contact type.
    let pms = connector(
        SystemId::CustomPms,
        &running.base_url(),
        Duration::from_secs(5),
    );
    let err = pms.fetch("Contact", "1").await.unwrap_err();
    assert!(matches!(err, ConnectorError::Unsupported { .. }), "{err:?}");

    // A wrong token is an operator problem, not a retry.
    let bad = CustomConnector::new(
        SystemId::CustomErp,
        &support_custom::config(&running.base_url(), "wrong"),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = bad.fetch("Customer", &created.id).await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::Unauthorized { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn list_changed_pages_through_equal_timestamps_without_loss_or_repeats() {
    let (sim, running) = sim(SystemId::CustomPms, None).await;
    sim.set_page_size(2);
    let c = connector(
        SystemId::CustomPms,
        &running.base_url(),
        Duration::from_secs(5),
    );
    let t = at("2026-01-01T00:00:00Z");
    let first: Vec<String> = (0..5)
        .map(|i| sim.insert("project", obj(json!({"n": i})), Some(t)))
        .collect();
    let (ids, cursor) = drain(&c, "Project", None).await.into_ids();
    assert_eq!(ids, first);

    // Caught up: nothing again.
    let (ids, cursor) = drain(&c, "Project", cursor).await.into_ids();
    assert!(ids.is_empty(), "{ids:?}");

    // A record written later but stamped with the same instant (a coarse clock) is found.
    let late = sim.insert("project", obj(json!({"n": 5})), Some(t));
    let (ids, cursor) = drain(&c, "Project", cursor).await.into_ids();
    assert_eq!(ids, vec![late.clone()]);

    // A real change to one record is delivered once.
    sim.touch("project", &first[2], obj(json!({"n": 20})), None);
    let (ids, cursor) = drain(&c, "Project", cursor).await.into_ids();
    assert_eq!(ids, vec![first[2].clone()]);
    let (ids, _) = drain(&c, "Project", cursor).await.into_ids();
    assert!(ids.is_empty(), "{ids:?}");
}

/// The next webhook's body, and whether its Standard Webhooks signature verifies with [`SECRET`].
async fn next_webhook(receiver: &mut WebhookReceiver) -> (Value, bool) {
    let (headers, body) = receiver.next().await;
    let h = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
    let key = standard::secret_key(SECRET).unwrap();
    let ok = standard::verify(
        &key,
        &h("webhook-id"),
        &h("webhook-timestamp"),
        &body,
        &h("webhook-signature"),
    );
    (serde_json::from_slice(&body).unwrap(), ok)
}

#[tokio::test]
async fn simulator_sends_signed_standard_webhooks_for_changes_made_through_its_api() {
    let mut receiver = WebhookReceiver::start("/webhooks/customerp").await;
    let target = format!("{}/webhooks/customerp", receiver.server.base_url());
    let (_sim, running) = sim(SystemId::CustomErp, Some(target)).await;
    let c = connector(
        SystemId::CustomErp,
        &running.base_url(),
        Duration::from_secs(5),
    );

    let created = c
        .create("Customer", &obj(json!({"name": "A"})), "k")
        .await
        .unwrap();
    // A replayed create and a patch that changes nothing send nothing.
    c.create("Customer", &obj(json!({"name": "A"})), "k")
        .await
        .unwrap();
    c.update("Customer", &created.id, &obj(json!({"name": "A"})))
        .await
        .unwrap();
    let updated = c
        .update("Customer", &created.id, &obj(json!({"name": "B"})))
        .await
        .unwrap();
    // Each webhook carries the record's stamp after its change (the contract's optional
    // `data.updated_at`), as a read of the record at that moment would give it.
    let stamp = |r: &tether::connectors::Record| {
        r.updated_at
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };

    let (body, verified) = next_webhook(&mut receiver).await;
    assert!(verified, "signature must verify");
    assert_eq!(
        body,
        json!({"type": "customer.created", "data": {"id": created.id, "updated_at": stamp(&created)}})
    );
    let (body, verified) = next_webhook(&mut receiver).await;
    assert!(verified, "signature must verify");
    assert_eq!(
        body,
        json!({"type": "customer.updated", "data": {"id": created.id, "updated_at": stamp(&updated)}})
    );
}

#[tokio::test]
async fn rate_limit_answer_is_back_pressure_with_its_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/customer/7"))
        .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "7"))
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(SystemId::CustomErp, &server.uri(), Duration::from_secs(5));
    let err = c.fetch("Customer", "7").await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{err:?}"
    );
    assert!(err.is_back_pressure());
}

#[tokio::test]
async fn server_error_is_transient_and_not_retried_inside_the_connector() {
    let server = MockServer::start().await;
    Mock::given(method("PATCH"))
        .and(path("/project/3"))
        .respond_with(ResponseTemplate::new(503).set_body_string("down"))
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(SystemId::CustomPms, &server.uri(), Duration::from_secs(5));
    let err = c
        .update("Project", "3", &obj(json!({"a": 1})))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Transient { .. }), "{err:?}");
}

#[tokio::test]
async fn slow_answer_is_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/customer"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"items": [], "next_cursor": null}))
                .set_delay(Duration::from_secs(3)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(
        SystemId::CustomErp,
        &server.uri(),
        Duration::from_millis(300),
    );
    let err = c.list_changed("Customer", None).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn creates_send_a_stable_idempotency_key_and_updates_a_merge_patch() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/customer"))
        .and(header("Idempotency-Key", "intent-42"))
        .and(body_json(json!({"name": "Acme"})))
        .respond_with(ResponseTemplate::new(201).set_body_json(
            json!({"id": "c1", "updated_at": "2026-01-01T00:00:00Z", "name": "Acme"}),
        ))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/customer/c1"))
        .and(header("content-type", "application/merge-patch+json"))
        .and(body_json(json!({"name": "Acme AS"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": "c1", "updated_at": "2026-01-01T00:00:01Z", "name": "Acme AS"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/customer"))
        .and(query_param("idempotency_key", "intent-42"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "items": [{"id": "c1", "updated_at": "2026-01-01T00:00:00Z", "name": "Acme"}],
            "next_cursor": null
        })))
        .expect(1)
        .mount(&server)
        .await;
    let c = connector(SystemId::CustomErp, &server.uri(), Duration::from_secs(5));
    for _ in 0..2 {
        let r = c
            .create("Customer", &obj(json!({"name": "Acme"})), "intent-42")
            .await
            .unwrap();
        assert_eq!(r.id, "c1");
    }
    let keys: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(keys, vec!["intent-42", "intent-42"]);
    let r = c
        .update("Customer", "c1", &obj(json!({"name": "Acme AS"})))
        .await
        .unwrap();
    assert_eq!(r.fields["name"], json!("Acme AS"));
    let found = c
        .find_created("Customer", "intent-42")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, "c1");
}

#[tokio::test]
async fn simulator_enforces_the_contract_and_its_fault_knobs() {
    let (sim, running) = sim(SystemId::CustomErp, None).await;
    let http = reqwest::Client::new();
    let url = format!("{}/customer", running.base_url());

    let missing_key = http
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&json!({"name": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status(), 400);

    let first = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", "k1")
        .json(&json!({"name": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let replay = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", "k1")
        .json(&json!({"name": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap(), first);

    let reused = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", "k1")
        .json(&json!({"name": "B"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 422);

    let no_auth = http.get(&url).send().await.unwrap();
    assert_eq!(no_auth.status(), 401);
    let read_only = http
        .patch(format!("{url}/{}", first["id"].as_str().unwrap()))
        .bearer_auth(TOKEN)
        .json(&json!({"id": "other"}))
        .send()
        .await
        .unwrap();
    assert_eq!(read_only.status(), 422);
    assert_eq!(sim.control.count("POST /{kind}"), 4);

    // The kit's rate limit reaches the connector as back-pressure with the sim's Retry-After.
    sim.control.set_faults(kit::Faults {
        rate_limit: Some(1),
        rate_window_ms: Some(60_000),
        ..Default::default()
    });
    let c = connector(
        SystemId::CustomErp,
        &running.base_url(),
        Duration::from_secs(5),
    );
    c.fetch("Customer", first["id"].as_str().unwrap())
        .await
        .unwrap();
    let err = c
        .fetch("Customer", first["id"].as_str().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::RateLimited { retry_after: Some(d), .. } if d > Duration::ZERO),
        "{err:?}"
    );
}

/// The contract's optional conditional writes (README, "The custom-system contract"): with
/// `conditional_writes`, a `PATCH` names the stamp it assumes in `If-Match`; the simulator makes
/// it only if the record still has that `updated_at`, and otherwise answers 412 with nothing
/// changed, which the connector reports as `Changed`. `*` matches any record, a tag that is not
/// a quoted instant is a 400, and a connector without the setting refuses to send one.
#[tokio::test]
async fn a_conditional_write_is_made_only_on_the_stamp_it_names() {
    let (sim, running) = sim(SystemId::CustomErp, None).await;
    let config = tether::config::CustomSystemConfig {
        conditional_writes: true,
        ..support_custom::config(&running.base_url(), TOKEN)
    };
    let c = CustomConnector::new(SystemId::CustomErp, &config, Duration::from_secs(5)).unwrap();
    assert_eq!(c.conditional_writes("customer"), ConditionalWrites::Exact);
    let created = c
        .create("Customer", &obj(json!({"name": "Acme"})), "key-1")
        .await
        .unwrap();
    let seen = created.updated_at.unwrap();

    let written = c
        .update_if_unchanged(
            "Customer",
            &created.id,
            &obj(json!({"name": "Acme AS"})),
            seen,
        )
        .await
        .unwrap();
    assert_eq!(written.fields["name"], json!("Acme AS"));
    assert!(written.updated_at.unwrap() > seen);

    // The same stamp again: the record has moved on, so nothing is written.
    let refused = c
        .update_if_unchanged(
            "Customer",
            &created.id,
            &obj(json!({"name": "Stale"})),
            seen,
        )
        .await;
    assert!(
        matches!(refused, Err(ConnectorError::Changed { ref id, .. }) if *id == created.id),
        "{refused:?}"
    );
    assert_eq!(
        sim.get("customer", &created.id).unwrap()["name"],
        json!("Acme AS")
    );

    let plain = connector(
        SystemId::CustomErp,
        &running.base_url(),
        Duration::from_secs(5),
    );
    assert_eq!(plain.conditional_writes("customer"), ConditionalWrites::No);
    let unsupported = plain
        .update_if_unchanged("Customer", &created.id, &obj(json!({"name": "X"})), seen)
        .await;
    assert!(
        matches!(unsupported, Err(ConnectorError::Unsupported { .. })),
        "{unsupported:?}"
    );

    let http = reqwest::Client::new();
    let url = format!("{}/customer/{}", running.base_url(), created.id);
    let patch = |if_match: &'static str| {
        http.patch(&url)
            .bearer_auth(TOKEN)
            .header("If-Match", if_match)
            .json(&json!({"name": "Raw"}))
            .send()
    };
    assert_eq!(patch("yesterday").await.unwrap().status(), 400);
    assert_eq!(patch("\"not a stamp\"").await.unwrap().status(), 400);
    assert_eq!(
        sim.get("customer", &created.id).unwrap()["name"],
        json!("Acme AS")
    );
    assert_eq!(patch("*").await.unwrap().status(), 200);
    assert_eq!(
        sim.get("customer", &created.id).unwrap()["name"],
        json!("Raw")
    );
}
