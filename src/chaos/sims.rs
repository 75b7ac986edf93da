//! The four vendor simulators of a chaos run (Zendesk, PowerOffice Go, Exact Online, the custom
//! ERP), their faults, and the configuration and registry overlay the replicas run with.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;

use crate::domain::SystemId;
use crate::simulators::custom::{CustomSim, CustomSimConfig};
use crate::simulators::exactonline::{self, ExactSim, ExactSimConfig};
use crate::simulators::kit::{Faults, PeakRates, RunningSim, SimControl, WebhookStats};
use crate::simulators::poweroffice::{self, PowerOfficeSim, PowerOfficeSimConfig};
use crate::simulators::zendesk::{SimCredentials, SimOptions, ZendeskSim, ZendeskSimHandle};

const ZENDESK_EMAIL: &str = "chaos@tether.test";
const ZENDESK_TOKEN: &str = "chaos-zendesk-token";
const ZENDESK_WEBHOOK_SECRET: &str = "chaos-zendesk-webhook-secret";
const ERP_TOKEN: &str = "chaos-customerp-token";

/// Zendesk's limit with the High Volume API add-on (docs/vendors.md, Zendesk): the simulator
/// enforces it and Tether is configured with it.
pub const ZENDESK_PER_MINUTE: u32 = 2500;
/// PowerOffice Go: 10 requests a second per subscription key (docs/vendors.md).
pub const POWEROFFICE_PER_SECOND: u32 = 10;
/// Exact Online: 60 calls a minute per division (docs/vendors.md).
pub const EXACT_PER_MINUTE: u32 = 60;

/// Tether's `outbound.timeout` in the run; slow answers take longer than this.
pub const OUTBOUND_TIMEOUT: Duration = Duration::from_secs(2);

/// The registry overlay of a run: names and emails mapped where the seeds map none (as `tether
/// sandbox --demo` does), the ERP's customers and contacts carrying the Zendesk names, and the
/// flows the workload does not use switched off so that they poll nothing.
pub const OVERLAY: &str = r#"# Written by tether-chaos.
[[dataflow]]
source = "poweroffice.Contactperson"
target = "zendesk.Users"
[[dataflow.property]]
source = "FirstName"
target = "name"
type = "string"
[[dataflow.property]]
source = "EmailAddress"
target = "email"
type = "string"
# Zendesk sets a user's primary e-mail on create only (docs/vendors.md).
sync = "to_target"

[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"

[[dataflow]]
source = "zendesk.Users"
target = "customerp.Contact"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"
[[dataflow.property]]
source = "email"
target = "email"
type = "string"
sync = "to_target"

[[dataflow]]
source = "poweroffice.Departments"
target = "zendesk.Organizations"
enabled = false
[[dataflow]]
source = "poweroffice.Suppliers"
target = "zendesk.Organizations"
enabled = false
[[dataflow]]
source = "poweroffice.Employees"
target = "zendesk.Users"
enabled = false
[[dataflow]]
source = "exactonline.Departments"
target = "zendesk.Organizations"
enabled = false
[[dataflow]]
source = "exactonline.Divisions"
target = "zendesk.Organizations"
enabled = false
[[dataflow]]
source = "zendesk.Tickets"
target = "customerp.Project"
enabled = false
[[dataflow]]
source = "zendesk.Ticketcomments"
target = "customerp.Project"
enabled = false

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
[[rule]]
entity = "zendesk.Users"
property = "name"
resolve = "latest_wins"
"#;

/// The faults the issue asks for: 10% 5xx, 5% 429 with `Retry-After`, 2% answers slower than
/// Tether's timeout, webhooks now and then twice or out of order; webhooks are retried for
/// about a minute and a half, as vendors retry for hours.
pub fn chaos_faults() -> Faults {
    Faults {
        error_rate: 0.10,
        rate_429: 0.05,
        slow_rate: 0.02,
        slow_ms: OUTBOUND_TIMEOUT.as_millis() as u64 + 1000,
        duplicate_webhooks: 0.05,
        reorder_webhooks: 0.05,
        webhook_attempts: Some(40),
        ..Faults::default()
    }
}

/// The running simulators.
pub struct Sims {
    pub zendesk: ZendeskSimHandle,
    pub exact: ExactSim,
    exact_config: ExactSimConfig,
    pub poweroffice: PowerOfficeSim,
    poweroffice_config: PowerOfficeSimConfig,
    pub erp: CustomSim,
    erp_secret: String,
    running: Vec<(SystemId, RunningSim)>,
}

impl Sims {
    /// Starts the four simulators on loopback; their webhooks go to `ingress` (nginx).
    pub async fn start(ingress: &str, lanes: usize) -> std::io::Result<Sims> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let hook = |system: &str| Some(format!("{ingress}/webhooks/{system}"));
        let (zd_running, zendesk) = ZendeskSim::start(SimOptions {
            webhook_lanes: lanes,
            bind: any,
            credentials: SimCredentials {
                email: ZENDESK_EMAIL.to_owned(),
                api_token: ZENDESK_TOKEN.to_owned(),
                oauth_token: None,
            },
            webhook_target: hook("zendesk"),
            webhook_secret: ZENDESK_WEBHOOK_SECRET.to_owned(),
        })
        .await?;
        let exact_config = ExactSimConfig {
            webhook_target: hook("exactonline"),
            minutely_limit: EXACT_PER_MINUTE,
            // Exact takes a new refresh no sooner than 570 s after the last. A refresh whose answer
            // a kill or a late answer loses makes Tether wait that out (docs/vendors.md, Exact
            // Online); in a run of a few minutes that would be the whole run, so the suite's Exact
            // asks for 60 s. The 570 s are tested in exactonline::vendor.
            min_refresh_interval: std::time::Duration::from_secs(60),
            ..ExactSimConfig::default()
        };
        let (exact, exact_running) = exactonline::start(exact_config.clone(), any).await?;
        let poweroffice_config = PowerOfficeSimConfig {
            per_second: POWEROFFICE_PER_SECOND,
            ..PowerOfficeSimConfig::default()
        };
        let (poweroffice, po_running) = poweroffice::start(poweroffice_config.clone(), any).await?;
        let erp_secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode("tether-chaos-customerp-secret")
        );
        let erp_config = CustomSimConfig {
            webhook_lanes: lanes,
            system: SystemId::CustomErp,
            api_token: ERP_TOKEN.to_owned(),
            webhook_secret: Some(erp_secret.clone()),
            webhook_target: hook("customerp"),
        };
        let (erp, erp_running) = CustomSim::start(erp_config, any).await?;
        Ok(Sims {
            zendesk,
            exact,
            exact_config,
            poweroffice,
            poweroffice_config,
            erp,
            erp_secret,
            running: vec![
                (SystemId::Zendesk, zd_running),
                (SystemId::ExactOnline, exact_running),
                (SystemId::PowerOffice, po_running),
                (SystemId::CustomErp, erp_running),
            ],
        })
    }

    fn url(&self, system: SystemId) -> String {
        self.running
            .iter()
            .find(|(s, _)| *s == system)
            .map(|(_, r)| r.base_url())
            .expect("a simulator for every system of the run")
    }

    fn controls(&self) -> [(SystemId, &SimControl); 4] {
        [
            (SystemId::Zendesk, self.zendesk.control()),
            (SystemId::ExactOnline, &self.exact.control),
            (SystemId::PowerOffice, &self.poweroffice.control),
            (SystemId::CustomErp, &self.erp.control),
        ]
    }

    /// Switches the faults on (or off with `Faults::default()`) in every simulator; Zendesk
    /// keeps its plan limit either way.
    pub fn set_faults(&self, faults: &Faults) {
        for (system, control) in self.controls() {
            let mut faults = faults.clone();
            if system == SystemId::Zendesk {
                faults.rate_limit = Some(ZENDESK_PER_MINUTE);
                faults.rate_window_ms = Some(60_000);
            }
            control.set_faults(faults);
        }
    }

    /// The busiest second and minute each simulator saw.
    pub fn peaks(&self) -> Vec<(SystemId, PeakRates)> {
        self.controls()
            .iter()
            .map(|(s, c)| (*s, c.peak_rates()))
            .collect()
    }

    /// Requests per endpoint of every simulator (`"METHOD /route"`, summed over simulators).
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.controls()
            .iter()
            .flat_map(|(_, c)| c.counters())
            .collect()
    }

    /// What happened to the webhooks of the simulators that send them.
    pub fn webhook_stats(&self) -> Vec<(SystemId, WebhookStats)> {
        vec![
            (SystemId::Zendesk, self.zendesk.webhook_stats()),
            (SystemId::ExactOnline, self.exact.webhook_stats()),
            (SystemId::CustomErp, self.erp.webhook_stats()),
        ]
    }

    /// Tether's configuration for this run, as TOML (the replicas get `listen` and the database
    /// from the environment).
    pub fn config_toml(&self, data_dir: &Path, overlay: &Path) -> String {
        format!(
            r#"data_dir = {data_dir:?}
shutdown_timeout = "10s"

[log]
format = "json"
level = "warn"

[database]
max_connections = 12

[workers]
concurrency = 16
batch_size = 16
lease = "{lease}s"
poll_interval = "500ms"
retry_schedule = ["1s", "2s", "5s", "10s", "20s", "30s"]

[outbound]
timeout = "{timeout}ms"

[registry]
overlay = {overlay:?}

# Off: the workload is thousands of changes a minute by design, a mass change the guard would
# hold (docs/guard.md); the suite proves delivery and convergence, not the guard.
[guard]
enabled = false

[zendesk]
base_url = "{zendesk}"
email = "{ZENDESK_EMAIL}"
api_token = "{ZENDESK_TOKEN}"
webhook_secrets = ["{ZENDESK_WEBHOOK_SECRET}"]
rate_limit_per_minute = {ZENDESK_PER_MINUTE}

{exact_section}
{poweroffice_section}
[customerp]
base_url = "{erp}"
api_token = "{ERP_TOKEN}"
webhook_secret = "{erp_secret}"
conditional_writes = true
"#,
            data_dir = data_dir.display().to_string(),
            overlay = overlay.display().to_string(),
            lease = OUTBOUND_TIMEOUT.as_secs() + 6,
            timeout = OUTBOUND_TIMEOUT.as_millis(),
            zendesk = self.url(SystemId::Zendesk),
            exact_section = self
                .exact_config
                .tether_section(&self.url(SystemId::ExactOnline), "10m"),
            poweroffice_section = self
                .poweroffice_config
                .tether_section(&self.url(SystemId::PowerOffice), "1s"),
            erp = self.url(SystemId::CustomErp),
            erp_secret = self.erp_secret,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_of_a_run_passes_the_registry_check() {
        let dir = crate::testing::shared_tempdir();
        let path = dir.path().join("overlay.toml");
        std::fs::write(&path, OVERLAY).unwrap();
        let loaded = crate::registry::load(Some(&path));
        assert!(loaded.is_ok(), "{:?}", loaded.err());
    }
}
