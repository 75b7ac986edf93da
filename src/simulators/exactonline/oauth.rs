//! Exact's OAuth token endpoint as the simulator plays it (docs/vendors.md, Exact Online): a
//! refresh grant returns a new access token and a new refresh token. With strict rotation the
//! refresh token it was given is dead at once; otherwise it stays valid until its successor is
//! used, so that a lost answer can be retried. A refresh sooner than the minimum interval, a wrong
//! client or an unknown token is refused, and a revoked grant refuses every token it issued.

use super::*;

pub(super) async fn token(
    State(sim): State<ExactSim>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let (response, hold) = {
        let mut inner = sim.lock();
        let response = refresh(&mut inner, &form);
        let hold = response
            .status()
            .is_success()
            .then(|| inner.hold_next_token_answer.take())
            .flatten();
        (response, hold)
    };
    if let Some(delay) = hold {
        tokio::time::sleep(delay).await;
    }
    response
}

/// The token endpoint's work: checks the client and the refresh token, rotates.
pub(super) fn refresh(inner: &mut Inner, form: &BTreeMap<String, String>) -> Response {
    inner.token_calls += 1;
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("client_id") != inner.config.client_id
        || field("client_secret") != inner.config.client_secret
    {
        return kit::respond(StatusCode::BAD_REQUEST, json!({"error": "invalid_client"}));
    }
    if field("grant_type") != "refresh_token" {
        return kit::respond(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        );
    }
    let presented = field("refresh_token").to_owned();
    let tokens = &inner.tokens;
    let valid =
        presented == tokens.current || tokens.previous.as_deref() == Some(presented.as_str());
    if !valid {
        return kit::respond(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "Old or invalid refresh token."}),
        );
    }
    if let Some(last) = tokens.last_refresh {
        if last.elapsed() < inner.config.min_refresh_interval {
            return kit::respond(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "Access token requested too soon; wait until the current one is about to expire."}),
            );
        }
    }
    let ttl = inner.config.access_token_ttl;
    let tokens = &mut inner.tokens;
    if inner.config.strict_rotation {
        // Strict: the token just used is dead at once.
        tokens.previous = None;
    } else if presented == tokens.current {
        // Using the newest token retires the one before it; it stays valid itself until its
        // successor is used, so a lost response can be retried.
        tokens.previous = Some(presented);
    }
    // Presenting the previous token discards its unused successor and keeps `previous` as is.
    tokens.generation += 1;
    tokens.current = format!(
        "sim-refresh-{}-{}",
        tokens.generation,
        uuid::Uuid::new_v4().simple()
    );
    tokens.last_refresh = Some(Instant::now());
    let access = format!("sim-access-{}", uuid::Uuid::new_v4().simple());
    tokens.access.insert(access.clone(), Instant::now() + ttl);
    let refresh = tokens.current.clone();
    kit::respond(
        StatusCode::OK,
        json!({
            "access_token": access,
            "token_type": "bearer",
            "expires_in": ttl.as_secs().to_string(),
            "refresh_token": refresh,
        }),
    )
}
