//! What the chaos workload made and what it expects: every record it created or renamed, grouped
//! with the counterparts Tether should keep in step with it, and each group's expected values.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::sims::Sims;
use crate::simulators::zendesk::Kind;

/// Where an organization group began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgOrigin {
    /// A PowerOffice Go customer (polled by Tether).
    PowerOffice,
    /// An Exact Online account (webhook).
    Exact,
    /// A Zendesk organization made by an agent (webhook).
    Zendesk,
}

/// Where a person group began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOrigin {
    /// A PowerOffice Go contact person of a customer (the reference `partyId` → `organization_id`).
    PowerOffice,
    /// A Zendesk user made by an agent.
    Zendesk,
}

/// An organization and its counterparts: the source record, the Zendesk organization and the
/// Custom ERP customer all carry `name`.
#[derive(Debug, Clone)]
pub struct OrgGroup {
    pub origin: OrgOrigin,
    /// PowerOffice `Id`, Exact `ID`, or the Zendesk id for Zendesk-made ones.
    pub source_id: String,
    pub name: String,
    pub zendesk_id: Option<u64>,
    pub erp_id: Option<String>,
    pub changed_at: Instant,
}

/// A person and their counterparts: the source, the Zendesk user and the Custom ERP contact.
/// The e-mail never changes (Zendesk sets a primary e-mail on create only), so it names the group.
#[derive(Debug, Clone)]
pub struct UserGroup {
    pub origin: UserOrigin,
    pub source_id: String,
    /// The organization group whose customer the PowerOffice contact belongs to.
    pub org: Option<usize>,
    pub name: String,
    pub email: String,
    pub zendesk_id: Option<u64>,
    pub erp_id: Option<String>,
    pub changed_at: Instant,
}

/// Everything the workload made, in the order it made it.
#[derive(Debug, Default)]
pub struct Model {
    pub orgs: Vec<OrgGroup>,
    pub users: Vec<UserGroup>,
    /// Changes made (creates and renames).
    pub changes: u64,
    /// Renames per side, for the summary.
    pub renames: HashMap<&'static str, u64>,
}

/// Domain of every e-mail the workload makes, so the checks never count anything else.
pub const EMAIL_DOMAIN: &str = "chaos.test";

impl Model {
    /// Fills in the Zendesk and Custom ERP ids of groups whose counterparts now carry the
    /// group's expected name (names are unique; ids never change once found).
    pub fn discover(&mut self, sims: &Sims) {
        let zd_orgs = index_by(&sims.zendesk.all(Kind::Organization), "name", zendesk_id);
        let erp_customers = index_by(&sims.erp.all("customer"), "name", erp_id);
        for org in &mut self.orgs {
            if org.zendesk_id.is_none() {
                org.zendesk_id = zd_orgs.get(&org.name).and_then(|ids| one(ids));
            }
            if org.erp_id.is_none() {
                org.erp_id = erp_customers.get(&org.name).and_then(|ids| one(ids));
            }
        }
        let zd_users = index_by(&sims.zendesk.all(Kind::User), "email", zendesk_id);
        let erp_contacts = index_by(&sims.erp.all("contact"), "email", erp_id);
        for user in &mut self.users {
            if user.zendesk_id.is_none() {
                user.zendesk_id = zd_users.get(&user.email).and_then(|ids| one(ids));
            }
            if user.erp_id.is_none() {
                user.erp_id = erp_contacts.get(&user.email).and_then(|ids| one(ids));
            }
        }
    }

    /// A group at `index` may be renamed again once its last change is `cooldown` old, so that
    /// the expected value (the latest rename) is never a race between two edits of one record.
    pub fn idle(changed_at: Instant, cooldown: Duration) -> bool {
        changed_at.elapsed() >= cooldown
    }
}

fn one<T: Clone>(ids: &[T]) -> Option<T> {
    match ids {
        [only] => Some(only.clone()),
        _ => None,
    }
}

pub fn zendesk_id(record: &Value) -> Option<u64> {
    record.get("id").and_then(Value::as_u64)
}

pub fn erp_id(record: &Value) -> Option<String> {
    record.get("id").and_then(Value::as_str).map(str::to_owned)
}

/// Records grouped by the text of `field` (several when a value is held twice).
pub fn index_by<T>(
    records: &[Value],
    field: &str,
    id: fn(&Value) -> Option<T>,
) -> HashMap<String, Vec<T>> {
    let mut index: HashMap<String, Vec<T>> = HashMap::new();
    for record in records {
        let (Some(key), Some(id)) = (record.get(field).and_then(Value::as_str), id(record)) else {
            continue;
        };
        index.entry(key.to_owned()).or_default().push(id);
    }
    index
}
