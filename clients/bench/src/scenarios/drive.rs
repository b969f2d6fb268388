//! What every scenario shares: driving an operation from many tasks and
//! timing it, counting errors, connections and authenticated requests.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use tonic::transport::Channel;

use crate::stats::Stats;

pub(crate) enum Limit {
    Ops(usize),
    Time(std::time::Duration),
}

/// Runs `op(i)` from `concurrency` tasks until the limit, timing each call.
pub(crate) async fn drive<F, Fut>(name: &str, concurrency: usize, limit: Limit, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Errors::default());
    let started = Instant::now();
    let deadline = match limit {
        Limit::Time(d) => Some(started + d),
        Limit::Ops(_) => None,
    };
    let total = match limit {
        Limit::Ops(n) => n,
        Limit::Time(_) => usize::MAX,
    };
    let tasks = (0..concurrency).map(|_| {
        let (op, next, errors) = (op.clone(), next.clone(), errors.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(e) => errors.record(format!("{e:#}")),
                }
            }
            latencies
        })
    });
    let mut latencies_us = Vec::new();
    for t in futures::future::join_all(tasks).await {
        latencies_us.extend(t.expect("bench task"));
    }
    let elapsed = started.elapsed();
    Stats {
        name: name.to_string(),
        ops: latencies_us.len(),
        errors: errors.count(),
        elapsed,
        latencies_us,
        baseline_ops_per_sec: None,
        note: errors.first().unwrap_or_default(),
        cpu_us_per_job: Vec::new(),
        servers_per_job: None,
    }
}

/// Errors seen by concurrent tasks: how many, and the first one's text.
#[derive(Default)]
pub(crate) struct Errors {
    count: AtomicUsize,
    first: Mutex<Option<String>>,
}

impl Errors {
    pub(crate) fn record(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().unwrap().get_or_insert(error);
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// "first error: ..." when there was one.
    pub(crate) fn first(&self) -> Option<String> {
        let first = self.first.lock().unwrap();
        first.as_ref().map(|e| format!("first error: {e}"))
    }
}

pub(crate) fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

pub(crate) async fn channel(addr: &str) -> Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// Several HTTP/2 connections to one service, so one connection's stream
/// limit is not the bottleneck; call `i` goes over connection `i % n`.
#[derive(Clone)]
pub(crate) struct Channels(Arc<[Channel]>);

impl Channels {
    pub(crate) async fn connect(addr: &str, n: usize) -> Result<Self> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(channel(addr).await?);
        }
        Ok(Self(out.into()))
    }

    pub(crate) fn get(&self, i: usize) -> Channel {
        self.0[i % self.0.len()].clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}
