//! End to end: the whole service (HTTP intake, queue workers, pollers, sync engine, connectors)
//! against the six simulators and a real PostgreSQL, through real HTTP. Changes are made the way
//! users make them: through a vendor's API (which sends its webhook) or in a polled system.
//!
//! Each of the registry's 18 dataflows is covered (several per test, to keep the run short):
//! - `chain_poweroffice_customer_to_zendesk_to_custom_systems_and_back`: poweroffice.Customers ->
//!   zendesk.Organizations -> customerp.Customer and custompms.Customer.
//! - `zendesk_users_tickets_and_comments_reach_crmoffice_and_custom_systems`: zendesk.Users ->
//!   crmoffice.Contacts / customerp.Contact; zendesk.Tickets and zendesk.Ticketcomments ->
//!   crmoffice.Activities / customerp.Project / custompms.Project.
//! - `exact_accounts_departments_and_divisions_reach_zendesk_organizations`: the three Exact flows
//!   (departments and divisions link-only, by merge criteria from the test's overlay).
//! - `poweroffice_suppliers_departments_employees_and_contact_persons_reach_zendesk`: the other
//!   four PowerOffice flows (employees and contact persons link-only, by email from the overlay).
//! - `a_linked_rename_writes_each_custom_customer_once_unread_and_its_echo_costs_no_call`: the API
//!   calls of one linked update, counted by the simulators.

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tether::connectors::zendesk::ZendeskConnector;
use tether::connectors::Connector;
use tether::simulators::custom::CustomSim;
use tether::simulators::kit;
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, obj, probe, Service as Harness};

const WAIT: Duration = Duration::from_secs(60);

fn find_by_field(records: Vec<Value>, field: &str, value: &str) -> Option<Value> {
    records
        .into_iter()
        .find(|r| r.get(field).and_then(Value::as_str) == Some(value))
}

/// An id as text, whether the API holds it as a number or a string.
fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// PowerOffice customer → Zendesk organization → Customerp customer and Custom PMS customer,
/// then an edit in Zendesk comes back to PowerOffice, and the echoes cause no further writes.
#[tokio::test]
async fn chain_poweroffice_customer_to_zendesk_to_custom_systems_and_back() {
    let h = Harness::start(None, "").await;
    let customer = h.sims.poweroffice.seed(
        "Customers",
        json!({"Name": "Chain Test AS", "WebsiteUrl": "https://chain.example"}),
    );
    let customer_id = customer["Id"].as_i64().unwrap();

    let org = eventually(
        "the Zendesk organization",
        WAIT,
        probe(|| {
            find_by_field(
                h.sims.zendesk.all(Kind::Organization),
                "name",
                "Chain Test AS",
            )
        }),
    )
    .await;
    // `url` is Zendesk's own read-only API address: the seed's WebsiteUrl -> url is not synced.
    assert_ne!(org["url"], json!("https://chain.example"));
    eventually(
        "a Customerp customer",
        WAIT,
        probe(|| (h.sims.customerp.len("customer") == 1).then_some(())),
    )
    .await;
    eventually(
        "a Custom PMS customer",
        WAIT,
        probe(|| (h.sims.custompms.len("customer") == 1).then_some(())),
    )
    .await;
    let org_id = org["id"].as_u64().unwrap().to_string();
    assert_eq!(
        h.linked_target(
            "poweroffice.Customers->zendesk.Organizations",
            &customer_id.to_string()
        )
        .await,
        org_id
    );
    for flow in [
        "zendesk.Organizations->customerp.Customer",
        "zendesk.Organizations->custompms.Customer",
    ] {
        h.linked_target(flow, &org_id).await;
    }

    // An edit on the Zendesk side comes back to the PowerOffice customer (write-back).
    h.zendesk()
        .update(
            "Organizations",
            &org_id,
            &obj(json!({"name": "Chain Test Renamed AS"})),
        )
        .await
        .unwrap();
    eventually(
        "the rename to reach PowerOffice",
        WAIT,
        probe(|| {
            let c = h.sims.poweroffice.get("Customers", customer_id)?;
            (c["Name"] == json!("Chain Test Renamed AS")).then_some(())
        }),
    )
    .await;

    // Settled: the echoes (webhooks and polls of Tether's own writes) cause no more writes.
    h.assert_settles().await;
    h.stop().await;
}

/// Zendesk users and tickets: a user becomes a CRMOffice contact and a Customerp contact; a
/// ticket becomes a CRMOffice activity whose `ownerId` is the requester's linked contact (a
/// translated reference), and a Customerp and Custom PMS project; a comment becomes an activity
/// and projects too. A user's `organization_id` stays unset in CRMOffice (no flow links companies);
/// an activity edit comes back to the ticket (subject, and owner translated to `requester_id`),
/// while a comment's activity edit does not (write-back off).
#[tokio::test]
async fn zendesk_users_tickets_and_comments_reach_crmoffice_and_custom_systems() {
    let h = Harness::start(None, "").await;
    let zd = h.zendesk();
    let user = zd
        .create(
            "Users",
            &obj(json!({"name": "Ada Requester", "email": "ada@example.com"})),
            "e2e-user-1",
        )
        .await
        .unwrap();
    let contact = eventually(
        "a CRMOffice contact for the user",
        WAIT,
        probe(|| {
            (h.sims.crmoffice.len("contacts") == 1).then(|| h.sims.crmoffice.get("contacts", "1"))
        }),
    )
    .await;
    assert!(contact.is_some());
    eventually(
        "a Customerp contact for the user",
        WAIT,
        probe(|| (h.sims.customerp.len("contact") == 1).then_some(())),
    )
    .await;

    let ticket = zd
        .create(
            "Tickets",
            &obj(json!({"subject": "Printer on fire", "requester_id": user.id.parse::<u64>().unwrap()})),
            "e2e-ticket-1",
        )
        .await
        .unwrap();
    let activity = eventually(
        "a CRMOffice activity for the ticket",
        WAIT,
        probe(|| {
            (1..=20)
                .filter_map(|i| h.sims.crmoffice.get("activities", &i.to_string()))
                .find(|a| a["subject"] == json!("Printer on fire"))
        }),
    )
    .await;
    let contact_id = (1..=20)
        .filter_map(|i| h.sims.crmoffice.get("contacts", &i.to_string()))
        .next()
        .unwrap()["id"]
        .clone();
    assert_eq!(
        activity["ownerId"], contact_id,
        "requester_id arrives translated to the linked contact's id"
    );
    for flow in [
        "zendesk.Tickets->customerp.Project",
        "zendesk.Tickets->custompms.Project",
    ] {
        h.linked_target(flow, &ticket.id).await;
    }
    let ticket_id = ticket.id.parse::<u64>().unwrap();

    // A comment becomes an activity (ticket comments are never written back) and projects.
    let activities = h.sims.crmoffice.len("activities");
    let projects = (
        h.sims.customerp.len("project"),
        h.sims.custompms.len("project"),
    );
    let comment = zd
        .create(
            "Ticketcomments",
            &obj(json!({"ticket_id": ticket_id, "body": "Still burning"})),
            "e2e-comment-1",
        )
        .await
        .unwrap();
    for flow in [
        "zendesk.Ticketcomments->customerp.Project",
        "zendesk.Ticketcomments->custompms.Project",
    ] {
        h.linked_target(flow, &comment.id).await;
    }
    let comment_activity = h
        .linked_target("zendesk.Ticketcomments->crmoffice.Activities", &comment.id)
        .await;
    assert!(h.sims.crmoffice.len("activities") > activities);
    assert!(h.sims.customerp.len("project") > projects.0);
    assert!(h.sims.custompms.len("project") > projects.1);

    // A user in an organization: no dataflow links Zendesk organizations to CRMOffice companies,
    // so the contact's `company.id` is left unset rather than given a Zendesk id.
    let org = zd
        .create(
            "Organizations",
            &obj(json!({"name": "Ada Org"})),
            "e2e-org-1",
        )
        .await
        .unwrap();
    let member = zd
        .create(
            "Users",
            &obj(json!({"name": "Bob Member", "email": "bob@example.com", "organization_id": org.id.parse::<u64>().unwrap()})),
            "e2e-user-2",
        )
        .await
        .unwrap();
    let member_contact = h
        .linked_target("zendesk.Users->crmoffice.Contacts", &member.id)
        .await;
    h.linked_target("zendesk.Users->customerp.Contact", &member.id)
        .await;
    let member_contact = h.sims.crmoffice.get("contacts", &member_contact).unwrap();
    assert!(
        member_contact
            .get("company")
            .and_then(|c| c.get("id"))
            .is_none_or(Value::is_null),
        "company.id must stay unset: {member_contact}"
    );

    // An edit of the activity in CRMOffice (polled) comes back to the ticket's subject.
    let activity_id = h
        .linked_target("zendesk.Tickets->crmoffice.Activities", &ticket.id)
        .await;
    assert_eq!(activity["id"].to_string().trim_matches('"'), activity_id);
    h.sims.crmoffice.touch(
        "activities",
        &activity_id,
        obj(json!({"subject": "Printer extinguished", "ownerId": member_contact["id"].clone()})),
        None,
    );
    // Both come back: the subject, and the owner translated back to the member's Zendesk user.
    let member_id: u64 = member.id.parse().unwrap();
    eventually(
        "the subject and requester to reach the Zendesk ticket",
        WAIT,
        probe(|| {
            let t = h.sims.zendesk.ticket(ticket_id)?;
            (t["subject"] == json!("Printer extinguished") && t["requester_id"] == json!(member_id))
                .then_some(())
        }),
    )
    .await;
    h.assert_settles().await;

    // Ticket comments are not written back (`write_back_to_source = false`): an edit of the
    // comment's activity in CRMOffice writes nothing to Zendesk.
    let zendesk_writes = h.sims.zendesk.control().count_method("PUT")
        + h.sims.zendesk.control().count_method("POST");
    let seen_before = h.log_entries("crmoffice", &comment_activity).await;
    h.sims.crmoffice.touch(
        "activities",
        &comment_activity,
        obj(json!({"subject": "Edited in CRMOffice"})),
        None,
    );
    // The edit was read (the engine logged a decision about it) ...
    let start = Instant::now();
    while h.log_entries("crmoffice", &comment_activity).await == seen_before {
        assert!(start.elapsed() < WAIT, "the activity edit was never polled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and wrote nothing back.
    h.assert_settles().await;
    assert_eq!(
        h.sims.zendesk.control().count_method("PUT")
            + h.sims.zendesk.control().count_method("POST"),
        zendesk_writes
    );
    h.stop().await;
}

/// API calls of one linked update, counted by the simulators' request counters: an organization
/// renamed in Zendesk costs one read of it (two flows run for it), and each linked custom-system
/// customer one write and no read: Tether created it, the create's answer showed the synced
/// name, and the sandbox's custom systems write conditionally, so the write names the stamp the
/// link keeps (docs/sync-rules.md, "A write without a read"). The echo of each write costs no call
/// at all: its webhook carries the customer's `updated_at`, the stamp the write answered with
/// ("An echo without a read"). Then each customer is changed in its system without a webhook
/// (a field no flow maps): the next rename's write names a stale stamp and is refused, the
/// customer is read, and written again, keeping the system's own change.
#[tokio::test]
async fn a_linked_rename_writes_each_custom_customer_once_unread_and_its_echo_costs_no_call() {
    let overlay = r#"
[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"

[[dataflow]]
source = "zendesk.Organizations"
target = "custompms.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;
    let h = Harness::start(Some(overlay), "").await;
    let created = h
        .sims
        .zendesk
        .create(Kind::Organization, json!({"name": "Counted AS"}));
    assert!(created.status().is_success());
    let org_id = h.sims.zendesk.all(Kind::Organization)[0]["id"]
        .as_u64()
        .unwrap();
    let erp_customer = h
        .linked_target(
            "zendesk.Organizations->customerp.Customer",
            &org_id.to_string(),
        )
        .await;
    let pms_customer = h
        .linked_target(
            "zendesk.Organizations->custompms.Customer",
            &org_id.to_string(),
        )
        .await;
    h.assert_settles().await;
    // Only now: the creates' echoes are behind us.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let custom = [&h.sims.customerp, &h.sims.custompms];
    let echoes_before = [
        h.echo_entries("customerp", &erp_customer).await,
        h.echo_entries("custompms", &pms_customer).await,
    ];
    h.sims.zendesk.control().reset_counters();
    for sim in custom {
        sim.control.reset_counters();
    }

    let renamed = h.sims.zendesk.update(
        Kind::Organization,
        org_id,
        json!({"name": "Counted Norge AS"}),
    );
    assert!(renamed.status().is_success());
    for ((sim, system, id), before) in [
        (&h.sims.customerp, "customerp", &erp_customer),
        (&h.sims.custompms, "custompms", &pms_customer),
    ]
    .into_iter()
    .zip(echoes_before)
    {
        customer_named(sim, id, "Counted Norge AS").await;
        // The echo of the write is recognised (and causes nothing).
        let deadline = Instant::now() + WAIT;
        while h.echo_entries(system, id).await <= before {
            assert!(
                Instant::now() < deadline,
                "no echo recorded for {system} {id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    h.assert_settles().await;

    let zendesk = h.sims.zendesk.control();
    assert_eq!(zendesk.count_method("GET"), 1, "{:?}", zendesk.counters());
    assert_eq!(
        zendesk.count_method("PUT") + zendesk.count_method("POST"),
        0,
        "no write back to Zendesk"
    );
    for sim in custom {
        let counters = sim.control.counters();
        assert_eq!(sim.control.count_method("GET"), 0, "{counters:?}");
        assert_eq!(sim.control.count_method("PATCH"), 1, "{counters:?}");
        assert_eq!(sim.control.count_method("POST"), 0, "{counters:?}");
    }

    // Changed in the custom systems with no webhook: the next write is refused, then read.
    let customers = [
        (&h.sims.customerp, &erp_customer),
        (&h.sims.custompms, &pms_customer),
    ];
    for (sim, id) in customers {
        sim.touch(
            "customer",
            id,
            obj(json!({"phone": "+47 22 00 00 00"})),
            None,
        );
        sim.control.reset_counters();
    }
    let renamed = h.sims.zendesk.update(
        Kind::Organization,
        org_id,
        json!({"name": "Counted Holding AS"}),
    );
    assert!(renamed.status().is_success());
    for (sim, id) in customers {
        customer_named(sim, id, "Counted Holding AS").await;
    }
    h.assert_settles().await;
    for (sim, id) in customers {
        let counters = sim.control.counters();
        assert_eq!(sim.control.count_method("GET"), 1, "{counters:?}");
        assert_eq!(sim.control.count_method("PATCH"), 2, "{counters:?}");
        let customer = sim.get("customer", id).unwrap();
        assert_eq!(customer["phone"], json!("+47 22 00 00 00"));
    }
    h.stop().await;
}

/// Waits until the custom system's customer `id` carries `name`.
async fn customer_named(sim: &CustomSim, id: &str, name: &str) {
    eventually(
        "the new name in the custom system",
        WAIT,
        probe(|| {
            let c = sim.get("customer", id)?;
            (c["name"] == json!(name)).then_some(())
        }),
    )
    .await;
}

/// A Zendesk echo costs no read: a customer renamed in the custom ERP is written back to its
/// Zendesk organization, whose `organization.name_changed` webhook carries the written name and
/// the write's `updated_at` in `detail` (docs/sync-rules.md, "An echo without a read"). So the
/// rename costs Zendesk one read (the counterpart, for the merge) and one write, and its echo
/// none. Then a person renames the organization right after Tether's write, in the same second
/// as far as the clock allows (Zendesk stamps whole seconds): that is no echo, and reaches the
/// customer.
#[tokio::test]
async fn a_zendesk_echo_costs_no_read_and_an_edit_in_the_same_second_still_syncs() {
    // An organization event is settled unread only where its one running flow is linked: the
    // other flows of organizations are switched off (each would need the record read).
    let overlay = organizations_to_customerp_only();
    let h = Harness::start(Some(&overlay), "").await;
    let created = h
        .sims
        .zendesk
        .create(Kind::Organization, json!({"name": "Echoed AS"}));
    assert!(created.status().is_success());
    let org_id = h.sims.zendesk.all(Kind::Organization)[0]["id"]
        .as_u64()
        .unwrap();
    let org = org_id.to_string();
    let customer = h
        .linked_target("zendesk.Organizations->customerp.Customer", &org)
        .await;
    h.assert_settles().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let echoes_before = h.echo_entries("zendesk", &org).await;
    h.sims.zendesk.control().reset_counters();
    // Zendesk sends its webhooks from a queue of its own, seconds after the change; the simulator
    // sends them at once, so under load the echo could outrun Tether's storing of its own write,
    // and such an echo is read as before (docs/sync-rules.md). This test is about the echo that
    // arrives after it, as Zendesk's do.
    h.sims.zendesk.control().set_faults(kit::Faults {
        webhook_latency_ms: 1000,
        ..Default::default()
    });

    h.sims.customerp.edit(
        "customer",
        &customer,
        obj(json!({"name": "Echoed Norge AS"})),
    );
    eventually(
        "the new name in Zendesk",
        WAIT,
        probe(|| {
            let o = h.sims.zendesk.organization(org_id)?;
            (o["name"] == json!("Echoed Norge AS")).then_some(())
        }),
    )
    .await;
    // A person's edit just after Tether's write, most likely within its second.
    h.rename_organization_and_wait(org_id, &customer, "Echoed by a person AS")
        .await;
    h.assert_settles().await;

    assert_eq!(
        h.echo_entries("zendesk", &org).await,
        echoes_before + 1,
        "Tether's write came back as one echo; the person's edit is none"
    );
    // Each decision is followed by the event's `idle` entry (written by the same statement).
    let decisions: Vec<String> = sqlx::query_scalar(
        "SELECT decision FROM sync_log WHERE system = 'zendesk' AND record_id = $1 ORDER BY id",
    )
    .bind(&org)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert!(
        decisions.ends_with(&["echo", "idle", "updated", "idle"].map(String::from)),
        "{decisions:?}"
    );
    let zendesk = h.sims.zendesk.control();
    // Tether's write: one read of the organization (the merge's counterpart) and one write; its
    // echo: nothing; the person's edit (made in the simulator, not through its API): one read.
    assert_eq!(zendesk.count_method("GET"), 2, "{:?}", zendesk.counters());
    assert_eq!(zendesk.count_method("PUT"), 1, "{:?}", zendesk.counters());
    h.stop().await;
}

/// A Zendesk rename whose webhook `detail` holds every property the flow syncs (here `name`), with
/// an `updated_at` later than the Zendesk stamp the link holds, costs no read of the organization:
/// the delivery stands for it (docs/sync-rules.md, "A Zendesk update without a read"). An event
/// stamped in the link's second, or earlier, is read: signed events describing a name the
/// organization does not have change nothing, and each costs one read.
#[tokio::test]
async fn a_zendesk_update_newer_than_the_link_costs_no_read_and_one_of_its_second_is_read() {
    let h = Harness::start(Some(&organizations_to_customerp_only()), "").await;
    let created = h
        .sims
        .zendesk
        .create(Kind::Organization, json!({"name": "Described AS"}));
    assert!(created.status().is_success());
    let org_id = h.sims.zendesk.all(Kind::Organization)[0]["id"]
        .as_u64()
        .unwrap();
    let org = org_id.to_string();
    let flow = "zendesk.Organizations->customerp.Customer";
    let customer = h.linked_target(flow, &org).await;
    h.assert_settles().await;
    let webhook = h.zendesk_rename_webhook().await;
    // The rename is then stamped in a later second than the link's (whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.sims.zendesk.control().reset_counters();
    h.sims.customerp.control.reset_counters();

    h.rename_organization_and_wait(org_id, &customer, "Described Norge AS")
        .await;
    h.assert_settles().await;
    let zendesk = h.sims.zendesk.control();
    assert_eq!(zendesk.count_method("GET"), 0, "{:?}", zendesk.counters());
    let erp = &h.sims.customerp.control;
    // Nor of the customer: Tether created it, and the sandbox's ERP writes conditionally
    // (docs/sync-rules.md, "A write without a read").
    assert_eq!(erp.count_method("GET"), 0, "{:?}", erp.counters());
    assert_eq!(erp.count_method("PATCH"), 1, "{:?}", erp.counters());

    // Events describing another name, stamped in the link's second and one second before it.
    let seen: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT source_seen_at FROM links WHERE flow_id = $1 AND source_id = $2 AND state = 'active'",
    )
    .bind(flow)
    .bind(&org)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    for (n, stamp) in [seen, seen - chrono::Duration::seconds(1)]
        .into_iter()
        .enumerate()
    {
        let entries = h.log_entries("zendesk", &org).await;
        h.send_zendesk_rename(webhook.clone(), org_id, "Forged AS", stamp, n)
            .await;
        let deadline = Instant::now() + WAIT;
        while h.log_entries("zendesk", &org).await <= entries {
            assert!(Instant::now() < deadline, "event {n} never decided");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            zendesk.count_method("GET"),
            n as u64 + 1,
            "{:?}",
            zendesk.counters()
        );
    }
    h.assert_settles().await;
    let c = h.sims.customerp.get("customer", &customer).unwrap();
    assert_eq!(
        c["name"],
        json!("Described Norge AS"),
        "the forged name was not taken"
    );
    assert_eq!(erp.count_method("PATCH"), 1, "{:?}", erp.counters());
    h.stop().await;
}

/// A ticket an agent changes between Tether's read of it and Tether's write of a CRMOffice change
/// to it: the write is a safe update on the stamp Tether read, Zendesk refuses it (409), and the
/// rules then merge both changes on fresh reads, the agent's, the later one, winning on both
/// sides (docs/sync-rules.md, "Conditional writes"). Written unconditionally, Tether's write
/// would have replaced the agent's subject, and the agent's webhook would then have found the
/// ticket as Tether left it.
#[tokio::test]
async fn a_ticket_edit_made_while_tether_writes_the_ticket_is_kept() {
    let h = Harness::start(None, "").await;
    let zd = h.zendesk();
    let user = zd
        .create(
            "Users",
            &obj(json!({"name": "Rita Racer", "email": "rita@example.com"})),
            "race-user",
        )
        .await
        .unwrap();
    h.linked_target("zendesk.Users->crmoffice.Contacts", &user.id)
        .await;
    let ticket = zd
        .create(
            "Tickets",
            &obj(json!({"subject": "Printer on fire", "requester_id": user.id.parse::<u64>().unwrap()})),
            "race-ticket",
        )
        .await
        .unwrap();
    let ticket_id: u64 = ticket.id.parse().unwrap();
    let activity = h
        .linked_target("zendesk.Tickets->crmoffice.Activities", &ticket.id)
        .await;
    h.assert_settles().await;

    // Zendesk stamps whole seconds: the CRMOffice edit is stamped a second back and the agent's
    // change comes seconds after the ticket's last one, so each is told apart by its stamp.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.sims.zendesk.change_before_next_write(
        Kind::Ticket,
        ticket_id,
        json!({"subject": "Agent's subject"}),
    );
    let edited_at = chrono::Utc::now() - chrono::Duration::seconds(1);
    h.sims.crmoffice.touch(
        "activities",
        &activity,
        obj(json!({"subject": "CRMOffice's subject"})),
        Some(edited_at),
    );
    eventually(
        "the agent's subject on both sides",
        WAIT,
        probe(|| {
            let t = h.sims.zendesk.ticket(ticket_id)?;
            let a = h.sims.crmoffice.get("activities", &activity)?;
            (t["subject"] == json!("Agent's subject") && a["subject"] == json!("Agent's subject"))
                .then_some(())
        }),
    )
    .await;
    h.assert_settles().await;
    assert_eq!(
        h.sims.zendesk.ticket(ticket_id).unwrap()["subject"],
        json!("Agent's subject")
    );
    // At least one: a retry that meets the ticket's own job storing the link logs another.
    let conflicts = h.entries_deciding("crmoffice", &activity, "conflict").await;
    assert!(conflicts >= 1, "the refused write is logged as a conflict");
    h.stop().await;
}

/// An overlay whose only running flow of Zendesk organizations is the one to the Custom ERP
/// (`admin::OVERLAY`'s, mapping `name`): the others are switched off.
fn organizations_to_customerp_only() -> String {
    let mut overlay = crate::admin::OVERLAY.to_owned();
    for (source, target) in [
        ("exactonline.Accounts", "zendesk.Organizations"),
        ("exactonline.Departments", "zendesk.Organizations"),
        ("exactonline.Divisions", "zendesk.Organizations"),
        ("poweroffice.Customers", "zendesk.Organizations"),
        ("poweroffice.Departments", "zendesk.Organizations"),
        ("poweroffice.Suppliers", "zendesk.Organizations"),
        ("zendesk.Organizations", "custompms.Customer"),
    ] {
        overlay.push_str(&format!(
            "\n[[dataflow]]\nsource = \"{source}\"\ntarget = \"{target}\"\nenabled = false\n"
        ));
    }
    overlay
}

impl Harness {
    /// Renames Zendesk organization `org_id` as a person would (its webhook goes to Tether) and
    /// waits until the linked Custom ERP customer carries the new name.
    async fn rename_organization_and_wait(&self, org_id: u64, customer: &str, name: &str) {
        let renamed = self
            .sims
            .zendesk
            .update(Kind::Organization, org_id, json!({"name": name}));
        assert!(renamed.status().is_success());
        eventually(
            &format!("{name} in the custom ERP"),
            WAIT,
            probe(|| {
                let c = self.sims.customerp.get("customer", customer)?;
                (c["name"] == json!(name)).then_some(())
            }),
        )
        .await;
    }

    /// A Zendesk client, as a person using Zendesk (its changes send webhooks to Tether).
    fn zendesk(&self) -> ZendeskConnector {
        ZendeskConnector::new(
            self.config.systems.zendesk.as_ref().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    /// The id and signing secret of the Zendesk webhook Tether installed for organization
    /// renames, read through the simulator's Webhooks API.
    async fn zendesk_rename_webhook(&self) -> (String, String) {
        let zendesk = self.config.systems.zendesk.as_ref().unwrap();
        let base = zendesk.base_url.as_str().trim_end_matches('/').to_owned();
        let http = reqwest::Client::new();
        let get = |url: String| {
            http.get(url)
                .basic_auth(
                    format!("{}/token", zendesk.email.as_deref().unwrap()),
                    Some(zendesk.api_token.as_ref().unwrap().expose_secret()),
                )
                .send()
        };
        let list: Value = get(format!("{base}/api/v2/webhooks"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hook = list["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| {
                h["subscriptions"]
                    .as_array()
                    .is_some_and(|s| s.contains(&json!("zen:event-type:organization.name_changed")))
            })
            .unwrap_or_else(|| panic!("no webhook for organization renames: {list}"));
        let id = id_text(&hook["id"]);
        let secret: Value = get(format!("{base}/api/v2/webhooks/{id}/signing_secret"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            id,
            secret["signing_secret"]["secret"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    }

    /// Sends Tether a signed `organization.name_changed` webhook naming `name`, its `detail`
    /// stamped `updated_at` (delivery id `forged-<n>`), as if Zendesk had sent it through
    /// `webhook` (id, signing secret).
    async fn send_zendesk_rename(
        &self,
        webhook: (String, String),
        org_id: u64,
        name: &str,
        updated_at: chrono::DateTime<chrono::Utc>,
        n: usize,
    ) {
        let stamp = updated_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let body = json!({
            "type": "zen:event-type:organization.name_changed",
            "account_id": 1,
            "id": format!("forged-{n}"),
            "subject": format!("zen:organization:{org_id}"),
            "time": stamp,
            "zendesk_event_version": "2022-06-20",
            "detail": {"id": org_id.to_string(), "name": name, "updated_at": stamp},
            "event": {"current": name, "previous": "Described Norge AS"},
        })
        .to_string();
        let (webhook_id, secret) = webhook;
        let signed_at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let signature = tether::signing::zendesk::sign(&secret, &signed_at, body.as_bytes());
        let answer = reqwest::Client::new()
            .post(format!("{}/webhooks/zendesk", self.base))
            .header("content-type", "application/json")
            .header("x-zendesk-webhook-signature", signature)
            .header("x-zendesk-webhook-signature-timestamp", signed_at)
            .header("x-zendesk-webhook-id", webhook_id)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 202, "{:?}", answer.text().await);
    }

    /// The target id linked to `source_id` by the flow `flow_id`, once the link exists.
    async fn linked_target(&self, flow_id: &str, source_id: &str) -> String {
        eventually(
            &format!("a link of {flow_id} from {source_id}"),
            WAIT,
            || self.active_link(flow_id, source_id),
        )
        .await
    }

    /// How many `echo` decisions were logged about a record.
    async fn echo_entries(&self, system: &str, record_id: &str) -> i64 {
        self.entries_deciding(system, record_id, "echo").await
    }

    /// How many decisions `decision` were logged about a record.
    async fn entries_deciding(&self, system: &str, record_id: &str, decision: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM sync_log WHERE system = $1 AND record_id = $2 \
             AND decision = $3",
        )
        .bind(system)
        .bind(record_id)
        .bind(decision)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// How many sync decisions were logged about a record.
    async fn log_entries(&self, system: &str, record_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM sync_log WHERE system = $1 AND record_id = $2")
            .bind(system)
            .bind(record_id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Write counters of every simulator API (creates and updates), for the no-echo checks.
    fn write_counts(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        for control in [
            self.sims.zendesk.control(),
            &self.sims.exact.control,
            &self.sims.poweroffice.control,
            &self.sims.crmoffice.control,
            &self.sims.customerp.control,
            &self.sims.custompms.control,
        ] {
            for method in ["POST", "PUT", "PATCH"] {
                counts.push(control.count_method(method));
            }
        }
        counts
    }

    /// Waits until no simulator receives a write for a few seconds in a row (the echoes of
    /// Tether's own writes have come back and were suppressed), failing after the deadline.
    async fn assert_settles(&self) {
        let start = Instant::now();
        let mut last = self.write_counts();
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.write_counts();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_secs(3) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "writes never stopped: an echo keeps causing writes ({last:?})"
            );
        }
    }
}

/// Exact Online: an account (created, then changed with a signed webhook) becomes a Zendesk
/// organization named like it, and a rename in Zendesk comes back to the account. Departments and
/// divisions (polled) have no mapping that can create an organization, so the test's overlay
/// links them by `Description` to organizations that already exist, and creates nothing.
#[tokio::test]
async fn exact_accounts_departments_and_divisions_reach_zendesk_organizations() {
    let overlay = r#"
[[dataflow]]
source = "exactonline.Departments"
target = "zendesk.Organizations"
[[dataflow.merge]]
source = "Description"
target = "name"

[[dataflow]]
source = "exactonline.Divisions"
target = "zendesk.Organizations"
[[dataflow.merge]]
source = "Description"
target = "name"
"#;
    let h = Harness::start(Some(overlay), "").await;
    let dept_org = h
        .sims
        .zendesk
        .insert_organization(json!({"name": "E2E Support Department"}));
    let div_org = h
        .sims
        .zendesk
        .insert_organization(json!({"name": "E2E Division Oslo"}));
    let dept = h
        .sims
        .exact
        .seed_department(json!({"Code": "D1", "Description": "E2E Support Department"}));
    let div = h
        .sims
        .exact
        .seed_division(json!({"Code": 4242, "Description": "E2E Division Oslo"}));

    let account = h.sims.exact.seed_account(json!({"Name": "Exact Draft BV"}));
    assert!(h
        .sims
        .exact
        .change_account(&account, json!({"Name": "Exact Account BV"})));
    let org = eventually(
        "the Zendesk organization for the account",
        WAIT,
        probe(|| {
            find_by_field(
                h.sims.zendesk.all(Kind::Organization),
                "name",
                "Exact Account BV",
            )
        }),
    )
    .await;
    let org_id = org["id"].as_u64().unwrap().to_string();
    assert_eq!(
        h.linked_target("exactonline.Accounts->zendesk.Organizations", &account)
            .await,
        org_id
    );

    // Link-only flows: linked to the organizations that were there, none created for them.
    assert_eq!(
        h.linked_target("exactonline.Departments->zendesk.Organizations", &dept)
            .await,
        dept_org["id"].as_u64().unwrap().to_string()
    );
    assert_eq!(
        h.linked_target("exactonline.Divisions->zendesk.Organizations", &div)
            .await,
        div_org["id"].as_u64().unwrap().to_string()
    );

    // A rename in Zendesk is written back to the Exact account.
    h.zendesk()
        .update(
            "Organizations",
            &org_id,
            &obj(json!({"name": "Exact Account Renamed BV"})),
        )
        .await
        .unwrap();
    eventually(
        "the rename to reach the Exact account",
        WAIT,
        probe(|| {
            let a = h.sims.exact.account(&account)?;
            (a["Name"] == json!("Exact Account Renamed BV")).then_some(())
        }),
    )
    .await;

    h.assert_settles().await;
    let orgs = h.sims.zendesk.all(Kind::Organization);
    assert_eq!(
        orgs.len(),
        3,
        "only the account created an organization: {orgs:?}"
    );
    h.stop().await;
}

/// PowerOffice: suppliers and departments become Zendesk organizations (`LegalName`/`Name`), and
/// renames come back; employees and contact persons (link-only: no mapping gives a user a name and
/// an email) are linked by email to existing users through the test's overlay, and their
/// `DepartmentId` / `partyId` arrive in Zendesk translated to the linked organizations.
#[tokio::test]
async fn poweroffice_suppliers_departments_employees_and_contact_persons_reach_zendesk() {
    let overlay = r#"
[[dataflow]]
source = "poweroffice.Employees"
target = "zendesk.Users"
[[dataflow.merge]]
source = "EmailAddress"
target = "email"

[[dataflow]]
source = "poweroffice.Contactperson"
target = "zendesk.Users"
[[dataflow.merge]]
source = "EmailAddress"
target = "email"
"#;
    let h = Harness::start(Some(overlay), "").await;
    let po = &h.sims.poweroffice;
    let supplier = po.seed("Suppliers", json!({"LegalName": "E2E Supplier AS"}));
    let supplier_id = supplier["Id"].as_i64().unwrap();
    let dept = po.seed("Departments", json!({"Name": "E2E Workshop"}));
    let dept_id = dept["Id"].as_i64().unwrap();

    let supplier_org = h
        .linked_target(
            "poweroffice.Suppliers->zendesk.Organizations",
            &supplier_id.to_string(),
        )
        .await;
    let dept_org = h
        .linked_target(
            "poweroffice.Departments->zendesk.Organizations",
            &dept_id.to_string(),
        )
        .await;
    let zd = &h.sims.zendesk;
    assert_eq!(
        zd.organization(supplier_org.parse().unwrap()).unwrap()["name"],
        json!("E2E Supplier AS")
    );
    assert_eq!(
        zd.organization(dept_org.parse().unwrap()).unwrap()["name"],
        json!("E2E Workshop")
    );

    // Link-only person flows: users that already exist, matched by email.
    let emp_user = zd.insert_user(json!({"name": "Eva Employee", "email": "eva@e2e.test"}));
    let cp_user = zd.insert_user(json!({"name": "Carl Contact", "email": "carl@e2e.test"}));
    let users_before = zd.all(Kind::User).len();
    let employee = po.seed(
        "Employees",
        json!({"FirstName": "Eva", "LastName": "Employee", "EmailAddress": "eva@e2e.test", "DepartmentId": dept_id}),
    );
    let person = po.seed(
        "ContactPersons",
        json!({"ContactId": supplier_id, "FirstName": "Carl", "LastName": "Contact", "EmailAddress": "carl@e2e.test"}),
    );
    let emp_user_id = emp_user["id"].as_u64().unwrap();
    let cp_user_id = cp_user["id"].as_u64().unwrap();
    assert_eq!(
        h.linked_target(
            "poweroffice.Employees->zendesk.Users",
            &employee["Id"].as_i64().unwrap().to_string()
        )
        .await,
        emp_user_id.to_string()
    );
    assert_eq!(
        h.linked_target(
            "poweroffice.Contactperson->zendesk.Users",
            &format!("{supplier_id}:{}", person["Id"].as_i64().unwrap())
        )
        .await,
        cp_user_id.to_string()
    );
    // The references arrive translated: DepartmentId -> the department's organization, partyId
    // (the supplier) -> the supplier's organization.
    eventually(
        "the employee's organization_id",
        WAIT,
        probe(|| {
            (zd.user(emp_user_id)?["organization_id"] == json!(dept_org.parse::<u64>().unwrap()))
                .then_some(())
        }),
    )
    .await;
    eventually(
        "the contact person's organization_id",
        WAIT,
        probe(|| {
            (zd.user(cp_user_id)?["organization_id"] == json!(supplier_org.parse::<u64>().unwrap()))
                .then_some(())
        }),
    )
    .await;
    assert_eq!(zd.all(Kind::User).len(), users_before, "no user created");

    // Moving the employee's user to another department's organization in Zendesk comes back
    // as the employee's `DepartmentId`, translated to that department. A contact person's owner
    // is fixed at creation (`partyId` syncs to the target only): moving its user does not
    // change its `ContactId`.
    let client = h.zendesk();
    let dept2 = po.seed("Departments", json!({"Name": "E2E Office"}));
    let dept2_id = dept2["Id"].as_i64().unwrap();
    let dept2_org = h
        .linked_target(
            "poweroffice.Departments->zendesk.Organizations",
            &dept2_id.to_string(),
        )
        .await;
    let employee_id = employee["Id"].as_i64().unwrap();
    client
        .update(
            "Users",
            &emp_user_id.to_string(),
            &obj(json!({"organization_id": dept2_org.parse::<u64>().unwrap()})),
        )
        .await
        .unwrap();
    let cp_user_seen = h.log_entries("zendesk", &cp_user_id.to_string()).await;
    client
        .update(
            "Users",
            &cp_user_id.to_string(),
            &obj(json!({"organization_id": dept_org.parse::<u64>().unwrap()})),
        )
        .await
        .unwrap();
    eventually(
        "the employee's new DepartmentId",
        WAIT,
        probe(|| {
            (id_text(&po.get("Employees", employee_id)?["DepartmentId"]) == dept2_id.to_string())
                .then_some(())
        }),
    )
    .await;

    // Renames in Zendesk come back to the supplier and the department.
    client
        .update(
            "Organizations",
            &supplier_org,
            &obj(json!({"name": "E2E Supplier Renamed AS"})),
        )
        .await
        .unwrap();
    client
        .update(
            "Organizations",
            &dept_org,
            &obj(json!({"name": "E2E Workshop Renamed"})),
        )
        .await
        .unwrap();
    eventually(
        "the renames to reach PowerOffice",
        WAIT,
        probe(|| {
            let s = po.get("Suppliers", supplier_id)?;
            let d = po.get("Departments", dept_id)?;
            (s["LegalName"] == json!("E2E Supplier Renamed AS")
                && d["Name"] == json!("E2E Workshop Renamed"))
            .then_some(())
        }),
    )
    .await;
    h.assert_settles().await;
    assert!(
        h.log_entries("zendesk", &cp_user_id.to_string()).await > cp_user_seen,
        "the contact person's user change was never synced"
    );
    let person_now = po
        .get("ContactPersons", person["Id"].as_i64().unwrap())
        .unwrap();
    assert_eq!(person_now["ContactId"], json!(supplier_id));
    h.stop().await;
}
