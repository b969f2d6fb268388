//! Jobs and their history as the API shows them: rows of the store turned
//! into `keel.jobs.v1` messages (one place for every handler, announcement
//! and watcher).

use keel_proto::jobs::v1::{Job, JobEvent};
use keel_shared::json::json_to_struct;
use keel_shared::time::{opt_timestamp, to_timestamp};

use crate::store::{EventRow, JobRow};

pub(crate) fn job_to_proto(j: &JobRow) -> Job {
    Job {
        id: j.id.to_string(),
        user_id: j.user_id.to_string(),
        kind: j.kind.clone(),
        payload: Some(json_to_struct(&j.payload)),
        status: j.status.to_proto() as i32,
        priority: j.priority,
        attempt: j.attempt,
        max_attempts: j.max_attempts,
        output: j.output.as_ref().map(json_to_struct),
        error: j.error.clone(),
        run_at: Some(to_timestamp(j.run_at)),
        created_at: Some(to_timestamp(j.created_at)),
        updated_at: Some(to_timestamp(j.updated_at)),
        started_at: opt_timestamp(j.started_at),
        finished_at: opt_timestamp(j.finished_at),
        cancel_requested: j.cancel_requested,
        progress: j.progress.as_ref().map(json_to_struct),
        timeout: j.attempt_timeout.map(|t| prost_types::Duration {
            seconds: t.as_secs() as i64,
            nanos: t.subsec_nanos() as i32,
        }),
        schedule_id: j.schedule_id.map(|id| id.to_string()).unwrap_or_default(),
    }
}

pub(crate) fn event_to_proto(e: &EventRow) -> JobEvent {
    JobEvent {
        event: e.event.clone(),
        status: e.status.to_proto() as i32,
        attempt: e.attempt,
        worker_id: e.worker_id.clone().unwrap_or_default(),
        error: e.error.clone().unwrap_or_default(),
        at: Some(to_timestamp(e.at)),
    }
}
