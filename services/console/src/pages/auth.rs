//! Sign in and sign out. Signing in asks the auth service (Login), then one
//! admin RPC decides whether the account is an operator; if not, its tokens
//! are revoked and no session is kept. The error never says whether the
//! email exists.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use keel_proto::admin::v1::ListWorkersRequest;
use keel_proto::auth::v1::{LoginRequest, LogoutRequest};
use serde::Deserialize;
use tonic::Code;

use crate::App;
use crate::backend::authed;
use crate::error::PageError;
use crate::session::{COOKIE, LOGIN_COOKIE, Session, Tokens, cookie, random_token};
use crate::view::Nav;

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    nav: Nav,
    csrf: String,
    email: String,
    error: Option<&'static str>,
}

pub(crate) async fn login_page(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE)
        && app.sessions.get(id).is_some()
    {
        return Redirect::to("/").into_response();
    }
    login_form(StatusCode::OK, String::new(), None)
}

/// The form with a fresh double-submit CSRF token in its cookie.
fn login_form(status: StatusCode, email: String, error: Option<&'static str>) -> Response {
    let csrf = random_token();
    let page = LoginPage {
        nav: Nav::anonymous(),
        csrf: csrf.clone(),
        email,
        error,
    };
    let body = match page.render() {
        Ok(body) => body,
        Err(e) => return PageError::from(e).into_response(),
    };
    let mut response = (status, Html(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={csrf}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600"
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    email: String,
    password: String,
}

pub(crate) async fn login(State(app): State<App>, Form(form): Form<LoginForm>) -> Response {
    let email = form.email.trim().to_string();
    let answer = app
        .backends
        .auth()
        .login(LoginRequest {
            email: email.clone(),
            password: form.password,
        })
        .await;
    let tokens = match answer.map(|r| r.into_inner().tokens) {
        Ok(Some(pair)) => Tokens::from_pair(pair),
        Ok(None) => {
            return PageError::Backend(tonic::Status::internal("no tokens")).into_response();
        }
        Err(status) => {
            return match status.code() {
                Code::Unauthenticated | Code::InvalidArgument | Code::NotFound => login_form(
                    StatusCode::UNAUTHORIZED,
                    email,
                    Some("Email or password is incorrect."),
                ),
                Code::ResourceExhausted => login_form(
                    StatusCode::TOO_MANY_REQUESTS,
                    email,
                    Some("Too many attempts. Wait a few minutes and try again."),
                ),
                _ => PageError::Backend(status).into_response(),
            };
        }
    };
    let probe = app
        .backends
        .admin()
        .list_workers(authed(ListWorkersRequest {}, &tokens.access_token))
        .await;
    match probe {
        Ok(_) => {}
        Err(status) if status.code() == Code::PermissionDenied => {
            revoke(&app, tokens).await;
            return login_form(
                StatusCode::FORBIDDEN,
                email,
                Some("This account is not an operator: it does not hold the admin role."),
            );
        }
        Err(status) => {
            revoke(&app, tokens).await;
            return PageError::Backend(status).into_response();
        }
    }
    tracing::info!("operator signed in");
    let id = app.sessions.create(email, tokens);
    let mut response = Redirect::to("/").into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&session_cookie(&app, &id)) {
        headers.append(header::SET_COOKIE, value);
    }
    headers.append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "keel_console_login=; HttpOnly; SameSite=Strict; Path=/login; Max-Age=0",
        ),
    );
    response
}

fn session_cookie(app: &App, id: &str) -> String {
    let secure = if app.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        app.sessions.max_age().as_secs()
    )
}

/// Logs the tokens out at the auth service (best effort).
async fn revoke(app: &App, tokens: Tokens) {
    let answer = app
        .backends
        .auth()
        .logout(LogoutRequest {
            refresh_token: tokens.refresh_token,
        })
        .await;
    if let Err(status) = answer {
        tracing::warn!(code = ?status.code(), "could not revoke the session's refresh token");
    }
}

pub(crate) async fn logout(State(app): State<App>, session: Session) -> Response {
    if let Some(tokens) = app.sessions.remove(&session.id) {
        revoke(&app, tokens).await;
    }
    tracing::info!("operator signed out");
    crate::error::sign_in_again()
}
