//! The processes of a chaos run: `tether serve` replicas and a private nginx in front of them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A free loopback port that outgoing connections cannot take meanwhile (`crate::ports`): a
/// replica is restarted on its port many times in a run.
pub fn free_port() -> std::io::Result<u16> {
    crate::ports::free_loopback_port()
}

/// How a replica is started: the binary, its environment, where its log goes.
pub struct Replicas {
    bin: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
    http: reqwest::Client,
}

impl Replicas {
    /// `count` replicas of `bin serve` on free ports, not started yet.
    pub fn new(
        bin: PathBuf,
        env: Vec<(String, String)>,
        dir: &Path,
        count: usize,
    ) -> anyhow::Result<Self> {
        let ports = (0..count)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Replicas {
            bin,
            env,
            dir: dir.to_owned(),
            ports,
            children: (0..count).map(|_| None).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        })
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Starts replica `i` (its log is appended to `replica-<i>.log`).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("replica-{i}.log")))?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TETHER_LISTEN", format!("127.0.0.1:{}", self.ports[i]))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Waits until replica `i` answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.ports[i]);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.children[i].as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("replica {i} exited at start-up ({status}); see replica-{i}.log");
                }
            }
            let ok = self.http.get(&url).send().await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("replica {i} was not ready within {timeout:?}; see replica-{i}.log")
    }

    /// SIGKILL to replica `i`, reaped.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.children[i].take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM to replica `i`; waits for it to exit (SIGKILL after `grace`) and says how it went.
    pub async fn terminate(&mut self, i: usize, grace: Duration) -> anyhow::Result<Exit> {
        use std::os::unix::process::ExitStatusExt as _;
        let Some(mut child) = self.children[i].take() else {
            return Ok(Exit::Clean);
        };
        if let Some(pid) = child.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                let status = status?;
                Ok(match (status.code(), status.signal()) {
                    (Some(0), _) => Exit::Clean,
                    (_, Some(_)) => Exit::Signalled,
                    (code, None) => Exit::Failed(code.unwrap_or(-1)),
                })
            }
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                Ok(Exit::Hung)
            }
        }
    }

    /// Stops every replica with SIGTERM.
    pub async fn stop_all(&mut self, grace: Duration) {
        for i in 0..self.len() {
            let _ = self.terminate(i, grace).await;
        }
    }
}

/// How a replica ended after SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It shut down and exited 0.
    Clean,
    /// The signal ended it before its handler was installed (it was still starting).
    Signalled,
    /// It exited with this code.
    Failed(i32),
    /// It did not exit within the grace time and was killed.
    Hung,
}

/// Where Debian's nginx is.
pub fn find_nginx() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// nginx's configuration: one loopback server passing everything to the replicas, retrying the
/// next replica on connection errors, timeouts, 502 and 503. Webhook POSTs are retried too
/// (`non_idempotent`): Tether's intake is idempotent per delivery id.
pub fn nginx_config(prefix: &Path, listen: u16, upstreams: &[u16]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    let p = prefix.display();
    format!(
        r#"daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    upstream tether {{
{servers}        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://tether;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 15s;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {tries};
        }}
    }}
}}
"#,
        tries = upstreams.len().max(1),
    )
}

/// A private nginx (own prefix and configuration), stopped when dropped.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    /// Writes the configuration under `prefix` and starts nginx in the foreground.
    pub async fn start(prefix: &Path, port: u16, upstreams: &[u16]) -> anyhow::Result<Nginx> {
        let bin = find_nginx().context(
            "nginx is not installed (Debian: apt-get install nginx-light; scripts/chaos.sh does it)",
        )?;
        let tmp = prefix.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        // As root, nginx's worker runs as `nobody` and must be able to write its temp files.
        set_mode(&tmp, 0o777)?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, nginx_config(prefix, port, upstreams))?;
        let log = File::create(prefix.join("nginx.out"))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nginx")?;
        let mut nginx = Nginx { child, port };
        nginx.wait_listening().await?;
        Ok(nginx)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait()? {
                bail!("nginx exited at start-up ({status}); see its error.log");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("nginx did not listen on port {}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_config_retries_every_replica_on_errors_and_503() {
        let conf = nginx_config(Path::new("/tmp/x"), 8080, &[1, 2, 3]);
        assert!(conf.contains("listen 127.0.0.1:8080;"));
        assert_eq!(conf.matches("server 127.0.0.1:").count(), 3);
        assert!(
            conf.contains("proxy_next_upstream error timeout http_502 http_503 non_idempotent;")
        );
        assert!(conf.contains("proxy_next_upstream_tries 3;"));
    }
}
