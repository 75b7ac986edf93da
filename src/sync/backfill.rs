//! Carrying out a backfill plan's items through the engine's own path (docs/backfill.md,
//! "Running a plan"): a backfill job is an ordinary event of its source record, and for the
//! flows its plan items name, the planned match replaces the live lookup by merge criteria.
//! Everything else (references translated first, create intents, one counterpart, fan-out, the
//! merge of a linked pair) is what a live event gets.

use std::sync::Arc;

use super::create::Matching;
use super::merge::Side;
use super::{store, ActiveFlow, Fail, Step, SyncEngine};
use crate::backfill::normalize;
use crate::backfill::store::{self as plans, ItemResult, PlannedAction, PlannedItem};
use crate::connectors::{Connector, Record};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

/// A backfill job runs only the flows its items name, on the source side; a job without items
/// (live, or a backfill job's fan-out) runs every flow.
pub(super) fn restrict_to_plan<'f>(
    active: Vec<ActiveFlow<'f>>,
    planned: &[PlannedItem],
) -> Vec<ActiveFlow<'f>> {
    if planned.is_empty() {
        return active;
    }
    active
        .into_iter()
        .filter(|(f, side, _)| *side == Side::Source && planned.iter().any(|i| i.flow_id == f.id))
        .collect()
}

impl SyncEngine {
    /// The plan items of a backfill job's event (none for any other job).
    pub(super) async fn planned_items(
        &self,
        job: &ClaimedJob,
    ) -> Result<Vec<PlannedItem>, sqlx::Error> {
        if !plans::is_backfill_event(&job.event) {
            return Ok(Vec::new());
        }
        plans::items_of_event(&self.pool, job.event_id).await
    }

    /// The planned record is gone at its system: nothing is left to carry out.
    pub(super) async fn planned_record_gone(
        &self,
        planned: &[PlannedItem],
    ) -> Result<(), sqlx::Error> {
        for item in planned {
            plans::item_done(&self.pool, item.id, ItemResult::Gone).await?;
        }
        Ok(())
    }

    /// One plan item: a record linked meanwhile takes the linked path; a planned link whose
    /// match still fits (re-read now) is linked; a planned create whose record is unchanged
    /// since the plan is created; anything else is decided as for a live event.
    pub(super) async fn on_planned(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
        item: &PlannedItem,
    ) -> Result<Step, Fail> {
        let linked = store::find_link(&self.pool, flow, Side::Source, &src.id).await?;
        let (step, result) = if item.done || linked.is_some() {
            let step = self.on_record(job, flow, Side::Source, src, tconn).await?;
            (step, ItemResult::AlreadyLinked)
        } else {
            let matching = match &item.action {
                PlannedAction::Link { target_id } => self
                    .planned_match(flow, src, target_id, tconn)
                    .await?
                    .map(Matching::Planned),
                PlannedAction::Create => {
                    (src.updated_at == item.source_updated_at).then_some(Matching::PlannedNone)
                }
            };
            let result = match matching {
                Some(_) => ItemResult::Followed,
                None => ItemResult::Replanned,
            };
            let matching = matching.unwrap_or(Matching::Criteria);
            let step = self
                .create_or_link_with(job, flow, src, tconn, matching)
                .await?;
            (step, result)
        };
        if matches!(step, Step::Done) && !item.done {
            plans::item_done(&self.pool, item.id, result).await?;
        }
        Ok(step)
    }

    /// The planned target record as it is now, if it is still unlinked in this flow and still
    /// matches the source on every merge criterion (normalised as the plan compared).
    async fn planned_match(
        &self,
        flow: &Dataflow,
        src: &Record,
        target_id: &str,
        tconn: &Arc<dyn Connector>,
    ) -> Result<Option<Record>, Fail> {
        if store::find_link(&self.pool, flow, Side::Target, target_id)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let Some(found) = tconn.fetch(&flow.target.entity_type, target_id).await? else {
            return Ok(None);
        };
        let fits = !flow.merge_criteria.is_empty()
            && flow.merge_criteria.iter().all(|c| {
                let s = normalize::key(src.get_path(&c.source));
                s.is_some() && s == normalize::key(found.get_path(&c.target))
            });
        Ok(fits.then_some(found))
    }
}
