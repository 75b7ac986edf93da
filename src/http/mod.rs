//! The HTTP side: the axum router, health endpoints, request ids and request tracing.
//!
//! Owns: routing and cross-cutting layers. Webhook handling itself lives in `intake`.
//! Built from a pre-bound listener so tests can bind `127.0.0.1:0` and know the port before it
//! serves. docs/architecture.md shows where `http` sits on the data path.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderName, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    /// The mapping registry `serve` validated at start: the intake settles echoes by it and the
    /// admin interface lists its flows.
    pub registry: Arc<crate::registry::Registry>,
    /// The sync engine's writes of this process not yet stored: the intake holds a custom
    /// system's possible echo of one until it is (`crate::sync::storing`).
    pub storing: crate::sync::StoringWrites,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The full router with its layers.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(crate::intake::routes(
            &state.config,
            state.pool.clone(),
            &state.registry,
            &state.storing,
        ))
        .merge(crate::ops::routes(&state))
        .merge(crate::admin::routes(&state))
        .with_state(state)
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                        let request_id = request
                            .headers()
                            .get(REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        tracing::info_span!(
                            "request",
                            request_id,
                            method = %request.method(),
                            path = %request.uri().path(),
                        )
                    }),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
}

/// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Alive: the process answers.
async fn healthz() -> &'static str {
    "ok"
}

/// Ready: database reachable, migrations applied, not shutting down. Never depends on a vendor
/// (a vendor outage must not take every replica out of the load balancer).
async fn readyz(State(state): State<AppState>) -> Response {
    let shutting_down = state.shutdown.is_cancelled();
    let (database, migrations) = if shutting_down {
        ("skipped".to_owned(), "skipped".to_owned())
    } else {
        check_database(&state.pool).await
    };
    let systems: serde_json::Map<String, serde_json::Value> = crate::domain::SystemId::ALL
        .iter()
        .map(|s| {
            let connected = state.config.systems.is_connected(*s);
            (
                s.as_str().to_owned(),
                json!(if connected {
                    "configured"
                } else {
                    "not connected: no configuration section, its dataflows are idle"
                }),
            )
        })
        .collect();
    let ready = !shutting_down && database == "ok" && migrations == "ok";
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "database": database,
            "migrations": migrations,
            "shutdown": if shutting_down { "shutting down" } else { "ok" },
        },
        "systems": systems,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn check_database(pool: &PgPool) -> (String, String) {
    let probe = async {
        sqlx::query("SELECT 1").execute(pool).await?;
        crate::db::migrations_applied(pool).await
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Err(_) => (
            "unreachable: no answer within 2s".to_owned(),
            "unknown".to_owned(),
        ),
        Ok(Err(e)) => (
            format!("unreachable: {}", short_db_error(&e)),
            "unknown".to_owned(),
        ),
        Ok(Ok(true)) => ("ok".to_owned(), "ok".to_owned()),
        Ok(Ok(false)) => ("ok".to_owned(), "pending: run `tether migrate`".to_owned()),
    }
}

/// A database error without connection details (the URL holds a password).
fn short_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::PoolTimedOut => "no connection available".to_owned(),
        sqlx::Error::Io(io) => format!("connection failed ({})", io.kind()),
        sqlx::Error::Database(db) => format!("database error {}", db.code().unwrap_or_default()),
        _ => "connection failed".to_owned(),
    }
}
