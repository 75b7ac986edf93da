//! The vendor metrics, recorded where every vendor call passes (the transport): calls by status
//! with their duration, 429s as throttling, final 401s as credential failures. Counters are
//! process-wide and other tests call vendors too, so each check is an increase of at least what
//! this test caused, read from the same exposition `/metrics` serves.

use std::sync::Arc;
use std::time::Duration;

use tether::connectors::transport::token::StaticToken;
use tether::connectors::transport::{http_client, Call, Credential, Gates, VendorClient};
use tether::domain::SystemId;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The value of one series in the exposition (0 when absent).
fn value(series: &str) -> f64 {
    let text = tether::ops::metrics::install().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn vendor_calls_are_counted_by_status_with_latency_429s_and_refused_credentials() {
    tether::ops::metrics::install();
    let server = MockServer::start().await;
    for (p, status) in [("/ok", 200), ("/limited", 429), ("/refused", 401)] {
        Mock::given(method("GET"))
            .and(path(p))
            .respond_with(ResponseTemplate::new(status).insert_header("Retry-After", "0"))
            .mount(&server)
            .await;
    }
    let system = SystemId::CrmOffice;
    let vendor = VendorClient::new(
        system,
        http_client(Duration::from_secs(5)),
        Arc::new(StaticToken(Credential::bearer("fixed"))),
        Arc::new(Gates::default()),
    );
    let series =
        |name: &str, status: &str| format!("{name}{{system=\"crmoffice\",status=\"{status}\"}}");
    let ok = series("tether_vendor_requests_total", "200");
    let limited = series("tether_vendor_requests_total", "429");
    let refused = series("tether_vendor_requests_total", "401");
    let throttled = "tether_vendor_throttled_total{system=\"crmoffice\"}";
    let failures = "tether_credentials_failures_total{system=\"crmoffice\"}";
    let latency = "tether_vendor_request_duration_seconds_count{system=\"crmoffice\"}";
    let before: Vec<f64> = [
        ok.as_str(),
        &limited,
        &refused,
        throttled,
        failures,
        latency,
    ]
    .iter()
    .map(|s| value(s))
    .collect();

    let url = |p: &str| url::Url::parse(&format!("{}{p}", server.uri())).unwrap();
    vendor.send(Call::get(url("/ok"))).await.unwrap();
    vendor.send(Call::get(url("/limited"))).await.unwrap_err();
    vendor.send(Call::get(url("/refused"))).await.unwrap_err();

    let after: Vec<f64> = [
        ok.as_str(),
        &limited,
        &refused,
        throttled,
        failures,
        latency,
    ]
    .iter()
    .map(|s| value(s))
    .collect();
    let increase: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // ok, 429, 401, throttled, credential failures, latency observations
    for (i, at_least) in [1.0, 1.0, 1.0, 1.0, 1.0, 3.0].iter().enumerate() {
        assert!(
            increase[i] >= *at_least,
            "series {i} rose by {} (before {before:?}, after {after:?})",
            increase[i]
        );
    }
    let text = tether::ops::metrics::install().render();
    assert!(
        text.contains(
            "tether_vendor_request_duration_seconds_bucket{system=\"crmoffice\",le=\"0.005\"}"
        ),
        "a histogram with buckets, not a summary"
    );
}
