//! Reading the registry: the shipped TOML files (embedded in the binary, so `tether` works from any
//! directory), the operator's overlay (read from disk at start-up, so no rebuild is needed), and
//! [`load`], which `serve` calls.
//!
//! Every flow, property mapping, merge criterion and rule keeps the file and line it came from
//! ([`super::Locations`]). Things the model cannot hold (an unknown system, a malformed
//! `system.Type`) become error findings here; everything else is judged by [`super::check`].
//! The overlay wins: it changes switches, replaces or adds property mappings (matched by target
//! path), replaces merge criteria and rules. It cannot add dataflows.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::check::{self, Finding, Severity};
use super::{
    Dataflow, EntityRef, FlowSwitches, MergeCriterion, PropertyMapping, PropertyRule, Reference,
    Registry, Resolution, SyncMode,
};

/// The shipped registry: one file per seed document, as (display path, text).
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "registry/000_exactonline_zendesk.toml",
        include_str!("../../registry/000_exactonline_zendesk.toml"),
    ),
    (
        "registry/001_zendesk_crmoffice.toml",
        include_str!("../../registry/001_zendesk_crmoffice.toml"),
    ),
    (
        "registry/002_zendesk_customerp.toml",
        include_str!("../../registry/002_zendesk_customerp.toml"),
    ),
    (
        "registry/003_poweroffice_zendesk.toml",
        include_str!("../../registry/003_poweroffice_zendesk.toml"),
    ),
    (
        "registry/004_zendesk_custompms.toml",
        include_str!("../../registry/004_zendesk_custompms.toml"),
    ),
];

/// A file and line in a registry file or the overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: String,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Why the registry could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the registry overlay {} could not be read: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the registry's shape (an unknown key, a missing `source`, ...).
    #[error("{file}:{line}: error: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    /// The registry loaded but `check` found errors; every finding is kept (warnings too).
    #[error("the mapping registry has errors (run `tether registry check`):\n{}", list_errors(.0))]
    Invalid(Vec<Finding>),
}

fn list_errors(findings: &[Finding]) -> String {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| format!("  {f}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `serve` calls: the effective registry and its warnings, or an error if the overlay cannot
/// be read or any finding is an error.
pub fn load(overlay: Option<&Path>) -> Result<(Registry, Vec<Finding>), RegistryError> {
    let (registry, findings) = read(overlay)?;
    if findings.iter().any(|f| f.severity == Severity::Error) {
        return Err(RegistryError::Invalid(findings));
    }
    Ok((registry, findings))
}

/// The effective registry with every finding, errors included (what `registry check` prints).
pub fn read(overlay: Option<&Path>) -> Result<(Registry, Vec<Finding>), RegistryError> {
    let text = match overlay {
        None => None,
        Some(path) => {
            Some(
                std::fs::read_to_string(path).map_err(|source| RegistryError::Unreadable {
                    path: path.to_owned(),
                    source,
                })?,
            )
        }
    };
    let name = overlay.map(|p| p.display().to_string());
    assemble(SHIPPED, name.as_deref().zip(text.as_deref()))
}

/// Builds the effective registry from registry files and an optional overlay, given as
/// (display path, text), then checks it. Flows that cannot create their target (a required field
/// is unmapped) get `create_in_target = false`, with a warning saying why.
pub fn assemble(
    files: &[(&str, &str)],
    overlay: Option<(&str, &str)>,
) -> Result<(Registry, Vec<Finding>), RegistryError> {
    let mut builder = Builder::default();
    for (name, text) in files {
        let doc = parse(name, text)?;
        builder.add_file(name, text, doc, false);
    }
    if let Some((name, text)) = overlay {
        let doc = parse(name, text)?;
        builder.add_file(name, text, doc, true);
    }
    let Builder {
        mut registry,
        mut findings,
    } = builder;
    findings.extend(check::check(&registry));
    for flow in &mut registry.dataflows {
        if flow.switches.create_in_target && !check::unfilled_required(flow).is_empty() {
            flow.switches.create_in_target = false;
        }
    }
    findings.sort_by(|a, b| {
        (a.severity, &a.location)
            .cmp(&(b.severity, &b.location))
            .then_with(|| a.message.cmp(&b.message))
    });
    Ok((registry, findings))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    seed: Option<Spanned<String>>,
    #[serde(default)]
    dataflow: Vec<Spanned<FlowDoc>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowDoc {
    source: Spanned<String>,
    target: Spanned<String>,
    enabled: Option<bool>,
    create_in_target: Option<bool>,
    write_back_to_source: Option<bool>,
    sync_private_comments: Option<bool>,
    guard: Option<Spanned<super::guard::GuardDoc>>,
    #[serde(default)]
    property: Vec<Spanned<PropDoc>>,
    merge: Option<Vec<Spanned<MergeDoc>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PropDoc {
    source: String,
    target: String,
    #[serde(rename = "type")]
    data_type: String,
    reference: Option<RefDoc>,
    #[serde(default)]
    sync: SyncMode,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefDoc {
    source: Vec<String>,
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeDoc {
    source: String,
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    entity: Spanned<String>,
    property: String,
    resolve: Spanned<String>,
    owner: Option<String>,
}

fn parse(name: &str, text: &str) -> Result<FileDoc, RegistryError> {
    toml::from_str(text).map_err(|e| RegistryError::Syntax {
        file: name.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_owned(),
    })
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// What a `[[dataflow]]` table says beyond its switches, parsed and located.
struct ParsedFlow {
    flow_at: Location,
    properties: Vec<(PropertyMapping, Location)>,
    merge: Option<(Vec<MergeCriterion>, Location)>,
    guard: crate::guard::GuardOverride,
}

fn merge_criteria(
    criteria: &[Spanned<MergeDoc>],
    at: &impl Fn(usize) -> Location,
    flow_at: &Location,
) -> (Vec<MergeCriterion>, Location) {
    let location = criteria
        .first()
        .map(|c| at(c.span().start))
        .unwrap_or_else(|| flow_at.clone());
    let list = criteria
        .iter()
        .map(|c| MergeCriterion {
            source: c.get_ref().source.clone(),
            target: c.get_ref().target.clone(),
        })
        .collect();
    (list, location)
}

#[derive(Default)]
struct Builder {
    registry: Registry,
    findings: Vec<Finding>,
}

impl Builder {
    fn error(&mut self, location: Location, message: String) {
        self.findings
            .push(Finding::new(Severity::Error, Some(location), message));
    }

    fn add_file(&mut self, name: &str, text: &str, doc: FileDoc, overlay: bool) {
        let at = |offset: usize| Location {
            file: name.to_owned(),
            line: line_of(text, offset),
        };
        if let (true, Some(seed)) = (overlay, &doc.seed) {
            self.error(
                at(seed.span().start),
                "an overlay changes the shipped dataflows and has no `seed`; remove the key"
                    .to_owned(),
            );
        }
        for flow in doc.dataflow {
            self.add_flow(flow, overlay, &at);
        }
        for rule in doc.rule {
            self.add_rule(rule, overlay, &at);
        }
    }

    /// A `[[dataflow]]` of a seed file declares a flow; one of an overlay changes a declared flow.
    fn add_flow(&mut self, flow: Spanned<FlowDoc>, overlay: bool, at: &impl Fn(usize) -> Location) {
        let flow_at = at(flow.span().start);
        let flow = flow.into_inner();
        let (Some(source), Some(target)) =
            (self.entity(&flow.source, at), self.entity(&flow.target, at))
        else {
            return;
        };
        let id = Dataflow::id_for(&source, &target);
        let guard = match &flow.guard {
            None => Default::default(),
            Some(doc) => doc.get_ref().to_override().unwrap_or_else(|problem| {
                self.error(at(doc.span().start), format!("{id}: {problem}"));
                Default::default()
            }),
        };
        let parsed = ParsedFlow {
            guard,
            properties: self.properties(&id, &flow.property, at),
            merge: flow
                .merge
                .as_ref()
                .map(|criteria| merge_criteria(criteria, at, &flow_at)),
            flow_at,
        };
        let existing = self.registry.dataflows.iter().position(|f| f.id == id);
        match (overlay, existing) {
            (false, Some(_)) => self.error(
                parsed.flow_at,
                format!("the dataflow {id} is declared twice; keep one of the two"),
            ),
            (true, None) => self.error(
                parsed.flow_at,
                format!(
                    "the overlay names the dataflow {id}, which the registry does not have; an overlay changes the shipped dataflows and cannot add new ones (check the spelling of `source` and `target`)"
                ),
            ),
            (false, None) => self.declare_flow(id, source, target, &flow, parsed),
            (true, Some(index)) => self.change_flow(index, &flow, parsed),
        }
    }

    fn declare_flow(
        &mut self,
        id: String,
        source: EntityRef,
        target: EntityRef,
        flow: &FlowDoc,
        parsed: ParsedFlow,
    ) {
        let defaults = FlowSwitches::default();
        let locations = &mut self.registry.locations;
        locations.flows.insert(id.clone(), parsed.flow_at);
        let mut merge_criteria = Vec::new();
        if let Some((list, location)) = parsed.merge {
            locations.merge_criteria.insert(id.clone(), location);
            merge_criteria = list;
        }
        let mut mappings = Vec::new();
        for (mapping, location) in parsed.properties {
            locations
                .properties
                .insert((id.clone(), mapping.target.clone()), location);
            mappings.push(mapping);
        }
        self.registry.dataflows.push(Dataflow {
            id,
            source,
            target,
            properties: mappings,
            merge_criteria,
            switches: FlowSwitches {
                enabled: flow.enabled.unwrap_or(defaults.enabled),
                create_in_target: flow.create_in_target.unwrap_or(defaults.create_in_target),
                write_back_to_source: flow
                    .write_back_to_source
                    .unwrap_or(defaults.write_back_to_source),
                sync_private_comments: flow
                    .sync_private_comments
                    .unwrap_or(defaults.sync_private_comments),
            },
            guard: parsed.guard,
        });
    }

    /// An overlay's flow: the switches, merge criteria and mappings it names replace the shipped ones.
    fn change_flow(&mut self, index: usize, flow: &FlowDoc, parsed: ParsedFlow) {
        let locations = &mut self.registry.locations;
        let existing = &mut self.registry.dataflows[index];
        let id = existing.id.clone();
        let switches = &mut existing.switches;
        let changes_switches = flow.enabled.is_some()
            || flow.create_in_target.is_some()
            || flow.write_back_to_source.is_some()
            || flow.sync_private_comments.is_some();
        switches.enabled = flow.enabled.unwrap_or(switches.enabled);
        switches.create_in_target = flow.create_in_target.unwrap_or(switches.create_in_target);
        switches.write_back_to_source = flow
            .write_back_to_source
            .unwrap_or(switches.write_back_to_source);
        switches.sync_private_comments = flow
            .sync_private_comments
            .unwrap_or(switches.sync_private_comments);
        if changes_switches {
            locations.flows.insert(id.clone(), parsed.flow_at);
        }
        if !parsed.guard.is_empty() {
            existing.guard = parsed.guard;
        }
        if let Some((list, location)) = parsed.merge {
            locations.merge_criteria.insert(id.clone(), location);
            existing.merge_criteria = list;
        }
        for (mapping, location) in parsed.properties {
            locations
                .properties
                .insert((id.clone(), mapping.target.clone()), location);
            match existing
                .properties
                .iter_mut()
                .find(|p| p.target == mapping.target)
            {
                Some(slot) => *slot = mapping,
                None => existing.properties.push(mapping),
            }
        }
    }

    /// A `[[rule]]`: declared once in the seeds, replaced by an overlay's rule for the same property.
    fn add_rule(&mut self, rule: Spanned<RuleDoc>, overlay: bool, at: &impl Fn(usize) -> Location) {
        let rule_at = at(rule.span().start);
        let rule = rule.into_inner();
        let Some(entity) = self.entity(&rule.entity, at) else {
            return;
        };
        let Some(resolve) = self.resolution(&rule, at) else {
            return;
        };
        let new = PropertyRule {
            entity,
            property: rule.property,
            resolve,
        };
        match self
            .registry
            .rules
            .iter()
            .position(|r| r.entity == new.entity && r.property == new.property)
        {
            Some(i) if overlay => {
                self.registry.rules[i] = new;
                self.registry.locations.rules[i] = rule_at;
            }
            Some(_) => self.error(
                rule_at,
                format!(
                    "a rule for {}.{} is declared twice; keep one",
                    new.entity, new.property
                ),
            ),
            None => {
                self.registry.rules.push(new);
                self.registry.locations.rules.push(rule_at);
            }
        }
    }

    fn resolution(
        &mut self,
        rule: &RuleDoc,
        at: &impl Fn(usize) -> Location,
    ) -> Option<Resolution> {
        let message = match (rule.resolve.get_ref().as_str(), &rule.owner) {
            ("latest_wins", None) => return Some(Resolution::LatestWins),
            ("owner", Some(owner)) => return Some(Resolution::Owner(owner.clone())),
            ("owner", None) => "`resolve = \"owner\"` needs `owner = \"<dataflow id>\"`, the flow that alone writes the property".to_owned(),
            ("latest_wins", Some(_)) => "`owner` only goes with `resolve = \"owner\"`; remove it or change `resolve`".to_owned(),
            (other, _) => format!(
                "`resolve = {other:?}` is not a rule; use \"latest_wins\" or \"owner\""
            ),
        };
        self.error(at(rule.resolve.span().start), message);
        None
    }

    /// Parses `system.Type`; an unknown system or a malformed value is an error finding.
    fn entity(
        &mut self,
        value: &Spanned<String>,
        at: &impl Fn(usize) -> Location,
    ) -> Option<EntityRef> {
        let location = at(value.span().start);
        let Some((system, entity_type)) = value.get_ref().split_once('.') else {
            self.error(
                location,
                format!(
                    "{:?} is not an entity type; write it as system.Type, e.g. \"zendesk.Organizations\"",
                    value.get_ref()
                ),
            );
            return None;
        };
        match system.parse() {
            Ok(system) => Some(EntityRef::new(system, entity_type)),
            Err(e) => {
                self.error(location, format!("{e}"));
                None
            }
        }
    }

    fn properties(
        &mut self,
        flow_id: &str,
        docs: &[Spanned<PropDoc>],
        at: &impl Fn(usize) -> Location,
    ) -> Vec<(PropertyMapping, Location)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for doc in docs {
            let location = at(doc.span().start);
            let p = doc.get_ref();
            if !seen.insert(p.target.clone()) {
                self.error(
                    location,
                    format!(
                        "the dataflow {flow_id} maps the target property `{}` twice; one mapping per target property",
                        p.target
                    ),
                );
                continue;
            }
            out.push((
                PropertyMapping {
                    source: p.source.clone(),
                    target: p.target.clone(),
                    data_type: p.data_type.clone(),
                    reference: p.reference.as_ref().map(|r| Reference {
                        source_types: r.source.clone(),
                        target_type: r.target.clone(),
                    }),
                    sync: p.sync,
                    note: p.note.clone(),
                },
                location,
            ));
        }
        out
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
