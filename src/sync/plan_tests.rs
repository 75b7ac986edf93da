//! The planner against every rule of the merge table (`docs/sync-rules.md`), without a database:
//! each row gives the snapshot, both sides' values and times, and what must be planned.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};

use super::decision::Decision;
use super::merge::Side::{self, Source, Target};
use super::plan::{idx, plan, settled_by_one_read, Lookup, Plan, PlanInput, Planned};
use super::plan::{Translation, Translations};
use super::store::Link;
use crate::connectors::Record;
use crate::domain::{RecordKey, SystemId};
use crate::registry::{
    Dataflow, EntityRef, FlowSwitches, PropertyMapping, PropertyRule, Reference, Registry,
    Resolution, SyncMode,
};

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

pub(super) fn name_mapping() -> PropertyMapping {
    PropertyMapping {
        source: "Name".into(),
        target: "name".into(),
        data_type: "string".into(),
        reference: None,
        sync: SyncMode::Both,
        note: None,
    }
}

pub(super) fn party_mapping() -> PropertyMapping {
    PropertyMapping {
        source: "partyId".into(),
        target: "organization_id".into(),
        reference: Some(Reference {
            source_types: vec!["Customers".into()],
            target_type: "Organizations".into(),
        }),
        ..name_mapping()
    }
}

pub(super) fn flow(properties: Vec<PropertyMapping>) -> Dataflow {
    Dataflow {
        id: "poweroffice.Contactperson->zendesk.Users".into(),
        source: EntityRef::new(SystemId::PowerOffice, "Contactperson"),
        target: EntityRef::new(SystemId::Zendesk, "Users"),
        properties,
        merge_criteria: Vec::new(),
        switches: FlowSwitches::default(),
        guard: Default::default(),
    }
}

fn record(id: &str, at: i64, fields: Value) -> Record {
    Record {
        id: id.into(),
        updated_at: Some(t(at)),
        fields: match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        },
    }
}

fn link(snapshot: Value, last_write: Option<Side>) -> Link {
    Link {
        id: 7,
        source_id: "s1".into(),
        target_id: "t1".into(),
        snapshot: match snapshot {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        source_seen_at: Some(t(0)),
        target_seen_at: Some(t(0)),
        last_write_side: last_write,
        last_write_settled: false,
        version: 3,
        unsure_write: None,
    }
}

/// Plans with `translations`, expecting no further lookups.
fn ready(
    registry: &Registry,
    flow: &Dataflow,
    link: &Link,
    (src, tgt): (&Record, &Record),
    event_side: Side,
    translations: &Translations,
) -> Plan {
    let input = PlanInput {
        registry,
        flow,
        link,
        source: src,
        target: tgt,
        event_side,
        translations,
    };
    match plan(&input) {
        Planned::Ready(plan) => plan,
        Planned::NeedTranslations(l) => panic!("unexpected lookups {l:?}"),
    }
}

/// What a row of the merge table expects.
#[derive(Debug)]
enum Want {
    /// The value is written to that side (`updated`) and becomes the snapshot.
    Write(Side, &'static str),
    /// Nothing is written: this decision, and the snapshot's value afterwards.
    Nothing(Decision, &'static str),
    /// Nothing is written and a note says why (an empty value over a non-empty one).
    Kept(&'static str),
}

/// One row of the merge table for a plain value (`Name` → `name`); "" is an empty value.
struct Row {
    rule: &'static str,
    /// The snapshot's value; `None` when the property is not in the snapshot yet.
    base: Option<&'static str>,
    /// The value and its change time (seconds) on each side.
    source: (&'static str, i64),
    target: (&'static str, i64),
    /// The side the event came from, and the side Tether wrote last.
    event: Side,
    last_write: Option<Side>,
    want: Want,
}

use Want::{Kept, Nothing, Write};

#[rustfmt::skip]
const MERGE_TABLE: &[Row] = &[
    Row { rule: "neither side changed", base: Some("a"), source: ("a", 1), target: ("a", 1), event: Source, last_write: None, want: Nothing(Decision::Unchanged, "a") },
    Row { rule: "unchanged on the side Tether wrote last: its echo", base: Some("a"), source: ("a", 1), target: ("a", 1), event: Source, last_write: Some(Source), want: Nothing(Decision::Echo, "a") },
    Row { rule: "changed on the source only: written to the target", base: Some("a"), source: ("b", 1), target: ("a", 2), event: Source, last_write: None, want: Write(Target, "b") },
    Row { rule: "changed on the target only: written back", base: Some("a"), source: ("a", 2), target: ("b", 1), event: Target, last_write: None, want: Write(Source, "b") },
    Row { rule: "changed on both, the source later: the source wins", base: Some("a"), source: ("s", 5), target: ("t", 4), event: Target, last_write: None, want: Write(Target, "s") },
    Row { rule: "changed on both, the target later: the target wins", base: Some("a"), source: ("s", 4), target: ("t", 5), event: Source, last_write: None, want: Write(Source, "t") },
    Row { rule: "changed on both at the same time: the event's side wins", base: Some("a"), source: ("s", 4), target: ("t", 4), event: Target, last_write: None, want: Write(Source, "t") },
    Row { rule: "changed on both at the same time, other event side", base: Some("a"), source: ("s", 4), target: ("t", 4), event: Source, last_write: None, want: Write(Target, "s") },
    Row { rule: "both changed to the same value: converged", base: Some("a"), source: ("b", 1), target: ("b", 2), event: Source, last_write: None, want: Nothing(Decision::Converged, "b") },
    Row { rule: "cleared on one side: an empty value never overwrites", base: Some("a"), source: ("", 3), target: ("a", 1), event: Source, last_write: Some(Source), want: Kept("a") },
    Row { rule: "changed on both, the later one cleared: the value wins", base: Some("a"), source: ("", 9), target: ("c", 2), event: Source, last_write: None, want: Write(Source, "c") },
    Row { rule: "cleared on both sides: converged on empty", base: Some("a"), source: ("", 3), target: ("", 3), event: Source, last_write: None, want: Nothing(Decision::Converged, "") },
    Row { rule: "a value set where both were empty fills the other side", base: Some(""), source: ("x", 2), target: ("", 1), event: Source, last_write: None, want: Write(Target, "x") },
    Row { rule: "no base yet: both count as changed, the later wins", base: None, source: ("s", 1), target: ("t", 2), event: Source, last_write: None, want: Write(Source, "t") },
    Row { rule: "no base yet, one side empty: the value wins whatever the times", base: None, source: ("s", 1), target: ("", 2), event: Target, last_write: None, want: Write(Target, "s") },
];

fn value(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        json!(s)
    }
}

fn check(row: &Row) {
    let (flow, registry) = (flow(vec![name_mapping()]), Registry::default());
    let snapshot = match row.base {
        Some(v) => json!({ "Name>name": value(v) }),
        None => json!({}),
    };
    let link = link(snapshot, row.last_write);
    let src = record("s1", row.source.1, json!({ "Name": value(row.source.0) }));
    let tgt = record("t1", row.target.1, json!({ "name": value(row.target.0) }));
    let p = ready(
        &registry,
        &flow,
        &link,
        (&src, &tgt),
        row.event,
        &Translations::new(),
    );
    let r = row.rule;
    let (decision, snapshot, noted) = match row.want {
        Write(side, v) => {
            let field = if side == Source { "Name" } else { "name" };
            assert_eq!(p.changes[idx(side)].get(field), Some(&value(v)), "{r}");
            assert!(
                p.changes[idx(side.other())].is_empty(),
                "{r}: one side only"
            );
            (Decision::Updated, v, false)
        }
        Nothing(decision, snapshot) => (decision, snapshot, false),
        Kept(snapshot) => (Decision::Unchanged, snapshot, true),
    };
    if !matches!(row.want, Write(..)) {
        assert!(p.changes.iter().all(Map::is_empty), "{r}: no write");
    }
    assert_eq!(p.decision(), decision, "{r}: decision");
    let after = p.snapshot_after([true, true]);
    assert_eq!(
        after.get("Name>name"),
        Some(&value(snapshot)),
        "{r}: snapshot"
    );
    assert_eq!(!p.notes.is_empty(), noted, "{r}: notes {:?}", p.notes);
    assert!(p.pending.is_empty(), "{r}: nothing pending");
}

#[test]
fn plain_values_follow_the_merge_table() {
    for row in MERGE_TABLE {
        check(row);
    }
}

/// A target-side change the registry does not let the flow write back, for each reason.
#[test]
fn refused_writes_are_noted_and_not_planned() {
    let base = json!({ "Name>name": "a" });
    let src = record("s1", 1, json!({ "Name": "a" }));
    let tgt = record("t1", 2, json!({ "name": "b" }));
    let no_write_back = Dataflow {
        switches: FlowSwitches {
            write_back_to_source: false,
            ..FlowSwitches::default()
        },
        ..flow(vec![name_mapping()])
    };
    let one_way = flow(vec![PropertyMapping {
        sync: SyncMode::ToTarget,
        ..name_mapping()
    }]);
    let cases = [
        (
            no_write_back,
            Registry::default(),
            "writing back to the source is off",
        ),
        (one_way, Registry::default(), "only towards the target"),
    ];
    for (flow, registry, why) in cases {
        let link = link(base.clone(), Some(Target));
        let p = ready(
            &registry,
            &flow,
            &link,
            (&src, &tgt),
            Target,
            &Translations::new(),
        );
        assert!(p.changes.iter().all(Map::is_empty), "{why}");
        assert_eq!(
            p.decision(),
            Decision::Unchanged,
            "{why}: refused is never an echo"
        );
        assert!(p.notes[0].contains(why), "{why}: {:?}", p.notes);
    }
}

#[test]
fn an_owner_rule_keeps_other_flows_from_writing_a_linked_record() {
    let flow = flow(vec![name_mapping()]);
    let registry = Registry {
        rules: vec![PropertyRule {
            entity: flow.target.clone(),
            property: "name".into(),
            resolve: Resolution::Owner("another.flow".into()),
        }],
        ..Registry::default()
    };
    let link = link(json!({ "Name>name": "a" }), None);
    let src = record("s1", 2, json!({ "Name": "b" }));
    let tgt = record("t1", 1, json!({ "name": "a" }));
    let p = ready(
        &registry,
        &flow,
        &link,
        (&src, &tgt),
        Source,
        &Translations::new(),
    );
    assert!(p.changes[idx(Target)].is_empty());
    assert_eq!(
        p.notes,
        vec!["Name>name: zendesk.Users.name is owned by another.flow (registry rule)"]
    );
}

/// The plan of the `Name` flow, with the default registry.
fn plan_name(link: &Link, pair: (&Record, &Record), event_side: Side) -> Plan {
    let flow = flow(vec![name_mapping()]);
    ready(
        &Registry::default(),
        &flow,
        link,
        pair,
        event_side,
        &Translations::new(),
    )
}

#[test]
fn a_side_older_than_the_state_last_synced_is_stale() {
    let mut link = link(json!({ "Name>name": "a" }), None);
    link.target_seen_at = Some(t(10));
    let src = record("s1", 11, json!({ "Name": "b" }));
    let tgt = record("t1", 9, json!({ "name": "a" }));
    let p = plan_name(&link, (&src, &tgt), Source);
    assert_eq!(p.decision(), Decision::Stale);
    assert!(p.changes.iter().all(Map::is_empty));
    assert_eq!(p.snapshot_after([true, true]), link.snapshot);
}

#[test]
fn only_a_side_that_is_written_takes_its_values_into_the_snapshot() {
    let link = link(json!({ "Name>name": "a" }), None);
    let src = record("s1", 2, json!({ "Name": "b" }));
    let tgt = record("t1", 1, json!({ "name": "a" }));
    let p = plan_name(&link, (&src, &tgt), Source);
    assert_eq!(p.snapshot_after([false, false])["Name>name"], json!("a"));
    assert_eq!(p.snapshot_after([false, true])["Name>name"], json!("b"));
}

// ---- references --------------------------------------------------------------------------

const PARTY: &str = "partyId>organization_id";

fn lookup(from: Side, id: &str) -> Lookup {
    Lookup {
        property: PARTY.into(),
        from,
        id: id.into(),
    }
}

fn ref_link(s: Option<&str>, t: Option<&str>) -> Link {
    link(json!({ PARTY: { "s": s, "t": t } }), None)
}

fn ref_records(s: Value, t: Value) -> (Record, Record) {
    (
        record("s1", 2, json!({ "partyId": s })),
        record("t1", 1, json!({ "organization_id": t })),
    )
}

/// The plan of the reference flow for the pair of ids `(s, t)` against a link whose snapshot
/// has `c1`/`o1`.
fn plan_party(ids: (Value, Value), event_side: Side, translations: &Translations) -> Plan {
    let flow = flow(vec![party_mapping()]);
    let link = ref_link(Some("c1"), Some("o1"));
    let (src, tgt) = ref_records(ids.0, ids.1);
    ready(
        &Registry::default(),
        &flow,
        &link,
        (&src, &tgt),
        event_side,
        translations,
    )
}

#[test]
fn a_changed_reference_is_written_as_the_translated_id() {
    let flow = flow(vec![party_mapping()]);
    let registry = Registry::default();
    let link = ref_link(Some("c1"), Some("o1"));
    let (src, tgt) = ref_records(json!(2), json!(1));
    // First the planner asks for the source id's translation (references are compared
    // after translation), then plans with it.
    let input = |translations| PlanInput {
        registry: &registry,
        flow: &flow,
        link: &link,
        source: &src,
        target: &tgt,
        event_side: Source,
        translations,
    };
    let none = Translations::new();
    match plan(&input(&none)) {
        Planned::NeedTranslations(l) => assert_eq!(l, vec![lookup(Source, "2")]),
        Planned::Ready(p) => panic!("planned without the translation: {p:?}"),
    }
    let found = Translations::from([(lookup(Source, "2"), Translation::Found("o2".into()))]);
    let Planned::Ready(p) = plan(&input(&found)) else {
        panic!("still asking")
    };
    assert_eq!(p.decision(), Decision::Updated);
    assert_eq!(
        p.changes[idx(Target)],
        json!({ "organization_id": "o2" })
            .as_object()
            .cloned()
            .unwrap()
    );
    assert_eq!(
        p.snapshot_after([false, true])[PARTY],
        json!({ "s": "2", "t": "o2" })
    );
}

#[test]
fn a_reference_changed_on_the_target_is_translated_back() {
    // The source's id is translated to compare the sides, the target's to write it back.
    let translations = Translations::from([
        (lookup(Source, "c1"), Translation::Found("o1".into())),
        (lookup(Target, "77"), Translation::Found("c7".into())),
    ]);
    let p = plan_party((json!("c1"), json!(77)), Target, &translations);
    assert_eq!(p.changes[idx(Source)]["partyId"], json!("c7"));
    assert_eq!(
        p.snapshot_after([true, false])[PARTY],
        json!({ "s": "c7", "t": "77" })
    );
}

#[test]
fn references_that_translate_to_each_other_converge() {
    let translations =
        Translations::from([(lookup(Source, "c2"), Translation::Found("o2".into()))]);
    let p = plan_party((json!("c2"), json!("o2")), Source, &translations);
    assert_eq!(p.decision(), Decision::Converged);
    assert!(p.changes.iter().all(Map::is_empty));
    assert_eq!(p.snapshot[PARTY], json!({ "s": "c2", "t": "o2" }));
}

#[test]
fn an_unlinked_reference_waits_for_its_record() {
    let pending = RecordKey {
        system: SystemId::PowerOffice,
        entity_type: "Customers".into(),
        record_id: "c2".into(),
    };
    let translations = Translations::from([(
        lookup(Source, "c2"),
        Translation::Pending(vec![pending.clone()]),
    )]);
    let p = plan_party((json!("c2"), json!("o1")), Source, &translations);
    assert_eq!(p.decision(), Decision::WaitingForReference);
    assert_eq!(p.pending, vec![pending]);
    assert!(p.changes.iter().all(Map::is_empty));
}

#[test]
fn a_reference_no_flow_can_link_is_left_unset_and_remembered() {
    let translations = Translations::from([(lookup(Source, "x9"), Translation::Impossible)]);
    let p = plan_party((json!("x9"), json!("o1")), Source, &translations);
    assert_eq!(p.decision(), Decision::Unchanged);
    assert!(p.changes.iter().all(Map::is_empty));
    assert!(p.notes[0].contains("reference left unset"));
    // The source's new id is recorded with the target's old one, so the next event of this
    // record does not try again.
    assert_eq!(p.snapshot[PARTY], json!({ "s": "x9", "t": "o1" }));
}

#[test]
fn an_emptied_reference_is_not_written_over_a_set_one() {
    let p = plan_party((Value::Null, json!("o1")), Source, &Translations::new());
    assert!(p.changes.iter().all(Map::is_empty));
    assert!(p.notes[0].contains("empty reference"));
}

// ---- settled by one read ----------------------------------------------------------------

#[test]
fn a_record_matching_the_snapshot_is_settled_without_the_other_side() {
    let flow = flow(vec![name_mapping(), party_mapping()]);
    let snapshot = json!({ "Name>name": "a", PARTY: { "s": "c1", "t": "o1" } });
    let tgt = record("t1", 1, json!({ "name": "a", "organization_id": 1 }));
    let mut l = link(snapshot.clone(), Some(Target));
    l.snapshot[PARTY] = json!({ "s": "c1", "t": "1" });
    assert_eq!(
        settled_by_one_read(&flow, &l, &tgt, Target),
        Some(Decision::Echo)
    );
    l.last_write_side = Some(Source);
    assert_eq!(
        settled_by_one_read(&flow, &l, &tgt, Target),
        Some(Decision::Unchanged)
    );
    // A value that differs, or a read older than the one last synced, needs the full plan.
    let renamed = record("t1", 1, json!({ "name": "b", "organization_id": 1 }));
    assert_eq!(settled_by_one_read(&flow, &l, &renamed, Target), None);
    l.target_seen_at = Some(t(5));
    assert_eq!(settled_by_one_read(&flow, &l, &tgt, Target), None);
}
