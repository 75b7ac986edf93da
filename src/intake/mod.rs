//! Webhook intake: verify the signature on the raw bytes, parse the vendor's format into a
//! [`crate::domain::ChangeEvent`], deduplicate on the delivery id and commit it with its queue job.
//!
//! Owns: `POST /webhooks/{system}` and the `events` table's inserts.
//! May call: `signing`, `queue::enqueue`, `db`. Called by: `http`.

use axum::Router;

use crate::http::AppState;

/// The webhook routes. (Built by issue 3.)
pub fn routes(_state: &AppState) -> Router<AppState> {
    Router::new()
}
