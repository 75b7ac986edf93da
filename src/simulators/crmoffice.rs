//! A stateful CRMOffice stand-in implementing exactly the connector's
//! [`assumptions`](crate::connectors::crmoffice::assumptions): collections `contacts`,
//! `activities` and `companies`, `items` lists sorted by `updatedAt` then id, an inclusive
//! `updatedSince` filter, `page`/`pageSize` paging, an `externalId` filter, `POST` to create,
//! `PUT` to replace, bearer auth. CRMOffice is polled: this simulator sends no webhooks.
//! Fault knobs, 429s and counters come from [`kit`].

pub mod oauth;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::kit::{self, json_error, respond, RunningSim, SimControl};
use crate::connectors::crmoffice::assumptions as a;

const COLLECTIONS: [&str; 3] = ["contacts", "activities", "companies"];

struct Stored {
    fields: Map<String, Value>,
    updated_at: DateTime<Utc>,
}

struct SimState {
    records: BTreeMap<&'static str, BTreeMap<String, Stored>>,
    next_id: u64,
    last_stamp: DateTime<Utc>,
}

struct Inner {
    token: String,
    state: Mutex<SimState>,
    /// `None` until [`CrmOfficeSim::enable_oauth`].
    oauth: Mutex<Option<oauth::OAuth>>,
}

/// Handle on a CRMOffice simulator.
#[derive(Clone)]
pub struct CrmOfficeSim {
    inner: Arc<Inner>,
    pub control: SimControl,
}

fn render(id: &str, stored: &Stored) -> Value {
    let mut out = stored.fields.clone();
    out.insert(a::ID_FIELD.to_owned(), Value::String(id.to_owned()));
    out.insert(
        a::UPDATED_FIELD.to_owned(),
        Value::String(
            stored
                .updated_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
    );
    Value::Object(out)
}

fn collection(name: &str) -> Option<&'static str> {
    COLLECTIONS.into_iter().find(|c| *c == name)
}

impl CrmOfficeSim {
    pub fn new(api_token: impl Into<String>) -> Self {
        CrmOfficeSim {
            inner: Arc::new(Inner {
                token: api_token.into(),
                state: Mutex::new(SimState {
                    records: COLLECTIONS
                        .into_iter()
                        .map(|c| (c, BTreeMap::new()))
                        .collect(),
                    next_id: 1,
                    last_stamp: DateTime::<Utc>::UNIX_EPOCH,
                }),
                oauth: Mutex::new(None),
            }),
            control: SimControl::new(json_error),
        }
    }

    pub async fn start(
        api_token: impl Into<String>,
        bind: SocketAddr,
    ) -> std::io::Result<(CrmOfficeSim, RunningSim)> {
        let sim = CrmOfficeSim::new(api_token);
        let running = kit::serve(sim.router(), bind).await?;
        Ok((sim, running))
    }

    pub fn router(&self) -> Router {
        let api = Router::new()
            .route("/{collection}", get(list).post(create))
            .route("/{collection}/{id}", get(fetch).put(replace))
            .layer(middleware::from_fn_with_state(self.clone(), auth))
            .route("/connect/token", axum::routing::post(oauth::token))
            .with_state(self.clone());
        kit::with_kit(api, self.control.clone())
    }

    /// Seeds a record as a CRMOffice user would make it (companies, or records to poll).
    /// `updated_at: None` stamps it now, strictly after earlier stamps. Returns its id.
    pub fn insert(
        &self,
        collection_name: &str,
        fields: Map<String, Value>,
        updated_at: Option<DateTime<Utc>>,
    ) -> String {
        let c = collection(collection_name)
            .unwrap_or_else(|| panic!("no collection {collection_name}"));
        let mut state = self.inner.state.lock().unwrap();
        let updated_at = updated_at.unwrap_or_else(|| next_stamp(&mut state));
        let id = state.next_id.to_string();
        state.next_id += 1;
        state
            .records
            .get_mut(c)
            .expect("known")
            .insert(id.clone(), Stored { fields, updated_at });
        id
    }

    /// Changes fields of a record as a CRMOffice user would (no API call, nothing counted).
    pub fn touch(
        &self,
        collection_name: &str,
        id: &str,
        changes: Map<String, Value>,
        updated_at: Option<DateTime<Utc>>,
    ) {
        let c = collection(collection_name)
            .unwrap_or_else(|| panic!("no collection {collection_name}"));
        let mut state = self.inner.state.lock().unwrap();
        let at = updated_at.unwrap_or_else(|| next_stamp(&mut state));
        let stored = state
            .records
            .get_mut(c)
            .and_then(|m| m.get_mut(id))
            .unwrap_or_else(|| panic!("no {c} {id}"));
        stored.fields.extend(changes);
        stored.updated_at = at;
    }

    pub fn get(&self, collection_name: &str, id: &str) -> Option<Value> {
        let state = self.inner.state.lock().unwrap();
        state
            .records
            .get(collection_name)?
            .get(id)
            .map(|s| render(id, s))
    }

    pub fn len(&self, collection_name: &str) -> usize {
        let state = self.inner.state.lock().unwrap();
        state.records.get(collection_name).map_or(0, BTreeMap::len)
    }
}

fn next_stamp(state: &mut SimState) -> DateTime<Utc> {
    kit::next_stamp(&mut state.last_stamp)
}

async fn auth(State(sim): State<CrmOfficeSim>, request: Request, next: Next) -> Response {
    let bearer = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let ok = kit::has_bearer(request.headers(), &sim.inner.token) || sim.access_valid(bearer);
    if !ok {
        return json_error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    next.run(request).await
}

fn unknown(name: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        &format!("unknown collection {name:?}"),
    )
}

async fn fetch(
    State(sim): State<CrmOfficeSim>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    let Some(c) = collection(&name) else {
        return unknown(&name);
    };
    let state = sim.inner.state.lock().unwrap();
    match state.records[c].get(&id) {
        Some(s) => respond(StatusCode::OK, render(&id, s)),
        None => json_error(StatusCode::NOT_FOUND, &format!("no {c} {id}")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    updated_since: Option<String>,
    page: Option<u32>,
    page_size: Option<u32>,
    external_id: Option<String>,
    sort: Option<String>,
}

async fn list(
    State(sim): State<CrmOfficeSim>,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let Some(c) = collection(&name) else {
        return unknown(&name);
    };
    if q.sort
        .as_deref()
        .is_some_and(|s| s != a::SORT_BY_UPDATED_ASC)
    {
        return json_error(StatusCode::BAD_REQUEST, "unsupported sort");
    }
    let since = match q.updated_since.as_deref().map(DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(t.with_timezone(&Utc)),
        Some(Err(_)) => {
            return json_error(StatusCode::BAD_REQUEST, "updatedSince must be RFC 3339")
        }
    };
    let page = q.page.unwrap_or(1);
    let size = q.page_size.unwrap_or(a::DEFAULT_PAGE_SIZE);
    if page == 0 || size == 0 || size > 500 {
        return json_error(
            StatusCode::BAD_REQUEST,
            "page must be >= 1 and pageSize 1 to 500",
        );
    }
    let state = sim.inner.state.lock().unwrap();
    let mut matching: Vec<(&String, &Stored)> = state.records[c]
        .iter()
        .filter(|(_, s)| since.is_none_or(|t| s.updated_at >= t))
        .filter(|(_, s)| {
            q.external_id.as_deref().is_none_or(|k| {
                s.fields.get(a::EXTERNAL_ID_FIELD).and_then(Value::as_str) == Some(k)
            })
        })
        .collect();
    // Ties in a stable order: numeric ids compare as numbers.
    matching.sort_by_key(|(id, s)| (s.updated_at, id.len(), (*id).clone()));
    let items: Vec<Value> = matching
        .into_iter()
        .skip(((page - 1) * size) as usize)
        .take(size as usize)
        .map(|(id, s)| render(id, s))
        .collect();
    respond(StatusCode::OK, json!({ a::LIST_KEY: items }))
}

fn body_object(body: &Bytes) -> Result<Map<String, Value>, Box<Response>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            map.remove(a::ID_FIELD);
            map.remove(a::UPDATED_FIELD);
            Ok(map)
        }
        Ok(_) => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ))),
        Err(e) => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid JSON: {e}"),
        ))),
    }
}

async fn create(
    State(sim): State<CrmOfficeSim>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let Some(c) = collection(&name) else {
        return unknown(&name);
    };
    let fields = match body_object(&body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let mut state = sim.inner.state.lock().unwrap();
    let updated_at = next_stamp(&mut state);
    let id = state.next_id.to_string();
    state.next_id += 1;
    let stored = Stored { fields, updated_at };
    let rendered = render(&id, &stored);
    state.records.get_mut(c).expect("known").insert(id, stored);
    respond(StatusCode::CREATED, rendered)
}

async fn replace(
    State(sim): State<CrmOfficeSim>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(c) = collection(&name) else {
        return unknown(&name);
    };
    let fields = match body_object(&body) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let mut state = sim.inner.state.lock().unwrap();
    let Some(current) = state.records[c].get(&id) else {
        return json_error(StatusCode::NOT_FOUND, &format!("no {c} {id}"));
    };
    let changed = current.fields != fields;
    let at = if changed {
        next_stamp(&mut state)
    } else {
        current.updated_at
    };
    let stored = state
        .records
        .get_mut(c)
        .and_then(|m| m.get_mut(&id))
        .expect("checked");
    stored.fields = fields;
    stored.updated_at = at;
    respond(StatusCode::OK, render(&id, stored))
}
