//! Operations: what an operator watches and steers Tether by.
//!
//! Owns: the Prometheus metrics (names, hooks, scrape) and the PostgreSQL-derived gauges. The admin
//! API and console live in `admin`. May call: `db` tables read-only (`jobs`, `poll_cursors`,
//! `flow_pauses`). Called by: every layer that records a metric (intake, queue, sync, connectors,
//! polling), `http` (the `/metrics` route) and `admin`.

pub mod gauges;
pub mod metrics;

use axum::routing::get;
use axum::Router;

use crate::http::AppState;

/// `GET /metrics`, on whatever router serves it (the main one, or the `metrics.listen` one).
pub fn metrics_routes<S>(pool: sqlx::PgPool) -> Router<S> {
    Router::new()
        .route("/metrics", get(metrics::scrape))
        .with_state(pool)
}

/// The operations routes of the main listener: `/metrics` unless `metrics.listen` moves it.
pub fn routes(state: &AppState) -> Router<AppState> {
    if state.config.metrics.listen.is_some() {
        Router::new()
    } else {
        metrics_routes(state.pool.clone())
    }
}

/// Serves `/metrics` alone on `metrics.listen` until shutdown.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    pool: sqlx::PgPool,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_routes::<()>(pool))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
