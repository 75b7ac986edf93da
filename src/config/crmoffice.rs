//! `[crmoffice]`: the API address, how Tether gets access tokens (a fixed token, or OAuth2
//! refresh tokens: docs/vendors.md, CRMOffice item 9) and the poll interval.

use std::time::Duration;

use secrecy::SecretString;

use super::{require, ConfigError, Source};

#[derive(Debug, Clone)]
pub struct CrmOfficeConfig {
    pub base_url: url::Url,
    pub auth: CrmOfficeAuth,
    pub poll_interval: Duration,
}

/// How Tether gets CRMOffice access tokens (docs/vendors.md, CRMOffice item 9).
#[derive(Debug, Clone)]
pub enum CrmOfficeAuth {
    /// A fixed bearer token (`crmoffice.api_token`): for testing, it expires after about an hour.
    Token(SecretString),
    /// OAuth2 refresh tokens (`client_id`, `client_secret`, `refresh_token`, `token_url`), kept
    /// and rotated in PostgreSQL like Exact's.
    OAuth(CrmOfficeOAuth),
}

#[derive(Debug, Clone)]
pub struct CrmOfficeOAuth {
    pub token_url: url::Url,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Seeds the stored refresh token (handed over later with `tether credentials set`).
    pub refresh_token: SecretString,
}

pub(super) fn load(s: &mut Source) -> Result<Option<CrmOfficeConfig>, ConfigError> {
    if !s.has_section("crmoffice") {
        return Ok(None);
    }
    Ok(Some(CrmOfficeConfig {
        base_url: s
            .url("crmoffice.base_url")?
            .unwrap_or_else(|| url::Url::parse("https://api.crmoffice.no/").expect("valid")),
        auth: crmoffice_auth(s)?,
        poll_interval: s
            .duration("crmoffice.poll_interval")?
            .unwrap_or(Duration::from_secs(60)),
    }))
}

/// `api_token`, or the OAuth2 keys (`refresh_token` with `client_id` and `client_secret`;
/// `token_url` defaults to the one Sesam's connector uses).
fn crmoffice_auth(s: &mut Source) -> Result<CrmOfficeAuth, ConfigError> {
    let api_token = s.secret("crmoffice.api_token")?;
    let refresh_token = s.secret("crmoffice.refresh_token")?;
    let client_id = s.string("crmoffice.client_id")?;
    let client_secret = s.secret("crmoffice.client_secret")?;
    let token_url = s.url("crmoffice.token_url")?.unwrap_or_else(|| {
        url::Url::parse("https://sesam.crmoffice.no/connect/token").expect("valid")
    });
    match (api_token, refresh_token) {
        (Some(_), Some(_)) => Err(ConfigError(
            "the [crmoffice] section has both `api_token` and `refresh_token`; keep one.".into(),
        )),
        (Some(token), None) => Ok(CrmOfficeAuth::Token(token)),
        (None, Some(refresh_token)) => Ok(CrmOfficeAuth::OAuth(CrmOfficeOAuth {
            token_url,
            client_id: require(client_id, "crmoffice.client_id", "crmoffice")?,
            client_secret: require(client_secret, "crmoffice.client_secret", "crmoffice")?,
            refresh_token,
        })),
        (None, None) => Err(ConfigError::missing(
            "crmoffice.api_token",
            "(or `refresh_token` with `client_id` and `client_secret`) when the [crmoffice] section is present",
        )),
    }
}
