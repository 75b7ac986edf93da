//! `<system>.reconcile_interval`: how often webhook-driven types are also read (README, "First
//! connection and reconciliation").

use std::time::Duration;

use super::{ConfigError, Source};

/// How often the webhook-driven types of each system are also read incrementally, so a change
/// whose webhook never arrived is still synced (`<system>.reconcile_interval`, default 15 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileIntervals {
    pub zendesk: Duration,
    pub exactonline: Duration,
    pub customerp: Duration,
    pub custompms: Duration,
}

/// Default of `reconcile_interval`: Zendesk's incremental exports allow 10 calls a minute, so a
/// round of its four streams every 15 minutes costs a fraction of that budget.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(15 * 60);

impl Default for ReconcileIntervals {
    fn default() -> Self {
        ReconcileIntervals {
            zendesk: DEFAULT_RECONCILE_INTERVAL,
            exactonline: DEFAULT_RECONCILE_INTERVAL,
            customerp: DEFAULT_RECONCILE_INTERVAL,
            custompms: DEFAULT_RECONCILE_INTERVAL,
        }
    }
}

impl ReconcileIntervals {
    /// The interval of a system that sends webhooks; `None` for the fully polled ones.
    pub fn of(&self, system: crate::domain::SystemId) -> Option<Duration> {
        use crate::domain::SystemId;
        match system {
            SystemId::Zendesk => Some(self.zendesk),
            SystemId::ExactOnline => Some(self.exactonline),
            SystemId::CustomErp => Some(self.customerp),
            SystemId::CustomPms => Some(self.custompms),
            SystemId::PowerOffice | SystemId::CrmOffice => None,
        }
    }

    pub(super) fn load(s: &mut Source) -> Result<ReconcileIntervals, ConfigError> {
        let mut one = |name: &str| -> Result<Duration, ConfigError> {
            let key = format!("{name}.reconcile_interval");
            let origin = s.values.get(&key).map(|(_, o)| o.clone());
            match (s.duration(&key)?, origin) {
                (Some(d), Some(origin)) if d.is_zero() => {
                    Err(ConfigError::at(&key, &origin, "must be longer than zero"))
                }
                (d, _) => Ok(d.unwrap_or(DEFAULT_RECONCILE_INTERVAL)),
            }
        };
        Ok(ReconcileIntervals {
            zendesk: one("zendesk")?,
            exactonline: one("exactonline")?,
            customerp: one("customerp")?,
            custompms: one("custompms")?,
        })
    }
}
