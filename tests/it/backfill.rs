//! Backfill (issue 17): a plan of the records that existed before Tether, reviewed and then run
//! by the service's workers through the engine's own path, against the simulators and a real
//! PostgreSQL.
//!
//! - `plan_counts_every_verdict_and_run_links_or_creates_each_record_once`: exact plan counts
//!   (matching normalised), the run links and creates exactly what the plan said, and a second
//!   plan finds everything linked.
//! - `a_run_killed_mid_way_resumes_without_duplicates`: the service is killed (`kill -9`
//!   semantics) half way through a run and started again: every record gets exactly one
//!   counterpart.
//! - `a_page_of_links_with_one_target_taken_meanwhile_links_the_others_and_checks_that_one_again`:
//!   a page's planned links are stored together, the links' unique indexes deciding; the one
//!   whose target was linked after the plan loses alone and is decided again.
//! - `the_custom_erps_webhooks_of_a_pages_creates_are_echoes_settled_without_a_read`: a page's
//!   creates are their links' settled writes, so the target's `created` webhooks need no read.
//! - `the_cli_plans_runs_and_reports_a_backfill`: the commands as processes (JSON, CSV, run, status, a
//!   refused flow).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tether::backfill::store::{self, Enqueued};
use tether::backfill::{plan, report, FlowCounts, Summary};
use tether::registry::Registry;
use tether::simulators::zendesk::Kind;

use crate::support::{eventually, obj, Service as Harness};

const FLOW: &str = "zendesk.Organizations->customerp.Customer";

/// The shipped flow maps no property and has no merge criteria: link and copy by name.
const OVERLAY: &str = r#"
[[dataflow]]
source = "zendesk.Organizations"
target = "customerp.Customer"
[[dataflow.property]]
source = "name"
target = "name"
type = "string"
[[dataflow.merge]]
source = "name"
target = "name"

[[rule]]
entity = "zendesk.Organizations"
property = "name"
resolve = "latest_wins"
"#;

/// A short lease, so that jobs of a killed service are taken over within seconds.
const LAYER: &str = r#"
[outbound]
timeout = "1s"
[workers]
lease = "7s"
"#;

fn registry(h: &Harness) -> Registry {
    tether::registry::load(h.config.registry.overlay.as_deref())
        .unwrap()
        .0
}

/// Makes and stores a plan of [`FLOW`].
async fn make_plan(h: &Harness) -> Summary {
    plan::make_and_store(&h.config, &h.db.pool, &registry(h), &[FLOW.to_owned()])
        .await
        .unwrap()
}

/// Waits until every item of the plan is carried out (none may fail). The bound is for liveness
/// only, generous because the whole suite shares two cores with it (speed is what
/// `tether-backfill-bench` measures): 2,000 items took 70 s alone and passed 120 s under load.
async fn run_to_the_end(h: &Harness, id: i64) {
    eventually(
        "the plan to be carried out",
        Duration::from_secs(240),
        || async {
            let p = store::progress(&h.db.pool, id).await.unwrap();
            assert_eq!(p.failed, 0, "no item fails");
            p.finished()
        },
    )
    .await;
}

async fn active_links(h: &Harness) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM links WHERE state = 'active' AND flow_id = $1")
        .bind(FLOW)
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

/// Customers of the custom ERP by name: how many carry each.
fn customers_by_name(h: &Harness, ids: impl Iterator<Item = u64>) -> HashMap<String, usize> {
    let mut names = HashMap::new();
    for id in ids {
        if let Some(c) = h.sims.customerp.get("customer", &id.to_string()) {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            *names.entry(name).or_default() += 1;
        }
    }
    names
}

/// Organizations linked live before the plan, matching customers, and new ones.
const LIVE: usize = 5;
const MATCHED: usize = 1_200;
const NEW: usize = 800;

#[tokio::test]
async fn plan_counts_every_verdict_and_run_links_or_creates_each_record_once() {
    let h = Harness::start_layered(Some(OVERLAY), "", LAYER).await;
    let z = &h.sims.zendesk;
    let erp = &h.sims.customerp;
    // Already linked: made in Zendesk while Tether runs, synced live.
    for i in 0..LIVE {
        let made = z.create(
            Kind::Organization,
            json!({ "name": format!("Live Co {i}") }),
        );
        assert!(made.status().is_success());
    }
    eventually(
        "the live organizations to be linked",
        Duration::from_secs(60),
        || async { active_links(&h).await == LIVE as i64 },
    )
    .await;
    let mut matched = Vec::new();
    for i in 0..MATCHED {
        z.insert_organization(json!({ "name": format!("Match Co {i}") }));
        // Case and whitespace differ: a person would call them the same name.
        let id = erp.insert(
            "customer",
            obj(json!({ "name": format!("  match   CO {i} ") })),
            None,
        );
        matched.push(id);
    }
    for i in 0..NEW {
        z.insert_organization(json!({ "name": format!("New Co {i}") }));
    }
    // Two customers fit one organization; one customer fits two organizations.
    z.insert_organization(json!({"name": "Twin Co"}));
    erp.insert("customer", obj(json!({"name": "Twin Co"})), None);
    erp.insert("customer", obj(json!({"name": "twin co"})), None);
    z.insert_organization(json!({"name": "Pair Co"}));
    z.insert_organization(json!({"name": "Pair Co"}));
    erp.insert("customer", obj(json!({"name": "Pair Co"})), None);
    for i in 0..5 {
        erp.insert(
            "customer",
            obj(json!({ "name": format!("Only in the ERP {i}") })),
            None,
        );
    }

    let first = make_plan(&h).await;
    let counts = &first.flows[0];
    assert_eq!(
        (
            counts.flow.as_str(),
            counts.linked,
            counts.link,
            counts.create,
            counts.conflict,
            counts.skip
        ),
        (FLOW, LIVE as u64, MATCHED as u64, NEW as u64, 3, 0),
        "{counts:?}"
    );
    assert_eq!(
        counts.writes, MATCHED as u64,
        "each matched customer's name differs from the organization's"
    );
    assert!(first.vendor_calls["customerp"] > 0 && first.vendor_calls["zendesk"] > 0);
    // Exactly the issue's shape, in its order (serde_json's map would sort the keys: compare text).
    let text = report::json(&first);
    let prefix = format!(
        r#"{{"plan":{},"flows":[{{"flow":"{FLOW}","linked":{LIVE},"link":{MATCHED},"create":{NEW},"conflict":3,"skip":0"#,
        first.plan
    );
    assert!(text.starts_with(&prefix), "{text}");
    let after_flows = &text[text.find("]").unwrap()..];
    assert!(after_flows.starts_with(r#"],"vendor_calls":{"#), "{text}");
    assert!(after_flows.contains(r#"},"estimated_seconds":"#), "{text}");
    let printed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(printed["flows"][0]["create"], NEW);
    // Nothing was written to a vendor by planning.
    let before_run = LIVE + MATCHED + 2 + 1 + 5;
    assert_eq!(erp.len("customer"), before_run);
    assert_eq!(active_links(&h).await, LIVE as i64);

    assert_eq!(
        store::enqueue(&h.db.pool, first.plan).await.unwrap(),
        Enqueued::Now((MATCHED + NEW) as u64)
    );
    run_to_the_end(&h, first.plan).await;
    assert_eq!(
        store::enqueue(&h.db.pool, first.plan).await.unwrap(),
        Enqueued::Before
    );

    assert_eq!(active_links(&h).await, (LIVE + MATCHED + NEW) as i64);
    assert_eq!(
        erp.len("customer"),
        before_run + NEW,
        "the planned creates, nothing else"
    );
    for (i, id) in matched.iter().enumerate() {
        let c = erp.get("customer", id).unwrap();
        assert_eq!(
            c["name"],
            format!("Match Co {i}"),
            "the link wrote the source's name"
        );
    }
    let names = customers_by_name(&h, 1..=10_000);
    for i in 0..NEW {
        assert_eq!(names.get(&format!("New Co {i}")), Some(&1));
    }

    let second = make_plan(&h).await;
    assert_eq!(
        second.flows[0],
        FlowCounts {
            flow: FLOW.into(),
            linked: (LIVE + MATCHED + NEW) as u64,
            conflict: 3,
            ..FlowCounts::default()
        }
    );
    h.stop().await;
}

#[tokio::test]
async fn a_run_killed_mid_way_resumes_without_duplicates() {
    let mut h = Harness::start_layered(Some(OVERLAY), "", LAYER).await;
    const N: usize = 400;
    for i in 0..N {
        h.sims
            .zendesk
            .insert_organization(json!({ "name": format!("Old Org {i}") }));
    }
    let plan = make_plan(&h).await;
    assert_eq!(plan.flows[0].create, N as u64);
    assert_eq!(
        store::enqueue(&h.db.pool, plan.plan).await.unwrap(),
        Enqueued::Now(N as u64)
    );
    eventually(
        "the run to be under way",
        Duration::from_secs(60),
        || async { store::progress(&h.db.pool, plan.plan).await.unwrap().done >= 20 },
    )
    .await;
    h.kill();
    let done_at_kill = store::progress(&h.db.pool, plan.plan).await.unwrap().done;
    assert!(
        done_at_kill < N as u64,
        "killed half way ({done_at_kill} of {N} done)"
    );

    h.restart(registry(&h));
    // Running it again adds nothing: the jobs are in the queue already.
    assert_eq!(
        store::enqueue(&h.db.pool, plan.plan).await.unwrap(),
        Enqueued::Before
    );
    run_to_the_end(&h, plan.plan).await;

    assert_eq!(active_links(&h).await, N as i64);
    assert_eq!(
        h.sims.customerp.len("customer"),
        N,
        "exactly one counterpart each"
    );
    let names = customers_by_name(&h, 1..=(2 * N as u64));
    assert_eq!(names.len(), N);
    assert!(names.values().all(|&n| n == 1));
    h.stop().await;
}

/// A page's planned links are stored in one statement (docs/backfill.md, "Running a plan"), the
/// links' unique indexes deciding. A customer linked to another organization after the plan
/// makes its planned link lose: that organization alone is decided again (the engine's own
/// merge criteria find the customer taken, so it gets a counterpart of its own), and every
/// other organization of the page is linked to its planned customer.
#[tokio::test]
async fn a_page_of_links_with_one_target_taken_meanwhile_links_the_others_and_checks_that_one_again(
) {
    let h = Harness::start_layered(Some(OVERLAY), "", LAYER).await;
    const N: usize = 20;
    for i in 0..N {
        h.sims
            .zendesk
            .insert_organization(json!({ "name": format!("Batch Co {i}") }));
        h.sims.customerp.insert(
            "customer",
            obj(json!({ "name": format!("batch  CO {i}") })),
            None,
        );
    }
    let plan = make_plan(&h).await;
    assert_eq!((plan.flows[0].link, plan.flows[0].create), (N as u64, 0));
    let planned: Vec<(String, String)> = sqlx::query_as(
        "SELECT source_id, target_id FROM backfill_items WHERE plan_id = $1 ORDER BY id",
    )
    .bind(plan.plan)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(planned.len(), N);
    // After the plan, another record of the flow is linked to the third organization's match.
    let (loser, taken) = planned[2].clone();
    let flow = registry(&h)
        .dataflows
        .into_iter()
        .find(|f| f.id == FLOW)
        .unwrap();
    sqlx::query(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id) VALUES ($1, $2, $3, 'elsewhere', $4, $5, $6)",
    )
    .bind(FLOW)
    .bind(flow.source.system.as_str())
    .bind(&flow.source.entity_type)
    .bind(flow.target.system.as_str())
    .bind(&flow.target.entity_type)
    .bind(&taken)
    .execute(&h.db.pool)
    .await
    .unwrap();

    store::enqueue(&h.db.pool, plan.plan).await.unwrap();
    run_to_the_end(&h, plan.plan).await;

    let results: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT source_id, result FROM backfill_items WHERE plan_id = $1 ORDER BY id",
    )
    .bind(plan.plan)
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    for (source, result) in &results {
        let expected = if *source == loser {
            "replanned"
        } else {
            "followed"
        };
        assert_eq!(result.as_deref(), Some(expected), "organization {source}");
    }
    let links: HashMap<String, String> = sqlx::query_as(
        "SELECT source_id, target_id FROM links WHERE state = 'active' AND flow_id = $1",
    )
    .bind(FLOW)
    .fetch_all(&h.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(
        links.len(),
        N + 1,
        "one link per organization, and the other record's"
    );
    assert_eq!(
        links["elsewhere"], taken,
        "the taken customer keeps its one link"
    );
    for (source, target) in &planned {
        if *source == loser {
            assert_ne!(links[source], taken, "never linked to a taken record");
        } else {
            assert_eq!(&links[source], target, "linked as planned");
        }
    }
    assert_eq!(
        h.sims.customerp.len("customer"),
        N + 1,
        "one counterpart created, for the organization decided again"
    );
    h.stop().await;
}

/// A counterpart a backfill page created is its link's settled write (the create's answer showed
/// the values sent, with its stamp): the Custom ERP's `created` webhook carrying that stamp is the
/// echo, settled without reading the customer (docs/sync-rules.md, "An echo without a read").
/// The simulator's webhooks wait 300 ms, as a vendor's queue does, so that they arrive after the
/// page stored its links (one arriving before would be read, as any unknown change is).
#[tokio::test]
async fn the_custom_erps_webhooks_of_a_pages_creates_are_echoes_settled_without_a_read() {
    let h = Harness::start_layered(Some(OVERLAY), "", LAYER).await;
    const N: usize = 12;
    for i in 0..N {
        h.sims
            .zendesk
            .insert_organization(json!({ "name": format!("Fresh Co {i}") }));
    }
    let plan = make_plan(&h).await;
    assert_eq!(plan.flows[0].create, N as u64);
    let erp = &h.sims.customerp.control;
    erp.set_faults(tether::simulators::kit::Faults {
        webhook_latency_ms: 300,
        ..Default::default()
    });
    erp.reset_counters();
    store::enqueue(&h.db.pool, plan.plan).await.unwrap();
    run_to_the_end(&h, plan.plan).await;
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM links WHERE flow_id = $1 AND state = 'active' AND last_write_settled",
    )
    .bind(FLOW)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(settled, N as i64, "each create is its link's settled write");
    let echoes = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT l.decision, count(*) FROM sync_log l JOIN events e ON e.id = l.event_id \
             WHERE e.system = 'customerp' AND e.action = 'created' GROUP BY 1",
        )
        .fetch_all(&h.db.pool)
        .await
        .unwrap()
    };
    eventually(
        "the ERP's webhooks of the creates to be logged",
        Duration::from_secs(60),
        || async { echoes().await.iter().map(|(_, n)| n).sum::<i64>() >= N as i64 },
    )
    .await;
    assert_eq!(echoes().await, vec![("echo".to_owned(), N as i64)]);
    assert_eq!(
        erp.count("GET /{kind}/{id}"),
        0,
        "no customer read: {:?}",
        erp.counters()
    );
    h.stop().await;
}

/// The commands as an operator runs them, as processes against the running service's database:
/// `plan --json --csv`, `run` (followed to the end by the workers of the service), `status`, and a
/// flow that does not exist (exit 2, nothing stored).
#[tokio::test]
async fn the_cli_plans_runs_and_reports_a_backfill() {
    let h = Harness::start_layered(Some(OVERLAY), "", LAYER).await;
    for name in ["Cli One", "Cli Two", "Cli Three"] {
        h.sims.zendesk.insert_organization(json!({ "name": name }));
    }
    h.sims
        .customerp
        .insert("customer", obj(json!({"name": "cli one"})), None);
    let dir = std::env::temp_dir().join(format!("tether-backfill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: std::net::SocketAddr = h.base.trim_start_matches("http://").parse().unwrap();
    let overlay = dir.join("overlay.toml");
    std::fs::write(&overlay, OVERLAY).unwrap();
    let toml = h.sims.config_toml(listen, &dir, "1s")
        + &format!(
            "\n[registry]\noverlay = {:?}\n",
            overlay.display().to_string()
        );
    std::fs::write(dir.join("tether.toml"), toml).unwrap();
    let run = |args: Vec<String>| {
        let (config, url) = (dir.join("tether.toml"), h.db.url.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(&args)
                .arg("--config")
                .arg(&config)
                .env("DATABASE_URL", secrecy::ExposeSecret::expose_secret(&url))
                .output()
                .await
                .unwrap()
        }
    };
    let csv = dir.join("plan.csv");
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let plan = run(args(&[
        "backfill",
        "plan",
        "--json",
        "--flow",
        FLOW,
        "--csv",
        csv.to_str().unwrap(),
    ]))
    .await;
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let summary: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(summary["flows"][0]["link"], 1);
    assert_eq!(summary["flows"][0]["create"], 2);
    let id = summary["plan"].as_i64().unwrap().to_string();
    let lines = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    assert!(lines.contains("link") && lines.contains("create"));

    let ran = run(args(&["backfill", "run", &id])).await;
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(String::from_utf8_lossy(&ran.stderr).contains("finished, 3 carried out, 0 failed"));
    assert_eq!(active_links(&h).await, 3);
    let status = run(args(&["backfill", "status", &id])).await;
    assert!(String::from_utf8_lossy(&status.stdout).contains("3 of 3 items carried out"));

    let unknown = run(args(&[
        "backfill",
        "plan",
        "--flow",
        "zendesk.Nope->customerp.Customer",
    ]))
    .await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("is not a dataflow of the registry"));
    let plans: i64 = sqlx::query_scalar("SELECT count(*) FROM backfill_plans")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(plans, 1, "a refused plan stores nothing");
    std::fs::remove_dir_all(&dir).ok();
    h.stop().await;
}
