//! Vocabulary shared by every layer: the six systems and the normalised change event.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The systems Tether connects. The string form is the id used in URLs, configuration and the
/// registry (docs/architecture.md, "The per-system table").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemId {
    Zendesk,
    #[serde(rename = "exactonline")]
    ExactOnline,
    #[serde(rename = "poweroffice")]
    PowerOffice,
    #[serde(rename = "crmoffice")]
    CrmOffice,
    #[serde(rename = "customerp")]
    CustomErp,
    #[serde(rename = "custompms")]
    CustomPms,
}

impl SystemId {
    pub const ALL: [SystemId; 6] = [
        SystemId::Zendesk,
        SystemId::ExactOnline,
        SystemId::PowerOffice,
        SystemId::CrmOffice,
        SystemId::CustomErp,
        SystemId::CustomPms,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SystemId::Zendesk => "zendesk",
            SystemId::ExactOnline => "exactonline",
            SystemId::PowerOffice => "poweroffice",
            SystemId::CrmOffice => "crmoffice",
            SystemId::CustomErp => "customerp",
            SystemId::CustomPms => "custompms",
        }
    }

    /// The name people use for the system, for messages and reports.
    pub fn display_name(self) -> &'static str {
        match self {
            SystemId::Zendesk => "Zendesk",
            SystemId::ExactOnline => "Exact Online",
            SystemId::PowerOffice => "PowerOffice Go",
            SystemId::CrmOffice => "CRMOffice",
            SystemId::CustomErp => "Custom ERP",
            SystemId::CustomPms => "Custom PMS",
        }
    }
}

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown system {0:?}: expected one of zendesk, exactonline, poweroffice, crmoffice, customerp, custompms")]
pub struct UnknownSystem(pub String);

impl FromStr for SystemId {
    type Err = UnknownSystem;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SystemId::ALL
            .into_iter()
            .find(|sys| sys.as_str() == s)
            .ok_or_else(|| UnknownSystem(s.to_owned()))
    }
}

/// What happened to a record, as far as a sync cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    Deleted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "created" => Ok(Action::Created),
            "updated" => Ok(Action::Updated),
            "deleted" => Ok(Action::Deleted),
            other => Err(format!("unknown action {other:?}")),
        }
    }
}

/// Identifies one record in one system: the unit of ordering (two events for the same key never
/// run at once) and of linking.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordKey {
    pub system: SystemId,
    /// Entity type as the registry names it (`Organizations`, `Accounts`, `Customer`, ...).
    pub entity_type: String,
    pub record_id: String,
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.system, self.entity_type, self.record_id)
    }
}

/// A change reported by a system (webhook or poll), normalised. Stored in the `events` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub record: RecordKey,
    pub action: Action,
    /// When the vendor says the change happened, if it says.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The vendor's delivery id (or a hash standing in for one): the deduplication key, unique per system.
    pub delivery_id: String,
}
