//! Webhook intake: verify the signature on the raw bytes, parse the vendor's format into a
//! [`crate::domain::ChangeEvent`], deduplicate on the delivery id and commit it with its queue job.
//!
//! Owns: `POST /webhooks/{system}` and the `events` table's inserts (group-committed, see
//! [`store`]). May call: `signing`, `queue` (the job row and record key it enqueues), `db`.
//! Called by: `http`.
//!
//! Answers (product.md section 4): 202 once committed; 200 for a duplicate or an event no
//! dataflow needs; 401 unsigned, wrongly signed or outside the ±5 min window; 413 over the body
//! limit; 400 for a signed body that is not the vendor's format; 404 for an unknown system, and
//! also for a known system that is not connected here (no configuration section, or no webhook
//! secret): no signature could ever verify, and 401 would send the operator hunting for a wrong
//! secret instead of the missing configuration. 503 while the database is unreachable.

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
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde_json::json;

use crate::config::Config;
use crate::domain::SystemId;
use crate::http::AppState;
use parse::Parsed;
use store::{GroupCommit, StoreError, Stored};
use verify::{StandardHeaders, StandardKey};

/// The webhook routes, with the intake's own state: the group-commit batcher (started here, on
/// the current runtime, and stopped when the router is dropped) and the secrets decoded once.
pub fn routes(state: &AppState) -> Router<AppState> {
    let intake = Intake::new(&state.config, GroupCommit::start(state.pool.clone()));
    Router::new()
        .route("/webhooks/{system}", post(receive))
        .layer(DefaultBodyLimit::max(state.config.http.body_limit))
        .with_state(intake)
}

/// Per-process intake state; cheap to clone.
#[derive(Clone)]
pub struct Intake {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    customerp_key: Option<StandardKey>,
    custompms_key: Option<StandardKey>,
    commit: GroupCommit,
}

fn standard_key(secret: Option<&SecretString>) -> Option<StandardKey> {
    // Config already refused secrets that do not decode, so a failure here cannot happen; it
    // would leave the system unable to verify (404 not connected) rather than crash.
    secret
        .and_then(|s| crate::signing::standard::secret_key(s.expose_secret()).ok())
        .map(|k| SecretBox::new(Box::new(k)))
}

impl Intake {
    pub fn new(config: &Arc<Config>, commit: GroupCommit) -> Intake {
        let systems = &config.systems;
        Intake {
            inner: Arc::new(Inner {
                config: config.clone(),
                customerp_key: standard_key(
                    systems
                        .customerp
                        .as_ref()
                        .and_then(|c| c.webhook_secret.as_ref()),
                ),
                custompms_key: standard_key(
                    systems
                        .custompms
                        .as_ref()
                        .and_then(|c| c.webhook_secret.as_ref()),
                ),
                commit,
            }),
        }
    }
}

/// An answer with a JSON body. Error messages are built from fixed text and short identifiers,
/// never from secrets or signatures.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    body: ReplyBody,
}

#[derive(Debug)]
enum ReplyBody {
    /// Errors and ignored deliveries.
    Value(serde_json::Value),
    /// The answer to nearly every delivery (accepted or duplicate), serialised straight from
    /// its fields: no intermediate JSON map on the hot path.
    Stored(StoredBody),
}

#[derive(Debug, serde::Serialize)]
struct StoredBody {
    status: &'static str,
    delivery_id: String,
}

impl Reply {
    fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Reply {
        Reply {
            status,
            body: ReplyBody::Value(json!({ "error": code, "message": message.to_string() })),
        }
    }

    fn stored(status: StatusCode, what: &'static str, delivery_id: String) -> Reply {
        Reply {
            status,
            body: ReplyBody::Stored(StoredBody {
                status: what,
                delivery_id,
            }),
        }
    }

    /// `accepted`, `duplicate`, `ignored` or the error code: the outcome label of
    /// `tether_webhooks_received_total` (fixed strings of this module, never the caller's text).
    fn outcome(&self) -> &str {
        match &self.body {
            ReplyBody::Stored(stored) => stored.status,
            ReplyBody::Value(v) => v["error"]
                .as_str()
                .or_else(|| v["status"].as_str())
                .unwrap_or("-"),
        }
    }

    /// The `error` code of an error answer, for the log.
    fn error_code(&self) -> &str {
        match &self.body {
            ReplyBody::Value(v) => v["error"].as_str().unwrap_or("-"),
            ReplyBody::Stored(_) => "-",
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self.body {
            ReplyBody::Value(v) => (self.status, Json(v)).into_response(),
            ReplyBody::Stored(b) => (self.status, Json(b)).into_response(),
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, Reply> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| unauthorized(verify::Unauthentic::BadHeader(name))),
    }
}

fn unauthorized(why: verify::Unauthentic) -> Reply {
    let code = match why {
        verify::Unauthentic::MissingHeader(_) | verify::Unauthentic::NoExactHash => {
            "missing_signature"
        }
        verify::Unauthentic::BadHeader(_) => "invalid_header",
        verify::Unauthentic::BadTimestamp(..) | verify::Unauthentic::TimestampOutOfWindow(..) => {
            "invalid_timestamp"
        }
        verify::Unauthentic::BadSignature => "invalid_signature",
    };
    Reply::error(StatusCode::UNAUTHORIZED, code, why)
}

fn not_connected(system: SystemId, what: &str) -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        "system_not_connected",
        format!(
            "{} is not connected to this Tether: {what}",
            system.display_name()
        ),
    )
}

// No span of its own: the request span (http) already names the path, and so the system; a
// second span per delivery would cost more than the rest of the handler's bookkeeping.
async fn receive(
    State(intake): State<Intake>,
    Path(system): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    match handle(&intake, &system, &headers, body).await {
        Ok(reply) | Err(reply) => {
            crate::ops::metrics::webhook_received(&system, reply.outcome());
            if !reply.status.is_success() {
                tracing::info!(
                    system,
                    status = reply.status.as_u16(),
                    error = reply.error_code(),
                    "webhook refused"
                );
            }
            reply
        }
    }
}

/// The whole decision for one delivery; `Err` carries the error answer.
async fn handle(
    intake: &Intake,
    system: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Reply, Reply> {
    let system: SystemId = system.parse().map_err(|_| {
        Reply::error(
            StatusCode::NOT_FOUND,
            "unknown_system",
            "unknown system; webhook systems are zendesk, exactonline, customerp, custompms",
        )
    })?;
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Reply::error(
                status,
                "body_too_large",
                format!(
                    "the body is larger than the limit of {} bytes (http.body_limit)",
                    intake.inner.config.http.body_limit
                ),
            )
        } else {
            Reply::error(
                status,
                "unreadable_body",
                "the request body could not be read",
            )
        }
    })?;
    let config = &intake.inner.config;
    let now = chrono::Utc::now();
    let tolerance = config.http.timestamp_tolerance;
    let parsed = match system {
        SystemId::Zendesk => {
            let zendesk = config
                .systems
                .zendesk
                .as_ref()
                .ok_or_else(|| not_connected(system, "no [zendesk] configuration section"))?;
            if zendesk.webhook_secrets.is_empty() {
                return Err(not_connected(system, "`zendesk.webhook_secrets` is empty"));
            }
            verify::zendesk(
                &zendesk.webhook_secrets,
                header(headers, "x-zendesk-webhook-signature-timestamp")?,
                header(headers, "x-zendesk-webhook-signature")?,
                &body,
                now,
                tolerance,
            )
            .map_err(unauthorized)?;
            parse::zendesk(&body)
        }
        SystemId::ExactOnline => {
            let secret = config
                .systems
                .exactonline
                .as_ref()
                .ok_or_else(|| not_connected(system, "no [exactonline] configuration section"))?
                .webhook_secret
                .as_ref()
                .ok_or_else(|| not_connected(system, "`exactonline.webhook_secret` is not set"))?;
            let envelope = parse::exact_envelope(&body)
                .ok_or_else(|| unauthorized(verify::Unauthentic::NoExactHash))?;
            verify::exact(secret, envelope.content_raw, envelope.hash_code)
                .map_err(unauthorized)?;
            parse::exact_content(envelope.content_raw)
        }
        SystemId::CustomErp | SystemId::CustomPms => {
            let (section, key) = if system == SystemId::CustomErp {
                (config.systems.customerp.is_some(), &intake.inner.customerp_key)
            } else {
                (config.systems.custompms.is_some(), &intake.inner.custompms_key)
            };
            if !section {
                return Err(not_connected(system, "no configuration section"));
            }
            let key = key
                .as_ref()
                .ok_or_else(|| not_connected(system, "its `webhook_secret` is not set"))?;
            let h = StandardHeaders {
                id: header(headers, "webhook-id")?,
                timestamp: header(headers, "webhook-timestamp")?,
                signature: header(headers, "webhook-signature")?,
            };
            let id = verify::standard(key, h, &body, now, tolerance).map_err(unauthorized)?;
            parse::custom(system, id, &body)
        }
        SystemId::PowerOffice | SystemId::CrmOffice => {
            return Err(Reply::error(
                StatusCode::NOT_FOUND,
                "unknown_system",
                format!(
                    "{} sends no webhooks (it is polled); webhook systems are zendesk, exactonline, customerp, custompms",
                    system.display_name()
                ),
            ))
        }
    };
    let event = match parsed {
        Ok(Parsed::Event(event)) => event,
        Ok(Parsed::Ignored(reason)) => {
            return Ok(Reply {
                status: StatusCode::OK,
                body: ReplyBody::Value(json!({ "status": "ignored", "reason": reason })),
            })
        }
        Err(e) => {
            return Err(Reply::error(
                StatusCode::BAD_REQUEST,
                "invalid_payload",
                format!(
                    "signed body is not the {} format: {e}",
                    system.display_name()
                ),
            ))
        }
    };
    let delivery_id = event.delivery_id.clone();
    match intake.inner.commit.store(event).await {
        Ok(Stored::New(_)) => Ok(Reply::stored(StatusCode::ACCEPTED, "accepted", delivery_id)),
        Ok(Stored::Duplicate) => Ok(Reply::stored(StatusCode::OK, "duplicate", delivery_id)),
        Err(StoreError::Unavailable) => Err(Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the event could not be stored because the database is unreachable; retry later",
        )),
        Err(StoreError::Refused) => Err(Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the event could not be stored; the cause is logged",
        )),
    }
}
