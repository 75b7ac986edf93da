//! The running service, assembled: connectors built from the configuration, the sync engine as
//! the queue's job handler, pollers for what sends no webhooks, and the HTTP side.
//!
//! `tether serve` and `tether sandbox` both run [`run`]; they differ only in where the
//! configuration and the database come from.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connectors::{self, Connector};
use crate::domain::SystemId;
use crate::polling::{PollKind, PollerSpec};
use crate::registry::Registry;
use std::time::Duration;

/// One client per connected system (a system without a configuration section has none).
pub fn build_connectors(
    config: &Config,
    pool: &PgPool,
) -> anyhow::Result<HashMap<SystemId, Arc<dyn Connector>>> {
    let timeout = config.outbound.timeout;
    // Vendor limits are per account, so every replica counts them in one place.
    let budgets = connectors::transport::Budgets::Shared(pool.clone());
    let systems = &config.systems;
    let mut out: HashMap<SystemId, Arc<dyn Connector>> = HashMap::new();
    if let Some(zendesk) = &systems.zendesk {
        out.insert(
            SystemId::Zendesk,
            Arc::new(connectors::zendesk::ZendeskConnector::with_budgets(
                zendesk,
                timeout,
                budgets.clone(),
            )?),
        );
    }
    if let Some(exact) = &systems.exactonline {
        out.insert(
            SystemId::ExactOnline,
            Arc::new(connectors::exactonline::ExactOnline::configured(
                exact.clone(),
                pool.clone(),
                timeout,
                crate::at_rest::Keyring::from_config(&config.secrets.keys).map(Arc::new),
                budgets.clone(),
            )),
        );
    }
    if let Some(poweroffice) = &systems.poweroffice {
        out.insert(
            SystemId::PowerOffice,
            Arc::new(connectors::poweroffice::PowerOffice::with_budgets(
                poweroffice.clone(),
                timeout,
                budgets.clone(),
            )),
        );
    }
    if let Some(crm) = &systems.crmoffice {
        out.insert(
            SystemId::CrmOffice,
            Arc::new(connectors::crmoffice::CrmOfficeConnector::configured(
                crm,
                pool,
                timeout,
                crate::at_rest::Keyring::from_config(&config.secrets.keys).map(Arc::new),
            )),
        );
    }
    for (system, section) in [
        (SystemId::CustomErp, &systems.customerp),
        (SystemId::CustomPms, &systems.custompms),
    ] {
        if let Some(section) = section {
            out.insert(
                system,
                Arc::new(connectors::custom::CustomConnector::new(
                    system, section, timeout,
                )?),
            );
        }
    }
    Ok(out)
}

/// The entity types to read on an interval: every type a dataflow touches whose changes do not
/// arrive as webhooks (PowerOffice Go v2 and CRMOffice send none; Exact has a webhook topic only
/// for Accounts) is polled; every webhook-driven type (Zendesk's, Exact Accounts, custom systems')
/// is reconciled every `reconcile_interval` (a custom system's `poll_interval`, if set, instead).
pub fn poller_specs(
    config: &Config,
    registry: &Registry,
    connectors: &HashMap<SystemId, Arc<dyn Connector>>,
) -> Vec<PollerSpec> {
    let systems = &config.systems;
    let mut seen = std::collections::BTreeSet::new();
    let mut specs = Vec::new();
    for flow in registry.dataflows.iter().filter(|f| f.switches.enabled) {
        for side in [&flow.source, &flow.target] {
            let schedule = schedule(systems, side.system, &side.entity_type);
            let (Some((interval, kind)), Some(connector)) =
                (schedule, connectors.get(&side.system))
            else {
                continue;
            };
            if seen.insert((side.system, side.entity_type.clone())) {
                specs.push(PollerSpec {
                    connector: connector.clone(),
                    entity_type: side.entity_type.clone(),
                    interval,
                    kind,
                });
            }
        }
    }
    // Exact reports deletions of every type in one stream, `sync/Deleted`, read on the
    // reconciliation interval whenever a flow touches Exact (rule 9: deletes end links).
    let exact_used = seen.iter().any(|(s, _)| *s == SystemId::ExactOnline);
    if let (true, Some(connector)) = (exact_used, connectors.get(&SystemId::ExactOnline)) {
        specs.push(PollerSpec {
            connector: connector.clone(),
            entity_type: connectors::DELETIONS.to_owned(),
            interval: systems.reconcile.exactonline,
            kind: PollKind::Reconcile,
        });
    }
    specs
}

/// How often a type is read and why: polled (no webhooks for it) or reconciled (webhook-driven).
fn schedule(
    systems: &crate::config::SystemsConfig,
    system: SystemId,
    entity_type: &str,
) -> Option<(Duration, PollKind)> {
    let reconcile = systems
        .reconcile
        .of(system)
        .map(|d| (d, PollKind::Reconcile));
    let poll = |d: Duration| Some((d, PollKind::Poll));
    match system {
        SystemId::Zendesk => reconcile,
        SystemId::PowerOffice => systems
            .poweroffice
            .as_ref()
            .and_then(|c| poll(c.poll_interval)),
        SystemId::CrmOffice => systems
            .crmoffice
            .as_ref()
            .and_then(|c| poll(c.poll_interval)),
        SystemId::ExactOnline if entity_type != "Accounts" => systems
            .exactonline
            .as_ref()
            .and_then(|c| poll(c.poll_interval)),
        SystemId::ExactOnline => reconcile,
        SystemId::CustomErp => systems
            .customerp
            .as_ref()
            .and_then(|c| c.poll_interval)
            .map_or(reconcile, poll),
        SystemId::CustomPms => systems
            .custompms
            .as_ref()
            .and_then(|c| c.poll_interval)
            .map_or(reconcile, poll),
    }
}

/// Records now as the first connection of every configured system that has none yet: poll and
/// reconciliation cursors start there. `run` calls it; the sandbox and the test harness call it
/// before they seed records, so what they seed is new to Tether.
pub async fn record_first_connections(config: &Config, pool: &PgPool) -> Result<(), sqlx::Error> {
    record_first_connections_at(config, pool, chrono::Utc::now()).await
}

/// As [`record_first_connections`], at a given moment (tests of systems connected earlier).
pub async fn record_first_connections_at(
    config: &Config,
    pool: &PgPool,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    let connected = SystemId::ALL
        .iter()
        .copied()
        .filter(|s| config.systems.is_connected(*s));
    crate::polling::connections::record_first(pool, connected, at).await
}

/// Runs HTTP (if enabled and a listener is given), workers (if enabled) and pollers until
/// `shutdown` is cancelled, then waits for them within `shutdown_timeout`.
pub async fn run(
    config: Arc<Config>,
    pool: PgPool,
    registry: Arc<Registry>,
    listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::ops::metrics::install();
    seal_credentials(&config, &pool).await?;
    let connectors = build_connectors(&config, &pool)?;
    record_first_connections(&config, &pool).await?;
    let mut tasks = tokio::task::JoinSet::new();
    spawn_metrics(&mut tasks, &config, &pool, &shutdown).await?;
    // Shared by this process's engine and intake (`crate::sync::storing`).
    let storing = crate::sync::StoringWrites::default();
    if let Some(listener) = listener.filter(|_| config.http.enabled) {
        tracing::info!(address = %listener.local_addr()?, "listening");
        let state = crate::http::AppState {
            pool: pool.clone(),
            config: config.clone(),
            registry: registry.clone(),
            storing: storing.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(async move {
            if let Err(e) = crate::http::serve(listener, state).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    if config.workers.enabled {
        let work = Work {
            config: &config,
            pool: &pool,
            registry: &registry,
            storing: &storing,
            shutdown: &shutdown,
        };
        work.spawn(&mut tasks, connectors);
    }
    shutdown.cancelled().await;
    drain(tasks, config.shutdown_timeout).await;
    Ok(())
}

/// Before any token is read: seal clear rows under `secrets.key`, or refuse without the key.
async fn seal_credentials(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    let keyring = crate::at_rest::Keyring::from_config(&config.secrets.keys);
    let sealed = crate::at_rest::seal_stored_credentials(pool, keyring.as_ref()).await?;
    if sealed.values > 0 {
        tracing::info!(
            values = sealed.values,
            "stored credentials encrypted under the first secrets.key"
        );
    }
    Ok(())
}

/// `/metrics` on its own listener when `metrics.listen` is set.
async fn spawn_metrics(
    tasks: &mut tokio::task::JoinSet<()>,
    config: &Config,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(address) = config.metrics.listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} (metrics.listen): {e}"))?;
    let (pool, shutdown) = (pool.clone(), shutdown.clone());
    tasks.spawn(async move {
        if let Err(e) = crate::ops::serve_metrics(listener, pool, shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(())
}

/// What the worker side of a process is started from.
struct Work<'a> {
    config: &'a Arc<Config>,
    pool: &'a PgPool,
    registry: &'a Arc<Registry>,
    storing: &'a crate::sync::StoringWrites,
    shutdown: &'a CancellationToken,
}

impl Work<'_> {
    /// The sync engine, its workers, the pollers and the credentials watch.
    fn spawn(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        connectors: HashMap<SystemId, Arc<dyn Connector>>,
    ) {
        let (config, pool, shutdown) = (self.config, self.pool, self.shutdown);
        let pollers = poller_specs(config, self.registry, &connectors);
        tracing::info!(
            pollers = pollers.len(),
            connected = connectors.len(),
            "starting workers"
        );
        let engine = Arc::new(
            crate::sync::SyncEngine::new(pool.clone(), self.registry.clone(), connectors)
                .with_guard(config.guard)
                .with_storing(self.storing.clone()),
        );
        // Credentials handed over with `tether credentials set` lift a stop without a restart.
        tasks.spawn(crate::credentials::watch(
            pool.clone(),
            engine.clone(),
            shutdown.clone(),
        ));
        // The workers get most of the shutdown bound to drain in-flight jobs, keeping some to
        // release the leases of the rest and write outcomes back.
        let workers = crate::queue::start_workers(
            pool.clone(),
            config.workers.clone(),
            engine,
            shutdown.clone(),
            config.shutdown_timeout.mul_f64(0.8),
        );
        let pollers = crate::polling::start_pollers(pool.clone(), pollers, shutdown.clone());
        tasks.spawn(async move {
            let _ = workers.await;
        });
        tasks.spawn(async move {
            let _ = pollers.await;
        });
    }
}

/// Waits for every task up to `bound`, then leaves the rest (their leases release their jobs).
async fn drain(mut tasks: tokio::task::JoinSet<()>, bound: Duration) {
    let drained =
        tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            timeout = ?bound,
            "shutdown bound reached; leaving the rest (unfinished jobs are released by their leases)"
        );
        tasks.abort_all();
    }
}
