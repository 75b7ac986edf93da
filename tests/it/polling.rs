//! The polling framework: durable cursors, one transaction per page, no misses at page
//! boundaries or equal timestamps, no re-emission of unchanged records, one replica per cursor.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tether::connectors::{ChangePage, Connector, ConnectorError, Record};
use tether::domain::SystemId;
use tether::polling::{self, poll_once, PollerSpec};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::support::crmoffice::{connector as crm_connector, sim as crm_sim};
use crate::support::{at, custom, obj};

type Hook = Box<dyn FnMut(u32) + Send>;

/// Delegates to a real connector; runs `hook(call number)` after each `list_changed` answer (to
/// change the vendor between pages) and can hold the first call until released.
struct Hooked {
    inner: Arc<dyn Connector>,
    calls: AtomicU32,
    hook: Mutex<Option<Hook>>,
    gate: Option<(mpsc::UnboundedSender<()>, Arc<Notify>)>,
}

impl Hooked {
    fn new(inner: Arc<dyn Connector>) -> Self {
        Hooked {
            inner,
            calls: AtomicU32::new(0),
            hook: Mutex::new(None),
            gate: None,
        }
    }
}

#[async_trait]
impl Connector for Hooked {
    fn system(&self) -> SystemId {
        self.inner.system()
    }
    async fn fetch(&self, t: &str, id: &str) -> Result<Option<Record>, ConnectorError> {
        self.inner.fetch(t, id).await
    }
    async fn create(
        &self,
        t: &str,
        f: &Map<String, Value>,
        k: &str,
    ) -> Result<Record, ConnectorError> {
        self.inner.create(t, f, k).await
    }
    async fn find_created(&self, t: &str, k: &str) -> Result<Option<Record>, ConnectorError> {
        self.inner.find_created(t, k).await
    }
    async fn update(
        &self,
        t: &str,
        id: &str,
        c: &Map<String, Value>,
    ) -> Result<Record, ConnectorError> {
        self.inner.update(t, id, c).await
    }
    async fn list_changed(
        &self,
        t: &str,
        cursor: Option<&str>,
    ) -> Result<ChangePage, ConnectorError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let (1, Some((entered, release))) = (n, &self.gate) {
            let _ = entered.send(());
            release.notified().await;
        }
        let page = self.inner.list_changed(t, cursor).await?;
        if let Some(hook) = self.hook.lock().unwrap().as_mut() {
            hook(n);
        }
        Ok(page)
    }
    async fn find_by(
        &self,
        t: &str,
        c: &Map<String, Value>,
    ) -> Result<Vec<Record>, ConnectorError> {
        self.inner.find_by(t, c).await
    }
}

/// (record_id, occurred_at) of every stored event, in insertion order; and the job count.
async fn emitted(pool: &PgPool) -> (Vec<(String, Option<DateTime<Utc>>)>, i64) {
    let events = sqlx::query_as("SELECT record_id, occurred_at FROM events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(pool)
        .await
        .unwrap();
    (events, jobs)
}

fn spec(connector: Arc<dyn Connector>, ty: &str) -> PollerSpec {
    PollerSpec {
        kind: polling::PollKind::Poll,
        connector,
        entity_type: ty.to_owned(),
        interval: Duration::from_millis(50),
    }
}

#[tokio::test]
async fn records_added_at_page_boundaries_and_equal_timestamps_are_emitted_exactly_once() {
    let db = tether::testing::database().await;
    let (sim, running) = crm_sim().await;
    let t0 = at("2026-01-01T00:00:00Z");
    let t1 = at("2026-01-01T00:00:01Z");
    // Page size 2: records at t0, t0 | t0, t1 | t1 ...
    let mut all: Vec<String> = Vec::new();
    for t in [t0, t0, t0, t1, t1] {
        all.push(sim.insert("contacts", obj(json!({"name": "seed"})), Some(t)));
    }
    let hooked = Hooked::new(Arc::new(crm_connector(&running.base_url(), 2)));
    let added: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let sim = sim.clone();
        let added = added.clone();
        *hooked.hook.lock().unwrap() = Some(Box::new(move |call| {
            let mut added = added.lock().unwrap();
            match call {
                // Right after the first page (t0, t0): a record at the boundary's own instant, and
                // a seed record changed (it moves behind the others).
                1 => added.push(sim.insert(
                    "contacts",
                    obj(json!({"name": "boundary t0"})),
                    Some(t0),
                )),
                // After the second page: two more at t1, sharing the instant of records not read yet.
                2 => {
                    added.push(sim.insert("contacts", obj(json!({"name": "a t1"})), Some(t1)));
                    added.push(sim.insert("contacts", obj(json!({"name": "b t1"})), Some(t1)));
                }
                3 => sim.touch("contacts", "1", obj(json!({"name": "changed"})), None),
                _ => {}
            }
        }));
    }
    let spec = spec(Arc::new(hooked), "Contacts");
    let mut rounds = 0;
    loop {
        let report = poll_once(&db.pool, &spec).await.unwrap();
        rounds += 1;
        if report.emitted == 0 || rounds > 20 {
            break;
        }
    }
    let (events, jobs) = emitted(&db.pool).await;
    all.extend(added.lock().unwrap().iter().cloned());
    let mut ids: Vec<String> = events.iter().map(|(id, _)| id.clone()).collect();
    // Record 1 was emitted twice: once as seeded, once changed. Everything else exactly once.
    assert_eq!(ids.iter().filter(|i| *i == "1").count(), 2, "{events:?}");
    ids.sort();
    ids.dedup();
    let mut want = all.clone();
    want.sort();
    assert_eq!(ids, want, "every record emitted");
    assert_eq!(
        events.len(),
        all.len() + 1,
        "nothing emitted twice: {events:?}"
    );
    assert_eq!(jobs, events.len() as i64, "one job per event");
    let cursor = polling::cursor(&db.pool, SystemId::CrmOffice, "Contacts")
        .await
        .unwrap();
    assert!(cursor.is_some());
}

#[tokio::test]
async fn unchanged_records_are_not_re_emitted_even_after_a_cursor_reset() {
    let db = tether::testing::database().await;
    let (sim, running) = crm_sim().await;
    let ids: Vec<String> = (0..3)
        .map(|i| sim.insert("activities", obj(json!({"subject": format!("s{i}")})), None))
        .collect();
    let spec = spec(
        Arc::new(crm_connector(&running.base_url(), 2)),
        "Activities",
    );
    let first = poll_once(&db.pool, &spec).await.unwrap();
    assert_eq!(first.emitted, 3);
    assert_eq!(poll_once(&db.pool, &spec).await.unwrap().emitted, 0);

    // Even a full re-read (cursor lost) emits nothing for unchanged records.
    sqlx::query("UPDATE poll_cursors SET cursor = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let reread = poll_once(&db.pool, &spec).await.unwrap();
    assert_eq!((reread.records, reread.emitted), (3, 0));

    sim.touch("activities", &ids[1], obj(json!({"subject": "new"})), None);
    assert_eq!(poll_once(&db.pool, &spec).await.unwrap().emitted, 1);
    let (events, jobs) = emitted(&db.pool).await;
    assert_eq!(events.len(), 4);
    assert_eq!(jobs, 4);
}

#[tokio::test]
async fn two_pollers_on_one_cursor_only_one_polls() {
    let db = tether::testing::database().await;
    let (sim, running) = crm_sim().await;
    sim.insert("contacts", obj(json!({"name": "x"})), None);
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let mut hooked = Hooked::new(Arc::new(crm_connector(&running.base_url(), 10)));
    hooked.gate = Some((entered_tx, release.clone()));
    let hooked = Arc::new(hooked);
    let spec = spec(hooked.clone(), "Contacts");

    let first = {
        let pool = db.pool.clone();
        let spec = spec.clone();
        tokio::spawn(async move { poll_once(&pool, &spec).await.unwrap() })
    };
    tokio::time::timeout(Duration::from_secs(30), entered.recv())
        .await
        .expect("the first poller reaches the vendor")
        .unwrap();
    // The first poller holds the cursor while it talks to the vendor: the second skips.
    let second = poll_once(&db.pool, &spec).await.unwrap();
    assert!(second.busy, "{second:?}");
    assert_eq!(
        hooked.calls.load(Ordering::SeqCst),
        1,
        "the second never called the vendor"
    );

    release.notify_one();
    let first = first.await.unwrap();
    assert!(!first.busy);
    assert_eq!(first.emitted, 1);
}

#[tokio::test]
async fn started_pollers_enqueue_on_their_interval_and_stop_on_shutdown() {
    let db = tether::testing::database().await;
    let (sim, running) = crm_sim().await;
    sim.insert("contacts", obj(json!({"name": "x"})), None);
    let shutdown = CancellationToken::new();
    let handle = polling::start_pollers(
        db.pool.clone(),
        vec![spec(
            Arc::new(crm_connector(&running.base_url(), 10)),
            "Contacts",
        )],
        shutdown.clone(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while emitted(&db.pool).await.0.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first poll never stored the record"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.insert("contacts", obj(json!({"name": "y"})), None);
    while emitted(&db.pool).await.0.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a later poll never stored the new record"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("pollers stop on shutdown")
        .unwrap();
}

#[tokio::test]
async fn custom_system_reconciliation_poll_emits_changes_once() {
    let db = tether::testing::database().await;
    let (sim, running) = custom::sim(SystemId::CustomErp, None).await;
    sim.set_page_size(2);
    let connector = custom::connector(
        SystemId::CustomErp,
        &running.base_url(),
        Duration::from_secs(5),
    );
    let t = at("2026-01-01T00:00:00Z");
    let ids: Vec<String> = (0..5)
        .map(|i| sim.insert("customer", obj(json!({"n": i})), Some(t)))
        .collect();
    let spec = spec(Arc::new(connector), "Customer");
    assert_eq!(poll_once(&db.pool, &spec).await.unwrap().emitted, 5);
    assert_eq!(poll_once(&db.pool, &spec).await.unwrap().emitted, 0);
    sim.touch("customer", &ids[4], obj(json!({"n": 40})), None);
    let report = poll_once(&db.pool, &spec).await.unwrap();
    assert_eq!(report.emitted, 1);
    let (events, jobs) = emitted(&db.pool).await;
    assert_eq!(events.len(), 6);
    assert_eq!(jobs, 6);
    assert_eq!(events[5].0, ids[4]);
}
