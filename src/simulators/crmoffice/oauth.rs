//! CRMOffice's OAuth2 token endpoint as Sesam's connector uses it (docs/vendors.md, CRMOffice
//! item 9): `POST /connect/token` with `grant_type=refresh_token`, the client's id and secret and
//! the refresh token, answering a bearer access token that lives about an hour (`expires_in`) and
//! a new refresh token. The used refresh token is dead at once (one-time refresh tokens, the
//! default of the IdentityServer-style `/connect/token` endpoint). Access tokens expire: an
//! expired one is answered 401.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Form;
use serde::Deserialize;
use serde_json::json;

use super::CrmOfficeSim;
use crate::simulators::kit::{json_error, respond};

/// How long an access token lives unless a test says otherwise ("~1 hour").
pub const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(3600);

/// The OAuth client the simulator knows, and the tokens it issued.
pub(super) struct OAuth {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub lifetime: Duration,
    pub generation: u64,
    pub access: HashMap<String, Instant>,
    pub token_calls: u64,
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    grant_type: String,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

impl CrmOfficeSim {
    /// Accepts OAuth2: this client, starting from `refresh_token`, issuing access tokens that
    /// live `lifetime`. The fixed API token stays accepted too.
    pub fn enable_oauth(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
        lifetime: Duration,
    ) {
        *self.inner.oauth.lock().unwrap() = Some(OAuth {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            refresh_token: refresh_token.to_owned(),
            lifetime,
            generation: 0,
            access: HashMap::new(),
            token_calls: 0,
        });
    }

    /// Makes every issued access token expire now, as if an hour had passed.
    pub fn expire_access_tokens(&self) {
        if let Some(o) = self.inner.oauth.lock().unwrap().as_mut() {
            let now = Instant::now();
            o.access.values_mut().for_each(|until| *until = now);
        }
    }

    /// Calls to `/connect/token` so far.
    pub fn token_calls(&self) -> u64 {
        self.inner
            .oauth
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |o| o.token_calls)
    }

    /// The refresh token that works now (what a re-authorisation would hand out).
    pub fn current_refresh_token(&self) -> Option<String> {
        self.inner
            .oauth
            .lock()
            .unwrap()
            .as_ref()
            .map(|o| o.refresh_token.clone())
    }

    /// Whether `token` is an unexpired access token the token endpoint issued.
    pub(super) fn access_valid(&self, token: &str) -> bool {
        self.inner
            .oauth
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|o| o.access.get(token))
            .is_some_and(|until| Instant::now() < *until)
    }
}

/// `POST /connect/token`.
pub(super) async fn token(
    State(sim): State<CrmOfficeSim>,
    Form(form): Form<TokenForm>,
) -> Response {
    let mut guard = sim.inner.oauth.lock().unwrap();
    let Some(oauth) = guard.as_mut() else {
        return json_error(StatusCode::NOT_FOUND, "no OAuth client");
    };
    oauth.token_calls += 1;
    let client_ok = form.client_id.as_deref() == Some(oauth.client_id.as_str())
        && form.client_secret.as_deref() == Some(oauth.client_secret.as_str());
    if !client_ok {
        return respond(StatusCode::BAD_REQUEST, json!({"error": "invalid_client"}));
    }
    if form.grant_type != "refresh_token"
        || form.refresh_token.as_deref() != Some(oauth.refresh_token.as_str())
    {
        return respond(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
    }
    oauth.generation += 1;
    let access = format!("crm-access-{}-{}", oauth.generation, uuid::Uuid::new_v4());
    oauth.refresh_token = format!("crm-refresh-{}-{}", oauth.generation, uuid::Uuid::new_v4());
    oauth
        .access
        .insert(access.clone(), Instant::now() + oauth.lifetime);
    respond(
        StatusCode::OK,
        json!({
            "access_token": access,
            "refresh_token": oauth.refresh_token,
            "expires_in": oauth.lifetime.as_secs(),
            "token_type": "Bearer",
            "scope": "crmoffice offline_access",
        }),
    )
}
