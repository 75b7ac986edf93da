//! The Zendesk connector against the Zendesk simulator (every operation) and against `wiremock`
//! (429, 5xx, timeouts, malformed JSON, auth failures); the simulator's webhooks against the
//! Zendesk signature verifier.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrecy::SecretString;
use serde_json::{json, Map, Value};
use tether::connectors::zendesk::{external_id_for, ZendeskConnector};
use tether::connectors::{Connector, ConnectorError, Record};
use tether::domain::SystemId;
use tether::simulators::kit::Faults;
use tether::simulators::zendesk::Kind;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::zendesk::{
    config, connector, sim, sim_with, EMAIL, OAUTH, TOKEN, WEBHOOK_SECRET,
};
use crate::support::{drain, obj, Drained, WebhookReceiver};

mod vendor;

fn assert_no_read_only(record: &Record) {
    for key in ["id", "url", "created_at", "updated_at"] {
        assert!(
            !record.fields.contains_key(key),
            "{key} leaked into fields: {:?}",
            record.fields
        );
    }
}

#[tokio::test]
async fn organization_create_fetch_update_strip_read_only_fields() {
    let (_running, handle, zd) = sim().await;
    let created = zd
        .create(
            "Organizations",
            &obj(json!({"name": "Acme AS", "notes": "n1", "url": "https://acme.example", "id": 5})),
            "job-1",
        )
        .await
        .unwrap();
    assert_no_read_only(&created);
    assert!(created.updated_at.is_some());
    assert_eq!(created.fields["name"], "Acme AS");
    assert_eq!(
        created.fields["external_id"],
        json!(external_id_for("job-1"))
    );
    // The sim keeps its own id and url: neither was written.
    let stored = handle.organization(created.id.parse().unwrap()).unwrap();
    assert_ne!(stored["url"], "https://acme.example");
    assert_ne!(stored["id"], 5);

    let fetched = zd
        .fetch("Organizations", &created.id)
        .await
        .unwrap()
        .unwrap();
    assert_no_read_only(&fetched);
    assert_eq!(fetched.fields, created.fields);

    let updated = zd
        .update(
            "Organizations",
            &created.id,
            &obj(json!({"notes": "n2", "updated_at": "2000-01-01T00:00:00Z"})),
        )
        .await
        .unwrap();
    assert_eq!(updated.fields["notes"], "n2");
    assert_eq!(updated.fields["name"], "Acme AS");
    assert_no_read_only(&updated);
    assert_ne!(
        handle.organization(created.id.parse().unwrap()).unwrap()["updated_at"],
        "2000-01-01T00:00:00Z"
    );

    assert_eq!(zd.fetch("Organizations", "999").await.unwrap(), None);
    assert!(matches!(
        zd.update("Organizations", "999", &obj(json!({"notes": "x"})))
            .await,
        Err(ConnectorError::Rejected { status: 404, .. })
    ));
    assert!(matches!(
        zd.fetch("Organizations", "abc").await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));
}

#[tokio::test]
async fn retried_create_finds_the_record_it_made() {
    let (_running, handle, zd) = sim().await;
    for entity in ["Organizations", "Users", "Tickets"] {
        let body = match entity {
            "Organizations" => json!({"name": "Retry Org"}),
            "Users" => json!({"name": "Retry User", "email": "retry@example.com"}),
            _ => json!({"subject": "Retry ticket"}),
        };
        let first = zd
            .create(entity, &obj(body.clone()), "key-42")
            .await
            .unwrap();
        let second = zd.create(entity, &obj(body), "key-42").await.unwrap();
        assert_eq!(
            first.id, second.id,
            "{entity}: a retry made a second record"
        );
        let found = zd.find_created(entity, "key-42").await.unwrap().unwrap();
        assert_eq!(found.id, first.id);
        assert_eq!(zd.find_created(entity, "key-other").await.unwrap(), None);
    }
    assert_eq!(handle.all(Kind::Organization).len(), 1);
    assert_eq!(handle.all(Kind::User).len(), 1);
    assert_eq!(handle.all(Kind::Ticket).len(), 1);
    assert!(matches!(
        zd.find_created("Ticketcomments", "key-42").await,
        Err(ConnectorError::Unsupported { .. })
    ));
}

#[tokio::test]
async fn organization_name_is_required_and_unique() {
    let (_running, _handle, zd) = sim().await;
    let first = zd
        .create("Organizations", &obj(json!({"name": "Unique"})), "a")
        .await
        .unwrap();
    let duplicate = zd
        .create("Organizations", &obj(json!({"name": "UNIQUE"})), "b")
        .await
        .unwrap_err();
    match duplicate {
        ConnectorError::Rejected {
            status, message, ..
        } => {
            assert_eq!(status, 422);
            assert!(message.contains("has already been taken"), "{message}");
        }
        other => panic!("expected a 422 rejection, got {other:?}"),
    }
    assert!(matches!(
        zd.create("Organizations", &obj(json!({"notes": "no name"})), "c")
            .await,
        Err(ConnectorError::Rejected { status: 422, .. })
    ));

    // After a rename the old name is free and the new one taken.
    zd.update("Organizations", &first.id, &obj(json!({"name": "Renamed"})))
        .await
        .unwrap();
    zd.create("Organizations", &obj(json!({"name": "unique"})), "d")
        .await
        .unwrap();
    assert!(matches!(
        zd.create("Organizations", &obj(json!({"name": "RENAMED"})), "e")
            .await,
        Err(ConnectorError::Rejected { status: 422, .. })
    ));
}

#[tokio::test]
async fn users_and_organizations_are_found_by_merge_criteria() {
    let (_running, handle, zd) = sim().await;
    let org = handle.insert_organization(json!({"name": "Fjord Consulting", "notes": "n"}));
    handle.insert_user(
        json!({"name": "Kari", "email": "Kari@Fjord.no", "organization_id": org["id"]}),
    );
    handle.insert_user(json!({"name": "Ola", "email": "ola@fjord.no", "external_id": "erp-7"}));

    let by_name = zd
        .find_by("Organizations", &obj(json!({"name": "fjord consulting"})))
        .await
        .unwrap();
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].id, org["id"].to_string());

    let by_email = zd
        .find_by("Users", &obj(json!({"email": "kari@fjord.no"})))
        .await
        .unwrap();
    assert_eq!(by_email.len(), 1);
    assert_eq!(by_email[0].fields["name"], "Kari");
    assert_no_read_only(&by_email[0]);

    let kari = zd.fetch("Users", &by_email[0].id).await.unwrap().unwrap();
    assert_eq!(kari.fields["email"], "Kari@Fjord.no");
    assert_eq!(kari.fields["organization_id"], org["id"]);

    let by_external = zd
        .find_by("Users", &obj(json!({"external_id": "ERP-7"})))
        .await
        .unwrap();
    assert_eq!(by_external[0].fields["name"], "Ola");

    let by_org = zd
        .find_by(
            "Users",
            &obj(json!({"organization_id": org["id"].to_string()})),
        )
        .await
        .unwrap();
    assert_eq!(by_org.len(), 1);
    assert_eq!(by_org[0].fields["name"], "Kari");

    assert!(zd
        .find_by("Users", &obj(json!({"email": "nobody@x.no"})))
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        zd.find_by("Users", &Map::new()).await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));
}

#[tokio::test]
async fn list_and_filter_follow_cursor_pages() {
    let (_running, handle, zd) = sim().await;
    let zd = zd.with_page_size(2);
    for i in 0..5 {
        handle.insert_organization(
            json!({"name": format!("Org {i}"), "notes": if i % 2 == 0 { "even" } else { "odd" }}),
        );
    }
    handle.control().reset_counters();
    let even = zd
        .find_by("Organizations", &obj(json!({"notes": "even"})))
        .await
        .unwrap();
    let names: HashSet<String> = even
        .iter()
        .map(|r| r.fields["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["Org 0".to_owned(), "Org 2".to_owned(), "Org 4".to_owned()])
    );
    // 5 records in pages of 2.
    assert_eq!(handle.control().count("GET /api/v2/organizations"), 3);
}

/// Regression: organizations changed within the last minute across a second boundary. The
/// export is asked from a minute back once the cursor is that recent; with small pages it used to
/// return the first second's organizations again and again, and the rest only after a minute.
#[tokio::test]
async fn organization_export_returns_the_last_minute_across_a_second_boundary_at_once() {
    let (_running, handle, zd) = sim().await;
    let zd = zd.with_page_size(2);
    for i in 0..3 {
        handle.insert_organization(json!({"name": format!("Early {i}")}));
    }
    // Let the clock pass into the next second, so the two groups differ in `updated_at`.
    let second = chrono::Utc::now().timestamp();
    while chrono::Utc::now().timestamp() == second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..2 {
        handle.insert_organization(json!({"name": format!("Late {i}")}));
    }
    let drained = drain(&zd, "Organizations", None).await;
    let names: HashSet<String> = drained
        .records
        .iter()
        .map(|r| r.fields["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(drained.records.len(), 5, "nothing returned twice");
}

#[tokio::test]
async fn change_cursors_page_through_exports_and_resume() {
    let (_running, handle, zd) = sim().await;
    let zd = zd.with_page_size(2);
    let mut user_ids = Vec::new();
    for i in 0..5 {
        handle.insert_organization(json!({"name": format!("Org {i}")}));
        user_ids.push(handle.insert_user(json!({"name": format!("User {i}")}))["id"].clone());
        handle.insert_ticket(
            json!({"subject": format!("T {i}"), "comment": {"body": format!("first {i}")}}),
        );
    }

    for entity in ["Organizations", "Users", "Tickets"] {
        let Drained {
            records,
            cursor,
            pages,
        } = drain(&zd, entity, None).await;
        let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 5, "{entity}: {ids:?}");
        if entity != "Organizations" {
            // Cursor exports: five records in pages of two.
            assert_eq!(pages, 3, "{entity}");
        }
        records.iter().for_each(assert_no_read_only);
        // Caught up: nothing new until something changes.
        let page = zd.list_changed(entity, cursor.as_deref()).await.unwrap();
        assert!(page.records.is_empty(), "{entity}: {:?}", page.records);
        assert!(!page.has_more);
    }

    // A change made later shows up from the stored cursor.
    let cursor = drain(&zd, "Users", None).await.cursor;
    let user_id = user_ids[2].to_string();
    zd.update("Users", &user_id, &obj(json!({"notes": "changed"})))
        .await
        .unwrap();
    let changed = drain(&zd, "Users", cursor).await.records;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].id, user_id);

    // The ticket-event export leaves out the last minute: let it pass.
    handle.age_ticket_events(120);
    let Drained {
        records: comments,
        cursor,
        ..
    } = drain(&zd, "Ticketcomments", None).await;
    assert_eq!(comments.len(), 5);
    assert!(comments
        .iter()
        .all(|c| c.id.contains(':') && c.fields.contains_key("ticket_id")));
    let ticket = handle.all(Kind::Ticket)[0]["id"].clone();
    let added = zd
        .create(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket, "body": "later"})),
            "c1",
        )
        .await
        .unwrap();
    handle.age_ticket_events(120);
    let new_comments = drain(&zd, "Ticketcomments", cursor).await.records;
    assert!(
        new_comments.iter().any(|c| c.id == added.id),
        "{new_comments:?}"
    );
    assert!(matches!(
        zd.list_changed("Users", Some("not a cursor")).await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));
}

#[tokio::test]
async fn organization_export_pages_by_time_without_repeats_or_loops() {
    let (_running, handle, zd) = sim().await;
    let zd = zd.with_page_size(2);
    // Two records share the first second; the page boundary falls on it.
    for (i, second) in [1000, 1000, 1001, 1002, 1003].into_iter().enumerate() {
        let org = handle.insert_organization(json!({"name": format!("Org {i}")}));
        assert!(handle.set_updated_at(Kind::Organization, org["id"].as_u64().unwrap(), second));
    }
    let Drained {
        records,
        cursor,
        pages,
    } = drain(&zd, "Organizations", None).await;
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 5, "repeats across the boundary second: {ids:?}");
    assert_eq!(unique.len(), 5);
    assert!(pages > 1, "one page only: {pages}");
    let again = zd
        .list_changed("Organizations", cursor.as_deref())
        .await
        .unwrap();
    assert!(again.records.is_empty(), "{:?}", again.records);

    // More records than a page within one second arrive in one (extended) page.
    for i in 0..3 {
        let org = handle.insert_organization(json!({"name": format!("Same second {i}")}));
        assert!(handle.set_updated_at(Kind::Organization, org["id"].as_u64().unwrap(), 2000));
    }
    let Drained {
        records: later,
        cursor,
        ..
    } = drain(&zd, "Organizations", cursor).await;
    assert_eq!(later.len(), 3, "{later:?}");

    // The cursor now sits on second 2000; a full page at that very second must not loop.
    let late = handle.insert_organization(json!({"name": "Late in 2000"}));
    handle.set_updated_at(Kind::Organization, late["id"].as_u64().unwrap(), 2000);
    let next = handle.insert_organization(json!({"name": "In 2001"}));
    handle.set_updated_at(Kind::Organization, next["id"].as_u64().unwrap(), 2001);
    let last = drain(&zd, "Organizations", cursor).await.records;
    let names: Vec<&str> = last
        .iter()
        .map(|r| r.fields["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Late in 2000", "In 2001"]);
}

#[tokio::test]
async fn tickets_and_comments() {
    let (_running, handle, zd) = sim().await;
    let org = handle.insert_organization(json!({"name": "Req Org"}));
    let requester = handle.insert_user(
        json!({"name": "Req", "email": "req@example.com", "organization_id": org["id"]}),
    );
    let ticket = zd
        .create(
            "Tickets",
            &obj(json!({"subject": "Printer on fire", "requester_id": requester["id"]})),
            "t-1",
        )
        .await
        .unwrap();
    assert_no_read_only(&ticket);
    assert_eq!(ticket.fields["subject"], "Printer on fire");
    let ticket_id: u64 = ticket.id.parse().unwrap();
    // Zendesk requires a first comment; the subject stands in for it.
    let first = handle.comments(ticket_id);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["body"], "Printer on fire");

    // Zendesk files a ticket under its requester's organization.
    assert_eq!(
        ticket.fields["organization_id"],
        requester["organization_id"]
    );
    let by_subject = zd
        .find_by("Tickets", &obj(json!({"subject": "Printer on fire"})))
        .await
        .unwrap();
    assert_eq!(by_subject.len(), 1);
    assert_eq!(by_subject[0].id, ticket.id);
    let fetched_ticket = zd.fetch("Tickets", &ticket.id).await.unwrap().unwrap();
    assert_eq!(fetched_ticket.fields, ticket.fields);

    let updated = zd
        .update("Tickets", &ticket.id, &obj(json!({"status": "open"})))
        .await
        .unwrap();
    assert_eq!(updated.fields["status"], "open");
    assert_eq!(updated.fields["subject"], "Printer on fire");

    let comment = zd
        .create(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket_id, "body": "Still burning", "public": false})),
            "c-1",
        )
        .await
        .unwrap();
    let (t, c) = comment.id.split_once(':').unwrap();
    assert_eq!(t, ticket.id);
    assert!(c.parse::<u64>().is_ok());
    assert_eq!(comment.fields["body"], "Still burning");
    assert_eq!(comment.fields["public"], false);
    assert_no_read_only(&comment);

    let fetched = zd
        .fetch("Ticketcomments", &comment.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched.fields["body"], "Still burning");
    assert_eq!(fetched.fields["ticket_id"], json!(ticket_id));
    assert_eq!(fetched.updated_at, comment.updated_at);
    assert_eq!(
        zd.fetch("Ticketcomments", &format!("{ticket_id}:1"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(zd.fetch("Ticketcomments", "1:1").await.unwrap(), None);

    let found = zd
        .find_by(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket_id, "body": "Still burning"})),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);

    // Comments are immutable.
    assert!(matches!(
        zd.update(
            "Ticketcomments",
            &comment.id,
            &obj(json!({"body": "edited"}))
        )
        .await,
        Err(ConnectorError::Unsupported {
            operation: "update",
            ..
        })
    ));
    assert_eq!(handle.comments(ticket_id).len(), 2);
    assert!(matches!(
        zd.create("Ticketcomments", &obj(json!({"body": "where?"})), "c-2")
            .await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));
    assert!(matches!(
        zd.fetch("Ticketcomments", "12").await,
        Err(ConnectorError::Rejected { status: 400, .. })
    ));
    assert!(matches!(
        zd.fetch("Macros", "1").await,
        Err(ConnectorError::Unsupported { .. })
    ));
}

#[tokio::test]
async fn simulator_checks_credentials_and_accepts_bearer() {
    let (running, _handle, _zd) = sim().await;
    let mut wrong = config(&running.base_url());
    wrong.api_token = Some(SecretString::from("wrong"));
    let zd = ZendeskConnector::new(&wrong, Duration::from_secs(5)).unwrap();
    let err = zd.fetch("Organizations", "1").await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::Unauthorized { .. }),
        "{err:?}"
    );

    let mut bearer = config(&running.base_url());
    bearer.email = None;
    bearer.api_token = None;
    bearer.oauth_token = Some(SecretString::from(OAUTH));
    let zd = ZendeskConnector::new(&bearer, Duration::from_secs(5)).unwrap();
    assert_eq!(zd.fetch("Organizations", "1").await.unwrap(), None);
    assert!(!format!("{zd:?}").contains(OAUTH));
}

#[tokio::test]
async fn simulator_rate_limits_refuses_recent_exports_and_sends_quota_headers() {
    let (running, handle, zd) = sim().await;
    handle.control().set_faults(Faults {
        rate_limit: Some(100),
        ..Faults::default()
    });
    let response = reqwest::Client::new()
        .get(format!("{}/api/v2/organizations", running.base_url()))
        .basic_auth(format!("{EMAIL}/token"), Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-rate-limit"], "100");
    assert_eq!(response.headers()["x-rate-limit-remaining"], "99");

    // Exports refuse a start_time younger than a minute, as Zendesk does.
    let recent = chrono::Utc::now().timestamp() - 5;
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/v2/incremental/organizations?start_time={recent}",
            running.base_url()
        ))
        .basic_auth(format!("{EMAIL}/token"), Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    handle.control().set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let err = zd.fetch("Organizations", "1").await.unwrap_err();
    match err {
        ConnectorError::RateLimited {
            system,
            retry_after,
        } => {
            assert_eq!(system, SystemId::Zendesk);
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test]
async fn simulator_webhooks_are_signed_and_verify() {
    let mut receiver = WebhookReceiver::start("/webhooks/zendesk").await;
    let (running, handle) = sim_with(Some(format!(
        "{}/webhooks/zendesk",
        receiver.server.base_url()
    )))
    .await;
    let zd = connector(&running.base_url());

    let org = zd
        .create("Organizations", &obj(json!({"name": "Hooked"})), "w1")
        .await
        .unwrap();
    zd.update("Organizations", &org.id, &obj(json!({"name": "Hooked AS"})))
        .await
        .unwrap();
    let ticket = zd
        .create("Tickets", &obj(json!({"subject": "Hi"})), "w2")
        .await
        .unwrap();
    let comment = zd
        .create(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket.id, "body": "Hello"})),
            "w3",
        )
        .await
        .unwrap();
    // Seeded records are not changes made through the API: no webhook.
    handle.insert_organization(json!({"name": "Seeded"}));

    let got = receiver.take(4).await;
    let mut types = Vec::new();
    for (headers, body) in &got {
        let signature = headers["x-zendesk-webhook-signature"].to_str().unwrap();
        let timestamp = headers["x-zendesk-webhook-signature-timestamp"]
            .to_str()
            .unwrap();
        assert!(tether::signing::zendesk::verify(
            WEBHOOK_SECRET,
            timestamp,
            body,
            signature
        ));
        assert!(!tether::signing::zendesk::verify(
            "other-secret",
            timestamp,
            body,
            signature
        ));
        let event: Value = serde_json::from_slice(body).unwrap();
        assert!(uuid::Uuid::parse_str(event["id"].as_str().unwrap()).is_ok());
        assert_eq!(event["zendesk_event_version"], "2022-06-20");
        assert!(event["account_id"].is_number());
        assert!(event["detail"]["id"].is_string(), "{event}");
        types.push(event["type"].as_str().unwrap().to_owned());
        if event["type"] == "zen:event-type:organization.created" {
            assert_eq!(event["subject"], format!("zen:organization:{}", org.id));
            assert_eq!(event["detail"]["id"], json!(org.id));
            assert_eq!(event["event"], json!({}));
        }
        if event["type"] == "zen:event-type:ticket.comment_added" {
            let comment_id = comment.id.split_once(':').unwrap().1;
            assert_eq!(event["event"]["comment"]["id"], json!(comment_id));
            assert_eq!(event["event"]["comment"]["body"], "Hello");
            assert_eq!(event["event"]["comment"]["is_public"], true);
        }
    }
    assert_eq!(
        types,
        [
            "zen:event-type:organization.created",
            "zen:event-type:organization.name_changed",
            "zen:event-type:ticket.created",
            "zen:event-type:ticket.comment_added",
        ]
    );
    // The sender counts a delivery once the receiver's answer is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.webhook_stats().delivered < 4 {
        assert!(Instant::now() < deadline, "{:?}", handle.webhook_stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(handle.webhook_stats().delivered, 4);
    assert_eq!(
        receiver.arrived().len(),
        0,
        "the seeded record sent a webhook"
    );
}

// ---- wiremock: the exact behaviour on vendor failures ----

fn basic_header() -> String {
    let raw = format!("{EMAIL}/token:{TOKEN}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[tokio::test]
async fn wiremock_429_returns_rate_limited_with_retry_after_and_pauses() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/1"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_json(json!({"error": "APIRateLimitExceeded"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/2"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({"error": "RecordNotFound", "description": "Not found"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let started = Instant::now();
    let err = zd.fetch("Organizations", "1").await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectorError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(1)
        ),
        "{err:?}"
    );
    assert!(err.is_back_pressure());
    // The next call waits out the Retry-After before it is sent.
    assert_eq!(zd.fetch("Organizations", "2").await.unwrap(), None);
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn wiremock_low_remaining_quota_slows_down_before_a_429() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/users/1"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("X-Rate-Limit", "700")
                .insert_header("X-Rate-Limit-Remaining", "0")
                .insert_header("ratelimit-reset", "1")
                .set_body_json(
                    json!({"user": {"id": 1, "name": "A", "updated_at": "2024-01-01T00:00:00Z"}}),
                ),
        )
        .expect(2)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let started = Instant::now();
    zd.fetch("Users", "1").await.unwrap().unwrap();
    zd.fetch("Users", "1").await.unwrap().unwrap();
    // No quota left: the second call waits out the second until the window resets.
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn wiremock_5xx_is_transient_and_not_retried_inside() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/api/v2/tickets/3"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream down"))
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let err = zd
        .update("Tickets", "3", &obj(json!({"status": "open"})))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Transient { .. }), "{err:?}");
}

#[tokio::test]
async fn wiremock_slow_answer_is_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets/1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_secs(5))
                .set_body_json(json!({"ticket": {"id": 1}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let zd = ZendeskConnector::new(&config(&server.uri()), Duration::from_millis(300)).unwrap();
    let err = zd.fetch("Tickets", "1").await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectorError::Timeout {
                system: SystemId::Zendesk
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn wiremock_malformed_json_is_transient() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/1"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"organization\": {\"id\": 1,"))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"organisation": {"id": 2}})))
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    for id in ["1", "2"] {
        match zd.fetch("Organizations", id).await.unwrap_err() {
            ConnectorError::Transient { message, .. } => {
                assert!(message.contains("malformed"), "{message}")
            }
            other => panic!("expected Transient, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn wiremock_auth_failure_is_unauthorized_without_leaking_secrets() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/users/1"))
        .and(header("authorization", basic_header().as_str()))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"error": "Couldn't authenticate you"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let err = zd.fetch("Users", "1").await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::Unauthorized { .. }),
        "{err:?}"
    );
    for text in [err.to_string(), format!("{err:?}"), format!("{zd:?}")] {
        assert!(!text.contains(TOKEN), "{text}");
    }
}

#[tokio::test]
async fn wiremock_update_sends_only_changed_writable_fields() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/api/v2/organizations/9"))
        .and(body_json(json!({"organization": {"notes": "new"}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"organization": {
            "id": 9, "url": "https://x.zendesk.com/api/v2/organizations/9.json", "name": "N",
            "notes": "new", "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-02-01T00:00:00Z"
        }})))
        .expect(1)
        .mount(&server)
        .await;
    // A create is found again through `show_many` (no search index lag), never through search.
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/show_many"))
        .and(query_param("external_ids", "tether-k"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"organizations": [], "count": 0})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations/search"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let record = zd
        .update(
            "Organizations",
            "9",
            &obj(json!({"notes": "new", "url": "https://elsewhere", "created_at": "x", "id": 1})),
        )
        .await
        .unwrap();
    assert_eq!(record.id, "9");
    assert_no_read_only(&record);
    assert_eq!(
        record.updated_at.unwrap().to_rfc3339(),
        "2024-02-01T00:00:00+00:00"
    );
    assert_eq!(zd.find_created("Organizations", "k").await.unwrap(), None);
}

#[tokio::test]
async fn wiremock_pagination_link_to_another_host_is_not_followed() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/organizations"))
        .and(query_param("page[size]", "100"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "organizations": [{"id": 1, "name": "A", "notes": "x"}],
            "meta": {"has_more": true, "after_cursor": "c"},
            "links": {"next": "http://elsewhere.invalid/api/v2/organizations?page[after]=c"},
        })))
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    let err = zd
        .find_by("Organizations", &obj(json!({"notes": "x"})))
        .await
        .unwrap_err();
    match err {
        ConnectorError::Transient { message, .. } => {
            assert!(message.contains("pagination link"), "{message}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn simulator_speaks_zendesk_status_codes_and_envelopes() {
    let (running, _handle, _zd) = sim().await;
    let base = running.base_url();
    let client = reqwest::Client::new();
    let send =
        |req: reqwest::RequestBuilder| req.basic_auth(format!("{EMAIL}/token"), Some(TOKEN)).send();

    let body = json!({"organization": {"name": "Env", "external_id": "e-1", "url": "x"}});
    let created = send(
        client
            .post(format!("{base}/api/v2/organizations/create_or_update"))
            .json(&body),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let id = created["organization"]["id"].as_u64().unwrap();
    assert!(created["organization"]["url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/api/v2/organizations/{id}.json")));
    assert!(created["organization"]["created_at"].is_string());

    let body = json!({"organization": {"name": "Env 2", "external_id": "E-1"}});
    let updated = send(
        client
            .post(format!("{base}/api/v2/organizations/create_or_update"))
            .json(&body),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["organization"]["id"], id);
    assert_eq!(updated["organization"]["name"], "Env 2");

    let missing = send(client.get(format!("{base}/api/v2/organizations/1.json")))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"error": "RecordNotFound", "description": "Not found"})
    );

    let invalid = send(
        client
            .post(format!("{base}/api/v2/organizations"))
            .json(&json!({"organization": {}})),
    )
    .await
    .unwrap();
    assert_eq!(invalid.status(), 422);
    let invalid: Value = invalid.json().await.unwrap();
    assert_eq!(invalid["error"], "RecordInvalid");
    assert_eq!(invalid["details"]["name"][0]["error"], "BlankValue");

    let no_comment = send(
        client
            .post(format!("{base}/api/v2/tickets"))
            .json(&json!({"ticket": {"subject": "s"}})),
    )
    .await
    .unwrap();
    assert_eq!(no_comment.status(), 422);

    let page: Value = send(client.get(format!("{base}/api/v2/organizations?page[size]=1")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["organizations"].as_array().unwrap().len(), 1);
    assert_eq!(page["meta"]["has_more"], false);
    assert!(page["links"]["next"].is_null());

    let unauthorized = client
        .get(format!("{base}/api/v2/organizations"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test]
async fn wiremock_exports_keep_their_own_lower_rate() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/incremental/users/cursor"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "users": [], "after_cursor": "c1", "end_of_stream": true,
        })))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/users/1"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&server)
        .await;
    // 60 exports a minute: one a second, while other calls go at the account rate.
    let zd = ZendeskConnector::new(&config(&server.uri()), Duration::from_secs(5))
        .unwrap()
        .with_export_rate_per_minute(60);
    let started = Instant::now();
    let first = zd.list_changed("Users", None).await.unwrap();
    assert_eq!(zd.fetch("Users", "1").await.unwrap(), None);
    zd.list_changed("Users", first.next_cursor.as_deref())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
}
