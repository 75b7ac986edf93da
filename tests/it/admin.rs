//! The admin API and `/metrics` against a running Tether (real HTTP, a real PostgreSQL, the
//! simulators): bearer auth, the OpenAPI document, systems/flows/queue, record explanations,
//! dead letters and their retry, pausing a dataflow (durable, honoured by the workers, replayed on
//! resume), and the metric families after real traffic.

use std::time::Duration;

use serde_json::{json, Value};
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, Service};

pub const TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(30);
const ERP_FLOW: &str = "zendesk.Organizations->customerp.Customer";

/// Maps organization names to Custom ERP customers, so a Zendesk organization creates one.
pub const OVERLAY: &str = r#"
[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;

/// A running Tether with the simulators and, if given, an admin token.
pub struct Harness {
    service: Service,
    http: reqwest::Client,
}

impl std::ops::Deref for Harness {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

impl Harness {
    pub async fn start(admin_token: Option<&str>) -> Harness {
        Harness::start_with(admin_token, "").await
    }

    /// `extra` is appended to the configuration TOML (whole sections).
    pub async fn start_with(admin_token: Option<&str>, extra: &str) -> Harness {
        Harness::start_connected_at(admin_token, extra, chrono::Utc::now()).await
    }

    /// As [`Harness::start_with`], with the systems first connected at `connected_at`.
    pub async fn start_connected_at(
        admin_token: Option<&str>,
        extra: &str,
        connected_at: chrono::DateTime<chrono::Utc>,
    ) -> Harness {
        let mut admin = admin_token
            .map(|token| format!("\n[admin]\ntoken = \"{token}\"\n"))
            .unwrap_or_default();
        admin.push_str(extra);
        Harness {
            service: Service::start_connected_at(Some(OVERLAY), &admin, "", connected_at).await,
            http: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Creates a Zendesk organization (its webhook reaches Tether) and returns its id.
    pub fn create_org(&self, name: &str) -> String {
        let created = self
            .sims
            .zendesk
            .create(Kind::Organization, json!({ "name": name }));
        assert!(created.status().is_success());
        self.sims
            .zendesk
            .all(Kind::Organization)
            .into_iter()
            .find(|o| o["name"] == json!(name))
            .unwrap()["id"]
            .to_string()
    }

    /// Makes a real dead letter: an event whose job failed on its last attempt.
    pub async fn dead_letter(&self) -> i64 {
        sqlx::query_scalar(
            "WITH e AS (INSERT INTO events (system, entity_type, record_id, action, delivery_id) \
               VALUES ('zendesk', 'Organizations', '999999', 'updated', $1) RETURNING id) \
             INSERT INTO jobs (event_id, record_key, state, attempts, last_error, finished_at, run_at) \
             SELECT id, 'zendesk/Organizations/999999', 'dead', 7, 'vendor said 422: name missing', now(), \
               now() + interval '1 hour' FROM e RETURNING id",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    pub async fn stop(self) {
        self.service.stop().await;
    }
}

#[tokio::test]
async fn admin_surface_is_off_without_a_token() {
    let h = Harness::start(None).await;
    for path in [
        "/admin",
        "/admin/login",
        "/admin/api/systems",
        "/admin/api/openapi.json",
    ] {
        let (status, _) = h.text(path).await;
        assert_eq!(status, 404, "{path}");
    }
    // Metrics are served regardless.
    assert_eq!(h.text("/metrics").await.0, 200);
    h.stop().await;
}

#[tokio::test]
async fn api_answers_401_without_the_right_bearer_token() {
    let h = Harness::start(Some(TOKEN)).await;
    for token in [
        None,
        Some("wrong-token"),
        Some("test-admin-token-0123456789abcdeF"),
    ] {
        let (status, body) = h.get("/admin/api/systems", token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"], "unauthorized");
        assert!(!body.to_string().contains(TOKEN));
    }
    let (status, _) = h.post("/admin/api/dead-letters/1/retry", None).await;
    assert_eq!(status, 401);
    let (status, body) = h.get("/admin/api/systems", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let systems = body.as_array().unwrap();
    assert_eq!(systems.len(), 6);
    assert!(
        systems.iter().all(|s| s["connected"] == json!(true)),
        "{body}"
    );
    h.stop().await;
}

#[tokio::test]
async fn openapi_document_describes_every_endpoint() {
    let h = Harness::start(Some(TOKEN)).await;
    let (status, doc) = h.get("/admin/api/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/admin/api/systems",
        "/admin/api/flows",
        "/admin/api/flows/{flow}/pause",
        "/admin/api/flows/{flow}/resume",
        "/admin/api/records/{system}/{entity_type}/{id}",
        "/admin/api/dead-letters",
        "/admin/api/dead-letters/{id}/retry",
        "/admin/api/queue",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys()
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["RecordExplanation"].is_object());
    h.stop().await;
}

#[tokio::test]
async fn a_synced_record_shows_in_systems_flows_explanation_queue_and_metrics() {
    let h = Harness::start(Some(TOKEN)).await;
    let org = h.create_org("Explained AS");
    let customer = eventually("the ERP link", WAIT, || h.active_link(ERP_FLOW, &org)).await;

    let (_, x) = h
        .get(
            &format!("/admin/api/records/zendesk/Organizations/{org}"),
            Some(TOKEN),
        )
        .await;
    assert_eq!(x["not_synced"], Value::Null, "{x}");
    let link = x["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["flow_id"] == ERP_FLOW)
        .unwrap();
    assert_eq!(link["target"], format!("customerp/Customer/{customer}"));
    assert!(x["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["decision"] == "created"));
    assert!(x["text"].as_str().unwrap().contains(ERP_FLOW));

    let (_, systems) = h.get("/admin/api/systems", Some(TOKEN)).await;
    let zendesk = systems
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["system"] == "zendesk")
        .unwrap();
    assert!(zendesk["last_delivery"].is_string(), "{zendesk}");
    assert_eq!(zendesk["credentials_ok"], true);

    let (_, flows) = h.get("/admin/api/flows", Some(TOKEN)).await;
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == ERP_FLOW)
        .unwrap();
    assert_eq!(flow["links_active"], 1, "{flow}");
    assert_eq!(flow["decisions"]["created"], 1, "{flow}");
    assert_eq!(flow["paused"], false);

    let (status, queue) = h.get("/admin/api/queue", Some(TOKEN)).await;
    assert_eq!(status, 200);
    for key in [
        "ready",
        "running",
        "retrying",
        "dead",
        "oldest_ready_seconds",
    ] {
        assert!(queue[key].is_number(), "{key} in {queue}");
    }

    let (status, metrics) = h.text("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "tether_webhooks_received_total{system=\"zendesk\",outcome=\"accepted\"}",
        "tether_queue_jobs{state=\"dead\"}",
        "tether_queue_oldest_ready_seconds",
        "tether_jobs_finished_total{system=\"zendesk\",outcome=\"done\"}",
        "tether_sync_decisions_total{flow=\"zendesk.Organizations->customerp.Customer\",decision=\"created\"}",
        // Present from the start (zero unless another test in this process met a refusal).
        "tether_credentials_failures_total{system=\"exactonline\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    // Bounded labels: no record id is ever a label value (bucket bounds `le` are numbers anyway).
    for (name, value) in label_values(&metrics) {
        assert!(
            name == "le" || (value != org && value != customer),
            "{name}=\"{value}\" is a record id"
        );
    }
    h.stop().await;
}

/// Every `name="value"` label pair of the exposition's samples.
fn label_values(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(l.split_once('{')?.1.split_once('}')?.0.to_owned()))
        .flat_map(|labels| {
            labels
                .split("\",")
                .filter_map(|pair| {
                    let (name, value) = pair.split_once("=\"")?;
                    Some((name.to_owned(), value.trim_end_matches('"').to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn an_unknown_record_is_explained_as_never_seen_and_bad_input_is_refused() {
    let h = Harness::start(Some(TOKEN)).await;
    let (status, x) = h
        .get(
            "/admin/api/records/zendesk/Organizations/424242",
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(x["not_synced"]["reason"], "never_seen", "{x}");
    let (status, body) = h
        .get("/admin/api/records/sap/Accounts/1", Some(TOKEN))
        .await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("unknown system"));
    h.stop().await;
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_retried_once() {
    let h = Harness::start(Some(TOKEN)).await;
    let id = h.dead_letter().await;
    let (_, letters) = h.get("/admin/api/dead-letters", Some(TOKEN)).await;
    let letter = letters
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap();
    assert_eq!(letter["record"], "zendesk/Organizations/999999");
    assert_eq!(letter["last_error"], "vendor said 422: name missing");

    let (status, body) = h
        .post(&format!("/admin/api/dead-letters/{id}/retry"), Some(TOKEN))
        .await;
    assert_eq!((status, &body["id"]), (200, &json!(id)), "{body}");
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_ne!(state, "dead");
    let (status, body) = h
        .post("/admin/api/dead-letters/987654321/retry", Some(TOKEN))
        .await;
    assert_eq!(status, 404, "{body}");
    h.stop().await;
}

#[tokio::test]
async fn a_paused_flow_is_recorded_not_synced_and_replayed_on_resume() {
    let h = Harness::start(Some(TOKEN)).await;
    let path = |action: &str| {
        format!(
            "/admin/api/flows/{}/{action}",
            url::form_urlencoded::byte_serialize(ERP_FLOW.as_bytes()).collect::<String>()
        )
    };
    let (status, pause) = h.post(&path("pause"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{pause}");
    assert_eq!(pause["flow_id"], ERP_FLOW);
    // Durable: the pause is a row, whatever process asks.
    let paused: i64 = sqlx::query_scalar("SELECT count(*) FROM flow_pauses WHERE flow_id = $1")
        .bind(ERP_FLOW)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(paused, 1);
    // The workers see it within the refresh interval.
    tokio::time::sleep(tether::admin::pause::PAUSE_REFRESH + Duration::from_millis(200)).await;

    let org = h.create_org("Paused AS");
    eventually("a paused entry", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_log WHERE flow_id = $1 AND record_id = $2 AND decision = 'paused'",
        )
        .bind(ERP_FLOW)
        .bind(&org)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
        (n > 0).then_some(())
    })
    .await;
    assert_eq!(h.active_link(ERP_FLOW, &org).await, None);
    assert!(
        h.sims.customerp.control.count_method("POST") == 0,
        "nothing created while paused"
    );
    let (_, x) = h
        .get(
            &format!("/admin/api/records/zendesk/Organizations/{org}"),
            Some(TOKEN),
        )
        .await;
    // Other flows of the organization ran; the explanation names the paused one.
    assert!(
        x["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["decision"] == "paused" && d["flow_id"] == ERP_FLOW),
        "{x}"
    );

    let (status, resumed) = h.post(&path("resume"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["was_paused"], true);
    assert!(
        resumed["events_replayed"].as_u64().unwrap() >= 1,
        "{resumed}"
    );
    eventually("the ERP link after resume", WAIT, || {
        h.active_link(ERP_FLOW, &org)
    })
    .await;

    let (status, body) = h
        .post("/admin/api/flows/no.Such->flow.Here/pause", Some(TOKEN))
        .await;
    assert_eq!(status, 404, "{body}");
    h.stop().await;
}

#[tokio::test]
async fn metrics_move_to_their_own_listener_and_report_poll_lag() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // PowerOffice was connected two hours ago, so a change an hour ago is one to poll.
    let h = Harness::start_connected_at(
        None,
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        chrono::Utc::now() - chrono::TimeDelta::hours(2),
    )
    .await;
    // A PowerOffice customer changed an hour ago: the poller passes it, its lag is about an hour.
    let an_hour_ago = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    h.sims.poweroffice.freeze_clock(Some(an_hour_ago));
    h.sims
        .poweroffice
        .seed("Customers", json!({"Name": "Lagging AS"}));
    h.sims.poweroffice.freeze_clock(None);
    assert_eq!(h.text("/metrics").await.0, 404, "not on the main listener");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let line = eventually("the poll lag of PowerOffice customers", WAIT, || async {
        tokio::time::sleep(tether::ops::metrics::GAUGE_REFRESH).await;
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| {
                l.starts_with(
                    "tether_poll_lag_seconds{system=\"poweroffice\",entity_type=\"Customers\"}",
                )
            })
            .map(str::to_owned)
    })
    .await;
    let seconds: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((3590.0..3700.0).contains(&seconds), "{line}");
    h.stop().await;
}
