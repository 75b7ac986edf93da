//! Zendesk's Webhooks API (docs/vendors.md, Zendesk "Webhooks API"): list, create, update,
//! show, delete and the signing secret. Shapes from Zendesk's OpenAPI (botbrains-io/python-zendesk
//! `openapi-webhooks.yaml`): bodies `{"webhook": {...}}`, list `{"webhooks": [...], "meta":
//! {"has_more"}, "links": {"next"}}`, `PUT` answers 204, secret `{"signing_secret": {"secret"}}`.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::WebhookError;
use crate::config::ZendeskConfig;

/// The name Tether gives its webhook (shown in Zendesk's Admin Center).
pub const WEBHOOK_NAME: &str = "Tether";
/// At most this many list pages are read (100 webhooks each).
const MAX_PAGES: usize = 50;

/// A webhook as the API shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub endpoint: String,
    pub status: String,
    #[serde(default)]
    pub subscriptions: Vec<String>,
}

#[derive(Deserialize)]
struct One {
    webhook: Webhook,
}

#[derive(Deserialize)]
struct Page {
    webhooks: Vec<Webhook>,
    #[serde(default)]
    links: Links,
}

#[derive(Deserialize, Default)]
struct Links {
    next: Option<String>,
}

#[derive(Deserialize)]
struct SecretBody {
    signing_secret: SecretInner,
}

#[derive(Deserialize)]
struct SecretInner {
    secret: String,
}

/// A client for the account's Webhooks API.
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
    auth: Auth,
}

enum Auth {
    Basic(String, SecretString),
    Bearer(SecretString),
}

impl Client {
    pub fn new(config: &ZendeskConfig, timeout: Duration) -> Result<Client, WebhookError> {
        let auth = match (&config.email, &config.api_token, &config.oauth_token) {
            (Some(email), Some(token), _) => Auth::Basic(format!("{email}/token"), token.clone()),
            (_, _, Some(oauth)) => Auth::Bearer(oauth.clone()),
            _ => return Err(WebhookError::NoCredentials("zendesk")),
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| WebhookError::Http(e.without_url().to_string()))?;
        Ok(Client {
            http,
            base: config.base_url.clone(),
            auth,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, url);
        match &self.auth {
            Auth::Basic(user, token) => builder.basic_auth(user, Some(token.expose_secret())),
            Auth::Bearer(token) => builder.bearer_auth(token.expose_secret()),
        }
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, WebhookError> {
        let response = builder
            .send()
            .await
            .map_err(|e| WebhookError::Http(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // The vendor's error body names the problem; it never holds our credentials.
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(WebhookError::Vendor {
            system: "zendesk",
            status: status.as_u16(),
            body,
        })
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<T, WebhookError> {
        self.send(builder)
            .await?
            .json()
            .await
            .map_err(|e| WebhookError::Shape(format!("zendesk: {}", e.without_url())))
    }

    /// Every webhook of the account.
    pub async fn list(&self) -> Result<Vec<Webhook>, WebhookError> {
        let mut out = Vec::new();
        let mut next = Some(self.url("/api/v2/webhooks?page[size]=100"));
        for _ in 0..MAX_PAGES {
            let Some(url) = next.take() else { break };
            let page: Page = self.json(self.request(reqwest::Method::GET, &url)).await?;
            out.extend(page.webhooks);
            next = page.links.next;
        }
        Ok(out)
    }

    pub async fn show(&self, id: &str) -> Result<Option<Webhook>, WebhookError> {
        let url = self.url(&format!("/api/v2/webhooks/{id}"));
        match self
            .json::<One>(self.request(reqwest::Method::GET, &url))
            .await
        {
            Ok(one) => Ok(Some(one.webhook)),
            Err(WebhookError::Vendor { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn body(endpoint: &str, events: &[String]) -> serde_json::Value {
        json!({"webhook": {
            "name": WEBHOOK_NAME, "endpoint": endpoint, "http_method": "POST",
            "request_format": "json", "status": "active", "subscriptions": events,
        }})
    }

    pub async fn create(&self, endpoint: &str, events: &[String]) -> Result<Webhook, WebhookError> {
        let url = self.url("/api/v2/webhooks");
        let builder = self
            .request(reqwest::Method::POST, &url)
            .json(&Client::body(endpoint, events));
        Ok(self.json::<One>(builder).await?.webhook)
    }

    pub async fn update(
        &self,
        id: &str,
        endpoint: &str,
        events: &[String],
    ) -> Result<(), WebhookError> {
        let url = self.url(&format!("/api/v2/webhooks/{id}"));
        let builder = self
            .request(reqwest::Method::PUT, &url)
            .json(&Client::body(endpoint, events));
        self.send(builder).await.map(drop)
    }

    /// Deletes a webhook; one already gone counts as deleted.
    pub async fn delete(&self, id: &str) -> Result<(), WebhookError> {
        let url = self.url(&format!("/api/v2/webhooks/{id}"));
        match self.send(self.request(reqwest::Method::DELETE, &url)).await {
            Ok(_) | Err(WebhookError::Vendor { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn signing_secret(&self, id: &str) -> Result<SecretString, WebhookError> {
        let url = self.url(&format!("/api/v2/webhooks/{id}/signing_secret"));
        let body: SecretBody = self.json(self.request(reqwest::Method::GET, &url)).await?;
        Ok(SecretString::from(body.signing_secret.secret))
    }
}
