//! The one reader of the worker's dead-letter stream
//! (`RedisConfig::dead_letter_stream`): entries read, paged, re-queued and
//! removed. The `keel dead-letters` CLI and the admin API's dead-letter RPCs
//! both use it; the worker writes the entries (field names in
//! [`crate::queue::dead_letter`]).

use chrono::{DateTime, Utc};
use redis::RedisResult;
use redis::aio::ConnectionLike;
use redis::streams::{StreamId, StreamRangeReply};

use crate::config::RedisConfig;
use crate::queue::{FIELD_JOB_ID, FIELD_TRACEPARENT, dead_letter};

/// One dead-letter entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id in the dead-letter stream.
    pub id: String,
    pub job_id: Option<String>,
    /// The stream it came from, when the worker recorded it.
    pub stream: Option<String>,
    pub traceparent: Option<String>,
    pub message_id: Option<String>,
    pub deliveries: Option<u64>,
    pub consumer: Option<String>,
    pub reason: Option<String>,
}

impl Entry {
    fn from_stream(entry: &StreamId) -> Self {
        let text = |field: &str| entry.get::<String>(field).filter(|v| !v.is_empty());
        Self {
            id: entry.id.clone(),
            job_id: text(FIELD_JOB_ID),
            stream: text(dead_letter::FIELD_STREAM),
            traceparent: text(FIELD_TRACEPARENT),
            message_id: text(dead_letter::FIELD_MESSAGE_ID),
            deliveries: entry.get::<u64>(dead_letter::FIELD_DELIVERIES),
            consumer: text(dead_letter::FIELD_CONSUMER),
            reason: text(dead_letter::FIELD_REASON),
        }
    }

    /// When it was dead-lettered: the time part of its stream id.
    pub fn dead_lettered_at(&self) -> Option<DateTime<Utc>> {
        let millis = self.id.split('-').next()?.parse::<i64>().ok()?;
        DateTime::from_timestamp_millis(millis)
    }

    /// The job stream it came from, if that is a stream of this deployment
    /// (`config`'s prefix). Older entries name none: they came from the
    /// single stream of before per-kind streams, which no worker reads.
    pub fn own_stream(&self, config: &RedisConfig) -> Option<&str> {
        let own = format!("{}:", config.redis_prefix);
        self.stream.as_deref().filter(|s| s.starts_with(&own))
    }
}

/// Whether `id` has the shape of a stream entry id (`<millis>-<seq>`).
pub fn is_entry_id(id: &str) -> bool {
    let Some((ms, seq)) = id.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(ms) && digits(seq) && ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok()
}

/// Entries from `start` to `end` (XRANGE syntax, `(` for exclusive), oldest first.
pub async fn range(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    start: &str,
    end: &str,
    count: Option<usize>,
) -> RedisResult<Vec<Entry>> {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(config.dead_letter_stream()).arg(start).arg(end);
    if let Some(count) = count {
        cmd.arg("COUNT").arg(count);
    }
    let reply: StreamRangeReply = cmd.query_async(conn).await?;
    Ok(reply.ids.iter().map(Entry::from_stream).collect())
}

/// Up to `count` entries older than `before` (None: from the newest),
/// newest first.
pub async fn newest(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    before: Option<&str>,
    count: usize,
) -> RedisResult<Vec<Entry>> {
    let end = before.map_or_else(|| "+".to_string(), |id| format!("({id}"));
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(config.dead_letter_stream())
        .arg(end)
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(reply.ids.iter().map(Entry::from_stream).collect())
}

/// The entry `id`, if present.
pub async fn get(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    id: &str,
) -> RedisResult<Option<Entry>> {
    Ok(range(conn, config, id, id, Some(1))
        .await?
        .into_iter()
        .next())
}

/// Adds the entry's job id (and trace context) to `stream` again; returns
/// the new entry's id.
pub async fn requeue(
    conn: &mut impl ConnectionLike,
    stream: &str,
    job_id: &str,
    entry: &Entry,
) -> RedisResult<String> {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(stream).arg("*").arg(FIELD_JOB_ID).arg(job_id);
    if let Some(traceparent) = &entry.traceparent {
        xadd.arg(FIELD_TRACEPARENT).arg(traceparent);
    }
    xadd.query_async(conn).await
}

/// Removes the entry `id`; false when it was not there.
pub async fn remove(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    id: &str,
) -> RedisResult<bool> {
    let removed: u64 = redis::cmd("XDEL")
        .arg(config.dead_letter_stream())
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(removed > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids() {
        assert!(is_entry_id("1700000000000-0"));
        assert!(is_entry_id("0-1"));
        assert!(!is_entry_id(""));
        assert!(!is_entry_id("1700000000000"));
        assert!(!is_entry_id("-"));
        assert!(!is_entry_id("+"));
        assert!(!is_entry_id("(1-0"));
        assert!(!is_entry_id("1-0 2-0"));
        assert!(!is_entry_id("99999999999999999999999-0"));
    }
}
