//! Keel on a real Redis Cluster (three masters, one replica each, started
//! here): jobs of several kinds run end to end with WatchJob fed by
//! pub/sub, each kind's streams on its own master; and a master SIGKILLed
//! under load is replaced by its replica without losing or doubling a job.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_faults::{
    History, RedisCluster, RedisTarget, Sandbox, Service, channel, create_job, job_request,
    mixed_job, pg, report, stream_channel, tenant, wait_all_terminal,
};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{JobStatus, WatchJobRequest};
use keel_shared::config::RedisConfig;
use keel_shared::testing;
use serde_json::json;
use tokio::sync::Mutex;

const PREFIX: &str = "faults";
const KINDS: [&str; 3] = ["echo", "sleep", "fail"];

/// The statuses one WatchJob stream reported, until a terminal one (or
/// until it ended).
async fn watch_statuses(
    client: JobsServiceClient<tonic::transport::Channel>,
    token: String,
    id: String,
) -> Vec<JobStatus> {
    let mut client = client;
    let mut stream = client
        .watch_job(testing::authed(WatchJobRequest { id }, &token))
        .await
        .expect("WatchJob")
        .into_inner();
    let mut seen = Vec::new();
    while let Ok(Some(reply)) = stream.message().await {
        let status = reply.job.expect("WatchJob sends the job").status();
        seen.push(status);
        if matches!(
            status,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        ) {
            break;
        }
    }
    seen
}

/// XLEN of `stream` asked of the node on `port` itself (a plain connection:
/// a node that does not own the key answers MOVED, which fails here).
async fn xlen_on(port: u16, stream: &str) -> i64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("node connection");
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("XLEN {stream} on node {port}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_several_kinds_run_through_a_redis_cluster() {
    const PER_KIND: usize = 20;
    const WATCHED: usize = 4;
    let sandbox = Sandbox::new("redis-cluster");
    let Some(cluster) = RedisCluster::start(&sandbox).await else {
        return;
    };
    let (db, token) = tenant("redis-cluster@example.com").await;
    let target = RedisTarget {
        url: cluster.url(),
        prefix: PREFIX.into(),
    };
    let keys = RedisConfig::new(cluster.url(), PREFIX);

    // WatchJob re-reads Postgres only once a minute: the transitions it
    // reports within the test come from pub/sub through the cluster.
    let jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_WATCH_POLL_MS", 60_000)
    })
    .await;
    let _worker = Service::worker(&sandbox, jobs.addr, &target, "w", |env| {
        env.set("KEEL_WORKER_CONCURRENCY", 8)
            .set("KEEL_WORKER_TRIM_INTERVAL_MS", 3_600_000)
    });
    let client = JobsServiceClient::new(channel(jobs.addr));

    // Watched jobs first: they sleep long enough to be watched while queued
    // or running (the worker needs a moment to announce its kinds).
    let mut watchers = Vec::new();
    for _ in 0..WATCHED {
        let job = create_job(
            &client,
            &token,
            job_request("sleep", &json!({ "ms": 1_500 }), 3),
        )
        .await
        .expect("CreateJob");
        let watch_client = JobsServiceClient::new(stream_channel(jobs.addr));
        watchers.push(tokio::spawn(watch_statuses(
            watch_client,
            token.clone(),
            job.id,
        )));
    }
    let mut created = WATCHED;
    for i in 0..PER_KIND {
        for kind in KINDS {
            let request = match kind {
                "echo" => job_request("echo", &json!({ "i": i }), 3),
                "sleep" => job_request("sleep", &json!({ "ms": 20 }), 3),
                _ => job_request("fail", &json!({ "i": i }), 1),
            };
            create_job(&client, &token, request)
                .await
                .expect("CreateJob");
            created += 1;
        }
    }

    let history = pg(&db.url).await;
    wait_all_terminal(&history, created as i64).await;
    let h = History::read(&history).await;
    for watcher in watchers {
        let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .expect("WatchJob reported the end within 30 s (pub/sub through the cluster)")
            .expect("watcher");
        assert_eq!(
            seen.last(),
            Some(&JobStatus::Succeeded),
            "WatchJob saw {seen:?}"
        );
        assert!(
            seen.contains(&JobStatus::Running),
            "WatchJob saw the job running: {seen:?}"
        );
    }

    let mut masters = HashSet::new();
    let mut lengths = Vec::new();
    for kind in KINDS {
        let stream = keys.jobs_stream(kind);
        let master = cluster.master_of(&stream).await;
        let length = xlen_on(master, &stream).await;
        lengths.push((kind, master, length));
        masters.insert(master);
        assert!(
            length >= PER_KIND as i64,
            "{stream} on its master {master} has {length} entries"
        );
    }
    report!(
        "redis cluster: {created} jobs ran through a 3-master cluster, by status {:?}; \
         streams (kind, master port, entries): {lengths:?}",
        h.by_status
    );
    assert_eq!(h.count("succeeded"), (WATCHED + 2 * PER_KIND) as i64);
    assert_eq!(h.count("failed"), PER_KIND as i64);
    assert_eq!(h.succeeded_twice, 0, "no job succeeded twice");
    assert!(
        masters.len() > 1,
        "the kinds' streams spread over the masters: {lengths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_no_job() {
    const PRODUCERS: usize = 3;
    let sandbox = Sandbox::new("redis-cluster-failover");
    let Some(mut cluster) = RedisCluster::start(&sandbox).await else {
        return;
    };
    let (db, token) = tenant("redis-cluster-failover@example.com").await;
    let target = RedisTarget {
        url: cluster.url(),
        prefix: PREFIX.into(),
    };
    let keys = RedisConfig::new(cluster.url(), PREFIX);

    // Entries the killed master took with it are published again after 2 s.
    let jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_REDELIVER_AFTER_MS", 2_000)
    })
    .await;
    let mut worker = Service::worker(&sandbox, jobs.addr, &target, "w", |env| {
        env.set("KEEL_WORKER_CONCURRENCY", 8)
    });

    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let client = JobsServiceClient::new(channel(jobs.addr));
        let (token, acked, refused, stop) =
            (token.clone(), acked.clone(), refused.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                match create_job(&client, &token, mixed_job(i)).await {
                    Ok(job) => acked.lock().await.push(job.id),
                    Err(_) => *refused.lock().await += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                i += PRODUCERS;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let stream = keys.jobs_stream("echo");
    let victim = cluster.master_of(&stream).await;
    let before = acked.lock().await.len();
    let killed_at = Instant::now();
    cluster.kill(victim);
    cluster.wait_healthy(3).await;
    let failover = killed_at.elapsed();
    let promoted = cluster.master_of(&stream).await;
    assert_ne!(promoted, victim);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }

    let acked = acked.lock().await.clone();
    let history = pg(&db.url).await;
    wait_all_terminal(&history, acked.len() as i64).await;
    let done = killed_at.elapsed();
    let h = History::read(&history).await;
    report!(
        "redis cluster failover: SIGKILL of master {victim} (the echo stream's) after {before} \
         jobs; its replica {promoted} served the slots {:.1} s later (cluster-node-timeout \
         {} ms); {} CreateJob acknowledged, {} refused; {} jobs committed, by status {:?}; all \
         terminal {:.1} s after the kill; {} succeeded twice",
        failover.as_secs_f64(),
        keel_faults::NODE_TIMEOUT_MS,
        acked.len(),
        *refused.lock().await,
        h.jobs,
        h.by_status,
        done.as_secs_f64(),
        h.succeeded_twice
    );
    h.assert_every_job_succeeded_once(&history, &acked).await;
    worker.assert_alive();
}
