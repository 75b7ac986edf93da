//! Test support: a fresh, migrated database per test on a real PostgreSQL.
//!
//! With `DATABASE_URL` set, databases are created on that server (the role needs CREATEDB).
//! Without it, the first test process of a run starts a private cluster from the machine's
//! PostgreSQL binaries in the temp directory; the other test binaries of the run join it (a file
//! lock orders them, each registers its pid). A small watchdog started with the cluster stops and
//! deletes it once no registered test process is alive, so nothing is left behind, even when a
//! test run is killed.
//!
//! Each test gets its own database cloned from a migrated template (docs/architecture.md, "Tests and documents"), so
//! tests never see each other's rows.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};

use crate::db::embedded::EmbeddedPostgres;

/// A database of one test.
pub struct TestDb {
    pub pool: PgPool,
    /// The database's URL (for processes a test starts).
    pub url: SecretString,
    pub name: String,
}

/// The admin URL of the server tests use (without a database name at the end).
struct Server {
    /// `postgres://user:pw@host:port` with no path.
    base: String,
    template: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// A fresh database with every migration applied.
pub async fn database() -> TestDb {
    let server = SERVER
        .get_or_init(|| {
            // The cluster outlives any one test's runtime, so it is set up on a thread of its own.
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(prepare_server())
            })
            .join()
            .expect("test database setup panicked")
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("test PostgreSQL unavailable: {e}"));
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{}/postgres", server.base))
        .await
        .expect("connect to the test server");
    let mut attempt = 0;
    loop {
        let created = sqlx::query(&format!(
            "CREATE DATABASE {name} TEMPLATE {}",
            server.template
        ))
        .execute(&mut admin)
        .await;
        match created {
            Ok(_) => break,
            // Another backend may still be leaving the template; try again shortly.
            Err(e) if attempt < 50 => {
                attempt += 1;
                tracing::debug!(error = %e, "retrying CREATE DATABASE");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot create test database: {e}"),
        }
    }
    let _ = admin.close().await;
    let url = format!("{}/{name}", server.base);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect to the test database");
    TestDb {
        pool,
        url: SecretString::from(url),
        name,
    }
}

impl Drop for TestDb {
    /// Drops the test's database, so that a run's clones of the template do not fill the disk
    /// (a few hundred tests at several MB each, with their WAL). On a thread of its own: the
    /// test's runtime may be shutting down. `FORCE` ends the test's own connections.
    fn drop(&mut self) {
        let Some(Ok(server)) = SERVER.get() else {
            return;
        };
        let admin = format!("{}/postgres", server.base);
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                let _ = sqlx::query(&statement).execute(&mut conn).await;
                conn.close().await.ok()
            })
        });
        let _ = dropping.join();
    }
}

/// A fresh database with NO migrations applied (for tests of migrating itself).
pub async fn empty_database() -> TestDb {
    let db = database().await;
    let name = format!("e_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&db.pool)
        .await
        .expect("create an empty database");
    let url = {
        let mut parsed = url::Url::parse(db.url.expose_secret()).expect("a URL");
        parsed.set_path(&name);
        parsed.to_string()
    };
    let pool = PgPool::connect(&url)
        .await
        .expect("connect to the empty database");
    TestDb {
        pool,
        url: SecretString::from(url),
        name,
    }
}

/// A directory the unprivileged PostgreSQL user can reach (tests running as root put private
/// clusters there).
pub fn shared_tempdir() -> tempfile_dir::TempDir {
    tempfile_dir::TempDir::new()
}

/// Minimal temporary directory, world-traversable, removed on drop.
pub mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("tether-t-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("create a temp dir");
            super::set_mode(&path, 0o755);
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn migrations_fingerprint() -> String {
    let mut hasher = Sha256::new();
    for m in crate::db::MIGRATOR.iter() {
        hasher.update(m.version.to_le_bytes());
        hasher.update(&m.checksum);
    }
    hex::encode(&hasher.finalize()[..6])
}

async fn prepare_server() -> Result<Server, String> {
    let template = format!("tmpl_{}", migrations_fingerprint());
    let base = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let mut parsed = url::Url::parse(&url).map_err(|e| format!("DATABASE_URL: {e}"))?;
            parsed.set_path("");
            parsed.to_string().trim_end_matches('/').to_owned()
        }
        Err(_) => {
            let base = shared_cluster().await?;
            tune_private_cluster(&base).await?;
            base
        }
    };
    // Build the template once per migration set, under a PostgreSQL advisory lock so that
    // concurrent test binaries do not race.
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    sqlx::query("SELECT pg_advisory_lock(727274)")
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut admin)
            .await
            .map_err(|e| e.to_string())?;
    if !exists {
        let building = format!("{template}_building");
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {building}"))
            .execute(&mut admin)
            .await;
        sqlx::query(&format!("CREATE DATABASE {building}"))
            .execute(&mut admin)
            .await
            .map_err(|e| e.to_string())?;
        {
            let pool = PgPool::connect(&format!("{base}/{building}"))
                .await
                .map_err(|e| e.to_string())?;
            crate::db::migrate(&pool)
                .await
                .map_err(|e| format!("migrations: {e}"))?;
            pool.close().await;
        }
        sqlx::query(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(&mut admin)
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock(727274)")
        .execute(&mut admin)
        .await;
    let _ = admin.close().await;
    Ok(Server { base, template })
}

/// The run's private cluster keeps little WAL: each test database is a WAL-logged copy of the
/// template, and the run's disk use should stay flat. (Durability settings stay as PostgreSQL's
/// defaults: the queue's tests measure VACUUM and statistics, and a run with `fsync` and
/// `synchronous_commit` off once saw a VACUUM leave the dead rows of a finished burst.)
async fn tune_private_cluster(base: &str) -> Result<(), String> {
    let mut admin = PgConnection::connect(&format!("{base}/postgres"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for setting in ["max_wal_size = '256MB'"] {
        sqlx::query(&format!("ALTER SYSTEM SET {setting}"))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("ALTER SYSTEM SET {setting}: {e}"))?;
    }
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let _ = admin.close().await;
    Ok(())
}

/// Starts or joins the run's shared cluster and returns its base URL.
async fn shared_cluster() -> Result<String, String> {
    let dir = shared_dir();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // World-traversable, so the unprivileged postgres user can reach the cluster inside.
    set_mode(&dir, 0o755);
    let lock = std::fs::File::create(dir.join("lock")).map_err(|e| e.to_string())?;
    lock.lock().map_err(|e| format!("lock: {e}"))?;
    // Only under the lock: the previous run's watchdog may have just removed `clients/`.
    std::fs::create_dir_all(dir.join("clients")).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("clients").join(std::process::id().to_string()),
        b"",
    )
    .map_err(|e| e.to_string())?;
    let pg = EmbeddedPostgres::start(&dir.join("pg"))
        .await
        .map_err(|e| e.to_string())?;
    if pg.owned() {
        spawn_watchdog(&dir)?;
    }
    drop(lock);
    let url = pg.url_for("postgres");
    let base = url.expose_secret().trim_end_matches("/postgres").to_owned();
    Ok(base)
}

fn shared_dir() -> PathBuf {
    let mut hasher = Sha256::new();
    hasher.update(env!("CARGO_MANIFEST_DIR").as_bytes());
    let tag = hex::encode(&hasher.finalize()[..4]);
    std::env::temp_dir().join(format!(
        "tether-test-pg-{}-{tag}",
        nix::unistd::geteuid().as_raw()
    ))
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Stops and deletes the shared cluster once no registered test process is alive.
const WATCHDOG: &str = r#"
dir="$1"
while :; do
  sleep 1
  exec 9>"$dir/lock"
  flock 9
  alive=0
  for f in "$dir"/clients/*; do
    [ -e "$f" ] || continue
    if kill -0 "${f##*/}" 2>/dev/null; then alive=1; else rm -f "$f"; fi
  done
  if [ "$alive" = 0 ]; then
    pid=$(head -n 1 "$dir/pg/cluster/postmaster.pid" 2>/dev/null)
    if [ -n "$pid" ]; then
      # Immediate shutdown: the cluster is deleted next, so no checkpoint is worth waiting for.
      kill -QUIT "$pid" 2>/dev/null
      i=0
      while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
      kill -KILL "$pid" 2>/dev/null
    fi
    rm -rf "$dir/pg" "$dir/clients"
    exit 0
  fi
  exec 9>&-
done
"#;

fn spawn_watchdog(dir: &Path) -> Result<(), String> {
    use std::process::{Command, Stdio};
    Command::new("setsid")
        .args(["sh", "-c", WATCHDOG, "tether-test-pg-watchdog"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("cannot start the test cluster's watchdog: {e}"))
}
