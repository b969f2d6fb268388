//! `keel dead-letters list` and `replay`, against entries a real worker
//! dead-lettered and entries written as older workers wrote them.

use keel_shared::queue::{CONSUMER_GROUP, FIELD_JOB_ID, FIELD_TRACEPARENT, dead_letter};
use keel_shared::testing::eventually;
use redis::streams::{StreamInfoGroupsReply, StreamRangeReply};
use serde_json::Value;

use crate::support::{Env, Servers, WAIT, field, parse_table};

async fn entries(env: &Env, key: &str) -> StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut *env.redis().await)
        .await
        .unwrap()
}

async fn xlen(env: &Env, key: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut *env.redis().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_job_is_listed_and_replayed_onto_its_stream() {
    let env = Env::start(Servers::NoWorker).await;
    env.sign_in("dead@example.com").await;
    let stream = env.redis.config.jobs_stream("echo");
    let dead = env.redis.config.dead_letter_stream();
    let mut conn = env.redis().await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(CONSUMER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut *conn)
        .await
        .unwrap();
    // A stream worker serving echo was here: echo jobs go to their stream.
    keel_shared::redis::announce_kinds(&mut *conn, &env.redis.config, &["echo"])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    // A consumer that reads the job's message and dies, three times over;
    // then a worker that dead-letters it after 3 deliveries.
    let job_id = field(
        &env.ok(&["jobs", "create", "echo", "--payload", r#"{"poison":true}"#])
            .await,
        "ID",
    );
    let message_id = env
        .redis
        .read_as_dead_consumer(&stream, "ghost", &job_id, WAIT)
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
    env.start_worker(|c| {
        c.max_deliveries = 3;
        c.claim_idle_ms = 200;
    })
    .await;
    eventually(WAIT, "the message to be dead-lettered", || async {
        xlen(&env, &dead).await == 1
    })
    .await;
    assert_eq!(
        field(&env.ok(&["jobs", "get", &job_id]).await, "STATUS"),
        "FAILED"
    );

    // list: a table by default, JSON with -o json.
    let (header, rows) = parse_table(&env.ok(&["dead-letters", "list"]).await);
    assert_eq!(
        header,
        ["ID", "JOB", "DELIVERIES", "CONSUMER", "REASON", "WHEN"]
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    let entry_id = rows[0][0].clone();
    assert_eq!(rows[0][1], job_id);
    assert!(rows[0][2].parse::<u64>().unwrap() > 3, "{rows:?}");
    assert_eq!(rows[0][4], "dead-lettered after 3 deliveries");
    chrono::DateTime::parse_from_rfc3339(&rows[0][5]).expect("WHEN is RFC 3339");
    let listed = env.json(&["dead-letters", "list"]).await;
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], entry_id.as_str());
    assert_eq!(listed[0]["job_id"], job_id.as_str());
    assert_eq!(listed[0]["stream"], stream.as_str());
    assert_eq!(listed[0]["message_id"], message_id.as_str());
    assert_eq!(listed[0]["consumer"], rows[0][3].as_str());

    // replay: the job id goes back on the stream, the entry goes away.
    let (header, rows) = parse_table(&env.ok(&["dead-letters", "replay", &entry_id]).await);
    assert_eq!(header, ["ID", "JOB", "RESULT"]);
    assert_eq!(rows[0][..2], [entry_id.clone(), job_id.clone()]);
    let prefix = format!("replayed to {stream} as ");
    let new_id = rows[0][2]
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{rows:?}"))
        .to_string();
    assert_eq!(xlen(&env, &dead).await, 0);
    let on_stream = entries(&env, &stream).await;
    let replayed = on_stream
        .ids
        .iter()
        .find(|e| e.id == new_id)
        .expect("the replayed entry is on the stream");
    assert_ne!(new_id, message_id);
    assert_eq!(replayed.get::<String>(FIELD_JOB_ID), Some(job_id.clone()));

    // The worker reads it, StartJob refuses the failed job, and the worker
    // acknowledges it: nothing is dead-lettered again.
    eventually(WAIT, "the replayed entry to be acknowledged", || async {
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut *env.redis().await)
            .await
            .unwrap();
        groups
            .groups
            .iter()
            .any(|g| g.name == CONSUMER_GROUP && g.pending == 0 && g.last_delivered_id == new_id)
    })
    .await;
    assert_eq!(xlen(&env, &dead).await, 0);
    assert_eq!(
        field(&env.ok(&["jobs", "get", &job_id]).await, "STATUS"),
        "FAILED"
    );

    // An entry that is gone is reported, with a failing exit.
    let again = env.keel(&["dead-letters", "replay", &entry_id]).await;
    assert!(!again.success);
    assert!(again.stdout.contains("not found"), "{}", again.stdout);
    assert!(
        again
            .stderr
            .contains(&format!("not in the dead-letter stream: {entry_id}")),
        "{}",
        again.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_uses_the_recorded_stream_skips_others_and_keeps_the_trace() {
    let env = Env::start(Servers::RedisOnly).await;
    let config = &env.redis.config;
    let dead = config.dead_letter_stream();
    let other_stream = config.jobs_stream("other");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut conn = env.redis().await;
    let add = |fields: &[(&str, &str)]| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&dead).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd
    };
    let mut pipe = redis::pipe();
    // As the worker writes them now: with the stream and the trace context.
    pipe.add_command(add(&[
        (FIELD_JOB_ID, "job-a"),
        (dead_letter::FIELD_STREAM, &other_stream),
        (FIELD_TRACEPARENT, traceparent),
        (
            dead_letter::FIELD_REASON,
            "dead-lettered after 5 deliveries",
        ),
    ]));
    // As older workers wrote them: no stream.
    pipe.add_command(add(&[
        (FIELD_JOB_ID, "job-b"),
        (dead_letter::FIELD_DELIVERIES, "6"),
    ]));
    // A stream outside this deployment's prefix is not written to.
    pipe.add_command(add(&[
        (FIELD_JOB_ID, "job-c"),
        (dead_letter::FIELD_STREAM, "elsewhere:jobs:stream"),
    ]));
    // A malformed message without a job id is left alone.
    pipe.add_command(add(&[
        (FIELD_JOB_ID, ""),
        (dead_letter::FIELD_REASON, "no valid job_id"),
    ]));
    let ids: Vec<String> = pipe.query_async(&mut *conn).await.unwrap();

    let (header, rows) = parse_table(&env.ok(&["dead-letters", "list"]).await);
    assert_eq!(header[0], "ID");
    let listed: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(listed, ids);
    assert_eq!(rows[1][2], "6");
    assert_eq!(rows[3][1], "-");
    assert_eq!(
        env.json(&["dead-letters", "list", "--limit", "2"])
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let replayed = env.json(&["dead-letters", "replay", "--all"]).await;
    let results: Vec<(String, String, String)> = replayed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let text = |v: &Value| v.as_str().unwrap_or("").to_string();
            (text(&r["id"]), text(&r["result"]), text(&r["stream"]))
        })
        .collect();
    assert_eq!(
        results,
        [
            (ids[0].clone(), "replayed".into(), other_stream.clone()),
            (ids[1].clone(), "skipped".into(), String::new()),
            (ids[2].clone(), "skipped".into(), String::new()),
            (ids[3].clone(), "skipped".into(), String::new()),
        ]
    );

    let other = entries(&env, &other_stream).await;
    assert_eq!(other.ids.len(), 1);
    assert_eq!(
        other.ids[0].get::<String>(FIELD_JOB_ID).as_deref(),
        Some("job-a")
    );
    assert_eq!(
        other.ids[0].get::<String>(FIELD_TRACEPARENT).as_deref(),
        Some(traceparent)
    );
    assert_eq!(xlen(&env, "elsewhere:jobs:stream").await, 0);
    let left: Vec<String> = entries(&env, &dead)
        .await
        .ids
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, ids[1..], "entries naming no stream of ours are left");

    // Entry ids or --all, not neither.
    assert!(!env.keel(&["dead-letters", "replay"]).await.success);
}
