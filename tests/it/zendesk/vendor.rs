//! Zendesk as it really behaves (issue 16, items 10 to 16; docs/vendors.md, Zendesk): each test
//! makes the simulator do what Zendesk does and checks the connector copes. Each would have
//! failed against the simulator and connector before they were corrected.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use tether::connectors::{ConditionalWrites, Connector, ConnectorError};
use tether::simulators::kit::{Faults, RunningSim};
use tether::simulators::zendesk::Kind;
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::zendesk::{connector, sim, sim_with, EMAIL, TOKEN};
use crate::support::{drain, obj, WebhookReceiver};

/// A raw call to the simulator, as another API client (an agent's app) would make it.
async fn call(
    running: &RunningSim,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", running.base_url()))
        .basic_auth(format!("{EMAIL}/token"), Some(TOKEN));
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

fn id_of(value: &Value) -> u64 {
    value["id"].as_u64().unwrap()
}

/// Item 10: a user's `email` is writable on create only.
#[tokio::test]
async fn user_email_is_kept_on_update_and_a_new_one_becomes_a_secondary_identity() {
    let (running, handle, zd) = sim().await;
    let user = zd
        .create(
            "Users",
            &obj(json!({"name": "Ada", "email": "ada@old.no"})),
            "u-10",
        )
        .await
        .unwrap();
    let user_id: u64 = user.id.parse().unwrap();

    // What Zendesk does with an email in an update: 200, primary kept, secondary added.
    let answer = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/users/{user_id}"),
        Some(json!({"user": {"email": "ada@new.no"}})),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["user"]["email"], "ada@old.no");
    let identities: Value = call(
        &running,
        reqwest::Method::GET,
        &format!("/api/v2/users/{user_id}/identities"),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let values: Vec<(&str, bool)> = identities["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["value"].as_str().unwrap(),
                i["primary"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(values, [("ada@old.no", true), ("ada@new.no", false)]);

    // The connector never sends `email` on an update: no further identity, the rest written.
    let updated = zd
        .update(
            "Users",
            &user.id,
            &obj(json!({"email": "ada@third.no", "notes": "moved"})),
        )
        .await
        .unwrap();
    assert_eq!(updated.fields["email"], "ada@old.no");
    assert_eq!(updated.fields["notes"], "moved");
    assert_eq!(handle.user(user_id).unwrap()["email"], "ada@old.no");
    let after: Value = call(
        &running,
        reqwest::Method::GET,
        &format!("/api/v2/users/{user_id}/identities"),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(after["count"], 2, "{after}");
}

#[tokio::test]
async fn wiremock_user_update_leaves_email_out_of_the_body() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/api/v2/users/5"))
        .and(body_json(json!({"user": {"name": "New name"}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"user": {
            "id": 5, "name": "New name", "email": "kept@x.no", "updated_at": "2024-02-01T00:00:00Z"
        }})))
        .expect(1)
        .mount(&server)
        .await;
    let zd = connector(&server.uri());
    zd.update(
        "Users",
        "5",
        &obj(json!({"name": "New name", "email": "changed@x.no"})),
    )
    .await
    .unwrap();
    // Only the email changed: nothing to send, so no PUT (the mock above allows one).
    Mock::given(method("GET"))
        .and(path("/api/v2/users/5"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"user": {
            "id": 5, "name": "New name", "email": "kept@x.no"
        }})))
        .expect(1)
        .mount(&server)
        .await;
    let same = zd
        .update("Users", "5", &obj(json!({"email": "changed@x.no"})))
        .await
        .unwrap();
    assert_eq!(same.fields["email"], "kept@x.no");
}

/// Item 11: a closed ticket accepts tags, subject and priority only.
#[tokio::test]
async fn closed_ticket_refuses_updates_and_comments_as_target_closed() {
    let (running, handle, zd) = sim().await;
    let ticket = zd
        .create("Tickets", &obj(json!({"subject": "Old case"})), "t-11")
        .await
        .unwrap();
    zd.update("Tickets", &ticket.id, &obj(json!({"status": "closed"})))
        .await
        .unwrap();

    let raw = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/tickets/{}", ticket.id),
        Some(json!({"ticket": {"status": "open"}})),
    )
    .await;
    assert_eq!(raw.status(), 422);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"], "RecordInvalid");
    assert_eq!(
        body["details"]["status"][0]["description"],
        "Status: closed prevents ticket update"
    );

    let err = zd
        .update("Tickets", &ticket.id, &obj(json!({"status": "open"})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::TargetClosed { id, .. } if *id == ticket.id),
        "{err:?}"
    );
    assert!(!err.is_back_pressure());
    let err = zd
        .create(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket.id, "body": "Any news?"})),
            "c-11",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::TargetClosed { .. }),
        "{err:?}"
    );
    let ticket_id: u64 = ticket.id.parse().unwrap();
    assert_eq!(handle.comments(ticket_id).len(), 1, "no comment was added");

    // What a closed ticket still takes.
    let tagged = zd
        .update(
            "Tickets",
            &ticket.id,
            &obj(json!({"tags": ["archived"], "priority": "low"})),
        )
        .await
        .unwrap();
    assert_eq!(tagged.fields["tags"], json!(["archived"]));
    assert_eq!(tagged.fields["status"], "closed");
}

/// Item 12: redaction and make_private, as audits, webhooks and in the comment export.
#[tokio::test]
async fn redacted_and_private_comments_are_announced_and_read_back_as_they_are_now() {
    let mut receiver = WebhookReceiver::start("/webhooks/zendesk").await;
    let target = format!("{}/webhooks/zendesk", receiver.server.base_url());
    let (running, handle) = sim_with(Some(target)).await;
    let zd = connector(&running.base_url());
    let ticket = handle.insert_ticket(
        json!({"subject": "Card", "comment": {"body": "my card is 4111 1111", "public": true}}),
    );
    let ticket_id = id_of(&ticket);
    let comment_id = id_of(&handle.comments(ticket_id)[0]);
    let record_id = format!("{ticket_id}:{comment_id}");

    let redacted = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/tickets/{ticket_id}/comments/{comment_id}/redact"),
        Some(json!({"text": "4111 1111"})),
    )
    .await;
    assert_eq!(redacted.status(), 200);
    let body: Value = redacted.json().await.unwrap();
    assert_eq!(body["comment"]["body"], "my card is ▇▇▇▇▇▇▇▇▇");
    let (_, delivered) = receiver.next().await;
    let event: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(event["type"], "zen:event-type:ticket.comment_redacted");
    assert_eq!(event["event"]["comment"]["id"], comment_id.to_string());

    let made_private = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/tickets/{ticket_id}/comments/{comment_id}/make_private"),
        None,
    )
    .await;
    assert_eq!(made_private.status(), 200);
    let (_, delivered) = receiver.next().await;
    let event: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(event["type"], "zen:event-type:ticket.comment_made_private");

    // What the sync engine reads when either webhook arrives: the comment as it is now.
    let now = zd
        .fetch("Ticketcomments", &record_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.fields["body"], "my card is ▇▇▇▇▇▇▇▇▇");
    assert_eq!(now.fields["public"], false);

    // The export carries both audits; the comment comes back once, redacted and private.
    handle.age_ticket_events(120);
    let exported = drain(&zd, "Ticketcomments", None).await.records;
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert_eq!(exported[0].id, record_id);
    assert_eq!(exported[0].fields["body"], "my card is ▇▇▇▇▇▇▇▇▇");
    assert_eq!(exported[0].fields["public"], false);
    assert!(!format!("{exported:?}").contains("4111"));

    // A closed ticket's comments can no longer be redacted through this endpoint.
    handle.update(Kind::Ticket, ticket_id, json!({"status": "closed"}));
    let refused = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/tickets/{ticket_id}/comments/{comment_id}/redact"),
        Some(json!({"text": "card"})),
    )
    .await;
    assert_eq!(refused.status(), 422);
}

/// Item 13: search lags behind writes; `show_many` does not.
#[tokio::test]
async fn a_fresh_create_is_found_with_show_many_while_search_still_misses_it() {
    let (running, _handle, zd) = sim().await;
    let org = zd
        .create("Organizations", &obj(json!({"name": "Fresh AS"})), "o-13")
        .await
        .unwrap();
    let external_id = org.fields["external_id"].as_str().unwrap().to_owned();
    let searched: Value = call(
        &running,
        reqwest::Method::GET,
        &format!("/api/v2/organizations/search?external_id={external_id}"),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(searched["count"], 0, "search sees the write only later");

    let found = zd.find_created("Organizations", "o-13").await.unwrap();
    assert_eq!(found.map(|r| r.id), Some(org.id.clone()));
    let by_criteria = zd
        .find_by("Organizations", &obj(json!({"external_id": external_id})))
        .await
        .unwrap();
    assert_eq!(by_criteria.len(), 1);

    // A retried user create finds its first attempt instead of making a second user.
    let fields = obj(json!({"name": "Retry", "email": "retry@x.no"}));
    let first = zd.create("Users", &fields, "u-13").await.unwrap();
    let again = zd.create("Users", &fields, "u-13").await.unwrap();
    assert_eq!(first.id, again.id);
}

/// Item 13: a user of another integration with the same email is not adopted (nor its
/// `external_id` overwritten) by a create: that is for the flow's merge criteria to decide.
#[tokio::test]
async fn a_create_never_takes_over_another_integrations_user() {
    let (_running, handle, zd) = sim().await;
    let theirs =
        handle.insert_user(json!({"name": "Bo", "email": "bo@x.no", "external_id": "crm-7"}));
    let err = zd
        .create(
            "Users",
            &obj(json!({"name": "Bo", "email": "bo@x.no"})),
            "u-13b",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Rejected { status: 422, .. }),
        "{err:?}"
    );
    assert_eq!(handle.user(id_of(&theirs)).unwrap()["external_id"], "crm-7");
    assert_eq!(handle.all(Kind::User).len(), 1);
}

/// Item 14: comments come from the ticket-event export, one call per page.
#[tokio::test]
async fn comments_come_from_the_ticket_event_export_not_from_each_ticket() {
    let (_running, handle, zd) = sim().await;
    for i in 0..6 {
        handle.insert_ticket(
            json!({"subject": format!("T{i}"), "comment": {"body": format!("c{i}")}}),
        );
    }
    // Zendesk leaves out the last minute: nothing yet.
    assert!(drain(&zd, "Ticketcomments", None).await.records.is_empty());
    handle.age_ticket_events(120);
    handle.control().reset_counters();
    let drained = drain(&zd, "Ticketcomments", None).await;
    let bodies: HashSet<&str> = drained
        .records
        .iter()
        .map(|r| r.fields["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies.len(), 6, "{bodies:?}");
    assert_eq!(
        handle.control().count("GET /api/v2/tickets/{id}/comments"),
        0
    );
    assert_eq!(
        handle
            .control()
            .count("GET /api/v2/incremental/ticket_events"),
        drained.pages as u64
    );
    // Caught up: the cursor returns nothing twice.
    let again = drain(&zd, "Ticketcomments", drained.cursor).await;
    assert!(again.records.is_empty(), "{:?}", again.records);
}

/// Item 15: deleted tickets are gone (404), marked `deleted` in the export, announced.
#[tokio::test]
async fn deleted_tickets_answer_404_and_show_as_deleted_in_the_export() {
    let mut receiver = WebhookReceiver::start("/webhooks/zendesk").await;
    let target = format!("{}/webhooks/zendesk", receiver.server.base_url());
    let (running, handle) = sim_with(Some(target)).await;
    let zd = connector(&running.base_url());
    let ticket = handle.insert_ticket(json!({"subject": "Spam", "comment": {"body": "buy"}}));
    let id = id_of(&ticket).to_string();

    let deleted = call(
        &running,
        reqwest::Method::DELETE,
        &format!("/api/v2/tickets/{id}"),
        None,
    )
    .await;
    assert_eq!(deleted.status(), 204);
    let (_, delivered) = receiver.next().await;
    let event: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(event["type"], "zen:event-type:ticket.soft_deleted");
    assert_eq!(zd.fetch("Tickets", &id).await.unwrap(), None);
    let err = zd
        .update("Tickets", &id, &obj(json!({"subject": "x"})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Rejected { status: 404, .. }),
        "{err:?}"
    );
    let exported = drain(&zd, "Tickets", None).await.records;
    let row = exported.iter().find(|r| r.id == id).unwrap();
    assert_eq!(row.fields["status"], "deleted");

    // Restored, it is a live ticket again; deleted for good, it is gone from the export too.
    let restored = call(
        &running,
        reqwest::Method::PUT,
        &format!("/api/v2/deleted_tickets/{id}/restore"),
        None,
    )
    .await;
    assert_eq!(restored.status(), 200);
    assert!(zd.fetch("Tickets", &id).await.unwrap().is_some());
    let (_, delivered) = receiver.next().await;
    let event: Value = serde_json::from_slice(&delivered).unwrap();
    assert_eq!(event["type"], "zen:event-type:ticket.undeleted");
    call(
        &running,
        reqwest::Method::DELETE,
        &format!("/api/v2/tickets/{id}"),
        None,
    )
    .await;
    let gone = call(
        &running,
        reqwest::Method::DELETE,
        &format!("/api/v2/deleted_tickets/{id}"),
        None,
    )
    .await;
    assert_eq!(gone.status(), 200);
    let types: Vec<String> = receiver
        .take(2)
        .await
        .iter()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["type"].to_string())
        .collect();
    assert_eq!(
        types,
        [
            "\"zen:event-type:ticket.soft_deleted\"",
            "\"zen:event-type:ticket.permanently_deleted\""
        ]
    );
    assert!(handle.ticket(id.parse().unwrap()).is_none());
}

/// Item 16: a 429 in plain text is back-pressure with its `Retry-After`.
#[tokio::test]
async fn a_plain_text_429_is_back_pressure_with_its_retry_after() {
    let (running, handle, zd) = sim().await;
    handle.control().set_faults(Faults {
        rate_limit: Some(1),
        ..Faults::default()
    });
    call(
        &running,
        reqwest::Method::GET,
        "/api/v2/organizations",
        None,
    )
    .await;
    let raw = call(
        &running,
        reqwest::Method::GET,
        "/api/v2/organizations",
        None,
    )
    .await;
    assert_eq!(raw.status(), 429);
    assert!(raw.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(raw.headers().contains_key("retry-after"));
    let err = zd.fetch("Organizations", "1").await.unwrap_err();
    assert!(
        matches!(err, ConnectorError::RateLimited { retry_after: Some(d), .. } if d > Duration::ZERO),
        "{err:?}"
    );
}

/// Item 16: a 409 Conflict is worth a retry (the job's next attempt), not a dead letter.
#[tokio::test]
async fn a_conflict_is_transient_and_the_retry_goes_through() {
    let (_running, handle, zd) = sim().await;
    let org = handle.insert_organization(json!({"name": "Busy AS"}));
    let id = id_of(&org).to_string();
    handle.conflict_next_writes(1);
    let err = zd
        .update("Organizations", &id, &obj(json!({"notes": "n"})))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Transient { .. }), "{err:?}");
    let done = zd
        .update("Organizations", &id, &obj(json!({"notes": "n"})))
        .await
        .unwrap();
    assert_eq!(done.fields["notes"], "n");
}

/// A ticket's safe update (docs/vendors.md, Zendesk "Safe updates of tickets"): made only while
/// the ticket's `updated_at` is the `updated_stamp` it names; otherwise 409 and nothing written,
/// which the connector reports as `Changed`. Organizations have no safe update.
#[tokio::test]
async fn a_ticket_safe_update_is_made_only_on_the_stamp_it_names() {
    let (running, handle, zd) = sim().await;
    let requester = handle.insert_user(json!({"name": "Req", "email": "req@example.com"}));
    let ticket = handle.insert_ticket(json!({"subject": "Safe", "requester_id": requester["id"]}));
    let (ticket_id, id) = (id_of(&ticket), id_of(&ticket).to_string());
    // An hour back, so that a write now is another second (Zendesk's stamps are whole seconds).
    let an_hour_ago = chrono::Utc::now().timestamp() - 3600;
    assert!(handle.set_updated_at(Kind::Ticket, ticket_id, an_hour_ago));
    let seen = zd
        .fetch("Tickets", &id)
        .await
        .unwrap()
        .unwrap()
        .updated_at
        .unwrap();
    assert_eq!(
        zd.conditional_writes("Tickets"),
        ConditionalWrites::AfterRead
    );

    let written = zd
        .update_if_unchanged("Tickets", &id, &obj(json!({"subject": "First"})), seen)
        .await
        .unwrap();
    assert_eq!(written.fields["subject"], "First");
    assert_ne!(written.updated_at, Some(seen));
    let stale = zd
        .update_if_unchanged("Tickets", &id, &obj(json!({"subject": "Second"})), seen)
        .await
        .unwrap_err();
    assert!(matches!(stale, ConnectorError::Changed { .. }), "{stale:?}");
    let now = zd.fetch("Tickets", &id).await.unwrap().unwrap();
    assert_eq!(
        now.fields["subject"], "First",
        "a refused safe update wrote nothing"
    );

    // As another client sends it: `false` asks for safety too, no stamp means no safety.
    let stamp = seen.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let path = format!("/api/v2/tickets/{ticket_id}");
    let put = |body: Value| {
        call(
            &running,
            reqwest::Method::PUT,
            &path,
            Some(json!({"ticket": body})),
        )
    };
    let refused = put(json!({"subject": "S", "safe_update": false, "updated_stamp": stamp})).await;
    assert_eq!(refused.status(), 409);
    let unsafe_update = put(json!({"subject": "Unsafe", "safe_update": true})).await;
    assert_eq!(unsafe_update.status(), 200);
    let malformed =
        put(json!({"subject": "S", "safe_update": true, "updated_stamp": "soon"})).await;
    assert_eq!(malformed.status(), 400);

    let org = handle.insert_organization(json!({"name": "No Safety AS"}));
    assert_eq!(
        zd.conditional_writes("Organizations"),
        ConditionalWrites::No
    );
    let err = zd
        .update_if_unchanged(
            "Organizations",
            &id_of(&org).to_string(),
            &obj(json!({"notes": "n"})),
            seen,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Unsupported { .. }), "{err:?}");
}

/// Item 16: the incremental exports allow 10 requests a minute, whatever the plan allows.
#[tokio::test]
async fn the_exports_allow_ten_requests_a_minute() {
    let (running, handle, _zd) = sim().await;
    handle.set_export_limit_per_minute(10);
    let start = chrono::Utc::now().timestamp() - 3600;
    let export = format!("/api/v2/incremental/organizations?start_time={start}");
    for i in 0..10 {
        let ok = call(&running, reqwest::Method::GET, &export, None).await;
        assert_eq!(ok.status(), 200, "request {i}");
    }
    let refused = call(&running, reqwest::Method::GET, &export, None).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Other endpoints are not held back by the export limit.
    let other = call(
        &running,
        reqwest::Method::GET,
        "/api/v2/organizations",
        None,
    )
    .await;
    assert_eq!(other.status(), 200);
}

/// A backfill page reads its organizations with `show_many?ids=` (`Connector::fetch_many`, 100
/// ids a call): each as `fetch` reads it, unknown ids absent, more than 100 ids split.
#[tokio::test]
async fn fetch_many_reads_organizations_by_id_as_fetch_does_and_skips_unknown_ids() {
    let (_running, _handle, zd) = sim().await;
    let mut made = Vec::new();
    for n in 0..3 {
        let fields = obj(json!({"name": format!("Many {n} AS")}));
        made.push(
            zd.create("Organizations", &fields, &format!("m-{n}"))
                .await
                .unwrap(),
        );
    }
    // 117 unknown ids around them: the read spans two calls.
    let mut ids: Vec<String> = (0..117).map(|n| (900_000 + n).to_string()).collect();
    ids.insert(50, made[0].id.clone());
    ids.insert(101, made[1].id.clone());
    ids.push(made[2].id.clone());
    assert_eq!(ids.len(), 120);

    let found = zd.fetch_many("Organizations", &ids).await.unwrap();
    let mut found_ids: Vec<&str> = found.iter().map(|r| r.id.as_str()).collect();
    found_ids.sort_unstable();
    let mut made_ids: Vec<&str> = made.iter().map(|r| r.id.as_str()).collect();
    made_ids.sort_unstable();
    assert_eq!(found_ids, made_ids);
    for record in &found {
        let one = zd
            .fetch("Organizations", &record.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.fields, one.fields);
        assert_eq!(record.updated_at, one.updated_at);
    }
}
