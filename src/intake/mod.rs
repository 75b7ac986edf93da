//! Webhook intake: verify the signature on the raw bytes, parse the vendor's format into a
//! [`crate::domain::ChangeEvent`], deduplicate on the delivery id and commit it with its queue job.
//!
//! Owns: `POST /webhooks/{system}` and the `events` table's inserts (group-committed, see
//! [`store`]). May call: `signing`, `queue` (the job row and record key it enqueues), `db`,
//! `systems` (which signature scheme a system uses), `ops::metrics` (one counter per answer).
//! Called by: `http`, which merges [`routes`]; the intake does not know `http`'s state.
//!
//! Answers ([`answer`]; the README's "Webhook intake" table): 202 once committed; 200 for a
//! duplicate or an event no dataflow needs; 401 unsigned, wrongly signed or outside the ±5 min
//! window; 413 over the body limit; 400 for a signed body that is not the vendor's format; 404 for
//! an unknown system, and also for a known system that is not connected here (no configuration
//! section, or no webhook secret): no signature could ever verify, and 401 would send the operator
//! hunting for a wrong secret instead of the missing configuration. 503 while the database is
//! unreachable.

pub mod answer;
pub mod parse;
pub mod store;
pub mod verify;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sqlx::PgPool;

use crate::config::Config;
use crate::domain::SystemId;
use crate::registry::Registry;
use crate::sync::delivery::Delivered;
use crate::systems::{self, WebhookScheme};
use crate::webhooks::store::StoredSecrets;
pub use answer::{IntakeError, Missing, Taken};
use parse::Parsed;
use store::{GroupCommit, StoreError, Stored};
use verify::{StandardHeaders, StandardKey, Unauthentic};

/// The webhook routes, with the intake's own state: the group-commit batcher (started here, on
/// the current runtime, and stopped when the router is dropped) and the verifiers built once from
/// the configuration. Generic over the caller's state, which the intake does not need.
pub fn routes<S>(
    config: &Arc<Config>,
    pool: PgPool,
    registry: &Registry,
    storing: &crate::sync::StoringWrites,
) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let keyring = crate::at_rest::Keyring::from_config(&config.secrets.keys);
    let stored = StoredSecrets::new(SystemId::Zendesk, pool.clone(), keyring);
    stored.spawn_refresh();
    let echoes = crate::sync::IntakeEchoes::new(registry, |s| config.systems.is_connected(s))
        .waiting_for(storing.clone());
    let intake = Intake::new(config, GroupCommit::start_settling(pool, echoes), stored);
    Router::new()
        .route("/webhooks/{system}", post(receive))
        .layer(DefaultBodyLimit::max(config.http.body_limit))
        .with_state(intake)
}

/// Per-process intake state; cheap to clone.
#[derive(Clone)]
pub struct Intake {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    /// One per system, in `SystemId::ALL` order.
    verifiers: Vec<(SystemId, Verifier)>,
    commit: GroupCommit,
    /// Zendesk signing secrets `tether webhooks install` stored, refreshed while running.
    stored: StoredSecrets,
}

/// How one system's deliveries are checked, decided once at start-up from the per-system table
/// (`crate::systems`) and the configuration.
enum Verifier {
    /// It sends no webhooks (it is polled).
    Polled,
    /// No signature could ever verify: the section or its secret is missing.
    NotConnected(Missing),
    /// The configured secrets; the stored ones ([`StoredSecrets`]) are tried as well, so the
    /// section alone is enough once a webhook is installed.
    Zendesk(Vec<SecretString>),
    Exact(SecretString),
    Standard(StandardKey),
}

impl Verifier {
    fn new(system: SystemId, config: &Config) -> Verifier {
        let spec = systems::spec(system);
        let Some(scheme) = spec.webhook_scheme() else {
            return Verifier::Polled;
        };
        if !config.systems.is_connected(system) {
            return Verifier::NotConnected(Missing::Section(spec.section));
        }
        let missing_secret = Verifier::NotConnected(Missing::WebhookSecret {
            section: spec.section,
            key: scheme.secret_key(),
        });
        let mut secrets = spec.webhook_secrets(&config.systems);
        if scheme == WebhookScheme::Zendesk {
            return Verifier::Zendesk(secrets);
        }
        if secrets.is_empty() {
            return missing_secret;
        }
        match scheme {
            WebhookScheme::Zendesk => Verifier::Zendesk(secrets),
            WebhookScheme::ExactHashCode => Verifier::Exact(secrets.swap_remove(0)),
            // Config already refused secrets that do not decode, so a failure here cannot
            // happen; it would leave the system unable to verify (404) rather than crash.
            WebhookScheme::StandardWebhooks => {
                crate::signing::standard::secret_key(secrets[0].expose_secret())
                    .map(|key| Verifier::Standard(SecretBox::new(Box::new(key))))
                    .unwrap_or(missing_secret)
            }
        }
    }
}

impl Intake {
    pub fn new(config: &Arc<Config>, commit: GroupCommit, stored: StoredSecrets) -> Intake {
        let verifiers = SystemId::ALL
            .into_iter()
            .map(|system| (system, Verifier::new(system, config)))
            .collect();
        Intake {
            inner: Arc::new(Inner {
                config: config.clone(),
                verifiers,
                commit,
                stored,
            }),
        }
    }

    fn verifier(&self, system: SystemId) -> &Verifier {
        let (_, verifier) = self
            .inner
            .verifiers
            .iter()
            .find(|(s, _)| *s == system)
            .expect("a verifier for every system");
        verifier
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, IntakeError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| Unauthentic::BadHeader(name).into()),
    }
}

// No span of its own: the request span (http) already names the path, and so the system; a
// second span per delivery would cost more than the rest of the handler's bookkeeping.
async fn receive(
    State(intake): State<Intake>,
    Path(system): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(&intake, &system, &headers, body).await {
        Ok(taken) => {
            crate::ops::metrics::webhook_received(&system, taken.outcome());
            taken.into_response()
        }
        Err(error) => {
            crate::ops::metrics::webhook_received(&system, error.code());
            tracing::info!(
                system,
                status = error.status().as_u16(),
                error = error.code(),
                "webhook refused"
            );
            error.into_response()
        }
    }
}

/// The whole decision for one delivery.
async fn handle(
    intake: &Intake,
    system: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Taken, IntakeError> {
    let system: SystemId = system.parse().map_err(|_| IntakeError::UnknownSystem)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => IntakeError::BodyTooLarge {
            limit: intake.inner.config.http.body_limit,
        },
        status => IntakeError::UnreadableBody { status },
    })?;
    let parsed = match verify_and_parse(intake, system, headers, &body) {
        // A webhook installed moments ago: its secret may not be loaded yet.
        Err(
            IntakeError::Unauthentic(Unauthentic::BadSignature) | IntakeError::NotConnected { .. },
        ) if system == SystemId::Zendesk => {
            intake.inner.stored.ensure_fresh().await;
            verify_and_parse(intake, system, headers, &body)?
        }
        other => other?,
    };
    let (event, delivered) = match parsed {
        Ok((Parsed::Event(event), delivered)) => (event, delivered),
        Ok((Parsed::Ignored(reason), _)) => return Ok(Taken::Ignored { reason }),
        Err(error) => return Err(IntakeError::InvalidPayload { system, error }),
    };
    let delivery_id = event.delivery_id.clone();
    match intake.inner.commit.store_with(event, delivered).await {
        Ok(Stored::New(_)) => Ok(Taken::Accepted { delivery_id }),
        Ok(Stored::Duplicate) => Ok(Taken::Duplicate { delivery_id }),
        Err(StoreError::Unavailable) => Err(IntakeError::DatabaseUnavailable),
        Err(StoreError::Refused) => Err(IntakeError::NotStored),
    }
}

/// A parsed body and what it says of its record's state, if it says enough to be kept
/// (`sync::delivery`).
type ParsedBody = (Parsed, Option<Delivered>);

/// Checks the delivery with its system's verifier; the outer error refuses it as unauthentic
/// (or from a system that cannot send it), the inner result is the parsed body.
fn verify_and_parse(
    intake: &Intake,
    system: SystemId,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Result<ParsedBody, parse::FormatError>, IntakeError> {
    let now = chrono::Utc::now();
    let tolerance = intake.inner.config.http.timestamp_tolerance;
    match intake.verifier(system) {
        Verifier::Polled => Err(IntakeError::Polled(system)),
        Verifier::NotConnected(missing) => Err(IntakeError::NotConnected {
            system,
            missing: *missing,
        }),
        Verifier::Zendesk(configured) => {
            let mut secrets = configured.clone();
            secrets.extend(intake.inner.stored.current());
            if secrets.is_empty() {
                return Err(IntakeError::NotConnected {
                    system,
                    missing: Missing::WebhookSecret {
                        section: "zendesk",
                        key: WebhookScheme::Zendesk.secret_key(),
                    },
                });
            }
            verify::zendesk(
                &secrets,
                header(headers, "x-zendesk-webhook-signature-timestamp")?,
                header(headers, "x-zendesk-webhook-signature")?,
                body,
                now,
                tolerance,
            )?;
            Ok(parse::zendesk_with_delivered(body))
        }
        Verifier::Exact(secret) => {
            let envelope = parse::exact_envelope(body).ok_or(Unauthentic::NoExactHash)?;
            verify::exact(secret, envelope.content_raw, envelope.hash_code)?;
            Ok(parse::exact_content(envelope.content_raw).map(|p| (p, None)))
        }
        Verifier::Standard(key) => {
            let h = StandardHeaders {
                id: header(headers, "webhook-id")?,
                timestamp: header(headers, "webhook-timestamp")?,
                signature: header(headers, "webhook-signature")?,
            };
            let id = verify::standard(key, h, body, now, tolerance)?;
            Ok(parse::custom(system, id, body).map(|p| (p, None)))
        }
    }
}
