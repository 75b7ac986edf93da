//! `tether registry export`: the effective registry as JSON in the shape product.md section 2 fixes:
//! `{"dataflows":[{"source":{"system","type"},"target":{...},"properties":[{"source","target","type"}]}]}`.
//! Those keys come first, in that order; the extra keys (`id`, `reference`, `sync`, `note`,
//! `merge_criteria`, `switches`, `rules`) follow them.

use serde::Serialize;

use super::{
    Dataflow, EntityRef, FlowSwitches, MergeCriterion, PropertyMapping, PropertyRule, Reference,
    Registry, SyncMode,
};

#[derive(Serialize)]
struct Export<'a> {
    dataflows: Vec<Flow<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    rules: &'a [PropertyRule],
}

#[derive(Serialize)]
struct Flow<'a> {
    source: &'a EntityRef,
    target: &'a EntityRef,
    properties: Vec<Property<'a>>,
    id: &'a str,
    merge_criteria: &'a [MergeCriterion],
    switches: FlowSwitches,
}

#[derive(Serialize)]
struct Property<'a> {
    source: &'a str,
    target: &'a str,
    #[serde(rename = "type")]
    data_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Reference>,
    sync: SyncMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

fn flow(f: &Dataflow) -> Flow<'_> {
    Flow {
        source: &f.source,
        target: &f.target,
        properties: f.properties.iter().map(property).collect(),
        id: &f.id,
        merge_criteria: &f.merge_criteria,
        switches: f.switches,
    }
}

fn property(p: &PropertyMapping) -> Property<'_> {
    Property {
        source: &p.source,
        target: &p.target,
        data_type: &p.data_type,
        reference: p.reference.as_ref(),
        sync: p.sync,
        note: p.note.as_deref(),
    }
}

/// The registry as pretty-printed JSON.
pub fn to_json(registry: &Registry) -> String {
    let export = Export {
        dataflows: registry.dataflows.iter().map(flow).collect(),
        rules: &registry.rules,
    };
    serde_json::to_string_pretty(&export).expect("the registry serialises to JSON")
}
