//! Zendesk's answers that tell a client to wait or to try again (docs/vendors.md, Zendesk "429
//! and 409" and "Incremental exports: 10 requests a minute"):
//! - a 429 is `text/plain` with `Retry-After`: a client that parses the body as JSON fails;
//! - the incremental exports allow 10 requests a minute (30 with the High Volume add-on) on top
//!   of the plan's limit, counted here in a fixed one-minute window;
//! - a 409 Conflict answers a write that collided with another one; worth a retry;
//! - a ticket's safe update (docs/vendors.md, Zendesk "Safe updates of tickets") whose
//!   `updated_stamp` is not the ticket's `updated_at` is refused with 409, nothing written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{bad_request, Kind, Shared, ZendeskSimHandle};
use crate::simulators::kit;

/// Zendesk's incremental-export limit without the High Volume add-on.
pub const EXPORT_LIMIT_PER_MINUTE: u32 = 10;
/// How long a record written through the API stays out of search by default ("It can take up to
/// a few minutes for new tickets, users, and other resources to be indexed for search").
pub const DEFAULT_SEARCH_LAG: Duration = Duration::from_secs(60);
const EXPORT_WINDOW: Duration = Duration::from_secs(60);

/// What a test may tune; defaults are the vendor's.
pub struct Tuning {
    pub search_lag: Duration,
    pub export_limit_per_minute: u32,
    /// Writes still to be answered with a 409.
    pub conflicts: u32,
    /// An agent's change made just before the next API update of that record arrives.
    pub racing_change: Option<(Kind, u64, Map<String, Value>)>,
    export_window_started: Instant,
    export_used: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            search_lag: DEFAULT_SEARCH_LAG,
            export_limit_per_minute: EXPORT_LIMIT_PER_MINUTE,
            conflicts: 0,
            racing_change: None,
            export_window_started: Instant::now(),
            export_used: 0,
        }
    }
}

/// Zendesk's 429 as it comes for a rate limit: plain text (the kit adds `Retry-After`).
pub fn too_many_text() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "You have exceeded the rate limit. Please wait before making further requests.",
    )
        .into_response()
}

/// Middleware of the export routes: the tenth request of a minute is the last one answered.
pub async fn export_limit(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let wait = {
        let mut tuning = shared.tuning.lock().unwrap();
        if tuning.export_window_started.elapsed() >= EXPORT_WINDOW {
            tuning.export_window_started = Instant::now();
            tuning.export_used = 0;
        }
        if tuning.export_used >= tuning.export_limit_per_minute {
            let left = EXPORT_WINDOW.saturating_sub(tuning.export_window_started.elapsed());
            Some(left.as_secs_f64().ceil().max(1.0) as u64)
        } else {
            tuning.export_used += 1;
            None
        }
    };
    match wait {
        Some(seconds) => {
            let mut response = too_many_text();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
        None => next.run(request).await,
    }
}

/// A 409 for this write, if a test asked for one.
pub fn take_conflict(shared: &Shared) -> Option<Response> {
    let mut tuning = shared.tuning.lock().unwrap();
    if tuning.conflicts == 0 {
        return None;
    }
    tuning.conflicts -= 1;
    Some(kit::respond(
        StatusCode::CONFLICT,
        json!({
            "error": "UpdateConflict",
            "description": "The record was changed by another request at the same time. Please retry.",
        }),
    ))
}

/// The refusal of a ticket's safe update whose stamp is stale, if it is one. The update is safe
/// when it names `updated_stamp` and carries `safe_update` with any value ("A value of false has
/// the same effect as true. Omit the property to force the updates to not be safe"); without
/// the stamp it is an ordinary update ("When true and an `update_stamp` date is included,
/// protects against ticket update collisions"). Other kinds have no such property: Zendesk
/// ignores both there, as it ignores every attribute a resource does not have.
pub fn stale_safe_update(
    kind: Kind,
    stored: &Map<String, Value>,
    input: &Map<String, Value>,
) -> Option<Response> {
    if kind != Kind::Ticket || !input.contains_key("safe_update") {
        return None;
    }
    let stamp = input.get("updated_stamp")?;
    let Some(stamp) = stamp.as_str().and_then(|s| s.parse::<DateTime<Utc>>().ok()) else {
        return Some(bad_request("`updated_stamp` must be an ISO 8601 date-time"));
    };
    let current = stored
        .get("updated_at")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<DateTime<Utc>>().ok());
    (current != Some(stamp)).then(|| {
        kit::respond(
            StatusCode::CONFLICT,
            json!({
                "error": "UpdateConflict",
                "description": "The ticket was updated after the given updated_stamp.",
            }),
        )
    })
}

impl ZendeskSimHandle {
    /// How long a record written through the API stays out of search (default a minute).
    pub fn set_search_lag(&self, lag: Duration) {
        self.shared.tuning.lock().unwrap().search_lag = lag;
    }

    /// The incremental exports' limit per minute (default 10; 30 with High Volume). Tests whose
    /// connector runs at a higher export rate raise it to match.
    pub fn set_export_limit_per_minute(&self, limit: u32) {
        self.shared.tuning.lock().unwrap().export_limit_per_minute = limit;
    }

    /// The next `count` updates answer 409 Conflict, as when another request wrote the same
    /// record at the same moment.
    pub fn conflict_next_writes(&self, count: u32) {
        self.shared.tuning.lock().unwrap().conflicts = count;
    }

    /// When the next API update of this record arrives, an agent changes it first (stamped and
    /// announced as [`ZendeskSimHandle::update`] does): a change made between a client's read and
    /// its write.
    pub fn change_before_next_write(&self, kind: Kind, id: u64, fields: Value) {
        let fields = fields.as_object().cloned().unwrap_or_default();
        self.shared.tuning.lock().unwrap().racing_change = Some((kind, id, fields));
    }
}

/// The change [`ZendeskSimHandle::change_before_next_write`] armed for this record, if any.
pub fn take_racing_change(shared: &Shared, kind: Kind, id: u64) -> Option<Map<String, Value>> {
    let mut tuning = shared.tuning.lock().unwrap();
    match tuning.racing_change.take() {
        Some((k, i, fields)) if (k, i) == (kind, id) => Some(fields),
        other => {
            tuning.racing_change = other;
            None
        }
    }
}
