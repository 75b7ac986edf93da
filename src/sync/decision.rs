//! What the engine decided about one event and flow: the `decision` column of `sync_log`.
//!
//! A closed set, stored as its snake_case name under the table's CHECK constraint (the latest
//! migration that sets it, `20261204050000_sync_log_private_comment.sql`), so a new decision needs both a variant here and
//! the migration's list extended; a unit test below holds the two together. What each one means
//! is described in `docs/sync-rules.md`.

use std::fmt;
use std::str::FromStr;

macro_rules! decisions {
    ($($(#[$doc:meta])* $variant:ident = $text:literal,)*) => {
        /// See the module doc.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Decision {
            $($(#[$doc])* $variant,)*
        }

        impl Decision {
            /// Every decision, in declaration order.
            pub const ALL: &'static [Decision] = &[$(Decision::$variant,)*];

            /// The name stored in `sync_log.decision`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Decision::$variant => $text,)*
                }
            }
        }
    };
}

decisions! {
    /// A counterpart was created in the target system.
    Created = "created",
    /// An existing target record was linked through the idempotency key of an earlier attempt
    /// that created it but died before storing the link.
    LinkedAfterRetry = "linked_after_retry",
    /// An existing target record was linked because it matched the flow's merge criteria.
    LinkedByMergeCriteria = "linked_by_merge_criteria",
    /// Not created: another dataflow already links this record to one of the target type.
    LinkedByOtherFlow = "linked_by_other_flow",
    /// No record matched the merge criteria and the flow does not create in its target.
    NoMatch = "no_match",
    /// An unlinked record on the flow's target side: creation only follows the flow.
    NotCreatedBack = "not_created_back",
    /// At least one property was written to one side of a linked pair.
    Updated = "updated",
    /// Both sides already held the same changed value; only the snapshot moved.
    Converged = "converged",
    /// The record shows the values Tether last wrote to it: its own write coming back.
    Echo = "echo",
    /// Nothing to write, and not an echo (a change outside the mapping, or a refused write).
    Unchanged = "unchanged",
    /// A side answered with a state older than the one last synced; retried later.
    Stale = "stale",
    /// The link changed while the event ran (another event of the pair); retried on fresh reads.
    Conflict = "conflict",
    /// A referenced record is not linked yet; it is synced first and this event waits.
    WaitingForReference = "waiting_for_reference",
    /// Another job holds this record's create intent; this one waits.
    WaitingForCreate = "waiting_for_create",
    /// The record or its counterpart is gone: the link ended, the other record stays.
    Deleted = "deleted",
    /// The record is gone and had no active links.
    NotFound = "not_found",
    /// No dataflow has the record's type on either side.
    NoDataflow = "no_dataflow",
    /// Dataflows of the record that cannot run (switched off, or a system not connected).
    Idle = "idle",
    /// A system the event needs is not configured.
    NotConnected = "not_connected",
    /// A system whose credentials were refused is left alone for a while.
    SystemStopped = "system_stopped",
    /// The dataflow is paused by an operator; the event is replayed on resume.
    Paused = "paused",
    /// The target refuses changes for good in its state (a closed Zendesk ticket): nothing
    /// written, not retried.
    TargetClosed = "target_closed",
    /// A private Zendesk comment, and the flow does not sync private comments
    /// (`sync_private_comments = false`): nothing written, the counterpart left as it was.
    PrivateComment = "private_comment",
    /// The event failed; the error column says why.
    Error = "error",
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `sync_log.decision` text that is not one of [`Decision::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sync decision")]
pub struct UnknownDecision(pub String);

impl FromStr for Decision {
    type Err = UnknownDecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decision::ALL
            .iter()
            .copied()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDecision(s.to_owned()))
    }
}

impl TryFrom<String> for Decision {
    type Error = UnknownDecision;

    fn try_from(s: String) -> Result<Self, UnknownDecision> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATION: &str =
        include_str!("../../migrations/20261204050000_sync_log_private_comment.sql");

    #[test]
    fn every_decision_round_trips_and_is_allowed_by_the_check_constraint() {
        let check = MIGRATION
            .split("CHECK (decision IN (")
            .nth(1)
            .and_then(|rest| rest.split("))").next())
            .expect("the migration has the decision CHECK");
        let allowed: Vec<&str> = check
            .split(',')
            .map(|s| s.trim().trim_matches('\''))
            .collect();
        for d in Decision::ALL {
            assert_eq!(d.as_str().parse::<Decision>(), Ok(*d));
            assert!(allowed.contains(&d.as_str()), "{d} missing in the CHECK");
        }
        assert_eq!(
            allowed.len(),
            Decision::ALL.len(),
            "the CHECK allows extra names"
        );
    }

    #[test]
    fn an_unknown_name_is_an_error() {
        assert_eq!(
            "flow_disabled".parse::<Decision>(),
            Err(UnknownDecision("flow_disabled".into()))
        );
    }
}
