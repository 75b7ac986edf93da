//! A write without a read (docs/sync-rules.md, "A write without a read"): the counterpart of a
//! changed record is not read first when nothing can have changed it unseen.
//!
//! That holds when Tether wrote that side last and its answer showed every synced property as the
//! snapshot has it (`links.last_write_settled`), at the stamp the link keeps, and no write's
//! answer was lost since (`unsure_write`). The counterpart is then, for the planner, the snapshot
//! at that stamp. Its system must write conditionally (`If-Match` on that stamp): if the record
//! did change meanwhile, the write is refused with nothing written, and the engine reads the
//! record and plans again.

use serde_json::{Map, Value};

use super::mapping::{key, path, ref_part, synced};
use super::merge::Side;
use super::plan::settled_by_one_read;
use super::store::Link;
use super::{Decision, Fail, Step, SyncEngine};
use crate::connectors::{set_path, Record};
use crate::queue::ClaimedJob;
use crate::registry::Dataflow;

impl SyncEngine {
    /// The pair synced without reading the counterpart, if the link vouches for it (see the
    /// module doc); `None` if it does not, or if the counterpart turned out changed (then nothing
    /// was written and the caller reads it).
    pub(super) async fn write_unread(
        &self,
        job: &ClaimedJob,
        flow: &Dataflow,
        link: &Link,
        (side, record): (Side, &Record),
    ) -> Result<Option<Step>, Fail> {
        let other = side.other();
        let Some(assumed) = counterpart_as_written(flow, link, other) else {
            return Ok(None);
        };
        let records = match side {
            Side::Source => [record, &assumed],
            Side::Target => [&assumed, record],
        };
        match self
            .sync_linked_unread(job, flow, link, records, side, other)
            .await
        {
            Err(Fail::UnreadChanged) => Ok(None),
            done => done.map(Some),
        }
    }
}

/// The record on `side` of `link` as Tether's settled write left it, built from the snapshot; `None`
/// unless the link vouches for it (see the module doc) and every synced property reads back
/// from the built record as the snapshot has it.
pub(crate) fn counterpart_as_written(flow: &Dataflow, link: &Link, side: Side) -> Option<Record> {
    if link.last_write_side != Some(side) || !link.last_write_settled {
        return None;
    }
    if link.unsure_write.is_some() {
        return None;
    }
    let seen = link.seen_on(side)?;
    let mut fields = Map::new();
    for p in synced(flow) {
        let base = link.snapshot.get(&key(p))?;
        let value = match &p.reference {
            None => base.clone(),
            Some(_) => ref_part(Some(base), side).map_or(Value::Null, Value::String),
        };
        set_path(&mut fields, path(p, side), value);
    }
    let record = Record {
        id: link.id_on(side).to_owned(),
        updated_at: Some(seen),
        fields,
    };
    // Two properties on one path, or a value the snapshot keeps in another form, would not read
    // back: such a pair is read as before.
    (settled_by_one_read(flow, link, &record, side) == Some(Decision::Echo)).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::plan_tests;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    /// The planner tests' flow: a plain `Name` and the reference `partyId`.
    fn flow() -> Dataflow {
        plan_tests::flow(vec![
            plan_tests::name_mapping(),
            plan_tests::party_mapping(),
        ])
    }

    /// A link whose `last_write` side was written last, `settled` or not.
    fn linked(last_write: Side, settled: bool) -> Link {
        let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        let snapshot = json!({
            "Name>name": "Acme",
            "partyId>organization_id": {"s": "c-3", "t": "o-7"},
        });
        Link {
            id: 7,
            source_id: "s1".into(),
            target_id: "t1".into(),
            snapshot: snapshot.as_object().cloned().unwrap(),
            source_seen_at: Some(at(1)),
            target_seen_at: Some(at(2)),
            last_write_side: Some(last_write),
            last_write_settled: settled,
            version: 3,
            unsure_write: None,
        }
    }

    #[test]
    fn a_settled_write_gives_the_snapshot_at_its_stamp() {
        let link = linked(Side::Source, true);
        let record = counterpart_as_written(&flow(), &link, Side::Source).expect("vouched for");
        assert_eq!(record.id, "s1");
        assert_eq!(record.updated_at, link.source_seen_at);
        assert_eq!(record.get_path("Name"), Some(&json!("Acme")));
        assert_eq!(record.get_path("partyId"), Some(&json!("c-3")));
        let target = linked(Side::Target, true);
        let record = counterpart_as_written(&flow(), &target, Side::Target).expect("vouched for");
        assert_eq!(record.updated_at, target.target_seen_at);
        assert_eq!(record.get_path("organization_id"), Some(&json!("o-7")));
    }

    #[test]
    fn without_a_settled_write_of_that_side_the_counterpart_is_read() {
        let unsettled = linked(Side::Target, false);
        assert!(counterpart_as_written(&flow(), &unsettled, Side::Target).is_none());
        let other_side = linked(Side::Source, true);
        assert!(counterpart_as_written(&flow(), &other_side, Side::Target).is_none());
        let mut unstamped = linked(Side::Target, true);
        unstamped.target_seen_at = None;
        assert!(counterpart_as_written(&flow(), &unstamped, Side::Target).is_none());
    }

    #[test]
    fn a_snapshot_missing_a_property_or_an_unsure_write_means_a_read() {
        let mut partial = linked(Side::Target, true);
        partial.snapshot.remove("Name>name");
        assert!(counterpart_as_written(&flow(), &partial, Side::Target).is_none());
        let mut unsure = linked(Side::Target, true);
        unsure.unsure_write = Some(crate::sync::unsure::UnsureWrite {
            side: Side::Target,
            fields: Map::new(),
            snapshot: Map::new(),
        });
        assert!(counterpart_as_written(&flow(), &unsure, Side::Target).is_none());
    }
}
