//! Schedules of every user, and pausing or resuming one.

use askama::Template;
use axum::extract::{Path, Query, State};
use keel_proto::admin::v1::{ListSchedulesRequest, PauseScheduleRequest, ResumeScheduleRequest};

use super::{Paging, done, refused, render};
use crate::App;
use crate::backend::authed;
use crate::error::{PageError, PageResult};
use crate::session::Session;
use crate::view::{self, Nav};

struct ScheduleRow {
    id: String,
    user_id: String,
    name: String,
    cron: String,
    timezone: String,
    kind: String,
    paused: bool,
    next_run_at: String,
    last_run_at: String,
}

#[derive(Template)]
#[template(path = "schedules.html")]
struct SchedulesPage {
    nav: Nav,
    schedules: Vec<ScheduleRow>,
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
        .list_schedules(authed(
            ListSchedulesRequest {
                page_size: 50,
                page_token: paging.page,
                user_id: String::new(),
            },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    render(&SchedulesPage {
        nav: Nav::new(&app, &session, "schedules"),
        schedules: answer
            .schedules
            .iter()
            .map(|s| ScheduleRow {
                id: s.id.clone(),
                user_id: s.user_id.clone(),
                name: s.name.clone(),
                cron: s.cron.clone(),
                timezone: s.timezone.clone(),
                kind: s.kind.clone(),
                paused: s.paused,
                next_run_at: view::time(s.next_run_at.as_ref()),
                last_run_at: view::time(s.last_run_at.as_ref()),
            })
            .collect(),
        next: super::next_link("/schedules", &answer.next_page_token),
    })
}

pub(crate) async fn act(
    State(app): State<App>,
    session: Session,
    Path((id, action)): Path<(String, String)>,
) -> PageResult {
    let token = &session.tokens.access_token;
    let admin = || app.backends.admin();
    let answer = match action.as_str() {
        "pause" => admin()
            .pause_schedule(authed(PauseScheduleRequest { id: id.clone() }, token))
            .await
            .map(|_| "Schedule paused.".to_string()),
        "resume" => admin()
            .resume_schedule(authed(ResumeScheduleRequest { id: id.clone() }, token))
            .await
            .map(|_| "Schedule resumed.".to_string()),
        _ => return Err(PageError::NotFound("No such page.".into())),
    };
    let message = match answer {
        Ok(message) => message,
        Err(status) => refused(status)?,
    };
    done(&app, &session, "/schedules", message)
}
