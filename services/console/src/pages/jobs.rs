//! Jobs of every user: the filtered list, a job's detail with its attempt
//! history, and the cancel/retry/delete actions (each behind a confirmation
//! page, so no script is needed).

use askama::Template;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, NaiveDateTime, Utc};
use keel_proto::admin::v1::{
    CancelJobRequest, DeleteJobRequest, GetJobRequest, ListJobsRequest, RetryJobRequest,
};
use keel_proto::jobs::v1::{Job, JobEvent};
use serde::{Deserialize, Serialize};

use super::{done, query_string, refused, render};
use crate::App;
use crate::backend::authed;
use crate::error::{PageError, PageResult};
use crate::session::Session;
use crate::view::{self, Nav, STATUSES};

/// A job in a table.
pub(crate) struct JobRow {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) kind: String,
    pub(crate) status: &'static str,
    pub(crate) attempt: String,
    pub(crate) created_at: String,
    pub(crate) error: String,
}

impl From<&Job> for JobRow {
    fn from(j: &Job) -> Self {
        Self {
            id: j.id.clone(),
            user_id: j.user_id.clone(),
            kind: j.kind.clone(),
            status: view::status(j.status()),
            attempt: format!("{}/{}", j.attempt, j.max_attempts),
            created_at: view::time(j.created_at.as_ref()),
            error: j.error.clone(),
        }
    }
}

/// The list's filters, as the form sends them and the links repeat them.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub(crate) struct Filters {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    status: String,
    /// `YYYY-MM-DDTHH:MM[:SS]` (UTC, as a datetime-local input sends it) or RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    after: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    before: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    page: String,
}

impl Filters {
    fn request(&self) -> Result<ListJobsRequest, PageError> {
        let status = match self.status.as_str() {
            "" => 0,
            s => view::parse_status(s)
                .ok_or_else(|| PageError::BadInput(format!("status: unknown status {s:?}")))?
                as i32,
        };
        Ok(ListJobsRequest {
            page_size: 50,
            page_token: self.page.clone(),
            status,
            kind: self.kind.trim().to_string(),
            user_id: self.user.trim().to_string(),
            created_after: parse_time("after", &self.after)?,
            created_before: parse_time("before", &self.before)?,
        })
    }
}

fn parse_time(field: &str, value: &str) -> Result<Option<prost_types::Timestamp>, PageError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let parsed = DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S")
                .or_else(|_| NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M"))
                .map(|t| t.and_utc())
        })
        .map_err(|_| {
            PageError::BadInput(format!(
                "{field}: not a date-time (YYYY-MM-DDTHH:MM, UTC): {value:?}"
            ))
        })?;
    Ok(Some(prost_types::Timestamp {
        seconds: parsed.timestamp(),
        nanos: parsed.timestamp_subsec_nanos() as i32,
    }))
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    nav: Nav,
    filters: Filters,
    statuses: [&'static str; 5],
    jobs: Vec<JobRow>,
    next: Option<String>,
}

pub(crate) async fn list(
    State(app): State<App>,
    session: Session,
    Query(filters): Query<Filters>,
) -> PageResult {
    let request = filters.request()?;
    let answer = app
        .backends
        .admin()
        .list_jobs(authed(request, &session.tokens.access_token))
        .await?
        .into_inner();
    let next = (!answer.next_page_token.is_empty()).then(|| {
        query_string(&Filters {
            page: answer.next_page_token.clone(),
            ..filters.clone()
        })
    });
    render(&JobsPage {
        nav: Nav::new(&app, &session, "jobs"),
        filters,
        statuses: STATUSES,
        jobs: answer.jobs.iter().map(JobRow::from).collect(),
        next: next.map(|q| format!("/jobs{q}")),
    })
}

struct EventRow {
    at: String,
    event: String,
    status: &'static str,
    attempt: i32,
    worker_id: String,
    error: String,
}

impl From<&JobEvent> for EventRow {
    fn from(e: &JobEvent) -> Self {
        Self {
            at: view::time(e.at.as_ref()),
            event: e.event.clone(),
            status: view::status(e.status()),
            attempt: e.attempt,
            worker_id: e.worker_id.clone(),
            error: e.error.clone(),
        }
    }
}

struct JobView {
    row: JobRow,
    priority: i32,
    payload: String,
    output: String,
    progress: String,
    run_at: String,
    started_at: String,
    finished_at: String,
    updated_at: String,
    cancel_requested: bool,
    schedule_id: String,
    can_cancel: bool,
    can_retry: bool,
    can_delete: bool,
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    nav: Nav,
    job: JobView,
    events: Vec<EventRow>,
}

async fn get_job(app: &App, session: &Session, id: &str) -> PageResult<(Job, Vec<JobEvent>)> {
    let answer = app
        .backends
        .admin()
        .get_job(authed(
            GetJobRequest { id: id.to_string() },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    let job = answer
        .job
        .ok_or_else(|| PageError::NotFound("no such job".into()))?;
    Ok((job, answer.events))
}

pub(crate) async fn detail(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
) -> PageResult {
    let (job, events) = get_job(&app, &session, &id).await?;
    use keel_proto::jobs::v1::JobStatus as S;
    let status = job.status();
    let view = JobView {
        row: JobRow::from(&job),
        priority: job.priority,
        payload: view::json(job.payload.as_ref()),
        output: view::json(job.output.as_ref()),
        progress: view::json(job.progress.as_ref()),
        run_at: view::time(job.run_at.as_ref()),
        started_at: view::time(job.started_at.as_ref()),
        finished_at: view::time(job.finished_at.as_ref()),
        updated_at: view::time(job.updated_at.as_ref()),
        cancel_requested: job.cancel_requested,
        schedule_id: job.schedule_id.clone(),
        can_cancel: matches!(status, S::Queued | S::Running) && !job.cancel_requested,
        can_retry: matches!(status, S::Failed | S::Cancelled),
        can_delete: status != S::Running,
    };
    render(&JobPage {
        nav: Nav::new(&app, &session, "jobs"),
        job: view,
        events: events.iter().map(EventRow::from).collect(),
    })
}

#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Retry,
    Delete,
}

impl Action {
    fn parse(s: &str) -> Result<Self, PageError> {
        Ok(match s {
            "cancel" => Self::Cancel,
            "retry" => Self::Retry,
            "delete" => Self::Delete,
            _ => return Err(PageError::NotFound("No such page.".into())),
        })
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Retry => "retry",
            Self::Delete => "delete",
        }
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    nav: Nav,
    verb: &'static str,
    job: JobRow,
}

/// "Really retry this job?": the form that does it.
pub(crate) async fn confirm(
    State(app): State<App>,
    session: Session,
    Path((id, action)): Path<(String, String)>,
) -> PageResult {
    let action = Action::parse(&action)?;
    let (job, _) = get_job(&app, &session, &id).await?;
    render(&ConfirmPage {
        nav: Nav::new(&app, &session, "jobs"),
        verb: action.verb(),
        job: JobRow::from(&job),
    })
}

pub(crate) async fn act(
    State(app): State<App>,
    session: Session,
    Path((id, action)): Path<(String, String)>,
) -> PageResult {
    let action = Action::parse(&action)?;
    let token = &session.tokens.access_token;
    let admin = || app.backends.admin();
    let answer = match action {
        Action::Cancel => admin()
            .cancel_job(authed(CancelJobRequest { id: id.clone() }, token))
            .await
            .map(|_| "Cancellation requested.".to_string()),
        Action::Retry => admin()
            .retry_job(authed(RetryJobRequest { id: id.clone() }, token))
            .await
            .map(|_| "Queued again for a retry.".to_string()),
        Action::Delete => admin()
            .delete_job(authed(DeleteJobRequest { id: id.clone() }, token))
            .await
            .map(|_| "Deleted.".to_string()),
    };
    let message = match answer {
        Ok(message) => message,
        Err(status) => refused(status)?,
    };
    let deleted = matches!(action, Action::Delete) && message == "Deleted.";
    let to = if deleted {
        "/jobs".to_string()
    } else {
        format!("/jobs/{}", percent_path(&id))
    };
    done(&app, &session, &to, message)
}

/// A path segment, percent-encoded (ids are UUIDs, but the URL came from a user).
pub(crate) fn percent_path(s: &str) -> String {
    // Everything but RFC 3986's unreserved characters.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_name_the_bad_field() {
        let f = Filters {
            after: "yesterday".into(),
            ..Default::default()
        };
        let Err(PageError::BadInput(m)) = f.request() else {
            panic!("accepted")
        };
        assert!(m.starts_with("after:"), "{m}");
        let f = Filters {
            status: "stuck".into(),
            ..Default::default()
        };
        let Err(PageError::BadInput(m)) = f.request() else {
            panic!("accepted")
        };
        assert!(m.starts_with("status:"), "{m}");
    }

    #[test]
    fn times_are_read_as_utc() {
        let t = parse_time("after", "2026-01-02T03:04").unwrap().unwrap();
        assert_eq!(t.seconds, 1_767_323_040);
        let t = parse_time("after", "2026-01-02T03:04:00+01:00")
            .unwrap()
            .unwrap();
        assert_eq!(t.seconds, 1_767_323_040 - 3600);
        assert!(parse_time("after", " ").unwrap().is_none());
    }

    #[test]
    fn paths_are_percent_encoded() {
        assert_eq!(percent_path("a/b c"), "a%2Fb%20c");
        assert_eq!(
            percent_path("0190e0b4-0000-7000-8000-00000000000a"),
            "0190e0b4-0000-7000-8000-00000000000a"
        );
    }
}
