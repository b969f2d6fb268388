//! What a job kind does: the [`Handler`] trait, the [`Registry`] of handlers by
//! kind, and the built-in kinds `echo`, `sleep` and `fail`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Longest `sleep` job the built-in handler accepts.
pub const MAX_SLEEP_MS: u64 = 600_000;

/// Everything a handler gets about the attempt it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: Uuid,
    pub kind: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    pub payload: Value,
    /// Cancelled when the job's owner cancels it, or when the worker shuts down
    /// and the grace period is over. A handler should return soon after; what
    /// it returns then is not recorded as success.
    pub cancel: CancellationToken,
    /// Where the handler reports how far it got: sent with the attempt's
    /// next heartbeat, shown on `Job.progress` and to WatchJob watchers.
    pub progress: Progress,
}

/// The latest progress a handler reported, waiting for the next heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Mutex<Option<Value>>>);

impl Progress {
    /// Records `progress` (a JSON object; other values are wrapped as
    /// `{"value": ..}`) for the next heartbeat; a report not sent yet is
    /// replaced.
    pub fn report(&self, progress: Value) {
        *self.0.lock().expect("progress") = Some(progress);
    }

    /// The report not sent yet, if any.
    pub(crate) fn take(&self) -> Option<Value> {
        self.0.lock().expect("progress").take()
    }

    /// Puts back a report whose heartbeat failed, unless a newer one came.
    pub(crate) fn restore(&self, progress: Value) {
        self.0.lock().expect("progress").get_or_insert(progress);
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt (while attempts remain).
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help: the job fails now.
    #[error("{0}")]
    Permanent(String),
}

impl HandlerError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// The code behind one job kind. Returns the job's output (recorded as its
/// `output`, a JSON object; other values are wrapped as `{"value": ..}`).
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError>;
}

/// A handler from an async closure.
pub struct FnHandler<F>(pub F);

#[async_trait::async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError> {
        (self.0)(ctx).await
    }
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// No handlers at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in kinds: `echo`, `sleep`, `fail`.
    pub fn with_builtins() -> Self {
        Self::new()
            .register("echo", Echo)
            .register("sleep", Sleep)
            .register("fail", Fail)
    }

    /// Adds (or replaces) the handler of `kind`.
    pub fn register(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Adds (or replaces) the handler of `kind`, given as an async closure.
    pub fn register_fn<F, Fut>(self, kind: impl Into<String>, f: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        self.register(kind, FnHandler(f))
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<_> = self.kinds().collect();
        kinds.sort_unstable();
        f.debug_struct("Registry").field("kinds", &kinds).finish()
    }
}

/// `echo`: the output is the payload.
pub struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError> {
        Ok(ctx.payload)
    }
}

/// `sleep`: `{"ms": N}` with N <= 600000; output `{"slept_ms": N}`.
pub struct Sleep;

impl Sleep {
    fn duration(payload: &Value) -> Result<u64, HandlerError> {
        let ms = payload.get("ms").ok_or_else(|| {
            HandlerError::Permanent("payload.ms: required (milliseconds to sleep)".into())
        })?;
        // Whole numbers arrive as integers; accept whole floats too (a payload
        // built by hand as JSON may hold 5.0).
        let ms = ms
            .as_u64()
            .or_else(|| {
                ms.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_SLEEP_MS as f64)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| {
                HandlerError::Permanent(format!(
                    "payload.ms: must be a whole number from 0 to {MAX_SLEEP_MS}"
                ))
            })?;
        if ms > MAX_SLEEP_MS {
            return Err(HandlerError::Permanent(format!(
                "payload.ms: must be at most {MAX_SLEEP_MS}"
            )));
        }
        Ok(ms)
    }
}

#[async_trait::async_trait]
impl Handler for Sleep {
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError> {
        let ms = Self::duration(&ctx.payload)?;
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({ "slept_ms": ms })),
            _ = ctx.cancel.cancelled() => Err(HandlerError::Retryable(format!(
                "cancelled after {} ms", started.elapsed().as_millis()
            ))),
        }
    }
}

/// `fail`: `{"message": "...", "retryable": bool}`; fails with that error.
pub struct Fail;

#[async_trait::async_trait]
impl Handler for Fail {
    async fn run(&self, ctx: JobContext) -> Result<Value, HandlerError> {
        let message = ctx
            .payload
            .get("message")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or("failed on request")
            .to_string();
        let retryable = ctx
            .payload
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Err(if retryable {
            HandlerError::Retryable(message)
        } else {
            HandlerError::Permanent(message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(kind: &str, payload: Value) -> JobContext {
        JobContext {
            id: Uuid::now_v7(),
            kind: kind.into(),
            attempt: 1,
            max_attempts: 3,
            payload,
            cancel: CancellationToken::new(),
            progress: Progress::default(),
        }
    }

    async fn run(kind: &str, payload: Value) -> Result<Value, HandlerError> {
        let registry = Registry::with_builtins();
        registry.get(kind).unwrap().run(ctx(kind, payload)).await
    }

    #[tokio::test]
    async fn echo_returns_the_payload() {
        let payload = json!({"n": 1.0, "nested": {"l": [true, null]}});
        assert_eq!(run("echo", payload.clone()).await, Ok(payload));
    }

    #[tokio::test]
    async fn sleep_sleeps_and_reports() {
        assert_eq!(
            run("sleep", json!({"ms": 5})).await,
            Ok(json!({"slept_ms": 5}))
        );
        assert_eq!(
            run("sleep", json!({"ms": 5.0})).await,
            Ok(json!({"slept_ms": 5}))
        );
    }

    #[tokio::test]
    async fn sleep_rejects_bad_durations_permanently() {
        for payload in [
            json!({}),
            json!({"ms": 600001}),
            json!({"ms": -1}),
            json!({"ms": 1.5}),
            json!({"ms": "10"}),
        ] {
            let err = run("sleep", payload.clone()).await.unwrap_err();
            assert!(!err.retryable(), "{payload}: {err}");
            assert!(err.to_string().contains("payload.ms"), "{err}");
        }
        assert_eq!(
            Sleep::duration(&json!({"ms": 600000})),
            Ok(600_000),
            "the limit itself is allowed"
        );
    }

    #[tokio::test]
    async fn sleep_stops_when_cancelled() {
        let c = ctx("sleep", json!({"ms": 600000}));
        c.cancel.cancel();
        let err = Sleep.run(c).await.unwrap_err();
        assert!(err.to_string().starts_with("cancelled"), "{err}");
    }

    #[tokio::test]
    async fn fail_fails_as_asked() {
        assert_eq!(
            run("fail", json!({"message": "boom", "retryable": true})).await,
            Err(HandlerError::Retryable("boom".into()))
        );
        assert_eq!(
            run("fail", json!({"message": "no"})).await,
            Err(HandlerError::Permanent("no".into()))
        );
    }

    #[tokio::test]
    async fn registry_finds_by_kind_and_accepts_closures() {
        let registry =
            Registry::with_builtins().register_fn("twice", |ctx: JobContext| async move {
                let n = ctx.payload["n"].as_f64().unwrap_or(0.0);
                Ok(json!({ "n": n * 2.0 }))
            });
        assert!(registry.get("nope").is_none());
        let out = registry
            .get("twice")
            .unwrap()
            .run(ctx("twice", json!({"n": 2})))
            .await;
        assert_eq!(out, Ok(json!({"n": 4.0})));
        assert_eq!(
            format!("{registry:?}"),
            r#"Registry { kinds: ["echo", "fail", "sleep", "twice"] }"#
        );
    }
}
