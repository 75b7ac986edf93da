//! The web console: server-rendered pages under `/admin` that work without JavaScript.
//!
//! Login takes the admin token and sets a session cookie (`HttpOnly`, `SameSite=Strict`, path
//! `/admin`); every page but the login needs it, and every form carries the session's CSRF token
//! (the login form a double-submit token). Pages send a Content-Security-Policy that allows
//! nothing but this origin's stylesheet: no script runs, inline or fetched.

mod pages;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::Markup;
use serde::Deserialize;

use super::auth::{session_cookie, set_cookie};
use super::{api, explain, pause, status, AdminState};

const LOGIN_COOKIE: &str = "tether_login";
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The session of a logged-in request (set by [`require_session`]).
#[derive(Clone)]
struct Session(String);

pub fn routes(state: AdminState) -> Router<AdminState> {
    let pages = Router::new()
        .route("/admin", get(overview))
        .route("/admin/records", get(records))
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/dead-letters/{id}/retry", post(retry))
        .route("/admin/flows/{flow}/pause", post(pause_flow))
        .route("/admin/flows/{flow}/resume", post(resume_flow))
        .route("/admin/backfill", get(backfill))
        .route("/admin/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/console.css", get(stylesheet))
        .route("/admin/favicon.svg", get(favicon))
        .merge(pages)
        .layer(axum::middleware::from_fn(security_headers))
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn require_session(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Response {
    let session = session_cookie(request.headers())
        .filter(|s| state.auth.session_valid(s, chrono::Utc::now()))
        .map(str::to_owned);
    match session {
        Some(s) => {
            request.extensions_mut().insert(Session(s));
            next.run(request).await
        }
        None => Redirect::to("/admin/login").into_response(),
    }
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        include_str!("favicon.svg"),
    )
        .into_response()
}

/// A form's CSRF field.
#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// The 403 answer when the form does not carry the session's CSRF token.
fn csrf_denied(state: &AdminState, session: &Session, form: &CsrfForm) -> Option<Response> {
    if state.auth.csrf_ok(&session.0, &form.csrf) {
        None
    } else {
        Some(page_error(
            StatusCode::FORBIDDEN,
            "This form has expired or did not come from this console. Reload the page and try again.",
        ))
    }
}

fn page_error(status: StatusCode, message: &str) -> Response {
    (status, pages::error(message)).into_response()
}

fn unavailable(e: sqlx::Error) -> Response {
    tracing::warn!(error = %e, "console: database error");
    page_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The database did not answer. Try again in a moment.",
    )
}

async fn login_page() -> Response {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    login_form(StatusCode::OK, &nonce, None)
}

fn login_form(status: StatusCode, nonce: &str, problem: Option<&str>) -> Response {
    let cookie = format!(
        "{LOGIN_COOKIE}={nonce}; Path=/admin/login; HttpOnly; SameSite=Strict; Max-Age=600"
    );
    (
        status,
        [(header::SET_COOKIE, cookie)],
        pages::login(nonce, problem),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    csrf: String,
}

async fn login(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let cookie_nonce = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(name, _)| *name == LOGIN_COOKIE)
        .map(|(_, v)| v.to_owned());
    let fresh = hex::encode(rand::random::<[u8; 16]>());
    let same = cookie_nonce
        .is_some_and(|c| subtle::ConstantTimeEq::ct_eq(c.as_bytes(), form.csrf.as_bytes()).into());
    if !same {
        return login_form(
            StatusCode::FORBIDDEN,
            &fresh,
            Some("The login form expired. Please enter the token again."),
        );
    }
    if !state.auth.token_matches(&form.token) {
        tracing::warn!("console: login with a wrong admin token");
        return login_form(
            StatusCode::UNAUTHORIZED,
            &fresh,
            Some("That is not the admin token."),
        );
    }
    let session = state.auth.new_session(chrono::Utc::now());
    (
        [(header::SET_COOKIE, set_cookie(Some(&session)))],
        Redirect::to("/admin"),
    )
        .into_response()
}

async fn logout(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(denied) = csrf_denied(&state, &session, &form) {
        return denied;
    }
    (
        [(header::SET_COOKIE, set_cookie(None))],
        Redirect::to("/admin/login"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Notice {
    notice: Option<String>,
}

async fn overview(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Query(q): Query<Notice>,
) -> Response {
    let data = async {
        Ok::<_, sqlx::Error>((
            status::systems(&state).await?,
            status::flows(&state).await?,
            crate::ops::gauges::read(&state.pool).await?,
        ))
    };
    match data.await {
        Ok((systems, flows, queue)) => {
            let ctx = pages::Ctx::new(&state, &session.0, "overview");
            pages::overview(&ctx, &systems, &flows, &queue, q.notice.as_deref()).into_response()
        }
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct RecordQuery {
    system: Option<String>,
    entity_type: Option<String>,
    id: Option<String>,
}

async fn records(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Query(q): Query<RecordQuery>,
) -> Response {
    let ctx = pages::Ctx::new(&state, &session.0, "records");
    let (Some(system), Some(entity_type), Some(id)) = (q.system, q.entity_type, q.id) else {
        return pages::records(&ctx, None, None).into_response();
    };
    let form = pages::RecordForm {
        system: system.clone(),
        entity_type: entity_type.clone(),
        id: id.clone(),
    };
    let key = match api::record_key(&system, entity_type.trim().to_owned(), id.trim().to_owned()) {
        Ok(key) => key,
        Err(e) => {
            let page: Markup = pages::records_problem(&ctx, &form, &e.message);
            return (StatusCode::BAD_REQUEST, page).into_response();
        }
    };
    match explain::explain(&state.pool, &key).await {
        Ok(x) => pages::records(&ctx, Some(&form), Some(&x)).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn dead_letters(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Query(q): Query<Notice>,
) -> Response {
    match status::dead_letters(&state.pool).await {
        Ok(letters) => {
            let ctx = pages::Ctx::new(&state, &session.0, "dead-letters");
            pages::dead_letters(&ctx, &letters, q.notice.as_deref()).into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// `?notice=` text for a redirect after a form.
fn with_notice(path: &str, notice: &str) -> Redirect {
    let encoded: String = url::form_urlencoded::byte_serialize(notice.as_bytes()).collect();
    Redirect::to(&format!("{path}?notice={encoded}"))
}

async fn retry(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Path(id): Path<i64>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(denied) = csrf_denied(&state, &session, &form) {
        return denied;
    }
    let notice = match api::retry(&state, id).await {
        Ok(_) => format!("Job {id} was put back in the queue."),
        Err(e) => e.message,
    };
    with_notice("/admin/dead-letters", &notice).into_response()
}

async fn pause_flow(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Path(flow): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(denied) = csrf_denied(&state, &session, &form) {
        return denied;
    }
    if let Err(e) = state.known_flow(&flow) {
        return page_error(StatusCode::NOT_FOUND, &e.message);
    }
    match pause::pause(&state.pool, &flow, Some("paused in the console")).await {
        Ok(_) => with_notice("/admin", &format!("{flow} is paused.")).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn resume_flow(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
    Path(flow): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(denied) = csrf_denied(&state, &session, &form) {
        return denied;
    }
    if let Err(e) = state.known_flow(&flow) {
        return page_error(StatusCode::NOT_FOUND, &e.message);
    }
    match pause::resume(&state.pool, &flow, state.resume_settle).await {
        Ok(r) => with_notice(
            "/admin",
            &format!(
                "{flow} runs again; {} event(s) replayed.",
                r.events_replayed
            ),
        )
        .into_response(),
        Err(e) => unavailable(e),
    }
}

/// Plans shown on the Backfill page, newest first.
const BACKFILL_PLANS_SHOWN: i64 = 20;

async fn backfill(
    State(state): State<AdminState>,
    Extension(session): Extension<Session>,
) -> Response {
    match crate::backfill::store::recent(&state.pool, BACKFILL_PLANS_SHOWN).await {
        Ok(plans) => {
            let ctx = pages::Ctx::new(&state, &session.0, "backfill");
            pages::backfill(&ctx, &plans).into_response()
        }
        Err(e) => unavailable(e),
    }
}
