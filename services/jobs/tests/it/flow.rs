//! Flow control per kind (max_running, rate_per_second) from the operator's
//! file, re-read while running; and fairness between users in dispatch.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::join_all;
use keel_proto::jobs::v1::*;
use keel_shared::queue::{Band, CONSUMER_GROUP};
use keel_shared::testing::{self, TestDb, TestRedis};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::support::{Svc, WAIT, WORKER_TOKEN};

/// A limits file in a directory of its own (removed on drop).
struct LimitsFile {
    dir: PathBuf,
    path: PathBuf,
}

impl LimitsFile {
    fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-flow-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = Self {
            path: dir.join("flow.toml"),
            dir,
        };
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        // Written aside and renamed, so the service never reads half a file.
        let tmp = self.dir.join("flow.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LimitsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_limited(file: &LimitsFile) -> Svc {
    let path = file.path().to_path_buf();
    Svc::start_with(|c| c.flow_control_file = Some(path)).await
}

/// Creates `n` jobs of `kind` (no stream worker serves it: tests start them).
async fn create_many(svc: &Svc, kind: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(svc.create_kind(kind).await.id);
    }
    ids
}

fn start_request(id: &str, worker: &str) -> StartJobRequest {
    StartJobRequest {
        id: id.to_string(),
        worker_id: worker.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn max_running_holds_across_concurrent_starters_and_two_servers() {
    let file = LimitsFile::new("[kinds.limited]\nmax_running = 3\n");
    let svc = start_limited(&file).await;
    let path = file.path().to_path_buf();
    let replica = svc.replica(|c| c.flow_control_file = Some(path)).await;
    let ids = create_many(&svc, "limited", 20).await;

    // Every job started twice over, half through each server, all at once.
    let calls = ids.iter().chain(&ids).enumerate().map(|(i, id)| {
        let mut runner = if i % 2 == 0 {
            svc.runner.clone()
        } else {
            replica.runner.clone()
        };
        let request = svc.w(start_request(id, &format!("w{i}")));
        async move { runner.start_job(request).await }
    });
    let outcomes = join_all(calls).await;
    let started: Vec<&StartJobResponse> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().map(|r| r.get_ref()))
        .collect();
    assert_eq!(started.len(), 3, "{outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        match refused.code() {
            Code::ResourceExhausted => {
                let m = refused.message();
                assert!(
                    m.starts_with("flow control: kind \"limited\"") && m.contains("max_running"),
                    "{m}"
                );
                assert!(m.ends_with(" ms"), "names a retry delay: {m}");
            }
            // The second start of a job that started meanwhile.
            Code::FailedPrecondition => {}
            other => panic!("unexpected refusal {other:?}: {refused:?}"),
        }
    }

    // One finishes: exactly one more may start.
    let done = started[0].job.as_ref().unwrap();
    svc.complete_job(&done.id, done.attempt, false)
        .await
        .unwrap();
    let mut more = 0;
    for id in &ids {
        if svc.start_job(id).await.is_ok() {
            more += 1;
        }
    }
    assert_eq!(more, 1);

    // An unlimited kind is not held back.
    let free = svc.create_kind("unlimited").await;
    svc.start_job(&free.id)
        .await
        .expect("an unlimited kind starts");
}

#[tokio::test]
async fn the_rate_limit_bounds_starts_per_window() {
    let file = LimitsFile::new("[kinds.rated]\nrate_per_second = 4.0\nburst = 2\n");
    let svc = start_limited(&file).await;
    let ids = create_many(&svc, "rated", 40).await;
    let began = Instant::now();
    let mut started = 0usize;
    let mut refused = 0usize;
    let mut pending: Vec<&String> = ids.iter().collect();
    while began.elapsed() < Duration::from_millis(1_500) && !pending.is_empty() {
        let mut left = Vec::new();
        for id in pending {
            match svc.start_job(id).await {
                Ok(_) => started += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status
                            .message()
                            .contains("rate limit of 4 starts per second")
                    );
                    refused += 1;
                    left.push(id);
                }
            }
        }
        pending = left;
    }
    let window = began.elapsed().as_secs_f64();
    // A burst of 2, then 4 a second: generous room for slow machines'
    // rounding, far below the 40 an unlimited kind would start.
    let most = 2.0 + 4.0 * window + 2.0;
    assert!(started >= 2, "the burst starts at once: {started}");
    assert!(
        (started as f64) <= most,
        "{started} starts in {window:.2} s (at most {most:.1})"
    );
    assert!(refused > 0);
}

#[tokio::test]
async fn claim_jobs_takes_no_more_than_the_limits_allow() {
    let file = LimitsFile::new("[kinds.claimed]\nmax_running = 2\n");
    let svc = start_limited(&file).await;
    create_many(&svc, "claimed", 5).await;
    let free = svc.create_kind("claimed.free").await;
    let claim = |max_jobs: i32| ClaimJobsRequest {
        worker_id: "claimer".into(),
        kinds: vec!["claimed".into(), "claimed.free".into()],
        max_jobs,
        wait: None,
    };
    let first = svc
        .runner
        .clone()
        .claim_jobs(svc.w(claim(10)))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let kinds: Vec<String> = first
        .iter()
        .map(|c| c.job.as_ref().unwrap().kind.clone())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "claimed").count(),
        2,
        "{kinds:?}"
    );
    assert!(first.iter().any(|c| c.job.as_ref().unwrap().id == free.id));

    // At the limit: nothing more (and no error) until one finishes.
    let none = svc
        .runner
        .clone()
        .claim_jobs(svc.w(claim(10)))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(none.is_empty(), "{none:?}");
    let done = first
        .iter()
        .map(|c| c.job.as_ref().unwrap())
        .find(|j| j.kind == "claimed")
        .unwrap();
    svc.complete_job(&done.id, done.attempt, false)
        .await
        .unwrap();
    let next = svc
        .runner
        .clone()
        .claim_jobs(svc.w(claim(10)))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(next.len(), 1, "{next:?}");
}

/// Starts each of `ids` not yet started; the ones it started now.
async fn start_all(svc: &Svc, ids: &[String]) -> Vec<String> {
    let mut started = Vec::new();
    for id in ids {
        if svc.start_job(id).await.is_ok() {
            started.push(id.clone());
        }
    }
    started
}

#[tokio::test]
async fn changed_limits_apply_without_restart_and_a_bad_file_keeps_the_last_good() {
    let file = LimitsFile::new("[kinds.tuned]\nmax_running = 1\n");
    let svc = start_limited(&file).await;
    let ids = create_many(&svc, "tuned", 6).await;
    let mut running = start_all(&svc, &ids).await;
    assert_eq!(running.len(), 1);

    file.write("[kinds.tuned]\nmax_running = 3\n");
    let deadline = Instant::now() + WAIT;
    while running.len() < 3 && Instant::now() < deadline {
        running.extend(start_all(&svc, &ids).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running.len(), 3, "the raised limit applies");

    // A bad file: the limit of 3 stays (it is neither dropped nor lowered).
    file.write("[kinds.tuned]\nmax_running = -1\n");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(start_all(&svc, &ids).await, Vec::<String>::new());
    // Which jobs started depends on when the new file was read; any job
    // still queued is held back, saying why.
    let queued = ids.iter().find(|id| !running.contains(id)).unwrap();
    let held = svc.start_job(queued).await.unwrap_err();
    assert_eq!(held.code(), Code::ResourceExhausted);
    assert!(
        held.message().contains("3 running jobs"),
        "{}",
        held.message()
    );

    // Removing the kind's entry lifts its limit.
    file.write("# no limits\n");
    let deadline = Instant::now() + WAIT;
    while running.len() < 6 && Instant::now() < deadline {
        running.extend(start_all(&svc, &ids).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running.len(), 6);
}

#[tokio::test]
async fn a_bad_limits_file_at_startup_is_refused_naming_it() {
    let file = LimitsFile::new("[kinds.echo]\nrate_per_second = -2\n");
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (listener, addr) = testing::listener().await;
    let mut config = keel_jobs::Config::new(
        addr,
        db.config(),
        redis.config.clone(),
        testing::verifier_config(),
        WORKER_TOKEN,
    );
    config.flow_control_file = Some(file.path().to_path_buf());
    let err = keel_jobs::run(config, listener, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("KEEL_FLOW_CONTROL_FILE"), "{err}");
    assert!(err.contains("kinds.echo.rate_per_second"), "{err}");
}

/// Reads up to `count` new entries of the echo stream as a worker would and
/// starts and completes each job; returns their ids in start order.
async fn work_echo(
    svc: &Svc,
    conn: &mut redis::aio::MultiplexedConnection,
    count: usize,
) -> Vec<String> {
    let stream = svc.redis_config.jobs_band_stream("echo", Band::Normal);
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(CONSUMER_GROUP)
        .arg("test-worker")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(200)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap_or_default();
    let mut started = Vec::new();
    for key in reply.keys {
        for entry in key.ids {
            let id: String = entry.get("job_id").unwrap();
            if let Ok(r) = svc.start_job(&id).await {
                let job = r.job.unwrap();
                svc.complete_job(&job.id, job.attempt, false).await.unwrap();
                started.push(job.id);
            }
        }
    }
    started
}

#[tokio::test]
async fn a_users_job_starts_before_another_users_backlog_is_half_done() {
    let svc = Svc::start_with(|c| c.stream_backlog = 20).await;
    let client = redis::Client::open(svc.redis_config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    // User A: 2,000 queued echo jobs.
    let mut a_ids = Vec::new();
    for _ in 0..2 {
        let requests = (0..1000)
            .map(|_| CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            })
            .collect();
        let created = svc
            .jobs
            .clone()
            .batch_create_jobs(svc.u(BatchCreateJobsRequest { requests }))
            .await
            .unwrap()
            .into_inner()
            .jobs;
        a_ids.extend(created.into_iter().map(|j| j.id));
    }
    // A's backlog starts draining ...
    let mut order = Vec::new();
    let deadline = Instant::now() + WAIT;
    while order.len() < 100 && Instant::now() < deadline {
        order.extend(work_echo(&svc, &mut conn, 10).await);
    }
    assert!(
        order.len() >= 100,
        "A's jobs are delivered: {}",
        order.len()
    );

    // ... when user B creates one job.
    let (_, b_token) = svc.other_user().await;
    let b = svc.create_kind_as("echo", &b_token).await;
    let deadline = Instant::now() + WAIT;
    while !order.contains(&b.id) && Instant::now() < deadline {
        order.extend(work_echo(&svc, &mut conn, 10).await);
    }
    let place = order
        .iter()
        .position(|id| *id == b.id)
        .expect("B's job started");
    let a_before = order[..place].len();
    assert!(
        a_before < a_ids.len() / 2,
        "B's job started after {a_before} of A's {} jobs",
        a_ids.len()
    );
    // Behind at most what was already in the stream, plus a few turns.
    assert!(
        a_before <= 100 + 20 + 20,
        "B's job waited behind {a_before} of A's jobs"
    );
}
