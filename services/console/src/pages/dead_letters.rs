//! The worker's dead letters, and replaying one.

use askama::Template;
use axum::extract::{Path, Query, State};
use keel_proto::admin::v1::{ListDeadLettersRequest, ReplayDeadLetterRequest};

use super::{Paging, done, refused, render};
use crate::App;
use crate::backend::authed;
use crate::error::PageResult;
use crate::session::Session;
use crate::view::{self, Nav};

struct DeadLetterRow {
    id: String,
    job_id: String,
    stream: String,
    reason: String,
    deliveries: i64,
    consumer: String,
    dead_lettered_at: String,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    nav: Nav,
    dead_letters: Vec<DeadLetterRow>,
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
        .list_dead_letters(authed(
            ListDeadLettersRequest {
                page_size: 50,
                page_token: paging.page,
            },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    render(&DeadLettersPage {
        nav: Nav::new(&app, &session, "dead-letters"),
        dead_letters: answer
            .dead_letters
            .iter()
            .map(|d| DeadLetterRow {
                id: d.id.clone(),
                job_id: d.job_id.clone(),
                stream: d.stream.clone(),
                reason: d.reason.clone(),
                deliveries: d.deliveries,
                consumer: d.consumer.clone(),
                dead_lettered_at: view::time(d.dead_lettered_at.as_ref()),
            })
            .collect(),
        next: super::next_link("/dead-letters", &answer.next_page_token),
    })
}

pub(crate) async fn replay(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
) -> PageResult {
    let answer = app
        .backends
        .admin()
        .replay_dead_letter(authed(
            ReplayDeadLetterRequest { id: id.clone() },
            &session.tokens.access_token,
        ))
        .await;
    let message = match answer {
        Ok(r) => match r.into_inner().job {
            Some(job) => format!("Dead letter {id} replayed: job {} is queued again.", job.id),
            None => format!("Dead letter {id} replayed."),
        },
        Err(status) => refused(status)?,
    };
    done(&app, &session, "/dead-letters", message)
}
