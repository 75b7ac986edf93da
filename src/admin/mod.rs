//! The admin surface: a JSON API under `/admin/api/…` and a server-rendered console under
//! `/admin`, both off (404) unless `admin.token` is configured.
//!
//! - [`auth`]: the bearer check of the API, the console's session cookie and CSRF tokens.
//! - [`api`]: the API handlers and their OpenAPI document.
//! - [`console`]: the HTML pages (maud), working without JavaScript.
//! - [`status`], [`explain`]: what both show, read from the configuration, the registry and
//!   PostgreSQL; [`pause`]: pausing and resuming dataflows (honoured by the sync engine).
//!
//! May call: `queue` (dead letters), `sync::history` (a record's links and decisions), `ops`
//! (queue gauges, credential failures), `registry`. Called by: `http` (routes), `sync` (pauses).

pub mod api;
pub mod auth;
pub mod console;
pub mod explain;
pub mod pause;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use sqlx::PgPool;

use crate::config::Config;
use crate::http::AppState;
use crate::registry::Registry;

/// What the admin handlers reach.
#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub auth: Arc<auth::AdminAuth>,
    /// How long a resume waits before replaying (see [`pause::resume`]).
    pub resume_settle: Duration,
}

/// The `/admin` routes, or none when no admin token is configured.
pub fn routes(state: &AppState) -> Router<AppState> {
    let Some(token) = &state.config.admin.token else {
        return Router::new();
    };
    let admin = AdminState {
        pool: state.pool.clone(),
        config: state.config.clone(),
        registry: state.registry.clone(),
        auth: Arc::new(auth::AdminAuth::new(token)),
        resume_settle: pause::PAUSE_REFRESH + Duration::from_millis(500),
    };
    let api = api::routes().route_layer(axum::middleware::from_fn_with_state(
        admin.clone(),
        auth::require_bearer,
    ));
    Router::new()
        .merge(api)
        .route("/admin/api/openapi.json", axum::routing::get(api::openapi))
        .merge(console::routes(admin.clone()))
        .with_state(admin)
}
