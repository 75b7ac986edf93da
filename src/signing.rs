//! Webhook signatures of the three schemes Tether receives, signing and verifying.
//!
//! Shared by `intake` (verify, on the raw bytes, before anything is parsed) and `simulators`
//! (sign what they send), so the two can never drift apart. Verification compares in constant
//! time with `Mac::verify_slice`. Facts and test vectors: docs/vendors.md (Zendesk and Exact
//! Online webhooks) and the README's "The custom-system contract" (Standard Webhooks).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

/// Zendesk: `X-Zendesk-Webhook-Signature` = base64(HMAC-SHA256(secret, timestamp + body)).
/// The secret's bytes are the key as given (not base64-decoded).
pub mod zendesk {
    use super::*;

    pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
        let mut m = mac(secret.as_bytes());
        m.update(timestamp.as_bytes());
        m.update(body);
        BASE64.encode(m.finalize().into_bytes())
    }

    /// True if `signature` (base64) is the signature of `timestamp + body` under `secret`.
    pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
        let Ok(expected) = BASE64.decode(signature.trim()) else {
            return false;
        };
        let mut m = mac(secret.as_bytes());
        m.update(timestamp.as_bytes());
        m.update(body);
        m.verify_slice(&expected).is_ok()
    }
}

/// Exact Online: `HashCode` = upper-case hex HMAC-SHA256 of the raw `Content` JSON text exactly as
/// it stands in the body, keyed with the webhook secret.
pub mod exact {
    use super::*;

    pub fn sign(secret: &str, content_raw: &[u8]) -> String {
        let mut m = mac(secret.as_bytes());
        m.update(content_raw);
        hex::encode_upper(m.finalize().into_bytes())
    }

    /// Accepts the hex in either case (Exact sends upper case; some relays lower-case it).
    pub fn verify(secret: &str, content_raw: &[u8], hash_code: &str) -> bool {
        let Ok(expected) = hex::decode(hash_code.trim()) else {
            return false;
        };
        let mut m = mac(secret.as_bytes());
        m.update(content_raw);
        m.verify_slice(&expected).is_ok()
    }
}

/// Standard Webhooks (custom systems): `webhook-signature` holds space-separated `v1,<base64>`
/// entries, each an HMAC-SHA256 over `id.timestamp.body` keyed with the base64-decoded secret
/// after the `whsec_` prefix.
pub mod standard {
    use super::*;

    /// Why a Standard Webhooks secret could not be used as a key.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("a Standard Webhooks secret must be `whsec_` followed by base64")]
    pub struct BadSecret;

    pub fn secret_key(secret: &str) -> Result<Vec<u8>, BadSecret> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        BASE64.decode(encoded).map_err(|_| BadSecret)
    }

    fn signed_mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut m = mac(key);
        m.update(id.as_bytes());
        m.update(b".");
        m.update(timestamp.as_bytes());
        m.update(b".");
        m.update(body);
        m
    }

    pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
        let m = signed_mac(key, id, timestamp, body);
        format!("v1,{}", BASE64.encode(m.finalize().into_bytes()))
    }

    /// True if any `v1,` entry of the header verifies.
    pub fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
        header.split_whitespace().any(|entry| {
            let Some(sig) = entry.strip_prefix("v1,") else {
                return false;
            };
            let Ok(expected) = BASE64.decode(sig) else {
                return false;
            };
            signed_mac(key, id, timestamp, body)
                .verify_slice(&expected)
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZD_SECRET: &str = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";

    #[test]
    fn zendesk_vector_timestamp_then_body() {
        let body = br#"{"type":"zen:event-type:organization.created","id":"a540ab78-88f2-49e1-93a7-16152a6f782c"}"#;
        let sig = "lwGHZ/QMboAqlkjsjO/gr/8gJRItFF9ZPhfmQTowcTw=";
        assert_eq!(zendesk::sign(ZD_SECRET, "2024-01-01T00:00:00Z", body), sig);
        assert!(zendesk::verify(
            ZD_SECRET,
            "2024-01-01T00:00:00Z",
            body,
            sig
        ));
        assert!(!zendesk::verify(
            ZD_SECRET,
            "2024-01-01T00:00:01Z",
            body,
            sig
        ));
    }

    #[test]
    fn zendesk_old_doc_vector_is_body_then_timestamp_and_is_refused() {
        // docs/vendors.md (Zendesk webhooks): the old doc vector matches body+timestamp; timestamp+body gives this.
        let secret = "HRkRd4BeOAoUkfZr-mhauJT64rvBASlJRoIyPsd3zeA=";
        let body = br#"{"say": "hello"}"#;
        let ts = "2021-07-25T10:00:00Z";
        assert_eq!(
            zendesk::sign(secret, ts, body),
            "Rry/4TtIdFyawtXXp8QdI6tlAUUQ/5kL1OTp5qo/ZIk="
        );
        assert!(!zendesk::verify(
            secret,
            ts,
            body,
            "tRDSF7URY8BLCDlaBcQ7FHu051Zk+aAB0NKMP53teMw="
        ));
    }

    #[test]
    fn exact_vector() {
        let content = r#"{"Topic":"Accounts","ClientId":"00000000-0000-0000-0000-000000000001","Division":123456,"Action":"Update","Key":"11111111-1111-1111-1111-111111111111","ExactOnlineEndpoint":"https://start.exactonline.nl/api/v1/123456/crm/Accounts(guid'11111111-1111-1111-1111-111111111111')","EventCreatedOn":"2024-01-01T12:00:00.000"}"#;
        let hash = "83BB492A5B30A600D68BB3805402DE2462C9F1F6229B827A7EF894CA5C55FF65";
        assert_eq!(exact::sign("test-webhook-secret", content.as_bytes()), hash);
        assert!(exact::verify(
            "test-webhook-secret",
            content.as_bytes(),
            hash
        ));
        assert!(exact::verify(
            "test-webhook-secret",
            content.as_bytes(),
            &hash.to_lowercase()
        ));
        assert!(!exact::verify("other", content.as_bytes(), hash));
    }

    #[test]
    fn standard_webhooks_vector() {
        let key = standard::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(standard::sign(&key, id, "1614265330", body), sig);
        assert!(standard::verify(&key, id, "1614265330", body, sig));
        assert!(standard::verify(
            &key,
            id,
            "1614265330",
            body,
            &format!("v1,bm90LWl0 {sig}")
        ));
        assert!(!standard::verify(&key, id, "1614265331", body, sig));
        assert!(!standard::verify(&key, id, "1614265330", body, "v2,abc"));
    }
}
