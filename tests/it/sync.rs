//! The sync engine against a real PostgreSQL with in-memory connectors, driven deterministically by
//! calling `handle` on each job (no workers). One test or more per rule of docs/sync-rules.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Row;
use tether::connectors::memory::{Failure, MemoryConnector};
use tether::connectors::{Connector, Record};
use tether::domain::{Action, ChangeEvent, RecordKey, SystemId};
use tether::queue::{self, ClaimedJob, JobHandler, JobOutcome, NewJob};
use tether::registry::{
    Dataflow, EntityRef, FlowSwitches, MergeCriterion, PropertyMapping, PropertyRule, Reference,
    Registry, Resolution,
};
use tether::sync::SyncEngine;
use tether::testing::{self, TestDb};

use crate::support::obj;

use SystemId::{CrmOffice, CustomErp, CustomPms, PowerOffice, Zendesk};

// ---- registry builders -------------------------------------------------------------------

fn prop(source: &str, target: &str) -> PropertyMapping {
    PropertyMapping {
        source: source.into(),
        target: target.into(),
        data_type: "string".into(),
        reference: None,
        sync: Default::default(),
        note: None,
    }
}

fn reference(
    source: &str,
    target: &str,
    source_types: &[&str],
    target_type: &str,
) -> PropertyMapping {
    PropertyMapping {
        reference: Some(Reference {
            source_types: source_types.iter().map(|s| s.to_string()).collect(),
            target_type: target_type.into(),
        }),
        ..prop(source, target)
    }
}

fn flow(
    source: (SystemId, &str),
    target: (SystemId, &str),
    properties: Vec<PropertyMapping>,
) -> Dataflow {
    Dataflow {
        id: format!("{}.{}->{}.{}", source.0, source.1, target.0, target.1),
        source: EntityRef {
            system: source.0,
            entity_type: source.1.into(),
        },
        target: EntityRef {
            system: target.0,
            entity_type: target.1.into(),
        },
        properties,
        merge_criteria: Vec::new(),
        switches: FlowSwitches::default(),
        guard: Default::default(),
    }
}

fn customers_to_orgs() -> Dataflow {
    flow(
        (PowerOffice, "Customers"),
        (Zendesk, "Organizations"),
        vec![prop("Name", "name"), prop("WebsiteUrl", "url")],
    )
}

/// The seed's flows around PowerOffice customers and Zendesk organizations and users.
fn seed_like() -> Vec<Dataflow> {
    vec![
        customers_to_orgs(),
        flow(
            (PowerOffice, "Suppliers"),
            (Zendesk, "Organizations"),
            vec![prop("LegalName", "name"), prop("WebsiteUrl", "url")],
        ),
        flow(
            (PowerOffice, "Contactperson"),
            (Zendesk, "Users"),
            vec![
                prop("Name", "name"),
                reference(
                    "partyId",
                    "organization_id",
                    &["Customers", "Suppliers"],
                    "Organizations",
                ),
            ],
        ),
        flow(
            (Zendesk, "Organizations"),
            (CustomErp, "Customer"),
            vec![prop("name", "name")],
        ),
        flow(
            (Zendesk, "Organizations"),
            (CustomPms, "Customer"),
            vec![prop("name", "name")],
        ),
    ]
}

// ---- harness ------------------------------------------------------------------------------

struct Harness {
    db: TestDb,
    engine: Arc<SyncEngine>,
    mem: HashMap<SystemId, Arc<MemoryConnector>>,
}

impl Harness {
    async fn new(flows: Vec<Dataflow>, systems: &[SystemId]) -> Harness {
        Self::with_registry(
            Registry {
                dataflows: flows,
                ..Registry::default()
            },
            systems,
        )
        .await
    }

    async fn with_registry(registry: Registry, systems: &[SystemId]) -> Harness {
        let db = testing::database().await;
        let mut mem = HashMap::new();
        let mut connectors: HashMap<SystemId, Arc<dyn Connector>> = HashMap::new();
        for &s in systems {
            let c = Arc::new(MemoryConnector::new(s));
            connectors.insert(s, c.clone());
            mem.insert(s, c);
        }
        let engine = Arc::new(SyncEngine::new(
            db.pool.clone(),
            Arc::new(registry),
            connectors,
        ));
        Harness { db, engine, mem }
    }

    fn m(&self, s: SystemId) -> &MemoryConnector {
        &self.mem[&s]
    }

    fn reset_counters(&self) {
        for c in self.mem.values() {
            c.reset_counters();
        }
    }

    /// Stores an event and its job as intake would, and returns the job as a worker would claim it.
    async fn event(&self, system: SystemId, entity_type: &str, id: &str) -> ClaimedJob {
        self.event_of(system, entity_type, id, Action::Updated)
            .await
    }

    /// [`Harness::event`] with the vendor's action.
    async fn event_of(
        &self,
        system: SystemId,
        entity_type: &str,
        id: &str,
        action: Action,
    ) -> ClaimedJob {
        self.delivered(system, entity_type, id, action, None).await
    }

    /// [`Harness::event_of`] whose delivery gives `occurred_at` (for a custom system: the
    /// record's `updated_at` its webhook carries).
    async fn delivered(
        &self,
        system: SystemId,
        entity_type: &str,
        id: &str,
        action: Action,
        occurred_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> ClaimedJob {
        let event = ChangeEvent {
            record: RecordKey {
                system,
                entity_type: entity_type.into(),
                record_id: id.into(),
            },
            action,
            occurred_at,
            delivery_id: uuid::Uuid::new_v4().to_string(),
        };
        let mut tx = self.db.pool.begin().await.unwrap();
        let event_id: i64 = sqlx::query_scalar(
            "INSERT INTO events (system, entity_type, record_id, action, delivery_id, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(system.as_str())
        .bind(entity_type)
        .bind(id)
        .bind(action.as_str())
        .bind(&event.delivery_id)
        .bind(occurred_at)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        queue::enqueue(
            &mut tx,
            &[NewJob {
                event_id,
                event: &event,
            }],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let job_id: i64 = sqlx::query_scalar("SELECT id FROM jobs WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        ClaimedJob {
            job_id,
            event_id,
            event,
            attempt: 1,
            priority: Default::default(),
        }
    }

    /// Marks `job` claimed with a live lease, as a worker running it would have it.
    async fn mark_running(&self, job: &ClaimedJob) {
        sqlx::query(
            "UPDATE jobs SET state = 'running', lease_until = now() + interval '1 minute' \
             WHERE id = $1",
        )
        .bind(job.job_id)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    /// Handles one job; a finished job leaves the table (standing in for the queue's completion).
    async fn handle(&self, job: &ClaimedJob) -> JobOutcome {
        let outcome = self.engine.handle(job).await;
        if matches!(outcome, JobOutcome::Done | JobOutcome::Dead { .. }) {
            sqlx::query("DELETE FROM jobs WHERE id = $1")
                .bind(job.job_id)
                .execute(&self.db.pool)
                .await
                .unwrap();
        }
        outcome
    }

    /// Runs every job in the table (including the ones the engine enqueues) until none is left,
    /// in id order, re-running `Later`/`Retry` ones after the others. Returns the outcomes.
    async fn drain(&self) -> Vec<(RecordKey, JobOutcome)> {
        let mut outcomes = Vec::new();
        for _round in 0..20 {
            let rows = sqlx::query(
                "SELECT j.id, j.event_id, e.system, e.entity_type, e.record_id, e.delivery_id \
                 FROM jobs j JOIN events e ON e.id = j.event_id ORDER BY j.id",
            )
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
            if rows.is_empty() {
                return outcomes;
            }
            for row in rows {
                let system: String = row.get("system");
                let job = ClaimedJob {
                    job_id: row.get("id"),
                    event_id: row.get("event_id"),
                    event: ChangeEvent {
                        record: RecordKey {
                            system: system.parse().unwrap(),
                            entity_type: row.get("entity_type"),
                            record_id: row.get("record_id"),
                        },
                        action: Action::Updated,
                        occurred_at: None,
                        delivery_id: row.get("delivery_id"),
                    },
                    attempt: 1,
                    priority: Default::default(),
                };
                let outcome = self.handle(&job).await;
                outcomes.push((job.event.record.clone(), outcome));
            }
        }
        panic!("jobs still pending after 20 rounds: {outcomes:?}");
    }

    async fn run(&self, system: SystemId, entity_type: &str, id: &str) -> JobOutcome {
        let job = self.event(system, entity_type, id).await;
        let outcome = self.handle(&job).await;
        self.drain().await;
        outcome
    }

    async fn active_links(&self) -> Vec<(String, String, String)> {
        sqlx::query_as(
            "SELECT flow_id, source_id, target_id FROM links WHERE state = 'active' ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn decisions(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT decision FROM sync_log ORDER BY id")
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn detail_of(&self, decision: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT coalesce(detail, '') FROM sync_log WHERE decision = $1 ORDER BY id",
        )
        .bind(decision)
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    /// A PowerOffice customer synced to a Zendesk organization; returns both records.
    async fn linked_customer(&self, name: &str, url: &str) -> (Record, Record) {
        let c = self
            .m(PowerOffice)
            .insert("Customers", obj(json!({"Name": name, "WebsiteUrl": url})));
        assert_eq!(
            self.run(PowerOffice, "Customers", &c.id).await,
            JobOutcome::Done
        );
        let links = self.active_links().await;
        let (_, _, org_id) = links
            .iter()
            .find(|l| l.1 == c.id && l.0.starts_with("poweroffice.Customers"))
            .expect("customer linked")
            .clone();
        let org = self.m(Zendesk).get("Organizations", &org_id).unwrap();
        (c, org)
    }
}

fn name_of(r: &Record) -> Value {
    r.fields
        .get("name")
        .or_else(|| r.fields.get("Name"))
        .cloned()
        .unwrap_or(Value::Null)
}

// ---- rule 1 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule1_creation_follows_the_flow_and_is_not_created_back() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;
    assert_eq!(org.fields["name"], json!("Acme AS"));
    assert_eq!(org.fields["url"], json!("https://acme.no"));
    assert_eq!(h.active_links().await.len(), 1);
    assert_eq!(h.active_links().await[0].1, c.id);

    // An organization created natively in Zendesk is not created back in PowerOffice.
    let native = h
        .m(Zendesk)
        .insert("Organizations", obj(json!({"name": "Zendesk only"})));
    assert_eq!(
        h.run(Zendesk, "Organizations", &native.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(PowerOffice).all("Customers").len(), 1);
    assert_eq!(h.m(PowerOffice).count("create"), 0);
    assert!(h
        .decisions()
        .await
        .contains(&"not_created_back".to_string()));
}

#[tokio::test]
async fn rule1_merge_criteria_link_the_existing_record_instead_of_creating() {
    let mut f = customers_to_orgs();
    f.merge_criteria = vec![MergeCriterion {
        source: "Name".into(),
        target: "name".into(),
    }];
    let h = Harness::new(vec![f], &[PowerOffice, Zendesk]).await;
    let existing = h.m(Zendesk).insert(
        "Organizations",
        obj(json!({"name": "Acme AS", "url": "https://old.acme.no"})),
    );
    let c = h.m(PowerOffice).insert(
        "Customers",
        obj(json!({"Name": "Acme AS", "WebsiteUrl": "https://acme.no"})),
    );
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(Zendesk).count("create"), 0);
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
    assert_eq!(h.active_links().await[0].2, existing.id);
    assert!(h
        .decisions()
        .await
        .contains(&"linked_by_merge_criteria".to_string()));
    // No base yet: the later record (the customer) wins the differing url.
    assert_eq!(
        h.m(Zendesk)
            .get("Organizations", &existing.id)
            .unwrap()
            .fields["url"],
        json!("https://acme.no")
    );
}

#[tokio::test]
async fn rule4_merge_linked_pair_fills_empty_values_from_the_other_side() {
    let mut f = customers_to_orgs();
    f.merge_criteria = vec![MergeCriterion {
        source: "Name".into(),
        target: "name".into(),
    }];
    let h = Harness::new(vec![f], &[PowerOffice, Zendesk]).await;
    let c = h.m(PowerOffice).insert(
        "Customers",
        obj(json!({"Name": "Acme AS", "WebsiteUrl": "https://acme.no"})),
    );
    // The Zendesk record is newer but has no url: the customer's url still fills it.
    let org = h
        .m(Zendesk)
        .insert("Organizations", obj(json!({"name": "Acme AS"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["url"],
        json!("https://acme.no")
    );
    assert_eq!(h.m(PowerOffice).count("update"), 0);
}

#[tokio::test]
async fn rule1_flows_both_ways_make_one_counterpart() {
    let back = flow(
        (Zendesk, "Organizations"),
        (PowerOffice, "Customers"),
        vec![prop("name", "Name")],
    );
    let h = Harness::new(vec![customers_to_orgs(), back], &[PowerOffice, Zendesk]).await;
    let (_, org) = h.linked_customer("Both Ways AS", "").await;
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(PowerOffice).all("Customers").len(), 1);
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
    assert!(h
        .decisions()
        .await
        .contains(&"linked_by_other_flow".to_string()));

    // A Zendesk-native organization does flow to PowerOffice through the reverse flow.
    let native = h
        .m(Zendesk)
        .insert("Organizations", obj(json!({"name": "Zendesk first"})));
    assert_eq!(
        h.run(Zendesk, "Organizations", &native.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(PowerOffice).all("Customers").len(), 2);
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 2);
}

#[tokio::test]
async fn rule1_no_match_and_creation_off_creates_nothing() {
    let mut f = customers_to_orgs();
    f.merge_criteria = vec![MergeCriterion {
        source: "Name".into(),
        target: "name".into(),
    }];
    f.switches.create_in_target = false;
    let h = Harness::new(vec![f], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Nobody"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert!(h.m(Zendesk).all("Organizations").is_empty());
    assert_eq!(h.decisions().await, vec!["no_match".to_string()]);
}

// ---- rule 2 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule2_updates_flow_both_ways_once_linked() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;

    h.m(Zendesk)
        .edit("Organizations", &org.id, obj(json!({"name": "Acme Group"})));
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("Acme Group")
    );

    h.m(PowerOffice).edit(
        "Customers",
        &c.id,
        obj(json!({"WebsiteUrl": "https://acme.com"})),
    );
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["url"],
        json!("https://acme.com")
    );
}

#[tokio::test]
async fn rule2_write_back_switch_off_keeps_the_source_untouched() {
    let mut f = customers_to_orgs();
    f.switches.write_back_to_source = false;
    let h = Harness::new(vec![f], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;
    h.m(Zendesk).edit(
        "Organizations",
        &org.id,
        obj(json!({"name": "Renamed in Zendesk"})),
    );
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("Acme AS")
    );
    assert_eq!(h.m(PowerOffice).count("update"), 0);
}

#[tokio::test]
async fn rule2_an_unwritable_side_is_skipped() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;
    h.m(Zendesk).make_read_only("Organizations");
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "New"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["name"],
        json!("Acme AS")
    );
    assert!(h
        .detail_of("unchanged")
        .await
        .iter()
        .any(|d| d.contains("cannot be written")));
}

// ---- rule 3 and API efficiency --------------------------------------------------------------

#[tokio::test]
async fn rule3_echo_and_unchanged_values_cause_no_write_and_calls_are_minimal() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;

    // The echo of our create arrives as a Zendesk webhook: no write anywhere.
    h.reset_counters();
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).count("update") + h.m(PowerOffice).count("update"),
        0
    );
    assert_eq!(h.decisions().await.last().unwrap(), "echo");

    // A changed linked record: one read per side, one write, nothing else.
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Acme Norge AS"})));
    h.reset_counters();
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(PowerOffice).count("fetch"), 1);
    assert_eq!(h.m(Zendesk).count("fetch"), 1);
    assert_eq!(h.m(Zendesk).count("update"), 1);
    assert_eq!(h.m(PowerOffice).count("update"), 0);
    assert_eq!(
        h.m(Zendesk).count("create") + h.m(Zendesk).count("find_by"),
        0
    );

    // The echo of that write: one read of the echoing record only (it matches the snapshot, so
    // the other side is not read) and zero writes.
    h.reset_counters();
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).count("update") + h.m(PowerOffice).count("update"),
        0
    );
    assert_eq!(h.m(Zendesk).count("fetch"), 1);
    assert_eq!(h.m(PowerOffice).count("fetch"), 0);
    assert_eq!(h.decisions().await.last().unwrap(), "echo");

    // An event with nothing changed (a field outside the mapping, or a duplicate): zero writes.
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Unmapped": "x"})));
    h.reset_counters();
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).count("update") + h.m(PowerOffice).count("update"),
        0
    );
    assert_eq!(h.decisions().await.last().unwrap(), "unchanged");
}

/// docs/sync-rules.md, "An echo without a read": a custom system's webhook carrying the stamp
/// Tether's own write answered with is that write's echo, recorded with no call at all; without a
/// stamp the record is read as before, and a later stamp (a change of the system's own) is read
/// and merged.
#[tokio::test]
async fn rule3_a_custom_echo_carrying_the_written_stamp_costs_no_call() {
    let flow = flow(
        (PowerOffice, "Customers"),
        (CustomErp, "Customer"),
        vec![prop("Name", "name")],
    );
    let h = Harness::new(vec![flow], &[PowerOffice, CustomErp]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Acme AS"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    let customer = h.active_links().await[0].2.clone();
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Acme Norge AS"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    let written = h.m(CustomErp).get("Customer", &customer).unwrap();
    assert_eq!(name_of(&written), json!("Acme Norge AS"));
    let echo = |stamp| h.delivered(CustomErp, "Customer", &customer, Action::Updated, stamp);

    // No stamp in the webhook: the echo is read, as before.
    h.reset_counters();
    assert_eq!(h.handle(&echo(None).await).await, JobOutcome::Done);
    assert_eq!(h.m(CustomErp).count("fetch"), 1);
    assert_eq!(h.decisions().await.last().unwrap(), "echo");

    // The write's own stamp: the same decision without a call.
    h.reset_counters();
    assert_eq!(
        h.handle(&echo(written.updated_at).await).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(CustomErp).count("fetch") + h.m(PowerOffice).count("fetch"),
        0
    );
    assert_eq!(
        h.m(CustomErp).count("update") + h.m(PowerOffice).count("update"),
        0
    );
    assert_eq!(h.decisions().await.last().unwrap(), "echo");

    // A change made in the custom system carries a later stamp: read and merged as ever.
    let edited = h.m(CustomErp).edit(
        "Customer",
        &customer,
        obj(json!({"name": "Acme Holding AS"})),
    );
    h.reset_counters();
    assert_eq!(
        h.handle(&echo(edited.updated_at).await).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(CustomErp).count("fetch"), 1);
    assert_ne!(h.decisions().await.last().unwrap(), "echo");
}

/// docs/sync-rules.md, "A write without a read": a custom system that writes conditionally is
/// written without reading it first when Tether wrote (or created) it last and its answer showed
/// the snapshot; after Tether wrote the other side last, it is read.
/// The write names the stamp it assumes, so a change made there meanwhile (its webhook not yet
/// handled) refuses it with nothing written; the record is then read, and the later change wins
/// as ever instead of being overwritten.
#[tokio::test]
async fn rule2_a_conditional_system_written_last_is_written_unread_unless_it_changed_since() {
    let flow = flow(
        (PowerOffice, "Customers"),
        (CustomErp, "Customer"),
        vec![prop("Name", "name"), prop("WebsiteUrl", "url")],
    );
    let h = Harness::new(vec![flow], &[PowerOffice, CustomErp]).await;
    h.m(CustomErp).write_conditionally();
    let c = h.m(PowerOffice).insert(
        "Customers",
        obj(json!({"Name": "Acme AS", "WebsiteUrl": "https://acme.no"})),
    );
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    let customer = h.active_links().await[0].2.clone();
    let erp_name = || name_of(&h.m(CustomErp).get("Customer", &customer).unwrap());
    let rename = |name: &str| {
        h.m(PowerOffice)
            .edit("Customers", &c.id, obj(json!({ "Name": name })))
    };

    // Tether created the customer and the create's answer showed the values sent: unread.
    rename("Acme Norge AS");
    assert_eq!(erp_calls_of_a_sync(&h, &c.id).await, (0, 1));
    assert_eq!(erp_name(), json!("Acme Norge AS"));

    // Renamed in the ERP and synced to PowerOffice: Tether wrote the other side last, so the
    // customer is read before the next write.
    h.m(CustomErp)
        .edit("Customer", &customer, obj(json!({"name": "Acme ERP AS"})));
    assert_eq!(
        h.run(CustomErp, "Customer", &customer).await,
        JobOutcome::Done
    );
    rename("Acme Holding AS");
    assert_eq!(erp_calls_of_a_sync(&h, &c.id).await, (1, 1));

    // Tether's write answered with the snapshot: the next change is written unread.
    rename("Acme Group AS");
    assert_eq!(erp_calls_of_a_sync(&h, &c.id).await, (0, 1));
    assert_eq!(erp_name(), json!("Acme Group AS"));
    let read: Value =
        sqlx::query_scalar("SELECT read FROM sync_log WHERE decision = 'updated' ORDER BY id DESC")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(read["unread"], json!("target"), "{read}");

    // Renamed in PowerOffice, then in the ERP: the unread write is refused, the customer read,
    // and the ERP's later name wins on both sides.
    rename("From PowerOffice");
    h.m(CustomErp)
        .edit("Customer", &customer, obj(json!({"name": "From the ERP"})));
    assert_eq!(
        erp_calls_of_a_sync(&h, &c.id).await,
        (1, 1),
        "one refused write, then one read"
    );
    assert_eq!(erp_name(), json!("From the ERP"));
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("From the ERP")
    );
}

/// Runs the PowerOffice customer's event and returns the Custom ERP's (reads, writes) it cost.
async fn erp_calls_of_a_sync(h: &Harness, customer: &str) -> (u64, u64) {
    h.reset_counters();
    assert_eq!(
        h.run(PowerOffice, "Customers", customer).await,
        JobOutcome::Done
    );
    let erp = h.m(CustomErp);
    (erp.count("fetch"), erp.count("update"))
}

/// A registry rule naming another flow as the owner of a property: this flow does not write it
/// to a linked record, but still writes the properties it owns or shares.
#[tokio::test]
async fn owner_rules_keep_other_flows_from_writing_a_property() {
    let flow = customers_to_orgs();
    let registry = Registry {
        rules: vec![PropertyRule {
            entity: flow.target.clone(),
            property: "name".into(),
            resolve: Resolution::Owner("exactonline.Accounts->zendesk.Organizations".into()),
        }],
        dataflows: vec![flow],
        ..Registry::default()
    };
    let h = Harness::with_registry(registry, &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;
    assert_eq!(name_of(&org), json!("Acme AS"), "creation is not held back");

    h.m(PowerOffice).edit(
        "Customers",
        &c.id,
        obj(json!({"Name": "Acme Norge AS", "WebsiteUrl": "https://acme.example"})),
    );
    h.reset_counters();
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    let org = h.m(Zendesk).get("Organizations", &org.id).unwrap();
    assert_eq!(
        name_of(&org),
        json!("Acme AS"),
        "the owned name is not written"
    );
    assert_eq!(org.fields["url"], json!("https://acme.example"));
    let detail = h.detail_of("updated").await;
    assert!(
        detail
            .last()
            .is_some_and(|d| d.contains("owned by exactonline.Accounts->zendesk.Organizations")),
        "{detail:?}"
    );
}

#[tokio::test]
async fn rule3_echo_arriving_before_the_engine_stored_its_write_causes_no_write() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Acme 2"})));
    h.reset_counters();

    // The engine writes to Zendesk and is held right after the vendor stored the change.
    let pause = h.m(Zendesk).pause_after_next_update();
    let job = h.event(PowerOffice, "Customers", &c.id).await;
    let engine = h.engine.clone();
    let running = tokio::spawn({
        let job = job.clone();
        async move { engine.handle(&job).await }
    });
    tokio::time::timeout(Duration::from_secs(30), pause.reached)
        .await
        .expect("the write happens")
        .unwrap();

    // Zendesk's echo webhook is processed now, before the snapshot is stored.
    let echo = h.event(Zendesk, "Organizations", &org.id).await;
    assert_eq!(h.handle(&echo).await, JobOutcome::Done);
    assert_eq!(h.m(PowerOffice).count("update"), 0, "the echo wrote back");

    pause.release.send(()).unwrap();
    let first = running.await.unwrap();
    // The interrupted job notices the snapshot moved and re-reads; its re-run writes nothing.
    assert!(matches!(first, JobOutcome::Later { .. }), "{first:?}");
    assert!(h.decisions().await.contains(&"converged".to_string()));
    assert!(h.decisions().await.contains(&"conflict".to_string()));
    assert_eq!(h.handle(&job).await, JobOutcome::Done);
    h.drain().await;
    assert_eq!(h.m(Zendesk).count("update"), 1);
    assert_eq!(h.m(PowerOffice).count("update"), 0);
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["name"],
        json!("Acme 2")
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("Acme 2")
    );
}

// ---- rule 4 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule4_edited_on_both_sides_the_later_change_wins_and_empty_never_overwrites() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Acme AS", "https://acme.no").await;

    // Zendesk first, PowerOffice later: PowerOffice's name wins; its cleared url does not
    // overwrite Zendesk's.
    h.m(Zendesk).edit(
        "Organizations",
        &org.id,
        obj(json!({"name": "From Zendesk"})),
    );
    h.m(PowerOffice).edit(
        "Customers",
        &c.id,
        obj(json!({"Name": "From PowerOffice", "WebsiteUrl": ""})),
    );
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    let org_now = h.m(Zendesk).get("Organizations", &org.id).unwrap();
    assert_eq!(org_now.fields["name"], json!("From PowerOffice"));
    assert_eq!(org_now.fields["url"], json!("https://acme.no"));
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("From PowerOffice")
    );
    assert_eq!(h.m(PowerOffice).count("update"), 0);

    // The other way round: PowerOffice first, Zendesk later: Zendesk wins.
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "PO again"})));
    h.m(Zendesk)
        .edit("Organizations", &org.id, obj(json!({"name": "ZD later"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("ZD later")
    );
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["name"],
        json!("ZD later")
    );

    // One side only, changed to empty: nothing is written.
    h.reset_counters();
    h.m(Zendesk)
        .edit("Organizations", &org.id, obj(json!({"name": ""})));
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("ZD later")
    );
    assert_eq!(h.m(PowerOffice).count("update"), 0);
}

// ---- rule 5 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule5_reference_synced_later_waits_then_gets_the_translated_id() {
    let h = Harness::new(seed_like(), &[PowerOffice, Zendesk]).await;
    let customer = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Acme AS"})));
    let contact = h.m(PowerOffice).insert(
        "Contactperson",
        obj(json!({"Name": "Kari", "partyId": customer.id.parse::<i64>().unwrap()})),
    );
    // The contact's event comes first: its customer is not linked yet.
    let job = h.event(PowerOffice, "Contactperson", &contact.id).await;
    let first = h.handle(&job).await;
    assert!(matches!(first, JobOutcome::Later { .. }), "{first:?}");
    assert!(
        h.m(Zendesk).all("Users").is_empty(),
        "no user with a foreign id"
    );
    // Waiting again does not enqueue the referenced record again. partyId may be a customer or
    // a supplier: both candidates are enqueued once.
    assert!(matches!(h.handle(&job).await, JobOutcome::Later { .. }));
    let synthetic: Vec<String> = sqlx::query_scalar(
        "SELECT entity_type FROM events WHERE delivery_id LIKE 'tether:reference:%' ORDER BY id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        synthetic,
        vec!["Customers".to_string(), "Suppliers".to_string()]
    );
    // The queue runs the customer (enqueued by the engine) and the retried contact.
    h.drain().await;
    let orgs = h.m(Zendesk).all("Organizations");
    assert_eq!(orgs.len(), 1);
    let users = h.m(Zendesk).all("Users");
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].fields["organization_id"], json!(orgs[0].id));
    assert_ne!(
        orgs[0].id, customer.id,
        "ids must differ for the test to mean anything"
    );

    // Reverse: the user moves to another organization linked to a supplier; the contact's
    // partyId becomes the supplier's id, translated back through the supplier's link.
    let supplier = h
        .m(PowerOffice)
        .insert("Suppliers", obj(json!({"LegalName": "Parts AS"})));
    assert_eq!(
        h.run(PowerOffice, "Suppliers", &supplier.id).await,
        JobOutcome::Done
    );
    let parts_org = h
        .m(Zendesk)
        .all("Organizations")
        .into_iter()
        .find(|o| o.fields["name"] == json!("Parts AS"))
        .unwrap();
    h.m(Zendesk).edit(
        "Users",
        &users[0].id,
        obj(json!({"organization_id": parts_org.id.parse::<i64>().unwrap()})),
    );
    assert_eq!(
        h.run(Zendesk, "Users", &users[0].id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(PowerOffice)
            .get("Contactperson", &contact.id)
            .unwrap()
            .fields["partyId"],
        json!(supplier.id)
    );
}

#[tokio::test]
async fn rule5_a_reference_with_no_possible_link_is_left_unset_and_counted() {
    let flows = vec![flow(
        (Zendesk, "Users"),
        (CrmOffice, "Contacts"),
        vec![
            prop("name", "name"),
            reference(
                "organization_id",
                "company.id",
                &["Organizations"],
                "Companies",
            ),
        ],
    )];
    let h = Harness::new(flows, &[Zendesk, CrmOffice]).await;
    let user = h
        .m(Zendesk)
        .insert("Users", obj(json!({"name": "Ola", "organization_id": 777})));
    assert_eq!(h.run(Zendesk, "Users", &user.id).await, JobOutcome::Done);
    let contacts = h.m(CrmOffice).all("Contacts");
    assert_eq!(contacts.len(), 1);
    assert_eq!(
        contacts[0].fields.get("company"),
        None,
        "foreign id written"
    );
    assert!(h.detail_of("created").await[0].contains("1 reference(s) left unset"));
}

// ---- rule 6 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule6_poweroffice_customer_chains_to_zendesk_customerp_and_custompms() {
    let h = Harness::new(seed_like(), &[PowerOffice, Zendesk, CustomErp, CustomPms]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Chain AS"})));
    // Only PowerOffice's event is delivered: no Zendesk webhook at all.
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    let orgs = h.m(Zendesk).all("Organizations");
    assert_eq!(orgs.len(), 1);
    assert_eq!(name_of(&orgs[0]), json!("Chain AS"));
    let erp = h.m(CustomErp).all("Customer");
    let pms = h.m(CustomPms).all("Customer");
    assert_eq!((erp.len(), pms.len()), (1, 1));
    assert_eq!(name_of(&erp[0]), json!("Chain AS"));
    assert_eq!(name_of(&pms[0]), json!("Chain AS"));
    assert_eq!(h.active_links().await.len(), 3);

    // An update travels the chain the same way.
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Chain Group"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        name_of(&h.m(CustomErp).all("Customer")[0]),
        json!("Chain Group")
    );
    assert_eq!(
        name_of(&h.m(CustomPms).all("Customer")[0]),
        json!("Chain Group")
    );
    // Zendesk's late echo webhook then changes nothing.
    h.reset_counters();
    assert_eq!(
        h.run(Zendesk, "Organizations", &orgs[0].id).await,
        JobOutcome::Done
    );
    let writes: u64 = h
        .mem
        .values()
        .map(|m| m.count("update") + m.count("create"))
        .sum();
    assert_eq!(writes, 0);
}

// ---- rule 7 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule7_events_out_of_order_never_apply_stale_state() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("v0", "").await;
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "v1"})));
    let older = h.event(PowerOffice, "Customers", &c.id).await;
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "v2"})));
    let newer = h.event(PowerOffice, "Customers", &c.id).await;
    // Delivered newest first.
    assert_eq!(h.handle(&newer).await, JobOutcome::Done);
    assert_eq!(h.handle(&older).await, JobOutcome::Done);
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["name"],
        json!("v2")
    );
    // The late, older event wrote nothing.
    assert_eq!(h.decisions().await.last().unwrap(), "unchanged");
}

// ---- rule 8 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule8_crash_between_vendor_create_and_link_commit_makes_no_second_counterpart() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Once AS"})));
    h.m(Zendesk).crash_after_next_create();
    let job = h.event(PowerOffice, "Customers", &c.id).await;
    let first = h.handle(&job).await;
    assert!(matches!(first, JobOutcome::Later { .. }), "{first:?}");
    assert_eq!(
        h.m(Zendesk).all("Organizations").len(),
        1,
        "the vendor created it"
    );
    assert!(h.active_links().await.is_empty(), "but no link was stored");

    let retry = ClaimedJob {
        attempt: 2,
        ..job.clone()
    };
    assert_eq!(h.handle(&retry).await, JobOutcome::Done);
    assert_eq!(
        h.m(Zendesk).all("Organizations").len(),
        1,
        "a second counterpart"
    );
    assert_eq!(h.m(Zendesk).count("create"), 1);
    assert_eq!(h.m(Zendesk).count("find_created"), 1);
    assert_eq!(h.active_links().await.len(), 1);
    assert!(h
        .decisions()
        .await
        .contains(&"linked_after_retry".to_string()));
    // The retry found nothing to change: the created record already holds the values.
    assert_eq!(h.m(Zendesk).count("update"), 0);
}

#[tokio::test]
async fn rule8_source_edited_between_crash_and_retry_is_written_not_reverted() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Before"})));
    h.m(Zendesk).crash_after_next_create();
    let job = h.event(PowerOffice, "Customers", &c.id).await;
    assert!(matches!(h.handle(&job).await, JobOutcome::Later { .. }));
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "After"})));
    assert_eq!(
        h.handle(&ClaimedJob { attempt: 2, ..job }).await,
        JobOutcome::Done
    );
    let orgs = h.m(Zendesk).all("Organizations");
    assert_eq!(orgs.len(), 1);
    assert_eq!(orgs[0].fields["name"], json!("After"));
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("After")
    );
    assert_eq!(h.m(PowerOffice).count("update"), 0);
}

/// A PowerOffice customer whose organization Zendesk made although the create's attempt crashed
/// (no link stored), then renamed by an agent: the customer and its event's job, to retry.
async fn created_by_a_crashed_attempt_then_renamed_by_an_agent(
    h: &Harness,
) -> (Record, ClaimedJob) {
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "As sent"})));
    h.m(Zendesk).crash_after_next_create();
    let job = h.event(PowerOffice, "Customers", &c.id).await;
    assert!(matches!(h.handle(&job).await, JobOutcome::Later { .. }));
    let org = h.m(Zendesk).all("Organizations").remove(0);
    h.m(Zendesk).edit(
        "Organizations",
        &org.id,
        obj(json!({"name": "Renamed by an agent"})),
    );
    (c, job)
}

/// Issue 19: the create timed out although the vendor made the record, an agent renamed the new
/// record, then the retry found it. The base is what the create sent, so the rename is a change
/// of the target (kept, and written back), not an old value to overwrite.
#[tokio::test]
async fn rule8_counterpart_edited_between_crash_and_retry_is_kept_not_reverted() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, job) = created_by_a_crashed_attempt_then_renamed_by_an_agent(&h).await;
    assert_eq!(
        h.handle(&ClaimedJob { attempt: 2, ..job }).await,
        JobOutcome::Done
    );
    let orgs = h.m(Zendesk).all("Organizations");
    assert_eq!(orgs.len(), 1);
    assert_eq!(orgs[0].fields["name"], json!("Renamed by an agent"));
    assert_eq!(
        h.m(Zendesk).count("update"),
        0,
        "the rename was not overwritten"
    );
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("Renamed by an agent"),
        "the agent's edit flows back like any target change"
    );
}

/// Found by the chaos suite: the counterpart's edit (its webhook came while the pair was unlinked)
/// must still reach the source when writing it there fails once after the link was stored; the
/// event's next attempt finds its own record as last synced and reads no further.
#[tokio::test]
async fn rule8_counterpart_edited_between_crash_and_retry_reaches_the_source_after_a_failed_write()
{
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, job) = created_by_a_crashed_attempt_then_renamed_by_an_agent(&h).await;
    h.m(PowerOffice).fail_next("update", Failure::Transient);
    let second = h
        .handle(&ClaimedJob {
            attempt: 2,
            ..job.clone()
        })
        .await;
    assert!(!matches!(second, JobOutcome::Done), "{second:?}");
    assert_eq!(h.active_links().await.len(), 1, "linked before the failure");
    assert_eq!(
        h.handle(&ClaimedJob { attempt: 3, ..job }).await,
        JobOutcome::Done
    );
    h.drain().await;
    assert_eq!(
        h.m(PowerOffice).get("Customers", &c.id).unwrap().fields["Name"],
        json!("Renamed by an agent"),
        "the agent's edit reached the source"
    );
    assert_eq!(
        h.m(Zendesk).all("Organizations")[0].fields["name"],
        json!("Renamed by an agent"),
        "and was not overwritten"
    );
}

/// A PowerOffice customer named `name` whose first job recorded its create intent and then
/// failed to create the organization (a transient error): the customer and that job, to retry.
async fn create_failed_once(h: &Harness, name: &str) -> (Record, ClaimedJob) {
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({ "Name": name })));
    h.m(Zendesk).fail_next("create", Failure::Transient);
    let a = h.event(PowerOffice, "Customers", &c.id).await;
    assert!(matches!(h.handle(&a).await, JobOutcome::Retry { .. }));
    (c, a)
}

#[tokio::test]
async fn rule8_another_job_holding_the_intent_makes_a_second_job_wait() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, a) = create_failed_once(&h, "Once AS").await;
    // A different job for the same record while A runs again (claimed, its lease live) and
    // its intent lease is live: it waits.
    h.mark_running(&a).await;
    let b = h.event(PowerOffice, "Customers", &c.id).await;
    assert!(matches!(h.handle(&b).await, JobOutcome::Later { .. }));
    // A's retry creates exactly one.
    assert_eq!(
        h.handle(&ClaimedJob { attempt: 2, ..a }).await,
        JobOutcome::Done
    );
    assert_eq!(h.handle(&b).await, JobOutcome::Done);
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
}

/// Rule 8, the other way round: the job holding the intent failed and waits to retry (not
/// running), so it is creating nothing. Another job of the record takes the intent over instead
/// of waiting for its lease: the queue runs a record's jobs in id order, so an older job waiting
/// on a younger owner's intent would hold that owner's retry back until the lease ran out (the
/// chaos suite saw two minutes). Still exactly one counterpart, with the intent's key.
#[tokio::test]
async fn rule8_an_intent_whose_job_waits_to_retry_is_taken_over_not_waited_for() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, a) = create_failed_once(&h, "Taken Over AS").await;
    let b = h.event(PowerOffice, "Customers", &c.id).await;
    assert_eq!(h.handle(&b).await, JobOutcome::Done);
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
    assert_eq!(
        h.handle(&ClaimedJob { attempt: 2, ..a }).await,
        JobOutcome::Done
    );
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
    assert_eq!(h.active_links().await.len(), 1);
}

// ---- rule 9 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rule9_a_deleted_record_ends_its_links_and_the_counterpart_stays() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Gone AS", "").await;
    h.m(PowerOffice).delete("Customers", &c.id);
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert!(h.active_links().await.is_empty());
    assert!(h.m(Zendesk).get("Organizations", &org.id).is_some());
    let reason: String = sqlx::query_scalar("SELECT end_reason FROM links")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "source record deleted");
    assert_eq!(h.decisions().await.last().unwrap(), "deleted");
}

#[tokio::test]
async fn rule9_a_final_delete_notification_ends_the_links_without_reading_the_record() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Gone for good AS", "").await;
    // As Exact Online: a Delete webhook is final, and reading the deleted record by key would
    // be a 404 that Exact counts against the app (docs/vendors.md, Exact Online item 3).
    h.m(PowerOffice).declare_final_deletes();
    h.m(PowerOffice).delete("Customers", &c.id);
    h.reset_counters();
    let job = h
        .event_of(PowerOffice, "Customers", &c.id, Action::Deleted)
        .await;
    assert_eq!(h.handle(&job).await, JobOutcome::Done);
    assert_eq!(
        h.m(PowerOffice).count("fetch"),
        0,
        "no read of a deleted record"
    );
    assert!(h.active_links().await.is_empty());
    assert!(h.m(Zendesk).get("Organizations", &org.id).is_some());
    assert_eq!(h.decisions().await.last().unwrap(), "deleted");
    assert!(h.detail_of("deleted").await[0].contains("not re-read"));
}

// ---- rule 10 and idle flows ----------------------------------------------------------------

#[tokio::test]
async fn rule10_every_decision_is_recorded_and_shown_per_record() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Logged AS", "").await;
    assert_eq!(
        h.run(Zendesk, "Organizations", &org.id).await,
        JobOutcome::Done
    );
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Logged 2"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    h.m(PowerOffice).delete("Customers", &c.id);
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );

    let key = RecordKey {
        system: Zendesk,
        entity_type: "Organizations".into(),
        record_id: org.id.clone(),
    };
    let text = tether::sync::history::render(&h.db.pool, &key)
        .await
        .unwrap();
    for needle in [
        "[ended]",
        "source record deleted",
        "created",
        "echo",
        "updated",
        "deleted",
        "Logged 2",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[tokio::test]
async fn idle_flows_are_recorded_once_without_reading_the_record() {
    // Zendesk not connected.
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Idle"})));
    h.reset_counters();
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.decisions().await, vec!["idle".to_string()]);
    assert!(h.detail_of("idle").await[0].contains("Zendesk is not connected"));
    assert_eq!(h.m(PowerOffice).count("fetch"), 0);

    // A disabled flow.
    let mut f = customers_to_orgs();
    f.switches.enabled = false;
    let h = Harness::new(vec![f], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Off"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.decisions().await, vec!["idle".to_string()]);
    assert!(h.detail_of("idle").await[0].contains("is switched off"));
    assert!(h.m(Zendesk).all("Organizations").is_empty());

    // One flow runs and another is off: both are on record.
    let mut off = customers_to_orgs();
    off.id = format!("{} (copy)", off.id);
    off.switches.enabled = false;
    let h = Harness::new(vec![customers_to_orgs(), off], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Half"})));
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(h.decisions().await, vec!["created", "idle"]);
    let detail = &h.detail_of("idle").await[0];
    assert!(
        detail.contains("other dataflows") && detail.contains("(copy) is switched off"),
        "{detail}"
    );
    assert_eq!(h.m(Zendesk).all("Organizations").len(), 1);
}

#[tokio::test]
async fn connector_errors_map_to_job_outcomes() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let c = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Err"})));
    let cases = [
        (Failure::RateLimited, "later 7s"),
        (Failure::Timeout, "later"),
        (Failure::Transient, "retry"),
        (Failure::Rejected, "dead"),
        (Failure::Unauthorized, "later 3600s"),
    ];
    for (failure, expected) in cases {
        h.m(PowerOffice).fail_next("fetch", failure);
        let job = h.event(PowerOffice, "Customers", &c.id).await;
        let outcome = h.handle(&job).await;
        let got = match &outcome {
            JobOutcome::Later { after: Some(d), .. } if *d == Duration::from_secs(7) => "later 7s",
            JobOutcome::Later { after: Some(d), .. } if *d == Duration::from_secs(3600) => {
                "later 3600s"
            }
            JobOutcome::Later { .. } => "later",
            JobOutcome::Retry { .. } => "retry",
            JobOutcome::Dead { .. } => "dead",
            JobOutcome::Done => "done",
        };
        assert_eq!(got, expected, "{failure:?} -> {outcome:?}");
    }
    let errors: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_log WHERE decision = 'error' AND error IS NOT NULL",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(errors, 5);
}

/// A write the target refuses for good in its state (a closed Zendesk ticket, docs/vendors.md)
/// is a recorded decision: the job is done, not retried and not dead-lettered.
#[tokio::test]
async fn a_closed_target_is_a_recorded_decision_not_a_retry() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let (c, org) = h.linked_customer("Closed AS", "https://closed.no").await;
    h.m(PowerOffice)
        .edit("Customers", &c.id, obj(json!({"Name": "Closed Group"})));
    h.m(Zendesk).fail_next("update", Failure::TargetClosed);
    assert_eq!(
        h.run(PowerOffice, "Customers", &c.id).await,
        JobOutcome::Done
    );
    assert_eq!(
        h.m(Zendesk).get("Organizations", &org.id).unwrap().fields["name"],
        json!("Closed AS")
    );
    let decisions: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT decision, error FROM sync_log WHERE decision IN ('target_closed', 'error')",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].0, "target_closed");
    assert!(decisions[0].1.as_deref().unwrap().contains("closed"));
}

/// A refused credential stops the system for every job of this process, not only the job that
/// met it: the next jobs that need the system are put off without calling it.
#[tokio::test]
async fn refused_credentials_stop_the_system_for_every_job() {
    let h = Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await;
    let a = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "First"})));
    let b = h
        .m(PowerOffice)
        .insert("Customers", obj(json!({"Name": "Second"})));
    h.m(Zendesk).fail_next("create", Failure::Unauthorized);
    let first = h
        .handle(&h.event(PowerOffice, "Customers", &a.id).await)
        .await;
    assert!(
        matches!(first, JobOutcome::Later { after: Some(d), .. } if d == Duration::from_secs(3600)),
        "{first:?}"
    );

    h.reset_counters();
    let second = h
        .handle(&h.event(PowerOffice, "Customers", &b.id).await)
        .await;
    match &second {
        JobOutcome::Later {
            after: Some(d),
            reason,
        } => {
            assert!(*d <= Duration::from_secs(3600) && *d > Duration::from_secs(3500));
            assert!(reason.contains("Zendesk is stopped"), "{reason}");
        }
        other => panic!("expected the job to be put off, got {other:?}"),
    }
    let calls: u64 = tether::connectors::memory::OPS
        .iter()
        .map(|op| h.m(Zendesk).count(op) + h.m(PowerOffice).count(op))
        .sum();
    assert_eq!(calls, 0, "no API call while the system is stopped");
    assert_eq!(
        h.decisions().await.last().map(String::as_str),
        Some("system_stopped")
    );
}

// ---- benchmark (figures only, never pass/fail on time) -----------------------------------------

/// Linked updates per second through the engine with in-memory connectors and a real PostgreSQL.
/// Run: `cargo test --release --test it sync::bench -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn bench_linked_updates_per_second() {
    const RECORDS: usize = 500;
    const CONCURRENCY: usize = 8;
    let h = Arc::new(Harness::new(vec![customers_to_orgs()], &[PowerOffice, Zendesk]).await);
    let mut ids = Vec::new();
    for i in 0..RECORDS {
        let c = h
            .m(PowerOffice)
            .insert("Customers", obj(json!({"Name": format!("Customer {i}")})));
        let job = h.event(PowerOffice, "Customers", &c.id).await;
        assert_eq!(h.handle(&job).await, JobOutcome::Done);
        ids.push(c.id);
    }
    for round in 0..3 {
        let mut jobs = Vec::new();
        for id in &ids {
            h.m(PowerOffice).edit(
                "Customers",
                id,
                obj(json!({"Name": format!("Customer {id} r{round}")})),
            );
            jobs.push(h.event(PowerOffice, "Customers", id).await);
        }
        h.reset_counters();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CONCURRENCY {
            let (h, jobs) = (h.clone(), jobs.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(job) = jobs.lock().unwrap().pop() else {
                        break;
                    };
                    assert_eq!(h.engine.handle(&job).await, JobOutcome::Done);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed();
        assert_eq!(h.m(Zendesk).count("update"), RECORDS as u64);
        println!(
            "round {round}: {RECORDS} linked updates in {:.3}s = {:.0} updates/s \
             (concurrency {CONCURRENCY}, in-memory connectors, PostgreSQL on this machine)",
            elapsed.as_secs_f64(),
            RECORDS as f64 / elapsed.as_secs_f64()
        );
    }
}
