//! The planner: what one event of a linked pair changes, decided without I/O or a clock.
//!
//! Input: the flow (and the registry, for who may write what), the link (its snapshot, the change
//! stamps last seen, the side written last), both sides' current records, the side the event came
//! from, and the reference translations looked up so far. Output: either the translations still
//! needed (the caller looks them up and plans again), or a [`Plan`]: the changes per side, the
//! snapshot afterwards, the decision and the records that must be synced first. `apply` performs
//! it. The rules are those of `docs/sync-rules.md`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::decision::Decision;
use super::mapping::{entity, key, path, ref_pair, ref_part, synced};
use super::merge::{decide, normalize, ref_id, Decision as Merge, PropertyFacts, Side};
use super::store::Link;
use crate::connectors::{set_path, Record};
use crate::domain::RecordKey;
use crate::registry::{Dataflow, Direction, PropertyMapping, Registry, Resolution};

/// A referenced id translated to the other side.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Translation {
    Found(String),
    /// Not linked yet, but a flow could link it: these records are synced first.
    Pending(Vec<RecordKey>),
    /// No flow links these types: the reference is left unset.
    Impossible,
}

/// One translation the planner needs: the id of reference property `property` (its snapshot key)
/// as read on side `from`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Lookup {
    pub property: String,
    pub from: Side,
    pub id: String,
}

/// The translations looked up for one event.
pub(crate) type Translations = HashMap<Lookup, Translation>;

/// Everything the planner reads.
pub(crate) struct PlanInput<'a> {
    pub registry: &'a Registry,
    pub flow: &'a Dataflow,
    pub link: &'a Link,
    pub source: &'a Record,
    pub target: &'a Record,
    /// The side whose event is being processed (it wins a tie of change times).
    pub event_side: Side,
    pub translations: &'a Translations,
}

/// What the planner answers.
#[derive(Debug)]
pub(crate) enum Planned {
    Ready(Plan),
    /// Look these up (see [`Translations`]) and plan again.
    NeedTranslations(Vec<Lookup>),
}

/// A pair of values, one per side, indexed by [`Side`].
pub(crate) type PerSide<T> = [T; 2];

pub(crate) fn idx(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Target => 1,
    }
}

/// What to do for one event of a linked pair.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    /// The decision if every planned write succeeds (see [`settle`] for when one cannot).
    pub decision: Option<Decision>,
    /// The properties to write to each side (only changed ones), as that side's fields.
    pub changes: PerSide<Map<String, Value>>,
    /// The snapshot whatever is written: the base with converged and unlinkable values taken in.
    pub snapshot: Map<String, Value>,
    /// The snapshot values a side's write makes true, taken in only if that write happens.
    pub on_write: PerSide<Vec<(String, Value)>>,
    /// Referenced records to sync before this pair (the event waits).
    pub pending: Vec<RecordKey>,
    /// Why something was not written, one sentence per property.
    pub notes: Vec<String>,
    /// At least one property holds the same new value on both sides.
    pub converged: bool,
    /// Tether wrote the event's side last: an event that changes nothing is its echo.
    pub echo: bool,
    /// The side planned from the snapshot instead of a read (`super::unread`), set by the
    /// engine: written first, on the stamp the link keeps.
    pub unread: Option<Side>,
}

impl Plan {
    /// The decision (present on every plan the planner returns).
    pub fn decision(&self) -> Decision {
        self.decision.unwrap_or(Decision::Unchanged)
    }

    /// The snapshot after the writes that happened (`written[idx(side)]`).
    pub fn snapshot_after(&self, written: PerSide<bool>) -> Map<String, Value> {
        let mut snapshot = self.snapshot.clone();
        for side in [Side::Source, Side::Target] {
            if written[idx(side)] {
                for (k, v) in &self.on_write[idx(side)] {
                    snapshot.insert(k.clone(), v.clone());
                }
            }
        }
        snapshot
    }
}

/// The decision of a linked pair once its writes are done: `updated` if anything was written,
/// else `converged`, else `echo` (nothing refused or skipped, and Tether wrote this side last),
/// else `unchanged`.
pub(crate) fn settle(written: bool, converged: bool, noted: bool, echo: bool) -> Decision {
    if written {
        Decision::Updated
    } else if converged {
        Decision::Converged
    } else if !noted && echo {
        Decision::Echo
    } else {
        Decision::Unchanged
    }
}

/// `seen` is newer than what was just read: the read is stale.
pub(crate) fn stale(read: Option<DateTime<Utc>>, seen: Option<DateTime<Utc>>) -> bool {
    matches!((read, seen), (Some(r), Some(s)) if r < s)
}

/// Whether a linked record, just read, shows every synced property as the link's snapshot has it,
/// so it has nothing to send (usually the echo of Tether's own write): then the other side need
/// not be read, since a change there arrives as that record's own event. A read older than the
/// state last synced is not trusted here; the full plan treats it. Returns the decision to log.
pub(crate) fn settled_by_one_read(
    flow: &Dataflow,
    link: &Link,
    record: &Record,
    side: Side,
) -> Option<Decision> {
    if stale(record.updated_at, link.seen_on(side)) {
        return None;
    }
    let matches = synced(flow).all(|p| {
        let base = link.snapshot.get(&key(p));
        let value = record.get_path(path(p, side));
        match &p.reference {
            None => base == Some(&normalize(value)),
            Some(_) => base.is_some() && ref_part(base, side) == ref_id(value),
        }
    });
    matches.then(|| {
        if link.last_write_side == Some(side) {
            Decision::Echo
        } else {
            Decision::Unchanged
        }
    })
}

/// Why the registry does not let `flow` write property `p` to side `to` of a linked record, if it
/// does not: write-back switched off, a one-way mapping, or a rule naming another flow as the
/// property's owner (creation is not held back by owners: a new record needs its fields, and
/// there is no value of the owner's to protect yet).
pub(crate) fn write_refused(
    registry: &Registry,
    flow: &Dataflow,
    p: &PropertyMapping,
    to: Side,
) -> Option<String> {
    if to == Side::Source && !flow.switches.write_back_to_source {
        return Some("writing back to the source is off".into());
    }
    if to == Side::Source && !p.syncs_to_source() {
        return Some("the registry syncs this property only towards the target".into());
    }
    let direction = match to {
        Side::Target => Direction::ToTarget,
        Side::Source => Direction::ToSource,
    };
    let entity = entity(flow, to);
    if registry.may_write(flow, direction, path(p, to)) {
        return None;
    }
    let owner = match registry.rule(entity, path(p, to)).map(|r| &r.resolve) {
        Some(Resolution::Owner(owner)) => owner.as_str(),
        _ => "another flow",
    };
    Some(format!(
        "{}.{}.{} is owned by {owner} (registry rule)",
        entity.system,
        entity.entity_type,
        path(p, to)
    ))
}

/// The plan for a linked pair: the three-way merge per property against the snapshot, writes of
/// changed properties only, references through their translations.
pub(crate) fn plan(input: &PlanInput<'_>) -> Planned {
    let (src, tgt, link) = (input.source, input.target, input.link);
    if stale(src.updated_at, link.source_seen_at) || stale(tgt.updated_at, link.target_seen_at) {
        return Planned::Ready(Plan {
            decision: Some(Decision::Stale),
            snapshot: link.snapshot.clone(),
            notes: vec!["a side returned a state older than the one last synced".into()],
            ..Plan::default()
        });
    }
    let mut plan = Plan {
        snapshot: link.snapshot.clone(),
        echo: link.last_write_side == Some(input.event_side),
        ..Plan::default()
    };
    let mut lookups = Vec::new();
    for p in synced(input.flow) {
        if p.reference.is_none() {
            plan_value(input, p, &mut plan);
        } else {
            plan_reference(input, p, &mut plan, &mut lookups);
        }
    }
    if !lookups.is_empty() {
        return Planned::NeedTranslations(lookups);
    }
    plan.decision = Some(if plan.pending.is_empty() {
        let writes = plan.changes.iter().any(|c| !c.is_empty());
        settle(writes, plan.converged, !plan.notes.is_empty(), plan.echo)
    } else {
        Decision::WaitingForReference
    });
    Planned::Ready(plan)
}

/// The facts of one property with no change or value yet filled in.
fn facts(input: &PlanInput<'_>) -> PropertyFacts {
    PropertyFacts {
        source_changed: false,
        target_changed: false,
        equal: false,
        source_empty: false,
        target_empty: false,
        source_updated_at: input.source.updated_at,
        target_updated_at: input.target.updated_at,
        event_side: input.event_side,
    }
}

/// A plain value: compared with the snapshot as it is on both sides.
fn plan_value(input: &PlanInput<'_>, p: &PropertyMapping, plan: &mut Plan) {
    let k = key(p);
    let base = input.link.snapshot.get(&k);
    let sv = normalize(input.source.get_path(&p.source));
    let tv = normalize(input.target.get_path(&p.target));
    let f = PropertyFacts {
        source_changed: base != Some(&sv),
        target_changed: base != Some(&tv),
        equal: sv == tv,
        source_empty: sv.is_null(),
        target_empty: tv.is_null(),
        ..facts(input)
    };
    match decide(&f) {
        Merge::Unchanged => {}
        Merge::Converged => {
            plan.converged = true;
            plan.snapshot.insert(k, sv);
        }
        Merge::KeepNonEmpty => plan.notes.push(format!(
            "{k}: an empty value is not written over a non-empty one"
        )),
        Merge::WriteTo(to) => {
            if let Some(why) = write_refused(input.registry, input.flow, p, to) {
                plan.notes.push(format!("{k}: {why}"));
                return;
            }
            let v = if to == Side::Target { sv } else { tv };
            set_path(&mut plan.changes[idx(to)], path(p, to), v.clone());
            plan.on_write[idx(to)].push((k, v));
        }
    }
}

/// A reference property's ids as read on both sides and as the snapshot has them.
struct RefIds {
    key: String,
    source: Option<String>,
    target: Option<String>,
    base_source: Option<String>,
    base_target: Option<String>,
}

impl RefIds {
    fn lookup(&self, from: Side, id: &str) -> Lookup {
        Lookup {
            property: self.key.clone(),
            from,
            id: id.to_owned(),
        }
    }
}

/// A reference: each side's id is compared with the snapshot's id of that side; the two sides
/// are equal when the source's id translates to the target's.
fn plan_reference(
    input: &PlanInput<'_>,
    p: &PropertyMapping,
    plan: &mut Plan,
    lookups: &mut Vec<Lookup>,
) {
    let k = key(p);
    let base = input.link.snapshot.get(&k);
    let ids = RefIds {
        source: ref_id(input.source.get_path(&p.source)),
        target: ref_id(input.target.get_path(&p.target)),
        base_source: ref_part(base, Side::Source),
        base_target: ref_part(base, Side::Target),
        key: k,
    };
    let mut f = PropertyFacts {
        source_changed: base.is_none() || ids.source != ids.base_source,
        target_changed: base.is_none() || ids.target != ids.base_target,
        source_empty: ids.source.is_none(),
        target_empty: ids.target.is_none(),
        ..facts(input)
    };
    f.equal = match (&ids.source, &ids.target) {
        (None, None) => true,
        (Some(s), Some(t)) if f.source_changed || f.target_changed => {
            let l = ids.lookup(Side::Source, s);
            match input.translations.get(&l) {
                Some(tr) => *tr == Translation::Found(t.clone()),
                None => return lookups.push(l),
            }
        }
        _ => false,
    };
    match decide(&f) {
        Merge::Unchanged => {}
        Merge::Converged => {
            plan.converged = true;
            let pair = ref_pair(ids.source.as_deref(), ids.target.as_deref());
            plan.snapshot.insert(ids.key, pair);
        }
        Merge::KeepNonEmpty => plan.notes.push(format!(
            "{}: an empty reference is not written over a non-empty one",
            ids.key
        )),
        Merge::WriteTo(to) => match write_refused(input.registry, input.flow, p, to) {
            Some(why) => plan.notes.push(format!("{}: {why}", ids.key)),
            None => write_reference(input, p, ids, to, plan, lookups),
        },
    }
}

/// A reference the merge says to write to side `to`: the winner's id, translated.
fn write_reference(
    input: &PlanInput<'_>,
    p: &PropertyMapping,
    ids: RefIds,
    to: Side,
    plan: &mut Plan,
    lookups: &mut Vec<Lookup>,
) {
    let from = to.other();
    // The winner holds an id: an empty winner is `KeepNonEmpty` or `Converged`.
    let id = match from {
        Side::Source => ids.source.clone(),
        Side::Target => ids.target.clone(),
    }
    .unwrap_or_default();
    let l = ids.lookup(from, &id);
    let Some(tr) = input.translations.get(&l) else {
        return lookups.push(l);
    };
    match tr {
        Translation::Found(other_id) => {
            let v = Value::String(other_id.clone());
            set_path(&mut plan.changes[idx(to)], path(p, to), v);
            let pair = match to {
                Side::Target => ref_pair(Some(&id), Some(other_id)),
                Side::Source => ref_pair(Some(other_id), Some(&id)),
            };
            plan.on_write[idx(to)].push((ids.key, pair));
        }
        Translation::Pending(keys) => plan.pending.extend(keys.iter().cloned()),
        Translation::Impossible => {
            plan.notes.push(format!(
                "{}: reference left unset (no dataflow links its types)",
                ids.key
            ));
            // The unlinkable value is recorded so it is not retried on every event.
            let pair = match from {
                Side::Source => ref_pair(Some(&id), ids.base_target.as_deref()),
                Side::Target => ref_pair(ids.base_source.as_deref(), Some(&id)),
            };
            plan.snapshot.insert(ids.key, pair);
        }
    }
}
