//! Which workers the jobs service has seen: StartJob(s), ClaimJobs and
//! Heartbeat name their worker, and each sighting is noted in memory; one
//! per worker every few seconds goes (through a queue, off the calls' path)
//! to the `workers` table that ListWorkers reads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::store;
use crate::domain;

/// A worker is written at most this often per process (unless it says
/// something new about itself).
const RECORD_EVERY: Duration = Duration::from_secs(5);
/// Workers remembered by the throttle before it starts afresh.
const MAX_REMEMBERED: usize = 10_000;
/// Sightings waiting to be written; beyond this they are dropped (the next
/// one after the throttle period is written).
const QUEUE: usize = 1024;
/// Most sightings written per round.
const BATCH: usize = 256;
/// Workers not seen for this long are deleted.
const FORGET_AFTER_SECS: f64 = 24.0 * 3600.0;
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// One worker seen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sighting {
    pub worker_id: String,
    /// Kinds it served or asked for.
    pub kinds: Vec<String>,
    /// `kinds` is all it serves (ClaimJobs) rather than some (a start).
    pub all_kinds: bool,
    /// How many jobs it runs at once, when it said (ClaimJobs' max_jobs).
    pub concurrency: Option<i32>,
}

struct Known {
    at: Instant,
    kinds: Vec<String>,
    concurrency: Option<i32>,
}

/// The in-memory throttle in front of the `workers` table.
pub(crate) struct Sightings {
    known: Mutex<HashMap<String, Known>>,
    queue: mpsc::Sender<Sighting>,
}

impl Sightings {
    pub(crate) fn new() -> (Self, mpsc::Receiver<Sighting>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let sightings = Self {
            known: Mutex::new(HashMap::new()),
            queue,
        };
        (sightings, rx)
    }

    /// Notes that `worker_id` called now; queues a write when it was not
    /// written within [`RECORD_EVERY`] or said something new.
    pub(crate) fn saw(
        &self,
        worker_id: &str,
        kinds: &[String],
        all_kinds: bool,
        concurrency: Option<i32>,
    ) {
        if worker_id.is_empty() {
            return;
        }
        let worker_id = domain::clip(worker_id, domain::MAX_WORKER_ID_BYTES);
        let now = Instant::now();
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = known.get(&worker_id) {
                let news = if all_kinds {
                    k.kinds != kinds
                } else {
                    kinds.iter().any(|kind| !k.kinds.contains(kind))
                };
                let fresh = now.duration_since(k.at) < RECORD_EVERY;
                if fresh && !news && (concurrency.is_none() || concurrency == k.concurrency) {
                    return;
                }
            }
            if known.len() >= MAX_REMEMBERED {
                known.clear();
            }
            let entry = known.entry(worker_id.clone()).or_insert(Known {
                at: now,
                kinds: Vec::new(),
                concurrency: None,
            });
            entry.at = now;
            if all_kinds {
                entry.kinds = kinds.to_vec();
            } else {
                for kind in kinds {
                    if !entry.kinds.contains(kind) {
                        entry.kinds.push(kind.clone());
                    }
                }
            }
            entry.concurrency = concurrency.or(entry.concurrency);
        }
        let sighting = Sighting {
            worker_id,
            kinds: kinds.to_vec(),
            all_kinds,
            concurrency,
        };
        if self.queue.try_send(sighting).is_err() {
            tracing::debug!("worker sightings queue full; dropped one");
        }
    }
}

/// Writes queued sightings until `shutdown`, and forgets workers not seen
/// for a day.
pub(crate) async fn run(pool: Pool, mut rx: mpsc::Receiver<Sighting>, shutdown: CancellationToken) {
    let mut last_forget = Instant::now();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = rx.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let written = async {
            let client = pool.get().await?;
            store::saw_workers(&client, &batch).await?;
            if last_forget.elapsed() >= FORGET_EVERY {
                last_forget = Instant::now();
                store::forget_workers(&client, FORGET_AFTER_SECS).await?;
            }
            Ok::<_, crate::error::JobsError>(())
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record worker sightings");
        }
    }
}
