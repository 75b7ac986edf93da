//! Tickets and their comments at Zendesk (docs/vendors.md, Zendesk): a ticket is created with
//! its first comment and an `external_id` carrying Tether's idempotency key, so a create whose
//! answer was lost is found (by that id) before a second is made; a comment is added by updating
//! its ticket, and a ticket's comments are read as a list of their own.

use super::*;

impl ZendeskConnector {
    pub(super) fn ticket_comments_path(ticket_id: u64) -> String {
        format!("/api/v2/tickets/{ticket_id}/comments")
    }

    pub(super) async fn comments_of(
        &self,
        ticket_id: u64,
    ) -> Result<Option<Vec<Record>>, ConnectorError> {
        let Some(items) = self
            .list_all(&Self::ticket_comments_path(ticket_id), "comments", &[])
            .await?
        else {
            return Ok(None);
        };
        items
            .iter()
            .map(|c| comment_record(ticket_id, c))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub(super) async fn create_ticket(
        &self,
        fields: &Map<String, Value>,
        external_id: String,
    ) -> Result<Record, ConnectorError> {
        // Ticket external ids are not unique in Zendesk, so no create_or_update: look first.
        if let Some(existing) = self.find_ticket_by_external_id(&external_id).await? {
            return Ok(existing);
        }
        let mut body = writable(fields);
        let description = body
            .remove("description")
            .and_then(|d| d.as_str().map(str::to_owned));
        if !body.get("comment").is_some_and(Value::is_object) {
            let note = description
                .or_else(|| {
                    body.get("subject")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_TICKET_NOTE.to_owned());
            body.insert("comment".into(), json!({"body": note, "public": false}));
        }
        body.insert("external_id".into(), json!(external_id));
        let answer = self
            .send_json(
                Method::POST,
                self.url("/api/v2/tickets", &[]),
                &json!({"ticket": body}),
            )
            .await?;
        record(Entity::Tickets, envelope(&answer, "ticket")?)
    }

    pub(super) async fn find_ticket_by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<Record>, ConnectorError> {
        let items = self
            .list_all(
                "/api/v2/tickets",
                "tickets",
                &[("external_id", external_id.to_owned())],
            )
            .await?
            .unwrap_or_default();
        items
            .iter()
            .find(|t| t["external_id"].as_str() == Some(external_id))
            .map(|t| record(Entity::Tickets, t))
            .transpose()
    }

    pub(super) async fn add_comment(
        &self,
        fields: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        let ticket_id = fields.get("ticket_id").and_then(as_id).ok_or_else(|| {
            bad_input("a Ticketcomments create needs a numeric `ticket_id`".into())
        })?;
        let mut comment = writable(fields);
        comment.remove("ticket_id");
        let has_text = ["body", "html_body"].iter().any(|k| {
            comment
                .get(*k)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.trim().is_empty())
        });
        if !has_text {
            return Err(bad_input(
                "a Ticketcomments create needs a non-empty `body` or `html_body`".into(),
            ));
        }
        let answer = self
            .send_json(
                Method::PUT,
                self.url(&format!("/api/v2/tickets/{ticket_id}"), &[]),
                &json!({"ticket": {"comment": comment}}),
            )
            .await
            .map_err(|e| closed_ticket(e, Entity::Tickets, &ticket_id.to_string()))?;
        // The audit of the update holds the comment it added.
        let event = answer["audit"]["events"]
            .as_array()
            .and_then(|events| events.iter().find(|e| e["type"] == "Comment"));
        match event {
            Some(event) => {
                let mut event = event.clone();
                if event.get("created_at").is_none() {
                    event["created_at"] = answer["audit"]["created_at"].clone();
                }
                comment_record(ticket_id, &event)
            }
            None => self
                .comments_of(ticket_id)
                .await?
                .and_then(|mut all| all.pop())
                .ok_or_else(|| malformed("the ticket update returned no comment")),
        }
    }
}
