//! The pure part of planning: one flow's source records classified against its target records
//! and the links that exist. No I/O, no clock; [`super::plan`] reads the records and links.

use std::collections::HashMap;

use crate::connectors::schema;
use crate::connectors::Record;
use crate::registry::{Dataflow, Direction, Registry};
use crate::sync::merge::normalize;

use super::normalize;
use super::{Conflict, Skip, Verdict};

/// What is already linked, as the flow sees it.
#[derive(Debug, Default, Clone)]
pub struct Linked {
    /// Source id -> its counterpart of the target type (through this flow, or a flow between
    /// the same two types the other way).
    pub counterpart: HashMap<String, String>,
    /// Target ids already in an active link of a flow touching the target type, and the record
    /// they are linked to (`system/type/id`), for the conflict's detail.
    pub taken: HashMap<String, String>,
}

/// One source record's place in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    pub source_id: String,
    pub source_updated_at: Option<chrono::DateTime<chrono::Utc>>,
    pub verdict: Verdict,
}

/// Classifies every source record of `flow` (see [`Verdict`]). Two source records of this flow
/// matching one target are both conflicts; [`super::plan`] applies the same rule across flows
/// that share a target type.
pub fn classify(
    registry: &Registry,
    flow: &Dataflow,
    sources: &[Record],
    targets: &[Record],
    linked: &Linked,
) -> Vec<Classified> {
    let index = index_targets(flow, targets);
    let create = creation_blocker(flow);
    let mut out: Vec<Classified> = sources
        .iter()
        .map(|src| Classified {
            source_id: src.id.clone(),
            source_updated_at: src.updated_at,
            verdict: verdict(registry, flow, src, &index, linked, create.as_ref()),
        })
        .collect();
    conflict_shared_targets(&mut out.iter_mut().collect::<Vec<_>>());
    out
}

/// Target records by their normalised merge-criteria values (records with an empty criterion
/// value are not indexed: they can match nothing).
fn index_targets<'t>(
    flow: &Dataflow,
    targets: &'t [Record],
) -> HashMap<Vec<String>, Vec<&'t Record>> {
    let mut index: HashMap<Vec<String>, Vec<&Record>> = HashMap::new();
    if flow.merge_criteria.is_empty() {
        return index;
    }
    for t in targets {
        let key: Option<Vec<String>> = flow
            .merge_criteria
            .iter()
            .map(|c| normalize::key(t.get_path(&c.target)))
            .collect();
        if let Some(key) = key {
            index.entry(key).or_default().push(t);
        }
    }
    index
}

/// Why this flow cannot create any record, if it cannot.
fn creation_blocker(flow: &Dataflow) -> Option<Skip> {
    if !flow.switches.create_in_target {
        return Some(Skip::FlowCannotCreate);
    }
    let decl = schema::entity(flow.target.system, &flow.target.entity_type)?;
    if !decl.creatable {
        return Some(Skip::TargetCannotBeCreated);
    }
    decl.required_fields()
        .find(|f| {
            !flow
                .mappings(Direction::ToTarget)
                .any(|p| p.target == f.path)
        })
        .map(|f| Skip::RequiredFieldUnmapped {
            field: f.path.to_owned(),
        })
}

fn verdict(
    registry: &Registry,
    flow: &Dataflow,
    src: &Record,
    index: &HashMap<Vec<String>, Vec<&Record>>,
    linked: &Linked,
    create_blocker: Option<&Skip>,
) -> Verdict {
    if let Some(target_id) = linked.counterpart.get(&src.id) {
        return Verdict::Linked {
            target_id: target_id.clone(),
        };
    }
    let key: Option<Vec<String>> = (!flow.merge_criteria.is_empty())
        .then(|| {
            flow.merge_criteria
                .iter()
                .map(|c| normalize::key(src.get_path(&c.source)))
                .collect()
        })
        .flatten();
    let candidates = key.and_then(|k| index.get(&k)).map_or(&[][..], |v| v);
    match candidates {
        [] => creatable(flow, src, create_blocker),
        [one] => match linked.taken.get(&one.id) {
            Some(other) => Verdict::Conflict(Conflict::CandidateLinkedElsewhere {
                target_id: one.id.clone(),
                linked_to: other.clone(),
            }),
            None => Verdict::Link {
                target_id: one.id.clone(),
                criterion: criterion_label(flow),
                writes: writes(registry, flow, src, one),
            },
        },
        several => Verdict::Conflict(Conflict::SeveralCandidates {
            candidates: several.iter().map(|r| r.id.clone()).collect(),
        }),
    }
}

/// Create, unless the flow cannot or the source lacks a value for a required target field.
fn creatable(flow: &Dataflow, src: &Record, blocker: Option<&Skip>) -> Verdict {
    if let Some(skip) = blocker {
        return Verdict::Skip(skip.clone());
    }
    let required = schema::entity(flow.target.system, &flow.target.entity_type)
        .into_iter()
        .flat_map(|d| d.required_fields());
    for field in required {
        let empty = flow
            .mappings(Direction::ToTarget)
            .filter(|p| p.target == field.path)
            .all(|p| normalize(src.get_path(&p.source)).is_null());
        if empty {
            return Verdict::Skip(Skip::RequiredFieldEmpty {
                field: field.path.to_owned(),
            });
        }
    }
    Verdict::Create
}

/// `Name=name`, or several joined by ` and `.
pub fn criterion_label(flow: &Dataflow) -> String {
    flow.merge_criteria
        .iter()
        .map(|c| format!("{}={}", c.source, c.target))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The plain properties linking will write to the target: the source holds a value and the
/// target another one (compared as the engine compares, not normalised), and no rule gives the
/// property to another flow. References are translated at run time and not counted here.
pub fn writes(registry: &Registry, flow: &Dataflow, src: &Record, tgt: &Record) -> u32 {
    flow.mappings(Direction::ToTarget)
        .filter(|p| p.reference.is_none())
        .filter(|p| registry.may_write(flow, Direction::ToTarget, &p.target))
        .filter(|p| {
            let s = normalize(src.get_path(&p.source));
            !s.is_null() && s != normalize(tgt.get_path(&p.target))
        })
        .count() as u32
}

/// Never link one record to two: a target that several source records would link to is a
/// conflict for each of them (within a flow, and across the flows of a plan that share a
/// target type).
pub fn conflict_shared_targets(items: &mut [&mut Classified]) {
    let mut claims: HashMap<String, usize> = HashMap::new();
    for item in items.iter() {
        if let Verdict::Link { target_id, .. } = &item.verdict {
            *claims.entry(target_id.clone()).or_default() += 1;
        }
    }
    for item in items.iter_mut() {
        if let Verdict::Link { target_id, .. } = &item.verdict {
            if claims[target_id] > 1 {
                item.verdict = Verdict::Conflict(Conflict::CandidateMatchedTwice {
                    target_id: target_id.clone(),
                    sources: claims[target_id],
                });
            }
        }
    }
}
