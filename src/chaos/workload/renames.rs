//! Renames on any side of a group, made as a user of that system would.

use serde_json::{json, Map, Value};

use super::{zendesk_write, Reaches, Side, Workload};
use crate::chaos::model::{Model, OrgGroup, OrgOrigin, UserGroup, UserOrigin};
use crate::chaos::sims::Sims;
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
            let ready = known && Model::idle(g.changed_at, self.plan.cooldown);
            (ready && settled_org(self.sims, g)).then_some(i)
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
            let ready = known && Model::idle(g.changed_at, self.plan.cooldown);
            (ready && settled_user(self.sims, g)).then_some(i)
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

/// Whether every system already shows the group's last change. A group is renamed again only
/// then: an edit made while Tether is still carrying the previous one across can be overwritten
/// by that write (read, then write, with no conditional write in the ERP contract or PowerOffice),
/// a race no client can close. Found in a one-replica run, where carrying a rename across took
/// 22 s under kills, longer than the cooldown alone allowed.
fn settled_org(sims: &Sims, g: &OrgGroup) -> bool {
    let name = Some(g.name.as_str());
    let zd = g.zendesk_id.and_then(|id| sims.zendesk.organization(id));
    let erp = g
        .erp_id
        .as_deref()
        .and_then(|id| sims.erp.get("customer", id));
    let source = match g.origin {
        OrgOrigin::PowerOffice => g
            .source_id
            .parse()
            .ok()
            .and_then(|id| sims.poweroffice.get("Customers", id))
            .map(|v| v["Name"].clone()),
        OrgOrigin::Exact => sims.exact.account(&g.source_id).map(|v| v["Name"].clone()),
        OrgOrigin::Zendesk => zd.as_ref().map(|v| v["name"].clone()),
    };
    zd.as_ref().and_then(|v| v["name"].as_str()) == name
        && erp.as_ref().and_then(|v| v["name"].as_str()) == name
        && source.as_ref().and_then(Value::as_str) == name
}

fn settled_user(sims: &Sims, g: &UserGroup) -> bool {
    let name = Some(g.name.as_str());
    let zd = g.zendesk_id.and_then(|id| sims.zendesk.user(id));
    let erp = g
        .erp_id
        .as_deref()
        .and_then(|id| sims.erp.get("contact", id));
    let source_ok = match g.origin {
        UserOrigin::PowerOffice => g
            .source_id
            .parse()
            .ok()
            .and_then(|id| sims.poweroffice.get("ContactPersons", id))
            .is_some_and(|v| v["FirstName"].as_str() == name),
        UserOrigin::Zendesk => true,
    };
    source_ok
        && zd.as_ref().and_then(|v| v["name"].as_str()) == name
        && erp.as_ref().and_then(|v| v["name"].as_str()) == name
}
