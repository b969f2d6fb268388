//! Schedule requests validated: name, cron and time zone (with the minimum
//! interval), and the job fields checked by CreateJob's own rules.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_proto::jobs::v1::{CreateJobRequest, CreateScheduleRequest, UpdateScheduleRequest};
use keel_shared::ApiError;

use super::cron::{Rule, RuleError};

pub(crate) const MAX_NAME_CHARS: usize = 128;

/// The limits a schedule is validated against (from `Config`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most schedules one user may have.
    pub per_user: i64,
    /// Shortest gap allowed between two ticks of a schedule.
    pub min_interval: Duration,
    /// Largest payload, as for CreateJob.
    pub max_payload_bytes: usize,
}

/// A schedule's fields, validated: what is stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fields {
    pub name: String,
    pub cron: String,
    /// As given ("" stored as "UTC").
    pub timezone: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub paused: bool,
}

pub(crate) fn validate_create(
    req: &CreateScheduleRequest,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<(Fields, Rule), ApiError> {
    validate_name(&req.name)?;
    let rule = validate_rule(&req.cron, &req.timezone, limits, now)?;
    let job = validate_job(
        CreateJobRequest {
            kind: req.kind.clone(),
            payload: req.payload.clone(),
            priority: req.priority,
            max_attempts: req.max_attempts,
            ..Default::default()
        },
        limits,
    )?;
    Ok((
        Fields {
            name: req.name.clone(),
            cron: req.cron.clone(),
            timezone: timezone_or_utc(&req.timezone),
            kind: job.kind,
            payload: job.payload,
            priority: job.priority,
            max_attempts: job.max_attempts,
            paused: req.paused,
        },
        rule,
    ))
}

/// `current` with the request's set fields applied, validated as a whole.
/// Returns the new fields, their rule, and whether the fire times must be
/// computed again from now (cron or time zone changed, or resumed).
pub(crate) fn validate_update(
    req: &UpdateScheduleRequest,
    current: &Fields,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<(Fields, Rule, bool), ApiError> {
    let mut next = current.clone();
    if let Some(name) = &req.name {
        validate_name(name)?;
        next.name = name.clone();
    }
    if let Some(cron) = &req.cron {
        next.cron = cron.clone();
    }
    if let Some(tz) = &req.timezone {
        next.timezone = timezone_or_utc(tz);
    }
    let rule_changed = next.cron != current.cron || next.timezone != current.timezone;
    let rule = if rule_changed {
        validate_rule(&next.cron, &next.timezone, limits, now)?
    } else {
        Rule::parse(&next.cron, &next.timezone)
            .map_err(|e| ApiError::Internal(format!("stored schedule rule: {e:?}")))?
    };
    if req.kind.is_some()
        || req.payload.is_some()
        || req.priority.is_some()
        || req.max_attempts.is_some()
    {
        let job = validate_job(
            CreateJobRequest {
                kind: req.kind.clone().unwrap_or_else(|| next.kind.clone()),
                payload: Some(match &req.payload {
                    Some(p) => p.clone(),
                    None => keel_shared::json::json_to_struct(&next.payload),
                }),
                priority: req.priority.unwrap_or(next.priority),
                max_attempts: req.max_attempts.unwrap_or(next.max_attempts),
                ..Default::default()
            },
            limits,
        )?;
        next.kind = job.kind;
        next.payload = job.payload;
        next.priority = job.priority;
        next.max_attempts = job.max_attempts;
    }
    if let Some(paused) = req.paused {
        next.paused = paused;
    }
    let resumed = current.paused && !next.paused;
    Ok((next, rule, rule_changed || resumed))
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ApiError::invalid("name", "must be 1 to 128 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn validate_rule(
    cron: &str,
    timezone: &str,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<Rule, ApiError> {
    let rule = Rule::parse(cron, timezone).map_err(|e| match e {
        RuleError::Cron(why) => ApiError::invalid("cron", why),
        RuleError::Timezone(why) => ApiError::invalid("timezone", why),
    })?;
    if let Some(gap) = rule.shortest_interval(now)
        && gap < limits.min_interval
    {
        return Err(ApiError::invalid(
            "cron",
            format!(
                "fires every {}s at times; the minimum interval between ticks is {}s",
                gap.as_secs(),
                limits.min_interval.as_secs()
            ),
        ));
    }
    Ok(rule)
}

/// The job fields, by CreateJob's own validation (same field names).
fn validate_job(req: CreateJobRequest, limits: &Limits) -> Result<crate::domain::NewJob, ApiError> {
    Ok(crate::domain::validate_create(
        &req,
        "",
        limits.max_payload_bytes,
    )?)
}

fn timezone_or_utc(tz: &str) -> String {
    if tz.is_empty() {
        "UTC".into()
    } else {
        tz.into()
    }
}

/// A schedule id from a request.
pub(crate) fn parse_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| ApiError::invalid("id", "not a UUID"))
}
