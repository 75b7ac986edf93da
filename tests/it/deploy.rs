//! The alert rules and the Grafana dashboard in `deploy/` only use metrics Tether exports, and
//! the rules are valid Prometheus rules (`promtool check rules` where Debian's `prometheus` package
//! is installed; a structural check of every rule always).

use std::path::{Path, PathBuf};

use tether::ops::metrics::{Kind, FAMILIES};
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `tether_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tether_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Whether `name` is an exported series: a family, or a histogram family's `_bucket`/`_sum`/`_count`.
fn exported(name: &str) -> bool {
    FAMILIES.iter().any(|(family, kind, _)| {
        name == *family
            || (*kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}")))
    })
}

fn assert_uses_exported_metrics(what: &str, expr: &str) {
    let names = metric_names(expr);
    assert!(!names.is_empty(), "{what}: `{expr}` uses no Tether metric");
    for name in names {
        assert!(
            exported(&name),
            "{what}: `{name}` is not a metric Tether exports"
        );
    }
}

#[test]
fn alert_rules_are_valid_and_use_exported_metrics() {
    let path = repo("deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("alerts.yml is YAML");
    let groups = docs[0]["groups"].as_vec().expect("a `groups` list");
    let mut alerts = Vec::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "every group has a name");
        for rule in group["rules"].as_vec().expect("a `rules` list") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            if let Yaml::String(d) = &rule["for"] {
                tether::config::parse_duration(d).unwrap_or_else(|e| panic!("{name}: for {e}"));
            }
            assert_uses_exported_metrics(name, expr);
            alerts.push(name.to_owned());
        }
    }
    for wanted in [
        "TetherDeadLettersAppearing",
        "TetherQueueBehind",
        "TetherCredentialsFailing",
        "TetherWebhooksMissing",
        "TetherVendorThrottling",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "{wanted} missing");
    }
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!(
            "promtool not installed (Debian package `prometheus`): rules checked by parsing only"
        ),
    }
}

#[test]
fn grafana_dashboard_panels_query_exported_metrics() {
    let text = std::fs::read_to_string(repo("deploy/grafana/tether.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().unwrap();
            assert_uses_exported_metrics(title, expr);
            queried.extend(metric_names(expr));
        }
    }
    // Every family is on the dashboard somewhere.
    for (family, kind, _) in FAMILIES {
        let shown = queried
            .iter()
            .any(|q| q == family || (*kind == Kind::Histogram && q.starts_with(family)));
        assert!(shown, "{family} is on no panel");
    }
}
