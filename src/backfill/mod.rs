//! Backfill: loading the records that existed before Tether, through a plan the operator
//! reviews first (`tether backfill plan|run|status`, docs/backfill.md).
//!
//! Owns: `backfill_plans` and `backfill_items`.
//! May call: `registry`, `connectors` (through the trait: reading both sides), `queue`
//! (enqueueing the plan's records at [`crate::queue::JobPriority::Backfill`]), `db`.
//! Called by: `cli`, `sandbox`, and `sync` (the engine reads a backfill job's planned items and
//! marks them done: [`store::items_of_event`], [`store::item_done`], [`store::items_done`]).
//!
//! - [`normalize`]: how merge-criteria values compare (pure);
//! - [`classify`]: one flow's source records against its targets and links (pure);
//! - [`plan`]: reading every record of both sides and the links, then classifying;
//! - [`estimate`]: the vendor calls and time running a plan costs at the vendors' limits;
//! - [`store`]: the SQL of plans and items, enqueueing, progress;
//! - [`report`]: the table, the JSON and the CSV `tether backfill plan` prints;
//! - [`follow`]: `tether backfill run`'s progress bar or lines.

pub mod classify;
pub mod command;
pub mod estimate;
pub mod follow;
pub mod normalize;
pub mod plan;
pub mod report;
pub mod store;

use std::collections::BTreeMap;

use serde::Serialize;

/// What the plan says about one source record of one flow.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Linked already (by this flow, or a flow between the same types the other way).
    Linked { target_id: String },
    /// Link to this existing target record, which matched `criterion`; linking writes `writes`
    /// of the source's values to it (the properties that differ).
    Link {
        target_id: String,
        criterion: String,
        writes: u32,
    },
    /// Create the counterpart.
    Create,
    /// Not linked and not created: a person must decide.
    Conflict(Conflict),
    /// Nothing will be done, and why.
    Skip(Skip),
}

/// Why a record cannot be linked safely.
#[derive(Debug, Clone, PartialEq)]
pub enum Conflict {
    /// Several target records match.
    SeveralCandidates { candidates: Vec<String> },
    /// The one match is linked to another record already.
    CandidateLinkedElsewhere {
        target_id: String,
        linked_to: String,
    },
    /// The one match is the match of several source records (never link one record to two).
    CandidateMatchedTwice { target_id: String, sources: usize },
}

/// Why nothing will be done for a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Nothing matched and the flow does not create in its target (`create_in_target = false`).
    FlowCannotCreate,
    /// Nothing matched and the target type cannot be created through its API.
    TargetCannotBeCreated,
    /// Nothing matched and no mapping gives the target a field it requires.
    RequiredFieldUnmapped { field: String },
    /// Nothing matched and the source has no value for a field the target requires.
    RequiredFieldEmpty { field: String },
}

/// The five verdicts by name: the `backfill_items.verdict` column, the JSON counts' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerdictKind {
    Linked,
    Link,
    Create,
    Conflict,
    Skip,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 5] = [
        VerdictKind::Linked,
        VerdictKind::Link,
        VerdictKind::Create,
        VerdictKind::Conflict,
        VerdictKind::Skip,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Linked => "linked",
            VerdictKind::Link => "link",
            VerdictKind::Create => "create",
            VerdictKind::Conflict => "conflict",
            VerdictKind::Skip => "skip",
        }
    }

    pub fn parse(s: &str) -> Option<VerdictKind> {
        VerdictKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether running the plan does anything for such a record.
    pub fn runs(self) -> bool {
        matches!(self, VerdictKind::Link | VerdictKind::Create)
    }
}

impl Verdict {
    pub fn kind(&self) -> VerdictKind {
        match self {
            Verdict::Linked { .. } => VerdictKind::Linked,
            Verdict::Link { .. } => VerdictKind::Link,
            Verdict::Create => VerdictKind::Create,
            Verdict::Conflict(_) => VerdictKind::Conflict,
            Verdict::Skip(_) => VerdictKind::Skip,
        }
    }

    /// The record on the target side the verdict names, if any.
    pub fn target_id(&self) -> Option<&str> {
        match self {
            Verdict::Linked { target_id }
            | Verdict::Link { target_id, .. }
            | Verdict::Conflict(Conflict::CandidateLinkedElsewhere { target_id, .. })
            | Verdict::Conflict(Conflict::CandidateMatchedTwice { target_id, .. }) => {
                Some(target_id)
            }
            Verdict::Conflict(Conflict::SeveralCandidates { candidates }) => {
                candidates.first().map(String::as_str)
            }
            Verdict::Create | Verdict::Skip(_) => None,
        }
    }

    /// A short code for the reason (the criterion for a link), stored and exported.
    pub fn reason(&self) -> Option<String> {
        Some(match self {
            Verdict::Link { criterion, .. } => criterion.clone(),
            Verdict::Conflict(Conflict::SeveralCandidates { .. }) => "several_candidates".into(),
            Verdict::Conflict(Conflict::CandidateLinkedElsewhere { .. }) => {
                "candidate_linked_elsewhere".into()
            }
            Verdict::Conflict(Conflict::CandidateMatchedTwice { .. }) => {
                "candidate_matched_twice".into()
            }
            Verdict::Skip(Skip::FlowCannotCreate) => "flow_cannot_create".into(),
            Verdict::Skip(Skip::TargetCannotBeCreated) => "target_cannot_be_created".into(),
            Verdict::Skip(Skip::RequiredFieldUnmapped { .. }) => "required_field_unmapped".into(),
            Verdict::Skip(Skip::RequiredFieldEmpty { .. }) => "required_field_empty".into(),
            Verdict::Linked { .. } | Verdict::Create => return None,
        })
    }

    /// The reason in a sentence, for the table and the CSV.
    pub fn detail(&self) -> Option<String> {
        Some(match self {
            Verdict::Link {
                criterion, writes, ..
            } => {
                format!("matched on {criterion}; {writes} value(s) to write")
            }
            Verdict::Conflict(Conflict::SeveralCandidates { candidates }) => format!(
                "{} target records match: {}",
                candidates.len(),
                candidates.join(", ")
            ),
            Verdict::Conflict(Conflict::CandidateLinkedElsewhere {
                target_id,
                linked_to,
            }) => format!("the match {target_id} is already linked to {linked_to}"),
            Verdict::Conflict(Conflict::CandidateMatchedTwice { target_id, sources }) => {
                format!("the match {target_id} is the match of {sources} source records")
            }
            Verdict::Skip(Skip::FlowCannotCreate) => {
                "nothing matched and the flow does not create in its target".into()
            }
            Verdict::Skip(Skip::TargetCannotBeCreated) => {
                "nothing matched and the target type cannot be created through its API".into()
            }
            Verdict::Skip(Skip::RequiredFieldUnmapped { field }) => {
                format!("nothing matched and no mapping gives the target its required `{field}`")
            }
            Verdict::Skip(Skip::RequiredFieldEmpty { field }) => format!(
                "nothing matched and the record has no value for the target's required `{field}`"
            ),
            Verdict::Linked { .. } | Verdict::Create => return None,
        })
    }

    /// Source values the link writes (0 for every other verdict).
    pub fn writes(&self) -> u32 {
        match self {
            Verdict::Link { writes, .. } => *writes,
            _ => 0,
        }
    }
}

/// One flow's line of a plan's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct FlowCounts {
    /// `<source>-><target>`, the flow's id.
    pub flow: String,
    pub linked: u64,
    pub link: u64,
    pub create: u64,
    pub conflict: u64,
    pub skip: u64,
    /// Values the links will write (the sum of the link items' `writes`).
    pub writes: u64,
}

impl FlowCounts {
    pub fn add(&mut self, verdict: &Verdict) {
        match verdict.kind() {
            VerdictKind::Linked => self.linked += 1,
            VerdictKind::Link => self.link += 1,
            VerdictKind::Create => self.create += 1,
            VerdictKind::Conflict => self.conflict += 1,
            VerdictKind::Skip => self.skip += 1,
        }
        self.writes += u64::from(verdict.writes());
    }
}

/// A plan's summary: exactly the JSON `tether backfill plan --json` prints (issue 17), keys in
/// this order; `records_to_run` follows as an extra key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub plan: i64,
    pub flows: Vec<FlowCounts>,
    /// Calls running the plan makes, per system (`zendesk`, `exactonline`, ...).
    pub vendor_calls: BTreeMap<String, u64>,
    /// How long running it takes: the slowest system's calls at its limit, or Tether's own time
    /// for the records (`estimate::run_seconds`), whichever is longer.
    pub estimated_seconds: u64,
    /// Source records the run enqueues (whatever the number of their flows; in pages of
    /// [`store::BATCH_RECORDS`]).
    pub records_to_run: u64,
}
