//! The guard against mass changes (docs/guard.md): before a flow's write is sent, the writes the
//! flow made within its window are counted from PostgreSQL; a write that would pass a threshold
//! pauses the flow, and from then on its writes are held (durably, in order) until the operator
//! releases or discards them (`tether guard`). `tether undo` writes back what a flow wrote.
//!
//! Owns: `guard_trips`, `guard_writes`, `guard_held`, `guard_released`.
//! Called by: the sync engine ([`Guard::admit`] before each update or create), the CLI.
//!
//! Counting and deciding happen in one transaction under an advisory lock on the flow, so
//! replicas deciding at once see each other's writes: exactly the writes past a threshold are held.

pub mod command;
pub mod held;
pub mod settings;
pub mod undo;

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};

use crate::queue::{ClaimedJob, JobPriority};
use crate::registry::Dataflow;
pub use settings::{GuardOverride, GuardSettings};

/// One property of a planned write, as the guard counts it and holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteItem {
    /// `<system>/<type>/<id>` of the record written (for a create: the source record).
    pub record: String,
    /// `source` or `target`: the side of the flow written.
    pub side: &'static str,
    /// The field written, as that side names it.
    pub property: String,
    pub old: Option<Value>,
    pub new: Value,
}

/// A write a flow is about to send: an update of a linked pair, or a create.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedWrite {
    pub link_id: Option<i64>,
    pub is_create: bool,
    pub items: Vec<WriteItem>,
}

/// What the guard says about one write.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Send it (it was counted).
    Send,
    /// Send it without counting: backfill work the operator approved, or a released write.
    Exempt,
    /// Held; the flow is paused. `tripped` is the reason when this write paused it.
    Held { tripped: Option<Trip> },
}

/// Which threshold a write passed.
#[derive(Debug, Clone, PartialEq)]
pub enum Trip {
    Writes {
        limit: u32,
        window: String,
    },
    SameValue {
        property: String,
        limit: u32,
        window: String,
    },
    ChangedFraction {
        changed: i64,
        links: i64,
        limit: f64,
        window: String,
    },
}

impl std::fmt::Display for Trip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trip::Writes { limit, window } => {
                write!(f, "more than {limit} writes within {window} (max_writes)")
            }
            Trip::SameValue { property, limit, window } => write!(
                f,
                "more than {limit} records given the same new `{property}` within {window} (max_same_value)"
            ),
            Trip::ChangedFraction { changed, links, limit, window } => write!(
                f,
                "{changed} of {links} linked records changed within {window}, more than {:.0}% (max_changed_fraction)",
                limit * 100.0
            ),
        }
    }
}

/// The guard as the sync engine holds it: the configuration's settings and the pool.
#[derive(Debug, Clone)]
pub struct Guard {
    pool: PgPool,
    settings: GuardSettings,
}

/// The window's counts for one write.
struct Counts {
    writes: i64,
    /// Other linked records updated within the window (creates change no linked record).
    other_records: i64,
    /// The most records (other than this one) that got one of this write's new values.
    same_value: i64,
    same_value_property: Option<String>,
    links: i64,
}

impl Guard {
    pub fn new(pool: PgPool, settings: GuardSettings) -> Guard {
        Guard { pool, settings }
    }

    /// The settings `flow` runs under.
    pub fn settings_of(&self, flow: &Dataflow) -> GuardSettings {
        flow.guard.over(self.settings)
    }

    /// Decides about `write` of `flow` for `job`, counting it or holding it (see the module doc).
    pub async fn admit(
        &self,
        flow: &Dataflow,
        job: &ClaimedJob,
        write: &PlannedWrite,
    ) -> Result<Verdict, sqlx::Error> {
        let settings = self.settings_of(flow);
        if !settings.enabled || job.priority == JobPriority::Backfill || write.items.is_empty() {
            return Ok(Verdict::Exempt);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tether-guard:' || $1))")
            .bind(&flow.id)
            .execute(&mut *tx)
            .await?;
        let verdict = decide(&mut tx, flow, job, write, &settings).await?;
        if let Verdict::Held { tripped } = &verdict {
            if let Some(trip) = tripped {
                held::trip(&mut tx, &flow.id, &trip.to_string()).await?;
            }
            held::hold(&mut tx, &flow.id, job, write).await?;
        }
        tx.commit().await?;
        if let Verdict::Held {
            tripped: Some(trip),
        } = &verdict
        {
            tracing::warn!(
                flow = %flow.id,
                reason = %trip,
                "guard tripped: the flow is paused and holds its writes until `tether guard release` or `discard`"
            );
        }
        Ok(verdict)
    }
}

/// The decision inside the flow's lock.
async fn decide(
    tx: &mut PgConnection,
    flow: &Dataflow,
    job: &ClaimedJob,
    write: &PlannedWrite,
    settings: &GuardSettings,
) -> Result<Verdict, sqlx::Error> {
    let record = &write.items[0].record;
    let vals = values_of(write);
    let standing = standing(&mut *tx, &flow.id, settings, record, &vals, job.event_id).await?;
    if standing.tripped {
        return Ok(Verdict::Held { tripped: None });
    }
    if standing.released {
        return Ok(Verdict::Exempt);
    }
    if let Some(trip) = passed(&standing.counts, settings, write.is_create) {
        return Ok(Verdict::Held {
            tripped: Some(trip),
        });
    }
    sqlx::query(
        "WITH pruned AS (DELETE FROM guard_writes WHERE flow_id = $1 \
                         AND at < now() - make_interval(secs => $4)), \
              pruned_values AS (DELETE FROM guard_values WHERE flow_id = $1 \
                                AND at < now() - make_interval(secs => $4)), \
              counted_values AS (INSERT INTO guard_values (flow_id, key, value_hash, record) \
                                 SELECT $1, e.key, hashtextextended(e.value::text, 0), $2 \
                                 FROM jsonb_each($3::jsonb) e) \
         INSERT INTO guard_writes (flow_id, record, vals, created) VALUES ($1, $2, $3, $5)",
    )
    .bind(&flow.id)
    .bind(record)
    .bind(Value::Object(vals))
    .bind(settings.window.as_secs_f64())
    .bind(write.is_create)
    .execute(&mut *tx)
    .await?;
    Ok(Verdict::Send)
}

/// The write's new values keyed `<side>.<field>`.
fn values_of(write: &PlannedWrite) -> Map<String, Value> {
    write
        .items
        .iter()
        .map(|i| (format!("{}.{}", i.side, i.property), i.new.clone()))
        .collect()
}

/// Where a flow stands for one write, read in one statement under the flow's lock (every round
/// trip there is time every other writer of the flow waits).
struct Standing {
    /// The flow is paused: the write is held.
    tripped: bool,
    /// The write's event was released by the operator: sent without counting.
    released: bool,
    /// The window's counts before this write.
    counts: Counts,
}

async fn standing(
    tx: &mut PgConnection,
    flow_id: &str,
    settings: &GuardSettings,
    record: &str,
    vals: &Map<String, Value>,
    event_id: i64,
) -> Result<Standing, sqlx::Error> {
    type Row = (bool, bool, i64, i64, Option<i64>, Option<String>, i64);
    let row: Row = sqlx::query_as(
        "WITH w AS (SELECT record, created FROM guard_writes \
                    WHERE flow_id = $1 AND at >= now() - make_interval(secs => $2)), \
              same AS (SELECT v.key, count(DISTINCT v.record) AS n \
                       FROM jsonb_each($4::jsonb) mine JOIN guard_values v \
                         ON v.flow_id = $1 AND v.key = mine.key \
                        AND v.value_hash = hashtextextended(mine.value::text, 0) \
                        AND v.at >= now() - make_interval(secs => $2) \
                       WHERE v.record <> $3 \
                       GROUP BY v.key ORDER BY n DESC, v.key LIMIT 1) \
         SELECT EXISTS (SELECT 1 FROM guard_trips WHERE flow_id = $1), \
                EXISTS (SELECT 1 FROM guard_released WHERE flow_id = $1 AND event_id = $5), \
                (SELECT count(*) FROM w), \
                (SELECT count(DISTINCT record) FROM w WHERE record <> $3 AND NOT created), \
                (SELECT n FROM same), (SELECT key FROM same), \
                (SELECT count(*) FROM links WHERE flow_id = $1 AND state = 'active')",
    )
    .bind(flow_id)
    .bind(settings.window.as_secs_f64())
    .bind(record)
    .bind(Value::Object(vals.clone()))
    .bind(event_id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Standing {
        tripped: row.0,
        released: row.1,
        counts: Counts {
            writes: row.2,
            other_records: row.3,
            same_value: row.4.unwrap_or(0),
            same_value_property: row.5,
            links: row.6,
        },
    })
}

/// The threshold this write would pass, if any (the write itself counted; a create counts toward
/// writes and same values, not toward the share of linked records changed).
fn passed(c: &Counts, s: &GuardSettings, is_create: bool) -> Option<Trip> {
    let window = humantime::format_duration(s.window).to_string();
    if c.writes + 1 > i64::from(s.max_writes) {
        return Some(Trip::Writes {
            limit: s.max_writes,
            window,
        });
    }
    if c.same_value + 1 > i64::from(s.max_same_value) {
        let key = c.same_value_property.clone().unwrap_or_default();
        let property = key
            .split_once('.')
            .map_or(key.clone(), |(_, p)| p.to_owned());
        return Some(Trip::SameValue {
            property,
            limit: s.max_same_value,
            window,
        });
    }
    if is_create {
        return None;
    }
    let changed = c.other_records + 1;
    let fraction_applies = c.links >= settings::FRACTION_APPLIES_FROM_LINKS;
    if fraction_applies && changed as f64 / c.links as f64 > s.max_changed_fraction {
        return Some(Trip::ChangedFraction {
            changed,
            links: c.links,
            limit: s.max_changed_fraction,
            window,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(writes: i64, other_records: i64, same_value: i64, links: i64) -> Counts {
        Counts {
            writes,
            other_records,
            same_value,
            same_value_property: Some("target.name".into()),
            links,
        }
    }

    #[test]
    fn the_write_past_a_threshold_trips_and_not_the_one_at_it() {
        let s = GuardSettings {
            max_writes: 5,
            max_same_value: 3,
            ..GuardSettings::default()
        };
        assert_eq!(passed(&counts(4, 0, 0, 0), &s, false), None);
        assert!(matches!(
            passed(&counts(5, 0, 0, 0), &s, false),
            Some(Trip::Writes { limit: 5, .. })
        ));
        assert_eq!(passed(&counts(0, 0, 2, 0), &s, false), None);
        match passed(&counts(0, 0, 3, 0), &s, false) {
            Some(Trip::SameValue { property, .. }) => assert_eq!(property, "name"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_changed_fraction_applies_from_a_hundred_links() {
        let s = GuardSettings::default();
        // 30 of 99: no fraction yet.
        assert_eq!(passed(&counts(29, 29, 0, 99), &s, false), None);
        assert_eq!(passed(&counts(19, 19, 0, 100), &s, false), None);
        let trip = passed(&counts(20, 20, 0, 100), &s, false).unwrap();
        assert!(trip.to_string().contains("21 of 100"), "{trip}");
    }

    #[test]
    fn a_create_counts_toward_writes_and_same_values_but_changes_no_linked_record() {
        let s = GuardSettings {
            max_writes: 500,
            max_same_value: 3,
            ..GuardSettings::default()
        };
        // 130 writes against 100 links: a share past 100% if creates counted as changes.
        assert_eq!(passed(&counts(130, 20, 0, 100), &s, true), None);
        assert!(passed(&counts(130, 20, 0, 100), &s, false).is_some());
        assert!(matches!(
            passed(&counts(500, 0, 0, 100), &s, true),
            Some(Trip::Writes { .. })
        ));
        assert!(matches!(
            passed(&counts(0, 0, 3, 100), &s, true),
            Some(Trip::SameValue { .. })
        ));
    }
}
