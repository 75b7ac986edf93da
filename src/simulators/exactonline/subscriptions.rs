//! `webhooks/WebhookSubscriptions`: the subscriptions that make Exact send webhooks, one per
//! callback URL and topic. Fields as picqer/exact-php-client's `WebhookSubscription` model lists
//! them (docs/vendors.md, Exact Online "Webhook subscriptions"): `ID` (Edm.Guid), `CallbackURL`,
//! `Topic` (`Accounts`, ...), `Description`, `ClientID`, `Division`, `Created`. The simulator
//! sends a topic's webhooks to every subscription of that topic, and to nothing else.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{exact_error, odata_date, ExactSim, Inner};
use crate::simulators::kit;

/// The topics this simulator sends (the types it has webhooks for).
const TOPICS: &[&str] = &["Accounts"];

/// One subscription as stored.
#[derive(Debug, Clone)]
pub(super) struct Subscription {
    pub callback: String,
    pub topic: String,
    pub description: String,
    pub created_ms: i64,
}

fn to_json(inner: &Inner, id: &str, s: &Subscription) -> Value {
    json!({
        "ID": id,
        "CallbackURL": s.callback,
        "Topic": s.topic,
        "Description": s.description,
        "ClientID": inner.config.client_id,
        "Division": inner.config.division,
        "Created": odata_date(s.created_ms),
    })
}

impl ExactSim {
    /// Subscribes `callback` to `topic` as if an operator had done it in Exact (a subscription
    /// made outside Tether). Returns its ID.
    pub fn subscribe(&self, callback: &str, topic: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.lock().subscriptions.insert(
            id.clone(),
            Subscription {
                callback: callback.to_owned(),
                topic: topic.to_owned(),
                description: "made in Exact".to_owned(),
                created_ms: chrono::Utc::now().timestamp_millis(),
            },
        );
        id
    }

    /// The callback URLs subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> Vec<String> {
        self.lock()
            .subscriptions
            .values()
            .filter(|s| s.topic == topic)
            .map(|s| s.callback.clone())
            .collect()
    }

    /// Every subscription: `(ID, topic, callback)`.
    pub fn subscriptions(&self) -> Vec<(String, String, String)> {
        self.lock()
            .subscriptions
            .iter()
            .map(|(id, s)| (id.clone(), s.topic.clone(), s.callback.clone()))
            .collect()
    }
}

/// `GET .../webhooks/WebhookSubscriptions`: the division's subscriptions.
pub(super) fn list(sim: &ExactSim) -> Response {
    let inner = sim.lock();
    let results: Vec<Value> = inner
        .subscriptions
        .iter()
        .map(|(id, s)| to_json(&inner, id, s))
        .collect();
    Json(json!({"d": {"results": results}})).into_response()
}

/// `POST .../webhooks/WebhookSubscriptions` with `CallbackURL` and `Topic`.
pub(super) fn create(sim: &ExactSim, body: &Value) -> Response {
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::trim);
    let Some(callback) = text("CallbackURL").filter(|c| c.starts_with("http")) else {
        return exact_error(StatusCode::BAD_REQUEST, "CallbackURL: mandatory field");
    };
    let Some(topic) = text("Topic").filter(|t| !t.is_empty()) else {
        return exact_error(StatusCode::BAD_REQUEST, "Topic: mandatory field");
    };
    if !TOPICS.contains(&topic) {
        return exact_error(StatusCode::BAD_REQUEST, "Topic: invalid value");
    }
    let id = uuid::Uuid::new_v4().to_string();
    let subscription = Subscription {
        callback: callback.to_owned(),
        topic: topic.to_owned(),
        description: text("Description").unwrap_or_default().to_owned(),
        created_ms: chrono::Utc::now().timestamp_millis(),
    };
    let mut inner = sim.lock();
    let made = to_json(&inner, &id, &subscription);
    inner.subscriptions.insert(id, subscription);
    (StatusCode::CREATED, Json(json!({ "d": made }))).into_response()
}

/// `DELETE .../webhooks/WebhookSubscriptions(guid'…')`.
pub(super) fn delete(sim: &ExactSim, key: &str) -> Response {
    match sim.lock().subscriptions.remove(key) {
        Some(_) => kit::empty(StatusCode::NO_CONTENT),
        None => exact_error(StatusCode::NOT_FOUND, "WebhookSubscription not found"),
    }
}

/// Whether a resource path names the subscriptions (`webhooks/WebhookSubscriptions`).
pub(super) fn is_subscriptions(module: &str, name: &str) -> bool {
    module == "webhooks" && name == "WebhookSubscriptions"
}
