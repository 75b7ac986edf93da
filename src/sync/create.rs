//! Creation (rules 1 and 8 of `docs/sync-rules.md`): an unlinked source record is linked to the
//! counterpart an earlier attempt created, else to a record matching the merge criteria, else a
//! counterpart is created, with the intent and its idempotency key committed before the call.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::decision::Decision;
use super::mapping::{key, mapped, ref_pair, ref_part, synced};
use super::merge::{normalize, ref_id, Side};
use super::plan::Translation;
use super::store::{self, Entry, Intent, Link};
use super::{Fail, Step, SyncEngine};
use crate::connectors::{set_path, Connector, ConnectorError, Record};
use crate::domain::RecordKey;
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

/// Values to build a create with.
pub(super) struct Built {
    pub(super) fields: Map<String, Value>,
    pub(super) snapshot: Map<String, Value>,
    pub(super) pending: Vec<RecordKey>,
    pub(super) unset: Vec<String>,
}

/// The merge base of a counterpart found by the key of an intent recorded before intents kept
/// what their create sent: the counterpart's own values, and for references the pair the source
/// would give now if it still translates to the counterpart's id. (Intents recorded since keep
/// the create's values, which are the base.)
pub(super) fn base_from_found(
    flow: &Dataflow,
    built: &Map<String, Value>,
    created: &Record,
) -> Map<String, Value> {
    let mut base = Map::new();
    for p in synced(flow) {
        let k = key(p);
        if p.reference.is_none() {
            base.insert(k, normalize(created.get_path(&p.target)));
            continue;
        }
        let t = ref_id(created.get_path(&p.target));
        let pair = match built.get(&k) {
            Some(pair) if ref_part(Some(pair), Side::Target) == t => pair.clone(),
            _ => ref_pair(None, t.as_deref()),
        };
        base.insert(k, pair);
    }
    base
}

/// How an open intent found for the record is dealt with.
enum IntentCheck {
    /// No intent, or one this job may take over (with its id and key).
    Proceed(Option<(i64, Uuid)>),
    /// Another job holds it, or the earlier attempt's record was found and linked.
    Finished(Step),
}

/// How the counterpart of an unlinked source record is looked for.
pub(crate) enum Matching {
    /// By the flow's merge criteria at the target (a live event).
    Criteria,
    /// A backfill plan found none: create without asking the target again.
    PlannedNone,
    /// A backfill plan found this record (re-checked just now): link it. The merge base is the
    /// record's own values, so the source's values that differ are written to it, as the
    /// flow's direction says.
    Planned(Record),
}

impl SyncEngine {
    /// Rules 1 and 8: link or create the counterpart of an unlinked source record.
    pub(crate) async fn create_or_link(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
    ) -> Result<Step, Fail> {
        self.create_or_link_with(job, flow, src, tconn, Matching::Criteria)
            .await
    }

    /// [`SyncEngine::create_or_link`] with the match given by a backfill plan.
    pub(crate) async fn create_or_link_with(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
        matching: Matching,
    ) -> Result<Step, Fail> {
        if let Some(step) = self.linked_by_other_flow(job, flow, src).await? {
            return Ok(step);
        }
        let built = self.build_create(flow, src).await?;
        if !built.pending.is_empty() {
            return self
                .wait_for_references(job, flow, None, &built.pending)
                .await;
        }
        let intent = match self.check_intent(job, flow, src, &built, tconn).await? {
            IntentCheck::Proceed(intent) => intent,
            IntentCheck::Finished(step) => return Ok(step),
        };
        let (found, base) = match matching {
            Matching::Criteria => (self.match_by_criteria(flow, src, tconn).await?, None),
            Matching::PlannedNone => (None, None),
            Matching::Planned(found) => {
                let base = base_from_found(flow, &built.snapshot, &found);
                (Some(found), Some(base))
            }
        };
        if let Some(found) = found {
            let intent_id = intent.map(|i| i.0);
            return self
                .link_existing(
                    job,
                    flow,
                    src,
                    found,
                    intent_id,
                    base.unwrap_or_default(),
                    Decision::LinkedByMergeCriteria,
                )
                .await;
        }
        if !flow.switches.create_in_target {
            let entry = Entry {
                flow: Some(&flow.id),
                read: Some(mapped(flow, Side::Source, src)),
                detail: Some(
                    "no record matched the merge criteria and creating in the target is off".into(),
                ),
                ..Entry::new(Decision::NoMatch)
            };
            store::log(&self.pool, job, &entry).await?;
            return Ok(Step::Done);
        }
        let guarded = self.create_held_by_guard(job, flow, src, &built.fields);
        if let Some(step) = guarded.await? {
            return Ok(step);
        }
        let held = self.hold_intent(job, flow, (src, &built.snapshot), intent);
        let Some((intent_id, idem)) = held.await? else {
            return Ok(Step::Later(
                "another job recorded a create intent for this record first".into(),
            ));
        };
        self.create(job, flow, src, tconn, built, intent_id, idem)
            .await
    }

    /// Rule 1: a flow running the other way may already link this record to one of the target
    /// type ("unless a dataflow runs that way too" must not make a second counterpart).
    async fn linked_by_other_flow(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
    ) -> Result<Option<Step>, Fail> {
        let tt = &flow.target.entity_type;
        let Translation::Found(other) = self
            .translate(
                flow.source.system,
                std::slice::from_ref(&flow.source.entity_type),
                &src.id,
                flow.target.system,
                std::slice::from_ref(tt),
            )
            .await?
        else {
            return Ok(None);
        };
        let entry = Entry {
            flow: Some(&flow.id),
            detail: Some(format!(
                "already linked to {}/{tt}/{other} by another dataflow; not created again",
                flow.target.system
            )),
            ..Entry::new(Decision::LinkedByOtherFlow)
        };
        store::log(&self.pool, job, &entry).await?;
        Ok(Some(Step::Done))
    }

    /// Rule 8: an open intent of another live job makes this one wait; one of an earlier attempt
    /// is asked about at the vendor (by its idempotency key) and linked if the create happened.
    async fn check_intent(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        built: &Built,
        tconn: &Arc<dyn Connector>,
    ) -> Result<IntentCheck, Fail> {
        let Some(Intent {
            id,
            idempotency_key,
            owner_job_id,
            live,
            written,
        }) = store::pending_intent(&self.pool, flow, &src.id).await?
        else {
            return Ok(IntentCheck::Proceed(None));
        };
        if live && owner_job_id != Some(job.job_id) {
            let reason = "another job is creating this record's counterpart";
            self.log_waiting_for_create(job, flow, reason).await?;
            return Ok(IntentCheck::Finished(Step::Later(reason.into())));
        }
        let tt = &flow.target.entity_type;
        // An earlier attempt may have created the record and died before the link.
        match tconn.find_created(tt, &idempotency_key.to_string()).await {
            Ok(Some(found)) => {
                // The base is what the earlier attempt sent: a source edit made since then is a
                // source change (written), and an edit of the created record since then (an agent
                // renaming it) is a change of that side, never reverted.
                let base = match written {
                    Some(sent) => sent,
                    None => base_from_found(flow, &built.snapshot, &found),
                };
                let step = self
                    .link_existing(
                        job,
                        flow,
                        src,
                        found,
                        Some(id),
                        base,
                        Decision::LinkedAfterRetry,
                    )
                    .await?;
                Ok(IntentCheck::Finished(step))
            }
            Ok(None) | Err(ConnectorError::Unsupported { .. }) => {
                Ok(IntentCheck::Proceed(Some((id, idempotency_key))))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn log_waiting_for_create(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        let entry = Entry {
            flow: Some(&flow.id),
            detail: Some(reason.into()),
            ..Entry::new(Decision::WaitingForCreate)
        };
        store::log(&self.pool, job, &entry).await
    }

    /// An unlinked target record matching the flow's merge criteria, if the source has a value
    /// for every criterion.
    async fn match_by_criteria(
        &self,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
    ) -> Result<Option<Record>, Fail> {
        if flow.merge_criteria.is_empty() {
            return Ok(None);
        }
        let mut criteria = Map::new();
        for c in &flow.merge_criteria {
            match normalize(src.get_path(&c.source)) {
                Value::Null => return Ok(None),
                v => set_path(&mut criteria, &c.target, v),
            }
        }
        for found in tconn.find_by(&flow.target.entity_type, &criteria).await? {
            if store::find_link(&self.pool, flow, Side::Target, &found.id)
                .await?
                .is_none()
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Rule 8: the intent, with the snapshot of the values about to be sent, is committed before
    /// the vendor call; `None` (logged) when another job recorded one first.
    async fn hold_intent(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        (src, written): (&Record, &Map<String, Value>),
        intent: Option<(i64, Uuid)>,
    ) -> Result<Option<(i64, Uuid)>, Fail> {
        if let Some((id, key)) = intent {
            store::renew_intent(&self.pool, id, job.job_id, written).await?;
            return Ok(Some((id, key)));
        }
        let key = Uuid::new_v4();
        let source = (src.id.as_str(), written);
        match store::insert_intent(&self.pool, flow, source, key, job.job_id).await? {
            Some(id) => Ok(Some((id, key))),
            None => {
                let reason = "another job recorded a create intent for this record first";
                self.log_waiting_for_create(job, flow, reason).await?;
                Ok(None)
            }
        }
    }

    /// Creates the counterpart with the intent's key and stores the link.
    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tconn: &Arc<dyn Connector>,
        built: Built,
        intent_id: i64,
        idem: Uuid,
    ) -> Result<Step, Fail> {
        let tt = &flow.target.entity_type;
        let created = tconn.create(tt, &built.fields, &idem.to_string()).await?;
        let mut detail = format!("created {}/{}/{}", flow.target.system, tt, created.id);
        if !built.unset.is_empty() {
            detail.push_str(&format!(
                "; {} reference(s) left unset (no dataflow links their types): {}",
                built.unset.len(),
                built.unset.join(", ")
            ));
        }
        let entry = Entry {
            flow: Some(&flow.id),
            read: Some(mapped(flow, Side::Source, src)),
            written: Some(json!({ "target": built.fields })),
            detail: Some(detail),
            ..Entry::new(Decision::Created)
        };
        // The create's answer vouches for the target as a settled write does (docs/sync-rules.md,
        // "An echo without a read"), when it shows every synced value as sent.
        let answered = new_link(0, src, &created, built.snapshot.clone());
        let settled = super::plan::settled_by_one_read(flow, &answered, &created, Side::Target)
            == Some(Decision::Echo);
        self.store_link(
            job,
            entry,
            flow,
            (src, &created, Linked::Created { settled }),
            &built.snapshot,
            Some(intent_id),
        )
        .await?;
        Ok(Step::Done)
    }

    /// The target-side fields (references translated) and snapshot for creating a counterpart.
    pub(super) async fn build_create(
        &self,
        flow: &Dataflow,
        src: &Record,
    ) -> Result<Built, sqlx::Error> {
        let mut b = Built {
            fields: Map::new(),
            snapshot: Map::new(),
            pending: Vec::new(),
            unset: Vec::new(),
        };
        for p in synced(flow) {
            let k = key(p);
            if p.reference.is_none() {
                let v = normalize(src.get_path(&p.source));
                if !v.is_null() {
                    set_path(&mut b.fields, &p.target, v.clone());
                }
                b.snapshot.insert(k, v);
                continue;
            }
            let Some(id) = ref_id(src.get_path(&p.source)) else {
                b.snapshot.insert(k, ref_pair(None, None));
                continue;
            };
            match self.translate_prop(flow, p, Side::Source, &id).await? {
                Translation::Found(t) => {
                    set_path(&mut b.fields, &p.target, Value::String(t.clone()));
                    b.snapshot.insert(k, ref_pair(Some(&id), Some(&t)));
                }
                Translation::Pending(keys) => b.pending.extend(keys),
                Translation::Impossible => {
                    b.unset.push(p.source.clone());
                    b.snapshot.insert(k, ref_pair(Some(&id), None));
                }
            }
        }
        Ok(b)
    }

    /// Stores a new link, closes the intent, fans out and logs `entry` in one transaction; for a
    /// pair whose target has a change of its own still to merge (`unmerged`), also a job of the
    /// target record.
    #[allow(clippy::too_many_arguments)]
    async fn store_link(
        &self,
        job: &ClaimedJob,
        mut entry: Entry<'_>,
        flow: &Dataflow,
        (src, tgt, linked): (&Record, &Record, Linked),
        snapshot: &Map<String, Value>,
        intent: Option<i64>,
    ) -> Result<i64, sqlx::Error> {
        let (settled, unmerged) = match linked {
            Linked::Created { settled } => (settled, false),
            Linked::Existing { unmerged } => (false, unmerged),
        };
        let mut tx = self.pool.begin().await?;
        let new = store::NewLink {
            src,
            tgt,
            snapshot,
            settled,
        };
        let link_id = store::insert_link(&mut tx, flow, new, intent).await?;
        if let Some(k) = self.fan_out_key(flow, &flow.target, &tgt.id) {
            store::enqueue_records(&mut tx, &[k], "fan-out", None, job.priority).await?;
        }
        if unmerged {
            // With the link, so a crash right after cannot lose it (see `link_existing`).
            let target = RecordKey {
                system: flow.target.system,
                entity_type: flow.target.entity_type.clone(),
                record_id: tgt.id.clone(),
            };
            store::enqueue_records(&mut tx, &[target], "unmerged", Some(link_id), job.priority)
                .await?;
        }
        entry.link = Some(link_id);
        store::log(&mut *tx, job, &entry).await?;
        tx.commit().await?;
        Ok(link_id)
    }

    /// Links an existing target record (found by an earlier attempt's key or by merge criteria),
    /// then merges the pair from `base`.
    #[allow(clippy::too_many_arguments)]
    async fn link_existing(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        tgt: Record,
        intent: Option<i64>,
        base: Map<String, Value>,
        decision: Decision,
    ) -> Result<Step, Fail> {
        let entry = linked_entry(flow, src, &tgt, decision);
        // A target whose values differ from `base` still has its own change to merge. If the
        // merge below fails (a vendor error), the event's retry finds its source record as last
        // synced and reads no further, and the target's webhook for that change may have come
        // and gone while the pair was unlinked: a job of the target's own then merges it (found
        // by the chaos suite; docs/sync-rules.md, rule 8).
        let unmerged = super::plan::settled_by_one_read(
            flow,
            &new_link(0, src, &tgt, base.clone()),
            &tgt,
            Side::Target,
        )
        .is_none();
        let link_id = self
            .store_link(
                job,
                entry,
                flow,
                (src, &tgt, Linked::Existing { unmerged }),
                &base,
                intent,
            )
            .await?;
        let link = new_link(link_id, src, &tgt, base);
        self.sync_linked(job, flow, link, src, &tgt, Side::Source)
            .await
    }
}

/// How a new link's target came to be.
#[derive(Debug, Clone, Copy)]
enum Linked {
    /// Tether created it; `settled`: the create's answer showed every synced value as sent.
    Created { settled: bool },
    /// It existed and was linked; `unmerged`: it has a change of its own still to merge.
    Existing { unmerged: bool },
}

/// The log entry of a source record linked to an existing target record.
pub(super) fn linked_entry<'a>(
    flow: &'a Dataflow,
    src: &Record,
    tgt: &Record,
    decision: Decision,
) -> Entry<'a> {
    Entry {
        flow: Some(&flow.id),
        read: Some(json!({
            "source": mapped(flow, Side::Source, src),
            "target": mapped(flow, Side::Target, tgt),
        })),
        detail: Some(format!(
            "linked to existing {}/{}/{}",
            flow.target.system, flow.target.entity_type, tgt.id
        )),
        ..Entry::new(decision)
    }
}

/// A link just stored between `src` and the existing `tgt`, merged next from `base`.
pub(super) fn new_link(id: i64, src: &Record, tgt: &Record, base: Map<String, Value>) -> Link {
    Link {
        id,
        source_id: src.id.clone(),
        target_id: tgt.id.clone(),
        snapshot: base,
        source_seen_at: src.updated_at,
        target_seen_at: tgt.updated_at,
        last_write_side: Some(Side::Target),
        last_write_settled: false,
        version: 0,
        unsure_write: None,
    }
}
