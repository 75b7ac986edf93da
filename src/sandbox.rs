//! `tether sandbox`: everything on one machine. The embedded PostgreSQL, a simulator of each of
//! the six systems on loopback ports, and the service configured against them, with a few records
//! already in the source systems. The end-to-end tests start the same [`Simulators`].

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine as _;
use serde_json::json;

use crate::domain::SystemId;
use crate::simulators::crmoffice::CrmOfficeSim;
use crate::simulators::custom::{CustomSim, CustomSimConfig};
use crate::simulators::exactonline::{self, ExactSim, ExactSimConfig};
use crate::simulators::kit::RunningSim;
use crate::simulators::poweroffice::{self, PowerOfficeSim, PowerOfficeSimConfig};
use crate::simulators::zendesk::{SimCredentials, SimOptions, ZendeskSim, ZendeskSimHandle};

/// The sandbox's credentials. They only open the local simulators.
pub mod credentials {
    pub const ZENDESK_EMAIL: &str = "sandbox@tether.test";
    pub const ZENDESK_TOKEN: &str = "sandbox-zendesk-token";
    pub const ZENDESK_WEBHOOK_SECRET: &str = "sandbox-zendesk-webhook-secret";
    pub const CRMOFFICE_TOKEN: &str = "sandbox-crmoffice-token";
    pub const CUSTOMERP_TOKEN: &str = "sandbox-customerp-token";
    pub const CUSTOMPMS_TOKEN: &str = "sandbox-custompms-token";
}

/// The six simulators, running, with handles to seed and inspect them.
pub struct Simulators {
    pub zendesk: ZendeskSimHandle,
    pub exact: ExactSim,
    pub exact_config: ExactSimConfig,
    pub poweroffice: PowerOfficeSim,
    pub poweroffice_config: PowerOfficeSimConfig,
    pub crmoffice: CrmOfficeSim,
    pub customerp: CustomSim,
    pub custompms: CustomSim,
    customerp_secret: String,
    custompms_secret: String,
    running: Vec<(SystemId, RunningSim)>,
}

fn whsec(label: &str) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(format!("tether-sandbox-{label}-secret"))
    )
}

impl Simulators {
    /// Starts the six simulators on `host` (free ports); their webhooks go to `tether_url`
    /// (e.g. `http://127.0.0.1:8080`).
    pub async fn start(host: std::net::IpAddr, tether_url: &str) -> std::io::Result<Simulators> {
        let any = SocketAddr::new(host, 0);
        let hook = |system: &str| Some(format!("{tether_url}/webhooks/{system}"));
        let (zd_running, zendesk) = ZendeskSim::start(SimOptions {
            bind: any,
            credentials: SimCredentials {
                email: credentials::ZENDESK_EMAIL.to_owned(),
                api_token: credentials::ZENDESK_TOKEN.to_owned(),
                oauth_token: None,
            },
            webhook_target: hook("zendesk"),
            webhook_secret: credentials::ZENDESK_WEBHOOK_SECRET.to_owned(),
        })
        .await?;
        let exact_config = ExactSimConfig {
            webhook_target: hook("exactonline"),
            ..ExactSimConfig::default()
        };
        let (exact, exact_running) = exactonline::start(exact_config.clone(), any).await?;
        let poweroffice_config = PowerOfficeSimConfig::default();
        let (poweroffice, po_running) = poweroffice::start(poweroffice_config.clone(), any).await?;
        let (crmoffice, crm_running) =
            CrmOfficeSim::start(credentials::CRMOFFICE_TOKEN, any).await?;
        let customerp_secret = whsec("customerp");
        let custompms_secret = whsec("custompms");
        let (customerp, erp_running) = CustomSim::start(
            CustomSimConfig {
                system: SystemId::CustomErp,
                api_token: credentials::CUSTOMERP_TOKEN.to_owned(),
                webhook_secret: Some(customerp_secret.clone()),
                webhook_target: hook("customerp"),
            },
            any,
        )
        .await?;
        let (custompms, pms_running) = CustomSim::start(
            CustomSimConfig {
                system: SystemId::CustomPms,
                api_token: credentials::CUSTOMPMS_TOKEN.to_owned(),
                webhook_secret: Some(custompms_secret.clone()),
                webhook_target: hook("custompms"),
            },
            any,
        )
        .await?;
        Ok(Simulators {
            zendesk,
            exact,
            exact_config,
            poweroffice,
            poweroffice_config,
            crmoffice,
            customerp,
            custompms,
            customerp_secret,
            custompms_secret,
            running: vec![
                (SystemId::Zendesk, zd_running),
                (SystemId::ExactOnline, exact_running),
                (SystemId::PowerOffice, po_running),
                (SystemId::CrmOffice, crm_running),
                (SystemId::CustomErp, erp_running),
                (SystemId::CustomPms, pms_running),
            ],
        })
    }

    /// Where a simulator listens (`http://127.0.0.1:port`).
    pub fn url(&self, system: SystemId) -> String {
        self.running
            .iter()
            .find(|(s, _)| *s == system)
            .map(|(_, r)| r.base_url())
            .expect("every system has a simulator")
    }

    /// Tether's configuration for these simulators, as TOML (validated by the normal loader).
    pub fn config_toml(&self, listen: SocketAddr, data_dir: &Path, poll_interval: &str) -> String {
        let e = &self.exact_config;
        let p = &self.poweroffice_config;
        format!(
            r#"listen = "{listen}"
data_dir = {data_dir:?}
log_format = "pretty"

[workers]
poll_interval = "200ms"
retry_schedule = ["1s", "2s", "5s", "10s"]

[outbound]
timeout = "10s"

[zendesk]
base_url = "{zendesk}"
email = "{zd_email}"
api_token = "{zd_token}"
webhook_secrets = ["{zd_secret}"]
rate_limit_per_minute = 6000

[exactonline]
base_url = "{exact}"
division = {division}
client_id = "{client_id}"
client_secret = "{client_secret}"
refresh_token = "{refresh_token}"
webhook_secret = "{exact_secret}"
poll_interval = "{poll_interval}"

[poweroffice]
base_url = "{poweroffice}/v2"
token_url = "{poweroffice}/OAuth/Token"
application_key = "{app_key}"
client_key = "{client_key}"
subscription_key = "{sub_key}"
poll_interval = "{poll_interval}"

[crmoffice]
base_url = "{crmoffice}"
api_token = "{crm_token}"
poll_interval = "{poll_interval}"

[customerp]
base_url = "{customerp}"
api_token = "{erp_token}"
webhook_secret = "{erp_secret}"

[custompms]
base_url = "{custompms}"
api_token = "{pms_token}"
webhook_secret = "{pms_secret}"
"#,
            data_dir = data_dir.display().to_string(),
            zendesk = self.url(SystemId::Zendesk),
            zd_email = credentials::ZENDESK_EMAIL,
            zd_token = credentials::ZENDESK_TOKEN,
            zd_secret = credentials::ZENDESK_WEBHOOK_SECRET,
            exact = self.url(SystemId::ExactOnline),
            division = e.division,
            client_id = e.client_id,
            client_secret = e.client_secret,
            refresh_token = e.refresh_token,
            exact_secret = e.webhook_secret,
            poweroffice = self.url(SystemId::PowerOffice),
            app_key = p.application_key,
            client_key = p.client_key,
            sub_key = p.subscription_key,
            crmoffice = self.url(SystemId::CrmOffice),
            crm_token = credentials::CRMOFFICE_TOKEN,
            customerp = self.url(SystemId::CustomErp),
            erp_token = credentials::CUSTOMERP_TOKEN,
            erp_secret = self.customerp_secret,
            custompms = self.url(SystemId::CustomPms),
            pms_token = credentials::CUSTOMPMS_TOKEN,
            pms_secret = self.custompms_secret,
        )
    }

    /// A few records in the source systems, so the first sync has something to do.
    pub fn seed(&self) {
        self.poweroffice.seed(
            "Customers",
            json!({"Name": "Fjordkraft Demo AS", "WebsiteUrl": "https://fjordkraft.example", "EmailAddress": "post@fjordkraft.example"}),
        );
        self.poweroffice.seed(
            "Suppliers",
            json!({"Name": "Nordlys Supply", "LegalName": "Nordlys Supply AS", "WebsiteUrl": "https://nordlys.example"}),
        );
        self.poweroffice.seed(
            "Departments",
            json!({"Name": "Bergen office", "Code": "BGO"}),
        );
        self.exact
            .seed_account(json!({"Name": "Amstel Trading BV", "Code": "                 1"}));
    }
}
