//! `tether registry export`: the effective registry as JSON in the shape the README's "Dataflows: the mapping registry" describes:
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::registry::load::{assemble, SHIPPED};

    #[test]
    fn export_has_the_documented_shape() {
        let (registry, _) = assemble(SHIPPED, None).unwrap();
        let text = super::to_json(&registry);
        let value: Value = serde_json::from_str(&text).unwrap();
        let flows = value["dataflows"].as_array().unwrap();
        assert_eq!(flows.len(), 18);

        // The documented shape, key for key.
        let customers = flows
            .iter()
            .find(|f| f["source"]["type"] == "Customers")
            .unwrap();
        assert_eq!(
            customers["source"],
            json!({"system": "poweroffice", "type": "Customers"})
        );
        assert_eq!(
            customers["target"],
            json!({"system": "zendesk", "type": "Organizations"})
        );
        let name = &customers["properties"][0];
        assert_eq!(
            (&name["source"], &name["target"], &name["type"]),
            (&json!("Name"), &json!("name"), &json!("string"))
        );
        // The seed's unsyncable mapping is exported faithfully, with its status.
        assert_eq!(customers["properties"][1]["target"], "url");
        assert_eq!(customers["properties"][1]["sync"], "off");

        // Fixed keys come first, in the documented order; extra keys follow.
        let compact = serde_json::to_string(&value["dataflows"][0]).unwrap();
        let raw_first = &text[text.find("\"source\"").unwrap()..];
        let order: Vec<usize> = ["\"source\"", "\"target\"", "\"properties\"", "\"id\""]
            .iter()
            .map(|k| raw_first.find(k).unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{order:?} in {compact}"
        );
        let company = flows
            .iter()
            .find(|f| f["target"]["type"] == "Contacts")
            .unwrap();
        assert_eq!(company["properties"][0]["target"], "company.id");
        assert_eq!(
            company["properties"][0]["reference"],
            json!({"source_types": ["Organizations"], "target_type": "Companies"})
        );
        assert_eq!(value["rules"][0]["resolve"], "latest_wins");
    }
}
