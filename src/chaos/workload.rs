//! The chaos workload: new records and renames on every side of four dataflows, at a steady rate,
//! made the way users make them (in the simulators' own state, announced by webhook where the
//! vendor sends one, found by polling where it does not).
//!
//! Dataflows exercised: PowerOffice customers → Zendesk organizations, Exact accounts → Zendesk
//! organizations, Zendesk organizations → Custom ERP customers, PowerOffice contact persons →
//! Zendesk users (with the reference to their customer's organization), Zendesk users → Custom
//! ERP contacts. Renames are made at the source, in Zendesk and in the ERP, so every flow also
//! runs backwards.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::model::{Model, OrgGroup, OrgOrigin, UserGroup, UserOrigin, EMAIL_DOMAIN};
use super::sims::Sims;
use crate::simulators::zendesk::Kind;

/// One change the workload makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    NewPoCustomer,
    NewExactAccount,
    NewZendeskOrg,
    NewPoContact,
    NewZendeskUser,
    RenameOrg(Side),
    RenameUser(Side),
}

/// Where a rename is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The system the group began in.
    Source,
    Zendesk,
    Erp,
}

/// Relative weights of the actions (renames pick their side at random).
const WEIGHTS: [(Action, u32); 7] = [
    (Action::NewPoCustomer, 10),
    (Action::NewExactAccount, 2),
    (Action::NewZendeskOrg, 12),
    (Action::NewPoContact, 8),
    (Action::NewZendeskUser, 8),
    (Action::RenameOrg(Side::Source), 35),
    (Action::RenameUser(Side::Source), 25),
];

/// How much work, how fast, and how much of it may touch the vendors with tight limits (their
/// limits are shared by every change that reaches them, Tether's write-backs included).
#[derive(Debug, Clone)]
pub struct Plan {
    pub changes: u64,
    /// Changes a second.
    pub rate: f64,
    /// A group is renamed again only after this long (see [`Model::idle`]).
    pub cooldown: Duration,
    /// Changes a second that reach PowerOffice Go (10 API calls a second in all).
    pub poweroffice_rate: f64,
    /// Changes a minute that reach Exact Online (60 API calls a minute in all).
    pub exact_per_minute: f64,
    pub seed: u64,
}

/// A token bucket: `rate` a second, at most `burst` saved up.
struct Budget {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(rate: f64, burst: f64) -> Self {
        Budget {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn has(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens >= 1.0
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// The workload's state while it runs.
pub struct Workload<'a> {
    sims: &'a Sims,
    plan: Plan,
    pub model: Model,
    rng: StdRng,
    poweroffice: Budget,
    exact: Budget,
    seq: u64,
}

/// Which limited vendor a change reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaches {
    PowerOffice,
    Exact,
    Neither,
}

impl<'a> Workload<'a> {
    pub fn new(sims: &'a Sims, plan: Plan) -> Self {
        Workload {
            sims,
            rng: StdRng::seed_from_u64(plan.seed),
            poweroffice: Budget::new(plan.poweroffice_rate, 2.0),
            exact: Budget::new(plan.exact_per_minute / 60.0, 1.0),
            plan,
            model: Model::default(),
            seq: 0,
        }
    }

    /// Makes `plan.changes` changes at `plan.rate` a second; `on_progress` is called after each
    /// with the number made so far.
    pub async fn run(&mut self, mut on_progress: impl FnMut(u64)) {
        let start = tokio::time::Instant::now();
        let every = Duration::from_secs_f64(1.0 / self.plan.rate.max(0.001));
        let mut discovered = Instant::now();
        for n in 0..self.plan.changes {
            tokio::time::sleep_until(start + every.mul_f64(n as f64)).await;
            if discovered.elapsed() >= Duration::from_secs(2) {
                self.model.discover(self.sims);
                discovered = Instant::now();
            }
            self.step().await;
            on_progress(n + 1);
        }
        self.model.discover(self.sims);
    }

    /// One change: a weighted pick, tried up to five times (a rename needs an idle group with a
    /// known counterpart, a limited vendor needs budget), else a new Zendesk organization.
    async fn step(&mut self) {
        for _ in 0..5 {
            let action = self.pick();
            if self.try_action(action).await {
                self.note(action);
                return;
            }
        }
        if self.try_action(Action::NewZendeskOrg).await {
            self.note(Action::NewZendeskOrg);
        }
    }

    fn note(&mut self, action: Action) {
        self.model.changes += 1;
        let side = match action {
            Action::RenameOrg(side) | Action::RenameUser(side) => side,
            _ => return,
        };
        let key = match side {
            Side::Source => "source",
            Side::Zendesk => "zendesk",
            Side::Erp => "erp",
        };
        *self.model.renames.entry(key).or_insert(0) += 1;
    }

    fn pick(&mut self) -> Action {
        let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.gen_range(0..total);
        let mut chosen = Action::NewZendeskOrg;
        for (action, weight) in WEIGHTS {
            if roll < weight {
                chosen = action;
                break;
            }
            roll -= weight;
        }
        let side = [Side::Source, Side::Zendesk, Side::Erp][self.rng.gen_range(0..3)];
        match chosen {
            Action::RenameOrg(_) => Action::RenameOrg(side),
            Action::RenameUser(_) => Action::RenameUser(side),
            other => other,
        }
    }

    /// Spends the budget of the vendor a change reaches; false when it has none left.
    fn afford(&mut self, reaches: Reaches) -> bool {
        let budget = match reaches {
            Reaches::PowerOffice => &mut self.poweroffice,
            Reaches::Exact => &mut self.exact,
            Reaches::Neither => return true,
        };
        if !budget.has() {
            return false;
        }
        budget.take();
        true
    }

    fn next_name(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}-{}", self.seq)
    }

    async fn try_action(&mut self, action: Action) -> bool {
        match action {
            Action::NewPoCustomer => self.new_po_customer(),
            Action::NewExactAccount => self.new_exact_account(),
            Action::NewZendeskOrg => self.new_zendesk_org().await,
            Action::NewPoContact => self.new_po_contact(),
            Action::NewZendeskUser => self.new_zendesk_user().await,
            Action::RenameOrg(side) => self.rename_org(side).await,
            Action::RenameUser(side) => self.rename_user(side).await,
        }
    }

    fn new_po_customer(&mut self) -> bool {
        if !self.afford(Reaches::PowerOffice) {
            return false;
        }
        let name = self.next_name("po-org");
        let dto = self
            .sims
            .poweroffice
            .seed("Customers", json!({ "Name": name }));
        self.push_org(OrgOrigin::PowerOffice, id_text(&dto["Id"]), name, None);
        true
    }

    fn new_exact_account(&mut self) -> bool {
        if !self.afford(Reaches::Exact) {
            return false;
        }
        let name = self.next_name("exact-org");
        let id = self.sims.exact.create_account(json!({ "Name": name }));
        self.push_org(OrgOrigin::Exact, id, name, None);
        true
    }

    async fn new_zendesk_org(&mut self) -> bool {
        let name = self.next_name("zd-org");
        let made =
            zendesk_write(self.sims, Kind::Organization, None, json!({ "name": name })).await;
        let Some(record) = made else { return false };
        let id = record["id"].as_u64();
        self.push_org(OrgOrigin::Zendesk, id_text(&record["id"]), name, id);
        true
    }

    fn push_org(&mut self, origin: OrgOrigin, source_id: String, name: String, zd: Option<u64>) {
        self.model.orgs.push(OrgGroup {
            origin,
            source_id,
            name,
            zendesk_id: zd,
            erp_id: None,
            changed_at: Instant::now(),
        });
    }

    fn new_po_contact(&mut self) -> bool {
        let customers: Vec<usize> = (0..self.model.orgs.len())
            .filter(|i| self.model.orgs[*i].origin == OrgOrigin::PowerOffice)
            .collect();
        if customers.is_empty() || !self.afford(Reaches::PowerOffice) {
            return false;
        }
        let org = customers[self.rng.gen_range(0..customers.len())];
        let name = self.next_name("po-person");
        let email = format!("{name}@{EMAIL_DOMAIN}");
        let customer: i64 = self.model.orgs[org].source_id.parse().unwrap_or_default();
        let dto = self.sims.poweroffice.seed(
            "ContactPersons",
            json!({"ContactId": customer, "FirstName": name, "LastName": "Chaos", "EmailAddress": email}),
        );
        self.push_user(
            UserOrigin::PowerOffice,
            id_text(&dto["Id"]),
            Some(org),
            name,
            email,
            None,
        );
        true
    }

    async fn new_zendesk_user(&mut self) -> bool {
        let name = self.next_name("zd-person");
        let email = format!("{name}@{EMAIL_DOMAIN}");
        let body = json!({ "name": name, "email": email });
        let Some(record) = zendesk_write(self.sims, Kind::User, None, body).await else {
            return false;
        };
        let id = record["id"].as_u64();
        self.push_user(
            UserOrigin::Zendesk,
            id_text(&record["id"]),
            None,
            name,
            email,
            id,
        );
        true
    }

    fn push_user(
        &mut self,
        origin: UserOrigin,
        source_id: String,
        org: Option<usize>,
        name: String,
        email: String,
        zd: Option<u64>,
    ) {
        self.model.users.push(UserGroup {
            origin,
            source_id,
            org,
            name,
            email,
            zendesk_id: zd,
            erp_id: None,
            changed_at: Instant::now(),
        });
    }
}

mod renames;

/// A JSON id (number or string) as text.
fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Creates (`id` None) or updates a Zendesk record as an agent would; the stored record on success.
async fn zendesk_write(sims: &Sims, kind: Kind, id: Option<u64>, fields: Value) -> Option<Value> {
    let response = match id {
        None => sims.zendesk.create(kind, fields),
        Some(id) => sims.zendesk.update(kind, id, fields),
    };
    if !response.status().is_success() {
        return None;
    }
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .ok()?;
    let envelope: Map<String, Value> = serde_json::from_slice(&body).ok()?;
    envelope.into_values().find(Value::is_object)
}
