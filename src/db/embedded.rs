//! An embedded PostgreSQL: a private cluster started from the machine's PostgreSQL binaries in a
//! directory of ours, on a free loopback port, with a generated password.
//!
//! Used by `tether serve`/`sandbox` when `DATABASE_URL` is unset, and by the test support.
//! `initdb` and `postgres` refuse to run as root, so as root the cluster is created and run as the
//! unprivileged `postgres` user (or `nobody`), which owns the cluster directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::Rng;
use secrecy::SecretString;
use tokio::process::Command;

/// Why the embedded PostgreSQL could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("PostgreSQL's server programs (initdb, pg_ctl) were not found on this machine; install the `postgresql` package (Debian/Ubuntu: apt install postgresql) or set DATABASE_URL to a PostgreSQL server you run")]
    NoBinaries,
    #[error("the embedded PostgreSQL could not be started in {dir}: {message}")]
    Failed { dir: PathBuf, message: String },
}

/// Where the binaries and the cluster are, and whom they run as.
#[derive(Debug, Clone)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    /// The directory we own: the cluster lives in `cluster/`, the password in `password`.
    root: PathBuf,
    port: u16,
    password: String,
    /// Set when running as root: the unprivileged user that owns and runs the cluster.
    run_as: Option<(u32, u32)>,
    /// We started the server (else another `tether` process did, and we only use it).
    owned: bool,
}

const DB_USER: &str = "tether";
const DB_NAME: &str = "tether";

/// Finds the directory holding `initdb` and `pg_ctl`: the PATH first, then Debian's layout.
pub fn find_binaries() -> Result<PathBuf, EmbeddedError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Newest version first.
    debian.sort_by(|a, b| b.cmp(a));
    from_path
        .into_iter()
        .chain(debian)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .ok_or(EmbeddedError::NoBinaries)
}

fn unprivileged_user() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .or_else(|| nix::unistd::User::from_name("nobody").ok().flatten())?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// A port the cluster keeps across restarts, which outgoing connections cannot take meanwhile
/// (`crate::ports`).
fn free_port() -> std::io::Result<u16> {
    crate::ports::free_loopback_port()
}

impl EmbeddedPostgres {
    /// Initialises the cluster under `root` if it is new, and starts it. If another process
    /// (say `tether serve`, while an operator runs `tether dead-letters list`) already runs it,
    /// the running server is used and left running: see [`EmbeddedPostgres::owned`].
    pub async fn start(root: &Path) -> Result<Self, EmbeddedError> {
        let bin_dir = find_binaries()?;
        let fail = |message: String| EmbeddedError::Failed {
            dir: root.to_owned(),
            message,
        };
        std::fs::create_dir_all(root).map_err(|e| fail(format!("cannot create it: {e}")))?;
        let root = root
            .canonicalize()
            .map_err(|e| fail(format!("cannot resolve it: {e}")))?;
        let run_as = unprivileged_user();
        let password_file = root.join("password");
        let cluster = root.join("cluster");

        let mut pg = EmbeddedPostgres {
            bin_dir,
            root: root.clone(),
            port: free_port().map_err(|e| fail(format!("no free port: {e}")))?,
            password: String::new(),
            run_as,
            owned: true,
        };

        if !cluster.join("PG_VERSION").is_file() {
            // A cluster directory without PG_VERSION is what an interrupted initdb (or a cleanup
            // cut short) leaves behind; initdb refuses a non-empty directory, so start over.
            if cluster.exists() {
                std::fs::remove_dir_all(&cluster).map_err(|e| {
                    fail(format!(
                        "cannot remove the unfinished cluster {}: {e}",
                        cluster.display()
                    ))
                })?;
            }
            pg.init(&cluster, &password_file).await?;
        }
        pg.password = std::fs::read_to_string(&password_file)
            .map_err(|e| fail(format!("cannot read {}: {e}", password_file.display())))?
            .trim()
            .to_owned();
        let port_file = root.join("port");
        if pg.is_running().await {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                pg.port = port;
                pg.owned = false;
                return Ok(pg);
            }
            pg.stop().await?;
        }
        std::fs::write(&port_file, pg.port.to_string()).map_err(|e| fail(e.to_string()))?;
        pg.start_server().await?;
        Ok(pg)
    }

    async fn init(&self, cluster: &Path, password_file: &Path) -> Result<(), EmbeddedError> {
        let fail = |message: String| EmbeddedError::Failed {
            dir: self.root.clone(),
            message,
        };
        let password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        write_private(password_file, &password).map_err(|e| fail(e.to_string()))?;
        std::fs::create_dir_all(cluster).map_err(|e| fail(e.to_string()))?;
        // initdb reads the password from a file the cluster's owner can read; it is removed after.
        let pwfile = self.root.join("initdb-pwfile");
        write_private(&pwfile, &password).map_err(|e| fail(e.to_string()))?;
        if let Some((uid, gid)) = self.run_as {
            for path in [cluster, pwfile.as_path()] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
                    fail(format!(
                        "cannot hand {} to the postgres user: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(cluster)
            .args([
                "-U",
                DB_USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .await
            .map_err(|e| fail(format!("initdb could not run: {e}")))?;
        let _ = std::fs::remove_file(&pwfile);
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(cluster);
            return Err(fail(format!(
                "initdb failed{}: {}",
                if self.run_as.is_some() {
                    " (as root the cluster runs as the `postgres` user, which needs to reach this directory)"
                } else {
                    ""
                },
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        // Create the application database by starting once with the bootstrap user.
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env("LC_ALL", "C")
            .kill_on_drop(false);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn cluster(&self) -> PathBuf {
        self.root.join("cluster")
    }

    async fn is_running(&self) -> bool {
        self.command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(self.cluster())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }

    async fn start_server(&self) -> Result<(), EmbeddedError> {
        let fail = |message: String| EmbeddedError::Failed {
            dir: self.root.clone(),
            message,
        };
        let log = self.cluster().join("server.log");
        // Only loopback TCP, no Unix socket (its path could be too long or unwritable).
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200",
            self.port
        );
        let output = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.cluster())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &options])
            .stdout(Stdio::null())
            .output()
            .await
            .map_err(|e| fail(format!("pg_ctl could not run: {e}")))?;
        if !output.status.success() {
            let tail = std::fs::read_to_string(&log)
                .map(|s| s.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            return Err(fail(format!(
                "pg_ctl start failed: {} {}",
                String::from_utf8_lossy(&output.stderr).trim(),
                tail
            )));
        }
        self.ensure_database().await
    }

    /// Creates the `tether` database on first start.
    async fn ensure_database(&self) -> Result<(), EmbeddedError> {
        use sqlx::Connection;
        let fail = |message: String| EmbeddedError::Failed {
            dir: self.root.clone(),
            message,
        };
        let admin = format!(
            "postgres://{DB_USER}:{}@127.0.0.1:{}/postgres",
            self.password, self.port
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DB_NAME)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| fail(e.to_string()))?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DB_NAME}"))
                .execute(&mut conn)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    }

    /// Starts the server again after [`EmbeddedPostgres::stop`] (same port and password).
    pub async fn restart(&self) -> Result<(), EmbeddedError> {
        self.start_server().await
    }

    /// Loads `libraries` at the server's start (`shared_preload_libraries`; pg_stat_statements
    /// only works loaded so), sets `settings` (name, value: a library's own parameters) and
    /// restarts the server for them. For the benchmarks: the settings stay in the cluster's
    /// `postgresql.conf`.
    pub async fn preload_libraries(
        &self,
        libraries: &[&str],
        settings: &[(&str, &str)],
    ) -> Result<(), EmbeddedError> {
        let conf = self.cluster().join("postgresql.conf");
        let fail = |e: std::io::Error| EmbeddedError::Failed {
            dir: self.root.clone(),
            message: format!(
                "cannot set shared_preload_libraries in {}: {e}",
                conf.display()
            ),
        };
        let mut text = std::fs::read_to_string(&conf).map_err(fail)?;
        // The last line that sets a parameter wins, so appending overrides initdb's default.
        text.push_str(&format!(
            "\nshared_preload_libraries = '{}'\n",
            libraries.join(",")
        ));
        for (name, value) in settings {
            text.push_str(&format!("{name} = '{value}'\n"));
        }
        std::fs::write(&conf, text).map_err(fail)?;
        self.stop().await?;
        self.start_server().await
    }

    /// Stops the server (fast shutdown: running transactions are rolled back).
    pub async fn stop(&self) -> Result<(), EmbeddedError> {
        let output = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.cluster())
            .args(["-m", "fast", "-w", "-t", "60"])
            .output()
            .await
            .map_err(|e| EmbeddedError::Failed {
                dir: self.root.clone(),
                message: format!("pg_ctl could not run: {e}"),
            })?;
        if !output.status.success() && self.is_running().await {
            return Err(EmbeddedError::Failed {
                dir: self.root.clone(),
                message: format!(
                    "pg_ctl stop failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    /// The application database's URL (it holds the password: keep it secret).
    pub fn url(&self) -> SecretString {
        self.url_for(DB_NAME)
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> SecretString {
        SecretString::from(format!(
            "postgres://{DB_USER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        ))
    }

    /// Whether this process started the server (and so should stop it on exit).
    pub fn owned(&self) -> bool {
        self.owned
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the cluster, for log lines.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The postmaster's process id, if it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.cluster().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// How long to wait for the server in tests and health loops.
    pub const STARTUP: Duration = Duration::from_secs(60);
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}
