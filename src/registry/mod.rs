//! The mapping registry: which dataflows exist and how their properties map. Pure data and logic,
//! no I/O beyond reading its own files.
//!
//! Owns: the shipped dataflow files (one per seed document), the operator's overlay, validation
//! against the connectors' declarations (`connectors::schema`), and the JSON export.
//! Called by: `sync`, `cli`, `sandbox`.

use serde::Serialize;

use crate::domain::SystemId;

/// The effective registry: shipped dataflows with the overlay applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Registry {
    pub dataflows: Vec<Dataflow>,
}

/// One side of a dataflow: an entity type of a system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
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
}

impl Default for FlowSwitches {
    fn default() -> Self {
        FlowSwitches {
            enabled: true,
            create_in_target: true,
            write_back_to_source: true,
        }
    }
}

impl Registry {
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
