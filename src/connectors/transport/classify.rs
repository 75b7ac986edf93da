//! Vendor answers and send failures as [`ConnectorError`]s, and `Retry-After`.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use reqwest::{Response, StatusCode};

use crate::connectors::ConnectorError;
use crate::domain::SystemId;

/// `Retry-After` as seconds (`"30"`, also `"1.5"`) or an HTTP date, if present and sane. The
/// header is read the same whatever the body's type (Zendesk may answer 429 in `text/plain`).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Maps a failure to send or to read an answer.
pub fn send_error(system: SystemId, error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::Timeout { system }
    } else {
        ConnectorError::Transient {
            system,
            message: format!("request failed: {}", without_url(&error)),
        }
    }
}

/// reqwest's messages include the URL, which may carry a query with tokens; keep only the kind.
fn without_url(error: &reqwest::Error) -> String {
    let mut owned = error.to_string();
    if let Some(url) = error.url() {
        owned = owned.replace(url.as_str(), "<url>");
    }
    owned
}

/// Passes a success (and 404, which callers read as "gone") through and turns every other
/// answer into the right [`ConnectorError`]. The body of an error is cut to 300 characters.
pub async fn check(system: SystemId, response: Response) -> Result<Response, ConnectorError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_FOUND {
        return Ok(response);
    }
    let retry = retry_after(response.headers());
    let body = response.text().await.unwrap_or_default();
    let message: String = body.chars().take(300).collect();
    Err(classify(system, status, retry, message))
}

/// An answer that is not what the vendor documents (worth a retry: it may be a proxy's page).
pub fn malformed(system: SystemId, what: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Transient {
        system,
        message: format!("malformed response from {system}: {what}"),
    }
}

/// The error for a vendor's non-success answer.
pub fn classify(
    system: SystemId,
    status: StatusCode,
    retry_after: Option<Duration>,
    message: String,
) -> ConnectorError {
    match status {
        StatusCode::TOO_MANY_REQUESTS => ConnectorError::RateLimited {
            system,
            retry_after,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            crate::ops::metrics::credentials_failure(system);
            ConnectorError::Unauthorized { system, message }
        }
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
            ConnectorError::Timeout { system }
        }
        s if s.is_server_error() => ConnectorError::Transient {
            system,
            message: format!("{s}: {message}"),
        },
        s => ConnectorError::Rejected {
            system,
            status: s.as_u16(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("30"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(30)));
        headers.insert("retry-after", HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&headers), None);
        let in_a_minute = SystemTime::now() + Duration::from_secs(60);
        let date = httpdate::fmt_http_date(in_a_minute);
        headers.insert("retry-after", HeaderValue::from_str(&date).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(58) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO), "a date past");
        headers.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
