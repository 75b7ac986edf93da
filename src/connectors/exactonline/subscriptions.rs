//! Exact's `webhooks/WebhookSubscriptions` (docs/vendors.md, Exact Online "Webhook
//! subscriptions"): what `tether webhooks install|status|uninstall exactonline` manage. One
//! subscription is one callback URL and one topic; Exact signs every webhook with the app's
//! webhook secret, so a subscription has no secret of its own.

use reqwest::Method;
use serde_json::{json, Value};

use super::{malformed, ExactOnline};
use crate::connectors::ConnectorError;

const PATH: &str = "webhooks/WebhookSubscriptions";

/// One subscription as Exact lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub callback_url: String,
    pub topic: String,
}

fn subscription(v: &Value) -> Result<Subscription, ConnectorError> {
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| malformed("a WebhookSubscription lacks ID, CallbackURL or Topic"))
    };
    Ok(Subscription {
        id: text("ID")?.to_lowercase(),
        callback_url: text("CallbackURL")?,
        topic: text("Topic")?,
    })
}

impl ExactOnline {
    /// Every subscription of the division (all pages).
    pub async fn webhook_subscriptions(&self) -> Result<Vec<Subscription>, ConnectorError> {
        let mut url = self.url(PATH);
        let mut out = Vec::new();
        loop {
            let (rows, next) = self.get_page(&url).await?;
            for row in &rows {
                out.push(subscription(row)?);
            }
            match next {
                Some(link) => url = link,
                None => return Ok(out),
            }
        }
    }

    /// Subscribes `callback_url` to `topic`.
    pub async fn subscribe_webhook(
        &self,
        callback_url: &str,
        topic: &str,
        description: &str,
    ) -> Result<Subscription, ConnectorError> {
        let body = json!({
            "CallbackURL": callback_url,
            "Topic": topic,
            "Description": description,
        });
        let made = self
            .call(Method::POST, &self.url(PATH), Some(&body))
            .await?
            .ok_or_else(|| malformed("creating a WebhookSubscription answered 404"))?;
        subscription(&Self::single(made)?)
    }

    /// Deletes a subscription; `false` if Exact no longer has it.
    pub async fn unsubscribe_webhook(&self, id: &str) -> Result<bool, ConnectorError> {
        let guid = uuid::Uuid::parse_str(id)
            .map_err(|_| malformed("a WebhookSubscription ID is not a GUID"))?;
        let url = self.url(&format!("{PATH}(guid'{}')", guid.hyphenated()));
        Ok(self.call(Method::DELETE, &url, None).await?.is_some())
    }
}
