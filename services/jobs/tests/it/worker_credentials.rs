//! Named worker credentials (KEEL_WORKER_CREDENTIALS_FILE): a worker records
//! only under its own name, and removing its line revokes it without a restart.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use keel_proto::jobs::v1::*;
use keel_shared::testing::{self, TestDb, TestRedis, authed};
use keel_shared::worker_credentials::new_credential;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

use crate::support::{Svc, WAIT, WORKER_TOKEN, code};

/// A credentials file in a directory of its own, removed on drop.
struct CredentialsFile {
    dir: PathBuf,
}

impl CredentialsFile {
    fn new(lines: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-creds-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = Self { dir };
        file.write(lines);
        file
    }

    fn path(&self) -> PathBuf {
        self.dir.join("workers")
    }

    /// Replaces the file at once (write then rename), as a secret mount does.
    fn write(&self, lines: &[&str]) {
        let tmp = self.dir.join("workers.tmp");
        std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}

impl Drop for CredentialsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn with_credentials(file: &Path) -> Svc {
    let file = file.to_path_buf();
    Svc::start_with(move |c| {
        c.worker_token = None;
        c.worker_credentials_file = Some(file);
    })
    .await
}

fn start(id: &str, worker_id: &str) -> StartJobRequest {
    StartJobRequest {
        id: id.into(),
        worker_id: worker_id.into(),
        delivery_id: String::new(),
    }
}

#[tokio::test]
async fn a_named_worker_cannot_record_under_another_name() {
    let (builder, builder_line) = new_credential("builder").unwrap();
    let (_, runner_line) = new_credential("runner").unwrap();
    let file = CredentialsFile::new(&[&builder_line, &runner_line]);
    let s = with_credentials(&file.path()).await;
    let job = s.create_kind("pyjob").await;
    let runner = || s.runner.clone();

    // The shared token is not configured, so it is no credential at all.
    let legacy = runner().start_job(s.w(start(&job.id, "w-1"))).await;
    assert_eq!(code(legacy), Code::Unauthenticated);

    for other in ["runner", "builder-2", "builderx/1", "", "runner/builder"] {
        let denied = runner()
            .start_job(authed(start(&job.id, other), &builder))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{other:?}");
        assert!(denied.message().starts_with("worker_id"), "{denied:?}");
    }
    let batch = runner()
        .start_jobs(authed(
            StartJobsRequest {
                requests: vec![start(&job.id, "runner")],
            },
            &builder,
        ))
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].outcome {
        Some(start_job_result::Outcome::Error(e)) => {
            assert_eq!(e.code, Code::PermissionDenied as i32, "{e:?}")
        }
        other => panic!("started under another name: {other:?}"),
    }
    let claim = runner()
        .claim_jobs(authed(
            ClaimJobsRequest {
                worker_id: "runner".into(),
                kinds: vec!["pyjob".into()],
                max_jobs: 1,
                wait: Some(prost_types::Duration::default()),
            },
            &builder,
        ))
        .await;
    assert_eq!(code(claim), Code::PermissionDenied);
    assert_eq!(s.get(&job.id).await.status, JobStatus::Queued as i32);
    assert!(s.events(&job.id).await.iter().all(|e| e.0 == "created"));

    // Under its own name (or name/...), it works.
    let started = runner()
        .start_job(authed(start(&job.id, "builder/host-1"), &builder))
        .await
        .expect("start as builder/host-1")
        .into_inner();
    let attempt = started.job.unwrap().attempt;
    let heartbeat = runner()
        .heartbeat(authed(
            HeartbeatRequest {
                id: job.id.clone(),
                attempt,
                worker_id: "runner".into(),
                progress: None,
            },
            &builder,
        ))
        .await;
    assert_eq!(code(heartbeat), Code::PermissionDenied);
    let fail = runner()
        .fail_job(authed(
            FailJobRequest {
                id: job.id.clone(),
                attempt,
                error: "framed".into(),
                retryable: false,
                worker_id: "runner".into(),
            },
            &builder,
        ))
        .await;
    assert_eq!(code(fail), Code::PermissionDenied);
    let complete_as_other = runner()
        .complete_job(authed(
            CompleteJobRequest {
                id: job.id.clone(),
                attempt,
                worker_id: "runner".into(),
                ..Default::default()
            },
            &builder,
        ))
        .await;
    assert_eq!(code(complete_as_other), Code::PermissionDenied);
    assert_eq!(s.get(&job.id).await.status, JobStatus::Running as i32);
    runner()
        .complete_job(authed(
            CompleteJobRequest {
                id: job.id.clone(),
                attempt,
                worker_id: "builder".into(),
                ..Default::default()
            },
            &builder,
        ))
        .await
        .expect("complete as builder");
    let history = s
        .jobs
        .clone()
        .get_job_history(s.u(GetJobHistoryRequest { id: job.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let workers: Vec<&str> = history
        .iter()
        .map(|e| e.worker_id.as_str())
        .filter(|w| !w.is_empty())
        .collect();
    assert_eq!(workers, ["builder/host-1", "builder"], "{history:?}");

    // A user's token on the runner service is still PERMISSION_DENIED.
    let as_user = runner().start_job(s.u(start(&job.id, "builder"))).await;
    assert_eq!(code(as_user), Code::PermissionDenied);
}

/// Whether the runner service accepts `token` (a call about an unknown job
/// gets past authentication as NOT_FOUND).
async fn accepted(s: &Svc, token: &str, worker_id: &str) -> Result<(), Code> {
    let got = s
        .runner
        .clone()
        .start_job(authed(
            start(&uuid::Uuid::now_v7().to_string(), worker_id),
            token,
        ))
        .await;
    match got {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status.code()),
        Ok(_) => panic!("started a job that does not exist"),
    }
}

#[tokio::test]
async fn removing_a_line_revokes_that_worker_without_a_restart() {
    let (builder, builder_line) = new_credential("builder").unwrap();
    let (runner, runner_line) = new_credential("runner").unwrap();
    let file = CredentialsFile::new(&["# fleet", &builder_line, &runner_line]);
    let s = with_credentials(&file.path()).await;
    assert_eq!(accepted(&s, &builder, "builder").await, Ok(()));
    assert_eq!(accepted(&s, &runner, "runner").await, Ok(()));
    let wrong_secret = format!("builder:{}", runner.split_once(':').unwrap().1);
    assert_eq!(
        accepted(&s, &wrong_secret, "builder").await,
        Err(Code::Unauthenticated)
    );

    file.write(&["# fleet", &runner_line]);
    testing::eventually(WAIT, "the removed credential refused", || async {
        accepted(&s, &builder, "builder").await == Err(Code::Unauthenticated)
    })
    .await;
    assert_eq!(accepted(&s, &runner, "runner").await, Ok(()));

    // Rotation: a new secret for the same name; the old one stays refused.
    // A malformed line on reload is skipped, the others still count.
    let (rotated, rotated_line) = new_credential("builder").unwrap();
    file.write(&[&rotated_line, "garbage line", &runner_line]);
    testing::eventually(WAIT, "the rotated credential accepted", || async {
        accepted(&s, &rotated, "builder").await == Ok(())
    })
    .await;
    assert_eq!(
        accepted(&s, &builder, "builder").await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(accepted(&s, &runner, "runner").await, Ok(()));
}

#[tokio::test]
async fn a_malformed_file_stops_start_up_naming_the_line_not_its_content() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (_, good) = new_credential("good").unwrap();
    let file = CredentialsFile::new(&[&good, "leaky:supersecretvalue"]);
    let (listener, addr) = testing::listener().await;
    let mut config = keel_jobs::Config::new(
        addr,
        db.config(),
        redis.config.clone(),
        testing::verifier_config(),
        WORKER_TOKEN,
    );
    config.worker_credentials_file = Some(file.path());
    let err = keel_jobs::run(config, listener, Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("KEEL_WORKER_CREDENTIALS_FILE"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!err.contains("supersecretvalue"), "{err}");
}

#[tokio::test]
async fn worker_secrets_never_reach_the_logs() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (worker, credential_line) = new_credential("logged").unwrap();
    let secret = worker.split_once(':').unwrap().1.to_string();
    let file = CredentialsFile::new(&[&credential_line]);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-jobs"))
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis.config.redis_url)
        .env("KEEL_REDIS_PREFIX", &redis.config.redis_prefix)
        .env(
            "KEEL_JWT_PUBLIC_KEY_FILES",
            &testing::keys().public_key_file,
        )
        .env("KEEL_JOBS_ADDR", "127.0.0.1:0")
        .env("KEEL_WORKER_CREDENTIALS_FILE", file.path())
        .env_remove("KEEL_WORKER_TOKEN")
        .env_remove("KEEL_METRICS_ADDR")
        .env("KEEL_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    let serving = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("keel-jobs serving"))
            .cloned()
    };
    testing::eventually(WAIT * 2, "keel-jobs serving", || async {
        serving().is_some()
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(&serving().unwrap()).unwrap();
    let addr = line["addr"]
        .as_str()
        .unwrap()
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .unwrap();
    let mut runner =
        job_runner_service_client::JobRunnerServiceClient::new(testing::channel(addr).await);
    let unknown = uuid::Uuid::now_v7().to_string();
    for (token, worker_id) in [
        (worker.clone(), "logged"),
        (worker.clone(), "someone-else"),
        (format!("logged:{secret}x"), "logged"),
    ] {
        let _ = runner
            .start_job(authed(start(&unknown, worker_id), &token))
            .await;
    }
    // A reload with a malformed line that looks like a secret.
    file.write(&[&credential_line, &format!("oops {secret}")]);
    testing::eventually(WAIT, "the reload logged", || async {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("line ignored"))
    })
    .await;
    child.kill().await.unwrap();
    let text = lines.lock().unwrap().join("\n");
    assert!(!text.contains(&secret), "a worker secret reached the logs");
}
