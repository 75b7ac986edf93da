//! `sync/Deleted`: one stream of every deleted record of a division, read by row version
//! (`Timestamp gt …`), as Exact's sync APIs are. Fields as picqer/exact-php-client's
//! `SyncDeleted` model lists them (docs/vendors.md, Exact Online "sync/Deleted"): `Timestamp`
//! (Edm.Int64, a JSON string in OData v2), `DeletedBy`, `DeletedDate`, `Division`, `EntityKey`
//! (the deleted record's key), `EntityType` (2 = Accounts, 5 = Contacts, …) and `ID`.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{exact_error, next_link, odata_date, ExactSim, Set};
use crate::simulators::kit;

/// `EntityType` of an account in `sync/Deleted`.
pub const ENTITY_TYPE_ACCOUNTS: i64 = 2;

/// One deleted record, as `sync/Deleted` reports it.
pub(super) struct Tombstone {
    pub timestamp: i64,
    pub entity_type: i64,
    pub key: String,
    pub deleted_ms: i64,
}

/// The `EntityType` a deletion of `set` is reported with, if Exact reports it at all (the HRM
/// sets are read only and never deleted through the API).
pub(super) fn entity_type(set: Set) -> Option<i64> {
    match set {
        Set::Accounts => Some(ENTITY_TYPE_ACCOUNTS),
        Set::Departments | Set::Divisions => None,
    }
}

/// The number in `Timestamp gt 123` or `Timestamp gt 123L`.
fn timestamp_after(filter: &str) -> Option<i64> {
    let rest = filter.split("Timestamp gt").nth(1)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

pub(super) async fn sync_deleted(
    State(sim): State<ExactSim>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: axum::http::Uri,
) -> Response {
    let inner = sim.lock();
    let Some(after) = query.get("$filter").and_then(|f| timestamp_after(f)) else {
        return exact_error(
            StatusCode::BAD_REQUEST,
            "The sync API requires a filter on Timestamp",
        );
    };
    let skip: usize = query
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Sync APIs answer up to 1,000 rows a page (docs/vendors.md, Exact Online item 2).
    let page = 1000;
    let rows: Vec<&Tombstone> = inner
        .deleted
        .iter()
        .filter(|t| t.timestamp > after)
        .collect();
    let results: Vec<Value> = rows
        .iter()
        .skip(skip)
        .take(page)
        .map(|t| {
            json!({
                "Timestamp": t.timestamp.to_string(),
                "DeletedBy": "00000000-0000-0000-0000-000000000001",
                "DeletedDate": odata_date(t.deleted_ms),
                "Division": inner.config.division,
                "EntityKey": t.key,
                "EntityType": t.entity_type,
                "ID": uuid::Uuid::new_v4().to_string(),
            })
        })
        .collect();
    let mut d = json!({ "results": results });
    if rows.len() > skip + page {
        d["__next"] = json!(next_link(
            &inner.public_base,
            uri.path(),
            &query,
            skip + page
        ));
    }
    kit::respond(StatusCode::OK, json!({ "d": d }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_timestamp_filter() {
        assert_eq!(timestamp_after("Timestamp gt 42L"), Some(42));
        assert_eq!(timestamp_after("Timestamp gt 7"), Some(7));
        assert_eq!(timestamp_after("Name eq 'x'"), None);
    }
}
