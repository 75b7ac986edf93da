//! `tether sandbox`: everything on one machine. The embedded PostgreSQL, a simulator of each of
//! the six systems on loopback ports, and the service configured against them, with a few records
//! already in the source systems. The end-to-end tests start the same [`Simulators`].

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine as _;
use serde_json::json;

use crate::domain::SystemId;
use crate::simulators::crmoffice::CrmOfficeSim;
use crate::simulators::custom::{CustomSim, CustomSimConfig};
use crate::simulators::exactonline::{self, ExactSim, ExactSimConfig};
use crate::simulators::kit::RunningSim;
use crate::simulators::poweroffice::{self, PowerOfficeSim, PowerOfficeSimConfig};
use crate::simulators::zendesk::{SimCredentials, SimOptions, ZendeskSim, ZendeskSimHandle};

/// The sandbox's credentials. They only open the local simulators.
pub mod credentials {
    pub const ZENDESK_EMAIL: &str = "sandbox@tether.test";
    pub const ZENDESK_TOKEN: &str = "sandbox-zendesk-token";
    pub const CRMOFFICE_TOKEN: &str = "sandbox-crmoffice-token";
    pub const CUSTOMERP_TOKEN: &str = "sandbox-customerp-token";
    pub const CUSTOMPMS_TOKEN: &str = "sandbox-custompms-token";
}

/// The six simulators, running, with handles to seed and inspect them.
pub struct Simulators {
    pub zendesk: ZendeskSimHandle,
    pub exact: ExactSim,
    pub exact_config: ExactSimConfig,
    pub poweroffice: PowerOfficeSim,
    pub poweroffice_config: PowerOfficeSimConfig,
    pub crmoffice: CrmOfficeSim,
    pub customerp: CustomSim,
    pub custompms: CustomSim,
    customerp_secret: String,
    custompms_secret: String,
    running: Vec<(SystemId, RunningSim)>,
}

fn whsec(label: &str) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(format!("tether-sandbox-{label}-secret"))
    )
}

impl Simulators {
    /// Starts the six simulators on `host` (free ports); their webhooks go to `tether_url`
    /// (e.g. `http://127.0.0.1:8080`).
    pub async fn start(host: std::net::IpAddr, tether_url: &str) -> std::io::Result<Simulators> {
        let any = SocketAddr::new(host, 0);
        let hook = |system: &str| Some(format!("{tether_url}/webhooks/{system}"));
        let (zd_running, zendesk) = ZendeskSim::start(SimOptions {
            webhook_lanes: 1,
            bind: any,
            credentials: SimCredentials {
                email: credentials::ZENDESK_EMAIL.to_owned(),
                api_token: credentials::ZENDESK_TOKEN.to_owned(),
                oauth_token: None,
            },
            // No webhook until Tether installs its own ([`install_webhooks`]), as in a new account.
            webhook_target: None,
            webhook_secret: String::new(),
        })
        .await?;
        // No subscription until Tether makes its own ([`install_webhooks`]).
        let exact_config = ExactSimConfig::default();
        let (exact, exact_running) = exactonline::start(exact_config.clone(), any).await?;
        let poweroffice_config = PowerOfficeSimConfig::default();
        let (poweroffice, po_running) = poweroffice::start(poweroffice_config.clone(), any).await?;
        let (crmoffice, crm_running) =
            CrmOfficeSim::start(credentials::CRMOFFICE_TOKEN, any).await?;
        let customerp_secret = whsec("customerp");
        let custompms_secret = whsec("custompms");
        let (customerp, erp_running) = CustomSim::start(
            CustomSimConfig {
                webhook_lanes: 1,
                system: SystemId::CustomErp,
                api_token: credentials::CUSTOMERP_TOKEN.to_owned(),
                webhook_secret: Some(customerp_secret.clone()),
                webhook_target: hook("customerp"),
            },
            any,
        )
        .await?;
        let (custompms, pms_running) = CustomSim::start(
            CustomSimConfig {
                webhook_lanes: 1,
                system: SystemId::CustomPms,
                api_token: credentials::CUSTOMPMS_TOKEN.to_owned(),
                webhook_secret: Some(custompms_secret.clone()),
                webhook_target: hook("custompms"),
            },
            any,
        )
        .await?;
        Ok(Simulators {
            zendesk,
            exact,
            exact_config,
            poweroffice,
            poweroffice_config,
            crmoffice,
            customerp,
            custompms,
            customerp_secret,
            custompms_secret,
            running: vec![
                (SystemId::Zendesk, zd_running),
                (SystemId::ExactOnline, exact_running),
                (SystemId::PowerOffice, po_running),
                (SystemId::CrmOffice, crm_running),
                (SystemId::CustomErp, erp_running),
                (SystemId::CustomPms, pms_running),
            ],
        })
    }

    /// Where a simulator listens (`http://127.0.0.1:port`).
    pub fn url(&self, system: SystemId) -> String {
        self.running
            .iter()
            .find(|(s, _)| *s == system)
            .map(|(_, r)| r.base_url())
            .expect("every system has a simulator")
    }

    /// Tether's configuration for these simulators, as TOML (validated by the normal loader).
    pub fn config_toml(&self, listen: SocketAddr, data_dir: &Path, poll_interval: &str) -> String {
        format!(
            r#"listen = "{listen}"
public_url = "http://{listen}"
data_dir = {data_dir:?}

[log]
format = "text"

[workers]
poll_interval = "200ms"
retry_schedule = ["1s", "2s", "5s", "10s"]

[outbound]
timeout = "10s"

[zendesk]
base_url = "{zendesk}"
email = "{zd_email}"
api_token = "{zd_token}"
rate_limit_per_minute = 6000

{exact_section}
{poweroffice_section}
[crmoffice]
base_url = "{crmoffice}"
api_token = "{crm_token}"
poll_interval = "{poll_interval}"

[customerp]
base_url = "{customerp}"
api_token = "{erp_token}"
webhook_secret = "{erp_secret}"
conditional_writes = true

[custompms]
base_url = "{custompms}"
api_token = "{pms_token}"
webhook_secret = "{pms_secret}"
conditional_writes = true
"#,
            data_dir = data_dir.display().to_string(),
            zendesk = self.url(SystemId::Zendesk),
            zd_email = credentials::ZENDESK_EMAIL,
            zd_token = credentials::ZENDESK_TOKEN,
            exact_section = self
                .exact_config
                .tether_section(&self.url(SystemId::ExactOnline), poll_interval),
            poweroffice_section = self
                .poweroffice_config
                .tether_section(&self.url(SystemId::PowerOffice), poll_interval),
            crmoffice = self.url(SystemId::CrmOffice),
            crm_token = credentials::CRMOFFICE_TOKEN,
            customerp = self.url(SystemId::CustomErp),
            erp_token = credentials::CUSTOMERP_TOKEN,
            erp_secret = self.customerp_secret,
            custompms = self.url(SystemId::CustomPms),
            pms_token = credentials::CUSTOMPMS_TOKEN,
            pms_secret = self.custompms_secret,
        )
    }

    /// A few records in the source systems, so the first sync has something to do.
    pub fn seed(&self) {
        self.poweroffice.seed(
            "Customers",
            json!({"Name": "Fjordkraft Demo AS", "WebsiteUrl": "https://fjordkraft.example", "EmailAddress": "post@fjordkraft.example"}),
        );
        self.poweroffice.seed(
            "Suppliers",
            json!({"Name": "Nordlys Supply", "LegalName": "Nordlys Supply AS", "WebsiteUrl": "https://nordlys.example"}),
        );
        self.poweroffice.seed(
            "Departments",
            json!({"Name": "Bergen office", "Code": "BGO"}),
        );
        self.exact
            .seed_account(json!({"Name": "Amstel Trading BV", "Code": "                 1"}));
    }
}

/// `tether sandbox [--demo]`: runs everything on one machine until Ctrl-C; with `demo`, walks
/// every dataflow once, prints a report and exits (0 only if every flow behaved as the registry
/// says).
pub async fn run(
    outer: &crate::config::Config,
    demo: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context as _;
    use std::sync::Arc;

    let shutdown = tokio_util::sync::CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    let (listener, addr) = bind(outer).await?;
    let tether_url = format!("http://{addr}");
    let sims = Simulators::start(addr.ip(), &tether_url)
        .await
        .context("the simulators could not start")?;
    let config = Arc::new(sandbox_config(outer, &sims, addr)?);
    let registry = load_registry(outer, &config, demo)?;
    let db = crate::db::Database::open(&config).await?;
    reset(&db.pool).await?;
    install_webhooks(&config, &db.pool, &registry).await?;
    if !demo {
        // The systems' past: records made before Tether connects, loaded by a backfill below.
        sims.seed();
    }
    // The demo's records are made after the first connection: changes that arrive live.
    crate::service::record_first_connections(&config, &db.pool).await?;
    let registry = Arc::new(registry);
    let service = tokio::spawn(crate::service::run(
        config.clone(),
        db.pool.clone(),
        registry.clone(),
        Some(listener),
        shutdown.clone(),
    ));
    if demo {
        let report = demo::run(&sims, &db.pool).await;
        // The report is printed once the service has stopped, so no log line lands inside it.
        shutdown.cancel();
        let stopped = service.await;
        db.close().await;
        stopped??;
        print!("{}", report.render());
        return Ok(if report.ok() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        });
    }
    let plan = backfill_the_past(&config, &db.pool, &registry).await?;
    print!("{}", crate::backfill::report::table(&plan));
    print_welcome(&sims, &tether_url, plan.plan);
    shutdown.cancelled().await;
    let result = service.await;
    db.close().await;
    result??;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tether's own port first: the simulators need it as their webhook target. `listen` as
/// configured (a container publishes 0.0.0.0:8080); a port in use falls back to any free one.
/// The simulators reach tether over loopback.
async fn bind(
    outer: &crate::config::Config,
) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = match tokio::net::TcpListener::bind(outer.listen).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], listener.local_addr()?.port()));
    Ok((listener, addr))
}

/// The simulators' configuration, with the database, log format and registry the operator gave.
fn sandbox_config(
    outer: &crate::config::Config,
    sims: &Simulators,
    addr: std::net::SocketAddr,
) -> anyhow::Result<crate::config::Config> {
    let mut source = crate::config::Source::empty();
    source.add_toml(
        &sims.config_toml(addr, &outer.data_dir, "1s"),
        Path::new("(sandbox)"),
    )?;
    let mut config = crate::config::Config::from_source(source)?;
    config.database = outer.database.clone();
    config.log_format = outer.log_format;
    config.registry = outer.registry.clone();
    Ok(config)
}

/// The registry with the operator's overlay, or for the demo (without one) the demo's overlay.
fn load_registry(
    outer: &crate::config::Config,
    config: &crate::config::Config,
    demo: bool,
) -> anyhow::Result<crate::registry::Registry> {
    use anyhow::Context as _;
    let overlay_file = outer.data_dir.join("sandbox-demo-overlay.toml");
    let overlay = if demo && config.registry.overlay.is_none() {
        std::fs::create_dir_all(&outer.data_dir)?;
        std::fs::write(&overlay_file, demo::OVERLAY)?;
        Some(overlay_file.as_path())
    } else {
        config.registry.overlay.as_deref()
    };
    let (registry, _warnings) =
        crate::registry::load(overlay).context("the mapping registry cannot be used")?;
    Ok(registry)
}

/// A sandbox starts from a clean slate each time: the simulators are new, so old links and
/// queued events would point at records that no longer exist.
async fn reset(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    crate::db::migrate(pool)
        .await
        .context("migrations failed")?;
    sqlx::query(
        "TRUNCATE events, jobs, links, link_intents, sync_log, poll_cursors, oauth_tokens, \
         webhook_registrations, system_connections, backfill_plans CASCADE",
    )
    .execute(pool)
    .await
    .context("cannot reset the sandbox database")?;
    Ok(())
}

/// Plans the backfill of every enabled flow, as an operator would with `tether backfill plan`,
/// and runs it (`tether backfill run --detach`): the seeded records reach the other systems.
async fn backfill_the_past(
    config: &crate::config::Config,
    pool: &sqlx::PgPool,
    registry: &crate::registry::Registry,
) -> anyhow::Result<crate::backfill::Summary> {
    let summary = crate::backfill::plan::make_and_store(config, pool, registry, &[]).await?;
    crate::backfill::store::enqueue(pool, summary.plan).await?;
    Ok(summary)
}

fn print_welcome(sims: &Simulators, tether_url: &str, plan: i64) {
    let zd = sims.url(SystemId::Zendesk);
    let po = sims.url(SystemId::PowerOffice);
    let erp = sims.url(SystemId::CustomErp);
    println!(
        r#"
Tether sandbox is running. Ctrl-C stops everything.

  tether           {tether_url}   (GET /readyz, POST /webhooks/{{system}})
  Zendesk          {zd}
  Exact Online     {exact}
  PowerOffice Go   {po}
  CRMOffice        {crm}
  Custom ERP       {erp}
  Custom PMS       {pms}

A few records were in PowerOffice and Exact before Tether connected: the sandbox planned their
backfill (plan {plan}, above) and runs it, so within seconds they appear in Zendesk and, from
there, in the Custom ERP and PMS (`tether backfill status {plan}` with the sandbox's database
shows how it went). Try:

  # 1. the organizations Tether created in Zendesk
  curl -s -u '{email}/token:{token}' {zd}/api/v2/organizations

  # 2. create one in Zendesk: it appears in the Custom ERP as a customer
  curl -s -u '{email}/token:{token}' -H 'content-type: application/json' \
       -d '{{"organization":{{"name":"Made in Zendesk"}}}}' {zd}/api/v2/organizations
  curl -s -H 'authorization: Bearer {erp_token}' {erp}/customer

  # 3. what Tether decided, per record
  cargo run -q -- links show zendesk Organizations <id>
"#,
        exact = sims.url(SystemId::ExactOnline),
        crm = sims.url(SystemId::CrmOffice),
        pms = sims.url(SystemId::CustomPms),
        email = credentials::ZENDESK_EMAIL,
        token = credentials::ZENDESK_TOKEN,
        erp_token = credentials::CUSTOMERP_TOKEN,
    );
    let _ = po;
}

/// The scripted walk through every dataflow (`tether sandbox --demo`).
pub mod demo {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::time::{Duration, Instant};

    use serde_json::{json, Map, Value};
    use sqlx::PgPool;

    use super::{credentials, Simulators};
    use crate::connectors::Connector as _;
    use crate::domain::SystemId;

    /// The demo maps the fields the shipped seeds leave unmapped (a Zendesk organization needs a
    /// `name`, a user a `name` and an `email`), so every flow can create its counterpart.
    pub const OVERLAY: &str = r#"# Written by `tether sandbox --demo`: lets the link-only flows of the seeds create records.
[[dataflow]]
source = "exactonline.Departments"
target = "zendesk.Organizations"
[[dataflow.property]]
source = "Description"
target = "name"
type = "string"

[[dataflow]]
source = "exactonline.Divisions"
target = "zendesk.Organizations"
[[dataflow.property]]
source = "Description"
target = "name"
type = "string"

[[dataflow]]
source = "poweroffice.Contactperson"
target = "zendesk.Users"
[[dataflow.property]]
source = "FirstName"
target = "name"
type = "string"
[[dataflow.property]]
source = "EmailAddress"
target = "email"
type = "string"

[[dataflow]]
source = "poweroffice.Employees"
target = "zendesk.Users"
[[dataflow.property]]
source = "FirstName"
target = "name"
type = "string"
[[dataflow.property]]
source = "EmailAddress"
target = "email"
type = "string"

[[rule]]
entity = "zendesk.Users"
property = "name"
resolve = "latest_wins"

[[rule]]
entity = "zendesk.Users"
property = "email"
resolve = "latest_wins"
"#;

    /// What happened per dataflow.
    #[derive(Debug, Default)]
    pub struct Report {
        pub flows: BTreeMap<String, FlowFigures>,
        pub dead_jobs: i64,
        pub problems: Vec<String>,
    }

    #[derive(Debug, Default, Clone)]
    pub struct FlowFigures {
        pub links: i64,
        pub created: i64,
        pub writes: i64,
        pub echoes: i64,
        pub errors: i64,
    }

    impl Report {
        /// Every flow linked at least one record, nothing errored, nothing was dead-lettered.
        pub fn ok(&self) -> bool {
            self.problems.is_empty()
                && self.dead_jobs == 0
                && self.flows.len() == 18
                && self.flows.values().all(|f| f.links > 0 && f.errors == 0)
        }

        pub fn render(&self) -> String {
            let mut out = String::new();
            let _ = writeln!(
                out,
                "\n{:<62} {:>5} {:>7} {:>6} {:>6} {:>6}",
                "dataflow", "links", "created", "writes", "echoes", "errors"
            );
            for (flow, f) in &self.flows {
                let _ = writeln!(
                    out,
                    "{flow:<62} {:>5} {:>7} {:>6} {:>6} {:>6}",
                    f.links, f.created, f.writes, f.echoes, f.errors
                );
            }
            let _ = writeln!(out, "dead-lettered jobs: {}", self.dead_jobs);
            for p in &self.problems {
                let _ = writeln!(out, "problem: {p}");
            }
            let _ = writeln!(
                out,
                "{}",
                if self.ok() {
                    "every dataflow behaved as the registry says"
                } else {
                    "SOME DATAFLOWS DID NOT BEHAVE AS THE REGISTRY SAYS"
                }
            );
            out
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// Creates one record per source type, the way users would, then waits for every flow to
    /// link (90 s at most) and reads the figures from the sync log.
    pub async fn run(sims: &Simulators, pool: &PgPool) -> Report {
        let mut report = Report::default();
        seed_poweroffice(sims);
        seed_exact(sims);
        if let Err(problem) = walk_zendesk(sims).await {
            report.problems.push(problem);
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let linked: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT flow_id) FROM links WHERE state = 'active'",
            )
            .fetch_one(pool)
            .await
            .unwrap_or(0);
            if linked >= 18 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Let echoes arrive and be recognised.
        tokio::time::sleep(Duration::from_secs(3)).await;
        fill_figures(pool, &mut report).await;
        report
    }

    /// A customer with a contact person, a supplier, a department with an employee.
    fn seed_poweroffice(sims: &Simulators) {
        let customer = sims.poweroffice.seed(
            "Customers",
            json!({"Name": "Demo Customer AS", "WebsiteUrl": "https://customer.example"}),
        );
        sims.poweroffice.seed(
            "Suppliers",
            json!({"Name": "Demo Supplier", "LegalName": "Demo Supplier AS"}),
        );
        let department = sims.poweroffice.seed(
            "Departments",
            json!({"Name": "Demo Department", "Code": "DD"}),
        );
        sims.poweroffice.seed(
            "ContactPersons",
            json!({"ContactId": customer["Id"], "FirstName": "Cora", "LastName": "Contact", "EmailAddress": "cora@customer.example"}),
        );
        sims.poweroffice.seed(
            "Employees",
            json!({"FirstName": "Emil", "LastName": "Employee", "EmailAddress": "emil@demo.example", "DepartmentId": department["Id"]}),
        );
    }

    /// An account (changed once, so its webhook goes out), a department and a division.
    fn seed_exact(sims: &Simulators) {
        let account = sims
            .exact
            .seed_account(json!({"Name": "Demo Account BV", "Code": "                42"}));
        sims.exact
            .change_account(&account, json!({"Name": "Demo Account BV"}));
        sims.exact
            .seed_department(json!({"Code": "D1", "Description": "Demo Exact Department"}));
        sims.exact
            .seed_division(json!({"Code": 424242, "Description": "Demo Exact Division"}));
    }

    /// A user, a ticket and a comment, made through Zendesk's API (which sends the webhooks).
    async fn walk_zendesk(sims: &Simulators) -> Result<(), String> {
        let zd = crate::connectors::zendesk::ZendeskConnector::new(
            &crate::config::ZendeskConfig {
                base_url: url::Url::parse(&sims.url(SystemId::Zendesk)).expect("a URL"),
                email: Some(credentials::ZENDESK_EMAIL.to_owned()),
                api_token: Some(credentials::ZENDESK_TOKEN.to_owned().into()),
                oauth_token: None,
                webhook_secrets: Vec::new(),
                rate_limit_per_minute: 6000,
            },
            Duration::from_secs(10),
        )
        .map_err(|e| format!("zendesk client: {e}"))?;
        let id = |r: &crate::connectors::Record| r.id.parse::<u64>().unwrap_or_default();
        let walk = async {
            let user = zd
                .create(
                    "Users",
                    &obj(json!({"name": "Ada Agent", "email": "ada@demo.example"})),
                    "demo-user",
                )
                .await?;
            let ticket = zd
                .create(
                    "Tickets",
                    &obj(json!({"subject": "Demo ticket", "requester_id": id(&user)})),
                    "demo-ticket",
                )
                .await?;
            zd.create(
                "Ticketcomments",
                &obj(json!({"ticket_id": id(&ticket), "body": "A demo comment"})),
                "demo-comment",
            )
            .await?;
            Ok::<_, crate::connectors::ConnectorError>(())
        };
        walk.await.map_err(|e| format!("zendesk: {e}"))
    }

    async fn fill_figures(pool: &PgPool, report: &mut Report) {
        let registry = crate::registry::load::read(None).map(|(r, _)| r);
        if let Ok(registry) = registry {
            for flow in &registry.dataflows {
                report.flows.insert(flow.id.clone(), FlowFigures::default());
            }
        }
        let links: Vec<(String, i64)> = sqlx::query_as(
            "SELECT flow_id, count(*) FROM links WHERE state = 'active' GROUP BY flow_id",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        for (flow, n) in links {
            report.flows.entry(flow).or_default().links = n;
        }
        let decisions: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT flow_id, decision, count(*) FROM sync_log WHERE flow_id IS NOT NULL \
             GROUP BY flow_id, decision",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        for (flow, decision, n) in decisions {
            let f = report.flows.entry(flow).or_default();
            match decision.as_str() {
                "created" => {
                    f.created += n;
                    f.writes += n;
                }
                "updated" => f.writes += n,
                "echo" | "unchanged" => f.echoes += n,
                "error" => f.errors += n,
                _ => {}
            }
        }
        report.dead_jobs = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'dead'")
            .fetch_one(pool)
            .await
            .unwrap_or(0);
    }
}

/// Registers Tether's webhooks at the simulators the way an operator does with
/// `tether webhooks install zendesk` and `... exactonline` (the same code), so the simulators, which deliver only to
/// registered webhooks, send their changes to this sandbox.
pub async fn install_webhooks(
    config: &crate::config::Config,
    pool: &sqlx::PgPool,
    registry: &crate::registry::Registry,
) -> anyhow::Result<()> {
    for system in [SystemId::Zendesk, SystemId::ExactOnline] {
        match crate::webhooks::install(config, pool, registry, system).await {
            // An overlay may switch off every flow of a system: nothing to subscribe to.
            Ok(_) | Err(crate::webhooks::WebhookError::NothingNeeded(_)) => {}
            Err(e) => anyhow::bail!("cannot install the {system} webhooks: {e}"),
        }
    }
    Ok(())
}
