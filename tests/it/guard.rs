//! Issue 20, the guard against mass changes (docs/guard.md), against a running Tether with the
//! simulators: a burst of renames past `max_writes` holds exactly the writes past it and sends
//! none; a crash while they are held loses none; release sends them once, in order; discard sends
//! nothing and a later edit still syncs; undo restores the values from before and its echo does
//! not undo it.

use std::time::Duration;

use serde_json::{json, Value};
use tether::domain::{Action, ChangeEvent, RecordKey, SystemId};
use tether::guard::{held, undo, Guard, GuardSettings, PlannedWrite, Trip, Verdict, WriteItem};
use tether::queue::{ClaimedJob, JobPriority};
use tether::simulators::zendesk::Kind;
use tether::testing;

use crate::support::{eventually, Service};

const FLOW: &str = "zendesk.Organizations->customerp.Customer";
const WAIT: Duration = Duration::from_secs(60);

/// Organization names become Custom ERP customer names, both ways (shared with the admin tests).
use crate::admin::OVERLAY;

/// Eight creates and four renames fit; the ninth write of the window is the first held.
const GUARD: &str = "\n[guard]\nmax_writes = 12\n";
const ORGS: usize = 8;

/// Creates `count` organizations and waits for their customers; returns (org id, customer id).
async fn linked_orgs(h: &Service, prefix: &str, count: usize) -> Vec<(u64, String)> {
    let mut pairs = Vec::new();
    for i in 0..count {
        let created = h.sims.zendesk.create(
            Kind::Organization,
            json!({ "name": format!("{prefix} {i}") }),
        );
        assert!(created.status().is_success());
        let id = org_id(h, &format!("{prefix} {i}"));
        let key = id.to_string();
        let customer = eventually("the customer", WAIT, || h.active_link(FLOW, &key)).await;
        pairs.push((id, customer));
    }
    pairs
}

fn org_id(h: &Service, name: &str) -> u64 {
    h.sims
        .zendesk
        .all(Kind::Organization)
        .into_iter()
        .find(|o| o["name"] == json!(name))
        .and_then(|o| o["id"].as_u64())
        .unwrap()
}

fn rename(h: &Service, org: u64, name: &str) {
    let updated = h
        .sims
        .zendesk
        .update(Kind::Organization, org, json!({ "name": name }));
    assert!(updated.status().is_success());
}

fn customer_name(h: &Service, customer: &str) -> Value {
    h.sims.customerp.get("customer", customer).unwrap()["name"].clone()
}

fn erp_updates(h: &Service) -> u64 {
    h.sims.customerp.control.count_method("PATCH")
}

async fn held_rows(h: &Service) -> Vec<held::HeldWrite> {
    let flows = held::list(&h.db.pool, Some(FLOW)).await.unwrap();
    flows.into_iter().flat_map(|f| f.held).collect()
}

/// Jobs not finished yet (ready or running), so a test can wait for the queue to settle.
async fn unfinished_jobs(h: &Service) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state IN ('ready', 'running')")
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

async fn settled(h: &Service) {
    eventually("the queue drained", WAIT, || async {
        (unfinished_jobs(h).await == 0).then_some(())
    })
    .await;
}

/// Runs the `tether` binary with `args` against the service's database and registry.
async fn tether_cli(h: &Service, args: &[&str]) -> (bool, String) {
    use secrecy::ExposeSecret;
    let dir = std::env::temp_dir().join(format!("tether-guard-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: std::net::SocketAddr = h.base.trim_start_matches("http://").parse().unwrap();
    let overlay = h.config.registry.overlay.as_ref().unwrap();
    let config = h.sims.config_toml(listen, &dir, "1s")
        + &format!(
            "\n[registry]\noverlay = {:?}\n",
            overlay.display().to_string()
        );
    std::fs::write(dir.join("tether.toml"), config).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .arg("--config")
        .arg(dir.join("tether.toml"))
        .env("DATABASE_URL", h.db.url.expose_secret())
        .output()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        if out.status.success() { text } else { errors },
    )
}

/// Renames every org to "Renamed i" and waits until four were written and four are held.
async fn burst_past_the_threshold(h: &Service, pairs: &[(u64, String)]) {
    for (i, (org, _)) in pairs.iter().enumerate() {
        rename(h, *org, &format!("Renamed {i}"));
    }
    eventually("4 writes sent and 4 held", WAIT, || async {
        (held_rows(h).await.len() == 4 && erp_updates(h) == 4).then_some(())
    })
    .await;
    settled(h).await;
}

/// The value of `tether_guard_tripped` for the flow, as a scrape shows it.
async fn tripped_gauge(metrics: &str) -> Option<String> {
    tokio::time::sleep(tether::ops::metrics::GAUGE_REFRESH).await;
    let text = reqwest::get(metrics).await.ok()?.text().await.ok()?;
    let series = format!("tether_guard_tripped{{flow=\"{FLOW}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_burst_past_max_writes_holds_exactly_the_writes_past_it_and_release_sends_them_once() {
    let port = std::net::TcpListener::bind(crate::support::any_port())
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let config = format!("{GUARD}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut h = Service::start(Some(OVERLAY), &config).await;
    let pairs = linked_orgs(&h, "Guarded", ORGS).await;
    settled(&h).await;
    assert_eq!(erp_updates(&h), 0);

    burst_past_the_threshold(&h, &pairs).await;
    let held = held_rows(&h).await;
    assert!(held.iter().all(|w| w.property == "name" && !w.create));
    let renamed: Vec<_> = pairs
        .iter()
        .filter(|(_, c)| {
            customer_name(&h, c)
                .as_str()
                .unwrap()
                .starts_with("Renamed")
        })
        .collect();
    assert_eq!(
        renamed.len(),
        4,
        "exactly the writes before the threshold went out"
    );
    for w in &held {
        let customer = w.record.rsplit('/').next().unwrap();
        assert_eq!(
            w.old,
            Some(customer_name(&h, customer)),
            "old is the customer's value now"
        );
        assert!(w
            .new
            .as_ref()
            .unwrap()
            .as_str()
            .unwrap()
            .starts_with("Renamed"));
    }
    let trip = &held::list(&h.db.pool, None).await.unwrap()[0];
    assert!(trip.reason.contains("max_writes"), "{}", trip.reason);
    eventually("the trip in the metrics", WAIT, || async {
        (tripped_gauge(&metrics).await.as_deref() == Some("1")).then_some(())
    })
    .await;

    // While tripped, a held record changes again: both events are held, in order.
    let (late_org, late_customer) = pairs
        .iter()
        .find(|(_, c)| {
            !customer_name(&h, c)
                .as_str()
                .unwrap()
                .starts_with("Renamed")
        })
        .cloned()
        .unwrap();
    rename(&h, late_org, "Renamed again");
    eventually("the second rename held too", WAIT, || async {
        (held_rows(&h).await.len() == 5).then_some(())
    })
    .await;
    settled(&h).await;
    assert_eq!(erp_updates(&h), 4, "nothing held was sent");

    // A crash (like kill -9) and a restart lose none of the held writes.
    h.kill();
    let (registry, _) = tether::registry::load(h.config.registry.overlay.as_deref()).unwrap();
    h.restart(registry);
    assert_eq!(held_rows(&h).await.len(), 5);

    let released = held::release(&h.db.pool, FLOW).await.unwrap();
    assert_eq!((released.writes, released.events), (5, 5));
    eventually("every customer renamed", WAIT, || async {
        pairs
            .iter()
            .all(|(_, c)| {
                customer_name(&h, c)
                    .as_str()
                    .unwrap()
                    .starts_with("Renamed")
            })
            .then_some(())
    })
    .await;
    settled(&h).await;
    assert_eq!(customer_name(&h, &late_customer), json!("Renamed again"));
    assert_eq!(
        erp_updates(&h),
        8,
        "each held record written once, with its latest value"
    );
    assert!(held::list(&h.db.pool, None).await.unwrap().is_empty());
    eventually("the release in the metrics", WAIT, || async {
        (tripped_gauge(&metrics).await.as_deref() == Some("0")).then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn discard_sends_nothing_and_a_later_edit_still_syncs() {
    let h = Service::start(Some(OVERLAY), GUARD).await;
    let pairs = linked_orgs(&h, "Discarded", ORGS).await;
    settled(&h).await;
    burst_past_the_threshold(&h, &pairs).await;
    let before: Vec<Value> = pairs.iter().map(|(_, c)| customer_name(&h, c)).collect();

    // The operator reviews what is held: the JSON the issue specifies.
    let (ok, out) = tether_cli(&h, &["guard", "list", "--flow", FLOW, "--json"]).await;
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let flows = listed["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0]["flow"], json!(FLOW));
    assert!(flows[0]["tripped_at"].is_string() && flows[0]["reason"].is_string());
    let listed_held = flows[0]["held"].as_array().unwrap();
    assert_eq!(listed_held.len(), 4);
    for w in listed_held {
        assert!(
            w["record"]
                .as_str()
                .unwrap()
                .starts_with("customerp/Customer/"),
            "{w}"
        );
        assert_eq!(w["property"], json!("name"));
        assert!(w["old"].is_string() && w["new"].is_string(), "{w}");
    }
    let (ok, out) = tether_cli(&h, &["guard", "release", "no.Such->flow.X"]).await;
    assert!(
        !ok && out.contains("is not a dataflow of the registry"),
        "{out}"
    );

    let (ok, out) = tether_cli(&h, &["guard", "discard", FLOW]).await;
    assert!(ok && out.contains("discarded 4 held write(s)"), "{out}");
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_log WHERE flow_id = $1 AND decision = 'discarded'",
    )
    .bind(FLOW)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(logged, 4, "each discarded write is recorded");
    tokio::time::sleep(Duration::from_secs(2)).await;
    settled(&h).await;
    assert_eq!(erp_updates(&h), 4, "nothing was sent");
    let after: Vec<Value> = pairs.iter().map(|(_, c)| customer_name(&h, c)).collect();
    assert_eq!(before, after);
    assert!(matches!(
        held::discard(&h.db.pool, FLOW).await,
        Err(held::SettleError::NotTripped(_))
    ));

    // A later real edit of a record whose write was discarded syncs as usual.
    let (org, customer) = pairs
        .iter()
        .find(|(_, c)| {
            !customer_name(&h, c)
                .as_str()
                .unwrap()
                .starts_with("Renamed")
        })
        .cloned()
        .unwrap();
    rename(&h, org, "Edited for real");
    eventually("the edit synced", WAIT, || async {
        (customer_name(&h, &customer) == json!("Edited for real")).then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn undo_restores_the_values_from_before_and_its_echo_does_not_undo_it() {
    let h = Service::start(Some(OVERLAY), "").await;
    let pairs = linked_orgs(&h, "Original", 3).await;
    settled(&h).await;
    let since = chrono::Utc::now();
    for (i, (org, _)) in pairs.iter().enumerate() {
        rename(&h, *org, &format!("Mass renamed {i}"));
    }
    eventually("the renames synced", WAIT, || async {
        pairs
            .iter()
            .all(|(_, c)| customer_name(&h, c).as_str().unwrap().starts_with("Mass"))
            .then_some(())
    })
    .await;
    settled(&h).await;
    // Someone fixes one customer by hand before the undo: undo leaves it alone.
    let (_, fixed) = &pairs[2];
    let hand = crate::support::obj(json!({ "name": "Fixed by hand" }));
    h.sims.customerp.touch("customer", fixed, hand, None);

    let connectors = tether::service::build_connectors(&h.config, &h.db.pool).unwrap();
    let (registry, _) = tether::registry::load(h.config.registry.overlay.as_deref()).unwrap();
    let flow = registry
        .dataflows
        .iter()
        .find(|f| f.id == FLOW)
        .unwrap()
        .clone();
    let plan = undo::plan(&h.db.pool, &connectors, &flow, since)
        .await
        .unwrap();
    let restore: Vec<_> = plan
        .items
        .iter()
        .filter(|i| i.action == undo::Action::Restore)
        .collect();
    assert_eq!(restore.len(), 2, "{plan:?}");
    assert!(plan
        .items
        .iter()
        .any(|i| matches!(i.action, undo::Action::ChangedSince { .. })));
    let done = undo::carry_out(&h.db.pool, &connectors, &flow, &plan)
        .await
        .unwrap();
    assert_eq!((done.records, done.values), (2, 2));
    for (i, (_, customer)) in pairs.iter().take(2).enumerate() {
        assert_eq!(customer_name(&h, customer), json!(format!("Original {i}")));
    }
    // The undo's echo arrives and is processed; the two-way flow carries the restored names
    // back to Zendesk like any edit, and the customers keep them.
    for (i, (org, _)) in pairs.iter().take(2).enumerate() {
        let want = json!(format!("Original {i}"));
        eventually("the org restored too", WAIT, || async {
            let name = h.sims.zendesk.organization(*org).unwrap()["name"].clone();
            (name == want).then_some(())
        })
        .await;
    }
    settled(&h).await;
    for (i, (_, customer)) in pairs.iter().take(2).enumerate() {
        assert_eq!(customer_name(&h, customer), json!(format!("Original {i}")));
    }
    assert_eq!(customer_name(&h, fixed), json!("Fixed by hand"));
    h.stop().await;
}

#[tokio::test]
async fn one_value_given_to_too_many_records_trips_max_same_value() {
    // Zendesk keeps organization names unique, so the shared value is a custom field (whose
    // change Zendesk announces as `custom_field_changed`).
    let overlay = OVERLAY.replace(
        "[[rule]]",
        "[[dataflow.property]]\nsource = \"organization_fields.region\"\ntarget = \"region\"\n\
         type = \"string\"\n\n[[rule]]",
    );
    let h = Service::start(Some(&overlay), "\n[guard]\nmax_same_value = 3\n").await;
    let pairs = linked_orgs(&h, "Distinct", 5).await;
    settled(&h).await;
    for (org, _) in &pairs {
        let noted = h.sims.zendesk.update(
            Kind::Organization,
            *org,
            json!({ "organization_fields": { "region": "Imported by a faulty script" } }),
        );
        assert!(noted.status().is_success());
    }
    eventually("3 sent and 2 held", WAIT, || async {
        (held_rows(&h).await.len() == 2 && erp_updates(&h) == 3).then_some(())
    })
    .await;
    settled(&h).await;
    assert_eq!(erp_updates(&h), 3);
    let trip = &held::list(&h.db.pool, Some(FLOW)).await.unwrap()[0];
    assert!(
        trip.reason.contains("max_same_value") && trip.reason.contains("`region`"),
        "{}",
        trip.reason
    );
    h.stop().await;
}

/// A live job of one Zendesk organization (the guard reads its event id and priority).
fn live_job(n: i64, org: &str) -> ClaimedJob {
    ClaimedJob {
        job_id: n,
        event_id: n,
        event: ChangeEvent {
            record: RecordKey {
                system: SystemId::Zendesk,
                entity_type: "Organizations".into(),
                record_id: org.into(),
            },
            action: Action::Updated,
            occurred_at: None,
            delivery_id: format!("guard-test-{n}"),
        },
        attempt: 1,
        priority: JobPriority::Live,
    }
}

/// A write of a new, unique customer name for organization `org`.
fn name_write(org: &str, is_create: bool) -> PlannedWrite {
    PlannedWrite {
        link_id: None,
        is_create,
        items: vec![WriteItem {
            record: format!("zendesk/Organizations/{org}"),
            side: "target",
            property: "name".into(),
            old: None,
            new: json!(format!("Name of {org}")),
        }],
    }
}

#[tokio::test]
async fn creates_never_count_as_linked_records_changed_and_updates_past_the_share_trip_it() {
    let db = testing::database().await;
    let (registry, _) = tether::registry::load(None).unwrap();
    let flow = registry.dataflows.iter().find(|f| f.id == FLOW).unwrap();
    sqlx::query(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id) SELECT $1, 'zendesk', 'Organizations', g::text, 'customerp', \
         'Customer', 'c' || g FROM generate_series(1, 100) g",
    )
    .bind(FLOW)
    .execute(&db.pool)
    .await
    .unwrap();
    let guard = Guard::new(db.pool.clone(), GuardSettings::default());
    // 130 new organizations against 100 links: their creates change no linked record, so the
    // share of linked records changed (default 0.2) stays at none; they are under max_writes.
    for n in 0..130 {
        let org = format!("new{n}");
        let verdict = guard
            .admit(flow, &live_job(n, &org), &name_write(&org, true))
            .await
            .unwrap();
        assert_eq!(verdict, Verdict::Send, "create {n}");
    }
    // Updates of linked organizations: 20 of 100 is the share allowed, the 21st passes it.
    for n in 1..=20 {
        let org = n.to_string();
        let verdict = guard
            .admit(flow, &live_job(1000 + n, &org), &name_write(&org, false))
            .await
            .unwrap();
        assert_eq!(verdict, Verdict::Send, "update {n}");
    }
    let verdict = guard
        .admit(flow, &live_job(1021, "21"), &name_write("21", false))
        .await
        .unwrap();
    assert!(
        matches!(
            verdict,
            Verdict::Held {
                tripped: Some(Trip::ChangedFraction {
                    changed: 21,
                    links: 100,
                    ..
                })
            }
        ),
        "{verdict:?}"
    );
}
