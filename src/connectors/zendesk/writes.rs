//! Writing to Zendesk (docs/vendors.md, Zendesk): a record's `PUT` of its writable changed
//! fields, as a ticket's safe update when the engine names the stamp it planned from
//! (docs/sync-rules.md, "Conditional writes"), and the JSON calls every write goes through, with
//! what Zendesk's refusals of a write mean (409, a closed ticket's 422).

use chrono::SecondsFormat;

use super::*;

/// Zendesk answers 409 when another request wrote the same record at the same moment (or a
/// uniqueness check raced): a later retry, which re-reads the record first, is the remedy.
fn conflict_is_transient(error: ConnectorError) -> ConnectorError {
    match error {
        ConnectorError::Rejected {
            status: 409,
            message,
            ..
        } => ConnectorError::Transient {
            system: SYSTEM,
            message: format!("409 Conflict: {message}"),
        },
        other => other,
    }
}

/// Zendesk's refusal of a change to a closed ticket (422 "Status: closed prevents ticket
/// update") as [`ConnectorError::TargetClosed`]: a decision, not an error to retry.
pub(super) fn closed_ticket(error: ConnectorError, entity: Entity, id: &str) -> ConnectorError {
    match error {
        ConnectorError::Rejected {
            status: 422,
            ref message,
            ..
        } if entity == Entity::Tickets && message.contains("closed prevents ticket update") => {
            ConnectorError::TargetClosed {
                system: SYSTEM,
                entity_type: entity.name().to_owned(),
                id: id.to_owned(),
            }
        }
        other => other,
    }
}

/// A stamp as Zendesk writes its own: whole seconds, UTC (`2019-09-12T21:45:16Z`).
fn zendesk_stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl ZendeskConnector {
    /// `PUT`s the writable part of `changed`; with `safe_since`, as a ticket's safe update on
    /// that stamp (docs/vendors.md, Zendesk "Safe updates of tickets"), where 409 means the
    /// ticket changed since and nothing was written.
    pub(super) async fn put_record(
        &self,
        entity: Entity,
        id: &str,
        changed: &Map<String, Value>,
        safe_since: Option<DateTime<Utc>>,
    ) -> Result<Record, ConnectorError> {
        if entity == Entity::Ticketcomments {
            return Err(entity.unsupported("update"));
        }
        let numeric = parse_numeric_id(entity, id)?;
        let mut body = writable(changed);
        if entity == Entity::Users && body.remove("email").is_some() {
            // Zendesk: "Writeable on create only. On update, a secondary email is added."
            tracing::info!(
                user = id,
                "a Zendesk user's primary email is set only when the user is created; the changed email is not written"
            );
        }
        if body.is_empty() {
            // Nothing writable changed: no call that could only bump `updated_at`.
            return self
                .fetch(entity.name(), id)
                .await?
                .ok_or_else(|| ConnectorError::Rejected {
                    system: SYSTEM,
                    status: 404,
                    message: "the record does not exist".to_owned(),
                });
        }
        if let Some(seen) = safe_since {
            body.insert("safe_update".into(), Value::Bool(true));
            body.insert("updated_stamp".into(), json!(zendesk_stamp(seen)));
        }
        let url = self.url(&format!("/api/v2/{}/{numeric}", entity.plural()), &[]);
        let answer = self
            .send_json_as_answered(Method::PUT, url, &json!({ entity.singular(): body }))
            .await
            .map_err(|e| match e {
                ConnectorError::Rejected { status: 409, .. } if safe_since.is_some() => {
                    ConnectorError::Changed {
                        system: SYSTEM,
                        entity_type: entity.name().to_owned(),
                        id: id.to_owned(),
                    }
                }
                other => closed_ticket(conflict_is_transient(other), entity, id),
            })?;
        record(entity, envelope(&answer, entity.singular())?)
    }

    pub(super) async fn send_json(
        &self,
        method: Method,
        url: Url,
        body: &Value,
    ) -> Result<Value, ConnectorError> {
        self.send_json_as_answered(method, url, body)
            .await
            .map_err(conflict_is_transient)
    }

    /// [`Self::send_json`] with a 409 left as the vendor's refusal, for a caller that knows what
    /// it means.
    pub(super) async fn send_json_as_answered(
        &self,
        method: Method,
        url: Url,
        body: &Value,
    ) -> Result<Value, ConnectorError> {
        match self.client.send(Call::new(method, url).json(body)).await? {
            Answer::NotFound => Err(ConnectorError::Rejected {
                system: SYSTEM,
                status: 404,
                message: "the record does not exist".to_owned(),
            }),
            Answer::Empty => Err(malformed("an empty answer")),
            Answer::Json(value) => Ok(value),
        }
    }
}
