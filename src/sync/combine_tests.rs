//! The combiner on a real database: rows of one batch keep their own outcome, a failed statement
//! reaches its own worker, the same key never shares a batch, an idle item waits only the window.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use serde_json::{json, Map, Value};
use sqlx::{PgConnection, PgPool, Row};

use super::{Combiner, Statement};
use crate::domain::{Action, ChangeEvent, RecordKey, SystemId};
use crate::queue::{ClaimedJob, JobPriority};
use crate::registry::{Dataflow, EntityRef, FlowSwitches};
use crate::sync::decision::Decision;
use crate::sync::merge::Side;
use crate::sync::store::{Batches, Entry, Link, LinkState};

/// The items of each batch a statement ran, in order.
type Ran = Arc<Mutex<Vec<Vec<i32>>>>;

/// `100 / x` for each item: an item 0 fails its statement (division by zero). Records the items of
/// every batch it ran.
struct Divide {
    batches: Ran,
    /// Items with the same `x / 10` never share a batch.
    keyed: bool,
}

#[async_trait]
impl Statement for Divide {
    type Item = i32;
    type Answer = i32;

    fn key(&self, item: &i32) -> Option<i64> {
        self.keyed.then_some(i64::from(*item / 10))
    }

    async fn run(&self, conn: &mut PgConnection, items: &[i32]) -> Result<Vec<i32>, sqlx::Error> {
        self.batches.lock().unwrap().push(items.to_vec());
        let rows = sqlx::query(
            "SELECT 100 / x FROM unnest($1::int[]) WITH ORDINALITY AS u(x, n) ORDER BY n",
        )
        .bind(items)
        .fetch_all(conn)
        .await?;
        rows.iter().map(|r| r.try_get::<i32, _>(0)).collect()
    }
}

fn divide(pool: &PgPool, keyed: bool, window: Duration) -> (Combiner<Divide>, Ran) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let statement = Divide {
        batches: batches.clone(),
        keyed,
    };
    (Combiner::start(pool.clone(), statement, window), batches)
}

#[tokio::test]
async fn a_worker_whose_statement_failed_gets_its_error_and_the_others_their_answers() {
    let db = crate::testing::database().await;
    let (combiner, batches) = divide(&db.pool, false, Duration::from_millis(200));
    let answers = futures::future::join_all([5, 0, 20].map(|x| combiner.submit(x))).await;
    assert_eq!(answers[0].as_ref().unwrap(), &20);
    let failed = answers[1].as_ref().expect_err("100 / 0 fails");
    assert!(failed.to_string().contains("division by zero"), "{failed}");
    assert_eq!(answers[2].as_ref().unwrap(), &5);
    // One batch of three, which failed, then each item alone.
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches[0].len(), 3, "{batches:?}");
    assert_eq!(batches.len(), 4, "{batches:?}");
}

#[tokio::test]
async fn two_items_of_the_same_key_never_share_a_batch() {
    let db = crate::testing::database().await;
    let (combiner, batches) = divide(&db.pool, true, Duration::from_millis(100));
    let answers = futures::future::join_all([11, 12, 25].map(|x| combiner.submit(x))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches, vec![vec![11, 25], vec![12]]);
}

#[tokio::test]
async fn an_idle_combiner_answers_within_the_window() {
    let db = crate::testing::database().await;
    let window = Duration::from_millis(300);
    let (combiner, batches) = divide(&db.pool, false, window);
    // A first statement prepares it on a connection, so the timed one measures the waiting.
    combiner.submit(1).await.unwrap();
    let started = Instant::now();
    assert_eq!(combiner.submit(4).await.unwrap(), 25);
    let took = started.elapsed();
    assert!(
        took < window * 2,
        "answered after {took:?} with a window of {window:?}"
    );
    assert_eq!(batches.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn without_a_window_a_lone_item_runs_at_once_and_queued_items_still_share_a_batch() {
    let db = crate::testing::database().await;
    let (combiner, batches) = divide(&db.pool, false, Duration::ZERO);
    combiner.submit(1).await.unwrap();
    let started = Instant::now();
    assert_eq!(combiner.submit(4).await.unwrap(), 25);
    let alone = started.elapsed();
    // Submitted before the combiner's task runs again: all queued when it takes them.
    let answers = futures::future::join_all([5, 10, 20].map(|x| combiner.submit(x))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches, vec![vec![1], vec![4], vec![5, 10, 20]]);
    // One query's round trip; a combiner that waited for company would take its window (the
    // test above waits 300 ms). Loose, since a shared machine's scheduling is not steady.
    assert!(
        alone < Duration::from_millis(250),
        "a lone item took {alone:?}"
    );
}

fn flow() -> Dataflow {
    Dataflow {
        id: "zendesk.Organizations->customerp.Customer".into(),
        source: EntityRef::new(SystemId::Zendesk, "Organizations"),
        target: EntityRef::new(SystemId::CustomErp, "Customer"),
        properties: Vec::new(),
        merge_criteria: Vec::new(),
        switches: FlowSwitches::default(),
        guard: Default::default(),
    }
}

fn job(id: &str) -> ClaimedJob {
    ClaimedJob {
        job_id: 1,
        event_id: 1,
        event: ChangeEvent {
            record: RecordKey {
                system: SystemId::Zendesk,
                entity_type: "Organizations".into(),
                record_id: id.into(),
            },
            action: Action::Updated,
            occurred_at: None,
            delivery_id: format!("d-{id}"),
        },
        attempt: 1,
        priority: JobPriority::Live,
    }
}

/// An active link of [`flow`] from Zendesk organization `src` to customer `tgt`.
async fn insert_link(pool: &PgPool, src: &str, tgt: &str) -> Link {
    let f = flow();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO links (flow_id, source_system, source_type, source_id, target_system, \
         target_type, target_id, snapshot) VALUES ($1, 'zendesk', 'Organizations', $2, \
         'customerp', 'Customer', $3, '{}') RETURNING id",
    )
    .bind(&f.id)
    .bind(src)
    .bind(tgt)
    .fetch_one(pool)
    .await
    .unwrap();
    Batches::default()
        .find_link_for_event(pool, &f, Side::Source, src, 1)
        .await
        .unwrap()
        .0
        .unwrap_or_else(|| panic!("link {id} found"))
}

fn state(name: &str) -> LinkState {
    let mut snapshot = Map::new();
    snapshot.insert("name>Name".into(), json!(name));
    LinkState {
        snapshot,
        seen: [Some(Utc.timestamp_opt(1_800_000_000, 0).unwrap()), None],
        last_write: Some(Side::Target),
        last_write_settled: true,
    }
}

#[tokio::test]
async fn a_link_that_changed_fails_alone_in_its_batch() {
    let db = crate::testing::database().await;
    let pool = &db.pool;
    let (a, b) = (
        insert_link(pool, "1", "c1").await,
        insert_link(pool, "2", "c2").await,
    );
    let stale = Link {
        version: b.version - 1,
        ..b.clone()
    };
    let batches = Batches::default();
    let (ja, jb) = (job("1"), job("2"));
    let (ea, eb) = (
        Entry {
            link: Some(a.id),
            ..Entry::new(Decision::Updated)
        },
        Entry {
            link: Some(b.id),
            ..Entry::new(Decision::Updated)
        },
    );
    let idle = Entry::new(Decision::Idle);
    let (stored_a, stored_b) = tokio::join!(
        batches.store_sync(pool, &ja, (&ea, Some(&idle)), &a, state("A")),
        batches.store_sync(pool, &jb, (&eb, None), &stale, state("B")),
    );
    assert!(stored_a.unwrap(), "the current link is stored");
    assert!(!stored_b.unwrap(), "the stale one is not");
    let rows: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT record_id, decision, link_id FROM sync_log ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    let want = vec![
        ("1".to_owned(), "updated".to_owned(), Some(a.id)),
        ("1".to_owned(), "idle".to_owned(), None),
    ];
    assert_eq!(rows, want, "only the stored link's entries, in order");
    let snapshots: Vec<(i64, Value, i64)> =
        sqlx::query_as("SELECT id, snapshot, version FROM links ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        snapshots[0],
        (a.id, json!({"name>Name": "A"}), a.version + 1)
    );
    assert_eq!(snapshots[1], (b.id, json!({}), b.version));
}

#[tokio::test]
async fn batched_lookups_answer_each_its_own_link() {
    let db = crate::testing::database().await;
    let pool = &db.pool;
    let a = insert_link(pool, "1", "c1").await;
    let b = insert_link(pool, "2", "c2").await;
    let batches = Batches::default();
    let f = flow();
    let (la, lnone, lb, lt) = tokio::join!(
        batches.find_link_for_event(pool, &f, Side::Source, "1", 1),
        batches.find_link_for_event(pool, &f, Side::Source, "3", 1),
        batches.find_link_for_event(pool, &f, Side::Source, "2", 1),
        batches.find_link_for_event(pool, &f, Side::Target, "c2", 1),
    );
    assert_eq!(la.unwrap().0, Some(a));
    assert_eq!(lnone.unwrap().0, None);
    assert_eq!(lb.unwrap().0, Some(b.clone()));
    assert_eq!(lt.unwrap().0, Some(b));
}

#[tokio::test]
async fn batched_echoes_are_logged_only_where_their_own_link_shows_the_stamp() {
    let db = crate::testing::database().await;
    let pool = &db.pool;
    let (a, b) = (
        insert_link(pool, "1", "c1").await,
        insert_link(pool, "2", "c2").await,
    );
    let at = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
    sqlx::query(
        "UPDATE links SET last_write_side = 'target', last_write_settled = true, \
         target_seen_at = $1",
    )
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    let f = flow();
    let batches = Batches::default();
    let (ja, jb) = (job("c1"), job("c2"));
    let echo = Entry {
        flow: Some(&f.id),
        ..Entry::new(Decision::Echo)
    };
    let later = at + chrono::Duration::seconds(1);
    let (logged_a, logged_b) = tokio::join!(
        batches.log_if_own_stamp(pool, &ja, &echo, (&f, Side::Target, "c1"), at),
        batches.log_if_own_stamp(pool, &jb, &echo, (&f, Side::Target, "c2"), later),
    );
    assert!(logged_a.unwrap(), "the link shows this stamp");
    assert!(!logged_b.unwrap(), "another stamp is not the echo");
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT record_id, link_id FROM sync_log WHERE decision = 'echo'")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![("c1".to_owned(), Some(a.id))]);
    assert_ne!(a.id, b.id);
}
