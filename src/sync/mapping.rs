//! How a flow's property mappings read a record and key the link's snapshot: pure helpers shared
//! by the planner and creation.

use serde_json::{json, Map, Value};

use super::merge::{normalize, ref_id, Side};
use crate::connectors::Record;
use crate::registry::{Dataflow, EntityRef, PropertyMapping};

/// The snapshot key of a property: `source_path>target_path`.
pub(crate) fn key(p: &PropertyMapping) -> String {
    format!("{}>{}", p.source, p.target)
}

/// The property's path on one side.
pub(crate) fn path(p: &PropertyMapping, side: Side) -> &str {
    match side {
        Side::Source => &p.source,
        Side::Target => &p.target,
    }
}

/// The flow's entity on one side.
pub(crate) fn entity(flow: &Dataflow, side: Side) -> &EntityRef {
    match side {
        Side::Source => &flow.source,
        Side::Target => &flow.target,
    }
}

/// The flow's property mappings that are synced at all (the registry keeps seed mappings that
/// cannot be synced, such as one onto Zendesk's read-only `url`, marked `Off`).
pub(crate) fn synced(flow: &Dataflow) -> impl Iterator<Item = &PropertyMapping> {
    flow.properties.iter().filter(|p| p.syncs_to_target())
}

/// The entity types a reference may point at on one side.
pub(crate) fn ref_types(p: &PropertyMapping, side: Side) -> Vec<String> {
    match (&p.reference, side) {
        (Some(r), Side::Source) => r.source_types.clone(),
        (Some(r), Side::Target) => vec![r.target_type.clone()],
        (None, _) => Vec::new(),
    }
}

/// The mapped values of one side, for the log.
pub(crate) fn mapped(flow: &Dataflow, side: Side, record: &Record) -> Value {
    let mut out = Map::new();
    for p in synced(flow) {
        let path = path(p, side);
        out.insert(path.to_owned(), normalize(record.get_path(path)));
    }
    json!({ "id": record.id, "updated_at": record.updated_at, "values": out })
}

/// A reference's snapshot value: the source's id and the target's id of the same record.
pub(crate) fn ref_pair(s: Option<&str>, t: Option<&str>) -> Value {
    json!({ "s": s, "t": t })
}

/// One side's id of a reference snapshot value (`"s"` or `"t"`).
pub(crate) fn ref_part(base: Option<&Value>, side: Side) -> Option<String> {
    let part = match side {
        Side::Source => "s",
        Side::Target => "t",
    };
    base.and_then(|b| b.get(part)).and_then(|v| ref_id(Some(v)))
}
