//! Flow control per kind, as the operator configures it: at most
//! `max_running` jobs of a kind running across the fleet, and at most
//! `rate_per_second` starts per second (a token bucket). The limits come
//! from a file (`KEEL_FLOW_CONTROL_FILE`, TOML or JSON) re-read every
//! [`RELOAD_EVERY`]; a bad file keeps the last good limits. They are
//! enforced where jobs start (StartJob(s) and ClaimJobs, see
//! `service.rs`), in the start's transaction, so they hold with any number
//! of workers and jobs replicas.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::JobsError;
use crate::{domain, store};

/// How often the limits file is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// The retry delay a start refused for `max_running` suggests: a running
/// job has to finish first, which the jobs service does not wait for.
pub const RUNNING_RETRY: Duration = Duration::from_millis(500);
/// Shortest retry delay a refusal suggests.
const MIN_RETRY: Duration = Duration::from_millis(10);
/// Largest `rate_per_second` and `burst` accepted.
const MAX_RATE: f64 = 1_000_000.0;

/// One kind's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindLimits {
    /// Most jobs of the kind running at once (0 holds every start).
    pub max_running: Option<i64>,
    pub rate: Option<Rate>,
}

/// A token bucket: `per_second` tokens added per second, at most `burst` kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The limits of every limited kind (kinds not named are unlimited).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    kinds: HashMap<String, KindLimits>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    pub fn of(&self, kind: &str) -> Option<&KindLimits> {
        self.kinds.get(kind)
    }

    /// Parses a limits file: JSON when `path` ends in `.json`, else TOML.
    /// The error names the problem (the field, or where the syntax broke).
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let file: File = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        let mut kinds = HashMap::new();
        for (kind, entry) in file.kinds {
            if domain::validate_kind(&kind).is_err() {
                return Err(format!(
                    "kinds.{kind:?}: not a job kind (1-128 of a-z 0-9 . _ -)"
                ));
            }
            kinds.insert(kind.clone(), entry.limits(&kind)?);
        }
        Ok(Self { kinds })
    }
}

/// The file's shape: `[kinds.<kind>]` tables (`{"kinds": {"<kind>": {..}}}` in JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    kinds: BTreeMap<String, Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    max_running: Option<i64>,
    rate_per_second: Option<f64>,
    /// Starts allowed at once after a quiet spell; default max(1, rate).
    burst: Option<f64>,
}

impl Entry {
    fn limits(&self, kind: &str) -> Result<KindLimits, String> {
        if let Some(n) = self.max_running
            && n < 0
        {
            return Err(format!("kinds.{kind}.max_running: must be 0 or more"));
        }
        let rate = match self.rate_per_second {
            None if self.burst.is_some() => {
                return Err(format!("kinds.{kind}.burst: needs rate_per_second as well"));
            }
            None => None,
            Some(r) if !(r > 0.0 && r <= MAX_RATE) => {
                return Err(format!(
                    "kinds.{kind}.rate_per_second: must be above 0 and at most {MAX_RATE}"
                ));
            }
            Some(per_second) => {
                let burst = self.burst.unwrap_or(per_second.max(1.0));
                if !(1.0..=MAX_RATE).contains(&burst) {
                    return Err(format!(
                        "kinds.{kind}.burst: must be between 1 and {MAX_RATE}"
                    ));
                }
                Some(Rate { per_second, burst })
            }
        };
        Ok(KindLimits {
            max_running: self.max_running,
            rate,
        })
    }
}

/// Why a start was held back: what the refusal says and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub message: String,
    pub retry_after: Duration,
}

impl Held {
    /// The kind is at `max_running`.
    pub fn running(kind: &str, max_running: i64) -> Self {
        Self::new(
            format!("kind \"{kind}\" has {max_running} running jobs, its max_running"),
            RUNNING_RETRY,
        )
    }

    /// The kind's bucket holds `tokens` (< 1).
    pub fn rate(kind: &str, rate: Rate, tokens: f64) -> Self {
        let wait = ((1.0 - tokens).max(0.0) / rate.per_second).min(60.0);
        Self::new(
            format!(
                "kind \"{kind}\" is at its rate limit of {} starts per second",
                rate.per_second
            ),
            Duration::from_secs_f64(wait),
        )
    }

    fn new(why: String, retry_after: Duration) -> Self {
        let retry_after = retry_after.max(MIN_RETRY);
        Self {
            message: format!(
                "flow control: {why}; retry in {} ms",
                retry_after.as_millis()
            ),
            retry_after,
        }
    }
}

/// What a limited kind may start in one transaction, once its running jobs
/// are counted and its bucket refilled: how many, and why the next one
/// would be held back (None: the entry names no limit).
pub fn allowance(
    kind: &str,
    limits: &KindLimits,
    running: i64,
    tokens: Option<f64>,
) -> (i64, Option<Held>) {
    let mut allowed = i64::MAX;
    let mut held = None;
    if let Some(max) = limits.max_running {
        allowed = (max - running).max(0);
        held = Some(Held::running(kind, max));
    }
    if let (Some(rate), Some(tokens)) = (limits.rate, tokens) {
        let whole = tokens.max(0.0).floor() as i64;
        if whole < allowed {
            allowed = whole;
            held = Some(Held::rate(kind, rate, tokens - whole as f64));
        }
    }
    (allowed, held)
}

/// Each limited kind's allowance in `tx` (see [`allowance`]): takes the
/// kinds' start locks (held until `tx` ends), counts their running jobs
/// and refills their buckets. Unlimited kinds in `kinds` are ignored.
pub async fn allowances(
    tx: &impl GenericClient,
    limits: &Limits,
    kinds: &[&str],
) -> Result<HashMap<String, (i64, Option<Held>)>, JobsError> {
    let limited: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| limits.of(k).is_some())
        .collect();
    if limited.is_empty() {
        return Ok(HashMap::new());
    }
    store::flow::lock_kinds(tx, &limited).await?;
    let counted: Vec<&str> = limited
        .iter()
        .copied()
        .filter(|k| limits.of(k).is_some_and(|l| l.max_running.is_some()))
        .collect();
    let running = if counted.is_empty() {
        HashMap::new()
    } else {
        store::flow::running_counts(tx, &counted).await?
    };
    let buckets: Vec<store::flow::Bucket<'_>> = limited
        .iter()
        .filter_map(|k| {
            let rate = limits.of(k)?.rate?;
            Some(store::flow::Bucket {
                kind: k,
                per_second: rate.per_second,
                burst: rate.burst,
            })
        })
        .collect();
    let tokens = if buckets.is_empty() {
        HashMap::new()
    } else {
        store::flow::refill_buckets(tx, &buckets).await?
    };
    Ok(limited
        .iter()
        .filter_map(|k| {
            let l = limits.of(k)?;
            let running = running.get(*k).copied().unwrap_or(0);
            Some((
                k.to_string(),
                allowance(k, l, running, tokens.get(*k).copied()),
            ))
        })
        .collect())
}

/// Which of `ids` (distinct, in the order they should be served) flow
/// control holds back now, with why; the others may start. Takes the start
/// locks of the limited kinds among them (see [`allowances`]).
pub async fn gate_starts(
    tx: &impl GenericClient,
    limits: &Limits,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Held>, JobsError> {
    let kinds = store::flow::startable_kinds(tx, ids).await?;
    let mut limited: Vec<&str> = kinds
        .values()
        .map(String::as_str)
        .filter(|k| limits.of(k).is_some())
        .collect();
    limited.sort_unstable();
    limited.dedup();
    let mut left = allowances(tx, limits, &limited).await?;
    let mut held = HashMap::new();
    for id in ids {
        let Some((allowed, why)) = kinds.get(id).and_then(|k| left.get_mut(k)) else {
            continue;
        };
        if *allowed > 0 {
            *allowed -= 1;
        } else if let Some(why) = why {
            held.insert(*id, why.clone());
        }
    }
    Ok(held)
}

/// The rate-limited kinds' buckets pay for the jobs that started in `tx`.
pub async fn pay<'a>(
    tx: &impl GenericClient,
    limits: &Limits,
    started: impl IntoIterator<Item = &'a str>,
) -> Result<(), JobsError> {
    let mut taken: HashMap<&str, f64> = HashMap::new();
    for kind in started {
        if limits.of(kind).is_some_and(|l| l.rate.is_some()) {
            *taken.entry(kind).or_default() += 1.0;
        }
    }
    let taken: Vec<(&str, f64)> = taken.into_iter().collect();
    store::flow::take_tokens(tx, &taken).await
}

/// The limits in force, re-read from the file while the service runs.
#[derive(Debug)]
pub struct FlowControl {
    path: Option<PathBuf>,
    /// The file's text the limits were read from at start-up.
    loaded: Option<String>,
    current: RwLock<Arc<Limits>>,
}

impl FlowControl {
    /// No limits at all.
    pub fn unlimited() -> Self {
        Self {
            path: None,
            loaded: None,
            current: RwLock::new(Arc::new(Limits::default())),
        }
    }

    /// Reads the limits file; a missing or bad file at start-up is an error
    /// (the service refuses to start rather than run without its limits).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        let limits = Limits::parse(path, &text)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            loaded: Some(text),
            current: RwLock::new(Arc::new(limits)),
        })
    }

    /// The limits in force now.
    pub fn current(&self) -> Arc<Limits> {
        self.current.read().expect("flow limits").clone()
    }

    /// Re-reads the file every `every` until `shutdown`; a changed, valid
    /// file replaces the limits, a bad (or unreadable) one is logged,
    /// naming the problem, and the last good limits stay.
    pub async fn run_reloader(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        // From the text loaded at start-up: a change made since is applied.
        let mut last_text = self.loaded.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let read = tokio::task::spawn_blocking({
                let path = path.clone();
                move || std::fs::read_to_string(path)
            })
            .await;
            let text = match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
                Ok(text) => text,
                Err(e) => {
                    if last_text.take().is_some() {
                        tracing::error!(path = %path.display(), error = %e,
                            "cannot read the flow control file; keeping the last good limits");
                    }
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            match Limits::parse(&path, &text) {
                Ok(limits) => {
                    tracing::info!(path = %path.display(), kinds = limits.kinds.len(),
                        "flow control limits reloaded");
                    *self.current.write().expect("flow limits") = Arc::new(limits);
                }
                Err(problem) => {
                    tracing::error!(path = %path.display(), %problem,
                        "bad flow control file; keeping the last good limits");
                }
            }
            last_text = Some(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Limits, String> {
        Limits::parse(Path::new("flow.toml"), text)
    }

    #[test]
    fn parses_toml_and_json() {
        let limits = toml(
            "[kinds.send_email]\nmax_running = 10\nrate_per_second = 5.0\n\n[kinds.echo]\nrate_per_second = 0.5\n",
        )
        .unwrap();
        assert_eq!(
            limits.of("send_email"),
            Some(&KindLimits {
                max_running: Some(10),
                rate: Some(Rate {
                    per_second: 5.0,
                    burst: 5.0
                })
            })
        );
        assert_eq!(limits.of("echo").unwrap().rate.unwrap().burst, 1.0);
        assert_eq!(limits.of("other"), None);
        let json = Limits::parse(
            Path::new("flow.json"),
            r#"{"kinds": {"send_email": {"max_running": 10, "rate_per_second": 5, "burst": 20}}}"#,
        )
        .unwrap();
        assert_eq!(json.of("send_email").unwrap().rate.unwrap().burst, 20.0);
        assert!(toml("").unwrap().is_empty());
    }

    #[test]
    fn bad_files_name_the_problem() {
        for (text, names) in [
            ("[kinds.echo]\nmax_running = -1\n", "kinds.echo.max_running"),
            (
                "[kinds.echo]\nrate_per_second = 0\n",
                "kinds.echo.rate_per_second",
            ),
            (
                "[kinds.echo]\nrate_per_second = 1\nburst = 0.5\n",
                "kinds.echo.burst",
            ),
            ("[kinds.echo]\nburst = 3\n", "kinds.echo.burst"),
            ("[kinds.\"Bad Kind\"]\nmax_running = 1\n", "Bad Kind"),
            ("[kinds.echo]\nmax_runing = 1\n", "max_runing"),
            ("[kinds.echo\n", "kinds.echo"),
        ] {
            let err = toml(text).unwrap_err();
            assert!(err.contains(names), "{text:?}: {err}");
        }
    }

    #[test]
    fn allowance_takes_the_tighter_limit() {
        let limits = KindLimits {
            max_running: Some(3),
            rate: Some(Rate {
                per_second: 2.0,
                burst: 2.0,
            }),
        };
        assert_eq!(allowance("k", &limits, 1, Some(5.0)).0, 2);
        assert_eq!(allowance("k", &limits, 0, Some(1.5)).0, 1);
        let (n, held) = allowance("k", &limits, 3, Some(5.0));
        assert_eq!(n, 0);
        assert!(held.unwrap().message.contains("max_running"));
        let (n, held) = allowance("k", &limits, 0, Some(0.5));
        assert_eq!(n, 0);
        let held = held.unwrap();
        assert_eq!(held.retry_after, Duration::from_millis(250));
        assert!(
            held.message.ends_with("retry in 250 ms"),
            "{}",
            held.message
        );
        // After the one whole token, the next start waits for the rest of one.
        let (n, held) = allowance("k", &limits, 0, Some(1.5));
        assert_eq!(n, 1);
        assert_eq!(held.unwrap().retry_after, Duration::from_millis(250));
        let unlimited = KindLimits {
            max_running: None,
            rate: None,
        };
        assert_eq!(allowance("k", &unlimited, 100, None), (i64::MAX, None));
    }
}
