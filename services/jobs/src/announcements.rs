//! What jobs announce on their Redis channel when their state changes: the
//! job's version (8 bytes, big-endian) then the job as an encoded
//! `keel.jobs.v1.Job`, so a watcher can drop stale snapshots.

use prost::Message;

use crate::convert::job_to_proto;
use crate::store::JobRow;

/// The announcement of `job`'s current state.
pub(crate) fn encode(job: &JobRow) -> Vec<u8> {
    let proto = job_to_proto(job);
    let mut out = Vec::with_capacity(8 + proto.encoded_len());
    out.extend_from_slice(&job.version.to_be_bytes());
    proto
        .encode(&mut out)
        .expect("a Vec grows as needed, encoding cannot fail");
    out
}

/// The version and job of an announcement; None when it is not one.
pub(crate) fn decode(bytes: &[u8]) -> Option<(i64, keel_proto::jobs::v1::Job)> {
    let (version, rest) = bytes.split_first_chunk::<8>()?;
    let job = keel_proto::jobs::v1::Job::decode(rest).ok()?;
    Some((i64::from_be_bytes(*version), job))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::JobState;

    #[test]
    fn announcements_round_trip_with_their_version() {
        let now = Utc::now();
        let job = JobRow {
            id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            kind: "echo".into(),
            payload: serde_json::json!({"n": 1}),
            status: JobState::Running,
            priority: 3,
            attempt: 2,
            max_attempts: 3,
            output: None,
            error: String::new(),
            run_at: now,
            created_at: now,
            updated_at: now,
            started_at: Some(now),
            finished_at: None,
            cancel_requested: true,
            lease_expires_at: Some(now),
            worker_id: Some("w".into()),
            version: 7,
            progress: Some(serde_json::json!({"done": 3})),
            attempt_deadline: None,
            attempt_timeout: Some(Duration::from_millis(1500)),
            schedule_id: Some(Uuid::now_v7()),
        };
        let (version, proto) = decode(&encode(&job)).unwrap();
        assert_eq!(version, 7);
        assert_eq!(proto, job_to_proto(&job));
        assert!(decode(b"short").is_none());
    }
}
