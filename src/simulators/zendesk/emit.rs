//! The event-subscription webhook of every change made through the simulated API: which
//! Zendesk event types a create or an update produces (one per changed property that has one;
//! none for `notes`, `details` or `domain_names`, as in Zendesk), and the signed delivery to the
//! registered webhooks ([`super::hooks`]; docs/vendors.md, Zendesk).

use super::*;

impl Shared {
    pub(super) fn emit_created(&self, kind: Kind, record: &Map<String, Value>) {
        self.emit(
            kind,
            record,
            &format!("{}.created", kind.singular()),
            json!({}),
        );
    }

    /// The event (if Zendesk has one) for one changed field. Fields without an event type
    /// (an organization's `notes`, say) change silently, as they do in Zendesk.
    pub(super) fn emit_change(
        &self,
        kind: Kind,
        record: &Map<String, Value>,
        key: &str,
        before: &Value,
        after: &Value,
    ) {
        let current_previous = json!({"current": after, "previous": before});
        let tags = || {
            let list = |v: &Value| -> Vec<Value> { v.as_array().cloned().unwrap_or_default() };
            let (old, new) = (list(before), list(after));
            json!({
                "tags_added": new.iter().filter(|t| !old.contains(t)).collect::<Vec<_>>(),
                "tags_removed": old.iter().filter(|t| !new.contains(t)).collect::<Vec<_>>(),
            })
        };
        let events: Vec<(&str, Value)> = match (kind, key) {
            (Kind::Organization, "name") => vec![("name_changed", current_previous)],
            (Kind::Organization, "external_id") => vec![("external_id_changed", current_previous)],
            (Kind::Organization, "tags") => vec![("tags_changed", tags())],
            (Kind::Organization, "organization_fields") => {
                vec![("custom_field_changed", current_previous)]
            }
            (Kind::User, "organization_id") => {
                let mut events = Vec::new();
                if !before.is_null() {
                    events.push((
                        "organization_membership_deleted",
                        json!({"organization": {"id": id_string(before)}}),
                    ));
                }
                if !after.is_null() {
                    events.push((
                        "organization_membership_created",
                        json!({"organization": {"id": id_string(after)}}),
                    ));
                }
                events
            }
            (Kind::User, "tags") => vec![("tags_changed", tags())],
            (Kind::User, key) => match key {
                "name" => vec![("name_changed", current_previous)],
                "email" | "phone" => vec![("identity_changed", current_previous)],
                "external_id" => vec![("external_id_changed", current_previous)],
                "role" => vec![("role_changed", current_previous)],
                "details" => vec![("details_changed", current_previous)],
                "notes" => vec![("notes_changed", current_previous)],
                "default_group_id" => vec![("default_group_changed", current_previous)],
                "suspended" => vec![("suspended_changed", current_previous)],
                "time_zone" => vec![("time_zone_changed", current_previous)],
                "user_fields" => vec![("custom_field_changed", current_previous)],
                _ => vec![],
            },
            (Kind::Ticket, "tags") => vec![("tags_changed", tags())],
            (Kind::Ticket, key) => match key {
                "status" => vec![("status_changed", current_previous)],
                "priority" => vec![("priority_changed", current_previous)],
                "subject" => vec![("subject_changed", current_previous)],
                "assignee_id" => vec![("agent_assignment_changed", current_previous)],
                "group_id" => vec![("group_assignment_changed", current_previous)],
                "organization_id" => vec![("organization_changed", current_previous)],
                "requester_id" => vec![("requester_changed", current_previous)],
                "external_id" => vec![("external_id_changed", current_previous)],
                "type" => vec![("type_changed", current_previous)],
                "custom_fields" => vec![("custom_field_changed", current_previous)],
                _ => vec![],
            },
            _ => vec![],
        };
        for (name, event) in events {
            self.emit(kind, record, &format!("{}.{name}", kind.singular()), event);
        }
    }

    /// Signs and queues one event-subscription delivery. Called with the state lock held so that
    /// webhooks leave in the order the changes were made.
    pub(super) fn emit(
        &self,
        kind: Kind,
        record: &Map<String, Value>,
        event_type: &str,
        event: Value,
    ) {
        let id = record.get("id").map(id_string).unwrap_or(Value::Null);
        let id_text = id.as_str().unwrap_or_default().to_owned();
        let at = now();
        let envelope = json!({
            "account_id": ACCOUNT_ID,
            "detail": detail(kind, record),
            "event": event,
            "id": uuid::Uuid::new_v4().to_string(),
            "subject": format!("zen:{}:{id_text}", kind.singular()),
            "time": at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "type": format!("zen:event-type:{event_type}"),
            "zendesk_event_version": EVENT_VERSION,
        });
        let body = serde_json::to_vec(&envelope).expect("JSON values serialize");
        let signed_at = timestamp(at);
        for (webhook_id, endpoint, secret) in hooks::targets(self, event_type) {
            let signature = crate::signing::zendesk::sign(&secret, &signed_at, &body);
            let mut headers = HeaderMap::new();
            let mut put = |name: &'static str, value: &str| {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            };
            put("x-zendesk-webhook-signature", &signature);
            put("x-zendesk-webhook-signature-timestamp", &signed_at);
            put("x-zendesk-webhook-id", &webhook_id);
            put(
                "x-zendesk-webhook-invocation-id",
                &uuid::Uuid::new_v4().to_string(),
            );
            put("x-zendesk-account-id", &ACCOUNT_ID.to_string());
            self.webhooks.send_to(
                endpoint,
                Outgoing {
                    body: body.clone(),
                    headers,
                    record: format!("{}/{id_text}", kind.singular()),
                },
            );
        }
    }
}
