//! Regression (issue 19, found by the chaos suite): a dead worker's job must be taken over even
//! when an older job of the same record is waiting behind it.
//!
//! Two replicas' group commits can take job ids in one order and commit in the other, so a worker
//! may claim the newer job of a record before the older one is visible. If that worker then dies
//! (SIGKILL), the claim used to refuse both: the expired job because an older job of its record
//! was unfinished, the older job because a job of its record was running. The record was stuck
//! for good (seen in the full chaos run: 8 records, 32 jobs).

use std::time::Duration;

use tether::queue::store;
use tether::testing;
use uuid::Uuid;

use crate::queue::{enqueue, job_row};

#[tokio::test]
async fn an_expired_lease_is_taken_over_while_an_older_job_of_its_record_waits() {
    let db = testing::database().await;
    let ids = enqueue(&db.pool, &[("x".into(), 1), ("x".into(), 2)], 10).await;
    let (older, newer) = (ids[0], ids[1]);
    // The newer job was claimed first, and its worker died: the lease ran out.
    sqlx::query(
        "UPDATE jobs SET state = 'running', lease_owner = $2, claims = 1, attempts = 1, \
         lease_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(newer)
    .bind(Uuid::new_v4())
    .execute(&db.pool)
    .await
    .unwrap();

    let owner = Uuid::new_v4();
    let lease = Duration::from_secs(60);
    let (taken, _) = store::claim(&db.pool, owner, 10, lease).await.unwrap();
    let taken_ids: Vec<i64> = taken.iter().map(|c| c.lease.job_id).collect();
    assert_eq!(
        taken_ids,
        vec![newer],
        "the dead worker's job is taken over, and only it: one job of a record runs at a time"
    );
    assert_eq!(taken[0].lease.attempts, 1, "a takeover is not an attempt");

    // While it runs, the older job waits; once it is done, the older one runs.
    let (none, _) = store::claim(&db.pool, owner, 10, lease).await.unwrap();
    assert!(none.is_empty());
    let done = store::Transition {
        lease: taken[0].lease,
        state: store::JobState::Done,
        delay: Duration::ZERO,
        attempt_delta: 0,
        deferral_delta: 0,
        error: None,
    };
    assert_eq!(
        store::finish(&db.pool, owner, &[done]).await.unwrap(),
        vec![newer]
    );
    let (next, _) = store::claim(&db.pool, owner, 10, lease).await.unwrap();
    let next_ids: Vec<i64> = next.iter().map(|c| c.lease.job_id).collect();
    assert_eq!(next_ids, vec![older]);
    assert_eq!(job_row(&db.pool, older).await.0, "running");
}
