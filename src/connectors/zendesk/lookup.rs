//! Finding organizations and users by `external_id` without the search index (docs/vendors.md,
//! Zendesk "Search lags; look up by external id with show_many"): Zendesk indexes a write for
//! search only minutes later, so a retried create that searched for the record its first attempt
//! made would not find it and make a second one. `show_many?external_ids=` reads the records
//! themselves (up to 100 ids a call; unknown ids are simply absent).

use serde_json::json;

use super::{array, malformed, parse_numeric_id, record, values_match, Entity, ZendeskConnector};
use crate::connectors::{ConnectorError, Record};

/// Zendesk's limit on ids per `show_many` call.
const SHOW_MANY_MAX: usize = 100;

impl ZendeskConnector {
    /// The organizations or users whose `external_id` is one of `external_ids`.
    pub(super) async fn show_many_by_external_id(
        &self,
        entity: Entity,
        external_ids: &[String],
    ) -> Result<Vec<Record>, ConnectorError> {
        let mut found = Vec::new();
        for chunk in external_ids.chunks(SHOW_MANY_MAX) {
            for record in self.show_many(entity, "external_ids", chunk).await? {
                // Only exact (case-insensitive) matches: never trust a lookup's filtering alone.
                let matches = chunk.iter().any(|wanted| {
                    values_match(
                        "external_id",
                        record.fields.get("external_id"),
                        &json!(wanted),
                    )
                });
                if matches {
                    found.push(record);
                }
            }
        }
        Ok(found)
    }

    /// The organizations or users with these ids as they are now (`show_many?ids=`, up to 100
    /// a call; unknown ids are simply absent), for `fetch_many`.
    pub(super) async fn show_many_by_id(
        &self,
        entity: Entity,
        ids: &[String],
    ) -> Result<Vec<Record>, ConnectorError> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(SHOW_MANY_MAX) {
            let numeric = chunk
                .iter()
                .map(|id| parse_numeric_id(entity, id).map(|n| n.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            for record in self.show_many(entity, "ids", &numeric).await? {
                // Only the ids asked for: never trust a lookup's filtering alone.
                if numeric.contains(&record.id) {
                    found.push(record);
                }
            }
        }
        Ok(found)
    }

    /// One `show_many` call: the records Zendesk answers for these values of `key` (`ids` or
    /// `external_ids`; at most [`SHOW_MANY_MAX`]), to be checked by the caller.
    async fn show_many(
        &self,
        entity: Entity,
        key: &str,
        values: &[String],
    ) -> Result<Vec<Record>, ConnectorError> {
        let path = format!("/api/v2/{}/show_many", entity.plural());
        let url = self.url(&path, &[(key, values.join(","))]);
        let page = self
            .get_json(url)
            .await?
            .ok_or_else(|| malformed(format!("{path} answered 404")))?;
        array(&page, entity.plural())?
            .iter()
            .map(|item| record(entity, item))
            .collect()
    }

    /// The one organization or user with this `external_id`, if there is one.
    pub(super) async fn by_external_id(
        &self,
        entity: Entity,
        external_id: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        Ok(self
            .show_many_by_external_id(entity, &[external_id.to_owned()])
            .await?
            .into_iter()
            .next())
    }
}
