//! Exact Online's half of webhook registration: one `WebhookSubscription` per topic the enabled
//! dataflows need, at `<public_url>/webhooks/exactonline` (docs/vendors.md, Exact Online "Webhook
//! subscriptions"). Exact signs every webhook with the app's webhook secret
//! (`exactonline.webhook_secret`), so nothing secret is stored per subscription.

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlx::PgPool;

use super::store::{self, Registration};
use super::{endpoint, HookState, Installed, Outcome, Removed, Status, VendorView, WebhookError};
use crate::config::Config;
use crate::connectors::exactonline::subscriptions::Subscription;
use crate::connectors::exactonline::ExactOnline;
use crate::connectors::transport::Budgets;
use crate::connectors::ConnectorError;
use crate::domain::SystemId;
use crate::registry::Registry;

const SYSTEM: SystemId = SystemId::ExactOnline;

/// The Exact webhook topic of a registry entity type, if Exact has one. Departments and
/// divisions have none (they are polled).
pub fn topic(entity_type: &str) -> Option<&'static str> {
    match entity_type {
        "Accounts" => Some("Accounts"),
        _ => None,
    }
}

/// The topics the enabled dataflows need: each Exact type an enabled flow touches, either way.
pub fn topics(registry: &Registry) -> Vec<String> {
    let topics: BTreeSet<&str> = registry
        .dataflows
        .iter()
        .filter(|f| f.switches.enabled)
        .flat_map(|f| [&f.source, &f.target])
        .filter(|e| e.system == SYSTEM)
        .filter_map(|e| topic(&e.entity_type))
        .collect();
    topics.into_iter().map(str::to_owned).collect()
}

/// The connector, as `serve` builds it (stored rotating tokens, the shared minute budget).
fn connector(config: &Config, pool: &PgPool) -> Result<ExactOnline, WebhookError> {
    let exact = config
        .systems
        .exactonline
        .as_ref()
        .ok_or(WebhookError::NotConnected("exactonline"))?;
    Ok(ExactOnline::configured(
        exact.clone(),
        pool.clone(),
        config.outbound.timeout,
        crate::at_rest::Keyring::from_config(&config.secrets.keys).map(Arc::new),
        Budgets::Shared(pool.clone()),
    ))
}

fn vendor(e: ConnectorError) -> WebhookError {
    WebhookError::Http(e.to_string())
}

/// Subscribes the callback to every needed topic it is not subscribed to yet. Idempotent: an
/// existing subscription of the same callback and topic is kept (and, if made outside Tether,
/// recorded as taken over, so uninstall leaves it).
pub async fn install(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
) -> Result<Installed, WebhookError> {
    let callback = endpoint(config, SYSTEM)?;
    let needed = topics(registry);
    if needed.is_empty() {
        return Err(WebhookError::NothingNeeded(SYSTEM));
    }
    let exact = connector(config, pool)?;
    let existing = exact.webhook_subscriptions().await.map_err(vendor)?;
    let known = store::list(pool, SYSTEM).await?;
    let mut outcome = Outcome::Updated;
    let mut ids = Vec::new();
    for topic in &needed {
        let found = existing
            .iter()
            .find(|s| &s.topic == topic && s.callback_url == callback);
        let (sub, created_by_tether) = match found {
            Some(s) => {
                let ours = known
                    .iter()
                    .any(|r| r.vendor_id == s.id && r.created_by_tether);
                (s.clone(), ours)
            }
            None => {
                outcome = Outcome::Created;
                let made = exact
                    .subscribe_webhook(&callback, topic, "Tether")
                    .await
                    .map_err(vendor)?;
                (made, true)
            }
        };
        save(pool, &sub, created_by_tether).await?;
        ids.push(sub.id);
    }
    tracing::info!(system = %SYSTEM, topics = needed.len(), "webhook subscriptions installed");
    Ok(Installed {
        system: SYSTEM,
        vendor_id: ids.join(", "),
        endpoint: callback,
        topics: needed,
        outcome,
    })
}

async fn save(
    pool: &PgPool,
    sub: &Subscription,
    created_by_tether: bool,
) -> Result<(), WebhookError> {
    let registration = Registration {
        system: SYSTEM,
        vendor_id: sub.id.clone(),
        endpoint: sub.callback_url.clone(),
        topics: vec![sub.topic.clone()],
        created_by_tether,
    };
    Ok(store::save(pool, None, &registration, None).await?)
}

/// Exact's view of each recorded subscription (Exact has no deactivated state: a subscription
/// exists or not).
pub async fn status(config: &Config, pool: &PgPool) -> Result<Status, WebhookError> {
    let exact = connector(config, pool)?;
    let existing = exact.webhook_subscriptions().await.map_err(vendor)?;
    let webhooks = store::list(pool, SYSTEM)
        .await?
        .into_iter()
        .map(|r| match existing.iter().find(|s| s.id == r.vendor_id) {
            Some(s) => VendorView {
                vendor_id: s.id.clone(),
                state: Some(HookState::Active),
                endpoint: s.callback_url.clone(),
                topics: vec![s.topic.clone()],
            },
            None => VendorView {
                vendor_id: r.vendor_id,
                state: None,
                endpoint: r.endpoint,
                topics: r.topics,
            },
        })
        .collect();
    Ok(Status {
        system: SYSTEM,
        webhooks,
        last_delivery: store::last_delivery(pool, SYSTEM).await?,
    })
}

/// Deletes the subscriptions install made; forgets the ones it took over without deleting them.
pub async fn uninstall(config: &Config, pool: &PgPool) -> Result<Vec<Removed>, WebhookError> {
    let exact = connector(config, pool)?;
    let mut done = Vec::new();
    for registration in store::list(pool, SYSTEM).await? {
        let id = registration.vendor_id.clone();
        if registration.created_by_tether {
            exact.unsubscribe_webhook(&id).await.map_err(vendor)?;
            done.push(Removed::Deleted(id.clone()));
        } else {
            done.push(Removed::LeftInPlace(id.clone()));
        }
        store::forget(pool, SYSTEM, &id).await?;
    }
    Ok(done)
}
