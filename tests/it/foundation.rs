//! The service foundation: configuration, embedded PostgreSQL, migrations, health, shutdown.

use tether::testing;

#[tokio::test]
async fn fresh_test_database_is_migrated() {
    let db = testing::database().await;
    assert!(tether::db::migrations_applied(&db.pool).await.unwrap());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}
