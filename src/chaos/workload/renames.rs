//! Renames on any side of a group, made as a user of that system would.

use serde_json::{json, Map, Value};

use super::{zendesk_write, Reaches, Side, Workload};
use crate::chaos::model::{Model, OrgOrigin, UserOrigin};
use crate::simulators::zendesk::Kind;

/// How many random groups a rename looks at for an idle one before giving up this turn.
const TRIES: usize = 20;

fn patch(key: &str, value: &str) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(key.to_owned(), Value::String(value.to_owned()));
    map
}

impl Workload<'_> {
    /// An organization group idle for the cooldown whose record on `side` is known.
    fn idle_org(&mut self, side: Side) -> Option<usize> {
        let len = self.model.orgs.len();
        (0..TRIES.min(len * 2)).find_map(|_| {
            let i = rand::Rng::gen_range(&mut self.rng, 0..len);
            let g = &self.model.orgs[i];
            let known = match side {
                Side::Source => true,
                Side::Zendesk => g.zendesk_id.is_some(),
                Side::Erp => g.erp_id.is_some(),
            };
            (known && Model::idle(g.changed_at, self.plan.cooldown)).then_some(i)
        })
    }

    fn idle_user(&mut self, side: Side) -> Option<usize> {
        let len = self.model.users.len();
        (0..TRIES.min(len * 2)).find_map(|_| {
            let i = rand::Rng::gen_range(&mut self.rng, 0..len);
            let g = &self.model.users[i];
            let known = match side {
                Side::Source => true,
                Side::Zendesk => g.zendesk_id.is_some(),
                Side::Erp => g.erp_id.is_some(),
            };
            (known && Model::idle(g.changed_at, self.plan.cooldown)).then_some(i)
        })
    }

    pub(super) async fn rename_org(&mut self, side: Side) -> bool {
        let Some(i) = self.idle_org(side) else {
            return false;
        };
        let group = self.model.orgs[i].clone();
        let reaches = match group.origin {
            OrgOrigin::PowerOffice => Reaches::PowerOffice,
            OrgOrigin::Exact => Reaches::Exact,
            OrgOrigin::Zendesk => Reaches::Neither,
        };
        if !self.afford(reaches) {
            return false;
        }
        let name = self.next_name("org-renamed");
        let sims = self.sims;
        let done = match (side, group.origin) {
            (Side::Source, OrgOrigin::PowerOffice) => {
                let id = group.source_id.parse().unwrap_or_default();
                sims.poweroffice
                    .touch("Customers", id, json!({ "Name": name }));
                true
            }
            (Side::Source, OrgOrigin::Exact) => sims
                .exact
                .change_account(&group.source_id, json!({ "Name": name })),
            (Side::Source, OrgOrigin::Zendesk) | (Side::Zendesk, _) => {
                let id = group.zendesk_id.or_else(|| group.source_id.parse().ok());
                let body = json!({ "name": name });
                zendesk_write(sims, Kind::Organization, id, body)
                    .await
                    .is_some()
            }
            (Side::Erp, _) => {
                let id = group.erp_id.as_deref().unwrap_or_default();
                sims.erp.edit("customer", id, patch("name", &name));
                true
            }
        };
        if done {
            let g = &mut self.model.orgs[i];
            g.name = name;
            g.changed_at = std::time::Instant::now();
        }
        done
    }

    pub(super) async fn rename_user(&mut self, side: Side) -> bool {
        let Some(i) = self.idle_user(side) else {
            return false;
        };
        let group = self.model.users[i].clone();
        let reaches = match group.origin {
            UserOrigin::PowerOffice => Reaches::PowerOffice,
            UserOrigin::Zendesk => Reaches::Neither,
        };
        if !self.afford(reaches) {
            return false;
        }
        let name = self.next_name("person-renamed");
        let sims = self.sims;
        let done = match (side, group.origin) {
            (Side::Source, UserOrigin::PowerOffice) => {
                let id = group.source_id.parse().unwrap_or_default();
                sims.poweroffice
                    .touch("ContactPersons", id, json!({ "FirstName": name }));
                true
            }
            (Side::Source, UserOrigin::Zendesk) | (Side::Zendesk, _) => {
                let id = group.zendesk_id.or_else(|| group.source_id.parse().ok());
                let body = json!({ "name": name });
                zendesk_write(sims, Kind::User, id, body).await.is_some()
            }
            (Side::Erp, _) => {
                let id = group.erp_id.as_deref().unwrap_or_default();
                sims.erp.edit("contact", id, patch("name", &name));
                true
            }
        };
        if done {
            let g = &mut self.model.users[i];
            g.name = name;
            g.changed_at = std::time::Instant::now();
        }
        done
    }
}
