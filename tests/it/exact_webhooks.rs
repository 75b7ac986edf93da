//! Exact Online webhook subscriptions (`tether webhooks install|status|uninstall exactonline`,
//! README "Webhook registration") against the Exact simulator's `webhooks/WebhookSubscriptions`
//! and a real PostgreSQL. The harness installs through the same code, as an operator would.

use std::time::Duration;

use serde_json::json;
use tether::domain::SystemId;
use tether::simulators::exactonline::{self, ExactSimConfig};
use tether::webhooks::{self, HookState, Outcome, Removed};

use crate::support::{any_port, Service, WebhookReceiver};

fn registry() -> tether::registry::Registry {
    tether::registry::load(None).unwrap().0
}

fn callback(service: &Service) -> String {
    format!("{}/webhooks/exactonline", service.base)
}

#[tokio::test]
async fn install_subscribes_each_needed_topic_once_and_is_idempotent() {
    let service = Service::start(None, "").await;
    assert_eq!(webhooks::exactonline::topics(&registry()), ["Accounts"]);
    let made = service.sims.exact.subscriptions();
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(
        (made[0].1.as_str(), made[0].2.clone()),
        ("Accounts", callback(&service))
    );

    let again = webhooks::install(
        &service.config,
        &service.db.pool,
        &registry(),
        SystemId::ExactOnline,
    )
    .await
    .unwrap();
    assert_eq!(again.outcome, Outcome::Updated);
    assert_eq!(again.topics, ["Accounts"]);
    assert_eq!(
        service.sims.exact.subscriptions(),
        made,
        "nothing added the second time"
    );
    service.stop().await;
}

#[tokio::test]
async fn the_simulator_delivers_only_to_subscribed_callbacks() {
    let mut receiver = WebhookReceiver::start("/hook").await;
    let (sim, _running) = exactonline::start(ExactSimConfig::default(), any_port())
        .await
        .unwrap();
    let id = sim.seed_account(json!({"Name": "Quiet BV"}));
    assert!(sim.change_account(&id, json!({"Name": "Quiet BV 2"})));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.arrived().is_empty(), "no subscription, no webhook");

    sim.subscribe(&format!("{}/hook", receiver.server.base_url()), "Accounts");
    assert!(sim.change_account(&id, json!({"Name": "Heard BV"})));
    let (_, body) = receiver.next().await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["Content"]["Topic"], "Accounts");
    assert_eq!(body["Content"]["Key"], id.as_str());
    assert!(body["HashCode"].is_string());
}

#[tokio::test]
async fn status_shows_the_subscriptions_and_uninstall_removes_only_what_install_made() {
    let service = Service::start(None, "").await;
    // Another app's subscription, made in Exact: never Tether's to show or remove.
    service
        .sims
        .exact
        .subscribe("https://elsewhere.example/hook", "Accounts");

    let status = webhooks::status(&service.config, &service.db.pool, SystemId::ExactOnline)
        .await
        .unwrap();
    assert_eq!(status.webhooks.len(), 1);
    assert_eq!(status.webhooks[0].state, Some(HookState::Active));
    assert_eq!(status.webhooks[0].endpoint, callback(&service));
    assert_eq!(status.webhooks[0].topics, ["Accounts"]);

    let removed = webhooks::uninstall(&service.config, &service.db.pool, SystemId::ExactOnline)
        .await
        .unwrap();
    assert!(
        matches!(removed.as_slice(), [Removed::Deleted(_)]),
        "{removed:?}"
    );
    let left = service.sims.exact.subscriptions();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].2, "https://elsewhere.example/hook");

    // A subscription with Tether's callback made by hand before install is taken over, and
    // left in place by uninstall.
    let by_hand = service
        .sims
        .exact
        .subscribe(&callback(&service), "Accounts");
    webhooks::install(
        &service.config,
        &service.db.pool,
        &registry(),
        SystemId::ExactOnline,
    )
    .await
    .unwrap();
    assert_eq!(
        service.sims.exact.subscriptions().len(),
        2,
        "taken over, not duplicated"
    );
    let removed = webhooks::uninstall(&service.config, &service.db.pool, SystemId::ExactOnline)
        .await
        .unwrap();
    assert_eq!(removed, [Removed::LeftInPlace(by_hand.clone())]);
    assert!(service
        .sims
        .exact
        .subscriptions()
        .iter()
        .any(|s| s.0 == by_hand));
    service.stop().await;
}
