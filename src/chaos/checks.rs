//! The properties a chaos run must hold, checked against the simulators' state (what users
//! would see in each system) and the queue, one printed line per property.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::model::{
    erp_id, index_by, zendesk_id, Model, OrgGroup, OrgOrigin, UserGroup, UserOrigin, EMAIL_DOMAIN,
};
use super::sims::{Sims, EXACT_PER_MINUTE, POWEROFFICE_PER_SECOND, ZENDESK_PER_MINUTE};
use crate::simulators::zendesk::Kind;

/// The properties, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    Converged,
    NoLoops,
    NoWebhookLost,
    VendorLimits,
    NoDeadLetters,
    ConvergeTime,
    Throughput,
}

impl Property {
    fn label(self) -> &'static str {
        match self {
            Property::Converged => "converged",
            Property::NoLoops => "no loops",
            Property::NoWebhookLost => "no webhook lost",
            Property::VendorLimits => "vendor limits held",
            Property::NoDeadLetters => "nothing dead-lettered",
            Property::ConvergeTime => "time to converge",
            Property::Throughput => "changes per second",
        }
    }
}

/// One checked property: whether it held and what was measured.
#[derive(Debug, Clone)]
pub struct Finding {
    pub property: Property,
    pub held: bool,
    pub detail: String,
}

impl Finding {
    pub fn new(property: Property, held: bool, detail: impl Into<String>) -> Self {
        Finding {
            property,
            held,
            detail: detail.into(),
        }
    }

    pub fn line(&self) -> String {
        let verdict = if self.held { "PASS" } else { "FAIL" };
        format!("{verdict} {:<22} {}", self.property.label(), self.detail)
    }
}

/// How far the systems are from what the workload expects.
#[derive(Debug, Default, Clone)]
pub struct Convergence {
    pub groups: usize,
    pub lost: usize,
    pub duplicate: usize,
    pub wrong_value: usize,
    pub wrong_reference: usize,
    /// Records no group accounts for (made twice under an old name, for instance).
    pub extra: usize,
    /// The first few problems, described.
    pub examples: Vec<String>,
}

impl Convergence {
    pub fn ok(&self) -> bool {
        self.lost + self.duplicate + self.wrong_value + self.wrong_reference + self.extra == 0
    }

    fn problem(&mut self, text: String) {
        if self.examples.len() < 8 {
            self.examples.push(text);
        }
    }

    /// One record per group expected under `key`: counts none as lost and several as duplicate.
    fn expect_one<T: Clone>(
        &mut self,
        index: &HashMap<String, Vec<T>>,
        key: &str,
        what: &str,
    ) -> Option<T> {
        match index.get(key).map(Vec::as_slice).unwrap_or_default() {
            [one] => Some(one.clone()),
            [] => {
                self.lost += 1;
                self.problem(format!("{what} {key:?}: none"));
                None
            }
            many => {
                self.duplicate += 1;
                self.problem(format!("{what} {key:?}: {} of them", many.len()));
                None
            }
        }
    }

    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} groups: {} lost, {} duplicate, {} wrong value, {} wrong reference, {} extra",
            self.groups,
            self.lost,
            self.duplicate,
            self.wrong_value,
            self.wrong_reference,
            self.extra
        );
        for example in &self.examples {
            let _ = write!(out, "\n       - {example}");
        }
        out
    }
}

/// Compares every system's records with the model.
pub fn convergence(model: &Model, sims: &Sims) -> Convergence {
    let mut c = Convergence {
        groups: model.orgs.len() + model.users.len(),
        ..Convergence::default()
    };
    let zd_orgs_all = sims.zendesk.all(Kind::Organization);
    let zd_orgs = index_by(&zd_orgs_all, "name", zendesk_id);
    let erp_customers = sims.erp.all("customer");
    let erp_by_name = index_by(&erp_customers, "name", erp_id);
    for org in &model.orgs {
        check_org(&mut c, sims, org, &zd_orgs, &erp_by_name);
    }
    c.extra += zd_orgs_all.len().saturating_sub(model.orgs.len());
    c.extra += erp_customers.len().saturating_sub(model.orgs.len());
    let ours = |v: &&Value| {
        v.get("email")
            .and_then(Value::as_str)
            .is_some_and(|e| e.ends_with(EMAIL_DOMAIN))
    };
    let zd_users: Vec<Value> = sims
        .zendesk
        .all(Kind::User)
        .into_iter()
        .filter(|v| ours(&v))
        .collect();
    let erp_contacts = sims.erp.all("contact");
    let zd_by_email = index_by(&zd_users, "email", |v| Some(v.clone()));
    let erp_by_email = index_by(&erp_contacts, "email", |v| Some(v.clone()));
    for user in &model.users {
        check_user(
            &mut c,
            sims,
            model,
            user,
            (&zd_by_email, &erp_by_email),
            &zd_orgs,
        );
    }
    c.extra += zd_users.len().saturating_sub(model.users.len());
    c.extra += erp_contacts.len().saturating_sub(model.users.len());
    c
}

fn check_org(
    c: &mut Convergence,
    sims: &Sims,
    org: &OrgGroup,
    zd_orgs: &HashMap<String, Vec<u64>>,
    erp: &HashMap<String, Vec<String>>,
) {
    c.expect_one(zd_orgs, &org.name, "Zendesk organization");
    c.expect_one(erp, &org.name, "ERP customer");
    let source = match org.origin {
        OrgOrigin::PowerOffice => org
            .source_id
            .parse()
            .ok()
            .and_then(|id| sims.poweroffice.get("Customers", id))
            .and_then(|v| v["Name"].as_str().map(str::to_owned)),
        OrgOrigin::Exact => sims
            .exact
            .account(&org.source_id)
            .and_then(|v| v["Name"].as_str().map(str::to_owned)),
        OrgOrigin::Zendesk => org
            .source_id
            .parse()
            .ok()
            .and_then(|id| sims.zendesk.organization(id))
            .and_then(|v| v["name"].as_str().map(str::to_owned)),
    };
    if source.as_deref() != Some(org.name.as_str()) {
        c.wrong_value += 1;
        c.problem(format!(
            "{:?} organization {} is named {source:?}, expected {:?}",
            org.origin, org.source_id, org.name
        ));
    }
}

type ByEmail = HashMap<String, Vec<Value>>;

fn check_user(
    c: &mut Convergence,
    sims: &Sims,
    model: &Model,
    user: &UserGroup,
    (zd, erp): (&ByEmail, &ByEmail),
    zd_orgs: &HashMap<String, Vec<u64>>,
) {
    let named = |c: &mut Convergence, what: &str, record: Option<Value>, field: &str| {
        if let Some(record) = record {
            let name = record[field].as_str().unwrap_or_default().to_owned();
            if name != user.name {
                c.wrong_value += 1;
                c.problem(format!(
                    "{what} {} is named {name:?}, expected {:?}",
                    user.email, user.name
                ));
            }
        }
    };
    let zd_user = c.expect_one(zd, &user.email, "Zendesk user");
    named(c, "Zendesk user", zd_user.clone(), "name");
    let erp_contact = c.expect_one(erp, &user.email, "ERP contact");
    named(c, "ERP contact", erp_contact, "name");
    if user.origin != UserOrigin::PowerOffice {
        return;
    }
    let contact = user
        .source_id
        .parse()
        .ok()
        .and_then(|id| sims.poweroffice.get("ContactPersons", id));
    named(c, "PowerOffice contact", contact, "FirstName");
    let org = user.org.map(|i| &model.orgs[i]);
    let want = org
        .and_then(|o| zd_orgs.get(&o.name))
        .and_then(|ids| ids.first().copied());
    let got = zd_user.as_ref().and_then(|u| u["organization_id"].as_u64());
    if zd_user.is_some() && (want.is_none() || got != want) {
        c.wrong_reference += 1;
        c.problem(format!(
            "Zendesk user {} has organization {got:?}, expected {want:?}",
            user.email
        ));
    }
}

/// Writes Tether made to the simulators (POST, PUT, PATCH, DELETE), leaving out token requests:
/// a token renewal is not a write loop.
pub fn writes(sims: &Sims) -> u64 {
    sims.counters()
        .into_iter()
        .filter(|(key, _)| {
            let mut parts = key.splitn(2, ' ');
            let method = parts.next().unwrap_or_default();
            let route = parts.next().unwrap_or_default().to_ascii_lowercase();
            ["POST", "PUT", "PATCH", "DELETE"].contains(&method) && !route.contains("token")
        })
        .map(|(_, n)| n)
        .sum()
}

/// Every webhook eventually answered 2xx: none given up, none dropped.
pub fn webhooks(sims: &Sims) -> Finding {
    let mut held = true;
    let mut parts = Vec::new();
    for (system, s) in sims.webhook_stats() {
        held &= s.failed == 0 && s.dropped == 0;
        parts.push(format!(
            "{system} {} delivered ({} retried, {} twice, {} out of order, {} given up)",
            s.delivered,
            s.retried,
            s.duplicated,
            s.reordered,
            s.failed + s.dropped
        ));
    }
    Finding::new(Property::NoWebhookLost, held, parts.join("; "))
}

/// The busiest second (PowerOffice) and minute (Exact, Zendesk) the simulators counted.
pub fn limits(sims: &Sims) -> Finding {
    use crate::domain::SystemId;
    let peaks: HashMap<SystemId, _> = sims.peaks().into_iter().collect();
    let po = peaks
        .get(&SystemId::PowerOffice)
        .map(|p| p.per_second)
        .unwrap_or(0);
    let exact = peaks
        .get(&SystemId::ExactOnline)
        .map(|p| p.per_minute)
        .unwrap_or(0);
    let zd = peaks
        .get(&SystemId::Zendesk)
        .map(|p| p.per_minute)
        .unwrap_or(0);
    let held = po <= u64::from(POWEROFFICE_PER_SECOND)
        && exact <= u64::from(EXACT_PER_MINUTE)
        && zd <= u64::from(ZENDESK_PER_MINUTE);
    Finding::new(
        Property::VendorLimits,
        held,
        format!(
            "PowerOffice {po}/s (limit {POWEROFFICE_PER_SECOND}), Exact {exact}/min (limit {EXACT_PER_MINUTE}), Zendesk {zd}/min (limit {ZENDESK_PER_MINUTE})"
        ),
    )
}

/// A dead job: id, record key, attempts, last error.
type DeadLetter = (i64, String, i32, Option<String>);

/// Dead letters: every fault of the run is transient, so any dead letter is a violation.
pub async fn dead_letters(pool: &sqlx::PgPool) -> Finding {
    let rows: Result<Vec<DeadLetter>, _> = sqlx::query_as(
        "SELECT id, record_key, attempts, last_error FROM jobs WHERE state = 'dead' ORDER BY id",
    )
    .fetch_all(pool)
    .await;
    match rows {
        Err(e) => Finding::new(
            Property::NoDeadLetters,
            false,
            format!("cannot read the queue: {e}"),
        ),
        Ok(rows) if rows.is_empty() => {
            Finding::new(Property::NoDeadLetters, true, "0 dead letters")
        }
        Ok(rows) => {
            let mut detail = format!("{} dead letters", rows.len());
            for (id, key, attempts, error) in rows.iter().take(5) {
                let _ = write!(
                    detail,
                    "\n       - job {id} {key} after {attempts} attempts: {}",
                    error.as_deref().unwrap_or("-")
                );
            }
            Finding::new(Property::NoDeadLetters, false, detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::{json, Map};

    use super::*;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    fn org(source_id: &str, name: &str) -> OrgGroup {
        OrgGroup {
            origin: OrgOrigin::PowerOffice,
            source_id: source_id.to_owned(),
            name: name.to_owned(),
            zendesk_id: None,
            erp_id: None,
            changed_at: Instant::now(),
        }
    }

    /// The checker must see each kind of divergence, or a passing run proves nothing.
    #[tokio::test]
    async fn convergence_counts_lost_duplicate_wrong_and_extra_records() {
        // Webhooks go nowhere: this test looks at the simulators' state only.
        let sims = Sims::start("http://127.0.0.1:9", 1).await.unwrap();
        let customer = sims.poweroffice.seed("Customers", json!({"Name": "acme"}));
        let mut model = Model::default();
        model.orgs.push(org(&customer["Id"].to_string(), "acme"));
        let state = convergence(&model, &sims);
        assert_eq!((state.lost, state.ok()), (2, false), "{}", state.summary());

        let zd = sims.zendesk.insert_organization(json!({"name": "acme"}));
        sims.erp
            .insert("customer", fields(json!({"name": "acme"})), None);
        assert!(convergence(&model, &sims).ok());

        sims.erp
            .insert("customer", fields(json!({"name": "acme"})), None);
        let state = convergence(&model, &sims);
        assert_eq!(
            (state.duplicate, state.extra),
            (1, 1),
            "{}",
            state.summary()
        );

        model.orgs[0].name = "acme renamed".to_owned();
        let state = convergence(&model, &sims);
        assert_eq!(
            (state.lost, state.wrong_value),
            (2, 1),
            "{}",
            state.summary()
        );

        // A contact person whose Zendesk user points at no organization: a wrong reference.
        let mut model = Model::default();
        model.orgs.push(org(&customer["Id"].to_string(), "acme"));
        let person = sims.poweroffice.seed(
            "ContactPersons",
            json!({"ContactId": customer["Id"], "FirstName": "ada", "EmailAddress": "ada@chaos.test"}),
        );
        model.users.push(UserGroup {
            origin: UserOrigin::PowerOffice,
            source_id: person["Id"].to_string(),
            org: Some(0),
            name: "ada".to_owned(),
            email: "ada@chaos.test".to_owned(),
            zendesk_id: None,
            erp_id: None,
            changed_at: Instant::now(),
        });
        sims.zendesk
            .insert_user(json!({"name": "ada", "email": "ada@chaos.test"}));
        sims.erp.insert(
            "contact",
            fields(json!({"name": "ada", "email": "ada@chaos.test"})),
            None,
        );
        let state = convergence(&model, &sims);
        assert_eq!(state.wrong_reference, 1, "{}", state.summary());
        assert_eq!(zd["name"], "acme");
    }
}
