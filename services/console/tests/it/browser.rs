//! The console in a real browser: Debian's chromium, headless, driven through
//! chromedriver (started here on a free port) with fantoccini.
//!
//! Without chromium and chromedriver these tests fail saying how to install
//! them, unless KEEL_SKIP_BROWSER_TESTS=1 (then they skip, saying so).
//! KEEL_CONSOLE_SCREENSHOTS=DIR writes the overview and a job's page as PNGs
//! into DIR (docs/console-*.png come from there).

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use keel_proto::jobs::v1::JobStatus;
use serde_json::json;

use crate::support::{Env, OPERATOR, PASSWORD, USER, WAIT};

const CHROMEDRIVER: &str = "chromedriver";
const CHROMIUM: [&str; 2] = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];

/// chromedriver on a free port and a headless chromium session; dropped
/// with the test.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
}

impl Browser {
    /// None (after saying so) when KEEL_SKIP_BROWSER_TESTS=1.
    async fn start() -> Option<Self> {
        if std::env::var("KEEL_SKIP_BROWSER_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("KEEL_SKIP_BROWSER_TESTS=1: skipping this browser test");
            return None;
        }
        let chromium = CHROMIUM.iter().find(|p| std::path::Path::new(p).exists());
        let (Some(chromium), true) = (chromium, which(CHROMEDRIVER)) else {
            panic!(
                "the console's browser tests need chromium and chromedriver: install them \
                 (Debian/Ubuntu: `apt-get install chromium chromium-driver`; scripts/test.sh \
                 does so when it runs as root), or set KEEL_SKIP_BROWSER_TESTS=1 to skip them"
            );
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // Its own process group, which the chromium it starts joins: a test
        // that panics kills the whole group on drop (see `Drop`).
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let mut args = vec![
            "--headless=new",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            "--hide-scrollbars",
        ];
        // Chromium refuses to run as root without this.
        if unsafe_root() {
            args.push("--no-sandbox");
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut last = None;
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return Some(Self { client, driver }),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver on {url} did not start a session: {last:?}");
    }

    async fn goto(&self, env: &Env, path: &str) {
        self.client
            .goto(&format!("{}{path}", env.url))
            .await
            .expect("goto");
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    /// Clicks `css` and waits for the page it leads to (every button here
    /// submits a form): chromedriver may answer the click before the next
    /// page replaced this one, and a check made then reads the old page.
    async fn click(&self, css: &str) {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        element.click().await.expect("click");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The clicked element goes stale once the next page has loaded.
        while element.tag_name().await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{css}: no new page 10 s after the click"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("url")
            .path()
            .to_string()
    }

    async fn sign_in(&self, env: &Env, email: &str) {
        self.goto(env, "/login").await;
        self.client
            .find(Locator::Css("#email"))
            .await
            .unwrap()
            .send_keys(email)
            .await
            .unwrap();
        self.client
            .find(Locator::Css("#password"))
            .await
            .unwrap()
            .send_keys(PASSWORD)
            .await
            .unwrap();
        self.click("#sign-in").await;
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("KEEL_CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        let path = std::path::Path::new(&dir).join(name);
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }

    /// Ends the session; dropping `self` then stops chromedriver and
    /// whatever of chromium is left.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// A test that panics never reaches [`Browser::close`]: chromedriver dies
/// with the handle, but the chromium it started would outlive the test, so
/// the whole process group goes.
impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(group) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn which(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false)
}

fn unsafe_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn an_operator_sees_a_failed_job_retries_it_and_sees_it_succeed() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::start().await;
    // Some history for the chart and the table.
    for n in 0..3 {
        env.failed_job(json!({"n": n})).await;
    }
    let job = env
        .failed_job(json!({"customer": "acme", "invoice": 1042}))
        .await;

    browser.sign_in(&env, OPERATOR).await;
    assert_eq!(browser.path().await, "/");
    assert!(browser.text("#kinds").await.contains("flaky"));
    browser.screenshot("console-overview.png").await;
    let link = format!("a.job-link[href='/jobs/{}']", job.id);
    browser.click(&link).await;
    assert_eq!(browser.path().await, format!("/jobs/{}", job.id));
    assert_eq!(browser.text("#job-status").await, "failed");
    assert!(
        browser
            .text("#job-error")
            .await
            .contains("upstream said no")
    );

    browser.click("#retry").await;
    assert_eq!(browser.path().await, format!("/jobs/{}/retry", job.id));
    browser.click("#confirm").await;
    assert_eq!(browser.path().await, format!("/jobs/{}", job.id));
    assert!(browser.text("#flash").await.contains("Queued again"));

    env.wait_for(&job.id, JobStatus::Succeeded).await;
    browser.goto(&env, &format!("/jobs/{}", job.id)).await;
    assert_eq!(browser.text("#job-status").await, "succeeded");
    assert!(browser.text("#output").await.contains("\"second\""));
    let history = browser.text("#history").await;
    assert!(
        history.contains("failed") && history.contains("succeeded"),
        "{history}"
    );
    browser.screenshot("console-job.png").await;
    browser.close().await;
}

#[tokio::test]
async fn a_non_admin_cannot_get_in() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::start().await;
    browser.sign_in(&env, USER).await;
    assert_eq!(browser.path().await, "/login");
    assert!(browser.text("#error").await.contains("not an operator"));
    browser.goto(&env, "/jobs").await;
    assert_eq!(browser.path().await, "/login", "no session was kept");
    browser.close().await;
}

#[tokio::test]
async fn a_hostile_payload_renders_inert() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::start().await;
    let job = env
        .failed_job(
            json!({"x": "<script>alert(1)</script>", "img": "<img src=x onerror=alert(2)>"}),
        )
        .await;
    browser.sign_in(&env, OPERATOR).await;
    browser.goto(&env, &format!("/jobs/{}", job.id)).await;
    let payload = browser.text("#payload").await;
    assert!(payload.contains("<script>alert(1)</script>"), "{payload}");
    assert!(
        payload.contains("<img src=x onerror=alert(2)>"),
        "{payload}"
    );
    let scripts = browser
        .client
        .find_all(Locator::Css("script"))
        .await
        .unwrap();
    assert!(scripts.is_empty(), "a script element made it into the page");
    let images = browser.client.find_all(Locator::Css("img")).await.unwrap();
    assert!(images.is_empty(), "an img element made it into the page");
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "an alert is open: the payload ran"
    );
    browser.close().await;
}

#[tokio::test]
async fn a_cross_site_form_post_is_refused() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::start().await;
    let job = env.failed_job(json!({"n": 1})).await;
    browser.sign_in(&env, OPERATOR).await;
    // Another site (localhost is not 127.0.0.1 to a browser) with a form
    // aimed at the console's retry action.
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_port = evil.local_addr().unwrap().port();
    let target = format!("{}/jobs/{}/retry", env.url, job.id);
    let page = format!(
        "<!doctype html><form method=post action='{target}'>\
         <input type=hidden name=csrf value=guess><button id=go>win a prize</button></form>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    tokio::spawn(async move { axum::serve(evil, app).await });
    browser
        .client
        .goto(&format!("http://localhost:{evil_port}/"))
        .await
        .unwrap();
    browser.click("#go").await;
    assert!(
        browser
            .text("#error")
            .await
            .contains("did not come from the console")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.get(&job.id).await.status(), JobStatus::Failed);
    browser.close().await;
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::start().await;
    browser.sign_in(&env, OPERATOR).await;
    assert_eq!(browser.path().await, "/");
    let cookie = browser
        .client
        .get_named_cookie("keel_console_session")
        .await
        .expect("session cookie");
    let id = cookie.value().to_string();
    browser.click("#sign-out").await;
    assert_eq!(browser.path().await, "/login");
    browser.goto(&env, "/").await;
    assert_eq!(browser.path().await, "/login");
    // The old session id, replayed from elsewhere, is dead too.
    let mut http = crate::support::Http::new(&env);
    http.cookie = Some(format!("keel_console_session={id}"));
    let answer = http.get("/").await;
    assert_eq!(answer.status(), reqwest::StatusCode::SEE_OTHER);
    let _ = WAIT;
    browser.close().await;
}
