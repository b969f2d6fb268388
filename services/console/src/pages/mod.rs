//! The pages, one module per group; what they share: the signed-in operator
//! as an extractor (refreshing the access token when it is about to expire),
//! rendering, and the redirect-with-message after an action.

pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod dead_letters;
pub(crate) mod jobs;
pub(crate) mod overview;
pub(crate) mod schedules;
pub(crate) mod users;
pub(crate) mod workers;

use askama::Template;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use keel_proto::auth::v1::RefreshRequest;

use crate::App;
use crate::error::{PageError, PageResult};
use crate::session::{COOKIE, Session, Tokens, cookie};

impl FromRequestParts<App> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, PageError> {
        let id = cookie(&parts.headers, COOKIE).ok_or(PageError::SignIn)?;
        let session = app.sessions.get(id).ok_or(PageError::SignIn)?;
        if !session.tokens.stale() {
            return Ok(session);
        }
        let _refreshing = app.sessions.refresh_lock().await;
        // Another request may have refreshed while this one waited.
        let session = app.sessions.get(id).ok_or(PageError::SignIn)?;
        if !session.tokens.stale() {
            return Ok(session);
        }
        let answer = app
            .backends
            .auth()
            .refresh(RefreshRequest {
                refresh_token: session.tokens.refresh_token.clone(),
            })
            .await;
        match answer.map(|r| r.into_inner().tokens) {
            Ok(Some(pair)) => {
                let tokens = Tokens::from_pair(pair);
                app.sessions.set_tokens(id, tokens.clone());
                Ok(Session { tokens, ..session })
            }
            Ok(None) => Err(PageError::SignIn),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                app.sessions.remove(id);
                Err(PageError::SignIn)
            }
            Err(status) => Err(PageError::Backend(status)),
        }
    }
}

pub(crate) fn render(template: &impl Template) -> PageResult {
    Ok(Html(template.render()?).into_response())
}

/// After an action: back to `to`, with `message` shown once there.
pub(crate) fn done(app: &App, session: &Session, to: &str, message: String) -> PageResult {
    app.sessions.set_flash(&session.id, message);
    Ok(Redirect::to(to).into_response())
}

/// The outcome of an action's RPC: refusals the operator can act on
/// (a rule, a missing target) come back as a message on the page.
pub(crate) fn refused(status: tonic::Status) -> Result<String, PageError> {
    use tonic::Code;
    match status.code() {
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::AlreadyExists => {
            Ok(format!("Refused: {}", status.message()))
        }
        _ => Err(status.into()),
    }
}

pub(crate) async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/console.css"),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    crate::error::page(StatusCode::NOT_FOUND, "Not found", "No such page.".into())
}

/// `?a=1&b=2` from a serializable query (empty when it has no fields).
pub(crate) fn query_string(query: &impl serde::Serialize) -> String {
    match serde_urlencoded::to_string(query) {
        Ok(q) if !q.is_empty() => format!("?{q}"),
        _ => String::new(),
    }
}

/// The link to the next page of `path`, when there is one.
/// The page token of a listing page's `?page=` (empty: the first page).
#[derive(serde::Deserialize)]
pub(crate) struct Paging {
    #[serde(default)]
    pub(crate) page: String,
}

pub(crate) fn next_link(path: &str, token: &str) -> Option<String> {
    #[derive(serde::Serialize)]
    struct Page<'a> {
        page: &'a str,
    }
    (!token.is_empty()).then(|| format!("{path}{}", query_string(&Page { page: token })))
}
