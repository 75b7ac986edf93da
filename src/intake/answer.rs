//! What the intake answers a delivery, as types: [`Taken`] for the deliveries it keeps or
//! knowingly drops, [`IntakeError`] for the ones it refuses. Both become HTTP responses through
//! `IntoResponse`, and the log line and the metric label are read from the value, never back out
//! of a JSON body.
//!
//! Every error body is `{"error": "<code>", "message": "..."}`; messages are built from fixed text
//! and short identifiers, never from secrets or the signatures sent (the README lists the codes).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::parse::FormatError;
use super::verify::Unauthentic;
use crate::domain::SystemId;

/// A delivery the intake took: stored now (202), stored before (200), or valid but of a kind no
/// dataflow needs (200, not stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    Accepted { delivery_id: String },
    Duplicate { delivery_id: String },
    Ignored { reason: String },
}

impl Taken {
    /// `accepted`, `duplicate` or `ignored`: the body's `status` and the metric's outcome label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Taken::Accepted { .. } => "accepted",
            Taken::Duplicate { .. } => "duplicate",
            Taken::Ignored { .. } => "ignored",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Taken::Accepted { .. } => StatusCode::ACCEPTED,
            Taken::Duplicate { .. } | Taken::Ignored { .. } => StatusCode::OK,
        }
    }
}

/// Serialised straight from the fields: the answer to nearly every delivery builds no JSON map.
#[derive(serde::Serialize)]
struct TakenBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl IntoResponse for Taken {
    fn into_response(self) -> Response {
        let (delivery_id, reason) = match &self {
            Taken::Accepted { delivery_id } | Taken::Duplicate { delivery_id } => {
                (Some(delivery_id.as_str()), None)
            }
            Taken::Ignored { reason } => (None, Some(reason.as_str())),
        };
        let body = TakenBody {
            status: self.outcome(),
            delivery_id,
            reason,
        };
        (self.status(), Json(body)).into_response()
    }
}

/// Which part of a system's configuration is missing, so that no signature could ever verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No `[section]` at all: the system is not connected.
    Section(&'static str),
    /// The section is there but its webhook secret key (`section.key`) is unset or empty.
    WebhookSecret {
        section: &'static str,
        key: &'static str,
    },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Section(section) => write!(f, "no [{section}] configuration section"),
            Missing::WebhookSecret { section, key } => write!(f, "`{section}.{key}` is not set"),
        }
    }
}

/// Why a delivery was refused. Nothing was stored for it.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("unknown system; webhook systems are zendesk, exactonline, customerp, custompms")]
    UnknownSystem,
    #[error(
        "{} sends no webhooks (it is polled); webhook systems are zendesk, exactonline, customerp, custompms",
        .0.display_name()
    )]
    Polled(SystemId),
    /// No signature could ever verify; a 401 would send the operator looking for a wrong secret
    /// instead of the missing configuration, so this is a 404.
    #[error("{} is not connected to this Tether: {missing}", .system.display_name())]
    NotConnected { system: SystemId, missing: Missing },
    #[error("the body is larger than the limit of {limit} bytes (http.body_limit)")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read")]
    UnreadableBody { status: StatusCode },
    #[error(transparent)]
    Unauthentic(#[from] Unauthentic),
    #[error("signed body is not the {} format: {error}", .system.display_name())]
    InvalidPayload {
        system: SystemId,
        error: FormatError,
    },
    /// The vendor retries on a 503.
    #[error("the event could not be stored because the database is unreachable; retry later")]
    DatabaseUnavailable,
    /// The database refused the event's own row; the cause is logged where it happened.
    #[error("the event could not be stored; the cause is logged")]
    NotStored,
}

impl IntakeError {
    /// The body's `error` code, also the log's `error` field and the metric's outcome label.
    pub fn code(&self) -> &'static str {
        match self {
            IntakeError::UnknownSystem | IntakeError::Polled(_) => "unknown_system",
            IntakeError::NotConnected { .. } => "system_not_connected",
            IntakeError::BodyTooLarge { .. } => "body_too_large",
            IntakeError::UnreadableBody { .. } => "unreadable_body",
            IntakeError::Unauthentic(why) => match why {
                Unauthentic::MissingHeader(_) | Unauthentic::NoExactHash => "missing_signature",
                Unauthentic::BadHeader(_) => "invalid_header",
                Unauthentic::BadTimestamp(..) | Unauthentic::TimestampOutOfWindow(..) => {
                    "invalid_timestamp"
                }
                Unauthentic::BadSignature => "invalid_signature",
            },
            IntakeError::InvalidPayload { .. } => "invalid_payload",
            IntakeError::DatabaseUnavailable => "database_unavailable",
            IntakeError::NotStored => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            IntakeError::UnknownSystem
            | IntakeError::Polled(_)
            | IntakeError::NotConnected { .. } => StatusCode::NOT_FOUND,
            IntakeError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IntakeError::UnreadableBody { status } => *status,
            IntakeError::Unauthentic(_) => StatusCode::UNAUTHORIZED,
            IntakeError::InvalidPayload { .. } => StatusCode::BAD_REQUEST,
            IntakeError::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            IntakeError::NotStored => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(serde::Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

impl IntoResponse for IntakeError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code(),
            message: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code_and_status() {
        let cases = [
            (IntakeError::UnknownSystem, 404, "unknown_system"),
            (
                IntakeError::Polled(SystemId::PowerOffice),
                404,
                "unknown_system",
            ),
            (
                IntakeError::NotConnected {
                    system: SystemId::CustomPms,
                    missing: Missing::Section("custompms"),
                },
                404,
                "system_not_connected",
            ),
            (
                IntakeError::BodyTooLarge { limit: 10 },
                413,
                "body_too_large",
            ),
            (
                IntakeError::Unauthentic(Unauthentic::NoExactHash),
                401,
                "missing_signature",
            ),
            (
                IntakeError::Unauthentic(Unauthentic::BadHeader("webhook-id")),
                401,
                "invalid_header",
            ),
            (
                IntakeError::Unauthentic(Unauthentic::TimestampOutOfWindow(900, 300)),
                401,
                "invalid_timestamp",
            ),
            (
                IntakeError::Unauthentic(Unauthentic::BadSignature),
                401,
                "invalid_signature",
            ),
            (
                IntakeError::InvalidPayload {
                    system: SystemId::Zendesk,
                    error: FormatError("no `type`".to_owned()),
                },
                400,
                "invalid_payload",
            ),
            (
                IntakeError::DatabaseUnavailable,
                503,
                "database_unavailable",
            ),
            (IntakeError::NotStored, 500, "internal"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn a_missing_secret_names_the_key_to_set() {
        let error = IntakeError::NotConnected {
            system: SystemId::ExactOnline,
            missing: Missing::WebhookSecret {
                section: "exactonline",
                key: "webhook_secret",
            },
        };
        assert_eq!(
            error.to_string(),
            "Exact Online is not connected to this Tether: `exactonline.webhook_secret` is not set"
        );
    }
}
