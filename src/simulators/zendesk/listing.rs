//! Listing: cursor and offset pagination of the list endpoints, comments of a ticket, and the
//! search endpoints (docs/vendors.md, Zendesk).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    bad_request, ci_eq, lookups, not_found, origin, parse_id, Kind, Shared, MAX_PAGE_SIZE,
};
use crate::simulators::kit;

pub(super) fn query_get<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(super) fn page_size(query: &[(String, String)]) -> Result<Option<usize>, Box<Response>> {
    match query_get(query, "page[size]") {
        None => Ok(None),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n.min(MAX_PAGE_SIZE))),
            _ => Err(Box::new(bad_request(
                "page[size] must be a positive number",
            ))),
        },
    }
}

/// Opaque cursor: base64 of the last id on the page.
pub(super) fn encode_cursor(id: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("id:{id}"))
}

pub(super) fn decode_cursor(raw: &str) -> Option<u64> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("id:")?
        .parse()
        .ok()
}

pub(super) fn link(
    origin: &str,
    path: &str,
    query: &[(String, String)],
    extra: &[(&str, String)],
) -> String {
    let mut url = url::Url::parse(&format!("{origin}{path}")).expect("origin and path form a URL");
    {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in query {
            if extra.iter().any(|(e, _)| e == k) || k == "page[before]" {
                continue;
            }
            pairs.append_pair(k, v);
        }
        for (k, v) in extra {
            pairs.append_pair(k, v);
        }
    }
    url.to_string()
}

/// One page of `items` (sorted by id): cursor pagination when `page[size]` is given, offset
/// pagination (`page`, `per_page`) otherwise.
pub(super) fn paginate(
    plural: &str,
    items: Vec<(u64, Value)>,
    query: &[(String, String)],
    origin: &str,
    path: &str,
) -> Response {
    let size = match page_size(query) {
        Ok(size) => size,
        Err(response) => return *response,
    };
    if let Some(size) = size {
        let after = match query_get(query, "page[after]") {
            None => None,
            Some(raw) => match decode_cursor(raw) {
                Some(id) => Some(id),
                None => return bad_request("page[after] is not a valid cursor"),
            },
        };
        let rest: Vec<(u64, Value)> = items
            .into_iter()
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .collect();
        let has_more = rest.len() > size;
        let page: Vec<(u64, Value)> = rest.into_iter().take(size).collect();
        let after_cursor = page.last().map(|(id, _)| encode_cursor(*id));
        let before_cursor = page.first().map(|(id, _)| encode_cursor(*id));
        let next = match (&after_cursor, has_more) {
            (Some(cursor), true) => Some(link(
                origin,
                path,
                query,
                &[("page[after]", cursor.clone())],
            )),
            _ => None,
        };
        let records: Vec<Value> = page.into_iter().map(|(_, v)| v).collect();
        return kit::respond(
            StatusCode::OK,
            json!({
                plural: records,
                "meta": {"has_more": has_more, "after_cursor": after_cursor, "before_cursor": before_cursor},
                "links": {"next": next, "prev": null},
            }),
        );
    }
    let per_page = query_get(query, "per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    let page = query_get(query, "page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let count = items.len();
    let records: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(_, v)| v)
        .collect();
    let next = (page * per_page < count)
        .then(|| link(origin, path, query, &[("page", (page + 1).to_string())]));
    let previous =
        (page > 1).then(|| link(origin, path, query, &[("page", (page - 1).to_string())]));
    kit::respond(
        StatusCode::OK,
        json!({plural: records, "next_page": next, "previous_page": previous, "count": count}),
    )
}

pub(super) async fn list(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let external_id = query_get(&query, "external_id").map(|v| json!(v));
    let items: Vec<(u64, Value)> = {
        let state = shared.state.lock().unwrap();
        state
            .table(kind)
            .iter()
            .filter(|(id, _)| !state.is_deleted(kind, **id))
            .filter(|(_, s)| {
                kind == Kind::Organization
                    || external_id
                        .as_ref()
                        .is_none_or(|e| s.body.get("external_id").is_some_and(|v| ci_eq(v, e)))
            })
            .map(|(id, s)| (*id, Value::Object(s.body.clone())))
            .collect()
    };
    let path = format!("/api/v2/{}", kind.plural());
    paginate(kind.plural(), items, &query, &origin(&headers), &path)
}

/// Search results are not cursor-paged in Zendesk: one offset-style page.
pub(super) fn search_results(plural: &str, records: Vec<Value>) -> Response {
    kit::respond(
        StatusCode::OK,
        json!({plural: records, "count": records.len(), "next_page": null, "previous_page": null}),
    )
}

pub(super) async fn search_organizations(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (key, value) = match (query_get(&query, "external_id"), query_get(&query, "name")) {
        (Some(e), None) => ("external_id", e),
        (None, Some(n)) => ("name", n),
        _ => return bad_request("give exactly one of `external_id` and `name`"),
    };
    let wanted = json!(value);
    let state = shared.state.lock().unwrap();
    let records = state
        .organizations
        .iter()
        .filter(|(id, _)| lookups::searchable(&state, Kind::Organization, **id))
        .map(|(_, s)| s)
        .filter(|s| s.body.get(key).is_some_and(|v| ci_eq(v, &wanted)))
        .map(|s| Value::Object(s.body.clone()))
        .collect();
    search_results("organizations", records)
}

pub(super) async fn search_users(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let state = shared.state.lock().unwrap();
    let users = state
        .users
        .iter()
        .filter(|(id, _)| lookups::searchable(&state, Kind::User, **id))
        .map(|(_, s)| &s.body);
    let records: Vec<Value> = if let Some(external_id) = query_get(&query, "external_id") {
        let wanted = json!(external_id);
        users
            .filter(|u| u.get("external_id").is_some_and(|v| ci_eq(v, &wanted)))
            .map(|u| Value::Object(u.clone()))
            .collect()
    } else if let Some(q) = query_get(&query, "query") {
        let q = q.trim();
        if let Some(email) = q.strip_prefix("email:") {
            let wanted = json!(email.trim_matches('"'));
            users
                .filter(|u| u.get("email").is_some_and(|v| ci_eq(v, &wanted)))
                .map(|u| Value::Object(u.clone()))
                .collect()
        } else {
            let needle = q.to_lowercase();
            users
                .filter(|u| {
                    ["name", "email"].iter().any(|k| {
                        u.get(*k)
                            .and_then(Value::as_str)
                            .is_some_and(|v| v.to_lowercase().contains(&needle))
                    })
                })
                .map(|u| Value::Object(u.clone()))
                .collect()
        }
    } else {
        return bad_request("give `query` or `external_id`");
    };
    search_results("users", records)
}

pub(super) async fn list_comments(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let Some(ticket_id) = parse_id(&raw) else {
        return not_found();
    };
    let items: Vec<(u64, Value)> = {
        let state = shared.state.lock().unwrap();
        if !state.tickets.contains_key(&ticket_id) || state.deleted_tickets.contains(&ticket_id) {
            return not_found();
        }
        state
            .comments
            .get(&ticket_id)
            .map(|c| {
                c.iter()
                    .map(|m| (m["id"].as_u64().unwrap_or(0), Value::Object(m.clone())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let path = format!("/api/v2/tickets/{ticket_id}/comments");
    paginate("comments", items, &query, &origin(&headers), &path)
}
