//! Signature and timestamp checks on the raw body, before anything is parsed. Pure: the clock is
//! an argument and secrets come in already decoded, so the fuzz target and unit tests drive these
//! directly. The MAC comparisons themselves are `crate::signing`'s (constant time).

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretBox, SecretString};

use crate::signing;

/// Why a delivery is not authentic (always answered 401). Messages never contain a secret or the
/// signature sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthentic {
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    #[error("the `{0}` header is not valid text")]
    BadHeader(&'static str),
    #[error("the `{0}` header is not a timestamp ({1})")]
    BadTimestamp(&'static str, &'static str),
    #[error("the timestamp is {0}s away from now; at most {1}s either way is accepted")]
    TimestampOutOfWindow(i64, u64),
    #[error("the body carries no `Content`/`HashCode` pair to verify")]
    NoExactHash,
    #[error("the signature does not match the body under any configured secret")]
    BadSignature,
}

/// Checks a timestamp against the window, both ways (replays and clock skew).
fn check_window(at: i64, now: DateTime<Utc>, tolerance: Duration) -> Result<(), Unauthentic> {
    let diff = now.timestamp().saturating_sub(at);
    if diff.unsigned_abs() > tolerance.as_secs() {
        return Err(Unauthentic::TimestampOutOfWindow(diff, tolerance.as_secs()));
    }
    Ok(())
}

/// Zendesk: ISO-8601 timestamp header, base64 HMAC over timestamp + body, any of the secrets
/// (several during a rotation).
pub fn zendesk(
    secrets: &[SecretString],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<(), Unauthentic> {
    const SIG: &str = "x-zendesk-webhook-signature";
    const TS: &str = "x-zendesk-webhook-signature-timestamp";
    let signature = signature.ok_or(Unauthentic::MissingHeader(SIG))?;
    let timestamp = timestamp.ok_or(Unauthentic::MissingHeader(TS))?;
    let at = DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|_| {
        Unauthentic::BadTimestamp(TS, "expected ISO-8601, e.g. 2024-01-01T00:00:00Z")
    })?;
    check_window(at.timestamp(), now, tolerance)?;
    if secrets
        .iter()
        .any(|s| signing::zendesk::verify(s.expose_secret(), timestamp, body, signature))
    {
        Ok(())
    } else {
        Err(Unauthentic::BadSignature)
    }
}

/// Exact Online: the HashCode inside the body over the raw Content text. Exact sends no
/// timestamp, so there is no window; replays are caught by the delivery id (hash of Content).
pub fn exact(secret: &SecretString, content_raw: &str, hash_code: &str) -> Result<(), Unauthentic> {
    if signing::exact::verify(secret.expose_secret(), content_raw.as_bytes(), hash_code) {
        Ok(())
    } else {
        Err(Unauthentic::BadSignature)
    }
}

/// A decoded Standard Webhooks key (the bytes after `whsec_`), decoded once at start-up.
pub type StandardKey = SecretBox<Vec<u8>>;

/// Standard Webhooks headers of one delivery.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Standard Webhooks: unix-seconds timestamp within the window, any `v1,` signature matching.
/// Returns the verified `webhook-id`.
pub fn standard<'a>(
    key: &StandardKey,
    headers: StandardHeaders<'a>,
    body: &[u8],
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<&'a str, Unauthentic> {
    let id = headers.id.ok_or(Unauthentic::MissingHeader("webhook-id"))?;
    let timestamp = headers
        .timestamp
        .ok_or(Unauthentic::MissingHeader("webhook-timestamp"))?;
    let signature = headers
        .signature
        .ok_or(Unauthentic::MissingHeader("webhook-signature"))?;
    let at: i64 = timestamp
        .parse()
        .map_err(|_| Unauthentic::BadTimestamp("webhook-timestamp", "expected unix seconds"))?;
    check_window(at, now, tolerance)?;
    if signing::standard::verify(key.expose_secret(), id, timestamp, body, signature) {
        Ok(id)
    } else {
        Err(Unauthentic::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn zendesk_vector_and_rotation() {
        let body = br#"{"type":"zen:event-type:organization.created","id":"a540ab78-88f2-49e1-93a7-16152a6f782c"}"#;
        let sig = "lwGHZ/QMboAqlkjsjO/gr/8gJRItFF9ZPhfmQTowcTw=";
        let ts = "2024-01-01T00:00:00Z";
        let now = at("2024-01-01T00:04:00Z");
        let right = SecretString::from("dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==");
        let old = SecretString::from("old");
        assert_eq!(
            zendesk(
                &[old.clone(), right.clone()],
                Some(ts),
                Some(sig),
                body,
                now,
                FIVE_MIN
            ),
            Ok(())
        );
        assert_eq!(
            zendesk(&[old], Some(ts), Some(sig), body, now, FIVE_MIN),
            Err(Unauthentic::BadSignature)
        );
        assert!(matches!(
            zendesk(
                std::slice::from_ref(&right),
                Some(ts),
                Some(sig),
                body,
                at("2024-01-01T00:06:00Z"),
                FIVE_MIN
            ),
            Err(Unauthentic::TimestampOutOfWindow(360, 300))
        ));
        assert!(matches!(
            zendesk(
                std::slice::from_ref(&right),
                Some(ts),
                Some(sig),
                body,
                at("2023-12-31T23:54:00Z"),
                FIVE_MIN
            ),
            Err(Unauthentic::TimestampOutOfWindow(-360, 300))
        ));
        assert_eq!(
            zendesk(
                std::slice::from_ref(&right),
                None,
                Some(sig),
                body,
                now,
                FIVE_MIN
            ),
            Err(Unauthentic::MissingHeader(
                "x-zendesk-webhook-signature-timestamp"
            ))
        );
        assert!(matches!(
            zendesk(&[right], Some("1234"), Some(sig), body, now, FIVE_MIN),
            Err(Unauthentic::BadTimestamp(..))
        ));
    }

    #[test]
    fn exact_vector() {
        let content = r#"{"Topic":"Accounts","ClientId":"00000000-0000-0000-0000-000000000001","Division":123456,"Action":"Update","Key":"11111111-1111-1111-1111-111111111111","ExactOnlineEndpoint":"https://start.exactonline.nl/api/v1/123456/crm/Accounts(guid'11111111-1111-1111-1111-111111111111')","EventCreatedOn":"2024-01-01T12:00:00.000"}"#;
        let secret = SecretString::from("test-webhook-secret");
        let hash = "83BB492A5B30A600D68BB3805402DE2462C9F1F6229B827A7EF894CA5C55FF65";
        assert_eq!(exact(&secret, content, hash), Ok(()));
        assert_eq!(
            exact(&secret, &content.replace(':', ": "), hash),
            Err(Unauthentic::BadSignature)
        );
    }

    #[test]
    fn standard_vector_and_window() {
        let key: StandardKey = SecretBox::new(Box::new(
            signing::standard::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        ));
        let headers = StandardHeaders {
            id: Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            timestamp: Some("1614265330"),
            signature: Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
        };
        let body = br#"{"test": 2432232314}"#;
        let now = DateTime::from_timestamp(1614265330 + 299, 0).unwrap();
        assert_eq!(
            standard(&key, headers, body, now, FIVE_MIN),
            Ok("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
        let late = DateTime::from_timestamp(1614265330 + 301, 0).unwrap();
        assert!(standard(&key, headers, body, late, FIVE_MIN).is_err());
        let no_id = StandardHeaders {
            id: None,
            ..headers
        };
        assert_eq!(
            standard(&key, no_id, body, now, FIVE_MIN),
            Err(Unauthentic::MissingHeader("webhook-id"))
        );
    }
}
