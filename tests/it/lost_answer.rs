//! A write whose answer was lost (docs/sync-rules.md, "A write whose answer was lost"; found by
//! the chaos suite, issue 19): Tether renames a Custom ERP customer, the ERP makes the change but
//! answers after Tether's timeout (and its webhook, which would have told, is lost), and an agent
//! renames the Zendesk organization again in the same second, so Zendesk's whole-second stamp is
//! earlier than the ERP's. The agent's rename must win: it is the only change a person made.

use std::time::Duration;

use serde_json::{json, Value};
use tether::admin::pause;
use tether::simulators::kit::Faults;
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, Service};

const FLOW: &str = "zendesk.Organizations->customerp.Customer";
const WAIT: Duration = Duration::from_secs(60);

/// Organization names become Custom ERP customer names, both ways (shared with the admin tests).
use crate::admin::OVERLAY;

fn customer(h: &Service, id: &str) -> Value {
    h.sims.customerp.get("customer", id).unwrap()
}

fn org_name(h: &Service, org: u64) -> Value {
    h.sims.zendesk.organization(org).unwrap()["name"].clone()
}

fn rename(h: &Service, org: u64, name: &str) {
    let renamed = h
        .sims
        .zendesk
        .update(Kind::Organization, org, json!({ "name": name }));
    assert!(renamed.status().is_success());
}

#[tokio::test]
async fn an_edit_made_while_a_write_answer_was_lost_is_not_written_over() {
    let h = Service::start_layered(Some(OVERLAY), "", "[outbound]\ntimeout = \"1s\"\n").await;
    let created = h
        .sims
        .zendesk
        .create(Kind::Organization, json!({ "name": "Alpha" }));
    assert!(created.status().is_success());
    let org = h
        .sims
        .zendesk
        .all(Kind::Organization)
        .into_iter()
        .find(|o| o["name"] == json!("Alpha"))
        .and_then(|o| o["id"].as_u64())
        .unwrap();
    let key = org.to_string();
    let erp = eventually("the customer", WAIT, || h.active_link(FLOW, &key)).await;

    // The ERP makes the next change but answers after Tether gave up, and its webhooks are lost.
    let control = &h.sims.customerp.control;
    let lost_webhooks = Faults {
        drop_webhooks: 1.0,
        ..Faults::default()
    };
    control.set_faults(Faults {
        slow_rate: 1.0,
        slow_ms: 1_500,
        slow_writes_only: true,
        ..lost_webhooks.clone()
    });
    rename(&h, org, "Beta");
    eventually("the lost write remembered", WAIT, || async {
        let unsure: Option<Value> = sqlx::query_scalar(
            "SELECT unsure_write FROM links WHERE flow_id = $1 AND state = 'active'",
        )
        .bind(FLOW)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
        unsure.map(|_| ())
    })
    .await;
    control.set_faults(lost_webhooks);
    assert_eq!(customer(&h, &erp)["name"], json!("Beta"), "the ERP made it");

    // The agent's rename lands while the flow is held, stamped in the second of the ERP's change
    // (Zendesk stamps whole seconds): the later stamp is not the later edit. The held events then
    // run.
    pause::pause(&h.db.pool, FLOW, None).await.unwrap();
    tokio::time::sleep(pause::PAUSE_REFRESH + Duration::from_millis(500)).await;
    let erp_stamp: chrono::DateTime<chrono::Utc> = customer(&h, &erp)["updated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    rename(&h, org, "Gamma");
    assert!(h
        .sims
        .zendesk
        .set_updated_at(Kind::Organization, org, erp_stamp.timestamp()));
    pause::resume(&h.db.pool, FLOW, Duration::from_millis(1_500))
        .await
        .unwrap();

    eventually("the agent's rename in the ERP", WAIT, || async {
        (customer(&h, &erp)["name"] == json!("Gamma")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        org_name(&h, org),
        json!("Gamma"),
        "the agent's rename stays"
    );
    assert_eq!(customer(&h, &erp)["name"], json!("Gamma"));
    h.stop().await;
}
