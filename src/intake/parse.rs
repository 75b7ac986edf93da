//! Pure parsers from each vendor's webhook body to a [`ChangeEvent`]. No I/O, no clock, no
//! secrets: the fuzz target calls these directly. They run only after the signature verified
//! (except [`exact_envelope`], which must locate the signed text first).
//!
//! Bodies are deserialised into borrowed structs (`&str` into the request's `Bytes`), so the only
//! allocations are the few owned strings the event itself keeps.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::domain::{Action, ChangeEvent, RecordKey, SystemId};
use crate::sync::delivery::{
    zendesk_detail_state, zendesk_event_property, Delivered, MAX_DELIVERED_VALUE,
};

/// What a verified body turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A change some dataflow needs: store it.
    Event(ChangeEvent),
    /// A well-formed delivery of a kind no dataflow needs (answered 200, not stored).
    Ignored(String),
}

/// Why a signed body is not the vendor's format (answered 400). The text names the field, never
/// a value from the body beyond short identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn format_error(what: impl Into<String>) -> FormatError {
    FormatError(what.into())
}

/// Longest id we accept; anything longer is not a vendor id and would only bloat the index.
const MAX_ID_LEN: usize = 256;

/// Checks an id the database will store: non-empty, bounded, no NUL (PostgreSQL text refuses it,
/// and one such row must not fail a whole group commit).
fn check_id(field: &str, id: &str) -> Result<(), FormatError> {
    if id.is_empty() {
        return Err(format_error(format!("`{field}` is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format_error(format!(
            "`{field}` is longer than {MAX_ID_LEN} bytes"
        )));
    }
    if id.contains('\0') {
        return Err(format_error(format!("`{field}` contains a NUL character")));
    }
    Ok(())
}

/// A JSON id that vendors send as a string or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Id<'a> {
    #[serde(borrow)]
    Str(Cow<'a, str>),
    Num(u64),
}

impl Id<'_> {
    fn into_string(self) -> String {
        match self {
            Id::Str(s) => s.into_owned(),
            Id::Num(n) => n.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Zendesk (docs/vendors.md, Zendesk webhooks)

#[derive(Deserialize)]
struct ZendeskEvent<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(default)]
    time: Option<DateTime<Utc>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    /// Kept raw: read as [`ZendeskDetail`], and for an event about one property also as the
    /// record's state it describes ([`zendesk_delivered`]).
    #[serde(borrow, default)]
    detail: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<ZendeskInner<'a>>,
}

#[derive(Deserialize)]
struct ZendeskDetail<'a> {
    #[serde(borrow, default)]
    id: Option<Id<'a>>,
    /// Kept raw: a stamp of another shape only means nothing is delivered, never a refusal.
    #[serde(borrow, default)]
    updated_at: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ZendeskInner<'a> {
    #[serde(borrow, default)]
    comment: Option<ZendeskComment<'a>>,
    /// The changed property's new value, for events about one property.
    #[serde(borrow, default)]
    current: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ZendeskComment<'a> {
    #[serde(borrow)]
    id: Id<'a>,
}

/// User events that change nothing a dataflow can map: storing them would only make the sync
/// engine fetch a user to find nothing to write (a login alone fires one per sign-in).
const ZENDESK_NOISE: &[&str] = &["user.last_login_changed", "user.password_changed"];

/// Ticket events about one comment: added, redacted, made private (docs/vendors.md, Zendesk
/// "Comments are redacted or made private"). The record is the comment, `{ticket}:{comment}`.
const COMMENT_CHANGES: &[&str] = &["comment_added", "comment_redacted", "comment_made_private"];

/// The id of the record a Zendesk event is about: `detail.id`, or the end of `subject`.
fn zendesk_resource_id(
    subject: Option<&str>,
    detail: Option<ZendeskDetail<'_>>,
) -> Result<String, FormatError> {
    let subject_id = subject.and_then(|s| s.rsplit_once(':')).map(|(_, id)| id);
    let resource_id = match (detail.and_then(|d| d.id), subject_id) {
        (Some(id), _) => id.into_string(),
        (None, Some(id)) => id.to_owned(),
        (None, None) => {
            return Err(format_error(
                "the event names no record (`detail.id` or `subject`)",
            ))
        }
    };
    check_id("detail.id", &resource_id)?;
    Ok(resource_id)
}

/// Parses a Zendesk event-subscription body (`zen:event-type:<resource>.<change>`).
pub fn zendesk(body: &[u8]) -> Result<Parsed, FormatError> {
    zendesk_with_delivered(body).map(|(parsed, _)| parsed)
}

/// What an event about one property says of its record (docs/sync-rules.md, "An echo without a
/// read" and "A Zendesk update without a read"): the property, its new value (`event.current`),
/// the record's `updated_at` and the properties of `detail` that can stand for a read
/// ([`zendesk_detail_state`]). `None` for any other event, or when a part is missing, does not
/// parse, or the value is longer than [`MAX_DELIVERED_VALUE`]: such an event is read as before.
fn zendesk_delivered(
    name: &str,
    entity: &str,
    detail: Option<(&ZendeskDetail<'_>, &RawValue)>,
    event: Option<&ZendeskInner<'_>>,
) -> Option<Delivered> {
    let property = zendesk_event_property(name)?;
    let current = event?.current?.get();
    if current.len() > MAX_DELIVERED_VALUE {
        return None;
    }
    let (detail, raw) = detail?;
    let stamp: Cow<'_, str> = serde_json::from_str(detail.updated_at?.get()).ok()?;
    let updated_at = DateTime::parse_from_rfc3339(&stamp).ok()?;
    let state = serde_json::from_str(raw.get())
        .ok()
        .and_then(|all| zendesk_detail_state(entity, &all));
    Some(Delivered {
        property: property.to_owned(),
        current: serde_json::from_str(current).ok()?,
        updated_at: updated_at.with_timezone(&Utc),
        state,
    })
}

/// [`zendesk`], and for a change event what it says of its record (see [`zendesk_delivered`]).
pub fn zendesk_with_delivered(body: &[u8]) -> Result<(Parsed, Option<Delivered>), FormatError> {
    let ev: ZendeskEvent<'_> = serde_json::from_slice(body).map_err(|e| {
        format_error(format!(
            "not a Zendesk event (expected an object with `type` and `id`): {}",
            e.classify_str()
        ))
    })?;
    let name = ev
        .kind
        .strip_prefix("zen:event-type:")
        .ok_or_else(|| format_error("`type` is not a Zendesk event type (`zen:event-type:...`)"))?;
    let (resource, change) = name
        .split_once('.')
        .filter(|(r, c)| !r.is_empty() && !c.is_empty())
        .ok_or_else(|| format_error("`type` has no `<resource>.<change>` after the prefix"))?;
    check_id("id", &ev.id)?;
    if ZENDESK_NOISE.contains(&name) {
        let ignored = format!("Zendesk {name} changes no synced field");
        return Ok((Parsed::Ignored(ignored), None));
    }
    let Some(entity) = zendesk_entity(resource, change) else {
        let ignored = format!("no dataflow uses Zendesk {resource} events");
        return Ok((Parsed::Ignored(ignored), None));
    };
    let detail: Option<ZendeskDetail<'_>> = ev
        .detail
        .map(|raw| serde_json::from_str(raw.get()))
        .transpose()
        .map_err(|e| format_error(format!("`detail` is not an object: {}", e.classify_str())))?;
    let with_raw = detail.as_ref().zip(ev.detail);
    let delivered = zendesk_delivered(name, entity, with_raw, ev.event.as_ref());
    let resource_id = zendesk_resource_id(ev.subject.as_deref(), detail)?;
    let record_id = if entity == "Ticketcomments" {
        let comment = ev
            .event
            .and_then(|e| e.comment)
            .ok_or_else(|| format_error(format!("ticket.{change} without `event.comment.id`")))?
            .id
            .into_string();
        check_id("event.comment.id", &comment)?;
        format!("{resource_id}:{comment}")
    } else {
        resource_id
    };
    let event = ChangeEvent {
        record: RecordKey {
            system: SystemId::Zendesk,
            entity_type: entity.to_owned(),
            record_id,
        },
        action: zendesk_action(change),
        occurred_at: ev.time,
        delivery_id: ev.id.into_owned(),
    };
    Ok((Parsed::Event(event), delivered))
}

/// The registry's entity type of a Zendesk event's resource (a ticket's comment events are the
/// comment's); `None` for resources no dataflow uses.
fn zendesk_entity(resource: &str, change: &str) -> Option<&'static str> {
    match resource {
        "organization" => Some("Organizations"),
        "user" => Some("Users"),
        "ticket" if COMMENT_CHANGES.contains(&change) => Some("Ticketcomments"),
        "ticket" => Some("Tickets"),
        _ => None,
    }
}

/// What a Zendesk event's change does to its record.
fn zendesk_action(change: &str) -> Action {
    match change {
        "created" => Action::Created,
        // A soft-deleted ticket answers 404 like a permanently deleted one (docs/vendors.md,
        // Zendesk "Deleted tickets"); `ticket.undeleted` is an update that finds it again.
        "deleted" | "soft_deleted" | "permanently_deleted" => Action::Deleted,
        // comment_added creates the comment record; everything else changes an existing record.
        "comment_added" => Action::Created,
        _ => Action::Updated,
    }
}

// ---------------------------------------------------------------------------------------------
// Exact Online (docs/vendors.md, Exact Online webhooks)

/// The signed part of an Exact callback: the raw `Content` text exactly as it stands in the body,
/// and the `HashCode` claimed for it.
#[derive(Debug, Clone, Copy)]
pub struct ExactEnvelope<'a> {
    pub content_raw: &'a str,
    pub hash_code: &'a str,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, rename = "Content")]
    content: &'a RawValue,
    #[serde(borrow, rename = "HashCode")]
    hash_code: &'a str,
}

/// Locates `Content` and `HashCode` without interpreting `Content`: serde_json's `RawValue`
/// borrows the value's exact source text, so the HMAC runs over the bytes Exact signed, never a
/// re-serialisation (which would change key order, spacing or escapes). `None`: no signature
/// can be found (answered 401, like any unsigned delivery).
pub fn exact_envelope(body: &[u8]) -> Option<ExactEnvelope<'_>> {
    let env: RawEnvelope<'_> = serde_json::from_slice(body).ok()?;
    Some(ExactEnvelope {
        content_raw: env.content.get(),
        hash_code: env.hash_code,
    })
}

#[derive(Deserialize)]
struct ExactContent<'a> {
    #[serde(borrow, rename = "Topic")]
    topic: Cow<'a, str>,
    #[serde(borrow, rename = "Action")]
    action: Cow<'a, str>,
    #[serde(borrow, rename = "Key")]
    key: Cow<'a, str>,
}

/// Parses the verified `Content`. The delivery id is the SHA-256 of the raw Content text: Exact
/// sends no id, and the same change re-sent carries the same Content (HashCode would change with
/// a secret rotation, so it is not used).
pub fn exact_content(content_raw: &str) -> Result<Parsed, FormatError> {
    let c: ExactContent<'_> = serde_json::from_str(content_raw).map_err(|e| {
        format_error(format!(
            "`Content` is not an Exact webhook payload (expected `Topic`, `Action`, `Key`): {}",
            e.classify_str()
        ))
    })?;
    // Exact names topics after its resources, which are the registry's entity names. No topic for
    // Departments or Divisions is known (those are polled), but one arriving is accepted.
    let entity = match c.topic.as_ref() {
        "Accounts" => "Accounts",
        "Departments" => "Departments",
        "Divisions" => "Divisions",
        other => {
            return Ok(Parsed::Ignored(format!(
                "no dataflow uses Exact Online topic {}",
                short(other)
            )))
        }
    };
    let action = match c.action.as_ref() {
        "Create" => Action::Created,
        "Update" => Action::Updated,
        "Delete" => Action::Deleted,
        other => {
            return Err(format_error(format!(
                "`Content.Action` {:?} is not Create, Update or Delete",
                short(other)
            )))
        }
    };
    check_id("Content.Key", &c.key)?;
    Ok(Parsed::Event(ChangeEvent {
        record: RecordKey {
            system: SystemId::ExactOnline,
            entity_type: entity.to_owned(),
            record_id: c.key.into_owned(),
        },
        action,
        // `EventCreatedOn` carries no time zone; a guessed zone could order events wrongly, and
        // the sync engine compares the fetched record's own timestamps anyway (rule 7).
        occurred_at: None,
        delivery_id: hex::encode(Sha256::digest(content_raw.as_bytes())),
    }))
}

// ---------------------------------------------------------------------------------------------
// Custom systems (README, "The custom-system contract")

#[derive(Deserialize)]
struct CustomBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: CustomData<'a>,
}

#[derive(Deserialize)]
struct CustomData<'a> {
    #[serde(borrow)]
    id: Id<'a>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
}

/// Parses a custom system's `{"type":"<entity>.<action>","data":{"id":...}}`; the delivery id is
/// the Standard Webhooks `webhook-id` (already verified as part of the signed message).
pub fn custom(system: SystemId, webhook_id: &str, body: &[u8]) -> Result<Parsed, FormatError> {
    let b: CustomBody<'_> = serde_json::from_slice(body).map_err(|e| {
        format_error(format!(
            "not a {} webhook (expected {{\"type\":\"customer.updated\",\"data\":{{\"id\":...}}}}): {}",
            system.display_name(),
            e.classify_str()
        ))
    })?;
    let (entity, action) = b
        .kind
        .split_once('.')
        .ok_or_else(|| format_error("`type` is not `<entity>.<action>`"))?;
    let entity = match (system, entity) {
        (_, "customer") => "Customer",
        (_, "project") => "Project",
        (SystemId::CustomErp, "contact") => "Contact",
        _ => {
            return Ok(Parsed::Ignored(format!(
                "no dataflow uses {} {} events",
                system.display_name(),
                short(entity)
            )))
        }
    };
    let action: Action = action.parse().map_err(|_| {
        format_error(format!(
            "`type` action {:?} is not created, updated or deleted",
            short(action)
        ))
    })?;
    check_id("webhook-id", webhook_id)?;
    let record_id = b.data.id.into_string();
    check_id("data.id", &record_id)?;
    Ok(Parsed::Event(ChangeEvent {
        record: RecordKey {
            system,
            entity_type: entity.to_owned(),
            record_id,
        },
        action,
        occurred_at: b.data.updated_at,
        delivery_id: webhook_id.to_owned(),
    }))
}

/// A body-supplied name cut short for a message (bounded error bodies and logs).
fn short(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// serde_json error text without the position noise, classified.
trait Classify {
    fn classify_str(&self) -> String;
}

impl Classify for serde_json::Error {
    fn classify_str(&self) -> String {
        match self.classify() {
            serde_json::error::Category::Io => "could not be read".to_owned(),
            serde_json::error::Category::Eof => "the JSON ends early".to_owned(),
            serde_json::error::Category::Syntax => "the body is not JSON".to_owned(),
            // Data errors name the missing or mistyped field, which helps the sender.
            serde_json::error::Category::Data => self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(p: Parsed) -> ChangeEvent {
        match p {
            Parsed::Event(e) => e,
            Parsed::Ignored(why) => panic!("ignored: {why}"),
        }
    }

    #[test]
    fn zendesk_organization_created() {
        let e = event(zendesk(br#"{"type":"zen:event-type:organization.created","account_id":1,"id":"a540ab78","subject":"zen:organization:42","time":"2024-01-01T00:00:00Z","detail":{"id":"42"},"event":{}}"#).unwrap());
        assert_eq!(e.record.entity_type, "Organizations");
        assert_eq!(e.record.record_id, "42");
        assert_eq!(e.action, Action::Created);
        assert_eq!(e.delivery_id, "a540ab78");
        assert!(e.occurred_at.is_some());
    }

    #[test]
    fn zendesk_comment_added_is_a_ticketcomment() {
        let e = event(zendesk(br#"{"type":"zen:event-type:ticket.comment_added","id":"d1","detail":{"id":"7"},"event":{"comment":{"id":99,"body":"hi"}}}"#).unwrap());
        assert_eq!(e.record.entity_type, "Ticketcomments");
        assert_eq!(e.record.record_id, "7:99");
        assert_eq!(e.action, Action::Created);
    }

    #[test]
    fn zendesk_redacted_and_private_comments_are_comment_updates() {
        for kind in ["comment_redacted", "comment_made_private"] {
            let body = format!(
                r#"{{"type":"zen:event-type:ticket.{kind}","id":"d-{kind}","detail":{{"id":"7"}},"event":{{"comment":{{"id":"99","is_public":false}}}}}}"#
            );
            let e = event(zendesk(body.as_bytes()).unwrap());
            assert_eq!(e.record.entity_type, "Ticketcomments", "{kind}");
            assert_eq!(e.record.record_id, "7:99", "{kind}");
            assert_eq!(e.action, Action::Updated, "{kind}");
        }
        let missing = zendesk(br#"{"type":"zen:event-type:ticket.comment_redacted","id":"d","detail":{"id":"7"},"event":{}}"#);
        assert!(missing.is_err());
    }

    #[test]
    fn zendesk_deleted_tickets_are_deletes_and_undeleted_an_update() {
        let parse = |kind: &str| {
            let body = format!(
                r#"{{"type":"zen:event-type:ticket.{kind}","id":"d-{kind}","subject":"zen:ticket:35436","detail":{{"id":"35436","status":"DELETED"}},"event":{{}}}}"#
            );
            event(zendesk(body.as_bytes()).unwrap())
        };
        for kind in ["soft_deleted", "permanently_deleted"] {
            let e = parse(kind);
            assert_eq!(e.record.entity_type, "Tickets");
            assert_eq!(e.record.record_id, "35436");
            assert_eq!(e.action, Action::Deleted, "{kind}");
        }
        assert_eq!(parse("undeleted").action, Action::Updated);
    }

    #[test]
    fn zendesk_changes_and_deletes() {
        let e = event(
            zendesk(
                br#"{"type":"zen:event-type:user.name_changed","id":"d2","subject":"zen:user:5"}"#,
            )
            .unwrap(),
        );
        assert_eq!(
            (
                e.record.entity_type.as_str(),
                e.record.record_id.as_str(),
                e.action
            ),
            ("Users", "5", Action::Updated)
        );
        let e = event(
            zendesk(br#"{"type":"zen:event-type:ticket.deleted","id":"d3","detail":{"id":8}}"#)
                .unwrap(),
        );
        assert_eq!(
            (e.record.entity_type.as_str(), e.action),
            ("Tickets", Action::Deleted)
        );
    }

    #[test]
    fn zendesk_unneeded_events_are_ignored() {
        assert!(matches!(
            zendesk(br#"{"type":"zen:event-type:user.last_login_changed","id":"x","detail":{"id":"1"}}"#).unwrap(),
            Parsed::Ignored(_)
        ));
        assert!(matches!(
            zendesk(br#"{"type":"zen:event-type:article.published","id":"x"}"#).unwrap(),
            Parsed::Ignored(_)
        ));
    }

    #[test]
    fn zendesk_bad_shapes() {
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            br#"{"id":"x"}"#,
            br#"{"type":"organization.created","id":"x","detail":{"id":"1"}}"#,
            br#"{"type":"zen:event-type:organization","id":"x","detail":{"id":"1"}}"#,
            br#"{"type":"zen:event-type:organization.created","id":"","detail":{"id":"1"}}"#,
            br#"{"type":"zen:event-type:organization.created","id":"x"}"#,
            br#"{"type":"zen:event-type:ticket.comment_added","id":"x","detail":{"id":"1"}}"#,
            br#"{"type":"zen:event-type:user.created","id":"a\u0000b","detail":{"id":"1"}}"#,
        ] {
            assert!(zendesk(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    const EXACT_CONTENT: &str = r#"{"Topic":"Accounts","ClientId":"00000000-0000-0000-0000-000000000001","Division":123456,"Action":"Update","Key":"11111111-1111-1111-1111-111111111111","ExactOnlineEndpoint":"https://start.exactonline.nl/api/v1/123456/crm/Accounts(guid'11111111-1111-1111-1111-111111111111')","EventCreatedOn":"2024-01-01T12:00:00.000"}"#;

    #[test]
    fn exact_envelope_keeps_the_raw_text() {
        let body = format!(r#"{{"Content": {EXACT_CONTENT} ,"HashCode":"ABC"}}"#);
        let env = exact_envelope(body.as_bytes()).unwrap();
        assert_eq!(env.content_raw, EXACT_CONTENT);
        assert_eq!(env.hash_code, "ABC");
        assert!(exact_envelope(b"{}").is_none());
        assert!(exact_envelope(b"nope").is_none());
    }

    #[test]
    fn exact_accounts_update() {
        let e = event(exact_content(EXACT_CONTENT).unwrap());
        assert_eq!(e.record.entity_type, "Accounts");
        assert_eq!(e.record.record_id, "11111111-1111-1111-1111-111111111111");
        assert_eq!(e.action, Action::Updated);
        assert_eq!(e.delivery_id.len(), 64);
        assert!(matches!(
            exact_content(r#"{"Topic":"SalesOrders","Action":"Update","Key":"k"}"#).unwrap(),
            Parsed::Ignored(_)
        ));
        assert!(exact_content(r#"{"Topic":"Accounts","Action":"Merge","Key":"k"}"#).is_err());
        assert!(exact_content(r#"{"Topic":"Accounts"}"#).is_err());
    }

    #[test]
    fn custom_types() {
        let e = event(
            custom(
                SystemId::CustomErp,
                "msg_1",
                br#"{"type":"contact.deleted","data":{"id":"c1"}}"#,
            )
            .unwrap(),
        );
        assert_eq!(
            (e.record.entity_type.as_str(), e.action),
            ("Contact", Action::Deleted)
        );
        assert_eq!(e.delivery_id, "msg_1");
        // Custom PMS has no contacts in any dataflow.
        assert!(matches!(
            custom(
                SystemId::CustomPms,
                "m",
                br#"{"type":"contact.updated","data":{"id":"c1"}}"#
            )
            .unwrap(),
            Parsed::Ignored(_)
        ));
        assert!(custom(
            SystemId::CustomPms,
            "m",
            br#"{"type":"customer.renamed","data":{"id":"1"}}"#
        )
        .is_err());
        assert!(custom(SystemId::CustomPms, "m", br#"{"type":"customer.updated"}"#).is_err());
        assert!(custom(
            SystemId::CustomPms,
            "m",
            br#"{"type":"customer","data":{"id":"1"}}"#
        )
        .is_err());
    }
}
