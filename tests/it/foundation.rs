//! The service foundation: embedded PostgreSQL, migrations, health, shutdown.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tether::config::Config;
use tether::db::embedded::EmbeddedPostgres;
use tether::testing;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

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

/// Polls `url` until it answers `status` or the deadline passes; returns the time it took.
async fn wait_for_status(url: &str, status: u16, deadline: Duration) -> Duration {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().as_u16() == status {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < deadline,
            "{url} did not answer {status} within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_follows_the_database_without_a_restart() {
    let dir = testing::shared_tempdir();
    let pg = EmbeddedPostgres::start(&dir.path().join("pg"))
        .await
        .unwrap();
    let pool =
        tether::db::connect_lazy(&pg.url(), 4, Duration::from_secs(1)).expect("pool options");
    tether::db::migrate(&pool).await.unwrap();
    let state = tether::http::AppState {
        pool,
        config: Arc::new(Config::from_source(empty_source()).unwrap()),
        registry: Arc::new(tether::registry::load(None).unwrap().0),
        storing: Default::default(),
        shutdown: CancellationToken::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let server = tokio::spawn(tether::http::serve(listener, state.clone()));

    wait_for_status(&url, 200, Duration::from_secs(10)).await;
    pg.stop().await.unwrap();
    let took = wait_for_status(&url, 503, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "503 took {took:?}");
    let body: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert!(body["checks"]["database"]
        .as_str()
        .unwrap()
        .starts_with("unreachable"));

    pg.restart().await.unwrap();
    wait_for_status(&url, 200, Duration::from_secs(15)).await;

    // Shutdown makes readiness fail at once.
    let shutting = state.shutdown.clone();
    let ready_url = url.clone();
    let probe = tokio::spawn(async move {
        shutting.cancel();
        reqwest::get(&ready_url).await.map(|r| r.status().as_u16())
    });
    // The server may already have stopped accepting; either answer is "not ready".
    if let Ok(Ok(status)) = probe.await {
        assert_eq!(status, 503);
    }
    server.await.unwrap().unwrap();
    pg.stop().await.unwrap();
}

fn empty_source() -> tether::config::Source {
    let mut source = tether::config::Source::load(None).unwrap();
    // Only what a test sets matters here; the process environment may hold DATABASE_URL.
    let _ = source.secret("database.url");
    source
}

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let db = testing::empty_database().await;
    let mut children = Vec::new();
    for _ in 0..4 {
        children.push(
            tokio::process::Command::new(BIN)
                .arg("migrate")
                .env("DATABASE_URL", db.url.expose_secret())
                .env("TETHER_LOG_FORMAT", "pretty")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    for child in children {
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (rows, ok): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE success) FROM _sqlx_migrations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, tether::db::MIGRATOR.iter().count());
    assert_eq!(ok, rows);
}

#[tokio::test]
async fn serve_with_embedded_postgres_stops_cleanly_on_sigterm() {
    let dir = testing::shared_tempdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .env_remove("DATABASE_URL")
        .env("TETHER_DATA_DIR", dir.path())
        .env("TETHER_LISTEN", format!("127.0.0.1:{port}"))
        .env("TETHER_WORKERS__ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for_status(&ready, 200, Duration::from_secs(90)).await;
    let pid_file = dir.path().join("postgres/cluster/postmaster.pid");
    let postmaster: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .expect("tether exits within the shutdown bound")
        .unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "logs: {stderr}");
    assert!(stderr.contains("embedded PostgreSQL"), "logs: {stderr}");
    // JSON logs by default.
    let first = stderr.lines().next().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "{first}"
    );
    assert!(!pid_file.exists(), "postmaster.pid left behind");
    // The postmaster removes its pid file just before it exits; give the exit a moment and
    // count a zombie waiting for its reaper as gone.
    let gone = || {
        std::fs::read_to_string(format!("/proc/{postmaster}/stat"))
            .map(|stat| {
                stat.split(") ")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let start = Instant::now();
    while !gone() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone(), "postgres still running");
}

/// `tether sandbox --demo` walks all 18 dataflows through the real service, simulators and an
/// embedded PostgreSQL, and exits 0 only if every flow linked a record without errors.
#[tokio::test]
async fn sandbox_demo_walks_every_dataflow() {
    let dir = testing::shared_tempdir();
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(BIN)
            .args(["sandbox", "--demo"])
            .env_remove("DATABASE_URL")
            .env("TETHER_DATA_DIR", dir.path().join("data"))
            .env("TETHER_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("the demo finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every dataflow behaved as the registry says"));
    assert_eq!(stdout.matches("->").count(), 18, "{stdout}");
}
