//! Configuration: a TOML file (`--config` or `TETHER_CONFIG`) overridden key by key by environment
//! variables `TETHER_<SECTION>__<KEY>` (top-level keys: `TETHER_<KEY>`), plus `DATABASE_URL`.
//!
//! Every value is read once at start-up through typed getters that remember where each value came
//! from, so a wrong value stops the process with one sentence naming the key, the problem and the
//! source. Keys nobody reads are errors too (a typo must not be silently ignored). Secrets are
//! `secrecy::SecretString`: they never reach logs, error messages or `Debug` output.
//! The commented defaults are in `tether.example.toml`.

mod crmoffice;
mod reconcile;

pub use crmoffice::{CrmOfficeAuth, CrmOfficeConfig, CrmOfficeOAuth};
pub use reconcile::{ReconcileIntervals, DEFAULT_RECONCILE_INTERVAL};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// A configuration problem, as one sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn at(key: &str, origin: &Origin, problem: impl fmt::Display) -> Self {
        ConfigError(format!(
            "configuration key `{key}` (from {origin}) {problem}."
        ))
    }
    fn missing(key: &str, why: &str) -> Self {
        ConfigError(format!("configuration key `{key}` is required {why}."))
    }
}

#[derive(Debug, Clone)]
enum Raw {
    Toml(toml::Value),
    Env(String),
}

/// The merged key → value map with each value's origin. Getters remove what they read, so that
/// whatever is left at the end is unknown.
pub struct Source {
    values: BTreeMap<String, (Raw, Origin)>,
}

impl Source {
    /// Nothing set: every key at its default until values are added.
    pub fn empty() -> Self {
        Source {
            values: BTreeMap::new(),
        }
    }

    /// Reads the file (if any) and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut source = Source {
            values: BTreeMap::new(),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!(
                    "the configuration file {} could not be read: {e}.",
                    path.display()
                ))
            })?;
            source.add_toml(&text, path)?;
        }
        source.add_env(std::env::vars());
        Ok(source)
    }

    /// Parses TOML text as if it came from `path`.
    pub fn add_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigError(format!(
                "the configuration file {} is not valid TOML: {}",
                path.display(),
                e.message()
            ))
        })?;
        let origin = Origin::File(path.to_owned());
        for (key, value) in table {
            match value {
                toml::Value::Table(section) => {
                    for (inner, value) in section {
                        self.values
                            .insert(format!("{key}.{inner}"), (Raw::Toml(value), origin.clone()));
                    }
                }
                other => {
                    self.values.insert(key, (Raw::Toml(other), origin.clone()));
                }
            }
        }
        Ok(())
    }

    /// Applies `TETHER_*` variables (and `DATABASE_URL`) over the file's values.
    pub fn add_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (name, value) in vars {
            let key = if name == "DATABASE_URL" {
                "database.url".to_owned()
            } else if let Some(rest) = name.strip_prefix("TETHER_") {
                if rest == "CONFIG" {
                    continue;
                }
                match rest.split_once("__") {
                    Some((section, key)) => {
                        format!("{}.{}", section.to_lowercase(), key.to_lowercase())
                    }
                    None => rest.to_lowercase(),
                }
            } else {
                continue;
            };
            self.values
                .insert(key, (Raw::Env(value), Origin::Env(name)));
        }
    }

    fn take(&mut self, key: &str) -> Option<(Raw, Origin)> {
        self.values.remove(key)
    }

    /// Whether any key of a section is present (a system section present means "connected").
    pub fn has_section(&self, section: &str) -> bool {
        let prefix = format!("{section}.");
        self.values.keys().any(|k| k.starts_with(&prefix))
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Raw::Env(s), _)) => Ok(Some(s)),
            Some((Raw::Toml(toml::Value::String(s)), _)) => Ok(Some(s)),
            Some((Raw::Toml(other), origin)) => Err(ConfigError::at(
                key,
                &origin,
                format!("must be a string, not {}", other.type_str()),
            )),
        }
    }

    /// A secret string. Its value is never put into an error message.
    pub fn secret(&mut self, key: &str) -> Result<Option<SecretString>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Raw::Env(s), origin)) | Some((Raw::Toml(toml::Value::String(s)), origin)) => {
                if s.trim().is_empty() {
                    Err(ConfigError::at(key, &origin, "is empty"))
                } else {
                    Ok(Some(SecretString::from(s)))
                }
            }
            Some((Raw::Toml(other), origin)) => Err(ConfigError::at(
                key,
                &origin,
                format!("must be a string, not {}", other.type_str()),
            )),
        }
    }

    /// A list of secrets: a TOML array of strings, or in a variable a comma-separated list.
    pub fn secret_list(&mut self, key: &str) -> Result<Option<Vec<SecretString>>, ConfigError> {
        let items: Vec<String> = match self.take(key) {
            None => return Ok(None),
            Some((Raw::Env(s), _)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Some((Raw::Toml(toml::Value::String(s)), _)) => vec![s],
            Some((Raw::Toml(toml::Value::Array(items)), origin)) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(ConfigError::at(
                        key,
                        &origin,
                        format!("must list strings, but holds {}", other.type_str()),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some((Raw::Toml(other), origin)) => {
                return Err(ConfigError::at(
                    key,
                    &origin,
                    format!("must be a list of strings, not {}", other.type_str()),
                ))
            }
        };
        Ok(Some(items.into_iter().map(SecretString::from).collect()))
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Raw::Toml(toml::Value::Boolean(b)), _)) => Ok(Some(b)),
            Some((Raw::Env(s), origin)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(Some(true)),
                "false" | "0" | "no" | "off" => Ok(Some(false)),
                _ => Err(ConfigError::at(
                    key,
                    &origin,
                    format!("is {s:?}, which is not true or false"),
                )),
            },
            Some((Raw::Toml(other), origin)) => Err(ConfigError::at(
                key,
                &origin,
                format!("must be true or false, not {}", other.type_str()),
            )),
        }
    }

    /// A whole number within `min..=max`.
    pub fn integer(&mut self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ConfigError> {
        let (value, origin) = match self.take(key) {
            None => return Ok(None),
            Some((Raw::Toml(toml::Value::Integer(i)), origin)) => (i, origin),
            Some((Raw::Env(s), origin)) => match s.trim().replace('_', "").parse::<i64>() {
                Ok(i) => (i, origin),
                Err(_) => {
                    return Err(ConfigError::at(
                        key,
                        &origin,
                        format!("is {s:?}, which is not a whole number"),
                    ))
                }
            },
            Some((Raw::Toml(other), origin)) => {
                return Err(ConfigError::at(
                    key,
                    &origin,
                    format!("must be a whole number, not {}", other.type_str()),
                ))
            }
        };
        if value < min || value > max {
            return Err(ConfigError::at(
                key,
                &origin,
                format!("is {value}, outside the allowed range {min} to {max}"),
            ));
        }
        Ok(Some(value))
    }

    /// A duration written with a unit (`"500ms"`, `"30s"`, `"5m"`).
    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some((Raw::Env(s), origin)) | Some((Raw::Toml(toml::Value::String(s)), origin)) => {
                parse_duration(&s)
                    .map(Some)
                    .map_err(|problem| ConfigError::at(key, &origin, problem))
            }
            Some((Raw::Toml(other), origin)) => Err(ConfigError::at(
                key,
                &origin,
                format!(
                    "must be a duration string with a unit such as \"30s\", not {}",
                    other.type_str()
                ),
            )),
        }
    }

    /// A list of durations: a TOML array of strings, or in a variable a comma-separated list.
    pub fn duration_list(&mut self, key: &str) -> Result<Option<Vec<Duration>>, ConfigError> {
        let (items, origin): (Vec<String>, Origin) = match self.take(key) {
            None => return Ok(None),
            Some((Raw::Env(s), origin)) => {
                (s.split(',').map(|p| p.trim().to_owned()).collect(), origin)
            }
            Some((Raw::Toml(toml::Value::Array(items)), origin)) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => {
                            return Err(ConfigError::at(
                                key,
                                &origin,
                                format!(
                                    "must list duration strings, but holds {}",
                                    other.type_str()
                                ),
                            ))
                        }
                    }
                }
                (out, origin)
            }
            Some((Raw::Toml(other), origin)) => {
                return Err(ConfigError::at(
                    key,
                    &origin,
                    format!("must be a list of durations, not {}", other.type_str()),
                ))
            }
        };
        if items.is_empty() {
            return Err(ConfigError::at(key, &origin, "is an empty list"));
        }
        items
            .iter()
            .map(|s| parse_duration(s).map_err(|p| ConfigError::at(key, &origin, p)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A socket address such as `0.0.0.0:8080`.
    pub fn socket_addr(&mut self, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
        let origin = self.values.get(key).map(|(_, o)| o.clone());
        match self.string(key)? {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                ConfigError::at(
                    key,
                    origin.as_ref().expect("present"),
                    format!("is {s:?}, which is not an address with a port such as 0.0.0.0:8080"),
                )
            }),
        }
    }

    /// An absolute `http://` or `https://` URL.
    pub fn url(&mut self, key: &str) -> Result<Option<url::Url>, ConfigError> {
        let origin = self.values.get(key).map(|(_, o)| o.clone());
        match self.string(key)? {
            None => Ok(None),
            Some(s) => {
                let origin = origin.expect("present");
                let parsed = url::Url::parse(&s).map_err(|e| {
                    ConfigError::at(key, &origin, format!("is {s:?}, which is not a URL ({e})"))
                })?;
                if parsed.scheme() != "http" && parsed.scheme() != "https" {
                    return Err(ConfigError::at(
                        key,
                        &origin,
                        format!("is {s:?}, but only http and https URLs are supported"),
                    ));
                }
                Ok(Some(parsed))
            }
        }
    }

    /// An error naming the origin of a key that was read and found wrong by a caller.
    pub fn invalid(key: &str, origin_hint: &str, problem: impl fmt::Display) -> ConfigError {
        ConfigError(format!(
            "configuration key `{key}` ({origin_hint}) {problem}."
        ))
    }

    /// Fails on the first key nobody read.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.values.into_iter().next() {
            None => Ok(()),
            Some((key, (_, origin))) => Err(ConfigError(format!(
                "configuration key `{key}` (from {origin}) is not a setting Tether knows; check its spelling against tether.example.toml."
            ))),
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1h 30m"` (humantime syntax); a bare number is
/// refused because its unit would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed.chars().all(|c| c.is_ascii_digit()) && !trimmed.is_empty() {
        return Err(format!(
            "is {s:?}, a number without a unit; write it with one, e.g. \"{trimmed}s\""
        ));
    }
    humantime::parse_duration(trimmed).map_err(|_| {
        format!("is {s:?}, which is not a duration; write it with a unit, e.g. \"30s\" or \"5m\"")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (the default of `serve`).
    Json,
    /// Human-readable lines (`"text"`, also accepted as `"pretty"`; the default of `sandbox`).
    Text,
}

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `public_url`: the address vendors reach Tether at; webhooks are registered at
    /// `<public_url>/webhooks/<system>` (`tether webhooks install`).
    pub public_url: Option<url::Url>,
    pub data_dir: PathBuf,
    /// `None`: the command's own default (JSON for `serve`, text for `sandbox`).
    pub log_format: Option<LogFormat>,
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_level: String,
    /// How long in-flight requests and jobs get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub workers: WorkerConfig,
    pub outbound: OutboundConfig,
    pub registry: RegistryConfig,
    pub systems: SystemsConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub secrets: SecretsConfig,
}

/// Keys that encrypt credentials stored in PostgreSQL (`at_rest`).
#[derive(Debug, Clone, Default)]
pub struct SecretsConfig {
    /// `secrets.key`: 32-byte keys, base64; the first encrypts, all decrypt. Empty: stored
    /// credentials stay in clear text.
    pub keys: Vec<SecretString>,
}

/// The admin API and console (`/admin`): off unless a token is configured.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// The bearer token of `/admin/api/…` and the console's login; `None` turns `/admin` off.
    pub token: Option<SecretString>,
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// A separate listener for `/metrics`; `None` serves it on the main `listen` address.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`; `None` means: start the embedded PostgreSQL under `data_dir`.
    pub url: Option<SecretString>,
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before answering 503.
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Serve HTTP (webhooks, health). Off: a workers-only replica.
    pub enabled: bool,
    /// Largest webhook body accepted, in bytes (413 above it).
    pub body_limit: usize,
    /// Allowed clock difference for signed timestamps, either way.
    pub timestamp_tolerance: Duration,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Run queue workers in this process. Off: an HTTP-only replica.
    pub enabled: bool,
    /// Jobs run at once by this process.
    pub concurrency: usize,
    /// Of those, backfill jobs at most (fewer than `concurrency`, so live work always finds a
    /// task; docs/queue.md, "Priorities").
    pub backfill_concurrency: usize,
    /// Jobs claimed per query.
    pub batch_size: usize,
    /// How long a claim is valid without renewal; must exceed the outbound timeout plus a margin.
    pub lease: Duration,
    /// Safety-net poll interval when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Delay before each retry; the number of entries is the number of retries before dead-lettering.
    pub retry_schedule: Vec<Duration>,
    /// Times a job may be rescheduled for back-pressure (429, timeout) without using an attempt.
    pub max_deferrals: u32,
    /// Upper bound on an honoured `Retry-After`.
    pub max_retry_after: Duration,
    /// Finished jobs and events are kept this long (also the deduplication window).
    pub retention: Duration,
}

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Timeout of every call to a vendor API.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The operator's overlay file.
    pub overlay: Option<PathBuf>,
}

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
}

impl Config {
    /// Loads from the file (if given) and the process environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::from_source(Source::load(file)?)
    }

    /// Validates an already assembled source (tests build one by hand).
    pub fn from_source(mut s: Source) -> Result<Config, ConfigError> {
        // `[log] format`/`level`; the top-level `log_format`/`log_level` of earlier versions too.
        let (format, old_format) = (s.string("log.format")?, s.string("log_format")?);
        let log_format = match format.or(old_format).as_deref() {
            None => None,
            Some("json") => Some(LogFormat::Json),
            Some("pretty") | Some("text") => Some(LogFormat::Text),
            Some(other) => {
                return Err(ConfigError(format!(
                    "configuration key `log.format` is {other:?}; use \"json\" or \"text\"."
                )))
            }
        };
        let (level, old_level) = (s.string("log.level")?, s.string("log_level")?);
        let config = Config {
            listen: s
                .socket_addr("listen")?
                .unwrap_or_else(|| "0.0.0.0:8080".parse().expect("valid")),
            public_url: s.url("public_url")?,
            data_dir: s
                .string("data_dir")?
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./data")),
            log_format,
            log_level: level.or(old_level).unwrap_or_else(|| "info".to_owned()),
            shutdown_timeout: s
                .duration("shutdown_timeout")?
                .unwrap_or(Duration::from_secs(25)),
            database: DatabaseConfig {
                url: s.secret("database.url")?,
                max_connections: s
                    .integer("database.max_connections", 2, 1000)?
                    .unwrap_or(16) as u32,
                acquire_timeout: s
                    .duration("database.acquire_timeout")?
                    .unwrap_or(Duration::from_secs(3)),
            },
            http: HttpConfig {
                enabled: s.bool("http.enabled")?.unwrap_or(true),
                body_limit: s
                    .integer("http.body_limit", 1024, 64 * 1024 * 1024)?
                    .unwrap_or(1024 * 1024) as usize,
                timestamp_tolerance: s
                    .duration("http.timestamp_tolerance")?
                    .unwrap_or(Duration::from_secs(300)),
            },
            workers: workers(&mut s)?,
            outbound: OutboundConfig {
                timeout: s
                    .duration("outbound.timeout")?
                    .unwrap_or(Duration::from_secs(30)),
            },
            registry: RegistryConfig {
                overlay: s.string("registry.overlay")?.map(PathBuf::from),
            },
            systems: SystemsConfig {
                zendesk: zendesk(&mut s)?,
                exactonline: exact(&mut s)?,
                poweroffice: poweroffice(&mut s)?,
                crmoffice: crmoffice::load(&mut s)?,
                customerp: custom(&mut s, "customerp")?,
                custompms: custom(&mut s, "custompms")?,
                reconcile: ReconcileIntervals::load(&mut s)?,
            },
            admin: AdminConfig {
                token: admin_token(&mut s)?,
            },
            metrics: MetricsConfig {
                listen: s.socket_addr("metrics.listen")?,
            },
            secrets: SecretsConfig {
                keys: secrets_keys(&mut s)?,
            },
        };
        s.finish()?;
        let mut config = config;
        config.check()?;
        Ok(config)
    }

    /// Rules that span several keys.
    fn check(&mut self) -> Result<(), ConfigError> {
        let w = &mut self.workers;
        if w.backfill_concurrency == 0 {
            w.backfill_concurrency = (w.concurrency / 2).max(1);
        } else if w.concurrency > 1 && w.backfill_concurrency >= w.concurrency {
            return Err(ConfigError(format!(
                "configuration key `workers.backfill_concurrency` is {}, but it must be less than `workers.concurrency` ({}), so that live work always finds a free task.",
                w.backfill_concurrency, w.concurrency
            )));
        }
        // A lease shorter than a slow outbound call lets a second worker claim a job that is still
        // running (docs/queue.md, leases).
        let margin = Duration::from_secs(5);
        if self.workers.lease < self.outbound.timeout + margin {
            return Err(ConfigError(format!(
                "configuration key `workers.lease` is {}, but it must be longer than `outbound.timeout` ({}) plus a {}s margin, or a job could run twice.",
                humantime::format_duration(self.workers.lease),
                humantime::format_duration(self.outbound.timeout),
                margin.as_secs()
            )));
        }
        Ok(())
    }
}

/// Shortest admin token accepted: a guessable token would open every operation of `/admin`.
pub const ADMIN_TOKEN_MIN_LEN: usize = 24;

fn admin_token(s: &mut Source) -> Result<Option<SecretString>, ConfigError> {
    let token = s.secret("admin.token")?;
    if let Some(t) = &token {
        use secrecy::ExposeSecret as _;
        let len = t.expose_secret().chars().count();
        if len < ADMIN_TOKEN_MIN_LEN {
            return Err(ConfigError(format!(
                "configuration key `admin.token` is {len} characters long; use at least {ADMIN_TOKEN_MIN_LEN} random characters (e.g. `openssl rand -hex 32`)."
            )));
        }
    }
    Ok(token)
}

fn secrets_keys(s: &mut Source) -> Result<Vec<SecretString>, ConfigError> {
    let keys = s.secret_list("secrets.key")?.unwrap_or_default();
    for (i, key) in keys.iter().enumerate() {
        if let Err(problem) = crate::at_rest::decode_key(key) {
            return Err(ConfigError(format!(
                "configuration key `secrets.key` (key {} of {}) {problem}.",
                i + 1,
                keys.len()
            )));
        }
    }
    Ok(keys)
}

fn require<T>(value: Option<T>, key: &str, section: &str) -> Result<T, ConfigError> {
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
    }))
}

/// The `[workers]` section (see [`WorkerConfig`]).
fn workers(s: &mut Source) -> Result<WorkerConfig, ConfigError> {
    Ok(WorkerConfig {
        enabled: s.bool("workers.enabled")?.unwrap_or(true),
        concurrency: s.integer("workers.concurrency", 1, 1024)?.unwrap_or(8) as usize,
        // 0 stands for "half of `concurrency`", resolved in `check`.
        backfill_concurrency: s
            .integer("workers.backfill_concurrency", 1, 1023)?
            .unwrap_or(0) as usize,
        batch_size: s.integer("workers.batch_size", 1, 10_000)?.unwrap_or(100) as usize,
        lease: s
            .duration("workers.lease")?
            .unwrap_or(Duration::from_secs(60)),
        poll_interval: s
            .duration("workers.poll_interval")?
            .unwrap_or(Duration::from_secs(1)),
        retry_schedule: s
            .duration_list("workers.retry_schedule")?
            .unwrap_or_else(|| {
                ["1s", "5s", "30s", "2m", "10m", "30m"]
                    .iter()
                    .map(|d| parse_duration(d).expect("valid"))
                    .collect()
            }),
        max_deferrals: s
            .integer("workers.max_deferrals", 0, 100_000)?
            .unwrap_or(100) as u32,
        max_retry_after: s
            .duration("workers.max_retry_after")?
            .unwrap_or(Duration::from_secs(600)),
        retention: s
            .duration("workers.retention")?
            .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(toml: &str, env: &[(&str, &str)]) -> Source {
        let mut s = Source {
            values: BTreeMap::new(),
        };
        s.add_toml(toml, Path::new("tether.toml")).unwrap();
        s.add_env(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        s
    }

    #[test]
    fn defaults_without_any_setting() {
        let c = Config::from_source(source("", &[])).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.http.body_limit, 1024 * 1024);
        assert!(c.systems.zendesk.is_none());
        assert!(c.database.url.is_none());
    }

    #[test]
    fn log_format_text_json_or_the_commands_default() {
        let c = Config::from_source(source("[log]\nformat = \"text\"\n", &[])).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Text));
        let c = Config::from_source(source("log_format = \"json\"\n", &[])).unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let c = Config::from_source(source("", &[("TETHER_LOG__LEVEL", "warn")])).unwrap();
        assert_eq!((c.log_format, c.log_level.as_str()), (None, "warn"));
        let e = Config::from_source(source("[log]\nformat = \"xml\"\n", &[])).unwrap_err();
        assert!(e.to_string().contains("`log.format`"), "{e}");
    }

    #[test]
    fn admin_token_must_be_long_enough() {
        let e = Config::from_source(source("[admin]\ntoken = \"short\"\n", &[])).unwrap_err();
        assert!(
            e.to_string().contains("`admin.token` is 5 characters"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("short"),
            "the token itself is never printed: {e}"
        );
        let c = Config::from_source(source(
            "[admin]\ntoken = \"0123456789abcdef0123456789\"\n",
            &[],
        ))
        .unwrap();
        assert!(c.admin.token.is_some());
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn environment_overrides_file() {
        let c = Config::from_source(source(
            "listen = \"127.0.0.1:1\"\n[workers]\nconcurrency = 2\n",
            &[
                ("TETHER_LISTEN", "127.0.0.1:9"),
                ("TETHER_WORKERS__CONCURRENCY", "5"),
            ],
        ))
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9");
        assert_eq!(c.workers.concurrency, 5);
    }

    #[test]
    fn wrong_value_names_key_problem_and_origin() {
        let err = Config::from_source(source("", &[("TETHER_WORKERS__LEASE", "ten minutes")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`workers.lease`"), "{err}");
        assert!(
            err.contains("environment variable TETHER_WORKERS__LEASE"),
            "{err}"
        );
        assert!(err.contains("not a duration"), "{err}");

        let err = Config::from_source(source("shutdown_timeout = 25\n", &[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`shutdown_timeout`") && err.contains("file tether.toml"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::from_source(source("[workers]\nconcurency = 2\n", &[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("workers.concurency") && err.contains("not a setting"),
            "{err}"
        );
    }

    #[test]
    fn lease_must_exceed_outbound_timeout() {
        let err = Config::from_source(source(
            "[workers]\nlease = \"20s\"\n[outbound]\ntimeout = \"30s\"\n",
            &[],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`workers.lease`") && err.contains("outbound.timeout"),
            "{err}"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let c = Config::from_source(source(
            "[zendesk]\nbase_url = \"http://127.0.0.1:1\"\nemail = \"a@b.c\"\napi_token = \"tok-SECRET-123\"\nwebhook_secrets = [\"whs-SECRET-456\"]\n",
            &[],
        ))
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("tok-SECRET-123") && !debug.contains("whs-SECRET-456"));

        let err = Config::from_source(source(
            "[customerp]\nbase_url = \"http://x\"\napi_token = \"t\"\nwebhook_secret = \"not-whsec-%%%\"\n",
            &[],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("customerp.webhook_secret") && !err.contains("not-whsec-%%%"),
            "{err}"
        );
    }

    #[test]
    fn system_section_requires_its_credentials() {
        let err = Config::from_source(source("[crmoffice]\npoll_interval = \"1m\"\n", &[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("crmoffice.api_token") && err.contains("required"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The shipped example must load and its values must be the defaults it claims.
    #[test]
    fn example_file_is_valid_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tether.example.toml");
        let mut s = Source {
            values: BTreeMap::new(),
        };
        s.add_toml(&std::fs::read_to_string(&path).unwrap(), &path)
            .unwrap();
        let from_file = Config::from_source(s).unwrap();
        let defaults = Config::from_source(Source {
            values: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }
}
