//! PostgreSQL: the connection pool, the migrations, and the embedded cluster used when
//! `DATABASE_URL` is unset.
//!
//! Owns: connecting and migrating. Every other module owns the SQL of its own tables.

pub mod embedded;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// The project's migrations, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens a pool. Connections are made lazily, so the process starts (and `/healthz` answers)
/// while the database is still coming up; `/readyz` tells whether it is reachable.
pub fn connect_lazy(
    url: &SecretString,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.expose_secret().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options.application_name("tether")))
}

/// Applies pending migrations. sqlx takes a PostgreSQL advisory lock around the run, so several
/// replicas starting at the same moment apply each migration once and the others wait.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether every migration this binary knows is applied (for `/readyz`).
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| applied.binary_search(&m.version).is_ok()))
}

/// The database a command works with: the pool, and the embedded server if we use one.
pub struct Database {
    pub pool: PgPool,
    pub embedded: Option<embedded::EmbeddedPostgres>,
}

impl Database {
    /// Uses `DATABASE_URL` when set; otherwise starts (or joins) the embedded PostgreSQL under
    /// `data_dir/postgres`.
    pub async fn open(config: &crate::config::Config) -> anyhow::Result<Database> {
        let (url, embedded) = match &config.database.url {
            Some(url) => (url.clone(), None),
            None => {
                let dir = config.data_dir.join("postgres");
                let pg = embedded::EmbeddedPostgres::start(&dir).await?;
                tracing::info!(
                    dir = %pg.root().display(),
                    port = pg.port(),
                    started_here = pg.owned(),
                    "using the embedded PostgreSQL (DATABASE_URL is not set)"
                );
                (pg.url(), Some(pg))
            }
        };
        let pool = connect_lazy(
            &url,
            config.database.max_connections,
            config.database.acquire_timeout,
        )?;
        Ok(Database { pool, embedded })
    }

    /// Closes the pool and stops the embedded server if this process started it.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(pg) = self.embedded.filter(|pg| pg.owned()) {
            match pg.stop().await {
                Ok(()) => tracing::info!("embedded PostgreSQL stopped"),
                Err(e) => tracing::error!(error = %e, "embedded PostgreSQL did not stop"),
            }
        }
    }
}
