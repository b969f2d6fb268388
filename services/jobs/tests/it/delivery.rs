//! Delivery to the Redis stream: exactly once in the normal path, nothing lost
//! while Redis is down.

use std::process::Stdio;
use std::time::Duration;

use keel_proto::jobs::v1::*;
use keel_shared::config::RedisConfig;
use keel_shared::testing;
use uuid::Uuid;

use keel_jobs::delivery::PUBLISH_GRACE;
use keel_jobs::store::{NewRow, Publication, insert_jobs, mark_published};

use crate::redis_proxy::RedisProxy;
use crate::support::{Svc, WAIT, announce_kinds, stream_ids};

#[tokio::test]
async fn every_job_is_added_to_the_stream_exactly_once() {
    // A busy relay races the publish that follows each commit.
    let svc = Svc::start_with(|c| c.relay_interval_ms = 5).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(svc.create_kind("echo").await.id);
    }
    let batch = svc
        .jobs
        .clone()
        .batch_create_jobs(
            svc.u(BatchCreateJobsRequest {
                requests: (0..20)
                    .map(|_| CreateJobRequest {
                        kind: "batch".into(),
                        ..Default::default()
                    })
                    .collect(),
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .jobs;
    ids.extend(batch.into_iter().map(|j| j.id));

    svc.wait_delivered().await;
    let counts = svc.stream_counts().await;
    assert_eq!(counts.len(), ids.len());
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }

    // The workers' consumer group exists and will see every entry.
    let client = redis::Client::open(svc.redis_config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(svc.redis_config.jobs_stream("echo"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == keel_shared::queue::CONSUMER_GROUP)
    );
}

#[tokio::test]
async fn create_job_succeeds_while_redis_is_unreachable_and_the_job_waits_in_the_outbox() {
    let proxy = RedisProxy::start().await;
    proxy.refuse(true);
    let url = proxy.url.clone();
    let svc = Svc::start_with(move |c| {
        c.redis = RedisConfig::new(url, c.redis.redis_prefix.clone());
    })
    .await;
    let waiting = svc.create_kind("echo").await;
    let started = svc.create_kind("echo").await;
    assert_eq!(waiting.status(), JobStatus::Queued);
    // The relay tries (and fails) several times: the rows stay.
    let before = proxy.refused();
    testing::eventually(WAIT, "Redis refused several more connections", || async {
        proxy.refused() >= before + 3
    })
    .await;
    assert_eq!(svc.undelivered_len().await, 2);
    assert_eq!(svc.get(&waiting.id).await.status(), JobStatus::Queued);

    // Transitions still work; watchers fall back to Postgres.
    let running = svc.start_job(&started.id).await.unwrap().job.unwrap();
    assert_eq!(running.status(), JobStatus::Running);

    // Once Redis answers again, the relay publishes what waited.
    proxy.refuse(false);
    testing::eventually(WAIT, "the waiting job reaches its stream", || async {
        svc.stream_ids().await.contains(&waiting.id)
    })
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_redis(port: u16) -> Option<tokio::process::Child> {
    let child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let url = format!("redis://127.0.0.1:{port}");
    testing::eventually(WAIT, "redis-server answers", || {
        let url = url.clone();
        async move {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return false;
            };
            match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    Some(child)
}

#[tokio::test]
async fn jobs_created_while_redis_is_down_are_delivered_once_it_is_back() {
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: redis-server is not on PATH, so Redis cannot be stopped and restarted");
        return;
    }
    let port = free_port();
    let prefix = format!("keel-test:{}", Uuid::new_v4().simple());
    let redis_config = RedisConfig::new(format!("redis://127.0.0.1:{port}"), prefix);
    let svc = Svc::start_with(|c| c.redis = redis_config.clone()).await;

    // Redis up: delivered at once (a worker serving echo announced it).
    let mut redis = start_redis(port).await.expect("start redis-server");
    announce_kinds(&redis_config, &["echo"]).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let first = svc.create_kind("echo").await;
    testing::eventually(WAIT, "first job delivered", || async {
        stream_ids(&redis_config).await == vec![first.id.clone()]
    })
    .await;

    // Redis stopped: creating still works, the jobs wait in the outbox.
    redis.kill().await.unwrap();
    let _ = redis.wait().await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(svc.create_kind("echo").await.id);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (The first job's row is marked published shortly after its XADD.)
    testing::eventually(WAIT, "the three jobs left to deliver", || async {
        svc.undelivered_len().await == 3
    })
    .await;

    // Redis back (empty: it kept nothing, so the worker announces its kinds
    // again): the relay delivers each of them once.
    let _redis = start_redis(port).await.expect("restart redis-server");
    announce_kinds(&redis_config, &["echo"]).await;
    svc.wait_delivered().await;
    assert_eq!(stream_ids(&redis_config).await, waiting);
}

#[tokio::test]
async fn a_job_not_started_is_published_again_and_stops_once_started() {
    let svc = Svc::start_with(|c| c.redeliver_after_ms = 100).await;
    let job = svc.create_kind("echo").await;
    // As if Redis had lost the first entry: nobody starts it, so it comes again.
    testing::eventually(WAIT, "job re-published", || async {
        svc.stream_counts().await.get(&job.id).copied().unwrap_or(0) >= 2
    })
    .await;
    svc.start_job(&job.id).await.unwrap();
    assert_eq!(svc.outbox_len().await, 0);
}

#[tokio::test]
async fn replicas_share_the_outbox_and_the_reaper_without_double_work() {
    let svc = Svc::start_with(|c| {
        c.relay_interval_ms = 5;
        c.lease_ms = 200;
        c.reaper_interval_ms = 5;
    })
    .await;
    let replica = svc
        .replica(|c| {
            c.relay_interval_ms = 5;
            c.lease_ms = 200;
            c.reaper_interval_ms = 5;
        })
        .await;
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(svc.create_kind("echo").await.id);
        let job = replica
            .jobs
            .clone()
            .create_job(svc.u(CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        ids.push(job.id);
    }
    svc.wait_delivered().await;
    let counts = svc.stream_counts().await;
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }

    // Started through one replica; both reap; an expired lease is reaped once.
    replica
        .runner
        .clone()
        .start_job(svc.w(StartJobRequest {
            id: ids[0].clone(),
            worker_id: "w-2".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    testing::eventually(WAIT, "lease reaped", || async {
        svc.get(&ids[0]).await.status() == JobStatus::Queued
    })
    .await;
    let expired = svc
        .events(&ids[0])
        .await
        .into_iter()
        .filter(|e| e.0 == "lease_expired")
        .count();
    assert_eq!(expired, 1);
}

/// The immediate publication of a new echo job.
fn new_publication(job_id: Uuid) -> Publication {
    Publication {
        job_id,
        kind: "echo".into(),
        priority: 0,
        attempt: 0,
        traceparent: None,
    }
}

/// Inserts `n` echo jobs as CreateJob commits them, without their immediate
/// publication: what a replica that died between commit and XADD leaves.
async fn committed_unpublished(svc: &Svc, n: usize) -> Vec<Uuid> {
    let job = keel_jobs::domain::NewJob {
        kind: "echo".into(),
        payload: serde_json::json!({}),
        priority: 0,
        max_attempts: 1,
        run_at: None,
        idempotency_key: None,
        schedule_timeout: None,
        timeout: None,
    };
    let rows: Vec<NewRow<'_>> = (0..n)
        .map(|_| NewRow {
            id: Uuid::now_v7(),
            user_id: svc.user,
            job: &job,
            schedule_timeout: Duration::from_secs(3600),
            traceparent: None,
        })
        .collect();
    let client = svc.db.pool.get().await.unwrap();
    insert_jobs(&client, &rows, PUBLISH_GRACE).await.unwrap();
    rows.iter().map(|r| r.id).collect()
}

#[tokio::test]
async fn a_new_job_whose_publication_was_lost_is_published_by_the_relay_after_the_grace() {
    // A busy relay: it must still leave a new job to its creator's publisher.
    let svc = Svc::start_with(|c| c.relay_interval_ms = 5).await;
    let committed = std::time::Instant::now();
    let id = committed_unpublished(&svc, 1).await[0].to_string();

    testing::eventually(WAIT, "the relay publishes the job", || async {
        svc.stream_ids().await.contains(&id)
    })
    .await;
    assert!(
        committed.elapsed() >= PUBLISH_GRACE,
        "published after {:?}, before the grace ran out",
        committed.elapsed()
    );
    svc.wait_delivered().await;
    assert_eq!(svc.stream_counts().await.get(&id), Some(&1));
}

#[tokio::test]
async fn marking_publications_skips_a_row_a_start_holds_instead_of_deadlocking() {
    let svc = Svc::start().await;
    let ids = committed_unpublished(&svc, 2).await;
    let (a, b) = (ids[0], ids[1]);

    // A StartJob batch that has deleted b's outbox row and goes on to a.
    let mut starter = svc.db.pool.get().await.unwrap();
    let start = starter.transaction().await.unwrap();
    start
        .execute("DELETE FROM job_outbox WHERE job_id = $1", &[&b])
        .await
        .unwrap();

    // The publisher marks both: it must not wait for b (waiting, while
    // holding a, is what deadlocked with the start batch).
    let marker = svc.db.pool.get().await.unwrap();
    tokio::time::timeout(
        WAIT,
        mark_published(
            &marker,
            &[new_publication(a), new_publication(b)],
            Duration::from_secs(60),
        ),
    )
    .await
    .expect("marking waited for the row the start batch holds")
    .unwrap();

    start
        .execute("DELETE FROM job_outbox WHERE job_id = $1", &[&a])
        .await
        .expect("the start batch goes on");
    start.rollback().await.unwrap();
    let published: Vec<Uuid> = marker
        .query(
            "SELECT job_id FROM job_outbox WHERE published_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, vec![a], "a marked, b (held) skipped");
}

#[tokio::test]
async fn a_job_failed_retryably_just_after_creation_is_published_again_after_its_backoff() {
    // The retry is due in about a second (after the new job's deferred
    // "published" mark, 500 ms after its XADD); re-publication of a lost
    // entry would take ten minutes. Before the fix, that mark landed on the
    // retry's outbox row and held it for the latter.
    let svc = Svc::start_with(|c| {
        c.retry_base_ms = 1_000;
        c.retry_max_ms = 1_000;
        c.redeliver_after_ms = 600_000;
    })
    .await;
    let job = svc.create_kind("echo").await;
    testing::eventually(WAIT, "the new job is published", || async {
        svc.stream_ids().await.contains(&job.id)
    })
    .await;
    svc.start_job(&job.id).await.unwrap();
    let queued = svc.fail_job(&job.id, 1, true).await.unwrap();
    assert_eq!(queued.status(), JobStatus::Queued);

    testing::eventually(WAIT, "the retry is published to the stream", || async {
        svc.stream_counts().await.get(&job.id) == Some(&2)
    })
    .await;
    let restarted = svc.start_when_due(&job.id).await.job.unwrap();
    assert_eq!(restarted.attempt, 2);
}
