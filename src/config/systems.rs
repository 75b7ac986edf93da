//! The system sections (`[zendesk]`, `[exactonline]`, `[poweroffice]`, `[customerp]`,
//! `[custompms]`; `[crmoffice]` is in `crmoffice.rs`): a section present means the system is
//! connected, and then its required keys must be there.

use std::time::Duration;

use secrecy::SecretString;

use super::{crmoffice, ConfigError, CrmOfficeConfig, ReconcileIntervals, Source};

/// Connected systems: a system whose section is absent is not connected (its dataflows idle).
#[derive(Debug, Clone, Default)]
pub struct SystemsConfig {
    pub zendesk: Option<ZendeskConfig>,
    pub exactonline: Option<ExactConfig>,
    pub poweroffice: Option<PowerOfficeConfig>,
    pub crmoffice: Option<CrmOfficeConfig>,
    pub customerp: Option<CustomSystemConfig>,
    pub custompms: Option<CustomSystemConfig>,
    /// `<system>.reconcile_interval` of the systems that send webhooks (README, "Reconciliation").
    pub reconcile: ReconcileIntervals,
}

impl SystemsConfig {
    /// Whether the configuration connects this system (has its section).
    pub fn is_connected(&self, system: crate::domain::SystemId) -> bool {
        use crate::domain::SystemId;
        match system {
            SystemId::Zendesk => self.zendesk.is_some(),
            SystemId::ExactOnline => self.exactonline.is_some(),
            SystemId::PowerOffice => self.poweroffice.is_some(),
            SystemId::CrmOffice => self.crmoffice.is_some(),
            SystemId::CustomErp => self.customerp.is_some(),
            SystemId::CustomPms => self.custompms.is_some(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ZendeskConfig {
    pub base_url: url::Url,
    /// With `api_token`: basic auth `{email}/token:{api_token}`.
    pub email: Option<String>,
    pub api_token: Option<SecretString>,
    /// Alternative to email + token: an OAuth bearer token.
    pub oauth_token: Option<SecretString>,
    /// Every secret is tried, so a secret can be rotated without downtime.
    pub webhook_secrets: Vec<SecretString>,
    /// The plan's API limit, requests per minute.
    pub rate_limit_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct ExactConfig {
    pub base_url: url::Url,
    pub division: i64,
    pub client_id: String,
    pub client_secret: SecretString,
    /// The first refresh token; later ones are rotated and kept in PostgreSQL.
    pub refresh_token: SecretString,
    pub webhook_secret: Option<SecretString>,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct PowerOfficeConfig {
    /// API base, e.g. `https://goapi.poweroffice.net/v2`.
    pub base_url: url::Url,
    /// Token endpoint; default derived from `base_url` (`…/OAuth/Token`).
    pub token_url: Option<url::Url>,
    pub application_key: SecretString,
    pub client_key: SecretString,
    pub subscription_key: SecretString,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct CustomSystemConfig {
    pub base_url: url::Url,
    pub api_token: SecretString,
    /// Standard Webhooks secret (`whsec_…`).
    pub webhook_secret: Option<SecretString>,
    /// Reconciliation poll of the list endpoint; `None`: webhooks only.
    pub poll_interval: Option<Duration>,
    /// The system honours `If-Match` on `PATCH` (README, "The custom-system contract"), so a
    /// record Tether wrote last and saw unchanged since is written without reading it first.
    pub conditional_writes: bool,
}

/// Every system section, and the reconciliation intervals.
pub(super) fn load(s: &mut Source) -> Result<SystemsConfig, ConfigError> {
    Ok(SystemsConfig {
        zendesk: zendesk(s)?,
        exactonline: exact(s)?,
        poweroffice: poweroffice(s)?,
        crmoffice: crmoffice::load(s)?,
        customerp: custom(s, "customerp")?,
        custompms: custom(s, "custompms")?,
        reconcile: ReconcileIntervals::load(s)?,
    })
}

pub(super) fn require<T>(value: Option<T>, key: &str, section: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| {
        ConfigError::missing(key, &format!("when the [{section}] section is present"))
    })
}

fn zendesk(s: &mut Source) -> Result<Option<ZendeskConfig>, ConfigError> {
    if !s.has_section("zendesk") {
        return Ok(None);
    }
    let base_url = require(s.url("zendesk.base_url")?, "zendesk.base_url", "zendesk")?;
    let email = s.string("zendesk.email")?;
    let api_token = s.secret("zendesk.api_token")?;
    let oauth_token = s.secret("zendesk.oauth_token")?;
    match (&email, &api_token, &oauth_token) {
        (Some(_), Some(_), _) | (None, None, Some(_)) => {}
        (None, Some(_), None) => {
            return Err(ConfigError::missing(
                "zendesk.email",
                "with `zendesk.api_token`",
            ))
        }
        (Some(_), None, None) => {
            return Err(ConfigError::missing(
                "zendesk.api_token",
                "with `zendesk.email`",
            ))
        }
        _ => return Err(ConfigError(
            "the [zendesk] section needs credentials: `email` with `api_token`, or `oauth_token`."
                .to_owned(),
        )),
    }
    Ok(Some(ZendeskConfig {
        base_url,
        email,
        api_token,
        oauth_token,
        webhook_secrets: s
            .secret_list("zendesk.webhook_secrets")?
            .unwrap_or_default(),
        rate_limit_per_minute: s
            .integer("zendesk.rate_limit_per_minute", 1, 100_000)?
            .unwrap_or(200) as u32,
    }))
}

fn exact(s: &mut Source) -> Result<Option<ExactConfig>, ConfigError> {
    if !s.has_section("exactonline") {
        return Ok(None);
    }
    let sec = "exactonline";
    Ok(Some(ExactConfig {
        base_url: s
            .url("exactonline.base_url")?
            .unwrap_or_else(|| url::Url::parse("https://start.exactonline.nl").expect("valid")),
        division: require(
            s.integer("exactonline.division", 1, i64::MAX)?,
            "exactonline.division",
            sec,
        )?,
        client_id: require(
            s.string("exactonline.client_id")?,
            "exactonline.client_id",
            sec,
        )?,
        client_secret: require(
            s.secret("exactonline.client_secret")?,
            "exactonline.client_secret",
            sec,
        )?,
        refresh_token: require(
            s.secret("exactonline.refresh_token")?,
            "exactonline.refresh_token",
            sec,
        )?,
        webhook_secret: s.secret("exactonline.webhook_secret")?,
        poll_interval: s
            .duration("exactonline.poll_interval")?
            .unwrap_or(Duration::from_secs(300)),
    }))
}

fn poweroffice(s: &mut Source) -> Result<Option<PowerOfficeConfig>, ConfigError> {
    if !s.has_section("poweroffice") {
        return Ok(None);
    }
    let sec = "poweroffice";
    Ok(Some(PowerOfficeConfig {
        base_url: s
            .url("poweroffice.base_url")?
            .unwrap_or_else(|| url::Url::parse("https://goapi.poweroffice.net/v2").expect("valid")),
        token_url: s.url("poweroffice.token_url")?,
        application_key: require(
            s.secret("poweroffice.application_key")?,
            "poweroffice.application_key",
            sec,
        )?,
        client_key: require(
            s.secret("poweroffice.client_key")?,
            "poweroffice.client_key",
            sec,
        )?,
        subscription_key: require(
            s.secret("poweroffice.subscription_key")?,
            "poweroffice.subscription_key",
            sec,
        )?,
        poll_interval: s
            .duration("poweroffice.poll_interval")?
            .unwrap_or(Duration::from_secs(60)),
    }))
}

fn custom(s: &mut Source, name: &str) -> Result<Option<CustomSystemConfig>, ConfigError> {
    if !s.has_section(name) {
        return Ok(None);
    }
    let base_key = format!("{name}.base_url");
    let token_key = format!("{name}.api_token");
    let secret_key = format!("{name}.webhook_secret");
    let origin = s.values.get(&secret_key).map(|(_, o)| o.clone());
    let webhook_secret = s.secret(&secret_key)?;
    if let (Some(secret), Some(origin)) = (&webhook_secret, origin) {
        use secrecy::ExposeSecret;
        if crate::signing::standard::secret_key(secret.expose_secret()).is_err() {
            return Err(ConfigError::at(
                &secret_key,
                &origin,
                "is not a Standard Webhooks secret (`whsec_` followed by base64)",
            ));
        }
    }
    Ok(Some(CustomSystemConfig {
        base_url: require(s.url(&base_key)?, &base_key, name)?,
        api_token: require(s.secret(&token_key)?, &token_key, name)?,
        webhook_secret,
        poll_interval: s.duration(&format!("{name}.poll_interval"))?,
        conditional_writes: s
            .bool(&format!("{name}.conditional_writes"))?
            .unwrap_or(false),
    }))
}
