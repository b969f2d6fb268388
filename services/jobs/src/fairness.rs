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

/// The backlog bound never goes below this many entries (nor above the
/// configured bound).
const MIN_BACKLOG: i64 = 32;

/// A kind's streams, summed over the bands: the entries not yet delivered
/// to any worker (the workers' group `lag`; the stream's length where Redis
/// cannot tell it, e.g. before the group exists).
const BACKLOG_SCRIPT: &str = r"
local backlog = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local lag = nil
    local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
    if ok then
      for _, g in ipairs(groups) do
        local name, glag
        for i = 1, #g, 2 do
          if g[i] == 'name' then name = g[i + 1]
          elseif g[i] == 'lag' then glag = g[i + 1] end
        end
        if name == ARGV[1] then lag = glag end
      end
    end
    if not lag then lag = redis.call('XLEN', key) end
    backlog = backlog + lag
  end
end
return backlog
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
    /// The bound in force per kind (see [`Backlog::rooms`]).
    in_force: Mutex<HashMap<String, i64>>,
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
            in_force: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    /// Whether streams are kept short (else every job is published at once).
    pub(crate) fn bounded(&self) -> bool {
        self.bound > 0
    }

    /// Room in each kind's streams (entries that may be added now): the
    /// bound in force minus their backlog, at most `cap` (`cap` when
    /// unbounded).
    ///
    /// The bound in force is about the smallest backlog that keeps the
    /// workers busy between two looks of the relay, found while rows wait:
    /// a stream found empty (the workers took everything since the last
    /// look) doubles it, one found more than half full (they took less
    /// than half) lowers it by an eighth; between [`MIN_BACKLOG`] and the
    /// configured bound. It settles between one and two looks' worth of
    /// work. The relay fills any room at once (every [`WAITING_POLL`] while
    /// rows wait), so a newly arrived user's job waits behind about what
    /// the workers take in that time.
    ///
    /// Tried before (BENCHMARKS.md, "Fairness"): filling only once half the
    /// bound was free made the newcomer wait for that half to drain; a bound
    /// following the workers' pending messages fell to its minimum when the
    /// workers ran short and stayed there (2,400-2,800 jobs/s for a
    /// 100,000-job backlog drained alone, against 6,700-7,900 with this).
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
                let backlog: i64 = invocation.invoke_async(&mut *conn).await?;
                let bound = self.adjust_bound(kind, backlog);
                rooms.insert(kind.to_string(), (bound - backlog).clamp(0, cap));
            }
            Ok::<_, ApiError>(rooms)
        })
        .await;
        read.unwrap_or_else(|_| Err(ApiError::Unavailable("redis timed out".into())))
    }

    /// The bound in force for `kind` after a look that found `backlog`
    /// entries undelivered (see [`Backlog::rooms`]).
    fn adjust_bound(&self, kind: &str, backlog: i64) -> i64 {
        let floor = MIN_BACKLOG.min(self.bound);
        let waiting = self.is_waiting(kind);
        let mut in_force = self.in_force.lock().expect("bounds in force");
        let bound = in_force.entry(kind.to_string()).or_insert(floor);
        if waiting {
            if backlog == 0 {
                *bound = (*bound * 2).min(self.bound);
            } else if backlog * 2 > *bound {
                *bound = (*bound - (*bound / 8).max(1)).max(floor);
            }
        }
        *bound
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
