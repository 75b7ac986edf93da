//! Carrying out a backfill plan's items through the engine's own path (docs/backfill.md,
//! "Running a plan"): a backfill job is a page of the plan's source records, and for the flows
//! its plan items name, the planned match replaces the live lookup by merge criteria.
//! Everything else (references translated first, create intents, one counterpart, fan-out, the
//! merge of a linked pair) is what a live event gets.
//!
//! A page reads its records at once (rule 7: as they are now) and looks their links and intents
//! up in one statement each. A planned create of a record unchanged since the plan, not linked,
//! without an open intent and without references to translate needs nothing but the vendor
//! call: such creates go a chunk at a time (their intents committed in one statement before
//! the calls, the calls concurrently, then their links, intents, log entries, fan-out and items
//! in one transaction). Every other item takes the engine's full path, one record at a time, as
//! the record's own event would.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use super::create::{base_from_found, linked_entry, new_link, Built, Matching};
use super::mapping::{mapped, synced};
use super::merge::Side;
use super::page_store::{self, CreatedLink, PlannedLink};
use super::plan::settled_by_one_read;
use super::store::Entry;
use super::{store, ActiveFlow, Decision, Fail, Gone, Step, SyncEngine};
use crate::backfill::normalize;
use crate::backfill::store::{self as plans, ItemResult, PlannedAction, PlannedItem};
use crate::connectors::{Connector, ConnectorError, Record};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

/// Creates sent together: their intents in one statement, the calls at once, their links in one
/// transaction. Small, so that a counterpart's link follows its create closely (the target's
/// webhook for it then finds the link) and a page's progress shows in steps.
const CREATE_CHUNK: usize = 10;

/// Planned links stored together (one statement for the links, one for their log entries):
/// a page's, at most [`crate::backfill::store::BATCH_RECORDS`].
const LINK_CHUNK: usize = 50;

/// The page's job as the event of one of its records: log entries, intents and fan-out name the
/// record, as its own event would.
fn job_of(job: &ClaimedJob, record_id: &str) -> ClaimedJob {
    let mut one = job.clone();
    one.event.record.record_id = record_id.to_owned();
    one
}

/// Whether a planned item is a create that needs nothing but the vendor call: the record is
/// unchanged since the plan, and the flow creates and translates no reference. (Links, open
/// intents and other flows' links are looked up for the whole page.)
fn plain_create(flow: &Dataflow, item: &PlannedItem, src: &Record) -> bool {
    item.action == PlannedAction::Create
        && src.updated_at == item.source_updated_at
        && flow.switches.create_in_target
        && synced(flow).all(|p| p.reference.is_none())
}

/// One flow's page of plain creates: what was built for each and the key of its intent.
type Plain<'a> = (&'a PlannedItem, &'a Record, Built, Uuid);

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
        Ok(still_matches(flow, src, &found).then_some(found))
    }
}

/// Whether the target record still matches the source on every merge criterion (normalised as
/// the plan compared).
fn still_matches(flow: &Dataflow, src: &Record, found: &Record) -> bool {
    !flow.merge_criteria.is_empty()
        && flow.merge_criteria.iter().all(|c| {
            let s = normalize::key(src.get_path(&c.source));
            s.is_some() && s == normalize::key(found.get_path(&c.target))
        })
}

/// The target record a planned link names.
fn planned_target(item: &PlannedItem) -> Option<&str> {
    match &item.action {
        PlannedAction::Link { target_id } => Some(target_id),
        PlannedAction::Create => None,
    }
}

impl SyncEngine {
    /// A backfill page: its records read now, the plain creates and links in chunks, every other
    /// item through [`SyncEngine::on_planned`]. Items carried out before (an earlier run of the
    /// page) are skipped. A failing item does not stop the others unless the vendor asks to slow
    /// down; the first failure is the page's (it runs again for what is left).
    pub(super) async fn run_page(
        &self,
        job: &ClaimedJob,
        conn: &Arc<dyn Connector>,
        active: Vec<ActiveFlow<'_>>,
        planned: &[PlannedItem],
    ) -> Result<Option<String>, Fail> {
        let rec = &job.event.record;
        let open: Vec<&PlannedItem> = planned.iter().filter(|i| !i.done).collect();
        let mut ids: Vec<String> = Vec::new();
        for item in &open {
            if !ids.contains(&item.source_id) {
                ids.push(item.source_id.clone());
            }
        }
        let records = read_page(conn, &rec.entity_type, &ids).await?;
        self.page_records_gone(job, &open, &ids, &records).await?;
        let linked =
            page_store::linked_among(&self.pool, (rec.system, &rec.entity_type), &ids).await?;
        let mut page = PageOutcome::default();
        for (flow, _, tconn) in active {
            let items: Vec<(&PlannedItem, &Record)> = open
                .iter()
                .filter(|i| i.flow_id == flow.id)
                .filter_map(|i| records.get(&i.source_id).map(|r| (*i, r)))
                .collect();
            self.run_flow_items(job, flow, tconn, items, &linked, &mut page)
                .await?;
        }
        match page.failure {
            Some(e) => Err(e),
            None => Ok((!page.later.is_empty()).then(|| page.later.join("; "))),
        }
    }

    /// The page's records gone from their system: logged as a live event's would be, and their
    /// items carried out (`gone`).
    async fn page_records_gone(
        &self,
        job: &ClaimedJob,
        open: &[&PlannedItem],
        ids: &[String],
        records: &HashMap<String, Record>,
    ) -> Result<(), Fail> {
        for id in ids.iter().filter(|id| !records.contains_key(*id)) {
            self.record_deleted(&job_of(job, id), Gone::NotFound)
                .await?;
            for item in open.iter().filter(|i| &i.source_id == id) {
                plans::item_done(&self.pool, item.id, ItemResult::Gone).await?;
            }
        }
        Ok(())
    }

    /// One flow's items of a page: plain creates and plain links (the record not linked in any
    /// flow, no open create intent, no reference to translate) in chunks, the rest one at a time.
    async fn run_flow_items<'a>(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        tconn: &Arc<dyn Connector>,
        items: Vec<(&'a PlannedItem, &'a Record)>,
        linked: &HashSet<String>,
        page: &mut PageOutcome,
    ) -> Result<(), Fail> {
        let flow_ids: Vec<String> = items.iter().map(|(i, _)| i.source_id.clone()).collect();
        let intents = page_store::intents_among(&self.pool, flow, &flow_ids).await?;
        let free =
            |i: &PlannedItem| !linked.contains(&i.source_id) && !intents.contains(&i.source_id);
        let plain = synced(flow).all(|p| p.reference.is_none());
        let (creates, rest): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(i, src)| plain_create(flow, i, src) && free(i));
        let (links, mut full): (Vec<_>, Vec<_>) = rest
            .into_iter()
            .partition(|(i, _)| plain && planned_target(i).is_some() && free(i));
        for chunk in creates.chunks(CREATE_CHUNK) {
            let outcome = self.create_chunk(job, flow, tconn, chunk).await?;
            page.absorb(outcome, &mut full)?;
        }
        for chunk in links.chunks(LINK_CHUNK) {
            let outcome = self.link_chunk(job, flow, tconn, chunk).await?;
            page.absorb(outcome, &mut full)?;
        }
        for (item, src) in full {
            let one = job_of(job, &item.source_id);
            match self.on_planned(&one, flow, src, tconn, item).await {
                Ok(Step::Done) => {}
                Ok(Step::Later(reason)) => page
                    .later
                    .push(format!("{} {}: {reason}", flow.id, item.source_id)),
                Err(e) => keep_first(&mut page.failure, e)?,
            }
        }
        Ok(())
    }

    /// One chunk of plain links of `flow`: the planned target records re-read at once; those
    /// still matching are linked in one transaction (the links' unique indexes decide: a link
    /// whose source or target was linked meanwhile is not stored) and then merged one by one as
    /// the full path does (the source's differing values written as the flow's direction says),
    /// their items marked in one statement. The rest (gone, no longer matching, linked
    /// meanwhile) are handed back for the full path, which checks them again.
    async fn link_chunk<'a>(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        tconn: &Arc<dyn Connector>,
        chunk: &[(&'a PlannedItem, &'a Record)],
    ) -> Result<ChunkOutcome<'a>, Fail> {
        let mut out = ChunkOutcome::default();
        let target_ids: Vec<String> = chunk
            .iter()
            .filter_map(|(i, _)| planned_target(i).map(str::to_owned))
            .collect();
        let found = read_page(tconn, &flow.target.entity_type, &target_ids).await?;
        let mut links = Vec::with_capacity(chunk.len());
        let mut items = Vec::with_capacity(chunk.len());
        for &(item, src) in chunk {
            let fits = planned_target(item)
                .and_then(|t| found.get(t))
                .filter(|t| still_matches(flow, src, t));
            let Some(target) = fits else {
                out.full.push((item, src));
                continue;
            };
            let built = self.build_create(flow, src).await?;
            links.push(PlannedLink {
                job: job_of(job, &item.source_id),
                src,
                base: base_from_found(flow, &built.snapshot, target),
                entry: linked_entry(flow, src, target, Decision::LinkedByMergeCriteria),
                target: target.clone(),
            });
            items.push((item, src));
        }
        let stored = self.store_planned_links(job, flow, &links).await?;
        let mut done = Vec::new();
        for (link, (item, src)) in links.into_iter().zip(items) {
            let Some(&id) = stored.get(&src.id) else {
                out.full.push((item, src));
                continue;
            };
            let pair = new_link(id, link.src, &link.target, link.base);
            let step =
                self.sync_linked(&link.job, flow, pair, link.src, &link.target, Side::Source);
            match step.await {
                Ok(Step::Done) => done.push((item.id, ItemResult::Followed)),
                Ok(Step::Later(reason)) => out
                    .later
                    .push(format!("{} {}: {reason}", flow.id, item.source_id)),
                // Linked, not yet merged: the page's next run takes the linked path for it.
                Err(e) => {
                    let stop = back_pressure(&e);
                    if out.failure.is_none() || stop {
                        out.failure = Some(e);
                    }
                    if stop {
                        break;
                    }
                }
            }
        }
        if !done.is_empty() {
            plans::items_done(&mut *self.pool.acquire().await?, &done).await?;
        }
        Ok(out)
    }

    /// The planned links, their log entries and fan-out in one transaction; returns the link of
    /// each source record whose link was stored (see [`page_store::insert_planned_links`]).
    async fn store_planned_links(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        links: &[PlannedLink<'_>],
    ) -> Result<HashMap<String, i64>, sqlx::Error> {
        if links.is_empty() {
            return Ok(HashMap::new());
        }
        let mut tx = self.pool.begin().await?;
        let stored = page_store::insert_planned_links(&mut tx, flow, links).await?;
        let fan_out: Vec<_> = links
            .iter()
            .filter(|l| stored.contains_key(&l.src.id))
            .filter_map(|l| self.fan_out_key(flow, &flow.target, &l.target.id))
            .collect();
        store::enqueue_records(&mut tx, &fan_out, "fan-out", None, job.priority).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// One chunk of plain creates of `flow` (see the module doc). Records whose intent another
    /// job recorded first, or whose create the guard holds, are handed back for the full path.
    async fn create_chunk<'a>(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        tconn: &Arc<dyn Connector>,
        chunk: &[(&'a PlannedItem, &'a Record)],
    ) -> Result<ChunkOutcome<'a>, Fail> {
        let mut out = ChunkOutcome::default();
        let mut plain: Vec<Plain<'a>> = Vec::with_capacity(chunk.len());
        for &(item, src) in chunk {
            let built = self.build_create(flow, src).await?;
            let one = job_of(job, &item.source_id);
            // Backfill work is admitted without counting (docs/guard.md); a held create is
            // logged, as the full path would.
            if let Some(Step::Done) = self
                .create_held_by_guard(&one, flow, src, &built.fields)
                .await?
            {
                plans::item_done(&self.pool, item.id, ItemResult::Followed).await?;
                continue;
            }
            plain.push((item, src, built, Uuid::new_v4()));
        }
        let rows: Vec<_> = plain
            .iter()
            .map(|(i, _, b, key)| (i.source_id.as_str(), *key, &b.snapshot))
            .collect();
        let intents = page_store::insert_intents(&self.pool, flow, &rows, job.job_id).await?;
        let (mine, taken): (Vec<_>, Vec<_>) = plain
            .into_iter()
            .partition(|(i, ..)| intents.contains_key(&i.source_id));
        out.full
            .extend(taken.into_iter().map(|(i, src, ..)| (i, src)));
        let tt = &flow.target.entity_type;
        let keys: Vec<String> = mine.iter().map(|p| p.3.to_string()).collect();
        let answers = futures::future::join_all(
            mine.iter()
                .zip(&keys)
                .map(|((_, _, b, _), key)| tconn.create(tt, &b.fields, key)),
        )
        .await;
        let mut made = Vec::new();
        let mut done = Vec::new();
        for ((item, src, built, _), answer) in mine.into_iter().zip(answers) {
            let created = match answer {
                Ok(created) => created,
                // The intent stays: the page's next run asks the vendor by its key (rule 8).
                // The others' links are stored first, whatever the failure.
                Err(e) => {
                    let back_pressure = e.is_back_pressure();
                    if out.failure.is_none() || back_pressure {
                        out.failure = Some(e.into());
                    }
                    continue;
                }
            };
            done.push((item.id, ItemResult::Followed));
            made.push(self.created_link(job, flow, item, src, built, created, &intents));
        }
        let mut tx = self.pool.begin().await?;
        page_store::insert_created_links(&mut tx, flow, &made).await?;
        let fan_out: Vec<_> = made
            .iter()
            .filter_map(|m| self.fan_out_key(flow, &flow.target, &m.created.id))
            .collect();
        store::enqueue_records(&mut tx, &fan_out, "fan-out", None, job.priority).await?;
        plans::items_done(&mut tx, &done).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The link and log entry of one counterpart created for a page (as `create` records it).
    #[allow(clippy::too_many_arguments)]
    fn created_link<'a>(
        &self,
        job: &ClaimedJob,
        flow: &'a Dataflow,
        item: &PlannedItem,
        src: &'a Record,
        built: Built,
        created: Record,
        intents: &HashMap<String, i64>,
    ) -> CreatedLink<'a> {
        let tt = &flow.target.entity_type;
        let entry = Entry {
            flow: Some(&flow.id),
            read: Some(mapped(flow, Side::Source, src)),
            written: Some(json!({ "target": built.fields })),
            detail: Some(format!(
                "created {}/{}/{}",
                flow.target.system, tt, created.id
            )),
            ..Entry::new(Decision::Created)
        };
        CreatedLink {
            job: job_of(job, &item.source_id),
            settled: create_settled(flow, src, &built.snapshot, &created),
            src,
            created,
            snapshot: built.snapshot,
            intent: intents[&item.source_id],
            entry,
        }
    }
}

/// Whether a create's answer settles it as a write would be (docs/sync-rules.md, "An echo
/// without a read"): it carries its change stamp and shows every synced value as the snapshot
/// has it, so reading the created record would find exactly that. The target's webhook of the
/// creation, carrying that stamp, is then its echo with no read.
fn create_settled(
    flow: &Dataflow,
    src: &Record,
    snapshot: &serde_json::Map<String, serde_json::Value>,
    created: &Record,
) -> bool {
    let after = new_link(0, src, created, snapshot.clone());
    created.updated_at.is_some()
        && settled_by_one_read(flow, &after, created, Side::Target) == Some(Decision::Echo)
}

/// What a chunk of plain creates or links left: records for the full path, records to run
/// again later, and the first failure.
#[derive(Default)]
struct ChunkOutcome<'a> {
    full: Vec<(&'a PlannedItem, &'a Record)>,
    later: Vec<String>,
    failure: Option<Fail>,
}

/// What a page's items left: why some run again later, and the first failure.
#[derive(Default)]
struct PageOutcome {
    later: Vec<String>,
    failure: Option<Fail>,
}

impl PageOutcome {
    /// Takes in a chunk's outcome, its records for the full path into `full`.
    fn absorb<'a>(
        &mut self,
        chunk: ChunkOutcome<'a>,
        full: &mut Vec<(&'a PlannedItem, &'a Record)>,
    ) -> Result<(), Fail> {
        full.extend(chunk.full);
        self.later.extend(chunk.later);
        match chunk.failure {
            Some(e) => keep_first(&mut self.failure, e),
            None => Ok(()),
        }
    }
}

/// A vendor asking to slow down.
fn back_pressure(e: &Fail) -> bool {
    matches!(e, Fail::Connector(c) if c.is_back_pressure())
}

/// Keeps the first failure of a page; a vendor asking to slow down ends the page at once (it
/// runs again after the delay the vendor asked for, with what is left).
fn keep_first(first: &mut Option<Fail>, e: Fail) -> Result<(), Fail> {
    if back_pressure(&e) {
        return Err(e);
    }
    first.get_or_insert(e);
    Ok(())
}

/// The page's records as they are now, by id (a record gone from its system is absent): one
/// [`Connector::fetch_many`] (Zendesk reads up to 100 organizations or users a call).
async fn read_page(
    conn: &Arc<dyn Connector>,
    entity_type: &str,
    ids: &[String],
) -> Result<HashMap<String, Record>, ConnectorError> {
    let found = conn.fetch_many(entity_type, ids).await?;
    Ok(found.into_iter().map(|r| (r.id.clone(), r)).collect())
}
