//! The mapping registry: which dataflows exist and how their properties map. Pure data and logic,
//! no I/O beyond reading its own files.
//!
//! Owns: the shipped dataflow files (one per seed document), the operator's overlay, validation
//! against the connectors' declarations (`connectors::schema`), and the JSON export.
//! Called by: `sync`, `cli`, `sandbox`. Calls: `connectors::schema` (static declarations) only.
//!
//! Submodules: [`load`] (the TOML files, the overlay, [`load()`] for `serve`), [`check`] (findings
//! with file and line), [`export`] (the JSON `tether registry export` prints).

pub mod check;
pub mod export;
pub mod load;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::SystemId;

pub use check::{Finding, Severity};
pub use load::{load, Location, RegistryError};

/// The effective registry: shipped dataflows with the overlay applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Registry {
    pub dataflows: Vec<Dataflow>,
    /// How a target property written by several flows is resolved (see [`PropertyRule`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PropertyRule>,
    /// Where each flow, property mapping, merge criterion and rule was written (file and line).
    #[serde(skip)]
    pub locations: Locations,
}

/// File and line of every part of the registry, for findings and messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Locations {
    /// By flow id: the flow's `[[dataflow]]` header (the overlay's if it changed switches).
    pub flows: HashMap<String, Location>,
    /// By (flow id, target path).
    pub properties: HashMap<(String, String), Location>,
    /// By flow id: where its merge criteria were set.
    pub merge_criteria: HashMap<String, Location>,
    /// By index into [`Registry::rules`].
    pub rules: Vec<Location>,
}

/// One side of a dataflow: an entity type of a system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EntityRef {
    pub system: SystemId,
    /// The registry's name for the type (`Organizations`, `Accounts`, `Customer`, ...).
    #[serde(rename = "type")]
    pub entity_type: String,
}

/// A dataflow: records of `source` are created as (or linked to) records of `target`; once linked
/// they stay in sync both ways through `properties`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dataflow {
    /// Stable id, e.g. `poweroffice.Customers->zendesk.Organizations`.
    pub id: String,
    pub source: EntityRef,
    pub target: EntityRef,
    pub properties: Vec<PropertyMapping>,
    /// Fields that identify the same record on both sides, for linking records that already exist.
    pub merge_criteria: Vec<MergeCriterion>,
    pub switches: FlowSwitches,
}

/// How one property maps between the two sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PropertyMapping {
    /// Path on the source side (`Name`, `partyId`).
    pub source: String,
    /// Path on the target side (`name`, `company.id`).
    pub target: String,
    /// The data type the seed names (`string`).
    #[serde(rename = "type")]
    pub data_type: String,
    /// Set when the property holds another record's id: it is translated through links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// Which ways the mapping is synced. The registry keeps a seed's mapping exactly as written
    /// even where it cannot be synced (`Off`, with the reason in `note`).
    pub sync: SyncMode,
    /// Why the mapping is limited, in a sentence for operators.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Which ways a property mapping is synced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Source to target, and target back to source when the flow writes back.
    #[default]
    Both,
    /// Only source to target: the source field cannot be written (read-only or fixed at creation).
    ToTarget,
    /// Not synced at all: kept as documentation of the seed.
    Off,
}

impl PropertyMapping {
    /// The mapping is read from the source and written to the target.
    pub fn syncs_to_target(&self) -> bool {
        self.sync != SyncMode::Off
    }

    /// The mapping is written back to the source (when its flow's `write_back_to_source` is on).
    pub fn syncs_to_source(&self) -> bool {
        self.sync == SyncMode::Both
    }
}

/// How a target property that several flows may write to the same record is resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PropertyRule {
    pub entity: EntityRef,
    /// The property path on that entity type.
    pub property: String,
    pub resolve: Resolution,
}

/// The resolutions an operator can choose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The later change wins (docs/sync-rules.md, the three-way merge), whichever flow carries it.
    LatestWins,
    /// Only this flow (by id) writes the property; the others' values for it are ignored.
    Owner(String),
}

/// The entity types a reference property points at, on each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reference {
    /// Types the source-side id may refer to (a PowerOffice `partyId` may be a customer or a supplier).
    pub source_types: Vec<String>,
    /// The type the target-side id refers to.
    pub target_type: String,
}

/// A pair of fields whose equal values mean "the same record".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergeCriterion {
    pub source: String,
    pub target: String,
}

/// Per-flow switches an operator sets in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlowSwitches {
    /// The flow runs at all.
    pub enabled: bool,
    /// An unlinked source record creates its counterpart (else it is only linked by merge criteria).
    pub create_in_target: bool,
    /// Changes on the target side are written back to the source.
    pub write_back_to_source: bool,
    /// Zendesk ticket comments that are private (made private later, or internal notes) are
    /// synced too. Off by default: a comment an agent made private goes no further.
    pub sync_private_comments: bool,
}

impl Default for FlowSwitches {
    fn default() -> Self {
        FlowSwitches {
            enabled: true,
            create_in_target: true,
            write_back_to_source: true,
            sync_private_comments: false,
        }
    }
}

/// Which way a write goes through a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source record to target record (creation and updates).
    ToTarget,
    /// Target record back to source record (updates only).
    ToSource,
}

impl EntityRef {
    pub fn new(system: SystemId, entity_type: impl Into<String>) -> Self {
        EntityRef {
            system,
            entity_type: entity_type.into(),
        }
    }
}

impl std::fmt::Display for EntityRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.system, self.entity_type)
    }
}

impl Dataflow {
    /// The id the registry gives a flow: `poweroffice.Customers->zendesk.Organizations`.
    pub fn id_for(source: &EntityRef, target: &EntityRef) -> String {
        format!("{source}->{target}")
    }

    /// The mappings that are written in this direction (honouring the flow's write-back switch).
    pub fn mappings(&self, direction: Direction) -> impl Iterator<Item = &PropertyMapping> {
        let write_back = self.switches.write_back_to_source;
        self.properties.iter().filter(move |p| match direction {
            Direction::ToTarget => p.syncs_to_target(),
            Direction::ToSource => write_back && p.syncs_to_source(),
        })
    }

    /// Whether this entity type is either side of the flow.
    pub fn touches(&self, entity: &EntityRef) -> bool {
        &self.source == entity || &self.target == entity
    }
}

impl Registry {
    /// A flow by its id (enabled or not).
    pub fn flow(&self, id: &str) -> Option<&Dataflow> {
        self.dataflows.iter().find(|f| f.id == id)
    }

    /// Enabled flows with this entity type on either side: what a change of such a record may
    /// have to be written through.
    pub fn flows_touching<'a>(
        &'a self,
        system: SystemId,
        entity_type: &'a str,
    ) -> impl Iterator<Item = &'a Dataflow> + 'a {
        self.dataflows.iter().filter(move |f| {
            f.switches.enabled
                && ((f.source.system == system && f.source.entity_type == entity_type)
                    || (f.target.system == system && f.target.entity_type == entity_type))
        })
    }

    /// Enabled flows between the two entity types, in either direction: the flows whose links
    /// translate a reference from one to the other.
    pub fn flows_between<'a>(
        &'a self,
        a: &'a EntityRef,
        b: &'a EntityRef,
    ) -> impl Iterator<Item = &'a Dataflow> + 'a {
        self.dataflows.iter().filter(move |f| {
            f.switches.enabled
                && ((&f.source == a && &f.target == b) || (&f.source == b && &f.target == a))
        })
    }

    /// The rule for a property of an entity type, if the registry states one.
    pub fn rule(&self, entity: &EntityRef, property: &str) -> Option<&PropertyRule> {
        self.rules
            .iter()
            .find(|r| &r.entity == entity && r.property == property)
    }

    /// Whether `flow` may write the property `path` of the record on the receiving side of
    /// `direction`. False only where a rule names another flow as the property's owner.
    pub fn may_write(&self, flow: &Dataflow, direction: Direction, path: &str) -> bool {
        let entity = match direction {
            Direction::ToTarget => &flow.target,
            Direction::ToSource => &flow.source,
        };
        match self.rule(entity, path).map(|r| &r.resolve) {
            Some(Resolution::Owner(owner)) => owner == &flow.id,
            _ => true,
        }
    }

    /// Flows whose source is this entity type.
    pub fn flows_from<'a>(
        &'a self,
        system: SystemId,
        entity_type: &'a str,
    ) -> impl Iterator<Item = &'a Dataflow> + 'a {
        self.dataflows.iter().filter(move |f| {
            f.switches.enabled && f.source.system == system && f.source.entity_type == entity_type
        })
    }

    /// Flows whose target is this entity type.
    pub fn flows_to<'a>(
        &'a self,
        system: SystemId,
        entity_type: &'a str,
    ) -> impl Iterator<Item = &'a Dataflow> + 'a {
        self.dataflows.iter().filter(move |f| {
            f.switches.enabled && f.target.system == system && f.target.entity_type == entity_type
        })
    }
}
