//! When a Zendesk delivery settles its event as Tether's own echo (module doc of `delivery`),
//! without a database.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};

use super::{settled_by_delivery, zendesk_event_property, Delivered};
use crate::domain::SystemId;
use crate::registry::{Dataflow, EntityRef, FlowSwitches, PropertyMapping, SyncMode};
use crate::sync::merge::Side::{self, Source, Target};
use crate::sync::store::Link;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

fn mapping(source: &str, target: &str) -> PropertyMapping {
    PropertyMapping {
        source: source.into(),
        target: target.into(),
        data_type: "string".into(),
        reference: None,
        sync: SyncMode::Both,
        note: None,
    }
}

/// Custom ERP customers → Zendesk organizations, mapping `Name` → `name` (and `more`).
fn flow(more: &[PropertyMapping]) -> Dataflow {
    let mut properties = vec![mapping("Name", "name")];
    properties.extend_from_slice(more);
    Dataflow {
        id: "customerp.Customer->zendesk.Organizations".into(),
        source: EntityRef::new(SystemId::CustomErp, "Customer"),
        target: EntityRef::new(SystemId::Zendesk, "Organizations"),
        properties,
        merge_criteria: Vec::new(),
        switches: FlowSwitches::default(),
        guard: Default::default(),
    }
}

/// A link whose Zendesk side (the target) Tether wrote last, answered at `t(5)` with the
/// snapshot's values.
fn link(snapshot: Value) -> Link {
    Link {
        id: 7,
        source_id: "c1".into(),
        target_id: "42".into(),
        snapshot: match snapshot {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        source_seen_at: Some(t(1)),
        target_seen_at: Some(t(5)),
        last_write_side: Some(Target),
        last_write_settled: true,
        version: 3,
        unsure_write: None,
    }
}

fn said(property: &str, current: Value, at: i64) -> Delivered {
    Delivered {
        property: property.into(),
        current,
        updated_at: t(at),
    }
}

fn settled(flow: &Dataflow, link: &Link, side: Side, d: &Delivered) -> bool {
    settled_by_delivery(flow, link, side, d)
}

#[test]
fn the_value_and_stamp_of_tethers_own_write_settle_the_event() {
    let l = link(json!({"Name>name": "Acme AS"}));
    assert!(settled(
        &flow(&[]),
        &l,
        Target,
        &said("name", json!("Acme AS"), 5)
    ));
}

#[test]
fn a_persons_edit_in_the_same_second_to_another_value_is_not_settled() {
    let l = link(json!({"Name>name": "Acme AS"}));
    assert!(!settled(
        &flow(&[]),
        &l,
        Target,
        &said("name", json!("Acme ASA"), 5)
    ));
}

#[test]
fn another_stamp_is_not_settled() {
    let l = link(json!({"Name>name": "Acme AS"}));
    assert!(!settled(
        &flow(&[]),
        &l,
        Target,
        &said("name", json!("Acme AS"), 6)
    ));
}

#[test]
fn only_a_settled_write_of_the_events_side_vouches_for_it() {
    let f = flow(&[]);
    let d = said("name", json!("Acme AS"), 5);
    let mut l = link(json!({"Name>name": "Acme AS"}));
    l.last_write_settled = false;
    assert!(
        !settled(&f, &l, Target, &d),
        "the write's answer did not match"
    );
    let mut l = link(json!({"Name>name": "Acme AS"}));
    l.last_write_side = Some(Source);
    assert!(
        !settled(&f, &l, Target, &d),
        "Tether wrote the other side last"
    );
    let l = link(json!({"Name>name": "Acme AS"}));
    assert!(!settled(&f, &l, Source, &d), "not a Zendesk side");
}

#[test]
fn an_event_about_a_property_the_flow_does_not_sync_is_read() {
    let l = link(json!({"Name>name": "Acme AS"}));
    let d = said("external_id", json!("x-1"), 5);
    assert!(!settled(&flow(&[]), &l, Target, &d));
}

#[test]
fn a_flow_syncing_a_property_zendesk_changes_silently_is_always_read() {
    // An organization's `notes` changes without an event: a person's edit of it in the second of
    // Tether's write would be seen by nothing else.
    let f = flow(&[mapping("Memo", "notes")]);
    let l = link(json!({"Name>name": "Acme AS", "Memo>notes": "n"}));
    assert!(!settled(&f, &l, Target, &said("name", json!("Acme AS"), 5)));
    // One whose every change has its own event is fine.
    let f = flow(&[mapping("Ref", "external_id")]);
    let l = link(json!({"Name>name": "Acme AS", "Ref>external_id": "x-1"}));
    assert!(settled(&f, &l, Target, &said("name", json!("Acme AS"), 5)));
}

#[test]
fn only_events_about_one_property_name_it() {
    assert_eq!(
        zendesk_event_property("organization.name_changed"),
        Some("name")
    );
    assert_eq!(zendesk_event_property("organization.tags_changed"), None);
    assert_eq!(zendesk_event_property("user.identity_changed"), None);
}
