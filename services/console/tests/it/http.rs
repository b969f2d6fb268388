//! The console over plain HTTP: headers, sessions, CSRF, escaping, redirects.

use keel_proto::jobs::v1::JobStatus;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::json;

use crate::support::{Env, Http, OPERATOR, USER};

fn location(response: &reqwest::Response) -> &str {
    response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let env = Env::start().await;
    let mut http = Http::new(&env);
    let mut pages = vec![http.get("/login").await, http.get("/nope").await];
    http.sign_in(OPERATOR).await;
    pages.push(http.get("/").await);
    for page in pages {
        let h = page.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(h.contains_key("referrer-policy"));
    }
}

#[tokio::test]
async fn pages_without_a_session_redirect_to_sign_in() {
    let env = Env::start().await;
    let http = Http::new(&env);
    for path in [
        "/",
        "/jobs",
        "/jobs/0190e0b4-0000-7000-8000-000000000000",
        "/workers",
        "/dead-letters",
        "/schedules",
        "/users",
        "/audit",
    ] {
        let answer = http.get(path).await;
        assert_eq!(answer.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&answer), "/login", "{path}");
    }
    // A made-up session id is no session either.
    let mut forged = Http::new(&env);
    forged.cookie = Some(format!("keel_console_session={}", "ab".repeat(32)));
    assert_eq!(location(&forged.get("/").await), "/login");
}

#[tokio::test]
async fn signing_in_sets_a_strict_http_only_cookie_and_no_token_reaches_the_page() {
    let env = Env::start().await;
    let mut http = Http::new(&env);
    let answer = http.sign_in(OPERATOR).await;
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&answer), "/");
    let cookie = answer
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("keel_console_session="))
        .expect("session cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    let id = cookie["keel_console_session=".len()..]
        .split(';')
        .next()
        .unwrap();
    assert_eq!(id.len(), 64, "256 bits, hex");
    assert!(!id.contains('.'), "a random id, not a token");
    let overview = http.get("/").await;
    assert_eq!(overview.status(), StatusCode::OK);
    let body = overview.text().await.unwrap();
    assert!(body.contains(OPERATOR));
    // Access tokens are JWTs: base64url of `{"` starts with eyJ.
    assert!(!body.contains("eyJ"), "a token leaked into the page");
}

#[tokio::test]
async fn the_cookie_is_secure_when_configured() {
    let env = Env::start_with(|c| c.secure_cookies = true).await;
    let mut http = Http::new(&env);
    let answer = http.sign_in(OPERATOR).await;
    let cookie = answer
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("keel_console_session="))
        .expect("session cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test]
async fn sign_in_errors_do_not_say_whether_the_email_exists() {
    let env = Env::start().await;
    let mut unknown = Http::new(&env);
    let page = unknown.get("/login").await;
    let login_cookie = crate::support::set_cookie(&page, "keel_console_login").unwrap();
    let csrf = crate::support::csrf_of(&page.text().await.unwrap());
    unknown.cookie = Some(login_cookie.split(';').next().unwrap().to_string());
    let a = unknown
        .post(
            "/login",
            &[
                ("csrf", &csrf),
                ("email", "nobody@example.com"),
                ("password", "whatever it is"),
            ],
        )
        .await;
    let b = unknown
        .post(
            "/login",
            &[
                ("csrf", &csrf),
                ("email", OPERATOR),
                ("password", "not the password"),
            ],
        )
        .await;
    assert_eq!(a.status(), b.status());
    assert!(crate::support::set_cookie(&a, "keel_console_session").is_none());
    let (a, b) = (a.text().await.unwrap(), b.text().await.unwrap());
    let error = |page: &str| {
        let start = page.find("id=\"error\">").expect("an error") + 11;
        page[start..start + page[start..].find('<').unwrap()].to_string()
    };
    assert_eq!(error(&a), error(&b));
    assert_eq!(error(&a), "Email or password is incorrect.");
}

#[tokio::test]
async fn a_non_admin_gets_no_session() {
    let env = Env::start().await;
    let mut http = Http::new(&env);
    let answer = http.sign_in(USER).await;
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    assert!(http.cookie.is_none(), "no session cookie for a non-admin");
    assert!(answer.text().await.unwrap().contains("not an operator"));
}

#[tokio::test]
async fn a_post_without_the_right_csrf_token_or_origin_is_refused() {
    let env = Env::start().await;
    let job = env.failed_job(json!({"n": 1})).await;
    let mut http = Http::new(&env);
    http.sign_in(OPERATOR).await;
    let csrf = http.csrf().await;
    let path = format!("/jobs/{}/retry", job.id);

    let no_token = http.post(&path, &[]).await;
    assert_eq!(no_token.status(), StatusCode::FORBIDDEN);
    let wrong = http.post(&path, &[("csrf", &"0".repeat(64))]).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let cross_site = http
        .post_from(&path, &[("csrf", &csrf)], Some("http://evil.example"))
        .await;
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    let no_origin = http.post_from(&path, &[("csrf", &csrf)], None).await;
    assert_eq!(no_origin.status(), StatusCode::FORBIDDEN);
    // Another session's token does not do either.
    let mut other = Http::new(&env);
    other.sign_in(OPERATOR).await;
    let theirs = http.post(&path, &[("csrf", &other.csrf().await)]).await;
    assert_eq!(theirs.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        env.get(&job.id).await.status(),
        JobStatus::Failed,
        "nothing changed"
    );

    // The console's own form does.
    let ok = http.post(&path, &[("csrf", &csrf)]).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    env.wait_for(&job.id, JobStatus::Succeeded).await;
}

#[tokio::test]
async fn sign_in_itself_needs_its_form_token() {
    let env = Env::start().await;
    let http = Http::new(&env);
    let answer = http
        .post(
            "/login",
            &[("email", OPERATOR), ("password", crate::support::PASSWORD)],
        )
        .await;
    assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    assert!(crate::support::set_cookie(&answer, "keel_console_session").is_none());
}

#[tokio::test]
async fn a_hostile_payload_is_escaped() {
    let env = Env::start().await;
    let job = env
        .failed_job(json!({"x": "<script>alert(1)</script>", "y": "\" onmouseover=\"alert(2)"}))
        .await;
    let mut http = Http::new(&env);
    http.sign_in(OPERATOR).await;
    let page = http
        .get(&format!("/jobs/{}", job.id))
        .await
        .text()
        .await
        .unwrap();
    // askama escapes with numeric references.
    assert!(
        page.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{page}"
    );
    assert!(!page.contains("<script"), "{page}");
    assert!(!page.contains("\" onmouseover"), "{page}");
}

#[tokio::test]
async fn bad_filters_are_refused_naming_the_field() {
    let env = Env::start().await;
    let mut http = Http::new(&env);
    http.sign_in(OPERATOR).await;
    let answer = http.get("/jobs?after=yesterday").await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await.unwrap().contains("after:"));
    let answer = http.get("/jobs?user=not-a-uuid").await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await.unwrap().contains("user"));
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let env = Env::start().await;
    let mut http = Http::new(&env);
    http.sign_in(OPERATOR).await;
    let csrf = http.csrf().await;
    let out = http.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&out), "/login");
    // The old cookie, replayed, is no session any more.
    let again = http.get("/").await;
    assert_eq!(location(&again), "/login");
}

#[tokio::test]
async fn every_page_renders_for_an_operator_and_actions_are_audited() {
    let env = Env::start().await;
    let job = env.failed_job(json!({"n": 1})).await;
    let mut http = Http::new(&env);
    http.sign_in(OPERATOR).await;
    let csrf = http.csrf().await;
    let retried = http
        .post(&format!("/jobs/{}/retry", job.id), &[("csrf", &csrf)])
        .await;
    assert_eq!(retried.status(), StatusCode::SEE_OTHER);
    env.wait_for(&job.id, JobStatus::Succeeded).await;

    let users = http.get("/users").await;
    assert_eq!(users.status(), StatusCode::OK);
    let users = users.text().await.unwrap();
    assert!(users.contains(USER) && users.contains(OPERATOR));
    for path in [
        "/",
        "/jobs?status=succeeded&kind=flaky",
        "/workers",
        "/dead-letters",
        "/schedules",
        &format!("/jobs/{}/delete", job.id),
        &format!("/users/{}/memories?namespace=agent-1", job.user_id),
    ] {
        let page = http.get(path).await;
        assert_eq!(page.status(), StatusCode::OK, "{path}");
    }
    let jobs = http
        .get("/jobs?status=succeeded")
        .await
        .text()
        .await
        .unwrap();
    assert!(jobs.contains(&job.id));
    let audit = http.get("/audit").await.text().await.unwrap();
    assert!(audit.contains("job.retry"), "{audit}");
    assert!(audit.contains("memory.read"), "{audit}");
}

#[tokio::test]
async fn the_health_endpoint_answers_without_a_session_and_the_probe_reads_it() {
    let env = Env::start().await;
    let http = Http::new(&env);
    let answer = http.get("/healthz").await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.text().await.unwrap(), "ok\n");
    let addr = env.url.trim_start_matches("http://");
    assert!(keel_console::health::probe(addr).await);
    // Nothing listening there: the probe says so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    assert!(!keel_console::health::probe(&closed_addr).await);
}
