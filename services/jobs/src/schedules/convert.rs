//! Schedules between their stored and their wire form.

use keel_proto::jobs::v1::Schedule;
use keel_shared::json::json_to_struct;
use keel_shared::time::{opt_timestamp, to_timestamp};

use super::store::ScheduleRow;

pub(crate) fn schedule_to_proto(s: &ScheduleRow) -> Schedule {
    Schedule {
        id: s.id.to_string(),
        user_id: s.user_id.to_string(),
        name: s.name.clone(),
        cron: s.cron.clone(),
        timezone: s.timezone.clone(),
        kind: s.kind.clone(),
        payload: Some(json_to_struct(&s.payload)),
        priority: s.priority,
        max_attempts: s.max_attempts,
        paused: s.paused,
        next_run_at: (!s.paused).then(|| to_timestamp(s.next_run_at)),
        last_run_at: opt_timestamp(s.last_run_at),
        last_job_id: s.last_job_id.map(|id| id.to_string()).unwrap_or_default(),
        created_at: Some(to_timestamp(s.created_at)),
        updated_at: Some(to_timestamp(s.updated_at)),
    }
}
