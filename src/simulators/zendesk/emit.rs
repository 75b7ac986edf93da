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
        let events: Vec<(&str, Value)> = match (kind, key) {
            (_, "tags") => vec![("tags_changed", tags_change(before, after))],
            (Kind::User, "organization_id") => membership_events(before, after),
            _ => change_event_name(kind, key)
                .map(|name| vec![(name, json!({"current": after, "previous": before}))])
                .unwrap_or_default(),
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

/// The event type (after `<kind>.`) of a change of `key` whose event carries the property's
/// `current` and `previous` values; `None` where Zendesk has no event for the property.
fn change_event_name(kind: Kind, key: &str) -> Option<&'static str> {
    let name = match (kind, key) {
        (Kind::Organization, "name") => "name_changed",
        (Kind::Organization, "external_id") => "external_id_changed",
        (Kind::Organization, "organization_fields") => "custom_field_changed",
        (Kind::User, "name") => "name_changed",
        (Kind::User, "email" | "phone") => "identity_changed",
        (Kind::User, "external_id") => "external_id_changed",
        (Kind::User, "role") => "role_changed",
        (Kind::User, "details") => "details_changed",
        (Kind::User, "notes") => "notes_changed",
        (Kind::User, "default_group_id") => "default_group_changed",
        (Kind::User, "suspended") => "suspended_changed",
        (Kind::User, "time_zone") => "time_zone_changed",
        (Kind::User, "user_fields") => "custom_field_changed",
        (Kind::Ticket, "status") => "status_changed",
        (Kind::Ticket, "priority") => "priority_changed",
        (Kind::Ticket, "subject") => "subject_changed",
        (Kind::Ticket, "assignee_id") => "agent_assignment_changed",
        (Kind::Ticket, "group_id") => "group_assignment_changed",
        (Kind::Ticket, "organization_id") => "organization_changed",
        (Kind::Ticket, "requester_id") => "requester_changed",
        (Kind::Ticket, "external_id") => "external_id_changed",
        (Kind::Ticket, "type") => "type_changed",
        (Kind::Ticket, "custom_fields") => "custom_field_changed",
        _ => return None,
    };
    Some(name)
}

/// A `tags_changed` event names the tags added and removed, not the lists.
fn tags_change(before: &Value, after: &Value) -> Value {
    let list = |v: &Value| -> Vec<Value> { v.as_array().cloned().unwrap_or_default() };
    let (old, new) = (list(before), list(after));
    json!({
        "tags_added": new.iter().filter(|t| !old.contains(t)).collect::<Vec<_>>(),
        "tags_removed": old.iter().filter(|t| !new.contains(t)).collect::<Vec<_>>(),
    })
}

/// A user moved between organizations: the old membership's deletion, then the new one's
/// creation (either missing when the user had or gets none).
fn membership_events(before: &Value, after: &Value) -> Vec<(&'static str, Value)> {
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
