//! Workers the jobs service saw recently.

use askama::Template;
use axum::extract::State;
use keel_proto::admin::v1::ListWorkersRequest;

use super::render;
use crate::App;
use crate::backend::authed;
use crate::error::PageResult;
use crate::session::Session;
use crate::view::{self, Nav};

struct WorkerRow {
    worker_id: String,
    kinds: String,
    concurrency: String,
    last_seen_at: String,
    running_jobs: i32,
}

#[derive(Template)]
#[template(path = "workers.html")]
struct WorkersPage {
    nav: Nav,
    workers: Vec<WorkerRow>,
}

pub(crate) async fn page(State(app): State<App>, session: Session) -> PageResult {
    let workers = app
        .backends
        .admin()
        .list_workers(authed(ListWorkersRequest {}, &session.tokens.access_token))
        .await?
        .into_inner()
        .workers;
    render(&WorkersPage {
        nav: Nav::new(&app, &session, "workers"),
        workers: workers
            .iter()
            .map(|w| WorkerRow {
                worker_id: w.worker_id.clone(),
                kinds: w.kinds.join(", "),
                concurrency: match w.concurrency {
                    0 => String::new(),
                    n => n.to_string(),
                },
                last_seen_at: view::time(w.last_seen_at.as_ref()),
                running_jobs: w.running_jobs,
            })
            .collect(),
    })
}
