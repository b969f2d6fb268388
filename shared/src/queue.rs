//! The Redis names the jobs service and the worker agree on.
//!
//! Work is routed by kind: each kind has a stream of its own, read only by
//! workers that serve that kind. Workers that read streams announce their
//! kinds in a sorted set (kind -> when last seen, in ms); the jobs service
//! publishes a job to its kind's stream only while a worker announced that
//! kind within [`SERVED_KIND_TTL`], and otherwise leaves it to ClaimJobs
//! callers (or to a stream worker that announces the kind later).

use std::time::Duration;

use crate::config::RedisConfig;

/// Consumer group the workers read the job streams with.
pub const CONSUMER_GROUP: &str = "workers";
/// Stream entry field holding the job id (the worker fetches the rest with StartJob).
pub const FIELD_JOB_ID: &str = "job_id";
/// Stream entry field holding the W3C trace context the job was created in
/// (absent when tracing was off).
pub const FIELD_TRACEPARENT: &str = "traceparent";
/// A kind counts as served by stream workers this long after a worker last
/// announced it. Workers announce their kinds far more often than that.
pub const SERVED_KIND_TTL: Duration = Duration::from_secs(60);
/// How often a stream worker announces its kinds.
pub const ANNOUNCE_KINDS_EVERY: Duration = Duration::from_secs(10);

/// Fields of a dead-letter entry besides [`FIELD_JOB_ID`] (empty when the
/// message had none) and [`FIELD_TRACEPARENT`] (when the message had one).
pub mod dead_letter {
    /// The stream key the message was read from (entries written before this
    /// field existed lack it: they came from the jobs stream).
    pub const FIELD_STREAM: &str = "stream";
    /// The message's entry id in that stream.
    pub const FIELD_MESSAGE_ID: &str = "message_id";
    /// How many times it was delivered.
    pub const FIELD_DELIVERIES: &str = "deliveries";
    /// The consumer (worker) that dead-lettered it.
    pub const FIELD_CONSUMER: &str = "consumer";
    /// Why it was dead-lettered.
    pub const FIELD_REASON: &str = "reason";
}

/// Which of its kind's streams a job goes to, by priority: a worker reads a
/// kind's high stream before its normal one, and that before its low one,
/// so priority takes effect behind a backlog (within a band, entries run in
/// publication order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// Priority above 0.
    High,
    /// Priority 0 (the default).
    Normal,
    /// Priority below 0.
    Low,
}

impl Band {
    /// In the order workers read them.
    pub const ALL: [Band; 3] = [Band::High, Band::Normal, Band::Low];

    pub fn of(priority: i32) -> Self {
        match priority {
            p if p > 0 => Band::High,
            0 => Band::Normal,
            _ => Band::Low,
        }
    }
}

impl RedisConfig {
    /// The stream of ready jobs of one kind with the default priority:
    /// `<prefix>:jobs:stream:{<kind>}`. The braces make the kind a Redis
    /// Cluster hash tag, so each kind's streams live in one slot and kinds
    /// spread over the masters.
    pub fn jobs_stream(&self, kind: &str) -> String {
        self.key(&format!("jobs:stream:{{{kind}}}"))
    }

    /// The stream of ready jobs of one kind and priority band: the normal
    /// one, or it with `:high` / `:low` appended.
    pub fn jobs_band_stream(&self, kind: &str, band: Band) -> String {
        let stream = self.jobs_stream(kind);
        match band {
            Band::High => format!("{stream}:high"),
            Band::Normal => stream,
            Band::Low => format!("{stream}:low"),
        }
    }

    /// The kinds stream workers serve: a sorted set, kind -> last seen (ms).
    pub fn served_kinds(&self) -> String {
        self.key("jobs:kinds")
    }

    /// Where messages delivered too many times are moved.
    pub fn dead_letter_stream(&self) -> String {
        self.key("jobs:dead")
    }

    /// Pub/sub channel announcing every transition of one job.
    pub fn job_updates_channel(&self, job_id: &uuid::Uuid) -> String {
        self.key(&format!("jobs:updates:{job_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_hash_tagged_stream() {
        let config = RedisConfig::new("redis://127.0.0.1:6379", "keel");
        assert_eq!(config.jobs_stream("echo"), "keel:jobs:stream:{echo}");
        assert_eq!(config.served_kinds(), "keel:jobs:kinds");
        assert_eq!(
            config.jobs_band_stream("echo", Band::of(5)),
            "keel:jobs:stream:{echo}:high"
        );
        assert_eq!(
            config.jobs_band_stream("echo", Band::of(0)),
            "keel:jobs:stream:{echo}"
        );
        assert_eq!(
            config.jobs_band_stream("echo", Band::of(-1)),
            "keel:jobs:stream:{echo}:low"
        );
    }
}
