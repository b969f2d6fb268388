//! Recovery: messages of dead consumers are taken over, poison messages are
//! dead-lettered, and a SIGKILLed worker's job completes elsewhere.

use std::time::Duration;

use keel_proto::jobs::v1::JobStatus;
use keel_shared::queue::{CONSUMER_GROUP, FIELD_JOB_ID, dead_letter};
use keel_shared::testing::eventually;
use keel_worker::Registry;
use redis::streams::StreamRangeReply;
use serde_json::json;

use crate::support::{Env, WAIT};

#[tokio::test]
async fn a_message_delivered_too_often_is_dead_lettered_and_its_job_failed() {
    let env = Env::start().await;
    // A worker serving echo was here: echo jobs are published to its stream.
    env.announce_kinds(&["echo"]).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let stream = env.redis.config.jobs_stream("echo");
    let mut conn = env.redis().await;
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut *conn)
        .await;
    assert!(created.is_ok() || created.unwrap_err().code() == Some("BUSYGROUP"));

    let job = env.create("echo", json!({"poison": true}), 5).await;
    // A consumer that reads the message and dies before acknowledging it,
    // three times over.
    let message_id = env
        .redis
        .read_as_dead_consumer(&stream, "ghost", &job.id, WAIT)
        .await;
    for _ in 0..2 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(&stream)
            .arg(CONSUMER_GROUP)
            .arg("ghost")
            .arg(0)
            .arg(&message_id)
            .query_async(&mut *conn)
            .await
            .unwrap();
    }

    let mut config = env.worker_config();
    config.max_deliveries = 3;
    config.claim_idle_ms = 200;
    let worker = env.start_worker(config, Registry::with_builtins()).await;

    let job = env.wait_for(&job.id, JobStatus::Failed).await;
    assert_eq!(job.error, "dead-lettered after 3 deliveries");
    assert_eq!(job.attempt, 1);
    let dead: StreamRangeReply = redis::cmd("XRANGE")
        .arg(env.redis.config.dead_letter_stream())
        .arg("-")
        .arg("+")
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(dead.ids.len(), 1);
    assert_eq!(
        dead.ids[0].get::<String>(FIELD_JOB_ID).as_deref(),
        Some(job.id.as_str())
    );
    assert_eq!(
        dead.ids[0]
            .get::<String>(dead_letter::FIELD_MESSAGE_ID)
            .as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(
        dead.ids[0].get::<String>(dead_letter::FIELD_STREAM),
        Some(stream.clone()),
        "the entry names the stream it came from"
    );
    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_job_of_a_sigkilled_worker_completes_on_another_worker() {
    let env = Env::start_with(|jobs| jobs.lease_ms = 1_000).await;
    let mut child = env.spawn_binary();

    let job = env.create("sleep", json!({"ms": 3000}), 3).await;
    let running = env.wait_for(&job.id, JobStatus::Running).await;
    assert_eq!(running.attempt, 1);
    child.kill().await.expect("SIGKILL the worker");

    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let job = env.wait_for(&job.id, JobStatus::Succeeded).await;
    assert_eq!(job.attempt, 2, "the second attempt finished it");
    assert_eq!(
        keel_shared::json::struct_to_json(job.output.as_ref().unwrap()).unwrap(),
        json!({"slept_ms": 3000})
    );
    // The dead worker's message is taken over and settled too.
    env.wait_drained().await;
    let job = env.get(&job.id).await;
    assert_eq!(job.status(), JobStatus::Succeeded);
    assert_eq!(job.attempt, 2);
    worker.stop().await;
}

#[tokio::test]
async fn the_worker_recreates_its_group_when_the_stream_vanishes() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let first = env.create("echo", json!({"n": 1}), 1).await;
    env.wait_for(&first.id, JobStatus::Succeeded).await;

    // As after a Redis restart without persistence: stream and group are gone.
    let mut conn = env.redis().await;
    let _: u64 = redis::cmd("DEL")
        .arg(env.redis.config.jobs_stream("echo"))
        .query_async(&mut *conn)
        .await
        .unwrap();
    let second = env.create("echo", json!({"n": 2}), 1).await;
    env.wait_for(&second.id, JobStatus::Succeeded).await;
    worker.stop().await;
}

#[tokio::test]
async fn the_stream_is_trimmed() {
    let env = Env::start().await;
    let stream = env.redis.config.jobs_stream("echo");
    let mut conn = env.redis().await;
    // 250 entries the group has already consumed (nothing for the worker to run).
    let mut pipe = redis::pipe();
    for _ in 0..250 {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(FIELD_JOB_ID)
            .arg(uuid::Uuid::now_v7().to_string())
            .ignore();
    }
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("$")
        .ignore();
    let () = pipe.query_async(&mut *conn).await.unwrap();

    let mut config = env.worker_config();
    config.trim_interval_ms = 50;
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    // MINID ~ trims whole stream nodes (100 entries by default): what is left
    // is at most the node holding the last entry read.
    eventually(WAIT, "the stream to be trimmed", || async {
        let mut conn = env.redis().await;
        redis::cmd("XLEN")
            .arg(&stream)
            .query_async::<u64>(&mut *conn)
            .await
            .unwrap()
            <= 110
    })
    .await;
    // Jobs still run.
    let job = env.create("echo", json!({"after": "trim"}), 1).await;
    env.wait_for(&job.id, JobStatus::Succeeded).await;
    worker.stop().await;
}

#[tokio::test]
async fn trimming_never_drops_a_backlog_before_it_is_read() {
    // 400 jobs queue up in the stream while two slots work through them and
    // the stream is trimmed every 20 ms. An entry trimmed before it was read
    // would leave its job waiting for re-publication (five minutes here),
    // far beyond the wait.
    let env = Env::start().await;
    let mut config = env.worker_config();
    config.concurrency = Some(2);
    config.trim_interval_ms = 20;
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    let jobs = env
        .create_many("sleep", (0..400).map(|_| json!({"ms": 5})))
        .await;
    for job in &jobs {
        let done = env.wait_for(&job.id, JobStatus::Succeeded).await;
        assert_eq!(done.attempt, 1, "job {} was delivered again", job.id);
    }
    // Read and acknowledged, the entries go.
    let stream = env.redis.config.jobs_stream("sleep");
    eventually(WAIT, "the stream to be trimmed", || async {
        let mut conn = env.redis().await;
        redis::cmd("XLEN")
            .arg(&stream)
            .query_async::<u64>(&mut *conn)
            .await
            .unwrap()
            <= 100
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn the_dead_letter_stream_is_bounded() {
    let env = Env::start().await;
    let stream = env.redis.config.jobs_stream("echo");
    let dead = env.redis.config.dead_letter_stream();
    let mut conn = env.redis().await;
    // 250 poison entries (no valid job id): each one is dead-lettered.
    let mut pipe = redis::pipe();
    for n in 0..250 {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(FIELD_JOB_ID)
            .arg(format!("poison-{n}"))
            .ignore();
    }
    let () = pipe.query_async(&mut *conn).await.unwrap();

    let mut config = env.worker_config();
    config.dead_letter_maxlen = 10;
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    env.wait_drained().await;
    // MAXLEN ~ drops whole stream nodes only, so the bound is 10 plus at most
    // one node's entries.
    let (node_entries, length): (Vec<String>, u64) = redis::pipe()
        .cmd("CONFIG")
        .arg("GET")
        .arg("stream-node-max-entries")
        .cmd("XLEN")
        .arg(&dead)
        .query_async(&mut *conn)
        .await
        .unwrap();
    let node_entries: u64 = node_entries[1].parse().unwrap();
    assert!(
        (10..=10 + node_entries).contains(&length) && length < 250,
        "dead-letter stream has {length} entries (nodes of {node_entries})"
    );
    // The oldest go: what is kept is from the last entries dead-lettered
    // (the worker runs several at once, so not exactly in stream order).
    let kept: StreamRangeReply = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query_async(&mut *conn)
        .await
        .unwrap();
    let oldest_kept = kept
        .ids
        .iter()
        .map(|e| {
            let id = e.get::<String>(FIELD_JOB_ID).unwrap();
            id.trim_start_matches("poison-").parse::<u64>().unwrap()
        })
        .min()
        .unwrap();
    assert!(
        oldest_kept >= 100,
        "poison-{oldest_kept} was kept: the oldest entries should go first"
    );
    worker.stop().await;
}

#[tokio::test]
async fn consumers_of_stopped_workers_are_removed_unless_they_hold_messages() {
    let env = Env::start().await;
    let stream = env.redis.config.jobs_stream("echo");
    let mut conn = env.redis().await;
    let () = redis::pipe()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(FIELD_JOB_ID)
        .arg(uuid::Uuid::now_v7().to_string())
        .ignore()
        .query_async(&mut *conn)
        .await
        .unwrap();
    // "holder" read that entry and never acknowledged it; "gone" holds nothing.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(CONSUMER_GROUP)
        .arg("holder")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut *conn)
        .await
        .unwrap();
    let _: u64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("gone")
        .query_async(&mut *conn)
        .await
        .unwrap();

    let mut config = env.worker_config();
    config.consumer_ttl_ms = 300;
    config.trim_interval_ms = 50;
    config.claim_idle_ms = 600_000; // "holder" keeps its message throughout
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    let names = || async {
        let mut conn = env.redis().await;
        let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg(CONSUMER_GROUP)
            .query_async(&mut *conn)
            .await
            .unwrap();
        reply
            .consumers
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    eventually(WAIT, "the idle consumer to be removed", || async {
        !names().await.contains(&"gone".to_string())
    })
    .await;
    assert!(names().await.contains(&"holder".to_string()));
    assert_eq!(env.pending().await, 1);
    worker.stop().await;
}
