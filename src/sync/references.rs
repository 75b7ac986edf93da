//! References (rule 5 of `docs/sync-rules.md`): an id pointing at another record is translated
//! through the links of whichever flow links the two types, never copied.

use super::mapping::{entity, key, ref_types};
use super::merge::Side;
use super::plan::{Lookup, Translation, Translations};
use super::{store, SyncEngine};
use crate::domain::{RecordKey, SystemId};
use crate::registry::{Dataflow, PropertyMapping};

impl SyncEngine {
    /// Translates a reference id from one side of a flow to the other through active links, in
    /// either direction of whichever flow links them.
    pub(crate) async fn translate(
        &self,
        from: SystemId,
        from_types: &[String],
        id: &str,
        to: SystemId,
        to_types: &[String],
    ) -> Result<Translation, sqlx::Error> {
        if let Some(found) =
            store::linked_id(&self.pool, from, from_types, id, to, to_types).await?
        {
            return Ok(Translation::Found(found));
        }
        let mut candidates: Vec<RecordKey> = Vec::new();
        for f in self
            .registry
            .dataflows
            .iter()
            .filter(|f| f.switches.enabled)
        {
            let from_type = if f.source.system == from
                && from_types.contains(&f.source.entity_type)
                && f.target.system == to
                && to_types.contains(&f.target.entity_type)
            {
                &f.source.entity_type
            } else if f.target.system == from
                && from_types.contains(&f.target.entity_type)
                && f.source.system == to
                && to_types.contains(&f.source.entity_type)
            {
                &f.target.entity_type
            } else {
                continue;
            };
            let key = RecordKey {
                system: from,
                entity_type: from_type.clone(),
                record_id: id.to_owned(),
            };
            if !candidates.contains(&key) {
                candidates.push(key);
            }
        }
        Ok(if candidates.is_empty() {
            Translation::Impossible
        } else {
            Translation::Pending(candidates)
        })
    }

    /// Translates the reference of property `p` read on `from` to the other side.
    pub(crate) async fn translate_prop(
        &self,
        flow: &Dataflow,
        p: &PropertyMapping,
        from: Side,
        id: &str,
    ) -> Result<Translation, sqlx::Error> {
        self.translate(
            entity(flow, from).system,
            &ref_types(p, from),
            id,
            entity(flow, from.other()).system,
            &ref_types(p, from.other()),
        )
        .await
    }

    /// Looks up what the planner asked for and adds it to `translations`.
    pub(crate) async fn look_up(
        &self,
        flow: &Dataflow,
        lookups: Vec<Lookup>,
        translations: &mut Translations,
    ) -> Result<(), sqlx::Error> {
        for l in lookups {
            // The planner only asks about the flow's own properties; were one missing, `Impossible`
            // still answers it, so planning again always ends.
            let tr = match flow.properties.iter().find(|p| key(p) == l.property) {
                Some(p) => self.translate_prop(flow, p, l.from, &l.id).await?,
                None => Translation::Impossible,
            };
            translations.insert(l, tr);
        }
        Ok(())
    }
}
