//! Jobs domain: statuses and their transitions, request validation, retry backoff.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_proto::jobs::v1::{CreateJobRequest, JobStatus};
use keel_shared::backoff::Backoff;
use uuid::Uuid;

use crate::error::JobsError;

pub const MAX_KIND_CHARS: usize = 128;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const MAX_ATTEMPTS_LIMIT: i32 = 100;
/// Priorities run from -100 (last) to 100 (first); 0 is the default.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;
pub const MAX_BATCH: usize = 1000;
/// Longer worker error messages are truncated (rejecting them would strand the job).
pub const MAX_ERROR_BYTES: usize = 16 * 1024;
pub const MAX_WORKER_ID_BYTES: usize = 256;
pub const MAX_DELIVERY_ID_BYTES: usize = 128;
/// A job's schedule timeout: at least a second, at most 30 days.
pub const MIN_SCHEDULE_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_SCHEDULE_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// A job's attempt timeout: at least a second, at most a day.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// ClaimJobs: most kinds one worker names, most jobs one call returns, and
/// longest wait.
pub const MAX_CLAIM_KINDS: usize = 64;
pub const MAX_CLAIM_JOBS: i32 = 1000;
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Where a job is in its life; the text form is what Postgres stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn to_proto(self) -> JobStatus {
        match self {
            JobState::Queued => JobStatus::Queued,
            JobState::Running => JobStatus::Running,
            JobState::Succeeded => JobStatus::Succeeded,
            JobState::Failed => JobStatus::Failed,
            JobState::Cancelled => JobStatus::Cancelled,
        }
    }

    /// A ListJobs status filter: unspecified means any status.
    pub fn filter_from_proto(value: i32) -> Result<Option<Self>, JobsError> {
        match JobStatus::try_from(value) {
            Ok(JobStatus::Unspecified) => Ok(None),
            Ok(JobStatus::Queued) => Ok(Some(JobState::Queued)),
            Ok(JobStatus::Running) => Ok(Some(JobState::Running)),
            Ok(JobStatus::Succeeded) => Ok(Some(JobState::Succeeded)),
            Ok(JobStatus::Failed) => Ok(Some(JobState::Failed)),
            Ok(JobStatus::Cancelled) => Ok(Some(JobState::Cancelled)),
            Err(_) => Err(JobsError::invalid("status", "unknown job status")),
        }
    }
}

/// A validated CreateJob request, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i32,
    pub max_attempts: i32,
    /// None: now (by the database clock).
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// How long it may wait for a worker; None: the server default.
    pub schedule_timeout: Option<Duration>,
    /// How long one attempt may run; None: no limit.
    pub timeout: Option<Duration>,
}

/// Validates one CreateJob request; `prefix` names it inside a batch
/// (`requests[3].`), so errors say which item and field.
pub fn validate_create(
    req: &CreateJobRequest,
    prefix: &str,
    max_payload_bytes: usize,
) -> Result<NewJob, JobsError> {
    let field = |name: &str| format!("{prefix}{name}");
    validate_kind(&req.kind).map_err(|reason| JobsError::invalid(field("kind"), reason))?;
    let payload = match &req.payload {
        Some(s) => json_within(s, max_payload_bytes)
            .map_err(|reason| JobsError::invalid(field("payload"), reason))?,
        None => serde_json::Value::Object(Default::default()),
    };
    if !PRIORITY_RANGE.contains(&req.priority) {
        return Err(JobsError::invalid(
            field("priority"),
            "must be between -100 and 100",
        ));
    }
    let max_attempts = match req.max_attempts {
        0 => DEFAULT_MAX_ATTEMPTS,
        n if (1..=MAX_ATTEMPTS_LIMIT).contains(&n) => n,
        _ => {
            return Err(JobsError::invalid(
                field("max_attempts"),
                "must be between 1 and 100 (0 means the default, 3)",
            ));
        }
    };
    let run_at = match &req.run_at {
        Some(ts) => Some(
            keel_shared::time::from_timestamp(ts)
                .ok_or_else(|| JobsError::invalid(field("run_at"), "not a valid timestamp"))?,
        ),
        None => None,
    };
    let idempotency_key = match req.idempotency_key.as_str() {
        "" => None,
        k if k.contains('\0') => {
            return Err(JobsError::invalid(
                field("idempotency_key"),
                "must not contain NUL characters",
            ));
        }
        k if k.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS => {
            return Err(JobsError::invalid(
                field("idempotency_key"),
                "at most 256 characters",
            ));
        }
        k => Some(k.to_string()),
    };
    let schedule_timeout = req
        .schedule_timeout
        .as_ref()
        .map(|d| {
            duration_within(d, MIN_SCHEDULE_TIMEOUT..=MAX_SCHEDULE_TIMEOUT)
                .map_err(|why| JobsError::invalid(field("schedule_timeout"), why))
        })
        .transpose()?;
    let timeout = req
        .timeout
        .as_ref()
        .map(|d| {
            duration_within(d, MIN_ATTEMPT_TIMEOUT..=MAX_ATTEMPT_TIMEOUT)
                .map_err(|why| JobsError::invalid(field("timeout"), why))
        })
        .transpose()?;
    Ok(NewJob {
        kind: req.kind.clone(),
        payload,
        priority: req.priority,
        max_attempts,
        run_at,
        idempotency_key,
        schedule_timeout,
        timeout,
    })
}

/// A protobuf Duration as a std one, within `range`.
pub fn duration_within(
    d: &prost_types::Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000);
    let secs = u64::try_from(d.seconds).ok();
    let (Some(secs), Some(nanos)) = (secs, nanos) else {
        return Err("must be a non-negative duration".into());
    };
    let value = Duration::new(secs, nanos);
    if !range.contains(&value) {
        return Err(format!(
            "must be between {:?} and {:?}",
            range.start(),
            range.end()
        ));
    }
    Ok(value)
}

/// A validated ClaimJobs request.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub worker_id: String,
    /// Distinct, in the order given.
    pub kinds: Vec<String>,
    pub max_jobs: i32,
    pub wait: Duration,
}

/// worker_id 1..=256 bytes; kinds 1..=64 valid kinds (repeats ignored);
/// max_jobs 1..=1000; wait 0..=30 s (unset: 0).
pub fn validate_claim(req: &keel_proto::jobs::v1::ClaimJobsRequest) -> Result<Claim, JobsError> {
    if req.worker_id.is_empty() || req.worker_id.len() > MAX_WORKER_ID_BYTES {
        return Err(JobsError::invalid("worker_id", "must be 1 to 256 bytes"));
    }
    if req.kinds.is_empty() || req.kinds.len() > MAX_CLAIM_KINDS {
        return Err(JobsError::invalid("kinds", "must name 1 to 64 kinds"));
    }
    let mut kinds: Vec<String> = Vec::with_capacity(req.kinds.len());
    for (i, kind) in req.kinds.iter().enumerate() {
        validate_kind(kind).map_err(|why| JobsError::invalid(format!("kinds[{i}]"), why))?;
        if !kinds.contains(kind) {
            kinds.push(kind.clone());
        }
    }
    if !(1..=MAX_CLAIM_JOBS).contains(&req.max_jobs) {
        return Err(JobsError::invalid("max_jobs", "must be between 1 and 1000"));
    }
    let wait = match &req.wait {
        Some(d) => duration_within(d, Duration::ZERO..=MAX_CLAIM_WAIT)
            .map_err(|why| JobsError::invalid("wait", why))?,
        None => Duration::ZERO,
    };
    Ok(Claim {
        worker_id: req.worker_id.clone(),
        kinds,
        max_jobs: req.max_jobs,
        wait,
    })
}

/// 1..=128 characters of `[a-z0-9._-]`.
pub fn validate_kind(kind: &str) -> Result<(), &'static str> {
    if kind.is_empty() || kind.len() > MAX_KIND_CHARS {
        return Err("must be 1 to 128 characters");
    }
    if !kind
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only a-z, 0-9, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A Struct as JSON, refusing deep nesting, non-finite numbers and more than
/// `max_bytes` of encoded JSON.
pub fn json_within(s: &prost_types::Struct, max_bytes: usize) -> Result<serde_json::Value, String> {
    let json = keel_shared::json::struct_to_json(s).map_err(|e| e.to_string())?;
    let size = serde_json::to_vec(&json)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(format!("larger than {max_bytes} bytes of JSON"));
    }
    Ok(json)
}

/// A batched call holds 1..=MAX_BATCH items, else INVALID_ARGUMENT `requests`.
pub fn validate_batch_len(len: usize) -> Result<(), JobsError> {
    if len == 0 || len > MAX_BATCH {
        return Err(JobsError::invalid("requests", "must hold 1 to 1000 items"));
    }
    Ok(())
}

/// Validates a batch's size, then each item.
pub fn validate_batch(
    reqs: &[CreateJobRequest],
    max_payload_bytes: usize,
) -> Result<Vec<NewJob>, JobsError> {
    validate_batch_len(reqs.len())?;
    reqs.iter()
        .enumerate()
        .map(|(i, r)| validate_create(r, &format!("requests[{i}]."), max_payload_bytes))
        .collect()
}

/// A job id from a request field: a UUID, else INVALID_ARGUMENT naming the field.
pub fn parse_id(id: &str) -> Result<uuid::Uuid, JobsError> {
    uuid::Uuid::parse_str(id).map_err(|_| JobsError::invalid("id", "not a UUID"))
}

/// Worker ids and error texts are only recorded: overly long ones are cut and
/// NULs (which Postgres text cannot hold) replaced, never refused.
pub fn clip(s: &str, max_bytes: usize) -> String {
    if s.contains('\0') {
        return clip(&s.replace('\0', "\u{FFFD}"), max_bytes);
    }
    if s.len() <= max_bytes {
        return s.to_string();
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Delay before retrying after failed attempt `attempt` (1-based): the
/// shared back-off from `base` (`base * 2^(attempt-1)`, capped at `max`, equal
/// jitter), so retries of many jobs that failed together spread out but
/// never come too soon.
pub fn retry_delay(attempt: i32, base: Duration, max: Duration) -> Duration {
    Backoff::new(base, max).delay(attempt.saturating_sub(1).max(0) as u32)
}

/// Why a worker transition did not apply, from the job's actual state.
pub fn start_refusal(status: JobState, run_at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    match status {
        JobState::Queued if run_at > now => format!("job is not due until {}", run_at.to_rfc3339()),
        JobState::Queued => "job changed concurrently, retry".into(),
        JobState::Running => "job is already running".into(),
        other => format!("job already {}", other.as_str()),
    }
}

/// Why RetryJob refused a job in `status` (only failed or cancelled jobs retry).
pub fn retry_refusal(status: JobState) -> String {
    format!(
        "job is {}: only failed or cancelled jobs can be retried",
        status.as_str()
    )
}

/// Why DeleteJob refused a job in `status` (only finished jobs are deleted).
pub fn delete_refusal(status: JobState) -> String {
    format!(
        "job is {}: only finished (succeeded, failed or cancelled) jobs can be deleted",
        status.as_str()
    )
}

/// Why a Heartbeat of running attempt `attempt` is refused once it ran past
/// its deadline: the attempt is over even if the reaper has not recorded it yet.
pub fn timed_out_refusal(attempt: i32) -> String {
    format!("attempt {attempt} ran past the job's timeout: it is over")
}

/// Why a transition of `attempt` (Heartbeat, CompleteJob, FailJob) did not apply.
pub fn attempt_refusal(status: JobState, current_attempt: i32, attempt: i32) -> String {
    match status {
        JobState::Running if current_attempt != attempt => {
            format!("attempt {attempt} is stale: the job is running attempt {current_attempt}")
        }
        JobState::Running => "job changed concurrently, retry".into(),
        JobState::Queued => format!("attempt {attempt} is over: the job is queued again"),
        other => format!("job already {}", other.as_str()),
    }
}

/// The smallest v7 id of the millisecond `at`: every id created earlier
/// sorts below it (Postgres compares uuids bytewise).
pub fn v7_floor(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70; // version 7
    bytes[8] = 0x80; // RFC 4122 variant
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: &str) -> CreateJobRequest {
        CreateJobRequest {
            kind: kind.into(),
            ..Default::default()
        }
    }

    fn field_of(err: JobsError) -> String {
        match err {
            JobsError::Invalid { field, .. } => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn kinds() {
        assert!(validate_kind("echo").is_ok());
        assert!(validate_kind("a.b_c-9").is_ok());
        assert!(validate_kind(&"a".repeat(128)).is_ok());
        assert!(validate_kind(&"a".repeat(129)).is_err());
        assert!(validate_kind("").is_err());
        assert!(validate_kind("Echo").is_err());
        assert!(validate_kind("é").is_err());
        assert!(validate_kind("a b").is_err());
    }

    #[test]
    fn defaults_and_ranges() {
        let job = validate_create(&req("echo"), "", 1024).unwrap();
        assert_eq!(job.max_attempts, 3);
        assert_eq!(job.payload, serde_json::json!({}));
        assert_eq!(job.idempotency_key, None);

        let mut r = req("echo");
        r.max_attempts = 101;
        assert_eq!(
            field_of(validate_create(&r, "", 1024).unwrap_err()),
            "max_attempts"
        );
        r.max_attempts = -1;
        assert!(validate_create(&r, "", 1024).is_err());
        r.max_attempts = 100;
        r.priority = 101;
        assert_eq!(
            field_of(validate_create(&r, "", 1024).unwrap_err()),
            "priority"
        );
        r.priority = -100;
        r.idempotency_key = "k".repeat(257);
        assert_eq!(
            field_of(validate_create(&r, "", 1024).unwrap_err()),
            "idempotency_key"
        );
        r.idempotency_key = "é".repeat(256);
        assert!(validate_create(&r, "", 1024).is_ok());
    }

    #[test]
    fn attempt_timeouts_are_bounded_and_named() {
        let secs = |seconds: i64, nanos: i32| prost_types::Duration { seconds, nanos };
        let mut r = req("echo");
        assert_eq!(validate_create(&r, "", 1024).unwrap().timeout, None);
        r.timeout = Some(secs(1, 0));
        assert_eq!(
            validate_create(&r, "", 1024).unwrap().timeout,
            Some(Duration::from_secs(1))
        );
        r.timeout = Some(secs(24 * 3600, 0));
        assert!(validate_create(&r, "", 1024).is_ok());
        for bad in [
            secs(0, 999_999_999),
            secs(24 * 3600, 1),
            secs(-1, 0),
            secs(0, 0),
        ] {
            r.timeout = Some(bad);
            assert_eq!(
                field_of(validate_create(&r, "", 1024).unwrap_err()),
                "timeout"
            );
        }
        let reqs = vec![req("ok"), r];
        assert_eq!(
            field_of(validate_batch(&reqs, 1024).unwrap_err()),
            "requests[1].timeout"
        );
    }

    #[test]
    fn payload_size_and_depth() {
        let big = keel_shared::json::json_to_struct(&serde_json::json!({"s": "x".repeat(2000)}));
        let mut r = req("echo");
        r.payload = Some(big);
        assert_eq!(
            field_of(validate_create(&r, "", 1024).unwrap_err()),
            "payload"
        );
        assert!(validate_create(&r, "", 4096).is_ok());

        let mut v = serde_json::json!(1);
        for _ in 0..100 {
            v = serde_json::json!({ "a": v });
        }
        r.payload = Some(keel_shared::json::json_to_struct(&v));
        assert_eq!(
            field_of(validate_create(&r, "", usize::MAX).unwrap_err()),
            "payload"
        );
    }

    #[test]
    fn batch_errors_name_the_item() {
        let reqs = vec![req("ok"), req("ok"), req("BAD")];
        assert_eq!(
            field_of(validate_batch(&reqs, 1024).unwrap_err()),
            "requests[2].kind"
        );
        assert_eq!(field_of(validate_batch(&[], 1024).unwrap_err()), "requests");
        let many = vec![req("ok"); 1001];
        assert_eq!(
            field_of(validate_batch(&many, 1024).unwrap_err()),
            "requests"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for _ in 0..50 {
            let d1 = retry_delay(1, base, max);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base);
            let d3 = retry_delay(3, base, max);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d20 = retry_delay(20, base, max);
            assert!(d20 >= max / 2 && d20 <= max);
            assert!(retry_delay(i32::MAX, base, max) <= max);
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(
                JobState::filter_from_proto(s.to_proto() as i32).unwrap(),
                Some(s)
            );
        }
        assert_eq!(JobState::filter_from_proto(0).unwrap(), None);
        assert!(JobState::filter_from_proto(42).is_err());
        assert!(JobState::Cancelled.is_terminal() && !JobState::Running.is_terminal());
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn v7_floor_separates_ids_by_creation_time() {
        let before = Utc::now();
        let id = Uuid::now_v7();
        let after = Utc::now();
        assert!(v7_floor(before - chrono::Duration::milliseconds(1)) < id);
        assert!(id < v7_floor(after + chrono::Duration::milliseconds(2)));
        let floor = v7_floor(before);
        assert_eq!(floor.get_version_num(), 7);
        assert_eq!(floor.get_variant(), uuid::Variant::RFC4122);
        // Byte order is time order, as Postgres compares them.
        assert!(floor.as_bytes() < v7_floor(after + chrono::Duration::days(1)).as_bytes());
    }
}
