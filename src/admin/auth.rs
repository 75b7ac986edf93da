//! Who may use `/admin`: the API takes `Authorization: Bearer <admin.token>`; the console logs in
//! with the same token and then carries a session cookie, with a CSRF token in every form.
//!
//! Sessions are stateless, so every replica behind a load balancer accepts them: the cookie is
//! `<nonce>.<expiry>.<mac>`, with the MAC an HMAC-SHA256 under a key derived from the admin
//! token. Changing the token ends every session. A form's CSRF token is an HMAC of the session
//! cookie under the same key (the cookie is `HttpOnly` and `SameSite=Strict` besides).
//! Every comparison of a presented secret is constant-time ([`subtle`]).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Name of the console's session cookie.
pub const SESSION_COOKIE: &str = "tether_admin";
/// How long a console session lasts.
pub const SESSION_TTL: chrono::TimeDelta = chrono::TimeDelta::hours(8);

type HmacSha256 = Hmac<Sha256>;

/// The admin token and the keys derived from it.
pub struct AdminAuth {
    /// SHA-256 of the token: presented tokens are hashed and compared to this, so the comparison
    /// takes the same time whatever the presented length.
    token_hash: SecretBox<[u8; 32]>,
    /// The session and CSRF MAC key.
    session_key: SecretBox<[u8; 32]>,
}

impl AdminAuth {
    pub fn new(token: &SecretString) -> AdminAuth {
        let token = token.expose_secret().as_bytes();
        let token_hash: [u8; 32] = Sha256::digest(token).into();
        let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes any key length");
        mac.update(b"tether admin session key v1");
        let session_key: [u8; 32] = mac.finalize().into_bytes().into();
        AdminAuth {
            token_hash: SecretBox::new(Box::new(token_hash)),
            session_key: SecretBox::new(Box::new(session_key)),
        }
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn token_matches(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        hash.ct_eq(self.token_hash.expose_secret()).into()
    }

    /// Whether the request carries `Authorization: Bearer <admin.token>`.
    pub fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.token_matches(token.trim()))
    }

    fn mac(&self, purpose: &[u8], data: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(self.session_key.expose_secret())
            .expect("HMAC takes any key length");
        mac.update(purpose);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// A new session cookie value, valid until `now + SESSION_TTL`.
    pub fn new_session(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let nonce: [u8; 16] = rand::random();
        let body = format!("{}.{}", hex::encode(nonce), (now + SESSION_TTL).timestamp());
        let mac = self.mac(b"session:", body.as_bytes());
        format!("{body}.{}", b64(&mac))
    }

    /// Whether `cookie` is a session this token issued and it has not expired.
    pub fn session_valid(&self, cookie: &str, now: chrono::DateTime<chrono::Utc>) -> bool {
        let Some((body, mac)) = cookie.rsplit_once('.') else {
            return false;
        };
        let expected = b64(&self.mac(b"session:", body.as_bytes()));
        let authentic: bool = expected.as_bytes().ct_eq(mac.as_bytes()).into();
        let expiry = body
            .split_once('.')
            .and_then(|(_, exp)| exp.parse::<i64>().ok());
        authentic && expiry.is_some_and(|exp| exp > now.timestamp())
    }

    /// The CSRF token of forms shown in `session`.
    pub fn csrf_token(&self, session: &str) -> String {
        b64(&self.mac(b"csrf:", session.as_bytes()))
    }

    /// Whether `presented` is the CSRF token of `session` (constant time).
    pub fn csrf_ok(&self, session: &str, presented: &str) -> bool {
        self.csrf_token(session)
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for a session (`None`: the cookie that ends one).
pub fn set_cookie(session: Option<&str>) -> String {
    match session {
        Some(value) => format!(
            "{SESSION_COOKIE}={value}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_TTL.num_seconds()
        ),
        None => format!("{SESSION_COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

/// Middleware of `/admin/api/…`: 401 without the bearer token.
pub async fn require_bearer(
    State(state): State<super::AdminState>,
    request: Request,
    next: Next,
) -> Response {
    if state.auth.bearer_ok(request.headers()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({
            "error": "unauthorized",
            "message": "send `Authorization: Bearer <admin.token>`",
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> AdminAuth {
        AdminAuth::new(&SecretString::from("a-long-enough-admin-token-0123"))
    }

    #[test]
    fn token_must_match_exactly() {
        let a = auth();
        assert!(a.token_matches("a-long-enough-admin-token-0123"));
        assert!(!a.token_matches("a-long-enough-admin-token-012"));
        assert!(!a.token_matches(""));
    }

    #[test]
    fn sessions_expire_and_cannot_be_forged_or_moved_to_another_token() {
        let a = auth();
        let now = chrono::Utc::now();
        let s = a.new_session(now);
        assert!(a.session_valid(&s, now));
        assert!(!a.session_valid(&s, now + SESSION_TTL + chrono::TimeDelta::seconds(1)));
        // A later expiry with the old MAC is refused.
        let (nonce, rest) = s.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let forged = format!("{nonce}.{}.{mac}", (now + SESSION_TTL * 10).timestamp());
        assert!(!a.session_valid(&forged, now));
        let other = AdminAuth::new(&SecretString::from("another-admin-token-0123456789"));
        assert!(!other.session_valid(&s, now));
    }

    #[test]
    fn csrf_token_belongs_to_its_session() {
        let a = auth();
        let now = chrono::Utc::now();
        let (s1, s2) = (a.new_session(now), a.new_session(now));
        assert!(a.csrf_ok(&s1, &a.csrf_token(&s1)));
        assert!(!a.csrf_ok(&s2, &a.csrf_token(&s1)));
        assert!(!a.csrf_ok(&s1, ""));
    }
}
