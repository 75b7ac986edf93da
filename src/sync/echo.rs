//! An echo recognised without a read (docs/sync-rules.md, "An echo without a read"): a custom
//! system's webhook may carry the record's `updated_at` (README, "The custom-system contract").
//! When that stamp is the one Tether's own last write of this side answered with, and that answer
//! showed every synced property as the link's snapshot has it, reading the record would find
//! exactly that answer and log `echo`; the event is logged so without the read.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::beside::Idle;
use super::decision::Decision;
use super::mapping::entity;
use super::merge::Side;
use super::store::{self, Entry};
use super::storing::StoringWrites;
use super::{ActiveFlow, SyncEngine};
use crate::domain::{Action, ChangeEvent, SystemId};
use crate::queue::ClaimedJob;
use crate::registry::{Dataflow, Registry};

impl SyncEngine {
    /// Logs the event as the echo of every running flow (and the `idle` entry of the flows that
    /// cannot run) and answers true, if the delivery's stamp settles each of them (see the module
    /// doc); else changes nothing and answers false.
    pub(super) async fn echo_by_stamp(
        &self,
        job: &ClaimedJob,
        active: &[ActiveFlow<'_>],
        idle: Idle<'_>,
    ) -> Result<bool, sqlx::Error> {
        if !self.echo_entries(job, active).await? {
            return Ok(false);
        }
        self.log_idle_beside(job, idle).await?;
        Ok(true)
    }

    /// The echo entries of [`SyncEngine::echo_by_stamp`]; false (nothing logged) if the stamp
    /// does not settle every flow.
    async fn echo_entries(
        &self,
        job: &ClaimedJob,
        active: &[ActiveFlow<'_>],
    ) -> Result<bool, sqlx::Error> {
        let Some(stamp) = delivered_stamp(job) else {
            return Ok(false);
        };
        let id = &job.event.record.record_id;
        // One flow (the usual case): the check and the entry in one statement.
        if let [(flow, side, _)] = active {
            let entry = Entry {
                flow: Some(&flow.id),
                ..echo_entry(stamp, *side)
            };
            return self
                .batches
                .log_if_own_stamp(&self.pool, job, &entry, (flow, *side, id), stamp)
                .await;
        }
        let mut settled = Vec::with_capacity(active.len());
        for (flow, side, _) in active {
            let Some(link) = store::find_link(&self.pool, flow, *side, id).await? else {
                return Ok(false);
            };
            let own_write = link.last_write_side == Some(*side) && link.last_write_settled;
            // PostgreSQL keeps microseconds: the stamp as stored, not finer than that.
            let same_stamp =
                link.seen_on(*side).map(|s| s.timestamp_micros()) == Some(stamp.timestamp_micros());
            if !own_write || !same_stamp {
                return Ok(false);
            }
            settled.push((flow, *side, link.id));
        }
        for (flow, side, link_id) in settled {
            let entry = Entry {
                flow: Some(&flow.id),
                link: Some(link_id),
                ..echo_entry(stamp, side)
            };
            self.log(job, entry).await?;
        }
        Ok(true)
    }
}

/// The `echo` entry of a delivery settled by its stamp (flow and link still to set).
fn echo_entry<'a>(stamp: DateTime<Utc>, side: Side) -> Entry<'a> {
    let detail = format!(
        "the delivery's updated_at ({}) is the stamp of Tether's own write of the {} record, \
         whose answer showed every mapped value as last synced: nothing was read",
        stamp.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        side.as_str()
    );
    Entry {
        detail: Some(detail),
        ..Entry::new(Decision::Echo)
    }
}

/// The record's change stamp as the event's delivery gives it: only a custom system's webhook
/// (or its poll) of a change or a creation gives the record's own `updated_at`; other systems'
/// event times, deletes and Tether's own synthetic events say nothing about the record's state.
/// (A creation settles only against a link that remembers Tether's own create as its settled
/// write at that stamp: a backfill page's creates, `sync::backfill`.)
fn delivered_stamp(job: &ClaimedJob) -> Option<DateTime<Utc>> {
    stamp_of(&job.event)
}

/// [`delivered_stamp`] of an event.
fn stamp_of(e: &ChangeEvent) -> Option<DateTime<Utc>> {
    let custom = matches!(e.record.system, SystemId::CustomErp | SystemId::CustomPms);
    let synthetic = e.delivery_id.starts_with("tether:");
    if !custom || synthetic || !matches!(e.action, Action::Updated | Action::Created) {
        return None;
    }
    e.occurred_at
}

/// The flow and side whose echo a custom system's delivery may be, settled at intake (in the
/// group commit's statement, with no job: `intake::store`), as [`SyncEngine::echo_by_stamp`]
/// would settle it. Only record types with exactly one dataflow, switched on and with both its
/// systems connected, qualify: the engine would then run exactly that flow and log no `idle`
/// entry, so the one `echo` entry is all it would record. Paused flows are checked by the
/// statement itself (`flow_pauses`); anything not settled there becomes a job as before.
#[derive(Debug, Clone, Default)]
pub struct IntakeEchoes {
    by_type: HashMap<(SystemId, String), (String, Side)>,
    /// The engine's writes of this process not yet stored (`super::storing`).
    storing: StoringWrites,
}

/// What intake needs to settle one event as an echo: its flow, side and the entry's detail.
#[derive(Debug, Clone, PartialEq)]
pub struct IntakeEcho {
    pub flow_id: String,
    pub side: &'static str,
    pub detail: String,
}

impl IntakeEchoes {
    /// From the registry and whether each system is connected (a connector is built for it).
    pub fn new(registry: &Registry, connected: impl Fn(SystemId) -> bool) -> IntakeEchoes {
        let mut flows: HashMap<(SystemId, String), Vec<(&Dataflow, Side)>> = HashMap::new();
        for flow in &registry.dataflows {
            for side in [Side::Source, Side::Target] {
                let e = entity(flow, side);
                let key = (e.system, e.entity_type.clone());
                flows.entry(key).or_default().push((flow, side));
            }
        }
        let by_type = flows
            .into_iter()
            .filter_map(|(key, of_type)| match of_type.as_slice() {
                [(flow, side)]
                    if flow.switches.enabled
                        && connected(flow.source.system)
                        && connected(flow.target.system) =>
                {
                    Some((key, (flow.id.clone(), *side)))
                }
                _ => None,
            })
            .collect();
        IntakeEchoes {
            by_type,
            storing: StoringWrites::default(),
        }
    }

    /// These echoes, waiting for the writes `storing` marks before they are committed.
    pub fn waiting_for(mut self, storing: StoringWrites) -> IntakeEchoes {
        self.storing = storing;
        self
    }

    /// Returns once this process's engine is not writing and storing `event`'s record, or its
    /// wait ran out (see `super::storing`), so that the event, if it is that write's echo, is
    /// settled at intake.
    pub async fn wait_for_store(&self, event: &ChangeEvent) {
        self.storing.wait(&event.record).await;
    }

    /// The echo `event` may be, if its delivery carries a stamp and its type qualifies.
    pub fn of(&self, event: &ChangeEvent) -> Option<IntakeEcho> {
        let stamp = stamp_of(event)?;
        let r = &event.record;
        let (flow_id, side) = self.by_type.get(&(r.system, r.entity_type.clone()))?;
        let detail = echo_entry(stamp, *side).detail?;
        Some(IntakeEcho {
            flow_id: flow_id.clone(),
            side: side.as_str(),
            detail: format!("{detail}; settled at intake, without a job"),
        })
    }
}
