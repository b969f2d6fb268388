//! `keel dead-letters`: the worker's dead-letter stream, read and replayed
//! through Redis directly (the admin path: REDIS_URL and KEEL_REDIS_PREFIX,
//! as the services use them). Key names and entry fields come from
//! `keel_shared::queue`, where the worker gets them too.

use anyhow::{Context, Result};
use keel_shared::config::RedisConfig;
use keel_shared::queue::{FIELD_JOB_ID, FIELD_TRACEPARENT, dead_letter};
use redis::aio::ConnectionLike;
use redis::streams::{StreamId, StreamRangeReply};
use serde_json::{Value, json};

use crate::output::Table;

/// How many entries one XRANGE reads while replaying them all.
const BATCH: usize = 100;

/// One dead-letter entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
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
    fn when(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let millis = self.id.split('-').next()?.parse::<i64>().ok()?;
        chrono::DateTime::from_timestamp_millis(millis)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "job_id": self.job_id,
            "stream": self.stream,
            "message_id": self.message_id,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "reason": self.reason,
            "traceparent": self.traceparent,
            "dead_lettered_at": self.when().map(|t| t.to_rfc3339()),
        })
    }
}

pub(crate) fn table(entries: &[Entry]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut table = Table::new(&["ID", "JOB", "DELIVERIES", "CONSUMER", "REASON", "WHEN"]);
    for e in entries {
        table.row(vec![
            e.id.clone(),
            dash(&e.job_id),
            e.deliveries.map_or_else(|| "-".into(), |d| d.to_string()),
            dash(&e.consumer),
            dash(&e.reason),
            e.when().map_or_else(
                || "-".into(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        ]);
    }
    table.render()
}

/// A connection to the Redis in `config`.
pub(crate) async fn connect(config: &RedisConfig) -> Result<keel_shared::redis::Connection> {
    let pool = keel_shared::redis::pool(config)?;
    // The URL may hold a password: name the variable, not its value.
    pool.get()
        .await
        .context("cannot reach Redis (REDIS_URL / --redis-url)")
}

async fn range(
    conn: &mut impl ConnectionLike,
    key: &str,
    start: &str,
    end: &str,
    count: Option<usize>,
) -> Result<Vec<Entry>> {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(start).arg(end);
    if let Some(count) = count {
        cmd.arg("COUNT").arg(count);
    }
    let reply: StreamRangeReply = cmd.query_async(conn).await.context("XRANGE")?;
    Ok(reply.ids.iter().map(Entry::from_stream).collect())
}

/// The oldest `limit` entries (all when `limit` is 0).
pub(crate) async fn list(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    limit: usize,
) -> Result<Vec<Entry>> {
    let count = (limit > 0).then_some(limit);
    range(conn, &config.dead_letter_stream(), "-", "+", count).await
}

/// What became of one entry named for replay.
#[derive(Debug, Clone)]
pub(crate) enum Replay {
    /// Its job id was added to `stream` as entry `new_id`, and the entry removed.
    Replayed {
        entry: String,
        job_id: String,
        stream: String,
        new_id: String,
    },
    /// An entry without a job id (a malformed message): left in place.
    Skipped {
        entry: String,
        reason: String,
    },
    NotFound {
        entry: String,
    },
}

impl Replay {
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Replay::Replayed {
                entry,
                job_id,
                stream,
                new_id,
            } => {
                json!({"id": entry, "result": "replayed", "job_id": job_id, "stream": stream, "new_id": new_id})
            }
            Replay::Skipped { entry, reason } => {
                json!({"id": entry, "result": "skipped", "reason": reason})
            }
            Replay::NotFound { entry } => json!({"id": entry, "result": "not_found"}),
        }
    }
}

pub(crate) fn replay_table(results: &[Replay]) -> String {
    let mut table = Table::new(&["ID", "JOB", "RESULT"]);
    for r in results {
        table.row(match r {
            Replay::Replayed {
                entry,
                job_id,
                stream,
                new_id,
            } => vec![
                entry.clone(),
                job_id.clone(),
                format!("replayed to {stream} as {new_id}"),
            ],
            Replay::Skipped { entry, reason } => {
                vec![entry.clone(), "-".into(), format!("skipped: {reason}")]
            }
            Replay::NotFound { entry } => vec![entry.clone(), "-".into(), "not found".into()],
        });
    }
    table.render()
}

/// Replays the entries `ids`, or every entry present now when `ids` is None.
pub(crate) async fn replay(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    ids: Option<&[String]>,
) -> Result<Vec<Replay>> {
    let dead = config.dead_letter_stream();
    let mut results = Vec::new();
    match ids {
        Some(ids) => {
            for id in ids {
                let found = range(conn, &dead, id, id, Some(1))
                    .await
                    .with_context(|| format!("entry {id}"))?;
                match found.into_iter().next() {
                    Some(entry) => results.push(replay_one(conn, config, entry).await?),
                    None => results.push(Replay::NotFound { entry: id.clone() }),
                }
            }
        }
        None => {
            // Only what is there now: an entry replayed and dead-lettered
            // again meanwhile gets a newer id and waits for the next run.
            let last: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(&dead)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await
                .context("XREVRANGE")?;
            let Some(last) = last.ids.first().map(|e| e.id.clone()) else {
                return Ok(results);
            };
            let mut start = "-".to_string();
            loop {
                let batch = range(conn, &dead, &start, &last, Some(BATCH)).await?;
                let Some(newest) = batch.last().map(|e| e.id.clone()) else {
                    break;
                };
                for entry in batch {
                    results.push(replay_one(conn, config, entry).await?);
                }
                if newest == last {
                    break;
                }
                start = format!("({newest}");
            }
        }
    }
    Ok(results)
}

/// Adds the entry's job id (and trace context) to the stream it came from,
/// then deletes the entry: in that order, so that a failure in between
/// delivers the job twice (which StartJob refuses) rather than never.
async fn replay_one(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    entry: Entry,
) -> Result<Replay> {
    let Some(job_id) = entry.job_id.clone() else {
        return Ok(Replay::Skipped {
            entry: entry.id,
            reason: "no job id".into(),
        });
    };
    // Only a stream of this deployment. Older entries name none: they came
    // from the single stream of before per-kind streams, which no worker
    // reads any more (create such a job again).
    let own = format!("{}:", config.redis_prefix);
    let Some(stream) = entry.stream.clone().filter(|s| s.starts_with(&own)) else {
        return Ok(Replay::Skipped {
            entry: entry.id,
            reason: "no job stream of this deployment recorded".into(),
        });
    };
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&stream).arg("*").arg(FIELD_JOB_ID).arg(&job_id);
    if let Some(traceparent) = &entry.traceparent {
        xadd.arg(FIELD_TRACEPARENT).arg(traceparent);
    }
    let new_id: String = xadd
        .query_async(conn)
        .await
        .with_context(|| format!("XADD {stream}"))?;
    let _: u64 = redis::cmd("XDEL")
        .arg(config.dead_letter_stream())
        .arg(&entry.id)
        .query_async(conn)
        .await
        .context("XDEL")?;
    Ok(Replay::Replayed {
        entry: entry.id,
        job_id,
        stream,
        new_id,
    })
}
