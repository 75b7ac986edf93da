//! `sync/Deleted`: Exact's one stream of deleted records for all types, read by row version
//! (`Timestamp`) like the other sync APIs (docs/vendors.md, Exact Online "sync/Deleted").

use serde_json::Value;

use super::{malformed, parse_odata_date, sync_timestamp, ExactOnline, SyncCursor};
use crate::connectors::{ConnectorError, Deletion, DeletionPage};

/// `EntityType` codes of `sync/Deleted` and the registry types they are; picqer/exact-php-client's
/// `SyncDeleted` lists 2 = Accounts and 5 = Contacts among 25. Only the types this connector
/// reads are mapped: a deletion of any other type concerns no dataflow and is passed over.
fn registry_type(code: i64) -> Option<&'static str> {
    match code {
        2 => Some("Accounts"),
        _ => None,
    }
}

fn deletion(item: &Value) -> Result<Option<Deletion>, ConnectorError> {
    let code = match &item["EntityType"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| malformed("a sync/Deleted row has no numeric `EntityType`"))?;
    let Some(entity_type) = registry_type(code) else {
        return Ok(None);
    };
    let id = item["EntityKey"]
        .as_str()
        .ok_or_else(|| malformed("a sync/Deleted row has no `EntityKey`"))?;
    Ok(Some(Deletion {
        entity_type: entity_type.to_owned(),
        id: id.to_lowercase(),
        deleted_at: item["DeletedDate"].as_str().and_then(parse_odata_date),
    }))
}

impl ExactOnline {
    /// One page of `sync/Deleted` after the cursor's row version. On the first pass after the
    /// first connection, deletions dated before it are passed over (their links, if any, are the
    /// past's).
    pub(super) async fn deleted_page(
        &self,
        cursor: Option<&str>,
    ) -> Result<DeletionPage, ConnectorError> {
        let mut state = SyncCursor::parse(cursor)?;
        let url = match state.next.take() {
            Some(next) => next,
            None => self.url(&format!(
                "sync/Deleted?$filter=Timestamp%20gt%20{}L",
                state.from
            )),
        };
        let (results, next) = self.get_page(&url).await?;
        let mut deletions = Vec::with_capacity(results.len());
        for item in &results {
            state.highest = state.highest.max(sync_timestamp(item)?);
            let Some(found) = deletion(item)? else {
                continue;
            };
            let before_start = match (state.since_ms, found.deleted_at) {
                (Some(since), Some(at)) => at.timestamp_millis() < since,
                _ => false,
            };
            if !before_start {
                deletions.push(found);
            }
        }
        let has_more = next.is_some();
        state.next = next;
        if !has_more {
            state.from = state.highest;
            state.since_ms = None;
        }
        Ok(DeletionPage {
            deletions,
            next_cursor: Some(state.to_text()),
            has_more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_accounts_and_passes_over_other_types() {
        let account = json!({"EntityType": 2, "EntityKey": "ABC-1", "DeletedDate": "/Date(1000)/"});
        let found = deletion(&account).unwrap().unwrap();
        assert_eq!(found.entity_type, "Accounts");
        assert_eq!(found.id, "abc-1");
        assert_eq!(found.deleted_at.unwrap().timestamp_millis(), 1000);
        let contact = json!({"EntityType": 5, "EntityKey": "x"});
        assert_eq!(deletion(&contact).unwrap(), None);
        assert!(deletion(&json!({"EntityKey": "x"})).is_err());
    }
}
