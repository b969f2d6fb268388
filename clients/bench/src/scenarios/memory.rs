//! The memory paths: put, get, search and workspace over a seeded corpus,
//! each against the same SQL straight on Postgres; and the corpus's words.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use keel_proto::memory::v1::{
    GetMemoryRequest, GetWorkspaceRequest, PutMemoryRequest, SearchMemoriesRequest,
};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::Ctx;
use super::drive::{Limit, authed, drive};
use crate::stats::Stats;

/// Words for realistic memory text.
const WORDS: &[&str] = &[
    "agent",
    "plan",
    "memory",
    "vector",
    "search",
    "customer",
    "invoice",
    "meeting",
    "deploy",
    "database",
    "latency",
    "budget",
    "roadmap",
    "summary",
    "contract",
    "review",
    "incident",
    "kubernetes",
    "python",
    "rust",
    "report",
    "quarter",
    "design",
    "feedback",
    "schedule",
    "travel",
    "research",
    "paper",
    "model",
    "training",
    "evaluation",
    "pipeline",
    "metric",
    "dashboard",
    "alert",
    "backup",
    "migration",
    "release",
    "ticket",
    "support",
];

pub(crate) fn text(seed: usize, words: usize) -> String {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            WORDS[x % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tag of memory-put call `i`.
pub(crate) fn tag(i: usize) -> String {
    WORDS[i % WORDS.len()].to_string()
}

/// The search query of call `i` (two corpus words).
pub(crate) fn query(i: usize) -> String {
    format!(
        "{} {}",
        WORDS[i % WORDS.len()],
        WORDS[(i * 7 + 3) % WORDS.len()]
    )
}

pub(super) async fn memory_put(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let (memory_client, put_count) = (cx.memory_client(), Arc::new(AtomicUsize::new(0)));
    let (mc, tk, count) = (memory_client.clone(), token.clone(), put_count.clone());
    let mut s = drive(
        "memory-put",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk, count) = (mc(i), tk.clone(), count.clone());
            async move {
                client
                    .put_memory(authed(
                        &tk,
                        PutMemoryRequest {
                            key: format!("put/{i:08}"),
                            content: text(i, 40),
                            tags: vec![WORDS[i % WORDS.len()].to_string()],
                            ..Default::default()
                        },
                    ))
                    .await?;
                count.fetch_max(i + 1, Ordering::Relaxed);
                Ok(())
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .put_memory(c, Duration::from_secs(opts.seconds))
            .await?,
    );
    cx.memory_puts = put_count.load(Ordering::Relaxed);
    Ok(Some(s))
}

pub(super) async fn memory_get(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let memory_client = cx.memory_client();
    let puts = cx.memory_puts.max(1);
    let (mc, tk) = (memory_client.clone(), token.clone());
    let mut s = drive(
        "memory-get",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk) = (mc(i), tk.clone());
            async move {
                let key = format!("put/{:08}", i.wrapping_mul(7919) % puts);
                match client
                    .get_memory(authed(
                        &tk,
                        GetMemoryRequest {
                            key,
                            ..Default::default()
                        },
                    ))
                    .await
                {
                    // A put that errored leaves a gap; NOT_FOUND is still a served read.
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                    Err(s) => Err(s.into()),
                }
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .get_memory(c, Duration::from_secs(opts.seconds), puts)
            .await?,
    );
    Ok(Some(s))
}

/// The hop alone: `grpc.health.v1.Health/Check` on the memory service over
/// the same connections and concurrency as memory-get, a unary call that
/// touches neither Postgres nor the token check. Next to memory-get and its
/// raw SQL it shows what one gRPC round trip costs on this machine.
pub(super) async fn memory_health(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c) = (&cx.opts, cx.opts.concurrency);
    let channels = cx.memory.clone();
    let s = drive(
        "memory-health",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let mut client = HealthClient::new(channels.get(i));
            async move {
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    Ok(Some(s))
}

/// Seeds the corpus memory-search and workspace read through the API, and
/// the same corpus for other users straight into Postgres so the indexes are
/// shared as in a real deployment (neither is measured).
pub(super) async fn seed_corpus(cx: &mut Ctx) -> Result<()> {
    let (opts, c, token) = (&cx.opts, cx.opts.concurrency, &cx.token);
    let memory_client = cx.memory_client();
    let (mc, tk) = (memory_client.clone(), token.clone());
    let seeded = drive("seed", c, Limit::Ops(opts.search_corpus), move |i| {
        let (mut client, tk) = (mc(i), tk.clone());
        async move {
            client
                .put_memory(authed(
                    &tk,
                    PutMemoryRequest {
                        key: format!("corpus/{i:08}"),
                        content: text(i + 1_000_003, 60),
                        tags: vec![
                            WORDS[i % WORDS.len()].to_string(),
                            WORDS[(i / 7) % WORDS.len()].to_string(),
                        ],
                        ..Default::default()
                    },
                ))
                .await?;
            Ok(())
        }
    })
    .await;
    println!(
        "seeded {} memories in {:.1}s ({} errors)",
        seeded.ops,
        seeded.elapsed.as_secs_f64(),
        seeded.errors
    );
    let started = Instant::now();
    let others = cx
        .baseline
        .seed_other_users(cx.opts.search_other_users, cx.opts.search_corpus)
        .await?;
    println!(
        "seeded {others} memories for {} other users in {:.1}s",
        cx.opts.search_other_users,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(super) async fn memory_search(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let memory_client = cx.memory_client();
    let (mc, tk) = (memory_client.clone(), token.clone());
    let mut s = drive(
        "memory-search",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk) = (mc(i), tk.clone());
            async move {
                let query = query(i);
                client
                    .search_memories(authed(
                        &tk,
                        SearchMemoriesRequest {
                            query,
                            limit: 10,
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.note = format!(
        "{} corpus (+{} other users' alike), limit 10 {}",
        opts.search_corpus, opts.search_other_users, s.note
    );
    s.baseline_ops_per_sec = Some(
        baseline
            .search(c, Duration::from_secs(opts.seconds))
            .await?,
    );
    Ok(Some(s))
}

pub(super) async fn workspace(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let memory_client = cx.memory_client();
    let (mc, tk) = (memory_client.clone(), token.clone());
    let mut s = drive(
        "workspace",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk) = (mc(i), tk.clone());
            async move {
                client
                    .get_workspace(authed(
                        &tk,
                        GetWorkspaceRequest {
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .workspace(c, Duration::from_secs(opts.seconds))
            .await?,
    );
    Ok(Some(s))
}
