//! Performing a [`Plan`] for a linked pair: the vendor writes, then the link's new state and the
//! decision in one statement, then the records the writes concern elsewhere (fan-out).

use serde_json::{json, Map, Value};

use super::decision::Decision;
use super::mapping::{entity, mapped};
use super::merge::Side;
use super::plan::{idx, plan, settle, settled_by_one_read, Plan, PlanInput, Planned, Translations};
use super::store::{self, Entry, Link, LinkState};
use super::{Fail, Step, SyncEngine};
use crate::connectors::{ConditionalWrites, ConnectorError, Record};
use crate::domain::RecordKey;
use crate::queue::ClaimedJob;
use crate::registry::{Dataflow, EntityRef};

/// What the writes of a plan did.
struct Written {
    /// Per side: the write happened.
    sides: [bool; 2],
    /// The fields written, per side name, for the log.
    fields: Map<String, Value>,
    /// The change stamps after the writes (source, target).
    seen: [Option<chrono::DateTime<chrono::Utc>>; 2],
    last_write: Option<Side>,
    /// What each side's write answered (the record as stored).
    stored: [Option<Record>; 2],
    fan_out: Vec<RecordKey>,
    /// Sides that could not be written.
    notes: Vec<String>,
    /// The written records' marks, dropped once the link's new state is stored or refused
    /// (`super::storing`): [`Written`] lives to the end of [`SyncEngine::apply`].
    _storing: Vec<super::storing::Storing>,
}

impl Written {
    /// Nothing written yet; the stamps are those the plan was made from.
    fn before([src, tgt]: [&Record; 2]) -> Written {
        Written {
            sides: [false; 2],
            fields: Map::new(),
            seen: [src.updated_at, tgt.updated_at],
            last_write: None,
            stored: [None, None],
            fan_out: Vec::new(),
            notes: Vec::new(),
            _storing: Vec::new(),
        }
    }

    /// Side `to` took `changes` and answered with `stored`.
    fn took(&mut self, to: Side, changes: &Map<String, Value>, stored: Record) {
        let i = idx(to);
        self.seen[i] = stored.updated_at;
        self.fields
            .insert(to.as_str().into(), Value::Object(changes.clone()));
        self.sides[i] = true;
        self.last_write = Some(to);
        self.stored[i] = Some(stored);
    }
}

impl SyncEngine {
    /// Rules 2-5 for a linked pair: plan (looking up the translations the planner asks for),
    /// then apply.
    pub(crate) async fn sync_linked(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: Link,
        src: &Record,
        tgt: &Record,
        event_side: Side,
    ) -> Result<Step, Fail> {
        let mut link = link;
        super::unsure::take_in(&mut link, [src, tgt]);
        let plan = self
            .plan_linked(flow, &link, [src, tgt], event_side)
            .await?;
        self.apply(job, flow, &link, src, tgt, plan).await
    }

    /// [`SyncEngine::sync_linked`] with the counterpart on side `unread` not read but as Tether's
    /// settled write left it (`super::unread`). Its write names the stamp it was planned from;
    /// [`Fail::UnreadChanged`] if the record changed since (nothing was written then).
    pub(crate) async fn sync_linked_unread(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        [src, tgt]: [&Record; 2],
        event_side: Side,
        unread: Side,
    ) -> Result<Step, Fail> {
        let mut plan = self.plan_linked(flow, link, [src, tgt], event_side).await?;
        plan.unread = Some(unread);
        self.apply(job, flow, link, src, tgt, plan).await
    }

    /// The planner's plan for the pair, with every translation it asks for looked up.
    async fn plan_linked(
        &self,
        flow: &Dataflow,
        link: &Link,
        [src, tgt]: [&Record; 2],
        event_side: Side,
    ) -> Result<Plan, Fail> {
        let mut translations = Translations::new();
        loop {
            let input = PlanInput {
                registry: &self.registry,
                flow,
                link,
                source: src,
                target: tgt,
                event_side,
                translations: &translations,
            };
            match plan(&input) {
                Planned::Ready(plan) => return Ok(plan),
                Planned::NeedTranslations(lookups) => {
                    self.look_up(flow, lookups, &mut translations).await?
                }
            }
        }
    }

    /// Performs a plan: waits for references, or writes each side's changes and stores the
    /// link's new state with the decision.
    async fn apply(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        src: &Record,
        tgt: &Record,
        plan: Plan,
    ) -> Result<Step, Fail> {
        let mut read = json!({
            "source": mapped(flow, Side::Source, src),
            "target": mapped(flow, Side::Target, tgt),
        });
        if let Some(side) = plan.unread {
            // The log says which side was the snapshot rather than a read.
            read["unread"] = Value::from(side.as_str());
        }
        match plan.decision() {
            Decision::Stale => {
                let reason = plan.notes.join("; ");
                let entry = Entry {
                    flow: Some(&flow.id),
                    link: Some(link.id),
                    read: Some(read),
                    detail: Some(reason.clone()),
                    ..Entry::new(Decision::Stale)
                };
                self.log(job, entry).await?;
                return Ok(Step::Later(reason));
            }
            Decision::WaitingForReference => {
                return self
                    .wait_for_references(job, flow, Some(link.id), &plan.pending)
                    .await;
            }
            _ => {}
        }
        let guarded = self.held_by_guard(job, flow, link, &plan, [src, tgt], &read);
        if let Some(step) = guarded.await? {
            return Ok(step);
        }
        let written = self.write(flow, link, &plan, [src, tgt]).await?;
        let mut notes = plan.notes.clone();
        notes.extend(written.notes.iter().cloned());
        let decision = settle(
            !written.fields.is_empty(),
            plan.converged,
            !notes.is_empty(),
            plan.echo,
        );
        let entry = Entry {
            flow: Some(&flow.id),
            link: Some(link.id),
            read: Some(read),
            written: (!written.fields.is_empty()).then(|| Value::Object(written.fields.clone())),
            detail: (!notes.is_empty()).then(|| notes.join("; ")),
            ..Entry::new(decision)
        };
        let mut state = LinkState {
            snapshot: plan.snapshot_after(written.sides),
            seen: written.seen,
            last_write: written.last_write,
            last_write_settled: false,
        };
        state.last_write_settled = write_settled(flow, link, &state, &written.stored);
        self.store_linked(job, entry, link, state, &written.fan_out)
            .await
    }

    /// One update call per side with only the changed properties; the side planned unread
    /// first, so that its refusal comes before anything was written. A system that writes
    /// conditionally is written on the stamp the plan read (or assumed) it at.
    async fn write(
        &self,
        flow: &Dataflow,
        link: &Link,
        plan: &Plan,
        records: [&Record; 2],
    ) -> Result<Written, Fail> {
        let mut w = Written::before(records);
        let order = match plan.unread {
            Some(Side::Source) => [Side::Source, Side::Target],
            _ => [Side::Target, Side::Source],
        };
        for to in order {
            let i = idx(to);
            if plan.changes[i].is_empty() {
                continue;
            }
            let e = entity(flow, to);
            let Some(conn) = self.connector(e.system) else {
                continue;
            };
            let id = link.id_on(to);
            // Dropped on a failed write; kept in `w` to the end of the store otherwise.
            let mark = self.storing.mark(RecordKey {
                system: e.system,
                entity_type: e.entity_type.clone(),
                record_id: id.to_owned(),
            });
            let changes = &plan.changes[i];
            let answer = match records[i]
                .updated_at
                .filter(|_| conn.conditional_writes(&e.entity_type) != ConditionalWrites::No)
            {
                Some(seen) => conn.update_if_unchanged(&e.entity_type, id, changes, seen),
                None => conn.update(&e.entity_type, id, changes),
            };
            match answer.await {
                Ok(stored) => {
                    mark.answered();
                    w._storing.push(mark);
                    w.fan_out.extend(self.fan_out_key(flow, e, id));
                    w.took(to, changes, stored);
                }
                Err(ConnectorError::Changed { .. }) if plan.unread == Some(to) => {
                    return Err(Fail::UnreadChanged)
                }
                Err(ConnectorError::Unsupported { .. }) => w.notes.push(format!(
                    "the {} side ({}/{}) cannot be written: skipped",
                    to.as_str(),
                    e.system,
                    e.entity_type
                )),
                Err(err) => {
                    self.remember_if_unsure(link, plan, &w, to, &err).await?;
                    return Err(err.into());
                }
            }
        }
        Ok(w)
    }

    /// A write that failed in a way the vendor may still have made the change (a timeout, a
    /// transient failure) is remembered on the link: the next sync looks (`super::unsure`).
    async fn remember_if_unsure(
        &self,
        link: &Link,
        plan: &Plan,
        w: &Written,
        to: Side,
        err: &ConnectorError,
    ) -> Result<(), Fail> {
        if !matches!(
            err,
            ConnectorError::Timeout { .. } | ConnectorError::Transient { .. }
        ) {
            return Ok(());
        }
        let mut written = w.sides;
        written[idx(to)] = true;
        let write = super::unsure::UnsureWrite {
            side: to,
            fields: plan.changes[idx(to)].clone(),
            snapshot: plan.snapshot_after(written),
        };
        super::unsure::remember(&self.pool, link.id, &write).await?;
        Ok(())
    }

    /// Stores the link's new state with its log entry (with the fan-out's jobs in the same
    /// transaction), or only the entry when nothing about the link moved. A link that changed
    /// meanwhile makes the event wait and read both sides again.
    async fn store_linked(
        &self,
        job: &ClaimedJob,
        entry: Entry<'_>,
        link: &Link,
        state: LinkState,
        fan_out: &[RecordKey],
    ) -> Result<Step, Fail> {
        let changed_snapshot = state.snapshot != link.snapshot;
        let seen_moved = state.seen != [link.source_seen_at, link.target_seen_at];
        // A remembered unsure write is cleared by storing, even when nothing else moved.
        let unsure = link.unsure_write.is_some();
        if !(changed_snapshot || seen_moved || unsure || entry.written.is_some()) {
            self.log(job, entry).await?;
            return Ok(Step::Done);
        }
        // The event's `idle` entry, if waiting, is written by the same statement (`beside`).
        let idle = super::beside::take();
        let entries = (&entry, idle.as_ref());
        // The fan-out's jobs must commit with the link; without them the statement is batched
        // with other workers' (`combine`): one implicit transaction per batch, each row's own
        // version check.
        let stored = if fan_out.is_empty() {
            self.batches
                .store_sync(&self.pool, job, entries, link, state)
                .await?
        } else {
            let mut tx = self.pool.begin().await?;
            let stored = store::store_sync(&mut *tx, job, entries, link, state).await?;
            if stored {
                store::enqueue_records(&mut tx, fan_out, "fan-out", None, job.priority).await?;
                tx.commit().await?;
            }
            stored
        };
        if stored {
            return Ok(Step::Done);
        }
        if let Some(idle) = idle {
            super::beside::put_back(idle);
        }
        let reason =
            "the link changed while this event was processed; re-reading both sides".to_owned();
        let entry = Entry {
            detail: Some(reason.clone()),
            ..Entry {
                decision: Decision::Conflict,
                ..entry
            }
        };
        self.log(job, entry).await?;
        Ok(Step::Later(reason))
    }

    /// The record of `e` written by `flow` takes part in other flows: it is processed next.
    pub(crate) fn fan_out_key(
        &self,
        flow: &Dataflow,
        e: &EntityRef,
        id: &str,
    ) -> Option<RecordKey> {
        let other_flows =
            self.registry.dataflows.iter().any(|f| {
                f.id != flow.id && f.switches.enabled && (&f.source == e || &f.target == e)
            });
        other_flows.then(|| RecordKey {
            system: e.system,
            entity_type: e.entity_type.clone(),
            record_id: id.to_owned(),
        })
    }

    /// Rule 5: the referenced records are enqueued (once per event) and this event waits.
    pub(crate) async fn wait_for_references(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: Option<i64>,
        pending: &[RecordKey],
    ) -> Result<Step, Fail> {
        let mut tx = self.pool.begin().await?;
        store::enqueue_records(
            &mut tx,
            pending,
            "reference",
            Some(job.event_id),
            job.priority,
        )
        .await?;
        tx.commit().await?;
        let names: Vec<String> = pending.iter().map(ToString::to_string).collect();
        let detail = format!(
            "referenced record not linked yet; syncing it first: {}",
            names.join(", ")
        );
        let entry = Entry {
            flow: Some(&flow.id),
            link,
            detail: Some(detail.clone()),
            ..Entry::new(Decision::WaitingForReference)
        };
        self.log(job, entry).await?;
        Ok(Step::Later(detail))
    }
}

/// Whether the side written last answered its write with every synced property as the new
/// snapshot has it: exactly what reading it at that answer's stamp would conclude (`echo`), so
/// a delivery carrying that stamp needs no read (docs/sync-rules.md, "An echo without a read").
fn write_settled(
    flow: &Dataflow,
    link: &Link,
    state: &LinkState,
    stored: &[Option<Record>; 2],
) -> bool {
    let Some(side) = state.last_write else {
        return false;
    };
    let Some(answer) = &stored[idx(side)] else {
        return false;
    };
    // A vendor that answers a write without its change stamp gives nothing to recognise.
    if answer.updated_at.is_none() || answer.updated_at != state.seen[idx(side)] {
        return false;
    }
    let after = Link {
        snapshot: state.snapshot.clone(),
        source_seen_at: state.seen[0],
        target_seen_at: state.seen[1],
        last_write_side: Some(side),
        ..link.clone()
    };
    settled_by_one_read(flow, &after, answer, side) == Some(Decision::Echo)
}
