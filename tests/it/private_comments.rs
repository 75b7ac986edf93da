//! Issue 16 item 12: a Zendesk comment made private follows the registry's
//! `sync_private_comments` switch. By default it goes no further (decision `private_comment`,
//! the counterpart left as it was); a flow that switches it on keeps syncing it. Against the
//! simulators and a real PostgreSQL, through the whole service.

use std::time::Duration;

use serde_json::{json, Value};
use tether::sandbox::credentials::{ZENDESK_EMAIL, ZENDESK_TOKEN};
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, Service as Harness};

const HELD: &str = "zendesk.Ticketcomments->customerp.Project";
const SYNCED: &str = "zendesk.Ticketcomments->custompms.Project";

/// Both comment flows carry the body into the project's name; only the PMS one syncs private
/// comments.
const OVERLAY: &str = r#"
[[dataflow]]
source = "zendesk.Ticketcomments"
target = "customerp.Project"
[[dataflow.property]]
source = "body"
target = "name"
type = "string"
sync = "to_target"

[[dataflow]]
source = "zendesk.Ticketcomments"
target = "custompms.Project"
sync_private_comments = true
[[dataflow.property]]
source = "body"
target = "name"
type = "string"
sync = "to_target"
"#;

async fn put(h: &Harness, path: &str, body: Option<Value>) {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", h.sims.url(tether::domain::SystemId::Zendesk));
    let mut request = client
        .put(url)
        .basic_auth(format!("{ZENDESK_EMAIL}/token"), Some(ZENDESK_TOKEN));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
}

/// The name of the project `flow` links to the comment, once it equals `expected`.
async fn project_named(h: &Harness, flow: &str, comment: &str, expected: &str) {
    let what = format!("{flow}: the project named {expected:?}");
    eventually(&what, Duration::from_secs(30), || async {
        let Some(id) = h.active_link(flow, comment).await else {
            return false;
        };
        let sim = if flow == HELD {
            &h.sims.customerp
        } else {
            &h.sims.custompms
        };
        sim.get("project", &id)
            .is_some_and(|p| p["name"] == expected)
    })
    .await;
}

async fn private_decisions(h: &Harness) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM sync_log WHERE decision = 'private_comment' AND flow_id = $1",
    )
    .bind(HELD)
    .fetch_one(&h.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_comment_made_private_goes_no_further_unless_the_flow_syncs_private_comments() {
    let h = Harness::start(Some(OVERLAY), "").await;
    let ticket = h.sims.zendesk.create(
        Kind::Ticket,
        json!({"subject": "Card", "comment": {"body": "Card payment failed", "public": true}}),
    );
    assert!(ticket.status().is_success());
    let ticket_id = h.sims.zendesk.all(Kind::Ticket)[0]["id"].as_u64().unwrap();
    // A comment added by an agent (announced as `ticket.comment_added`).
    let added = json!({"ticket": {"comment": {"body": "my card 4111 here", "public": true}}});
    put(&h, &format!("/api/v2/tickets/{ticket_id}"), Some(added)).await;
    let comments = h.sims.zendesk.comments(ticket_id);
    let comment_id = comments.last().unwrap()["id"].as_u64().unwrap();
    let comment = format!("{ticket_id}:{comment_id}");
    let base = format!("/api/v2/tickets/{ticket_id}/comments/{comment_id}");
    for flow in [HELD, SYNCED] {
        project_named(&h, flow, &comment, "my card 4111 here").await;
    }

    // A redaction of a public comment reaches both.
    put(&h, &format!("{base}/redact"), Some(json!({"text": "4111"}))).await;
    for flow in [HELD, SYNCED] {
        project_named(&h, flow, &comment, "my card ▇▇▇▇ here").await;
    }

    // Made private: the default flow records it and writes nothing from then on.
    put(&h, &format!("{base}/make_private"), None).await;
    eventually(
        "the private comment decision",
        Duration::from_secs(30),
        || async { private_decisions(&h).await >= 1 },
    )
    .await;
    let decisions_before = private_decisions(&h).await;
    put(&h, &format!("{base}/redact"), Some(json!({"text": "here"}))).await;
    project_named(&h, SYNCED, &comment, "my card ▇▇▇▇ ▇▇▇▇").await;
    eventually(
        "the second redaction held back",
        Duration::from_secs(30),
        || async { private_decisions(&h).await > decisions_before },
    )
    .await;
    project_named(&h, HELD, &comment, "my card ▇▇▇▇ here").await;
    h.stop().await;
}
