//! Finding records again, as Zendesk allows it (docs/vendors.md, Zendesk "Search lags; look up by
//! external id with show_many" and "A user's email is writable on create only"):
//! - the search endpoints see a record written through the API only after a lag (the search
//!   index); `show_many?ids=` / `?external_ids=` read the records themselves and see it at once;
//! - an update that gives a user another `email` leaves the primary address as it was and adds
//!   the new one as a secondary identity (`GET /api/v2/users/{id}/identities`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{ci_eq, not_found, parse_id, query_get, Kind, Shared, Store};
use crate::simulators::kit;

/// Zendesk's limit on ids per `show_many` call.
const SHOW_MANY_MAX: usize = 100;

/// Puts a record written through the API out of search until the lag has passed.
pub(super) fn index_later(shared: &Shared, state: &mut Store, kind: Kind, id: u64) {
    let lag = shared.tuning.lock().unwrap().search_lag;
    state.indexed_at.insert((kind, id), Instant::now() + lag);
}

/// Whether search sees the record yet.
pub(super) fn searchable(state: &Store, kind: Kind, id: u64) -> bool {
    state
        .indexed_at
        .get(&(kind, id))
        .is_none_or(|at| Instant::now() >= *at)
}

/// On a user update, a new `email` is not written: Zendesk keeps the primary address (it is
/// writable on create only) and adds the new one as a secondary identity.
pub(super) fn email_becomes_identity(
    state: &mut Store,
    user_id: u64,
    before: &Map<String, Value>,
    input: &mut Map<String, Value>,
) {
    let Some(new) = input.remove("email") else {
        return;
    };
    let Some(new) = new.as_str().filter(|s| !s.trim().is_empty()) else {
        return;
    };
    let current = before.get("email").cloned().unwrap_or(Value::Null);
    if current.is_null() {
        // A user without any email gets it as the primary one.
        input.insert("email".into(), json!(new));
        return;
    }
    if ci_eq(&current, &json!(new)) {
        return;
    }
    let secondary = state.identities.entry(user_id).or_default();
    if !secondary.iter().any(|e| e.eq_ignore_ascii_case(new)) {
        secondary.push(new.to_owned());
    }
}

/// `GET /api/v2/users/{id}/identities`: the primary email first, then the secondary ones.
pub(super) async fn identities(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
) -> Response {
    let Some(user_id) = parse_id(&raw) else {
        return not_found();
    };
    let state = shared.state.lock().unwrap();
    let Some(user) = state.users.get(&user_id) else {
        return not_found();
    };
    let primary = user.body.get("email").and_then(Value::as_str);
    let secondary = state.identities.get(&user_id).cloned().unwrap_or_default();
    let list: Vec<Value> = primary
        .into_iter()
        .map(|e| (e.to_owned(), true))
        .chain(secondary.into_iter().map(|e| (e, false)))
        .enumerate()
        .map(|(i, (value, primary))| {
            json!({
                "id": user_id * 100 + i as u64,
                "user_id": user_id,
                "type": "email",
                "value": value,
                "primary": primary,
                "verified": primary,
            })
        })
        .collect();
    let count = list.len();
    kit::respond(
        StatusCode::OK,
        json!({"identities": list, "next_page": null, "previous_page": null, "count": count}),
    )
}

/// `GET /api/v2/{organizations|users}/show_many?ids=` or `?external_ids=`: up to 100
/// comma-separated values; the records found, in id order (unknown ones are simply absent).
pub(super) async fn show_many(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (key, raw) = match (query_get(&query, "ids"), query_get(&query, "external_ids")) {
        (Some(ids), None) => ("id", ids),
        (None, Some(external)) => ("external_id", external),
        _ => return super::bad_request("give exactly one of `ids` and `external_ids`"),
    };
    let wanted: Vec<Value> = raw
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| match key {
            "id" => v.parse::<u64>().map(|n| json!(n)).unwrap_or(json!(v)),
            _ => json!(v),
        })
        .collect();
    if wanted.len() > SHOW_MANY_MAX {
        return super::bad_request("show_many accepts up to 100 ids");
    }
    let state = shared.state.lock().unwrap();
    let records: Vec<Value> = if key == "id" {
        // Ids are the table's key: looked up, not scanned (a backfill reads its pages by id).
        let mut ids: Vec<u64> = wanted.iter().filter_map(Value::as_u64).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter(|id| !state.is_deleted(kind, *id))
            .filter_map(|id| state.table(kind).get(&id))
            .map(|s| Value::Object(s.body.clone()))
            .collect()
    } else {
        state
            .table(kind)
            .iter()
            .filter(|(id, _)| !state.is_deleted(kind, **id))
            .filter(|(_, s)| {
                s.body
                    .get(key)
                    .is_some_and(|v| wanted.iter().any(|w| ci_eq(v, w)))
            })
            .map(|(_, s)| Value::Object(s.body.clone()))
            .collect()
    };
    let count = records.len();
    kit::respond(
        StatusCode::OK,
        json!({kind.plural(): records, "next_page": null, "previous_page": null, "count": count}),
    )
}
