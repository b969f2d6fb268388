//! The audit log: every admin action, newest first.

use askama::Template;
use axum::extract::{Query, State};
use keel_proto::admin::v1::ListAuditEventsRequest;

use super::{Paging, render};
use crate::App;
use crate::backend::authed;
use crate::error::PageResult;
use crate::session::Session;
use crate::view::{self, Nav};

struct EventRow {
    at: String,
    admin_email: String,
    action: String,
    target: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    nav: Nav,
    events: Vec<EventRow>,
    next: Option<String>,
}

pub(crate) async fn page(
    State(app): State<App>,
    session: Session,
    Query(paging): Query<Paging>,
) -> PageResult {
    let answer = app
        .backends
        .admin()
        .list_audit_events(authed(
            ListAuditEventsRequest {
                page_size: 100,
                page_token: paging.page,
            },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    render(&AuditPage {
        nav: Nav::new(&app, &session, "audit"),
        events: answer
            .events
            .iter()
            .map(|e| EventRow {
                at: view::time(e.at.as_ref()),
                admin_email: e.admin_email.clone(),
                action: e.action.clone(),
                target: e.target.clone(),
                detail: view::json_compact(e.detail.as_ref()),
            })
            .collect(),
        next: super::next_link("/audit", &answer.next_page_token),
    })
}
