//! What every request passes through: hardening headers on every response,
//! and, on every POST, a same-origin check (Origin, else Referer) and the
//! CSRF token (the session's, or the sign-in form's double-submit cookie).

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::App;
use crate::session::{COOKIE, LOGIN_COOKIE, cookie};

/// Largest form body the console reads.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// No script at all, styles from the console only, no framing.
const CSP: &str = "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; \
                   object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub(crate) async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Refuses (403) a POST from another origin or without the right CSRF token.
pub(crate) async fn check_post(State(app): State<App>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    if !same_origin(request.headers()) {
        tracing::warn!(path = %request.uri().path(), "POST refused: not from the console's origin");
        return forbidden("This request did not come from the console's own pages.");
    }
    let expected = if request.uri().path() == "/login" {
        cookie(request.headers(), LOGIN_COOKIE).map(str::to_string)
    } else {
        cookie(request.headers(), COOKIE).and_then(|id| app.sessions.csrf(id))
    };
    let (parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_FORM_BYTES).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response();
    };
    let given = form_field(&bytes, "csrf");
    let ok = match (expected, given) {
        (Some(expected), Some(given)) if !expected.is_empty() => {
            bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
        }
        _ => false,
    };
    if !ok {
        tracing::warn!(path = %parts.uri.path(), "POST refused: missing or wrong CSRF token");
        return forbidden(
            "This form has expired or did not come from the console. Reload the page and try again.",
        );
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn forbidden(message: &'static str) -> Response {
    crate::error::page(StatusCode::FORBIDDEN, "Forbidden", message.to_string())
}

/// True when the Origin header (or, without one, the Referer) names the
/// host the request was sent to. A POST with neither is refused.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(source) = source else {
        return false;
    };
    // scheme://authority[/path...]
    let Some((scheme, rest)) = source.split_once("://") else {
        return false;
    };
    if scheme != "http" && scheme != "https" {
        return false;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.eq_ignore_ascii_case(host)
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origin_must_match_host() {
        let host = (header::HOST, "console.example:8080");
        assert!(same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "https://console.example:8080")
        ])));
        assert!(!same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "https://console.example:8080.evil.example")
        ])));
        assert!(same_origin(&headers(&[
            host.clone(),
            (header::REFERER, "http://console.example:8080/jobs?x=1")
        ])));
        assert!(!same_origin(&headers(&[
            host.clone(),
            (header::ORIGIN, "null")
        ])));
        assert!(!same_origin(&headers(&[host])));
    }

    #[test]
    fn the_csrf_field_is_read_from_the_form() {
        assert_eq!(
            form_field(b"a=1&csrf=abc%20d&b=2", "csrf").as_deref(),
            Some("abc d")
        );
        assert_eq!(form_field(b"a=1", "csrf"), None);
    }
}
