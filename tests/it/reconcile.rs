//! Reconciliation and the first connection (issue 17): webhook-driven types are also read on
//! `reconcile_interval`, from cursors that start at each system's first connection, against the
//! simulators and a real PostgreSQL.
//!
//! - `first_poll_of_a_prepopulated_system_creates_nothing`: every poll and reconciliation stream
//!   of the service, started on systems that already hold records, emits nothing; a record made
//!   afterwards is found.
//! - `dropped_webhooks_converge_within_one_reconcile_interval`: Zendesk drops 10% of webhooks;
//!   every organization still gets its counterpart.
//! - `a_delivered_webhooks_change_is_not_synced_twice`: the reconciliation round re-reads a change
//!   whose webhook arrived, and writes nothing.
//! - `an_exact_delete_found_in_sync_deleted_ends_the_link`: the delete webhook is lost; the link
//!   ends from `sync/Deleted`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tether::config::{Config, Source};
use tether::domain::SystemId;
use tether::polling::{self, poll_once, PollKind};
use tether::simulators::kit::Faults;
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, probe, Service as Harness};

const WAIT: Duration = Duration::from_secs(60);

/// Zendesk's four export streams fit its 10 exports a minute at one round per 5 s only briefly;
/// the tests need one or two rounds.
const LAYER: &str = r#"
[zendesk]
reconcile_interval = "5s"
[exactonline]
reconcile_interval = "3s"
[customerp]
reconcile_interval = "3s"
[custompms]
reconcile_interval = "3s"
"#;

#[tokio::test]
async fn first_poll_of_a_prepopulated_system_creates_nothing() {
    let db = tether::testing::database().await;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Nothing listens at the webhook target: this test only polls.
    let sims = tether::sandbox::Simulators::start(loopback, "http://127.0.0.1:9")
        .await
        .unwrap();
    let mut source = Source::empty();
    let toml = sims.config_toml("127.0.0.1:9".parse().unwrap(), &std::env::temp_dir(), "1s");
    source.add_toml(&toml, Path::new("test.toml")).unwrap();
    let config = Config::from_source(source).unwrap();
    let (registry, _) = tether::registry::load(None).unwrap();

    // The systems' past: records made before Tether ever connected.
    sims.seed();
    sims.zendesk
        .insert_organization(json!({"name": "Existing Org AS"}));
    sims.customerp.insert(
        "customer",
        crate::support::obj(json!({"name": "Existing Customer"})),
        None,
    );
    sims.zendesk
        .insert_user(json!({"name": "Existing User", "email": "existing@example.com"}));
    sims.zendesk.insert_ticket(json!({
        "subject": "Existing ticket",
        "comment": {"body": "An old question", "public": true}
    }));
    sims.crmoffice.insert(
        "contacts",
        crate::support::obj(json!({"firstName": "Old", "lastName": "Contact"})),
        None,
    );
    // Zendesk's export cursors count whole seconds: the first connection comes in a later one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    tether::service::record_first_connections(&config, &db.pool)
        .await
        .unwrap();

    let connectors = tether::service::build_connectors(&config, &db.pool).unwrap();
    let specs = tether::service::poller_specs(&config, &registry, &connectors);
    let streams: Vec<(SystemId, String)> = specs
        .iter()
        .map(|s| (s.connector.system(), s.entity_type.clone()))
        .collect();
    for wanted in [
        (SystemId::Zendesk, "Organizations"),
        (SystemId::Zendesk, "Tickets"),
        (SystemId::ExactOnline, "Accounts"),
        (SystemId::ExactOnline, "sync/Deleted"),
        (SystemId::PowerOffice, "Customers"),
        (SystemId::CrmOffice, "Contacts"),
        (SystemId::Zendesk, "Users"),
        (SystemId::CustomErp, "Customer"),
    ] {
        assert!(
            streams.contains(&(wanted.0, wanted.1.to_owned())),
            "{wanted:?} is read on an interval: {streams:?}"
        );
    }
    let zendesk = specs
        .iter()
        .find(|s| s.connector.system() == SystemId::Zendesk)
        .unwrap();
    assert_eq!(zendesk.kind, PollKind::Reconcile);

    let mut first = BTreeMap::new();
    for spec in &specs {
        let report = poll_once(&db.pool, spec).await.unwrap();
        first.insert(
            (spec.connector.system(), spec.entity_type.clone()),
            report.emitted,
        );
    }
    assert!(
        first.values().all(|n| *n == 0),
        "the first round emits nothing of the past: {first:?}"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 0);

    // What changes after the first connection is found.
    sims.zendesk
        .insert_organization(json!({"name": "New Org AS"}));
    sims.zendesk.insert_ticket(json!({"subject": "New ticket"}));
    let account = sims.exact.seed_account(json!({"Name": "New Account BV"}));
    sims.poweroffice
        .seed("Customers", json!({"Name": "Ny Kunde AS"}));
    let mut second = BTreeMap::new();
    for spec in &specs {
        let report = poll_once(&db.pool, spec).await.unwrap();
        second.insert(
            (spec.connector.system(), spec.entity_type.clone()),
            report.emitted,
        );
    }
    for stream in [
        (SystemId::Zendesk, "Organizations"),
        (SystemId::Zendesk, "Tickets"),
        (SystemId::ExactOnline, "Accounts"),
        (SystemId::PowerOffice, "Customers"),
    ] {
        assert_eq!(
            second[&(stream.0, stream.1.to_owned())],
            1,
            "{stream:?}: {second:?}"
        );
    }
    let account_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE system = 'exactonline' AND record_id = $1",
    )
    .bind(&account)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(account_events, 1);
}

fn set_drop(control: &tether::simulators::kit::SimControl, share: f64) {
    control.set_faults(Faults {
        drop_webhooks: share,
        ..control.faults()
    });
}

#[tokio::test]
async fn dropped_webhooks_converge_within_one_reconcile_interval() {
    let h = Harness::start_layered(None, "", LAYER).await;
    set_drop(h.sims.zendesk.control(), 0.1);
    // At least 40 organizations, in batches of 10 until one of their webhooks was dropped (at 10%
    // that is nearly always in the first 40; the batches keep the test from depending on luck).
    let mut created = 0;
    let stats = loop {
        for _ in 0..10 {
            let name = format!("Drift {created} AS");
            let answer = h
                .sims
                .zendesk
                .create(Kind::Organization, json!({"name": name}));
            assert!(answer.status().is_success());
            created += 1;
        }
        // Every created webhook has left the simulator (sent or dropped) before counting.
        let stats = eventually(
            "the simulator's webhooks to be out",
            WAIT,
            probe(|| {
                let stats = h.sims.zendesk.webhook_stats();
                (stats.delivered + stats.dropped + stats.failed >= created).then_some(stats)
            }),
        )
        .await;
        if (created >= 40 && stats.dropped > 0) || created >= 200 {
            break stats;
        }
    };
    assert!(stats.dropped > 0, "some webhooks were dropped: {stats:?}");
    let ids: Vec<String> = h
        .sims
        .zendesk
        .all(Kind::Organization)
        .iter()
        .map(|org| org["id"].as_u64().unwrap().to_string())
        .collect();
    assert_eq!(ids.len() as u64, created);

    let flow = "zendesk.Organizations->customerp.Customer";
    eventually(
        "a counterpart for every organization",
        // One interval (5 s), the export budget and the queue: well inside this.
        Duration::from_secs(45),
        || async {
            for id in &ids {
                h.active_link(flow, id).await?;
            }
            Some(())
        },
    )
    .await;
    // The organizations whose webhook was dropped were reached by reconciliation alone.
    let by_webhook: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT record_id) FROM events WHERE system = 'zendesk' \
         AND entity_type = 'Organizations' AND delivery_id NOT LIKE 'poll:%'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(
        (by_webhook as u64) < created,
        "some organizations never had a webhook event: {by_webhook} did ({stats:?})"
    );
    assert_eq!(
        h.sims.customerp.len("customer") as u64,
        created,
        "exactly one counterpart each"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_delivered_webhooks_change_is_not_synced_twice() {
    let h = Harness::start_layered(None, "", LAYER).await;
    let created = h
        .sims
        .zendesk
        .create(Kind::Organization, json!({"name": "Once AS"}));
    assert!(created.status().is_success());
    let org_id = h.sims.zendesk.all(Kind::Organization)[0]["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let flow = "zendesk.Organizations->customerp.Customer";
    eventually("the link", WAIT, || h.active_link(flow, &org_id)).await;

    // The reconciliation round reads the organization again and its job runs to the end.
    let reread: i64 = eventually("the reconciliation's event to be handled", WAIT, || async {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT e.id, count(l.id) FROM events e LEFT JOIN sync_log l ON l.event_id = e.id \
             WHERE e.system = 'zendesk' AND e.record_id = $1 AND e.delivery_id LIKE 'poll:%' \
             GROUP BY e.id",
        )
        .bind(&org_id)
        .fetch_optional(&h.db.pool)
        .await
        .unwrap();
        row.filter(|(_, logged)| *logged > 0).map(|(id, _)| id)
    })
    .await;
    let decisions: Vec<String> =
        sqlx::query_scalar("SELECT decision FROM sync_log WHERE event_id = $1")
            .bind(reread)
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    assert!(
        decisions.iter().all(|d| d != "created" && d != "updated"),
        "the re-read change is not synced again: {decisions:?}"
    );
    for sim in [&h.sims.customerp, &h.sims.custompms] {
        assert_eq!(sim.len("customer"), 1);
        assert_eq!(
            sim.control.count_method("POST"),
            1,
            "{:?}",
            sim.control.counters()
        );
        assert_eq!(
            sim.control.count_method("PATCH"),
            0,
            "{:?}",
            sim.control.counters()
        );
    }
    let cursor = polling::cursor(&h.db.pool, SystemId::Zendesk, "Organizations").await;
    assert!(
        cursor.unwrap().is_some(),
        "the reconciliation cursor is stored"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_exact_delete_found_in_sync_deleted_ends_the_link() {
    let h = Harness::start_layered(None, "", LAYER).await;
    let account = h.sims.exact.seed_account(json!({"Name": "Gone Soon BV"}));
    assert!(h
        .sims
        .exact
        .change_account(&account, json!({"Name": "Gone Soon Trading BV"})));
    let flow = "exactonline.Accounts->zendesk.Organizations";
    eventually("the link", WAIT, || h.active_link(flow, &account)).await;
    // The webhooks of the create and the rename are processed before the delete: a job still
    // waiting would read the deleted account and end the link itself (also rule 9, but not the
    // path this test is about).
    eventually("the account's jobs to finish", WAIT, || async {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs j JOIN events e ON e.id = j.event_id \
             WHERE e.system = 'exactonline' AND e.record_id = $1 \
             AND j.state IN ('ready', 'running')",
        )
        .bind(&account)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
        (unfinished == 0).then_some(())
    })
    .await;

    // The delete's webhook never arrives.
    set_drop(&h.sims.exact.control, 1.0);
    let dropped_before = h.sims.exact.webhook_stats().dropped;
    assert!(h.sims.exact.delete_account(&account));
    eventually(
        "the delete webhook to be dropped",
        WAIT,
        probe(|| (h.sims.exact.webhook_stats().dropped > dropped_before).then_some(())),
    )
    .await;
    eventually("the link to end", WAIT, || async {
        h.active_link(flow, &account).await.is_none().then_some(())
    })
    .await;
    let deleted_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE system = 'exactonline' AND record_id = $1 \
         AND action = 'deleted' AND delivery_id LIKE 'poll-deleted:%'",
    )
    .bind(&account)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(deleted_events, 1, "found in sync/Deleted");
    h.stop().await;
}

#[test]
fn reconcile_interval_defaults_to_15_minutes_and_refuses_zero() {
    let base =
        "[zendesk]\nbase_url = \"http://127.0.0.1:1\"\napi_token = \"t\"\nemail = \"a@b.c\"\n";
    let load = |extra: &str| {
        let mut source = Source::empty();
        source
            .add_toml(&format!("{base}{extra}"), Path::new("t.toml"))
            .unwrap();
        Config::from_source(source)
    };
    let config = load("").unwrap();
    assert_eq!(
        config.systems.reconcile.of(SystemId::Zendesk),
        Some(Duration::from_secs(15 * 60))
    );
    assert_eq!(config.systems.reconcile.of(SystemId::PowerOffice), None);
    let config = load("reconcile_interval = \"2m\"\n").unwrap();
    assert_eq!(config.systems.reconcile.zendesk, Duration::from_secs(120));
    let error = load("reconcile_interval = \"0s\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("zendesk.reconcile_interval") && error.contains("longer than zero"),
        "{error}"
    );
    let error = load("reconcile_interval = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("zendesk.reconcile_interval"), "{error}");
}
