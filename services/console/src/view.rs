//! Proto values as the pages show them: times, durations, JSON, statuses.

use chrono::{DateTime, Utc};
use keel_proto::jobs::v1::JobStatus;
use prost_types::{Duration, Struct, Timestamp};

use crate::session::Session;

/// What the layout needs: who is signed in, the CSRF token for its forms,
/// a one-time message, and which section is open.
pub(crate) struct Nav {
    pub(crate) email: String,
    pub(crate) csrf: String,
    pub(crate) flash: Option<String>,
    pub(crate) active: &'static str,
}

impl Nav {
    pub(crate) fn anonymous() -> Self {
        Self {
            email: String::new(),
            csrf: String::new(),
            flash: None,
            active: "",
        }
    }

    pub(crate) fn new(app: &crate::App, session: &Session, active: &'static str) -> Self {
        Self {
            email: session.email.clone(),
            csrf: session.csrf.clone(),
            flash: app.sessions.take_flash(&session.id),
            active,
        }
    }

    pub(crate) fn signed_in(&self) -> bool {
        !self.email.is_empty()
    }
}

pub(crate) fn time(t: Option<&Timestamp>) -> String {
    t.and_then(to_chrono)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

pub(crate) fn to_chrono(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}

/// `1h 02m`, `3m 05s`, `12s`, `350ms`.
pub(crate) fn duration(d: Option<&Duration>) -> String {
    let Some(d) = d else {
        return String::new();
    };
    let secs = d.seconds.max(0);
    match secs {
        0 => format!("{}ms", d.nanos.max(0) / 1_000_000),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Pretty JSON of a Struct; empty when unset.
pub(crate) fn json(s: Option<&Struct>) -> String {
    s.and_then(|s| keel_shared::json::struct_to_json(s).ok())
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_default()
}

/// One-line JSON of a Struct; empty when unset or empty.
pub(crate) fn json_compact(s: Option<&Struct>) -> String {
    s.filter(|s| !s.fields.is_empty())
        .and_then(|s| keel_shared::json::struct_to_json(s).ok())
        .map(|v| v.to_string())
        .unwrap_or_default()
}

pub(crate) fn status(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Unspecified => "unknown",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

pub(crate) fn parse_status(s: &str) -> Option<JobStatus> {
    Some(match s {
        "queued" => JobStatus::Queued,
        "running" => JobStatus::Running,
        "succeeded" => JobStatus::Succeeded,
        "failed" => JobStatus::Failed,
        "cancelled" => JobStatus::Cancelled,
        _ => return None,
    })
}

pub(crate) const STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        let d = |seconds, nanos| Some(Duration { seconds, nanos });
        assert_eq!(duration(d(0, 350_000_000).as_ref()), "350ms");
        assert_eq!(duration(d(12, 0).as_ref()), "12s");
        assert_eq!(duration(d(185, 0).as_ref()), "3m 05s");
        assert_eq!(duration(d(3720, 0).as_ref()), "1h 02m");
        assert_eq!(duration(None), "");
    }

    #[test]
    fn statuses_round_trip() {
        for s in STATUSES {
            assert_eq!(status(parse_status(s).unwrap()), s);
        }
        assert_eq!(parse_status("nope"), None);
    }
}
