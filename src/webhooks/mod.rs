//! Webhook registration (`tether webhooks install|status|uninstall`): Tether creates the
//! vendor-side webhook that sends it changes, stores its signing secret (sealed with
//! `secrets.key`, see `at_rest`) so intake accepts it at once, shows the vendor's view of it and
//! removes what it made.
//!
//! Owns: the `webhook_registrations` table ([`store`]), the vendors' webhook-management APIs
//! ([`zendesk`]), which event types the enabled dataflows need ([`zendesk_events`]).
//! Called by: `cli`, `sandbox`, and `intake` (which reads [`store::StoredSecrets`]).

pub mod exactonline;
pub mod store;
pub mod zendesk;

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::PgPool;

use crate::at_rest::Keyring;
use crate::config::Config;
use crate::domain::SystemId;
use crate::registry::Registry;
use store::Registration;

/// Why a webhook command failed. Messages never hold a secret or a credential.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("`public_url` is not set: it is the address vendors reach Tether at (e.g. https://tether.example.com); set it or TETHER_PUBLIC_URL")]
    NoPublicUrl,
    #[error("{0} is not connected (no [{0}] configuration section)")]
    NotConnected(&'static str),
    #[error("the [{0}] section has no credentials that can manage webhooks")]
    NoCredentials(&'static str),
    #[error("{0} webhooks are not registered by Tether (zendesk and exactonline are)")]
    Unsupported(SystemId),
    #[error("no enabled dataflow needs {0}'s events; nothing to subscribe to")]
    NothingNeeded(SystemId),
    #[error("cannot reach the vendor: {0}")]
    Http(String),
    #[error("{system} answered {status}: {body}")]
    Vendor {
        system: &'static str,
        status: u16,
        body: String,
    },
    #[error("unexpected answer from {0}")]
    Shape(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// The Zendesk event types each entity type's changes come as (docs/vendors.md, Zendesk
/// "Webhooks API"; the intake maps them back in `intake::parse::zendesk`).
pub fn zendesk_event_types(entity_type: &str) -> &'static [&'static str] {
    match entity_type {
        "Organizations" => &[
            "organization.created",
            "organization.deleted",
            "organization.name_changed",
            "organization.external_id_changed",
            "organization.tags_changed",
            "organization.custom_field_changed",
        ],
        "Users" => &[
            "user.created",
            "user.deleted",
            "user.name_changed",
            "user.identity_changed",
            "user.external_id_changed",
            "user.tags_changed",
            "user.role_changed",
            "user.details_changed",
            "user.notes_changed",
            "user.default_group_changed",
            "user.suspended_changed",
            "user.time_zone_changed",
            "user.custom_field_changed",
            "user.organization_membership_created",
            "user.organization_membership_deleted",
        ],
        "Tickets" => &[
            "ticket.created",
            "ticket.status_changed",
            "ticket.priority_changed",
            "ticket.subject_changed",
            "ticket.agent_assignment_changed",
            "ticket.group_assignment_changed",
            "ticket.organization_changed",
            "ticket.requester_changed",
            "ticket.external_id_changed",
            "ticket.type_changed",
            "ticket.custom_field_changed",
            "ticket.tags_changed",
            "ticket.soft_deleted",
            "ticket.permanently_deleted",
            "ticket.undeleted",
        ],
        "Ticketcomments" => &[
            "ticket.comment_added",
            "ticket.comment_redacted",
            "ticket.comment_made_private",
        ],
        _ => &[],
    }
}

/// The `zen:event-type:…` subscriptions the enabled dataflows need: every event type of each
/// Zendesk entity type an enabled flow touches, either way (a flow into Zendesk needs its deletes
/// to end links, and its edits where the flow syncs back). Sorted, without duplicates.
pub fn zendesk_events(registry: &Registry) -> Vec<String> {
    let entity_types: BTreeSet<&str> = registry
        .dataflows
        .iter()
        .filter(|f| f.switches.enabled)
        .flat_map(|f| [&f.source, &f.target])
        .filter(|e| e.system == SystemId::Zendesk)
        .map(|e| e.entity_type.as_str())
        .collect();
    let events: BTreeSet<String> = entity_types
        .into_iter()
        .flat_map(|t| zendesk_event_types(t).iter())
        .map(|e| format!("zen:event-type:{e}"))
        .collect();
    events.into_iter().collect()
}

/// Where vendors deliver `system`'s webhooks: `<public_url>/webhooks/<system>`.
pub fn endpoint(config: &Config, system: SystemId) -> Result<String, WebhookError> {
    let base = config
        .public_url
        .as_ref()
        .ok_or(WebhookError::NoPublicUrl)?;
    Ok(format!(
        "{}/webhooks/{system}",
        base.as_str().trim_end_matches('/')
    ))
}

/// What install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Found by its endpoint and brought up to date (or already right).
    Updated,
}

/// The result of `install`, printable; holds no secret.
#[derive(Debug, Clone)]
pub struct Installed {
    pub system: SystemId,
    pub vendor_id: String,
    pub endpoint: String,
    pub topics: Vec<String>,
    pub outcome: Outcome,
}

impl std::fmt::Display for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match self.outcome {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
        };
        writeln!(
            f,
            "{} webhook {} {verb}: {}",
            self.system, self.vendor_id, self.endpoint
        )?;
        writeln!(f, "subscribed to {} event types:", self.topics.len())?;
        for topic in &self.topics {
            writeln!(f, "  {topic}")?;
        }
        match self.system {
            // Exact signs with the app's webhook secret: nothing to store per subscription.
            SystemId::ExactOnline => write!(
                f,
                "Exact signs them with the app's webhook secret (exactonline.webhook_secret)"
            ),
            _ => write!(f, "signing secret stored; intake accepts it within seconds"),
        }
    }
}

fn zendesk_client(config: &Config) -> Result<zendesk::Client, WebhookError> {
    let zd = config
        .systems
        .zendesk
        .as_ref()
        .ok_or(WebhookError::NotConnected("zendesk"))?;
    zendesk::Client::new(zd, config.outbound.timeout.min(Duration::from_secs(30)))
}

/// Creates or updates Tether's webhook at `system` and stores its signing secret. Idempotent.
pub async fn install(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
    system: SystemId,
) -> Result<Installed, WebhookError> {
    match system {
        SystemId::Zendesk => install_zendesk(config, pool, registry).await,
        SystemId::ExactOnline => exactonline::install(config, pool, registry).await,
        other => Err(WebhookError::Unsupported(other)),
    }
}

async fn install_zendesk(
    config: &Config,
    pool: &PgPool,
    registry: &Registry,
) -> Result<Installed, WebhookError> {
    let system = SystemId::Zendesk;
    let endpoint = endpoint(config, system)?;
    let topics = zendesk_events(registry);
    if topics.is_empty() {
        return Err(WebhookError::NothingNeeded(system));
    }
    let client = zendesk_client(config)?;
    let existing = client
        .list()
        .await?
        .into_iter()
        .find(|w| w.endpoint == endpoint);
    let known = store::list(pool, system).await?;
    let (hook_id, outcome, created_by_tether) = match existing {
        Some(hook) => {
            client.update(&hook.id, &endpoint, &topics).await?;
            // Made by an earlier install: still ours. Otherwise taken over, and left on uninstall.
            let ours = known
                .iter()
                .any(|r| r.vendor_id == hook.id && r.created_by_tether);
            (hook.id, Outcome::Updated, ours)
        }
        None => (
            client.create(&endpoint, &topics).await?.id,
            Outcome::Created,
            true,
        ),
    };
    let secret = client.signing_secret(&hook_id).await?;
    let keyring = Keyring::from_config(&config.secrets.keys);
    let registration = Registration {
        system,
        vendor_id: hook_id.clone(),
        endpoint: endpoint.clone(),
        topics: topics.clone(),
        created_by_tether,
    };
    store::save(pool, keyring.as_ref(), &registration, Some(&secret)).await?;
    tracing::info!(%system, webhook = %hook_id, topics = topics.len(), "webhook installed");
    Ok(Installed {
        system,
        vendor_id: hook_id,
        endpoint,
        topics,
        outcome,
    })
}

/// The vendor's view of one registration, next to Tether's last delivery.
#[derive(Debug, Clone)]
pub struct Status {
    pub system: SystemId,
    pub webhooks: Vec<VendorView>,
    pub last_delivery: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone)]
pub struct VendorView {
    pub vendor_id: String,
    /// `None`: the vendor no longer has it.
    pub state: Option<HookState>,
    pub endpoint: String,
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookState {
    Active,
    Deactivated,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self
            .last_delivery
            .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339());
        writeln!(f, "{}: last delivery received {last}", self.system)?;
        if self.webhooks.is_empty() {
            return write!(
                f,
                "  no webhook installed (run `tether webhooks install {}`)",
                self.system
            );
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let state = match w.state {
                Some(HookState::Active) => "active",
                Some(HookState::Deactivated) => "deactivated",
                None => "missing at the vendor (run install again)",
            };
            write!(
                f,
                "  webhook {} {state}: {}, {} topics: {}",
                w.vendor_id,
                w.endpoint,
                w.topics.len(),
                w.topics.join(", ")
            )?;
            if i + 1 < self.webhooks.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// `tether webhooks status <system>`.
pub async fn status(
    config: &Config,
    pool: &PgPool,
    system: SystemId,
) -> Result<Status, WebhookError> {
    match system {
        SystemId::Zendesk => status_zendesk(config, pool).await,
        SystemId::ExactOnline => exactonline::status(config, pool).await,
        other => Err(WebhookError::Unsupported(other)),
    }
}

async fn status_zendesk(config: &Config, pool: &PgPool) -> Result<Status, WebhookError> {
    let system = SystemId::Zendesk;
    let client = zendesk_client(config)?;
    let mut webhooks = Vec::new();
    for registration in store::list(pool, system).await? {
        let view = match client.show(&registration.vendor_id).await? {
            Some(hook) => VendorView {
                vendor_id: hook.id,
                state: Some(if hook.status == "active" {
                    HookState::Active
                } else {
                    HookState::Deactivated
                }),
                endpoint: hook.endpoint,
                topics: hook.subscriptions,
            },
            None => VendorView {
                vendor_id: registration.vendor_id,
                state: None,
                endpoint: registration.endpoint,
                topics: registration.topics,
            },
        };
        webhooks.push(view);
    }
    Ok(Status {
        system,
        webhooks,
        last_delivery: store::last_delivery(pool, system).await?,
    })
}

/// What uninstall did with one registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    Deleted(String),
    /// Existed before Tether took it over: left at the vendor, forgotten here.
    LeftInPlace(String),
}

/// `tether webhooks uninstall <system>`: deletes the webhooks install created, forgets their
/// secrets, and leaves any it only took over.
pub async fn uninstall(
    config: &Config,
    pool: &PgPool,
    system: SystemId,
) -> Result<Vec<Removed>, WebhookError> {
    match system {
        SystemId::Zendesk => uninstall_zendesk(config, pool).await,
        SystemId::ExactOnline => exactonline::uninstall(config, pool).await,
        other => Err(WebhookError::Unsupported(other)),
    }
}

async fn uninstall_zendesk(config: &Config, pool: &PgPool) -> Result<Vec<Removed>, WebhookError> {
    let system = SystemId::Zendesk;
    let client = zendesk_client(config)?;
    let mut done = Vec::new();
    for registration in store::list(pool, system).await? {
        if registration.created_by_tether {
            client.delete(&registration.vendor_id).await?;
            done.push(Removed::Deleted(registration.vendor_id.clone()));
        } else {
            done.push(Removed::LeftInPlace(registration.vendor_id.clone()));
        }
        store::forget(pool, system, &registration.vendor_id).await?;
    }
    Ok(done)
}
