//! The Redis job stream as one consumer sees it: the consumer group, reading
//! (XREADGROUP), taking over from dead consumers (XAUTOCLAIM), keeping our own
//! pending messages fresh, acknowledging, dead-lettering and trimming.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_shared::config::RedisConfig;
use keel_shared::queue::{Band, CONSUMER_GROUP, FIELD_JOB_ID, FIELD_TRACEPARENT, dead_letter};
use keel_shared::redis::{Connection, Pool};
use redis::RedisError;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingCountReply, StreamPendingReply, StreamReadReply,
};

/// In a Redis Cluster, how long one blocking read waits on one kind while
/// the worker serves several (a read cannot span kinds there: their streams
/// live in different slots), so a job of another kind waits at most about
/// this long for the read after.
const CLUSTER_BLOCK_SLICE: Duration = Duration::from_millis(250);

/// One stream entry handed to this consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// The stream it came from (its kind's stream).
    pub stream: String,
    /// The stream entry id.
    pub id: String,
    /// The `job_id` field, when the entry has one.
    pub job_id: Option<String>,
    /// The trace context the job was created in, when tracing was on.
    pub traceparent: Option<String>,
}

impl Message {
    fn from_entry(stream: &str, entry: &StreamId) -> Self {
        Self {
            stream: stream.to_string(),
            id: entry.id.clone(),
            job_id: entry.get::<String>(FIELD_JOB_ID),
            traceparent: entry.get::<String>(FIELD_TRACEPARENT),
        }
    }

    /// What identifies it for XACK and XCLAIM: (stream, entry id).
    pub(crate) fn key(&self) -> MessageKey {
        (self.stream.clone(), self.id.clone())
    }

    /// The job it carries: its `job_id` field, when that is a UUID.
    pub(crate) fn job_uuid(&self) -> Option<uuid::Uuid> {
        self.job_id
            .as_deref()
            .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
    }
}

/// A message's stream and entry id (entry ids are only unique per stream).
pub(crate) type MessageKey = (String, String);

/// What went wrong talking to Redis, as the loops need to know it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The consumer group (or the whole stream) is gone, e.g. after a Redis
    /// restart without persistence: create it again.
    #[error("consumer group missing")]
    NoGroup,
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
}

impl StreamError {
    fn from_redis(err: RedisError) -> Self {
        if err.code() == Some("NOGROUP") {
            Self::NoGroup
        } else {
            Self::Redis(err)
        }
    }
}

/// The job streams of this worker's kinds, as this consumer sees them.
#[derive(Clone)]
pub(crate) struct JobStream {
    pool: Pool,
    client: keel_shared::redis::Client,
    /// Three per kind this worker serves (one per priority band): every
    /// kind's high stream first, then the normal ones, then the low ones.
    streams: Vec<String>,
    kinds: Vec<String>,
    config: RedisConfig,
    dead_letter: String,
    dead_letter_maxlen: Option<usize>,
    consumer: String,
    block: Duration,
    /// In a cluster, the kind the next blocking read waits on.
    next_blocking: Arc<AtomicUsize>,
}

impl JobStream {
    pub(crate) fn new(
        pool: Pool,
        config: &RedisConfig,
        kinds: Vec<String>,
        consumer: String,
        block: Duration,
    ) -> Result<Self, RedisError> {
        Ok(Self {
            pool,
            client: keel_shared::redis::Client::open(config).map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "invalid Redis config",
                    e.to_string(),
                ))
            })?,
            streams: Band::ALL
                .iter()
                .flat_map(|band| kinds.iter().map(|k| config.jobs_band_stream(k, *band)))
                .collect(),
            kinds,
            config: config.clone(),
            dead_letter: config.dead_letter_stream(),
            dead_letter_maxlen: None,
            consumer,
            block,
            next_blocking: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The streams this worker reads, three per kind.
    pub(crate) fn streams(&self) -> &[String] {
        &self.streams
    }

    async fn conn(&self) -> Result<Connection, StreamError> {
        Ok(self.pool.get().await?)
    }

    /// The consumer group of every stream we read (an existing one is fine),
    /// then tells the jobs service which kinds we serve.
    pub(crate) async fn ensure_group(&self) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        for stream in &self.streams {
            keel_shared::redis::ensure_group(&mut *conn, stream).await?;
        }
        drop(conn);
        self.announce_kinds().await
    }

    /// Records that our kinds are served now (see `keel_shared::queue`): the
    /// jobs service adds a kind's jobs to its stream only while some worker
    /// announced it recently. Repeated every `ANNOUNCE_KINDS_EVERY`.
    pub(crate) async fn announce_kinds(&self) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        keel_shared::redis::announce_kinds(&mut *conn, &self.config, &self.kinds).await?;
        Ok(())
    }

    /// A connection of its own for blocking reads: the pool's connections
    /// give up on an answer long before a blocking read returns.
    pub(crate) async fn reader(&self) -> Result<Connection, StreamError> {
        Ok(self
            .client
            .dedicated(self.block + Duration::from_secs(5))
            .await?)
    }

    /// New messages for this consumer, up to `count` per stream: from the
    /// highest priority band that has any (a lower band is read only while
    /// the higher ones are empty), else whatever arrives first within the
    /// block time.
    ///
    /// In a Redis Cluster each read covers one kind (its streams share a
    /// slot): a band is read kind by kind, and the blocking read waits on
    /// one kind at a time, in turn (see [`CLUSTER_BLOCK_SLICE`]).
    pub(crate) async fn read(
        &self,
        reader: &mut Connection,
        count: usize,
    ) -> Result<Vec<Message>, StreamError> {
        if self.streams.is_empty() {
            tokio::time::sleep(self.block).await;
            return Ok(Vec::new());
        }
        let kinds = self.kinds.len();
        let cluster = self.client.is_cluster();
        for band in self.streams.chunks(kinds) {
            let mut read = Vec::new();
            if cluster {
                for stream in band {
                    read.extend(
                        self.read_from(reader, std::slice::from_ref(stream), count, None)
                            .await?,
                    );
                }
            } else {
                read = self.read_from(reader, band, count, None).await?;
            }
            if !read.is_empty() {
                return Ok(read);
            }
        }
        if !cluster || kinds == 1 {
            return self
                .read_from(reader, &self.streams, count, Some(self.block))
                .await;
        }
        let kind = self.next_blocking.fetch_add(1, Ordering::Relaxed) % kinds;
        let streams: Vec<String> = self
            .streams
            .iter()
            .skip(kind)
            .step_by(kinds)
            .cloned()
            .collect();
        self.read_from(
            reader,
            &streams,
            count,
            Some(self.block.min(CLUSTER_BLOCK_SLICE)),
        )
        .await
    }

    /// One XREADGROUP of new entries of `streams`, blocking for `block` if given.
    async fn read_from(
        &self,
        reader: &mut Connection,
        streams: &[String],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Message>, StreamError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(streams);
        for _ in streams {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd
            .query_async(reader)
            .await
            .map_err(StreamError::from_redis)?;
        Ok(reply
            .map(|r| {
                r.keys
                    .iter()
                    .flat_map(|k| k.ids.iter().map(|e| Message::from_entry(&k.key, e)))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Takes over up to `count` messages of `stream` idle for at least
    /// `min_idle`, scanning from `cursor`. Returns them with their delivery
    /// counts (this one included) and the cursor for the next scan ("0-0"
    /// when done).
    pub(crate) async fn autoclaim(
        &self,
        stream: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(Vec<(Message, u64)>, String), StreamError> {
        let mut conn = self.conn().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(CONSUMER_GROUP)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        if !reply.deleted_ids.is_empty() {
            tracing::warn!(
                count = reply.deleted_ids.len(),
                stream,
                "pending messages were deleted from the stream before anyone acknowledged them"
            );
        }
        let mut claimed = Vec::with_capacity(reply.claimed.len());
        for entry in &reply.claimed {
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(stream)
                .arg(CONSUMER_GROUP)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .query_async(&mut *conn)
                .await
                .map_err(StreamError::from_redis)?;
            let deliveries = pending
                .ids
                .first()
                .map(|p| p.times_delivered as u64)
                .unwrap_or(1);
            claimed.push((Message::from_entry(stream, entry), deliveries));
        }
        Ok((claimed, reply.next_stream_id))
    }

    /// Resets the idle time of messages this consumer is still working on
    /// (XCLAIM .. JUSTID does not count as a delivery), so that no other
    /// worker takes them over while we are alive.
    pub(crate) async fn touch(&self, messages: &[MessageKey]) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        for (stream, ids) in by_stream(messages) {
            let _: Vec<String> = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(CONSUMER_GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(ids)
                .arg("JUSTID")
                .query_async(&mut *conn)
                .await
                .map_err(StreamError::from_redis)?;
        }
        Ok(())
    }

    /// Acknowledges messages: one XACK per stream, in one pipeline (one per
    /// slot in a cluster: see `keel_shared::redis`).
    pub(crate) async fn ack(&self, messages: &[MessageKey]) -> Result<(), StreamError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in by_stream(messages) {
            pipe.cmd("XACK")
                .arg(stream)
                .arg(CONSUMER_GROUP)
                .arg(ids)
                .ignore();
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<()>(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        Ok(())
    }

    /// Bounds the dead-letter stream to about `maxlen` entries (unbounded
    /// unless set).
    pub(crate) fn with_dead_letter_maxlen(mut self, maxlen: usize) -> Self {
        self.dead_letter_maxlen = Some(maxlen);
        self
    }

    /// Copies a message to the dead-letter stream, saying why and which stream
    /// it came from (and with its trace context), so that it can be replayed.
    /// `MAXLEN ~` drops the oldest entries beyond the bound.
    pub(crate) async fn dead_letter(
        &self,
        message: &Message,
        deliveries: u64,
        reason: &str,
    ) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.dead_letter);
        if let Some(maxlen) = self.dead_letter_maxlen {
            xadd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        xadd.arg("*")
            .arg(FIELD_JOB_ID)
            .arg(message.job_id.as_deref().unwrap_or(""))
            .arg(dead_letter::FIELD_STREAM)
            .arg(&message.stream)
            .arg(dead_letter::FIELD_MESSAGE_ID)
            .arg(&message.id)
            .arg(dead_letter::FIELD_DELIVERIES)
            .arg(deliveries)
            .arg(dead_letter::FIELD_CONSUMER)
            .arg(&self.consumer)
            .arg(dead_letter::FIELD_REASON)
            .arg(reason);
        if let Some(traceparent) = &message.traceparent {
            xadd.arg(FIELD_TRACEPARENT).arg(traceparent);
        }
        let _: String = xadd.query_async(&mut *conn).await?;
        Ok(())
    }

    /// Trims each of our streams up to what every consumer group has both
    /// delivered and acknowledged (`XTRIM MINID ~`): below the oldest entry
    /// still pending in a group and below the last one it delivered, so no
    /// unread or unacknowledged entry is ever removed, however long the
    /// backlog. Returns how many entries went.
    pub(crate) async fn trim(&self) -> Result<u64, StreamError> {
        let mut conn = self.conn().await?;
        let mut trimmed = 0;
        for stream in &self.streams {
            let Some(min_id) = trim_point(&mut conn, stream).await? else {
                continue;
            };
            trimmed += redis::cmd("XTRIM")
                .arg(stream)
                .arg("MINID")
                .arg("~")
                .arg(min_id.to_string())
                .query_async::<u64>(&mut *conn)
                .await?;
        }
        Ok(trimmed)
    }

    /// Removes consumers that own no pending message and have not been seen
    /// for `idle` (workers that stopped: each process has a consumer name of
    /// its own, so the group would otherwise grow with every restart).
    pub(crate) async fn prune_consumers(&self, idle: Duration) -> Result<Vec<String>, StreamError> {
        let mut conn = self.conn().await?;
        let mut removed = Vec::new();
        for stream in &self.streams {
            let consumers: StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(CONSUMER_GROUP)
                .query_async(&mut *conn)
                .await
                .map_err(StreamError::from_redis)?;
            for c in consumers.consumers {
                if c.pending == 0 && c.idle as u128 >= idle.as_millis() && c.name != self.consumer {
                    let _: u64 = redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(stream)
                        .arg(CONSUMER_GROUP)
                        .arg(&c.name)
                        .query_async(&mut *conn)
                        .await
                        .map_err(StreamError::from_redis)?;
                    removed.push(c.name);
                }
            }
        }
        Ok(removed)
    }

    /// Our streams' total length, the dead-letter length, and our group's
    /// pending count, lag and consumers summed over the streams
    /// (`XINFO GROUPS`; lag needs Redis 7), for metrics.
    pub(crate) async fn queue_stats(
        &self,
    ) -> Result<keel_shared::metrics::QueueStats, StreamError> {
        let mut conn = self.conn().await?;
        let dead_letter_length: u64 = redis::cmd("XLEN")
            .arg(&self.dead_letter)
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        let mut stats = keel_shared::metrics::QueueStats {
            dead_letter_length,
            ..Default::default()
        };
        for stream in &self.streams {
            let length: u64 = redis::cmd("XLEN")
                .arg(stream)
                .query_async(&mut *conn)
                .await
                .map_err(StreamError::from_redis)?;
            stats.stream_length += length;
            if length == 0 {
                // XINFO GROUPS fails on a stream that does not exist yet.
                continue;
            }
            let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut *conn)
                .await
                .map_err(StreamError::from_redis)?;
            if let Some(group) = groups.groups.iter().find(|g| g.name == CONSUMER_GROUP) {
                stats.pending += group.pending as u64;
                stats.consumers = stats.consumers.max(group.consumers as u64);
                if let Some(lag) = group.lag {
                    stats.lag = Some(stats.lag.unwrap_or(0) + lag as u64);
                }
            }
        }
        Ok(stats)
    }
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct EntryId(u64, u64);

impl std::str::FromStr for EntryId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Ok(Self(
            ms.parse().map_err(|_| ())?,
            seq.parse().map_err(|_| ())?,
        ))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The lowest id any group of `stream` still needs: for each group, its
/// oldest pending entry, else its last delivered one. None when the stream
/// has no group (nothing is known to be read: keep everything).
async fn trim_point(conn: &mut Connection, stream: &str) -> Result<Option<EntryId>, StreamError> {
    let groups: StreamInfoGroupsReply = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut **conn)
        .await
    {
        Ok(groups) => groups,
        // No such stream yet.
        Err(e) if e.code() == Some("ERR") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut point: Option<EntryId> = None;
    for group in &groups.groups {
        let delivered: EntryId = group.last_delivered_id.parse().unwrap_or(EntryId(0, 0));
        let pending: StreamPendingReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&group.name)
            .query_async(&mut **conn)
            .await
            .map_err(StreamError::from_redis)?;
        let oldest_pending = match &pending {
            StreamPendingReply::Data(data) => data.start_id.parse().ok(),
            _ => None,
        };
        let needed = oldest_pending.map_or(delivered, |p: EntryId| p.min(delivered));
        point = Some(point.map_or(needed, |p| p.min(needed)));
    }
    Ok(point)
}

/// Entry ids grouped by their stream.
fn by_stream(messages: &[MessageKey]) -> std::collections::BTreeMap<&str, Vec<&str>> {
    let mut grouped = std::collections::BTreeMap::<&str, Vec<&str>>::new();
    for (stream, id) in messages {
        grouped.entry(stream).or_default().push(id);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_as_redis_orders_them() {
        let id = |s: &str| s.parse::<EntryId>().unwrap();
        assert!(id("9-5") < id("10-0"));
        assert!(id("10-0") < id("10-1"));
        assert_eq!(id("10"), id("10-0"));
        assert_eq!(id("1700000000000-3").to_string(), "1700000000000-3");
        assert!("x-1".parse::<EntryId>().is_err());
    }
}
