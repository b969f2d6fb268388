//! Keel's operator console: server-rendered pages (askama templates, inline
//! SVG charts, no JavaScript) over the admin API of the auth, jobs and memory
//! services. Operators sign in with a Keel account holding the admin role;
//! the console keeps their tokens in a server-side session and acts with them.
//!
//! Security: sessions live in this process's memory behind a random 256-bit
//! cookie (HttpOnly, SameSite=Strict); every POST carries the session's CSRF
//! token and a same-origin Origin/Referer; every response carries a strict
//! CSP and the usual hardening headers; templates escape every value.

mod backend;
pub mod config;
mod error;
pub mod health;
mod pages;
mod security;
mod session;
mod view;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use keel_shared::StartupError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::backend::Backends;
use crate::session::Sessions;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App(Arc<AppInner>);

pub(crate) struct AppInner {
    pub(crate) config: Config,
    pub(crate) backends: Backends,
    pub(crate) sessions: Sessions,
}

impl std::ops::Deref for App {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// Serves the console on `listener` until `shutdown`, then gives in-flight
/// requests the shutdown grace.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    config.validate()?;
    let backends = Backends::new(&config)?;
    let sessions = Sessions::new(config.session_idle(), config.session_max());
    let grace = config.runtime.shutdown_grace();
    let app = App(Arc::new(AppInner {
        config,
        backends,
        sessions,
    }));
    let addr = listener
        .local_addr()
        .map_err(|e| StartupError::Other(e.to_string()))?;
    tracing::info!(%addr, "console listening on http://{addr}/");
    let signal = shutdown.clone();
    let server = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { signal.cancelled().await })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => return res.map_err(|e| StartupError::Other(e.to_string())),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(res) => res.map_err(|e| StartupError::Other(e.to_string())),
        Err(_) => {
            tracing::warn!(
                ?grace,
                "requests still running after the grace period; stopping"
            );
            Ok(())
        }
    }
}

fn router(app: App) -> Router {
    use pages::{audit, auth, dead_letters, jobs, overview, schedules, users, workers};
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/", get(overview::page))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::detail))
        .route("/jobs/{id}/{action}", get(jobs::confirm).post(jobs::act))
        .route("/workers", get(workers::page))
        .route("/dead-letters", get(dead_letters::page))
        .route("/dead-letters/{id}/replay", post(dead_letters::replay))
        .route("/schedules", get(schedules::page))
        .route("/schedules/{id}/{action}", post(schedules::act))
        .route("/users", get(users::list))
        .route("/users/{id}/{action}", post(users::act))
        .route("/users/{id}/memories", get(users::memories))
        .route("/audit", get(audit::page))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/healthz", get(health::healthz))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            security::check_post,
        ))
        .layer(axum::middleware::from_fn(security::headers))
        .with_state(app)
}
