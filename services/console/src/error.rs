//! How a page fails: gRPC answers mapped to HTTP and an error page. The
//! backend's own message is shown only for bad input and refused actions
//! (where it names the field or the rule); outages show a generic line and
//! are logged without any token.

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use tonic::Code;

use crate::view::Nav;

#[derive(Debug)]
pub(crate) enum PageError {
    /// No live session, or the services no longer accept its tokens.
    SignIn,
    /// The account lost the admin role.
    Denied,
    NotFound(String),
    BadInput(String),
    Backend(tonic::Status),
}

pub(crate) type PageResult<T = Response> = Result<T, PageError>;

impl From<tonic::Status> for PageError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::Unauthenticated => Self::SignIn,
            Code::PermissionDenied => Self::Denied,
            Code::NotFound => Self::NotFound(status.message().to_string()),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                Self::BadInput(status.message().to_string())
            }
            _ => Self::Backend(status),
        }
    }
}

impl From<askama::Error> for PageError {
    fn from(e: askama::Error) -> Self {
        Self::Backend(tonic::Status::internal(format!("template: {e}")))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn => sign_in_again(),
            Self::Denied => page(
                StatusCode::FORBIDDEN,
                "Not an operator",
                "This account does not hold the admin role (any more).".into(),
            ),
            Self::NotFound(message) => page(StatusCode::NOT_FOUND, "Not found", message),
            Self::BadInput(message) => page(StatusCode::BAD_REQUEST, "Bad request", message),
            Self::Backend(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "backend call failed");
                let message = match status.code() {
                    Code::Unavailable | Code::DeadlineExceeded => {
                        "A Keel service is unreachable right now. Try again in a moment."
                    }
                    Code::ResourceExhausted => "The service is busy. Try again in a moment.",
                    _ => "Something went wrong talking to the Keel services.",
                };
                page(StatusCode::BAD_GATEWAY, "Service problem", message.into())
            }
        }
    }
}

/// To the sign-in page, forgetting the session cookie.
pub(crate) fn sign_in_again() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "keel_console_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    response
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    nav: Nav,
    title: &'static str,
    message: String,
}

/// A plain page saying what went wrong.
pub(crate) fn page(status: StatusCode, title: &'static str, message: String) -> Response {
    let body = ErrorPage {
        nav: Nav::anonymous(),
        title,
        message,
    }
    .render()
    .unwrap_or_else(|_| "error".into());
    (status, axum::response::Html(body)).into_response()
}
