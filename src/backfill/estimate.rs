//! What running a plan costs: vendor calls per system, and the time those calls take at each
//! vendor's limits (docs/vendors.md, "Limits"; docs/backfill.md, "The estimate"). Pure.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::domain::SystemId;
use crate::registry::{Dataflow, Registry};

use super::store::BATCH_RECORDS;
use super::Verdict;

/// A vendor's limits on calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Calls a minute (None: no documented limit).
    pub per_minute: Option<u32>,
    /// Calls a day (Exact Online's 5,000).
    pub per_day: Option<u64>,
}

/// Exact Online's limits per division: 60 calls a minute and 5,000 a day (docs/vendors.md).
pub const EXACT: Limit = Limit {
    per_minute: Some(60),
    per_day: Some(5_000),
};
/// PowerOffice Go: 10 requests a second per subscription key.
pub const POWEROFFICE: Limit = Limit {
    per_minute: Some(600),
    per_day: None,
};
/// CRMOffice and the custom systems document no limit.
pub const NONE: Limit = Limit {
    per_minute: None,
    per_day: None,
};

/// The limits Tether keeps to per system, as configured (Zendesk's is the plan's,
/// `zendesk.rate_limit_per_minute`).
pub fn limits(config: &Config) -> BTreeMap<SystemId, Limit> {
    let zendesk = Limit {
        per_minute: config
            .systems
            .zendesk
            .as_ref()
            .map(|z| z.rate_limit_per_minute),
        per_day: None,
    };
    SystemId::ALL
        .into_iter()
        .map(|s| {
            let limit = match s {
                SystemId::Zendesk => zendesk,
                SystemId::ExactOnline => EXACT,
                SystemId::PowerOffice => POWEROFFICE,
                SystemId::CrmOffice | SystemId::CustomErp | SystemId::CustomPms => NONE,
            };
            (s, limit)
        })
        .collect()
}

/// Calls one creation makes: Zendesk users are looked up by external id before the POST
/// (docs/vendors.md, Zendesk); everything else is one call.
fn create_calls(flow: &Dataflow) -> u64 {
    match (flow.target.system, flow.target.entity_type.as_str()) {
        (SystemId::Zendesk, "Users") => 2,
        _ => 1,
    }
}

/// Records of one type a read by id returns per call when a backfill page reads its records
/// (`Connector::fetch_many`): Zendesk organizations and users come 100 a call
/// (`show_many?ids=`, docs/vendors.md, Zendesk); everything else is one call each.
fn records_per_read(system: SystemId, entity_type: &str) -> usize {
    match (system, entity_type) {
        (SystemId::Zendesk, "Organizations" | "Users") => 100,
        _ => 1,
    }
}

/// Calls reading `n` source records of one type now (rule 7) takes: a page of
/// [`BATCH_RECORDS`] records at a time, each page in calls of [`records_per_read`].
pub fn source_read_calls(system: SystemId, entity_type: &str, n: u64) -> u64 {
    let per_call = records_per_read(system, entity_type) as u64;
    let page = BATCH_RECORDS as u64;
    let (full, rest) = (n / page, n % page);
    full * page.div_ceil(per_call) + rest.div_ceil(per_call)
}

/// Adds the target's calls running one item makes to `calls`: the engine reads the match and
/// writes the values that differ (link) or creates (create); a written record whose type takes
/// part in other flows is read once more by its fan-out job. Verdicts that do not run cost
/// nothing. The source's reads are counted per record, by [`source_read_calls`].
pub fn add_item_calls(
    registry: &Registry,
    flow: &Dataflow,
    verdict: &Verdict,
    calls: &mut BTreeMap<SystemId, u64>,
) {
    let target_calls = match verdict {
        Verdict::Link { writes, .. } => 1 + u64::from(*writes > 0),
        Verdict::Create => create_calls(flow),
        Verdict::Linked { .. } | Verdict::Conflict(_) | Verdict::Skip(_) => return,
    };
    let fan_out = registry
        .dataflows
        .iter()
        .any(|f| f.id != flow.id && f.switches.enabled && f.touches(&flow.target));
    *calls.entry(flow.target.system).or_default() += target_calls + u64::from(fan_out);
}

/// Seconds `n` calls take at `limit`: a minute's calls spread over the minute, and a day's
/// quota used up means waiting for the next day.
pub fn seconds_for(n: u64, limit: Limit) -> f64 {
    let Some(per_minute) = limit.per_minute.filter(|m| *m > 0) else {
        return 0.0;
    };
    let per_second = f64::from(per_minute) / 60.0;
    match limit.per_day {
        Some(day) if n > day => {
            let full_days = (n - 1) / day;
            full_days as f64 * 86_400.0 + (n - full_days * day) as f64 / per_second
        }
        _ => n as f64 / per_second,
    }
}

/// The vendors' part of the run's duration: the systems are called in parallel, so the slowest
/// system's calls.
pub fn estimated_seconds(
    calls: &BTreeMap<SystemId, u64>,
    limits: &BTreeMap<SystemId, Limit>,
) -> u64 {
    calls
        .iter()
        .map(|(s, n)| seconds_for(*n, limits.get(s).copied().unwrap_or(NONE)))
        .fold(0.0, f64::max)
        .ceil() as u64
}

/// Tether's own time per record run, when no vendor limit is slower: the engine's work in Tether
/// and at PostgreSQL, as `tether-backfill-bench` measured it (docs/backfill.md, "The estimate":
/// 2,300-2,400 records a second on two cores otherwise idle, half that with other work beside
/// it). A machine with more cores runs faster; the figure keeps an unthrottled estimate from
/// saying nothing.
pub const ENGINE_SECONDS_PER_RECORD: f64 = 1.0 / 2_000.0;

/// The run's duration: the vendors' calls at their limits ([`estimated_seconds`]) or Tether's own
/// time for `records` ([`ENGINE_SECONDS_PER_RECORD`]), whichever is longer (the engine works
/// while it waits for a vendor's limit).
pub fn run_seconds(
    calls: &BTreeMap<SystemId, u64>,
    limits: &BTreeMap<SystemId, Limit>,
    records: u64,
) -> u64 {
    let engine = (records as f64 * ENGINE_SECONDS_PER_RECORD).ceil() as u64;
    estimated_seconds(calls, limits).max(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zendesk_organizations_are_read_a_page_a_call_and_other_types_one_each() {
        let zendesk = |n| source_read_calls(SystemId::Zendesk, "Organizations", n);
        assert_eq!(
            (zendesk(0), zendesk(1), zendesk(50), zendesk(51)),
            (0, 1, 1, 2)
        );
        assert_eq!(zendesk(10_000), 200);
        assert_eq!(source_read_calls(SystemId::Zendesk, "Tickets", 120), 120);
    }

    #[test]
    fn exact_takes_a_second_a_call_and_waits_a_day_per_5000() {
        assert_eq!(seconds_for(60, EXACT), 60.0);
        assert_eq!(seconds_for(5_000, EXACT), 5_000.0);
        assert_eq!(seconds_for(5_001, EXACT), 86_400.0 + 1.0);
        assert_eq!(seconds_for(12_000, EXACT), 2.0 * 86_400.0 + 2_000.0);
    }

    #[test]
    fn the_slowest_system_sets_the_duration_and_unlimited_costs_nothing() {
        let limits: BTreeMap<SystemId, Limit> = [
            (
                SystemId::Zendesk,
                Limit {
                    per_minute: Some(200),
                    per_day: None,
                },
            ),
            (SystemId::PowerOffice, POWEROFFICE),
            (SystemId::CustomErp, NONE),
        ]
        .into();
        let calls: BTreeMap<SystemId, u64> = [
            (SystemId::Zendesk, 1_000),
            (SystemId::PowerOffice, 1_000),
            (SystemId::CustomErp, 50_000),
        ]
        .into();
        assert_eq!(estimated_seconds(&calls, &limits), 300);
        assert_eq!(seconds_for(50_000, NONE), 0.0);
    }

    #[test]
    fn a_run_takes_the_vendors_time_or_tethers_own_whichever_is_longer() {
        let limits: BTreeMap<SystemId, Limit> = [(
            SystemId::Zendesk,
            Limit {
                per_minute: Some(200),
                per_day: None,
            },
        )]
        .into();
        let calls: BTreeMap<SystemId, u64> =
            [(SystemId::Zendesk, 200), (SystemId::CustomErp, 13_000)].into();
        // 200 Zendesk calls at 200 a minute: a minute, longer than 10,000 records' own time.
        assert_eq!(run_seconds(&calls, &limits, 10_000), 60);
        // Unlimited vendors: Tether's own time.
        let unlimited = BTreeMap::from([(SystemId::Zendesk, NONE)]);
        let own = (10_000.0 * ENGINE_SECONDS_PER_RECORD).ceil() as u64;
        assert_eq!(run_seconds(&calls, &unlimited, 10_000), own);
        assert!(own > 0);
        assert_eq!(run_seconds(&BTreeMap::new(), &unlimited, 0), 0);
    }
}
