//! Fairness between users: each kind's stream is kept short (at most
//! `KEEL_JOBS_STREAM_BACKLOG` entries not yet delivered to a worker), and
//! the rest waits in the outbox, from which the relay takes the next rows
//! taking turns between users (`store::fairness::claim_fair`). A user's
//! new job therefore waits behind at most the stream's short backlog plus
//! one turn of each other user, not behind another user's whole backlog.
//! The immediate publication of new jobs respects the same bound.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use keel_shared::ApiError;
use keel_shared::config::RedisConfig;
use keel_shared::queue::{Band, CONSUMER_GROUP};
use tokio::sync::Notify;

use crate::store::Publication;

/// Longest a backlog read may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the relay looks for room in the streams of kinds with rows
/// waiting for it (a Redis call per kind; Postgres only once there is room).
pub(crate) const WAITING_POLL: Duration = Duration::from_millis(10);

/// The backlog bound never goes below this many entries, however few
/// messages the workers hold.
const MIN_BACKLOG: i64 = 32;

/// A kind's streams, summed over the bands: {entries not yet delivered to
/// any worker (the workers' group `lag`; the stream's length where Redis
/// cannot tell it, e.g. before the group exists), entries delivered and not
/// yet acknowledged (the group's `pending`: what the workers hold)}.
const BACKLOG_SCRIPT: &str = r"
local backlog, held = 0, 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local lag = nil
    local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
    if ok then
      for _, g in ipairs(groups) do
        local name, glag, pending
        for i = 1, #g, 2 do
          if g[i] == 'name' then name = g[i + 1]
          elseif g[i] == 'lag' then glag = g[i + 1]
          elseif g[i] == 'pending' then pending = g[i + 1] end
        end
        if name == ARGV[1] then
          lag = glag
          held = held + (pending or 0)
        end
      end
    end
    if not lag then lag = redis.call('XLEN', key) end
    backlog = backlog + lag
  end
end
return {backlog, held}
";

/// The per-kind bound on the streams' backlog, and the kinds with outbox
/// rows waiting for room.
pub(crate) struct Backlog {
    /// Most undelivered entries per kind; 0: unbounded (publish everything).
    bound: i64,
    redis: keel_shared::redis::Pool,
    config: RedisConfig,
    script: redis::Script,
    /// Kinds whose rows wait in the outbox for room in their streams.
    waiting: Mutex<HashSet<String>>,
    /// Wakes the relay: rows were handed to it.
    wake: Notify,
}

impl Backlog {
    pub(crate) fn new(bound: i64, redis: keel_shared::redis::Pool, config: RedisConfig) -> Self {
        Self {
            bound: bound.max(0),
            redis,
            config,
            script: redis::Script::new(BACKLOG_SCRIPT),
            waiting: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        }
    }

    /// Whether streams are kept short (else every job is published at once).
    pub(crate) fn bounded(&self) -> bool {
        self.bound > 0
    }

    /// Room in each kind's streams (entries that may be added now): the
    /// bound in force minus their backlog, at most `cap` (`cap` when
    /// unbounded). The bound in force is as many entries as the workers
    /// hold (about their concurrency while they are busy), at least
    /// [`MIN_BACKLOG`], at most the configured bound.
    ///
    /// The relay fills any room at once (every [`WAITING_POLL`] while rows
    /// wait). Waiting for half the bound to be free made each round bigger
    /// but left the workers short (2,591 jobs/s for a 100,000-job backlog,
    /// against 4,203 with rounds on any room: BENCHMARKS.md, "Fairness"),
    /// and made a newly arrived user's job wait for that half to drain.
    pub(crate) async fn rooms(
        &self,
        kinds: &[&str],
        cap: i64,
    ) -> Result<HashMap<String, i64>, ApiError> {
        if !self.bounded() {
            return Ok(kinds.iter().map(|k| (k.to_string(), cap)).collect());
        }
        let read = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut conn = self.redis.get().await?;
            let mut rooms = HashMap::with_capacity(kinds.len());
            for kind in kinds {
                let mut invocation = self.script.prepare_invoke();
                for band in Band::ALL {
                    invocation.key(self.config.jobs_band_stream(kind, band));
                }
                invocation.arg(CONSUMER_GROUP);
                let (backlog, held): (i64, i64) = invocation.invoke_async(&mut *conn).await?;
                let bound = held.max(MIN_BACKLOG).min(self.bound);
                rooms.insert(kind.to_string(), (bound - backlog).clamp(0, cap));
            }
            Ok::<_, ApiError>(rooms)
        })
        .await;
        read.unwrap_or_else(|_| Err(ApiError::Unavailable("redis timed out".into())))
    }

    /// Splits `batch` into what fits in the streams now (in order) and what
    /// must wait in the outbox; jobs of the high band (priority above 0)
    /// always fit. When the room cannot be read, the others wait.
    pub(crate) async fn admit(
        &self,
        batch: Vec<Publication>,
    ) -> (Vec<Publication>, Vec<Publication>) {
        if !self.bounded() {
            return (batch, Vec::new());
        }
        let mut kinds: Vec<&str> = batch.iter().map(|p| p.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut rooms = match self.rooms(&kinds, i64::MAX).await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the streams' backlog");
                HashMap::new()
            }
        };
        let (mut now, mut later) = (Vec::new(), Vec::new());
        for p in batch {
            // The high band skips the bound: workers read it first, so a
            // job that outranks the backlog goes ahead of it at once.
            if Band::of(p.priority) == Band::High {
                now.push(p);
                continue;
            }
            match rooms.get_mut(&p.kind) {
                Some(free) if *free > 0 && !self.is_waiting(&p.kind) => {
                    *free -= 1;
                    now.push(p);
                }
                _ => later.push(p),
            }
        }
        (now, later)
    }

    /// Rows of `kinds` wait in the outbox for room: the relay watches their
    /// streams closely until it has published them.
    pub(crate) fn hand_over<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        let mut waiting = self.waiting.lock().expect("waiting kinds");
        for kind in kinds {
            if !waiting.contains(kind) {
                waiting.insert(kind.to_string());
            }
        }
        drop(waiting);
        self.wake.notify_one();
    }

    /// After a relay round for `kind`: whether rows may still wait.
    pub(crate) fn set_waiting(&self, kind: &str, waiting: bool) {
        let mut set = self.waiting.lock().expect("waiting kinds");
        if waiting {
            set.insert(kind.to_string());
        } else {
            set.remove(kind);
        }
    }

    fn is_waiting(&self, kind: &str) -> bool {
        self.waiting.lock().expect("waiting kinds").contains(kind)
    }

    /// The kinds with rows waiting for room.
    pub(crate) fn waiting(&self) -> Vec<String> {
        self.waiting
            .lock()
            .expect("waiting kinds")
            .iter()
            .cloned()
            .collect()
    }

    /// Resolves when rows were handed to the relay since it last looked.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}
