//! The one table of what differs between the six systems, outside their connectors: the
//! configuration section, how changes reach Tether (which webhook signature scheme, which entity
//! types are polled and how often) and how the system's connector is built.
//!
//! Intake (which verifier a `POST /webhooks/{system}` gets), service (which connectors and
//! pollers run) read this table instead of matching on [`SystemId`] each. A new system is one
//! more row here plus its connector; docs/architecture.md ("The per-system table") explains it.
//!
//! May call: `config` (the sections), `connectors` (their constructors). Called by: `intake`,
//! `service`.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::{Config, CustomSystemConfig, SystemsConfig};
use crate::connectors::{self, Connector};
use crate::domain::SystemId;

/// How a system signs the webhooks it sends (the schemes themselves are in `crate::signing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookScheme {
    /// `X-Zendesk-Webhook-Signature` over timestamp + body; several secrets during a rotation.
    Zendesk,
    /// Exact Online's `HashCode` inside the body, over the raw `Content` text.
    ExactHashCode,
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks,
}

impl WebhookScheme {
    /// The configuration key (in the system's section) holding the secret(s).
    pub fn secret_key(self) -> &'static str {
        match self {
            WebhookScheme::Zendesk => "webhook_secrets",
            WebhookScheme::ExactHashCode | WebhookScheme::StandardWebhooks => "webhook_secret",
        }
    }
}

/// How a system's changes reach Tether.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changes {
    /// Signed webhooks for every entity type; not polled, only reconciled every
    /// `reconcile_interval` (`service::poller_specs`).
    Webhooks(WebhookScheme),
    /// Signed webhooks for the listed entity types only; the others are polled.
    WebhooksFor(WebhookScheme, &'static [&'static str]),
    /// Signed webhooks for every entity type, and a reconciliation poll of every type when the
    /// section sets the optional `poll_interval`.
    WebhooksAndOptionalPoll(WebhookScheme),
    /// No webhooks: every entity type is polled.
    Polled,
}

/// What building a connector gives: `None` when the system's section is absent.
pub type Connected = anyhow::Result<Option<Arc<dyn Connector>>>;

/// One row of the table.
pub struct SystemSpec {
    pub id: SystemId,
    /// The configuration section (`[zendesk]`); without it the system is not connected.
    pub section: &'static str,
    pub changes: Changes,
    /// The configured webhook secrets (empty when unset or when the section is absent).
    webhook_secrets: fn(&SystemsConfig) -> Vec<SecretString>,
    /// The section's polling interval, if the section is there and has one.
    poll_interval: fn(&SystemsConfig) -> Option<Duration>,
    /// The connector, or `None` when the section is absent.
    connect: fn(&Config, &PgPool) -> Connected,
}

impl SystemSpec {
    /// The scheme its webhooks are signed with; `None` for a system that sends none.
    pub fn webhook_scheme(&self) -> Option<WebhookScheme> {
        match self.changes {
            Changes::Webhooks(scheme)
            | Changes::WebhooksFor(scheme, _)
            | Changes::WebhooksAndOptionalPoll(scheme) => Some(scheme),
            Changes::Polled => None,
        }
    }

    pub fn webhook_secrets(&self, systems: &SystemsConfig) -> Vec<SecretString> {
        (self.webhook_secrets)(systems)
    }

    /// How often to poll `entity_type`, or `None` when its changes arrive only by webhook (or
    /// the system is not connected).
    pub fn poll_interval(&self, systems: &SystemsConfig, entity_type: &str) -> Option<Duration> {
        let interval = (self.poll_interval)(systems)?;
        let polled = match self.changes {
            Changes::Webhooks(_) => false,
            Changes::WebhooksFor(_, announced) => !announced.contains(&entity_type),
            Changes::WebhooksAndOptionalPoll(_) | Changes::Polled => true,
        };
        polled.then_some(interval)
    }

    /// The system's connector, or `None` when its section is absent.
    pub fn connect(&self, config: &Config, pool: &PgPool) -> Connected {
        (self.connect)(config, pool)
    }
}

/// The row of `system`.
pub fn spec(system: SystemId) -> &'static SystemSpec {
    TABLE
        .iter()
        .find(|s| s.id == system)
        .expect("the table has a row for every SystemId (checked by a unit test)")
}

/// Exact Online's webhook topics that carry a dataflow's entity type (its other types, such as
/// Departments and Divisions, have no topic and are polled). docs/vendors.md lists the topics.
const EXACT_WEBHOOK_TYPES: &[&str] = &["Accounts"];

static TABLE: [SystemSpec; 6] = [
    SystemSpec {
        id: SystemId::Zendesk,
        section: "zendesk",
        changes: Changes::Webhooks(WebhookScheme::Zendesk),
        webhook_secrets: |s| {
            s.zendesk
                .as_ref()
                .map(|c| c.webhook_secrets.clone())
                .unwrap_or_default()
        },
        poll_interval: |_| None,
        connect: |config, _| {
            let Some(section) = &config.systems.zendesk else {
                return Ok(None);
            };
            let connector =
                connectors::zendesk::ZendeskConnector::new(section, config.outbound.timeout)?;
            Ok(Some(Arc::new(connector)))
        },
    },
    SystemSpec {
        id: SystemId::ExactOnline,
        section: "exactonline",
        changes: Changes::WebhooksFor(WebhookScheme::ExactHashCode, EXACT_WEBHOOK_TYPES),
        webhook_secrets: |s| {
            s.exactonline
                .as_ref()
                .and_then(|c| c.webhook_secret.clone())
                .into_iter()
                .collect()
        },
        poll_interval: |s| s.exactonline.as_ref().map(|c| c.poll_interval),
        connect: |config, pool| {
            Ok(config.systems.exactonline.as_ref().map(|section| {
                Arc::new(connectors::exactonline::ExactOnline::new(
                    section.clone(),
                    pool.clone(),
                    config.outbound.timeout,
                )) as Arc<dyn Connector>
            }))
        },
    },
    SystemSpec {
        id: SystemId::PowerOffice,
        section: "poweroffice",
        changes: Changes::Polled,
        webhook_secrets: |_| Vec::new(),
        poll_interval: |s| s.poweroffice.as_ref().map(|c| c.poll_interval),
        connect: |config, _| {
            Ok(config.systems.poweroffice.as_ref().map(|section| {
                Arc::new(connectors::poweroffice::PowerOffice::new(
                    section.clone(),
                    config.outbound.timeout,
                )) as Arc<dyn Connector>
            }))
        },
    },
    SystemSpec {
        id: SystemId::CrmOffice,
        section: "crmoffice",
        changes: Changes::Polled,
        webhook_secrets: |_| Vec::new(),
        poll_interval: |s| s.crmoffice.as_ref().map(|c| c.poll_interval),
        connect: |config, pool| {
            Ok(config.systems.crmoffice.as_ref().map(|section| {
                Arc::new(connectors::crmoffice::CrmOfficeConnector::configured(
                    section,
                    pool,
                    config.outbound.timeout,
                    crate::at_rest::Keyring::from_config(&config.secrets.keys).map(Arc::new),
                )) as Arc<dyn Connector>
            }))
        },
    },
    SystemSpec {
        id: SystemId::CustomErp,
        section: "customerp",
        changes: Changes::WebhooksAndOptionalPoll(WebhookScheme::StandardWebhooks),
        webhook_secrets: |s| {
            s.customerp
                .as_ref()
                .and_then(|c| c.webhook_secret.clone())
                .into_iter()
                .collect()
        },
        poll_interval: |s| s.customerp.as_ref().and_then(|c| c.poll_interval),
        connect: |config, _| {
            custom_connector(
                SystemId::CustomErp,
                config.systems.customerp.as_ref(),
                config,
            )
        },
    },
    SystemSpec {
        id: SystemId::CustomPms,
        section: "custompms",
        changes: Changes::WebhooksAndOptionalPoll(WebhookScheme::StandardWebhooks),
        webhook_secrets: |s| {
            s.custompms
                .as_ref()
                .and_then(|c| c.webhook_secret.clone())
                .into_iter()
                .collect()
        },
        poll_interval: |s| s.custompms.as_ref().and_then(|c| c.poll_interval),
        connect: |config, _| {
            custom_connector(
                SystemId::CustomPms,
                config.systems.custompms.as_ref(),
                config,
            )
        },
    },
];

/// Both custom systems speak the one contract (README, "The custom-system contract").
fn custom_connector(
    system: SystemId,
    section: Option<&CustomSystemConfig>,
    config: &Config,
) -> Connected {
    let Some(section) = section else {
        return Ok(None);
    };
    let connector =
        connectors::custom::CustomConnector::new(system, section, config.outbound.timeout)?;
    Ok(Some(Arc::new(connector)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_system_has_exactly_one_row_named_after_its_section() {
        for system in SystemId::ALL {
            let rows: Vec<_> = TABLE.iter().filter(|s| s.id == system).collect();
            assert_eq!(rows.len(), 1, "{system}");
            assert_eq!(rows[0].section, system.as_str());
        }
    }

    #[test]
    fn polling_follows_how_changes_arrive() {
        let systems: SystemsConfig = crate::config::Config::from_source({
            let mut source = crate::config::Source::empty();
            source
                .add_toml(
                    r#"
[zendesk]
base_url = "http://127.0.0.1:1"
api_token = "t"
email = "a@example.com"
[exactonline]
base_url = "http://127.0.0.1:1"
division = 1
client_id = "c"
client_secret = "s"
refresh_token = "r"
poll_interval = "7s"
[customerp]
base_url = "http://127.0.0.1:1"
api_token = "t"
[custompms]
base_url = "http://127.0.0.1:1"
api_token = "t"
poll_interval = "9s"
"#,
                    std::path::Path::new("test.toml"),
                )
                .unwrap();
            source
        })
        .unwrap()
        .systems;
        let poll = |system, ty| spec(system).poll_interval(&systems, ty);
        assert_eq!(poll(SystemId::Zendesk, "Organizations"), None);
        assert_eq!(
            poll(SystemId::ExactOnline, "Accounts"),
            None,
            "a webhook topic"
        );
        assert_eq!(
            poll(SystemId::ExactOnline, "Departments"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            poll(SystemId::CustomErp, "Customer"),
            None,
            "no interval set"
        );
        assert_eq!(
            poll(SystemId::CustomPms, "Customer"),
            Some(Duration::from_secs(9))
        );
        assert_eq!(
            poll(SystemId::PowerOffice, "Customers"),
            None,
            "not connected"
        );
        assert_eq!(spec(SystemId::PowerOffice).webhook_scheme(), None);
        assert_eq!(
            spec(SystemId::CustomPms).webhook_scheme(),
            Some(WebhookScheme::StandardWebhooks)
        );
    }
}
