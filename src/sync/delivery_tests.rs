//! When a Zendesk delivery settles its event as Tether's own echo (module doc of `delivery`),
//! without a database.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};

use super::{
    record_from_delivery, settled_by_delivery, zendesk_detail_state, zendesk_event_property,
    Delivered,
};
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
        state: None,
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

/// A rename event of the organization at `t(at)` whose `detail` holds `state`.
fn described(state: Value, at: i64) -> Delivered {
    Delivered {
        state: state.as_object().cloned(),
        ..said("name", json!("Acme Norge AS"), at)
    }
}

/// [`link`], with Tether's last write on the other side (the custom system's).
fn written_other_side(snapshot: Value) -> Link {
    Link {
        last_write_side: Some(Source),
        ..link(snapshot)
    }
}

#[test]
fn a_delivery_newer_than_the_link_with_every_synced_property_stands_for_the_read() {
    let l = written_other_side(json!({"Name>name": "Acme AS"}));
    let d = described(json!({"name": "Acme Norge AS", "external_id": null}), 6);
    let r = record_from_delivery(&flow(&[]), &l, Target, &d, "42").expect("no read needed");
    assert_eq!(r.id, "42");
    assert_eq!(r.updated_at, Some(t(6)));
    assert_eq!(r.get_path("name"), Some(&json!("Acme Norge AS")));
}

#[test]
fn a_delivery_of_the_links_second_or_older_is_read() {
    // The link holds the organization's stamp t(5): another change in that same second would
    // carry the same whole-second stamp, so only a later one can stand for a read.
    let l = written_other_side(json!({"Name>name": "Acme AS"}));
    for at in [5, 4] {
        let d = described(json!({"name": "Acme Norge AS"}), at);
        assert!(
            record_from_delivery(&flow(&[]), &l, Target, &d, "42").is_none(),
            "t({at})"
        );
    }
    let mut unseen = written_other_side(json!({"Name>name": "Acme AS"}));
    unseen.target_seen_at = None;
    let d = described(json!({"name": "Acme Norge AS"}), 6);
    assert!(record_from_delivery(&flow(&[]), &unseen, Target, &d, "42").is_none());
}

#[test]
fn a_delivery_lacking_a_synced_property_or_of_the_other_system_is_read() {
    let l = written_other_side(json!({"Name>name": "Acme AS"}));
    let d = described(json!({"name": "Acme Norge AS"}), 6);
    let more = flow(&[mapping("Ref", "external_id")]);
    assert!(record_from_delivery(&more, &l, Target, &d, "42").is_none());
    assert!(record_from_delivery(&flow(&[]), &l, Source, &d, "42").is_none());
    let without = Delivered {
        state: None,
        ..d.clone()
    };
    assert!(record_from_delivery(&flow(&[]), &l, Target, &without, "42").is_none());
}

#[test]
fn a_delivery_of_the_side_tether_wrote_last_is_read() {
    // Its echo, or an edit close to it: judged by the echo rules, else read.
    let d = described(json!({"name": "Acme Norge AS"}), 6);
    let l = link(json!({"Name>name": "Acme AS"}));
    assert!(record_from_delivery(&flow(&[]), &l, Target, &d, "42").is_none());
}

#[test]
fn a_detail_keeps_the_text_properties_whose_changes_have_events() {
    let detail = json!({
        "created_at": "2026-12-04T10:00:00Z",
        "external_id": null,
        "group_id": "7",
        "id": "42",
        "name": "Acme AS",
        "shared_comments": false,
        "shared_tickets": false,
        "updated_at": "2026-12-04T10:00:05Z",
    });
    let state = zendesk_detail_state("Organizations", detail.as_object().unwrap());
    assert_eq!(
        state.map(Value::Object),
        Some(json!({"external_id": null, "name": "Acme AS"}))
    );
    let user = json!({"email": "a@b.c", "organization_id": "9", "role": "end-user", "id": "3"});
    let state = zendesk_detail_state("Users", user.as_object().unwrap());
    assert_eq!(
        state.map(Value::Object),
        Some(json!({"email": "a@b.c", "role": "end-user"}))
    );
}
