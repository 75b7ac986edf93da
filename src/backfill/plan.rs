//! Making a plan: which flows it covers, every record of both sides of each (read page by page
//! with [`Connector::list_existing`]), the links that exist, and each source record classified
//! ([`super::classify`]). Nothing is written to a vendor.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::connectors::{ChangePage, Connector, ConnectorError, Record};
use crate::domain::SystemId;
use crate::registry::{Dataflow, EntityRef, Registry};

use super::classify::{self, Classified, Linked};
use super::estimate::{self, Limit};
use super::{FlowCounts, Summary};

/// A plan before and after it is stored.
#[derive(Debug, Clone)]
pub struct Plan {
    pub flows: Vec<FlowPlan>,
    pub summary: Summary,
}

/// One flow's part of a plan.
#[derive(Debug, Clone)]
pub struct FlowPlan {
    pub flow: Dataflow,
    /// Run order: a flow whose source records other flows reference runs in an earlier stage
    /// (parents before children).
    pub stage: i32,
    pub items: Vec<Classified>,
}

/// Why no plan could be made. Bad input names the flag and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("`--flow {0}` is not a dataflow of the registry; `tether registry export` lists them (ids look like `zendesk.Organizations->customerp.Customer`)")]
    UnknownFlow(String),
    #[error("`--flow {flow}` cannot be backfilled: {why}")]
    FlowNotRunnable { flow: String, why: String },
    #[error("no enabled dataflow has both of its systems connected; nothing to plan")]
    NothingToPlan,
    #[error("reading {system}/{entity_type} failed: {source}")]
    Read {
        system: SystemId,
        entity_type: String,
        source: ConnectorError,
    },
    #[error("{system}/{entity_type} kept answering the same page; stopped reading it")]
    EndlessPaging {
        system: SystemId,
        entity_type: String,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the connectors cannot be built: {0}")]
    Connectors(String),
}

/// The flows a plan covers: the enabled flows whose two systems are connected, or the ones
/// asked for (each of which must be such a flow).
pub fn select_flows<'r>(
    registry: &'r Registry,
    connectors: &HashMap<SystemId, Arc<dyn Connector>>,
    only: &[String],
) -> Result<Vec<&'r Dataflow>, PlanError> {
    let why_not = |f: &Dataflow| -> Option<String> {
        if !f.switches.enabled {
            return Some("it is switched off in the registry".into());
        }
        [f.source.system, f.target.system]
            .into_iter()
            .find(|s| !connectors.contains_key(s))
            .map(|s| format!("{} is not connected", s.display_name()))
    };
    if only.is_empty() {
        let flows: Vec<&Dataflow> = registry
            .dataflows
            .iter()
            .filter(|f| why_not(f).is_none())
            .collect();
        return if flows.is_empty() {
            Err(PlanError::NothingToPlan)
        } else {
            Ok(flows)
        };
    }
    let mut flows = Vec::new();
    for id in only {
        let flow = registry
            .flow(id)
            .ok_or_else(|| PlanError::UnknownFlow(id.clone()))?;
        if let Some(why) = why_not(flow) {
            return Err(PlanError::FlowNotRunnable {
                flow: id.clone(),
                why,
            });
        }
        if !flows.iter().any(|f: &&Dataflow| f.id == flow.id) {
            flows.push(flow);
        }
    }
    Ok(flows)
}

/// What `tether backfill plan` does: reads with the connectors `serve` builds, estimates at the
/// configured limits, and stores the plan. Returns its summary (with its id).
pub async fn make_and_store(
    config: &crate::config::Config,
    pool: &PgPool,
    registry: &Registry,
    only: &[String],
) -> Result<Summary, PlanError> {
    let connectors = crate::service::build_connectors(config, pool)
        .map_err(|e| PlanError::Connectors(format!("{e:#}")))?;
    let limits = estimate::limits(config);
    let mut plan = make(pool, registry, &connectors, &limits, only).await?;
    super::store::save(pool, &mut plan).await?;
    Ok(plan.summary)
}

/// Reads, links and classifies; the plan is not stored yet (its id is 0).
pub async fn make(
    pool: &PgPool,
    registry: &Registry,
    connectors: &HashMap<SystemId, Arc<dyn Connector>>,
    limits: &BTreeMap<SystemId, Limit>,
    only: &[String],
) -> Result<Plan, PlanError> {
    let flows = select_flows(registry, connectors, only)?;
    let mut records: HashMap<EntityRef, Vec<Record>> = HashMap::new();
    for flow in &flows {
        for side in [&flow.source, &flow.target] {
            if !records.contains_key(side) {
                let conn = &connectors[&side.system];
                records.insert(
                    side.clone(),
                    read_all(conn.as_ref(), &side.entity_type).await?,
                );
            }
        }
    }
    let stages = stages(&flows);
    let mut plans = Vec::with_capacity(flows.len());
    for flow in &flows {
        let linked = links_of(pool, flow).await?;
        let items = classify::classify(
            registry,
            flow,
            &records[&flow.source],
            &records[&flow.target],
            &linked,
        );
        plans.push(FlowPlan {
            flow: (*flow).clone(),
            stage: stages[&flow.id],
            items,
        });
    }
    conflict_across_flows(&mut plans);
    let summary = summarize(registry, &plans, limits);
    Ok(Plan {
        flows: plans,
        summary,
    })
}

/// Every record of a type, page by page from the beginning.
async fn read_all(conn: &dyn Connector, entity_type: &str) -> Result<Vec<Record>, PlanError> {
    let read_error = |source| PlanError::Read {
        system: conn.system(),
        entity_type: entity_type.to_owned(),
        source,
    };
    let mut by_id: BTreeMap<String, Record> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = read_page(conn, entity_type, cursor.as_deref())
            .await
            .map_err(read_error)?;
        for r in page.records {
            // A record met twice (it changed while being read) counts once, as last seen.
            by_id.insert(r.id.clone(), r);
        }
        if !page.has_more {
            return Ok(by_id.into_values().collect());
        }
        if page.next_cursor.is_none() || page.next_cursor == cursor {
            return Err(PlanError::EndlessPaging {
                system: conn.system(),
                entity_type: entity_type.to_owned(),
            });
        }
        cursor = page.next_cursor;
    }
}

/// One page, waiting out the vendor's rate limit (as long as it says) and retrying a transient
/// failure a few times: a plan of thousands of records must not fail on the limit it keeps to.
async fn read_page(
    conn: &dyn Connector,
    entity_type: &str,
    cursor: Option<&str>,
) -> Result<ChangePage, ConnectorError> {
    const TRANSIENT_TRIES: u32 = 5;
    let mut transient = 0;
    loop {
        match conn.list_existing(entity_type, cursor).await {
            Err(ConnectorError::RateLimited { retry_after, .. }) => {
                let wait = retry_after.unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(wait.min(Duration::from_secs(120))).await;
            }
            Err(ConnectorError::Transient { .. } | ConnectorError::Timeout { .. })
                if transient < TRANSIENT_TRIES =>
            {
                transient += 1;
                tokio::time::sleep(Duration::from_millis(500) * transient).await;
            }
            other => return other,
        }
    }
}

/// The active links that matter to `flow` (see [`Linked`]).
async fn links_of(pool: &PgPool, flow: &Dataflow) -> Result<Linked, sqlx::Error> {
    let rows: Vec<(String, String, String, String, String, String)> = sqlx::query_as(
        "SELECT source_system, source_type, source_id, target_system, target_type, target_id \
         FROM links WHERE state = 'active' \
         AND ((source_system = $1 AND source_type = $2) OR (target_system = $1 AND target_type = $2))",
    )
    .bind(flow.target.system.as_str())
    .bind(&flow.target.entity_type)
    .fetch_all(pool)
    .await?;
    let mut linked = Linked::default();
    let (src, tgt) = (&flow.source, &flow.target);
    for (ss, st, sid, ts, tt, tid) in rows {
        let is = |e: &EntityRef, system: &str, ty: &str| {
            e.system.as_str() == system && e.entity_type == ty
        };
        if is(src, &ss, &st) && is(tgt, &ts, &tt) {
            linked.counterpart.insert(sid.clone(), tid.clone());
        } else if is(tgt, &ss, &st) && is(src, &ts, &tt) {
            linked.counterpart.insert(tid.clone(), sid.clone());
        }
        // Taken: the target record is the counterpart of a record of some type already (a flow
        // into the target type, or a flow between the two types the other way).
        if is(tgt, &ts, &tt) {
            linked.taken.insert(tid, format!("{ss}/{st}/{sid}"));
        } else if is(src, &ts, &tt) {
            linked.taken.insert(sid, format!("{ts}/{tt}/{tid}"));
        }
    }
    Ok(linked)
}

/// Flows whose source records others reference run first: a flow's stage is one more than the
/// highest stage of the flows whose source type its references point at (cycles are cut).
fn stages(flows: &[&Dataflow]) -> HashMap<String, i32> {
    let mut stage: HashMap<String, i32> = flows.iter().map(|f| (f.id.clone(), 0)).collect();
    for _ in 0..flows.len() {
        let mut changed = false;
        for f in flows {
            let referenced: HashSet<&str> = f
                .properties
                .iter()
                .filter_map(|p| p.reference.as_ref())
                .flat_map(|r| r.source_types.iter().map(String::as_str))
                .collect();
            let parents = flows.iter().filter(|p| {
                p.id != f.id
                    && p.source.system == f.source.system
                    && referenced.contains(p.source.entity_type.as_str())
            });
            let want = parents.map(|p| stage[&p.id] + 1).max().unwrap_or(0);
            if want > stage[&f.id] && want < flows.len() as i32 {
                stage.insert(f.id.clone(), want);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    stage
}

/// Flows of the plan into the same target type must not link one target record twice either.
fn conflict_across_flows(plans: &mut [FlowPlan]) {
    let targets: BTreeSet<EntityRef> = plans.iter().map(|p| p.flow.target.clone()).collect();
    for target in targets {
        let mut sharing: Vec<&mut Classified> = plans
            .iter_mut()
            .filter(|p| p.flow.target == target)
            .flat_map(|p| p.items.iter_mut())
            .collect();
        classify::conflict_shared_targets(&mut sharing);
    }
}

/// The counts per flow, the calls per system and the estimate.
pub fn summarize(
    registry: &Registry,
    plans: &[FlowPlan],
    limits: &BTreeMap<SystemId, Limit>,
) -> Summary {
    let mut calls: BTreeMap<SystemId, u64> = BTreeMap::new();
    let mut to_run: HashSet<(SystemId, &str, &str)> = HashSet::new();
    let mut flows = Vec::with_capacity(plans.len());
    for p in plans {
        let mut counts = FlowCounts {
            flow: p.flow.id.clone(),
            ..FlowCounts::default()
        };
        for item in &p.items {
            counts.add(&item.verdict);
            estimate::add_item_calls(registry, &p.flow, &item.verdict, &mut calls);
            if item.verdict.kind().runs() {
                to_run.insert((
                    p.flow.source.system,
                    p.flow.source.entity_type.as_str(),
                    item.source_id.as_str(),
                ));
            }
        }
        flows.push(counts);
    }
    let mut per_type: BTreeMap<(SystemId, &str), u64> = BTreeMap::new();
    for (system, entity_type, _) in &to_run {
        *per_type.entry((*system, entity_type)).or_default() += 1;
    }
    for ((system, entity_type), n) in per_type {
        *calls.entry(system).or_default() += estimate::source_read_calls(system, entity_type, n);
    }
    let records_to_run = to_run.len() as u64;
    Summary {
        plan: 0,
        flows,
        estimated_seconds: estimate::run_seconds(&calls, limits, records_to_run),
        vendor_calls: calls
            .into_iter()
            .map(|(s, n)| (s.as_str().to_owned(), n))
            .collect(),
        records_to_run,
    }
}
