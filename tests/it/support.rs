//! What the integration tests share: JSON objects and timestamps written inline, waiting for a
//! condition, draining a connector's change feed, a receiver for simulator webhooks, the whole
//! service against the simulators, and the vendor configurations (credentials, simulators, connectors) the tests run against. A test file
//! imports from here instead of defining its own copy, so a changed constructor is mended once.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tether::config::{Config, Source};
use tether::connectors::{Connector, Record};
use tether::sandbox::Simulators;
use tether::simulators::kit::{self, RunningSim};
use tether::testing::{self, TestDb};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The object inside a `json!({...})` literal, for the field maps connectors take.
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not a JSON object: {other}"),
    }
}

/// An RFC 3339 instant written inline.
pub fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// A loopback address on a free port, for servers the tests start.
pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What a probe of [`eventually`] answers: `bool` (the condition holds) or `Option<T>` (the thing
/// waited for, once it exists).
pub trait Settled {
    type Value;
    fn settled(self) -> Option<Self::Value>;
}

impl Settled for bool {
    type Value = ();
    fn settled(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Settled for Option<T> {
    type Value = T;
    fn settled(self) -> Option<T> {
        self
    }
}

/// Runs `probe` every 50 ms until it settles and returns what it found; fails the test naming
/// `what` once `deadline` has passed. A probe that reads in-memory state (a simulator's records)
/// is written as a plain closure wrapped in [`probe`].
pub async fn eventually<F, Fut>(
    what: &str,
    deadline: Duration,
    mut probe: F,
) -> <Fut::Output as Settled>::Value
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Settled,
{
    let start = Instant::now();
    loop {
        if let Some(found) = probe().await.settled() {
            return found;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A probe for [`eventually`] from a closure that answers at once, without awaiting anything.
pub fn probe<T>(mut answer: impl FnMut() -> T) -> impl FnMut() -> std::future::Ready<T> {
    move || std::future::ready(answer())
}

/// A connector's change feed read from one cursor until caught up.
pub struct Drained {
    pub records: Vec<Record>,
    /// The cursor to resume from.
    pub cursor: Option<String>,
    pub pages: usize,
}

impl Drained {
    /// The records' ids in the order read, and the cursor to resume from.
    pub fn into_ids(self) -> (Vec<String>, Option<String>) {
        let ids = self.records.into_iter().map(|r| r.id).collect();
        (ids, self.cursor)
    }
}

/// Follows `list_changed` of `entity_type` from `cursor` until the connector says it has no more.
pub async fn drain(c: &dyn Connector, entity_type: &str, cursor: Option<String>) -> Drained {
    let mut drained = Drained {
        records: Vec::new(),
        cursor,
        pages: 0,
    };
    loop {
        let page = c
            .list_changed(entity_type, drained.cursor.as_deref())
            .await
            .unwrap();
        drained.pages += 1;
        assert!(drained.pages < 50, "the change cursor does not advance");
        drained.records.extend(page.records);
        drained.cursor = page.next_cursor;
        if !page.has_more {
            return drained;
        }
    }
}

/// A server that takes webhooks on one path (answering 202) and hands each to the test.
pub struct WebhookReceiver {
    pub server: RunningSim,
    received: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>,
}

impl WebhookReceiver {
    pub async fn start(path: &str) -> WebhookReceiver {
        let (tx, received) = mpsc::unbounded_channel();
        let router = Router::new().route(
            path,
            post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((headers, body));
                    StatusCode::ACCEPTED
                }
            }),
        );
        let server = kit::serve(router, any_port()).await.unwrap();
        WebhookReceiver { server, received }
    }

    /// The next webhook, or a failed test after 20 s.
    pub async fn next(&mut self) -> (HeaderMap, Bytes) {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("a webhook within 20 s")
            .expect("receiver open")
    }

    /// The webhooks that arrived and were not taken yet, without waiting for more.
    pub fn arrived(&mut self) -> Vec<(HeaderMap, Bytes)> {
        std::iter::from_fn(|| self.received.try_recv().ok()).collect()
    }

    /// The next `count` webhooks, in arrival order.
    pub async fn take(&mut self, count: usize) -> Vec<(HeaderMap, Bytes)> {
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            got.push(self.next().await);
        }
        got
    }
}

/// The whole service (HTTP intake, workers, pollers, sync engine, connectors) on a loopback port,
/// wired to the six simulators and a fresh database, as `tether serve` runs it.
pub struct Service {
    pub sims: Simulators,
    pub db: TestDb,
    pub config: Arc<Config>,
    /// `http://host:port` of the service.
    pub base: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Starts the simulators and the service; `overlay` is registry overlay TOML, and
    /// `extra_toml` is appended to the configuration the simulators describe.
    pub async fn start(overlay: Option<&str>, extra_toml: &str) -> Service {
        Service::start_layered(overlay, extra_toml, "").await
    }

    /// As [`Service::start`], with `layer_toml` read as a second configuration file over the
    /// first (so it may set keys of sections the simulators' configuration already has).
    pub async fn start_layered(
        overlay: Option<&str>,
        extra_toml: &str,
        layer_toml: &str,
    ) -> Service {
        Service::start_connected_at(overlay, extra_toml, layer_toml, Utc::now()).await
    }

    /// As [`Service::start_layered`], with every system first connected at `connected_at`
    /// (what changed before it is the past, which polling and reconciliation do not read).
    pub async fn start_connected_at(
        overlay: Option<&str>,
        extra_toml: &str,
        layer_toml: &str,
        connected_at: DateTime<Utc>,
    ) -> Service {
        let db = testing::database().await;
        let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let sims = Simulators::start(addr.ip(), &base).await.unwrap();
        let dir = std::env::temp_dir();
        let mut toml = sims.config_toml(addr, &dir, "300ms");
        let overlay_path = overlay.map(|text| {
            let path = dir.join(format!("tether-test-overlay-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            toml.push_str(&format!(
                "\n[registry]\noverlay = {:?}\n",
                path.display().to_string()
            ));
            path
        });
        toml.push_str(extra_toml);
        let mut source = Source::empty();
        source.add_toml(&toml, Path::new("test.toml")).unwrap();
        source
            .add_toml(layer_toml, Path::new("test-layer.toml"))
            .unwrap();
        let config = Arc::new(Config::from_source(source).unwrap());
        let (registry, _warnings) = tether::registry::load(overlay_path.as_deref()).unwrap();
        // The simulators deliver only to registered webhooks: register them as an operator
        // would (`tether webhooks install`), then count the tests' own calls from zero.
        tether::sandbox::install_webhooks(&config, &db.pool, &registry)
            .await
            .unwrap();
        sims.zendesk.control().reset_counters();
        // Connected before the test seeds anything, as an operator's first `serve` would be.
        tether::service::record_first_connections_at(&config, &db.pool, connected_at)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tether::service::run(
            config.clone(),
            db.pool.clone(),
            Arc::new(registry),
            Some(listener),
            shutdown.clone(),
        ));
        Service {
            sims,
            db,
            config,
            base,
            shutdown,
            task: Some(task),
        }
    }

    /// The target id the flow `flow_id` links to `source_id`, if an active link exists.
    pub async fn active_link(&self, flow_id: &str, source_id: &str) -> Option<String> {
        sqlx::query_scalar(
            "SELECT target_id FROM links WHERE state = 'active' AND flow_id = $1 AND source_id = $2",
        )
        .bind(flow_id)
        .bind(source_id)
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
    }

    /// Stops the service the way `kill -9` does: every task is dropped where it stands, nothing
    /// is released, leases run out on their own.
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Runs the service again on the same database, configuration and simulators (a restart
    /// after [`Service::kill`]); webhooks then reach no one, as after a crash of the listener.
    pub fn restart(&mut self, registry: tether::registry::Registry) {
        self.shutdown = CancellationToken::new();
        self.task = Some(tokio::spawn(tether::service::run(
            self.config.clone(),
            self.db.pool.clone(),
            Arc::new(registry),
            None,
            self.shutdown.clone(),
        )));
    }

    /// Shuts the service down the way SIGTERM does and fails the test if it ended in an error.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Zendesk: the simulator's credentials and a connector configured for it (or for `wiremock`).
pub mod zendesk {
    use std::time::Duration;

    use secrecy::SecretString;
    use tether::config::ZendeskConfig;
    use tether::connectors::zendesk::ZendeskConnector;
    use tether::simulators::kit::RunningSim;
    use tether::simulators::zendesk::{SimCredentials, SimOptions, ZendeskSim, ZendeskSimHandle};

    pub const EMAIL: &str = "agent@example.com";
    pub const TOKEN: &str = "api-token-SECRET-1";
    pub const OAUTH: &str = "oauth-SECRET-2";
    pub const WEBHOOK_SECRET: &str = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";

    pub fn config(base: &str) -> ZendeskConfig {
        ZendeskConfig {
            base_url: base.parse().unwrap(),
            email: Some(EMAIL.to_owned()),
            api_token: Some(SecretString::from(TOKEN)),
            oauth_token: None,
            webhook_secrets: vec![],
            rate_limit_per_minute: 60_000,
        }
    }

    /// A connector whose rate limits never slow a test down.
    pub fn connector(base: &str) -> ZendeskConnector {
        ZendeskConnector::new(&config(base), Duration::from_secs(5))
            .unwrap()
            .with_export_rate_per_minute(60_000)
    }

    /// The simulator, sending its webhooks to `target` if given. Its export limit is raised to
    /// the rate [`connector`] is configured for (as an account with a higher limit would have);
    /// the vendor's 10 a minute is tested on its own.
    pub async fn sim_with(target: Option<String>) -> (RunningSim, ZendeskSimHandle) {
        let (running, handle) = ZendeskSim::start(SimOptions {
            webhook_lanes: 1,
            bind: super::any_port(),
            credentials: SimCredentials {
                email: EMAIL.to_owned(),
                api_token: TOKEN.to_owned(),
                oauth_token: Some(OAUTH.to_owned()),
            },
            webhook_target: target,
            webhook_secret: WEBHOOK_SECRET.to_owned(),
        })
        .await
        .unwrap();
        handle.set_export_limit_per_minute(60_000);
        (running, handle)
    }

    /// The simulator without webhooks, and a connector to it.
    pub async fn sim() -> (RunningSim, ZendeskSimHandle, ZendeskConnector) {
        let (running, handle) = sim_with(None).await;
        let zd = connector(&running.base_url());
        (running, handle, zd)
    }
}

/// The custom-system contract (Customerp, Custom PMS): simulator and connector.
pub mod custom {
    use std::time::Duration;

    use secrecy::SecretString;
    use tether::config::CustomSystemConfig;
    use tether::connectors::custom::CustomConnector;
    use tether::domain::SystemId;
    use tether::simulators::custom::{CustomSim, CustomSimConfig};
    use tether::simulators::kit::RunningSim;

    pub const TOKEN: &str = "custom-token";
    pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// The system's configuration with `api_token`; no webhook secret, no polling.
    pub fn config(base: &str, api_token: &str) -> CustomSystemConfig {
        CustomSystemConfig {
            base_url: base.parse().unwrap(),
            api_token: SecretString::from(api_token),
            webhook_secret: None,
            poll_interval: None,
            conditional_writes: false,
        }
    }

    pub fn connector(system: SystemId, base: &str, timeout: Duration) -> CustomConnector {
        CustomConnector::new(system, &config(base, TOKEN), timeout).unwrap()
    }

    /// The simulator of `system`, signing its webhooks with [`SECRET`] and sending them to
    /// `target` if given.
    pub async fn sim(system: SystemId, target: Option<String>) -> (CustomSim, RunningSim) {
        CustomSim::start(
            CustomSimConfig {
                webhook_lanes: 1,
                system,
                api_token: TOKEN.to_owned(),
                webhook_secret: Some(SECRET.to_owned()),
                webhook_target: target,
            },
            super::any_port(),
        )
        .await
        .unwrap()
    }
}

/// CRMOffice: simulator and connector.
pub mod crmoffice {
    use std::time::Duration;

    use secrecy::SecretString;
    use tether::connectors::crmoffice::CrmOfficeConnector;
    use tether::simulators::crmoffice::CrmOfficeSim;
    use tether::simulators::kit::RunningSim;

    pub const TOKEN: &str = "crm-token";

    pub fn connector(base: &str, page_size: u32) -> CrmOfficeConnector {
        CrmOfficeConnector::with_token(
            base.parse().unwrap(),
            SecretString::from(TOKEN),
            Duration::from_secs(5),
        )
        .with_page_size(page_size)
    }

    pub async fn sim() -> (CrmOfficeSim, RunningSim) {
        CrmOfficeSim::start(TOKEN, super::any_port()).await.unwrap()
    }
}

/// Exact Online: the connector's configuration for one division.
pub mod exactonline {
    use std::time::Duration;

    use secrecy::SecretString;
    use tether::config::ExactConfig;

    pub const DIVISION: i64 = 123456;

    /// The simulator's client credentials with `refresh_token` as the seed token.
    pub fn config(base: &str, refresh_token: &str) -> ExactConfig {
        ExactConfig {
            base_url: url::Url::parse(base).unwrap(),
            division: DIVISION,
            client_id: "sim-client".to_owned(),
            client_secret: SecretString::from("sim-client-secret".to_owned()),
            refresh_token: SecretString::from(refresh_token.to_owned()),
            webhook_secret: None,
            poll_interval: Duration::from_secs(300),
        }
    }
}

/// PowerOffice Go v2: simulator and the connector's configuration.
pub mod poweroffice {
    use std::time::Duration;

    use secrecy::SecretString;
    use tether::config::PowerOfficeConfig;
    use tether::simulators::kit::RunningSim;
    use tether::simulators::poweroffice::{self as sim, PowerOfficeSimConfig};

    pub fn config(base: &str) -> PowerOfficeConfig {
        PowerOfficeConfig {
            base_url: url::Url::parse(&format!("{base}/v2")).unwrap(),
            token_url: None,
            application_key: SecretString::from("sim-application-key".to_owned()),
            client_key: SecretString::from("sim-client-key".to_owned()),
            subscription_key: SecretString::from("sim-subscription-key".to_owned()),
            poll_interval: Duration::from_secs(60),
        }
    }

    pub async fn start() -> (sim::PowerOfficeSim, RunningSim) {
        sim::start(PowerOfficeSimConfig::default(), super::any_port())
            .await
            .unwrap()
    }
}
