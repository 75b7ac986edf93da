//! `tether registry check|export` and `serve`'s refusal of a registry with errors, run as the real
//! binary from a directory that holds no registry files (they are embedded).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tether(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    // A clean environment: no TETHER_* or DATABASE_URL from the machine running the tests.
    cmd.env_clear()
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs to completion, failing the test rather than hanging if the process does not exit.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().expect("tether starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("tether did not exit within 120s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A configuration naming an overlay, both in `dir`.
fn config_with_overlay(dir: &Path, overlay: &str) -> String {
    let overlay_path = dir.join("overlay.toml");
    std::fs::write(&overlay_path, overlay).unwrap();
    let config = dir.join("tether.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n[registry]\noverlay = {:?}\n",
            dir.join("data").display().to_string(),
            overlay_path.display().to_string()
        ),
    )
    .unwrap();
    config.display().to_string()
}

const BAD_OVERLAY: &str = r#"[[dataflow]]
source = "poweroffice.Customers"
target = "zendesk.Organizations"

[[dataflow.property]]
source = "WebsiteUrl"
target = "url"
type = "string"
sync = "both"
"#;

#[test]
fn registry_check_passes_on_the_shipped_seeds_with_warnings_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(tether(dir.path(), &["registry", "check"]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("18 dataflows, 11 property mappings: 0 error(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "registry/003_poweroffice_zendesk.toml:39: warning: the mapping WebsiteUrl -> url"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains(": error:"), "{stdout}");
}

#[test]
fn registry_check_fails_on_errors_and_names_the_overlay_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_overlay(dir.path(), BAD_OVERLAY);
    let out = run(tether(
        dir.path(),
        &["--config", &config, "registry", "check"],
    ));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("overlay.toml:5: error: the mapping WebsiteUrl -> url")
            && stdout.contains("read-only"),
        "{stdout}"
    );
}

#[test]
fn registry_export_prints_the_effective_registry_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_overlay(
        dir.path(),
        "[[dataflow]]\nsource = \"zendesk.Users\"\ntarget = \"customerp.Contact\"\nenabled = false\n",
    );
    let out = run(tether(
        dir.path(),
        &["--config", &config, "registry", "export"],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = value["dataflows"].as_array().unwrap();
    assert_eq!(flows.len(), 18);
    let contact = flows
        .iter()
        .find(|f| f["id"] == "zendesk.Users->customerp.Contact")
        .unwrap();
    assert_eq!(contact["switches"]["enabled"], false);

    let config = config_with_overlay(dir.path(), BAD_OVERLAY);
    let out = run(tether(
        dir.path(),
        &["--config", &config, "registry", "export"],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("overlay.toml:5: error"));
}

#[test]
fn serve_refuses_to_start_on_registry_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_overlay(dir.path(), BAD_OVERLAY);
    let out = run(tether(dir.path(), &["--config", &config, "serve"]));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the mapping registry cannot be used") && stderr.contains("overlay.toml:5"),
        "{stderr}"
    );
    // It stopped before touching a database.
    assert!(!dir.path().join("data").exists());
}
