//! `keel dead-letters`: the worker's dead-letter stream, read and replayed
//! through Redis directly (the admin path: REDIS_URL and KEEL_REDIS_PREFIX,
//! as the services use them). Reading, re-queueing and removing entries is
//! `keel_shared::dead_letters`, the reader the admin API uses too; this
//! module presents them.

use anyhow::{Context, Result};
use keel_shared::config::RedisConfig;
use keel_shared::dead_letters::{self as shared, Entry};
use redis::aio::ConnectionLike;
use serde_json::{Value, json};

use crate::output::Table;

/// How many entries one XRANGE reads while replaying them all.
const BATCH: usize = 100;

/// How an entry is shown by `--json`.
pub(crate) trait EntryJson {
    fn to_json(&self) -> Value;
}

impl EntryJson for Entry {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "job_id": self.job_id,
            "stream": self.stream,
            "message_id": self.message_id,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "reason": self.reason,
            "traceparent": self.traceparent,
            "dead_lettered_at": self.dead_lettered_at().map(|t| t.to_rfc3339()),
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
            e.dead_lettered_at().map_or_else(
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

/// The oldest `limit` entries (all when `limit` is 0).
pub(crate) async fn list(
    conn: &mut impl ConnectionLike,
    config: &RedisConfig,
    limit: usize,
) -> Result<Vec<Entry>> {
    let count = (limit > 0).then_some(limit);
    shared::range(conn, config, "-", "+", count)
        .await
        .context("XRANGE")
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
    let mut results = Vec::new();
    match ids {
        Some(ids) => {
            for id in ids {
                let found = shared::get(conn, config, id)
                    .await
                    .with_context(|| format!("entry {id}"))?;
                match found {
                    Some(entry) => results.push(replay_one(conn, config, entry).await?),
                    None => results.push(Replay::NotFound { entry: id.clone() }),
                }
            }
        }
        None => {
            // Only what is there now: an entry replayed and dead-lettered
            // again meanwhile gets a newer id and waits for the next run.
            let last = shared::newest(conn, config, None, 1)
                .await
                .context("XREVRANGE")?;
            let Some(last) = last.first().map(|e| e.id.clone()) else {
                return Ok(results);
            };
            let mut start = "-".to_string();
            loop {
                let batch = shared::range(conn, config, &start, &last, Some(BATCH))
                    .await
                    .context("XRANGE")?;
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
    let Some(stream) = entry.own_stream(config).map(str::to_string) else {
        return Ok(Replay::Skipped {
            entry: entry.id,
            reason: "no job stream of this deployment recorded".into(),
        });
    };
    let new_id = shared::requeue(conn, &stream, &job_id, &entry)
        .await
        .with_context(|| format!("XADD {stream}"))?;
    shared::remove(conn, config, &entry.id)
        .await
        .context("XDEL")?;
    Ok(Replay::Replayed {
        entry: entry.id,
        job_id,
        stream,
        new_id,
    })
}
