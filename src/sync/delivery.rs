//! A Zendesk echo recognised without a read (docs/sync-rules.md, "An echo without a read"):
//! Zendesk's event webhooks name the one property that changed, with its new value
//! (`event.current`), and carry the record's `updated_at` in `detail` (docs/vendors.md, Zendesk
//! "Event webhooks say what changed"). Intake keeps those three facts with the event
//! ([`Delivered`], `events.delivered`); here they settle the event as the echo of Tether's own
//! write when reading the record could conclude nothing else.
//!
//! Why a stamp alone is not enough: Zendesk's `updated_at` has whole seconds, so a person's edit
//! in the same second as Tether's write carries the same stamp. The event is the echo only if
//! - Tether wrote this side last, its write's answer showed every synced property as the link's
//!   snapshot has it (`links.last_write_settled`), and the event's `detail.updated_at` is that
//!   answer's stamp: the event describes the record in the second of Tether's write;
//! - the event's property is a synced property of the flow, and its `current` value is the
//!   snapshot's (what Tether wrote, or left as it was): a person's change of it to another value
//!   in that second is not the echo, and is read and synced;
//! - every synced property of the flow on the Zendesk side is one whose every change Zendesk
//!   reports by an event of its own: so a person's change in that same second of any other synced
//!   property arrives as its own event, which is not settled here (its `current` is not the
//!   snapshot's). A flow that syncs a property Zendesk changes silently (an organization's
//!   `notes`) is always read, as before.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::decision::Decision;
use super::mapping::{entity, key, path, synced};
use super::merge::{normalize, Side};
use super::store::{Entry, Link};
use super::{ActiveFlow, SyncEngine};
use crate::connectors::Record;
use crate::domain::{Action, SystemId};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

/// The longest `current` value (as JSON text) intake keeps with an event; a longer one is not
/// kept, so the events table stays small, and such an event is read as before.
pub const MAX_DELIVERED_VALUE: usize = 512;

/// The longest record state (as JSON text) intake keeps from an event's `detail`.
pub const MAX_DELIVERED_STATE: usize = 1024;

/// What a Zendesk event delivery says about its record: one property's new value and the
/// record's change stamp (stored as `events.delivered`), and the properties of its `detail` that
/// can stand for reading them ([`zendesk_detail_state`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivered {
    pub property: String,
    pub current: Value,
    pub updated_at: DateTime<Utc>,
    /// Absent on events stored before it was kept, and when nothing qualifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Map<String, Value>>,
}

/// Zendesk event types (`<resource>.<change>`) whose `event.current` is the new value of exactly
/// one property of the record, and that property (Zendesk's "Organization events" and "User
/// events" webhook references; the simulator emits the same, `simulators/zendesk/emit.rs`).
const ONE_PROPERTY_EVENTS: &[(&str, &str)] = &[
    ("organization.name_changed", "name"),
    ("organization.external_id_changed", "external_id"),
    ("user.name_changed", "name"),
    ("user.external_id_changed", "external_id"),
    ("user.role_changed", "role"),
    ("user.notes_changed", "notes"),
    ("user.details_changed", "details"),
];

/// The property whose new value a Zendesk event of type `name` carries in `event.current`.
pub fn zendesk_event_property(name: &str) -> Option<&'static str> {
    ONE_PROPERTY_EVENTS
        .iter()
        .find(|(event, _)| *event == name)
        .map(|(_, property)| *property)
}

/// Whether Zendesk reports every change of `path` on a record of `entity_type` by an event of its
/// own (same sources as [`ONE_PROPERTY_EVENTS`]; custom fields by `custom_field_changed`).
fn zendesk_reports(entity_type: &str, path: &str) -> bool {
    let top = path.split('.').next().unwrap_or(path);
    let reported: &[&str] = match entity_type {
        "Organizations" => &["name", "external_id", "tags", "organization_fields"],
        "Users" => &[
            "name",
            "email",
            "phone",
            "external_id",
            "role",
            "details",
            "notes",
            "tags",
            "organization_id",
            "default_group_id",
            "user_fields",
        ],
        _ => &[],
    };
    reported.contains(&top)
}

/// The properties of a Zendesk event's `detail` (for a record of `entity_type`) that are what a
/// read of the record would show: those whose every change Zendesk announces by an event of its
/// own ([`zendesk_reports`]: an organization's `name` and `external_id`; a user's `email`,
/// `external_id` and `role`), with a text or null value. Ids are left out (`detail` renders them
/// as strings, the API as numbers), as are the stamps. `None` if none qualifies or they are
/// longer than [`MAX_DELIVERED_STATE`].
pub fn zendesk_detail_state(
    entity_type: &str,
    detail: &Map<String, Value>,
) -> Option<Map<String, Value>> {
    let state: Map<String, Value> = detail
        .iter()
        .filter(|(k, v)| {
            let id = k.as_str() == "id" || (k.ends_with("_id") && k.as_str() != "external_id");
            !id && zendesk_reports(entity_type, k) && (v.is_string() || v.is_null())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let size = serde_json::to_string(&state).map_or(usize::MAX, |t| t.len());
    (!state.is_empty() && size <= MAX_DELIVERED_STATE).then_some(state)
}

/// The Zendesk record on `side` of `flow`, linked by `link`, as the event's delivery `d`
/// describes it, when that can stand for reading it (docs/sync-rules.md, "A Zendesk update
/// without a read"): the delivery holds every property the flow syncs (none a reference), and
/// its `updated_at` is strictly later than the Zendesk stamp the link holds (Zendesk stamps whole
/// seconds: an equal stamp may hide a second change in that second), and Tether did not write
/// that side last. Else `None`: read it.
pub(crate) fn record_from_delivery(
    flow: &Dataflow,
    link: &Link,
    side: Side,
    d: &Delivered,
    id: &str,
) -> Option<Record> {
    let state = d.state.as_ref()?;
    let seen = link.seen_on(side)?;
    let newer = d.updated_at.timestamp_micros() > seen.timestamp_micros();
    // Kept to the read: an event of a side Tether wrote last (its echo, or an edit close to it:
    // "An echo without a read" judges those) and one with a write whose answer was lost.
    let own_write = link.last_write_side == Some(side) || link.unsure_write.is_some();
    if entity(flow, side).system != SystemId::Zendesk || !newer || own_write {
        return None;
    }
    let mut properties = synced(flow).peekable();
    properties.peek()?;
    let held = properties.all(|p| p.reference.is_none() && state.contains_key(path(p, side)));
    held.then(|| Record {
        id: id.to_owned(),
        updated_at: Some(d.updated_at),
        fields: state.clone(),
    })
}

/// Whether `delivered`, for the record on `side` of `flow` linked by `link`, is the echo of
/// Tether's last write of that side (see the module doc). Pure: no I/O, no clock.
pub(crate) fn settled_by_delivery(
    flow: &Dataflow,
    link: &Link,
    side: Side,
    delivered: &Delivered,
) -> bool {
    let e = entity(flow, side);
    let own_write = link.last_write_side == Some(side) && link.last_write_settled;
    // PostgreSQL keeps microseconds: the stamp as stored, not finer than that.
    let same_stamp = link.seen_on(side).map(|s| s.timestamp_micros())
        == Some(delivered.updated_at.timestamp_micros());
    if e.system != SystemId::Zendesk || !own_write || !same_stamp {
        return false;
    }
    let mut properties = synced(flow).peekable();
    if properties.peek().is_none() {
        return false;
    }
    let mut named = false;
    for p in properties {
        let at = path(p, side);
        if !zendesk_reports(&e.entity_type, at) {
            return false;
        }
        if at == delivered.property {
            let current = normalize(Some(&delivered.current));
            if p.reference.is_some() || link.snapshot.get(&key(p)) != Some(&current) {
                return false;
            }
            named = true;
        }
    }
    named
}

/// The outcome of looking at an event's delivered state.
pub(super) enum ByDelivery {
    /// Settled as the echo (logged); nothing else to do for the flow.
    Echo,
    /// Not the echo; the flow's link as looked up for it, so it is not looked up again, and the
    /// record as the delivery describes it if that can stand for reading it.
    Looked(Option<Link>, Option<Box<Record>>),
    /// The event carries nothing to look at, or more than one flow runs.
    NotTried,
}

impl SyncEngine {
    /// Settles a Zendesk update event of one running flow as the echo of Tether's own write from
    /// what its delivery says, without reading the record (see the module doc).
    pub(super) async fn echo_by_delivery(
        &self,
        job: &ClaimedJob,
        active: &[ActiveFlow<'_>],
    ) -> Result<ByDelivery, sqlx::Error> {
        let e = &job.event;
        let synthetic = e.delivery_id.starts_with("tether:");
        let [(flow, side, _)] = active else {
            return Ok(ByDelivery::NotTried);
        };
        if e.record.system != SystemId::Zendesk || synthetic || e.action != Action::Updated {
            return Ok(ByDelivery::NotTried);
        }
        let id = &e.record.record_id;
        let (link, delivered) = self
            .batches
            .find_link_for_event(&self.pool, flow, *side, id, job.event_id)
            .await?;
        let (link_id, d) = match (&link, delivered) {
            (Some(l), Some(d)) if settled_by_delivery(flow, l, *side, &d) => (l.id, d),
            (Some(l), Some(d)) => {
                let described = record_from_delivery(flow, l, *side, &d, id).map(Box::new);
                return Ok(ByDelivery::Looked(link, described));
            }
            _ => return Ok(ByDelivery::Looked(link, None)),
        };
        let detail = format!(
            "the delivery's {} is the value Tether's own write of the {} record left, and its \
             detail.updated_at ({}) that write's stamp: nothing was read",
            d.property,
            side.as_str(),
            d.updated_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let entry = Entry {
            flow: Some(&flow.id),
            link: Some(link_id),
            detail: Some(detail),
            ..Entry::new(Decision::Echo)
        };
        self.log(job, entry).await?;
        Ok(ByDelivery::Echo)
    }
}

#[cfg(test)]
#[path = "delivery_tests.rs"]
mod tests;
