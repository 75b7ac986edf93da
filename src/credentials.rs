//! `tether credentials set <system>`: hands a running installation a new refresh token (after
//! the vendor stopped accepting the stored one) without a restart and without the token ever
//! being on a command line or in a log (docs/operations.md, "A refresh token the vendor
//! rejected").
//!
//! The token is read from standard input (or a file), stored in `oauth_tokens` (sealed with
//! `secrets.key` when one is configured), and the system's stop is lifted: every replica's next
//! call refreshes with it.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Subcommand;
use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::Config;
use crate::domain::SystemId;

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Store a new refresh token for a system (read from standard input, or `--from-file`) and
    /// resume it; a running `tether serve` uses it at its next call.
    Set {
        /// The system whose refresh token this is (exactonline, crmoffice).
        system: SystemId,
        /// Read the token from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
}

/// Why a token was not stored. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} has no refresh token to hand over (exactonline and crmoffice have)")]
    NoRefreshToken(SystemId),
    #[error("crmoffice is configured with a fixed `api_token`; set `refresh_token`, `client_id` and `client_secret` to use OAuth2")]
    FixedToken,
    #[error("{0} is not connected (no [{0}] configuration section)")]
    NotConnected(SystemId),
    #[error("the refresh token read is empty")]
    Empty,
    #[error("the refresh token read contains whitespace inside it; give exactly the token")]
    Whitespace,
}

/// The token as read: surrounding whitespace (a trailing newline) dropped, inner whitespace
/// refused.
pub fn parse_token(text: &str) -> Result<SecretString, CredentialsError> {
    let token = text.trim();
    if token.is_empty() {
        return Err(CredentialsError::Empty);
    }
    if token.chars().any(char::is_whitespace) {
        return Err(CredentialsError::Whitespace);
    }
    Ok(SecretString::from(token.to_owned()))
}

/// Stores `token` as `system`'s refresh token and lifts its stop.
pub async fn hand_over(
    config: &Config,
    pool: &PgPool,
    system: SystemId,
    token: &SecretString,
) -> anyhow::Result<()> {
    use crate::config::CrmOfficeAuth;
    let keyring = crate::at_rest::Keyring::from_config(&config.secrets.keys).map(Arc::new);
    let http = crate::connectors::transport::http_client(config.outbound.timeout);
    let pool = pool.clone();
    let store = match system {
        SystemId::ExactOnline => {
            let exact = config.systems.exactonline.as_ref();
            let exact = exact.ok_or(CredentialsError::NotConnected(system))?;
            crate::connectors::exactonline::token_store(exact, pool, http, keyring)
        }
        SystemId::CrmOffice => {
            let crm = config.systems.crmoffice.as_ref();
            match &crm.ok_or(CredentialsError::NotConnected(system))?.auth {
                CrmOfficeAuth::OAuth(oauth) => {
                    crate::connectors::crmoffice::token_store(oauth, pool, http, keyring)
                }
                CrmOfficeAuth::Token(_) => return Err(CredentialsError::FixedToken.into()),
            }
        }
        other => return Err(CredentialsError::NoRefreshToken(other).into()),
    };
    store.hand_over(token).await?;
    Ok(())
}

/// Runs the command (migrates first: the token table must exist).
pub async fn run(
    config: &Config,
    pool: &PgPool,
    cmd: CredentialsCommand,
) -> anyhow::Result<ExitCode> {
    let CredentialsCommand::Set { system, from_file } = cmd;
    let text = match from_file {
        Some(path) => std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the token from standard input")?;
            text
        }
    };
    let token = parse_token(&text)?;
    crate::db::migrate(pool)
        .await
        .context("migrations failed")?;
    hand_over(config, pool, system, &token).await?;
    println!("{system}: new refresh token stored; the system resumes at its next call");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_token_is_trimmed_and_must_be_one_word() {
        assert_eq!(parse_token("abc.def\n").unwrap().expose_secret(), "abc.def");
        assert!(matches!(parse_token(" \n"), Err(CredentialsError::Empty)));
        assert!(matches!(
            parse_token("ab cd"),
            Err(CredentialsError::Whitespace)
        ));
    }
}
