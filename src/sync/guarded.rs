//! The engine's side of the guard (docs/guard.md): before a linked pair's writes or a create are
//! sent, the guard counts them or holds them. A held write changes nothing: no vendor call, the
//! link's snapshot as it was, one `held` entry.

use serde_json::{Map, Value};

use super::mapping::entity;
use super::merge::Side;
use super::plan::{idx, Plan};
use super::store::{self, Entry, Link};
use super::{Decision, Fail, Step, SyncEngine};
use crate::connectors::Record;
use crate::guard::{PlannedWrite, Verdict, WriteItem};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

impl SyncEngine {
    /// The guard's verdict on a linked pair's planned writes: `Some` when they are held.
    pub(crate) async fn held_by_guard(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        plan: &Plan,
        records: [&Record; 2],
        read: &Value,
    ) -> Result<Option<Step>, Fail> {
        let mut items = Vec::new();
        for to in [Side::Target, Side::Source] {
            let e = entity(flow, to);
            if self.connector(e.system).is_none() {
                continue;
            }
            let record = format!("{}/{}/{}", e.system, e.entity_type, link.id_on(to));
            let current = &records[idx(to)].fields;
            items.extend(write_items(
                &record,
                to,
                &plan.changes[idx(to)],
                Some(current),
            ));
        }
        let write = PlannedWrite {
            link_id: Some(link.id),
            is_create: false,
            items,
        };
        self.held_if(job, flow, &write, Some(read.clone())).await
    }

    /// The guard's verdict on creating `src`'s counterpart with `fields`: `Some` when held.
    pub(crate) async fn create_held_by_guard(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        src: &Record,
        fields: &Map<String, Value>,
    ) -> Result<Option<Step>, Fail> {
        let record = format!(
            "{}/{}/{}",
            flow.source.system, flow.source.entity_type, src.id
        );
        let write = PlannedWrite {
            link_id: None,
            is_create: true,
            items: write_items(&record, Side::Target, fields, None),
        };
        self.held_if(job, flow, &write, None).await
    }

    async fn held_if(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        write: &PlannedWrite,
        read: Option<Value>,
    ) -> Result<Option<Step>, Fail> {
        let Verdict::Held { tripped } = self.guard.admit(flow, job, write).await? else {
            return Ok(None);
        };
        let detail = match tripped {
            Some(trip) => format!(
                "the guard paused this flow: {trip}; this write and the flow's next ones are \
                 held (`tether guard list`)"
            ),
            None => "the guard has paused this flow: write held until `tether guard release` \
                     or `discard`"
                .to_owned(),
        };
        let entry = Entry {
            flow: Some(&flow.id),
            link: write.link_id,
            read,
            detail: Some(detail),
            ..Entry::new(Decision::Held)
        };
        store::log(&self.pool, job, &entry).await?;
        Ok(Some(Step::Done))
    }
}

/// One item per field written to `side` of `record`, with its current value when known.
fn write_items(
    record: &str,
    side: Side,
    changes: &Map<String, Value>,
    current: Option<&Map<String, Value>>,
) -> Vec<WriteItem> {
    changes
        .iter()
        .map(|(field, new)| WriteItem {
            record: record.to_owned(),
            side: side.as_str(),
            property: field.clone(),
            old: current.and_then(|c| c.get(field)).cloned(),
            new: new.clone(),
        })
        .collect()
}
