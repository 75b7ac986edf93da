//! The decisions of a flow that send nothing to a vendor, only a log entry (and, for a gone
//! counterpart, the link's end): a private comment held back, an unlinked target record, a
//! linked record settled by its own read, a counterpart not found.

use serde_json::json;

use super::decision::Decision;
use super::mapping::mapped;
use super::merge::Side;
use super::store::{self, Entry, Link};
use super::{Fail, Step, SyncEngine};
use crate::connectors::Record;
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

impl SyncEngine {
    /// A private comment goes no further in a flow that does not sync them (issue 16 item 12):
    /// nothing is created or written; a counterpart made while it was public stays as it was.
    pub(super) async fn private_comment(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        comment: &Record,
    ) -> Result<Step, Fail> {
        tracing::info!(
            flow = %flow.id,
            comment = %comment.id,
            "a private Zendesk comment is not synced onwards (sync_private_comments = false)"
        );
        let entry = Entry {
            flow: Some(&flow.id),
            detail: Some(
                "the comment is private in Zendesk and this flow does not sync private comments \
                 (`sync_private_comments = false`): nothing written"
                    .into(),
            ),
            ..Entry::new(Decision::PrivateComment)
        };
        self.log(job, entry).await?;
        Ok(Step::Done)
    }

    pub(super) async fn not_created_back(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        tgt: &Record,
    ) -> Result<Step, Fail> {
        let entry = Entry {
            flow: Some(&flow.id),
            read: Some(mapped(flow, Side::Target, tgt)),
            detail: Some(
                "unlinked record on the flow's target side: creation only follows the flow's \
                 direction"
                    .into(),
            ),
            ..Entry::new(Decision::NotCreatedBack)
        };
        self.log(job, entry).await?;
        Ok(Step::Done)
    }

    /// Logs the event of a linked record settled by its own read: an echo of Tether's own write
    /// when Tether last wrote this side, otherwise a change outside the mapping.
    pub(super) async fn nothing_to_send(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        record: &Record,
        side: Side,
        decision: Decision,
    ) -> Result<Step, Fail> {
        let entry = Entry {
            flow: Some(&flow.id),
            link: Some(link.id),
            read: Some(json!({ side.as_str(): mapped(flow, side, record) })),
            detail: Some(
                "every mapped value is as last synced; the other side was not read".into(),
            ),
            ..Entry::new(decision)
        };
        self.log(job, entry).await?;
        Ok(Step::Done)
    }

    pub(super) async fn counterpart_gone(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        gone: Side,
    ) -> Result<Step, Fail> {
        let reason = format!("{} record deleted", gone.as_str());
        store::end_link(&self.pool, link.id, &reason).await?;
        let entry = Entry {
            flow: Some(&flow.id),
            link: Some(link.id),
            detail: Some(format!(
                "the counterpart was not found: link ended ({reason}), this record kept"
            )),
            ..Entry::new(Decision::Deleted)
        };
        self.log(job, entry).await?;
        Ok(Step::Done)
    }
}
