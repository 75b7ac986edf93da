//! Webhook registration (`tether webhooks install|status|uninstall`, README "Webhook
//! registration") against the Zendesk simulator's Webhooks API and a real PostgreSQL.

use std::time::Duration;

use base64::Engine as _;
use secrecy::ExposeSecret;
use serde_json::json;
use tether::domain::SystemId;
use tether::simulators::zendesk::Kind;
use tether::webhooks::{self, zendesk::Client, HookState, Outcome, Removed};

use crate::support::{self, eventually, probe, Service, WebhookReceiver};

const KEY_TOML: &str = "\n[secrets]\nkey = \"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"\n";

fn client(service: &Service) -> Client {
    Client::new(
        service.config.systems.zendesk.as_ref().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn registry() -> tether::registry::Registry {
    tether::registry::load(None).unwrap().0
}

/// A delivery signed as Zendesk signs it, with `secret`.
async fn deliver(service: &Service, secret: &str, org_id: &str) -> reqwest::StatusCode {
    let body = serde_json::to_vec(&json!({
        "account_id": 1, "id": uuid::Uuid::new_v4().to_string(),
        "type": "zen:event-type:organization.name_changed",
        "subject": format!("zen:organization:{org_id}"),
        "detail": {"id": org_id}, "event": {},
        "time": chrono::Utc::now().to_rfc3339(),
    }))
    .unwrap();
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let signature = tether::signing::zendesk::sign(secret, &at, &body);
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/zendesk", service.base))
        .header("x-zendesk-webhook-signature", signature)
        .header("x-zendesk-webhook-signature-timestamp", at)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    if status != 202 {
        // Shown when a test fails: the intake's reason.
        eprintln!(
            "delivery answered {status}: {}",
            response.text().await.unwrap()
        );
    }
    status
}

#[tokio::test]
async fn install_creates_exactly_one_webhook_with_the_needed_events_and_is_idempotent() {
    // The harness installed once already (as `tether webhooks install zendesk` does).
    let service = Service::start(None, KEY_TOML).await;
    let zd = client(&service);
    let needed = webhooks::zendesk_events(&registry());
    assert!(needed.contains(&"zen:event-type:organization.created".to_owned()));
    assert!(needed.contains(&"zen:event-type:ticket.comment_added".to_owned()));
    let again = webhooks::install(
        &service.config,
        &service.db.pool,
        &registry(),
        SystemId::Zendesk,
    )
    .await
    .unwrap();
    assert_eq!(again.outcome, Outcome::Updated);
    let hooks = zd.list().await.unwrap();
    assert_eq!(hooks.len(), 1, "one webhook, however often install runs");
    let hook = &hooks[0];
    assert_eq!(hook.endpoint, format!("{}/webhooks/zendesk", service.base));
    assert_eq!(hook.status, "active");
    assert_eq!(hook.subscriptions, needed);
    assert_eq!(hook.id, again.vendor_id);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT vendor_id, signing_secret FROM webhook_registrations WHERE system = 'zendesk'",
    )
    .fetch_all(&service.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    // Stored encrypted under secrets.key, never in clear.
    let secret = zd.signing_secret(&hook.id).await.unwrap();
    assert!(rows[0].1.starts_with("enc:v1:"));
    assert!(!rows[0].1.contains(secret.expose_secret()));
    service.stop().await;
}

#[tokio::test]
async fn a_running_serve_accepts_a_delivery_signed_with_a_newly_stored_secret() {
    let service = Service::start(None, "").await;
    let zd = client(&service);
    let old_id = zd.list().await.unwrap()[0].id.clone();
    let old_secret = zd.signing_secret(&old_id).await.unwrap();
    let org = service
        .sims
        .zendesk
        .insert_organization(json!({"name": "Acme"}));
    let org_id = org["id"].to_string();
    assert_eq!(
        deliver(&service, old_secret.expose_secret(), &org_id).await,
        202
    );
    // Replace the webhook while serve runs: a new webhook, a new secret.
    webhooks::uninstall(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    let installed = webhooks::install(
        &service.config,
        &service.db.pool,
        &registry(),
        SystemId::Zendesk,
    )
    .await
    .unwrap();
    assert_eq!(installed.outcome, Outcome::Created);
    let secret = zd.signing_secret(&installed.vendor_id).await.unwrap();
    assert_ne!(secret.expose_secret(), old_secret.expose_secret());
    let started = std::time::Instant::now();
    eventually(
        "the new secret accepted",
        Duration::from_secs(5),
        || async { deliver(&service, secret.expose_secret(), &org_id).await == 202 },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The uninstalled webhook's secret is no longer accepted once reloaded.
    tokio::time::sleep(webhooks::store::REFRESH + Duration::from_millis(500)).await;
    assert_eq!(
        deliver(&service, old_secret.expose_secret(), &org_id).await,
        401
    );
    service.stop().await;
}

#[tokio::test]
async fn status_shows_the_vendors_view_next_to_the_last_delivery() {
    let service = Service::start(None, "").await;
    let status = webhooks::status(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    assert_eq!(status.webhooks.len(), 1);
    assert_eq!(status.webhooks[0].state, Some(HookState::Active));
    assert_eq!(
        status.webhooks[0].topics,
        webhooks::zendesk_events(&registry())
    );
    assert_eq!(status.last_delivery, None);
    assert!(status.to_string().contains("last delivery received never"));
    // A change in Zendesk reaches Tether through the registered webhook.
    service
        .sims
        .zendesk
        .create(Kind::Organization, json!({"name": "Delivered BV"}));
    let pool = service.db.pool.clone();
    let last = eventually("a delivery stored", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            webhooks::store::last_delivery(&pool, SystemId::Zendesk)
                .await
                .unwrap()
        }
    })
    .await;
    // Deactivated in Zendesk's Admin Center: status says so.
    let zd = client(&service);
    let hook = zd.list().await.unwrap().remove(0);
    reqwest::Client::new()
        .put(format!(
            "{}/api/v2/webhooks/{}",
            service.sims.url(SystemId::Zendesk),
            hook.id
        ))
        .basic_auth(
            format!("{}/token", tether::sandbox::credentials::ZENDESK_EMAIL),
            Some(tether::sandbox::credentials::ZENDESK_TOKEN),
        )
        .json(
            &json!({"webhook": {"name": "Tether", "endpoint": hook.endpoint,
            "http_method": "POST", "request_format": "json", "status": "inactive",
            "subscriptions": hook.subscriptions}}),
        )
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let status = webhooks::status(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    assert_eq!(status.webhooks[0].state, Some(HookState::Deactivated));
    assert_eq!(status.last_delivery, Some(last));
    assert!(status.to_string().contains("deactivated"));
    service.stop().await;
}

#[tokio::test]
async fn uninstall_removes_only_what_install_made() {
    let service = Service::start(None, "").await;
    let zd = client(&service);
    let other = zd
        .create(
            "https://elsewhere.example.com/hook",
            &["zen:event-type:user.created".to_owned()],
        )
        .await
        .unwrap();
    let removed = webhooks::uninstall(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    assert!(matches!(&removed[0], Removed::Deleted(id) if id != &other.id));
    let left: Vec<String> = zd.list().await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(left, vec![other.id.clone()]);
    // Exact's subscriptions (installed by the harness too) are not Zendesk's to remove.
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_registrations WHERE system = 'zendesk'")
            .fetch_one(&service.db.pool)
            .await
            .unwrap();
    assert_eq!(rows, 0);
    // Nothing installed any more: a second uninstall removes nothing.
    let again = webhooks::uninstall(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    assert!(again.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn an_unregistered_simulator_delivers_nothing_and_a_registered_webhook_gets_its_events() {
    let mut receiver = WebhookReceiver::start("/hook").await;
    let (running, handle, _) = support::zendesk::sim().await;
    handle.create(Kind::Organization, json!({"name": "Nobody listens"}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.arrived().is_empty());
    assert_eq!(handle.webhook_stats().delivered, 0);

    let zd = Client::new(
        &support::zendesk::config(&running.base_url()),
        Duration::from_secs(5),
    )
    .unwrap();
    let endpoint = format!("{}/hook", receiver.server.base_url());
    let hook = zd
        .create(
            &endpoint,
            &["zen:event-type:organization.created".to_owned()],
        )
        .await
        .unwrap();
    let secret = zd.signing_secret(&hook.id).await.unwrap();
    let created = handle.create(Kind::Organization, json!({"name": "Heard"}));
    assert_eq!(created.status(), 201);
    let (headers, body) = receiver.next().await;
    let at = headers["x-zendesk-webhook-signature-timestamp"]
        .to_str()
        .unwrap();
    assert_eq!(
        headers["x-zendesk-webhook-signature"].to_str().unwrap(),
        tether::signing::zendesk::sign(secret.expose_secret(), at, &body)
    );
    assert_eq!(headers["x-zendesk-webhook-id"].to_str().unwrap(), hook.id);
    // Not subscribed to name changes: nothing more comes.
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["detail"]["id"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    handle.update(Kind::Organization, id, json!({"name": "Renamed"}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.arrived().is_empty());
    eventually(
        "one delivery counted",
        Duration::from_secs(5),
        probe(|| handle.webhook_stats().delivered == 1),
    )
    .await;
    running.stop().await;
}

#[tokio::test]
async fn the_cli_installs_idempotently_and_never_prints_the_secret() {
    let service = Service::start(None, KEY_TOML).await;
    // Start from nothing, as on a new account.
    webhooks::uninstall(&service.config, &service.db.pool, SystemId::Zendesk)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tether-webhooks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let listen: std::net::SocketAddr = service.base.trim_start_matches("http://").parse().unwrap();
    let config = dir.join("tether.toml");
    let toml = service.sims.config_toml(listen, &dir, "1s") + KEY_TOML;
    std::fs::write(&config, toml).unwrap();
    let run = |args: &'static [&'static str]| {
        let (config, url) = (config.clone(), service.db.url.expose_secret().to_owned());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(args)
                .arg("--config")
                .arg(&config)
                .env("DATABASE_URL", url)
                .env("TETHER_LOG_LEVEL", "debug")
                .output()
                .await
                .unwrap()
        }
    };
    let first = run(&["webhooks", "install", "zendesk"]).await;
    let second = run(&["webhooks", "install", "zendesk"]).await;
    let status = run(&["webhooks", "status", "zendesk"]).await;
    let zd = client(&service);
    let hooks = zd.list().await.unwrap();
    assert_eq!(hooks.len(), 1);
    let secret = zd.signing_secret(&hooks[0].id).await.unwrap();
    let secret = secret.expose_secret();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(secret)
        .unwrap();
    for out in [&first, &second, &status] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(secret), "the secret leaked: {text}");
        assert!(!text.contains(&hex::encode(&raw)));
    }
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout(&first).contains("created"), "{}", stdout(&first));
    assert!(stdout(&second).contains("updated"), "{}", stdout(&second));
    assert!(stdout(&status).contains("active"), "{}", stdout(&status));
    std::fs::remove_dir_all(&dir).unwrap();
    service.stop().await;
}
