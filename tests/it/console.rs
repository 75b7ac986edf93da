//! The web console in a real browser: headless Chromium (Debian's `chromium`), driven through
//! `chromedriver` (Debian's `chromium-driver`) with fantoccini, against a running Tether with the
//! simulators. It logs in with the admin token, opens every page, explains a record, retries a
//! dead letter, and saves a screenshot of each page under `target/console-screenshots/`. It fails
//! on a JavaScript error or any console error (the browser log), a missing element, or a 4xx/5xx
//! answer to a page or anything the page loads (the Navigation and Resource Timing entries'
//! `responseStatus`).
//!
//! With `CI=true` and no Chromium, it installs both packages with apt-get (CI runs as root).
//! Elsewhere without them it skips with a loud message.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use super::admin::{Harness, TOKEN, WAIT};
use super::support::eventually;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Chromium and chromedriver are here (installed now when CI=true); false: skip.
fn ensure_browser() -> bool {
    let present = || PathBuf::from(CHROMIUM).exists() && PathBuf::from(CHROMEDRIVER).exists();
    if present() {
        return true;
    }
    if std::env::var("CI").as_deref() != Ok("true") {
        eprintln!(
            "\n\n*** SKIPPED console::a_person_logs_in_browses_every_page_and_retries_a_dead_letter: \
             no Chromium. Install it with `apt-get install chromium chromium-driver` to run the \
             browser test (CI installs it). ***\n"
        );
        return false;
    }
    let status = Command::new("sh")
        .args([
            "-c",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver",
        ])
        .status()
        .expect("apt-get runs");
    assert!(status.success(), "apt-get could not install chromium");
    assert!(present(), "chromium installed but not at {CHROMIUM}");
    true
}

/// A chromedriver process on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1366,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let caps = caps.as_object().unwrap().clone();
    let start = Instant::now();
    loop {
        // Plain HTTP to the local chromedriver: no TLS stack needed.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver did not start a browser: {e}"),
        }
    }
}

/// chromedriver's browser log (console messages and uncaught exceptions since the last call).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(r#"{"type":"browser"}"#.to_owned()),
        )
    }
}

/// The checks after every page: the expected element, no 4xx/5xx for the page or its resources,
/// no console error or JavaScript exception; then a screenshot.
async fn check_page(c: &Client, name: &str, expect: &str) {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(expect))
        .await
        .unwrap_or_else(|e| panic!("page {name}: no element {expect}: {e}"));
    let statuses = c
        .execute(
            "return performance.getEntriesByType('navigation')\
               .concat(performance.getEntriesByType('resource'))\
               .map(e => [e.name, e.responseStatus]);",
            vec![],
        )
        .await
        .unwrap();
    let statuses = statuses.as_array().unwrap();
    assert!(!statuses.is_empty(), "page {name}: no timing entries");
    for entry in statuses {
        let status = entry[1].as_u64().unwrap_or(0);
        assert!(
            (200..400).contains(&status),
            "page {name}: {} answered {status}",
            entry[0]
        );
    }
    let log = c.issue_cmd(BrowserLog).await.unwrap();
    let errors: Vec<&Value> = log
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
                .collect()
        })
        .unwrap_or_default();
    assert!(errors.is_empty(), "page {name}: browser errors: {errors:?}");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.png")),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_person_logs_in_browses_every_page_and_retries_a_dead_letter() {
    if !ensure_browser() {
        return;
    }
    let h = Harness::start(Some(TOKEN)).await;
    let org = h.create_org("Browsed AS");
    eventually("the ERP link", WAIT, || {
        h.active_link("zendesk.Organizations->customerp.Customer", &org)
    })
    .await;
    let dead = h.dead_letter().await;
    let plan = backfill_plan(&h).await;

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        // Not logged in: the console sends the browser to the login page.
        c.goto(&format!("{}/admin", h.base)).await.unwrap();
        check_page(&c, "login", "#token").await;
        assert!(c
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/admin/login"));
        c.find(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(TOKEN)
            .await
            .unwrap();
        c.find(Locator::Css("#login"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();

        check_page(&c, "overview", "#attention").await;
        assert_eq!(c.current_url().await.unwrap().path(), "/admin");
        assert!(text_of(&c, "#attention").await.contains("dead letter"));
        assert!(text_of(&c, "#systems").await.contains("Zendesk"));
        assert!(text_of(&c, "#flows").await.contains("customerp/Customer"));
        let page = c.source().await.unwrap();
        assert!(!page.contains(TOKEN), "the token must never be rendered");

        c.goto(&format!(
            "{}/admin/records?system=zendesk&entity_type=Organizations&id={org}",
            h.base
        ))
        .await
        .unwrap();
        check_page(&c, "record", "#explanation #links").await;
        assert!(text_of(&c, "#decisions").await.contains("created"));

        c.goto(&format!("{}/admin/backfill", h.base)).await.unwrap();
        check_page(&c, "backfill", &format!("#backfill-plans #plan-{plan}")).await;
        assert!(text_of(&c, &format!("#plan-{plan}"))
            .await
            .contains("not run"));

        c.find(Locator::LinkText("Dead letters"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        check_page(&c, "dead-letters", &format!("#dead-{dead}")).await;
        c.find(Locator::Css(&format!("#retry-{dead}")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        check_page(&c, "dead-letter-retried", "#notice").await;
        assert!(text_of(&c, "#notice")
            .await
            .contains("put back in the queue"));
        let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(dead)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
        assert_ne!(state, "dead", "the retry reached the queue");

        c.find(Locator::Css("#logout"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        check_page(&c, "logged-out", "#token").await;
    }))
    .await;
    // The browser goes with its session, also when a check failed.
    let _ = c.close().await;
    drop(driver);
    h.stop().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Without a browser: the session cookie's attributes, and forms refused without their CSRF token.
#[tokio::test]
async fn the_session_cookie_is_httponly_strict_and_forms_need_their_csrf_token() {
    let h = Harness::start(Some(TOKEN)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{p}", h.base);
    // Not logged in: sent to the login page.
    let r = http.get(url("/admin")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/admin/login");

    let login = http.get(url("/admin/login")).send().await.unwrap();
    let nonce_cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    let nonce = nonce_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    // A login without the form's token is refused even with the right admin token.
    let r = http
        .post(url("/admin/login"))
        .form(&[("token", TOKEN), ("csrf", "forged")])
        .header("cookie", format!("tether_login={nonce}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(url("/admin/login"))
        .form(&[("token", TOKEN), ("csrf", nonce.as_str())])
        .header("cookie", format!("tether_login={nonce}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(set.contains(attribute), "{attribute} missing in {set}");
    }
    let session = set.split(';').next().unwrap().to_owned();

    let dead = h.dead_letter().await;
    let r = http
        .post(url(&format!("/admin/dead-letters/{dead}/retry")))
        .header("cookie", &session)
        .form(&[("csrf", "not-the-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(dead)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(state, "dead", "a refused form changes nothing");
    // The logged-in page holds the right token; with it the retry goes through.
    let page = http
        .get(url("/admin/dead-letters"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let r = http
        .post(url(&format!("/admin/dead-letters/{dead}/retry")))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    h.stop().await;
}

/// A stored backfill plan of the organizations flow (not run), for the Backfill page.
async fn backfill_plan(h: &Harness) -> i64 {
    let (registry, _) = tether::registry::load(h.config.registry.overlay.as_deref()).unwrap();
    let flows = ["zendesk.Organizations->customerp.Customer".to_owned()];
    tether::backfill::plan::make_and_store(&h.config, &h.db.pool, &registry, &flows)
        .await
        .unwrap()
        .plan
}
