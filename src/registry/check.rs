//! Validation of the registry against the connectors' declarations (`connectors::schema`).
//!
//! Every finding has a severity, the file and line it is about, and one plain sentence that says
//! what is wrong and what to do. Errors stop `serve`; warnings describe what the registry as
//! written cannot do (a flow that can only link, a mapping that is kept but not synced, a reference
//! that can never be translated) and are logged once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{Dataflow, Direction, EntityRef, Location, PropertyMapping, Registry, SyncMode};
use crate::connectors::schema::{self, Access, EntityDecl, FieldDecl};
use crate::domain::SystemId;

/// Errors come first when findings are sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The registry must not run like this: `serve` refuses to start, `check` exits non-zero.
    Error,
    /// True of the registry, worth knowing, not fatal.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding of `tether registry check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Where in the registry files or the overlay; `None` for findings about the configuration.
    pub location: Option<Location>,
    pub message: String,
}

impl Finding {
    pub fn new(severity: Severity, location: Option<Location>, message: String) -> Self {
        Finding {
            severity,
            location,
            message,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(at) => write!(f, "{at}: {}: {}", self.severity, self.message),
            None => write!(f, "configuration: {}: {}", self.severity, self.message),
        }
    }
}

/// The data types a property mapping may name.
pub const DATA_TYPES: &[&str] = &[
    "string", "integer", "number", "boolean", "date", "datetime", "object", "array",
];

/// Required fields of the flow's target that no synced mapping fills: while any remain, the flow
/// cannot create its target and only links records matched by merge criteria.
pub fn unfilled_required(flow: &Dataflow) -> Vec<&'static str> {
    let Some(decl) = schema::entity(flow.target.system, &flow.target.entity_type) else {
        return Vec::new();
    };
    decl.required_fields()
        .map(|f| f.path)
        .filter(|path| {
            !flow.mappings(Direction::ToTarget).any(|m| {
                m.target == *path
                    || m.target
                        .strip_prefix(path)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
        })
        .collect()
}

/// Everything `check` finds in a registry (the loader adds what it found while parsing).
pub fn check(registry: &Registry) -> Vec<Finding> {
    let mut c = Checker {
        registry,
        findings: Vec::new(),
    };
    for flow in &registry.dataflows {
        c.flow(flow);
    }
    c.writers();
    c.rules();
    c.findings
}

/// A warning per system that dataflows use but the configuration does not connect: those flows
/// are idle (README, "Configuration").
pub fn idle_systems(registry: &Registry, connected: impl Fn(SystemId) -> bool) -> Vec<Finding> {
    SystemId::ALL
        .into_iter()
        .filter(|s| !connected(*s))
        .filter_map(|system| {
            let idle: Vec<&str> = registry
                .dataflows
                .iter()
                .filter(|f| {
                    f.switches.enabled && (f.source.system == system || f.target.system == system)
                })
                .map(|f| f.id.as_str())
                .collect();
            (!idle.is_empty()).then(|| {
                Finding::new(
                    Severity::Warning,
                    None,
                    format!(
                        "{} ({system}) is not configured, so {} idle{}. Add the [{system}] section to connect it.",
                        system.display_name(),
                        if idle.len() == 1 { "1 dataflow is".to_owned() } else { format!("{} dataflows are", idle.len()) },
                        if idle.len() <= 5 { format!(": {}", idle.join(", ")) } else { String::new() }
                    ),
                )
            })
        })
        .collect()
}

struct Checker<'a> {
    registry: &'a Registry,
    findings: Vec<Finding>,
}

/// One flow writing one property of one entity type.
struct Writer<'a> {
    flow: &'a Dataflow,
    direction: Direction,
    location: Option<Location>,
}

impl<'a> Checker<'a> {
    fn push(&mut self, severity: Severity, location: Option<Location>, message: String) {
        self.findings
            .push(Finding::new(severity, location, message));
    }

    fn flow_at(&self, flow: &Dataflow) -> Option<Location> {
        self.registry.locations.flows.get(&flow.id).cloned()
    }

    fn property_at(&self, flow: &Dataflow, m: &PropertyMapping) -> Option<Location> {
        self.registry
            .locations
            .properties
            .get(&(flow.id.clone(), m.target.clone()))
            .cloned()
            .or_else(|| self.flow_at(flow))
    }

    fn decl(&mut self, entity: &EntityRef, at: Option<Location>) -> Option<&'static EntityDecl> {
        let decl = schema::entity(entity.system, &entity.entity_type);
        if decl.is_none() {
            let known: Vec<&str> = schema::entities(entity.system)
                .map(|e| e.entity_type)
                .collect();
            self.push(
                Severity::Error,
                at,
                format!(
                    "{} has no entity type {:?}; its types are {}",
                    entity.system.display_name(),
                    entity.entity_type,
                    known.join(", ")
                ),
            );
        }
        decl
    }

    fn flow(&mut self, flow: &'a Dataflow) {
        let at = self.flow_at(flow);
        let source = self.decl(&flow.source, at.clone());
        let target = self.decl(&flow.target, at.clone());
        let (Some(source), Some(target)) = (source, target) else {
            return;
        };
        if flow.switches.write_back_to_source && !source.updatable {
            self.push(
                Severity::Error,
                at.clone(),
                format!(
                    "the dataflow {} writes back to its source, but {}; set `write_back_to_source = false`",
                    flow.id,
                    source.limitation.unwrap_or("its records cannot be changed through the API")
                ),
            );
        }
        for m in &flow.properties {
            self.property(flow, m, source, target);
        }
        self.merge_criteria(flow, source, target, &at);
        if flow.switches.enabled {
            self.creation(flow, target, at);
        }
    }

    /// Every merge criterion names a field each side has.
    fn merge_criteria(
        &mut self,
        flow: &Dataflow,
        source: &EntityDecl,
        target: &EntityDecl,
        at: &Option<Location>,
    ) {
        let merge_at = self
            .registry
            .locations
            .merge_criteria
            .get(&flow.id)
            .cloned()
            .or_else(|| at.clone());
        for c in &flow.merge_criteria {
            for (decl, path, side) in [(source, &c.source, "source"), (target, &c.target, "target")]
            {
                if decl.field(path).is_none() {
                    self.push(
                        Severity::Error,
                        merge_at.clone(),
                        format!(
                            "the merge criterion {} = {} of {} names `{path}`, which {}.{} does not have (the {side} side)",
                            c.source, c.target, flow.id, decl.system, decl.entity_type
                        ),
                    );
                }
            }
        }
    }

    /// What an enabled flow can do with its target: update it, create it, or only link.
    fn creation(&mut self, flow: &Dataflow, target: &EntityDecl, at: Option<Location>) {
        if !target.updatable && flow.mappings(Direction::ToTarget).next().is_some() {
            self.push(
                Severity::Warning,
                at.clone(),
                format!(
                    "the dataflow {} maps properties onto {}, but {}: they are written when the record is created and never updated",
                    flow.id,
                    flow.target,
                    target.limitation.unwrap_or("its records cannot be changed through the API")
                ),
            );
        }
        if flow.switches.create_in_target && !target.creatable {
            self.push(
                Severity::Warning,
                at.clone(),
                format!(
                    "the dataflow {} cannot create {} records ({}); it only links records matched by merge criteria",
                    flow.id,
                    flow.target,
                    target.limitation.unwrap_or("the API has no create")
                ),
            );
            return;
        }
        let missing = unfilled_required(flow);
        if flow.switches.create_in_target && !missing.is_empty() {
            let fields = missing
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(" and ");
            let merge = if flow.merge_criteria.is_empty() {
                "and it has none, so it links nothing until you map the field(s) or add merge criteria in the overlay"
            } else {
                "until you map the field(s) in the overlay"
            };
            self.push(
                Severity::Warning,
                at,
                format!(
                    "the dataflow {} cannot create {} records: nothing maps the required field(s) {fields}. It only links records matched by merge criteria, {merge}.",
                    flow.id, flow.target
                ),
            );
        } else if !flow.switches.create_in_target && flow.merge_criteria.is_empty() {
            self.push(
                Severity::Warning,
                at,
                format!(
                    "the dataflow {} neither creates its target (`create_in_target = false`) nor has merge criteria, so it links nothing; add merge criteria in the overlay",
                    flow.id
                ),
            );
        }
    }

    fn property(
        &mut self,
        flow: &Dataflow,
        m: &PropertyMapping,
        source: &'static EntityDecl,
        target: &'static EntityDecl,
    ) {
        let at = self.property_at(flow, m);
        let what = format!("the mapping {} -> {} of {}", m.source, m.target, flow.id);
        if !DATA_TYPES.contains(&m.data_type.as_str()) {
            self.push(
                Severity::Error,
                at.clone(),
                format!(
                    "{what} has the data type {:?}; use one of {}",
                    m.data_type,
                    DATA_TYPES.join(", ")
                ),
            );
        }
        let source_field = source.field(&m.source);
        let target_field = target.field(&m.target);
        for (field, path, entity) in [
            (source_field, &m.source, &flow.source),
            (target_field, &m.target, &flow.target),
        ] {
            if field.is_none() {
                self.push(
                    Severity::Error,
                    at.clone(),
                    format!(
                        "{what} names `{path}`, which {} {} does not have",
                        entity.system.display_name(),
                        entity.entity_type
                    ),
                );
            }
        }
        let (Some(source_field), Some(target_field)) = (source_field, target_field) else {
            return;
        };
        let fields = MappedFields {
            source,
            source_field,
            target_field,
        };
        self.access(flow, m, &fields, &what, &at);
        self.references(flow, m, &fields, &what, at);
    }

    /// Read-only and never-returned fields against the direction the mapping writes.
    fn access(
        &mut self,
        flow: &Dataflow,
        m: &PropertyMapping,
        fields: &MappedFields,
        what: &str,
        at: &Option<Location>,
    ) {
        let MappedFields {
            source,
            source_field,
            target_field,
        } = *fields;
        match m.sync {
            SyncMode::Off => self.push(
                Severity::Warning,
                at.clone(),
                format!(
                    "{what} is kept as the seed writes it but not synced{}. To carry {}, map it to a writable field of {} in the overlay.",
                    m.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default(),
                    m.source,
                    flow.target
                ),
            ),
            SyncMode::Both | SyncMode::ToTarget => {
                if target_field.access == Access::ReadOnly {
                    self.push(
                        Severity::Error,
                        at.clone(),
                        format!(
                            "{what} writes `{}`, which is read-only in {}; map a writable field, or set `sync = \"off\"`",
                            m.target, flow.target
                        ),
                    );
                }
                if !source_field.readable() {
                    self.push(
                        Severity::Error,
                        at.clone(),
                        format!(
                            "{what} reads `{}`, which {} never returns; map a readable field",
                            m.source, flow.source
                        ),
                    );
                }
            }
        }
        if m.sync == SyncMode::Both
            && flow.switches.write_back_to_source
            && source.updatable
            && !source_field.updatable()
        {
            self.push(
                Severity::Error,
                at.clone(),
                format!(
                    "{what} writes changes back to `{}`, which cannot be changed in {}; set `sync = \"to_target\"` on the mapping or `write_back_to_source = false` on the flow",
                    m.source, flow.source
                ),
            );
        }
    }

    /// A field that holds another record's id must be mapped as a reference, consistently with
    /// what the schema declares, and the reference must be translatable.
    fn references(
        &mut self,
        flow: &Dataflow,
        m: &PropertyMapping,
        fields: &MappedFields,
        what: &str,
        at: Option<Location>,
    ) {
        let Some(r) = &m.reference else {
            self.unmapped_references(flow, m, fields, what, at);
            return;
        };
        let sides = [
            (
                fields.source_field,
                &m.source,
                &flow.source,
                r.source_types.iter().cloned().collect::<BTreeSet<_>>(),
            ),
            (
                fields.target_field,
                &m.target,
                &flow.target,
                BTreeSet::from([r.target_type.clone()]),
            ),
        ];
        let mut consistent = true;
        for (field, path, entity, types) in sides {
            consistent &= self.reference_side(&field, path, entity, &types, what, &at);
        }
        if consistent && m.syncs_to_target() {
            self.resolvable(flow, m, at);
        }
    }

    /// A synced field that holds an id but is mapped as a plain value: ids are never copied.
    fn unmapped_references(
        &mut self,
        flow: &Dataflow,
        m: &PropertyMapping,
        fields: &MappedFields,
        what: &str,
        at: Option<Location>,
    ) {
        for (field, path, entity) in [
            (fields.source_field, &m.source, &flow.source),
            (fields.target_field, &m.target, &flow.target),
        ] {
            if !field.refers_to.is_empty() && m.syncs_to_target() {
                self.push(
                    Severity::Error,
                    at.clone(),
                    format!(
                        "{what}: `{path}` holds a {} id of {}, so the mapping must say what it refers to on each side (`reference = {{ source = [...], target = \"...\" }}`); ids are translated, never copied",
                        entity.system.display_name(),
                        field.refers_to.join(" or ")
                    ),
                );
            }
        }
    }

    /// One side of a reference mapping: the types it names exist, and agree with what the
    /// schema declares the field refers to. False if not.
    fn reference_side(
        &mut self,
        field: &schema::FieldDecl,
        path: &str,
        entity: &EntityRef,
        types: &BTreeSet<String>,
        what: &str,
        at: &Option<Location>,
    ) -> bool {
        let mut consistent = true;
        for t in types {
            if schema::entity(entity.system, t).is_none() {
                consistent = false;
                self.push(
                    Severity::Error,
                    at.clone(),
                    format!(
                        "{what} refers to {t:?}, which is not an entity type of {}",
                        entity.system.display_name()
                    ),
                );
            }
        }
        let declared: BTreeSet<String> = field.refers_to.iter().map(|t| (*t).to_owned()).collect();
        if !field.refers_to.is_empty() && declared != *types {
            consistent = false;
            self.push(
                Severity::Error,
                at.clone(),
                format!(
                    "{what} says `{path}` refers to {}, but {} declares it refers to {}",
                    types.iter().cloned().collect::<Vec<_>>().join(" or "),
                    entity,
                    field.refers_to.join(" or ")
                ),
            );
        }
        consistent
    }

    /// A reference is translated through the links of a dataflow between the referenced types.
    fn resolvable(&mut self, flow: &Dataflow, m: &PropertyMapping, at: Option<Location>) {
        let Some(r) = &m.reference else { return };
        let to = EntityRef::new(flow.target.system, r.target_type.clone());
        let unresolved: Vec<&String> = r
            .source_types
            .iter()
            .filter(|t| {
                let from = EntityRef::new(flow.source.system, (*t).clone());
                !self
                    .registry
                    .dataflows
                    .iter()
                    .any(|f| f.switches.enabled && f.touches(&from) && f.touches(&to))
            })
            .collect();
        if unresolved.is_empty() {
            return;
        }
        let pairs = unresolved
            .iter()
            .map(|t| format!("{}.{t} and {to}", flow.source.system))
            .collect::<Vec<_>>()
            .join(", nor ");
        let consequence = if unresolved.len() == r.source_types.len() {
            format!(
                "so `{}` can never be translated and is left unset (and counted) rather than given a {} id",
                m.target,
                flow.source.system.display_name()
            )
        } else {
            "so ids of those types are left unset (and counted)".to_owned()
        };
        self.push(
            Severity::Warning,
            at,
            format!(
                "the reference {} -> {} of {} has no dataflow to translate it: none links {pairs}, {consequence}.",
                m.source, m.target, flow.id
            ),
        );
    }

    /// Target properties written by several flows that may reach the same record need a rule.
    fn writers(&mut self) {
        let mut by_property: BTreeMap<(String, String), Vec<Writer<'a>>> = BTreeMap::new();
        for flow in self
            .registry
            .dataflows
            .iter()
            .filter(|f| f.switches.enabled)
        {
            for direction in [Direction::ToTarget, Direction::ToSource] {
                for m in flow.mappings(direction) {
                    let (entity, path) = match direction {
                        Direction::ToTarget => (&flow.target, &m.target),
                        Direction::ToSource => (&flow.source, &m.source),
                    };
                    by_property
                        .entry((entity.to_string(), path.clone()))
                        .or_default()
                        .push(Writer {
                            flow,
                            direction,
                            location: self.property_at(flow, m),
                        });
                }
            }
        }
        for ((entity, path), writers) in by_property {
            if writers.len() < 2 || !may_share_a_record(&writers) {
                continue;
            }
            let first = &writers[0];
            let entity_ref = match first.direction {
                Direction::ToTarget => &first.flow.target,
                Direction::ToSource => &first.flow.source,
            };
            if self.registry.rule(entity_ref, &path).is_some() {
                continue;
            }
            let names = writers
                .iter()
                .map(|w| match w.direction {
                    Direction::ToTarget => w.flow.id.clone(),
                    Direction::ToSource => format!("{} (written back)", w.flow.id),
                })
                .collect::<Vec<_>>()
                .join(", ");
            self.push(
                Severity::Error,
                first.location.clone(),
                format!(
                    "{entity}.{path} is written by {} dataflows that can reach the same record ({names}) and no rule says which wins; add a [[rule]] with entity = \"{entity}\", property = \"{path}\" and resolve = \"latest_wins\" or \"owner\"",
                    writers.len()
                ),
            );
        }
    }

    /// Rules must name a real property, and an owner must be a flow that writes it.
    fn rules(&mut self) {
        for (i, rule) in self.registry.rules.iter().enumerate() {
            let at = self.registry.locations.rules.get(i).cloned();
            let Some(decl) = self.decl(&rule.entity, at.clone()) else {
                continue;
            };
            if decl.field(&rule.property).is_none() {
                self.push(
                    Severity::Error,
                    at.clone(),
                    format!(
                        "the rule for {}.{} names a property {} does not have",
                        rule.entity, rule.property, rule.entity
                    ),
                );
            }
            if let super::Resolution::Owner(owner) = &rule.resolve {
                let writes = self.registry.flow(owner).is_some_and(|flow| {
                    (flow.target == rule.entity
                        && flow
                            .mappings(Direction::ToTarget)
                            .any(|m| m.target == rule.property))
                        || (flow.source == rule.entity
                            && flow
                                .mappings(Direction::ToSource)
                                .any(|m| m.source == rule.property))
                });
                if !writes {
                    self.push(
                        Severity::Error,
                        at,
                        format!(
                            "the rule for {}.{} names the owner {owner:?}, which is not a dataflow that writes that property",
                            rule.entity, rule.property
                        ),
                    );
                }
            }
        }
    }
}

/// Whether two of these writers can be linked to the same record. A record created by a flow is
/// linked to that flow alone, unless another flow links existing records by merge criteria; a flow
/// writing back to its source reaches every record of that type it links.
fn may_share_a_record(writers: &[Writer<'_>]) -> bool {
    let flows: BTreeSet<&str> = writers.iter().map(|w| w.flow.id.as_str()).collect();
    if flows.len() < 2 {
        return false;
    }
    let back = writers
        .iter()
        .filter(|w| w.direction == Direction::ToSource)
        .count();
    let forward = writers.len() - back;
    let merging = writers
        .iter()
        .filter(|w| w.direction == Direction::ToTarget && !w.flow.merge_criteria.is_empty())
        .count();
    back >= 2 || (back >= 1 && forward >= 1) || merging >= 2 || (merging >= 1 && forward >= 2)
}

/// The two fields a property mapping connects, once both are known to exist.
#[derive(Clone, Copy)]
struct MappedFields {
    source: &'static EntityDecl,
    source_field: FieldDecl,
    target_field: FieldDecl,
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
