//! The Redis job stream as one consumer sees it: the consumer group, reading
//! (XREADGROUP), taking over from dead consumers (XAUTOCLAIM), keeping our own
//! pending messages fresh, acknowledging, dead-lettering and trimming.

use std::time::Duration;

use deadpool_redis::Pool;
use keel_shared::config::RedisConfig;
use keel_shared::queue::{CONSUMER_GROUP, FIELD_JOB_ID, FIELD_TRACEPARENT};
use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingCountReply, StreamReadReply,
};
use redis::{AsyncConnectionConfig, RedisError};

/// One stream entry handed to this consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The stream entry id.
    pub id: String,
    /// The `job_id` field, when the entry has one.
    pub job_id: Option<String>,
    /// The trace context the job was created in, when tracing was on.
    pub traceparent: Option<String>,
}

impl Message {
    fn from_entry(entry: &StreamId) -> Self {
        Self {
            id: entry.id.clone(),
            job_id: entry.get::<String>(FIELD_JOB_ID),
            traceparent: entry.get::<String>(FIELD_TRACEPARENT),
        }
    }
}

/// What went wrong talking to Redis, as the loops need to know it.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
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

/// The job stream as this consumer sees it.
#[derive(Clone)]
pub struct JobStream {
    pool: Pool,
    client: redis::Client,
    stream: String,
    dead_letter: String,
    consumer: String,
    block: Duration,
}

impl JobStream {
    pub fn new(
        pool: Pool,
        config: &RedisConfig,
        consumer: String,
        block: Duration,
    ) -> Result<Self, RedisError> {
        Ok(Self {
            pool,
            client: redis::Client::open(config.redis_url.as_str())?,
            stream: config.jobs_stream(),
            dead_letter: config.dead_letter_stream(),
            consumer,
            block,
        })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StreamError> {
        Ok(self.pool.get().await?)
    }

    /// `XGROUP CREATE <stream> workers 0 MKSTREAM`; an existing group is fine.
    pub async fn ensure_group(&self) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        let res: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(CONSUMER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut *conn)
            .await;
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A connection of its own for blocking reads: the pool's connections
    /// give up on an answer long before a blocking read returns.
    pub async fn reader(&self) -> Result<MultiplexedConnection, StreamError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(self.block + Duration::from_secs(5)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// New messages for this consumer, up to `count`, waiting at most the block time.
    pub async fn read(
        &self,
        reader: &mut MultiplexedConnection,
        count: usize,
    ) -> Result<Vec<Message>, StreamError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(self.block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(reader)
            .await
            .map_err(StreamError::from_redis)?;
        Ok(reply
            .map(|r| {
                r.keys
                    .iter()
                    .flat_map(|k| k.ids.iter().map(Message::from_entry))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Takes over up to `count` messages idle for at least `min_idle`, scanning
    /// from `cursor`. Returns them with their delivery counts (this one
    /// included) and the cursor for the next scan ("0-0" when done).
    pub async fn autoclaim(
        &self,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(Vec<(Message, u64)>, String), StreamError> {
        let mut conn = self.conn().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
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
                "pending messages were trimmed from the stream before anyone acknowledged them"
            );
        }
        let mut claimed = Vec::with_capacity(reply.claimed.len());
        for entry in &reply.claimed {
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&self.stream)
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
            claimed.push((Message::from_entry(entry), deliveries));
        }
        Ok((claimed, reply.next_stream_id))
    }

    /// Resets the idle time of messages this consumer is still working on
    /// (XCLAIM .. JUSTID does not count as a delivery), so that no other
    /// worker takes them over while we are alive.
    pub async fn touch(&self, ids: &[String]) -> Result<(), StreamError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: Vec<String> = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(CONSUMER_GROUP)
            .arg(&self.consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID")
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        Ok(())
    }

    /// Acknowledges messages, all in one XACK.
    pub async fn ack(&self, ids: &[String]) -> Result<(), StreamError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let _: u64 = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(CONSUMER_GROUP)
            .arg(ids)
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        Ok(())
    }

    /// Copies a message to the dead-letter stream, saying why.
    pub async fn dead_letter(
        &self,
        message: &Message,
        deliveries: u64,
        reason: &str,
    ) -> Result<(), StreamError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("XADD")
            .arg(&self.dead_letter)
            .arg("*")
            .arg(FIELD_JOB_ID)
            .arg(message.job_id.as_deref().unwrap_or(""))
            .arg("message_id")
            .arg(&message.id)
            .arg("deliveries")
            .arg(deliveries)
            .arg("consumer")
            .arg(&self.consumer)
            .arg("reason")
            .arg(reason)
            .query_async(&mut *conn)
            .await?;
        Ok(())
    }

    /// `XTRIM <stream> MAXLEN ~ <maxlen>`: bounds Redis memory under sustained load.
    pub async fn trim(&self, maxlen: usize) -> Result<u64, StreamError> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("XTRIM")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(maxlen)
            .query_async(&mut *conn)
            .await?)
    }

    /// Removes consumers that own no pending message and have not been seen
    /// for `idle` (workers that stopped: each process has a consumer name of
    /// its own, so the group would otherwise grow with every restart).
    pub async fn prune_consumers(&self, idle: Duration) -> Result<Vec<String>, StreamError> {
        let mut conn = self.conn().await?;
        let consumers: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.stream)
            .arg(CONSUMER_GROUP)
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        let mut removed = Vec::new();
        for c in consumers.consumers {
            if c.pending == 0 && c.idle as u128 >= idle.as_millis() && c.name != self.consumer {
                let _: u64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.stream)
                    .arg(CONSUMER_GROUP)
                    .arg(&c.name)
                    .query_async(&mut *conn)
                    .await
                    .map_err(StreamError::from_redis)?;
                removed.push(c.name);
            }
        }
        Ok(removed)
    }

    /// Stream and dead-letter lengths and our group's pending count, lag and
    /// consumers (`XINFO GROUPS`; lag needs Redis 7), for metrics.
    pub async fn queue_stats(&self) -> Result<keel_shared::metrics::QueueStats, StreamError> {
        let mut conn = self.conn().await?;
        let (stream_length, dead_letter_length): (u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&self.stream)
            .cmd("XLEN")
            .arg(&self.dead_letter)
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        let mut stats = keel_shared::metrics::QueueStats {
            stream_length,
            dead_letter_length,
            ..Default::default()
        };
        if stream_length == 0 {
            // XINFO GROUPS fails on a stream that does not exist yet.
            return Ok(stats);
        }
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut *conn)
            .await
            .map_err(StreamError::from_redis)?;
        if let Some(group) = groups.groups.iter().find(|g| g.name == CONSUMER_GROUP) {
            stats.pending = group.pending as u64;
            stats.lag = group.lag.map(|l| l as u64);
            stats.consumers = group.consumers as u64;
        }
        Ok(stats)
    }
}
