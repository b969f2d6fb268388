//! Security matrix for JobsService and JobRunnerService:
//! another user's token finds nothing and changes nothing on every RPC;
//! forged, expired, wrong-key, `alg: none`, misaddressed and garbage tokens
//! are UNAUTHENTICATED everywhere; user tokens cannot drive the runner; SQL
//! metacharacters are data. Login brute force is rate limited: see
//! `services/auth/tests/it/login.rs`
//! (`repeated_failures_are_rate_limited_until_the_window_passes`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_proto::jobs::v1::*;
use keel_shared::auth::AccessClaims;
use keel_shared::json::json_to_struct;
use keel_shared::testing::fuzz::{assert_tables_exist, report};
use keel_shared::testing::tokens::{self, claims};
use keel_shared::testing::{self, authed};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::hostile::snapshot;
use crate::support::Svc;

#[track_caller]
fn assert_code<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, code: Code) {
    match result {
        Err(s) if s.code() == code => {}
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// Every RPC of both services with `token`, each answer's code in order:
/// GetJob, CancelJob, WatchJob, ListJobs, CreateJob, BatchCreateJobs,
/// StartJob, Heartbeat, CompleteJob, FailJob, StartJobs, CompleteJobs.
async fn every_rpc(svc: &Svc, token: &str, job_id: &str) -> Vec<(&'static str, Code)> {
    every_rpc_raw_header(svc, &format!("Bearer {token}"), job_id).await
}

/// The JobRunnerService RPCs with `token`.
async fn runner_rpcs(svc: &Svc, token: &str, job_id: &str) -> Vec<(&'static str, Code)> {
    runner_rpcs_raw_header(svc, &format!("Bearer {token}"), job_id).await
}

/// Tokens that must not pass, each named, all claiming to be `user`.
pub(crate) fn bad_tokens(user: Uuid) -> Vec<(&'static str, Option<String>)> {
    let signer = &testing::keys().signer;
    let good = signer.sign_claims(&claims(user));
    let flipped = tokens::forged_signature(&good);
    let swapped_payload = {
        let parts: Vec<&str> = good.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&AccessClaims {
                sub: Uuid::now_v7().to_string(),
                ..claims(user)
            })
            .unwrap(),
        );
        format!("{}.{other}.{}", parts[0], parts[2])
    };
    let expired = tokens::expired(signer, claims(user));
    let wrong_key = tokens::wrong_key(&claims(user));
    let alg_none = tokens::unsigned("none", signer.key_id(), &claims(user), "");
    let hs256_with_kid = tokens::unsigned(
        "HS256",
        signer.key_id(),
        &claims(user),
        &URL_SAFE_NO_PAD.encode([7u8; 32]),
    );
    let wrong_audience = tokens::wrong_audience(signer, claims(user));
    let wrong_issuer = tokens::wrong_issuer(signer, claims(user));
    let not_a_uuid = tokens::with_subject(signer, claims(user), "'; DROP TABLE jobs; --");
    vec![
        ("forged signature", Some(flipped)),
        ("swapped payload", Some(swapped_payload)),
        ("expired", Some(expired)),
        ("wrong key", Some(wrong_key)),
        ("alg none", Some(alg_none)),
        ("HS256 with our kid", Some(hs256_with_kid)),
        ("wrong audience", Some(wrong_audience)),
        ("wrong issuer", Some(wrong_issuer)),
        ("subject not a UUID", Some(not_a_uuid)),
        ("garbage", Some("not-a-jwt".into())),
        ("empty", Some(String::new())),
        ("missing", None),
    ]
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_on_every_rpc_and_change_nothing() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let before = snapshot(&svc.db).await;
    let mut calls = 0;
    for (what, token) in bad_tokens(svc.user) {
        let answers = match &token {
            Some(t) if !t.is_empty() => every_rpc(&svc, t, &job.id).await,
            // No header, or `Bearer ` with nothing after it.
            Some(_) => every_rpc_raw_header(&svc, "Bearer ", &job.id).await,
            None => every_rpc_raw_header(&svc, "", &job.id).await,
        };
        for (rpc, code) in answers {
            calls += 1;
            assert_eq!(code, Code::Unauthenticated, "{what} token on {rpc}");
        }
    }
    // Other schemes are not bearer tokens.
    let good = testing::user_token(svc.user, "user@example.com");
    for header in [
        format!("Basic {good}"),
        good.clone(),
        format!("Bearer{good}"),
    ] {
        for (rpc, code) in every_rpc_raw_header(&svc, &header, &job.id).await {
            calls += 1;
            assert_eq!(code, Code::Unauthenticated, "{header:.12} on {rpc}");
        }
    }
    assert_eq!(snapshot(&svc.db).await, before);
    assert_eq!(svc.get(&job.id).await, job);
    report(&format!(
        "jobs bad tokens: {calls} calls, all UNAUTHENTICATED"
    ));
}

/// A request with the authorization header set to `header` as is (none
/// when empty).
fn with<T>(message: T, header: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if !header.is_empty() {
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
    }
    req
}

/// `every_rpc` with the authorization header set to `header` as is.
async fn every_rpc_raw_header(svc: &Svc, header: &str, job_id: &str) -> Vec<(&'static str, Code)> {
    let mut jobs = svc.jobs.clone();
    let id = || job_id.to_string();
    let code = |r: Result<(), Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    let create = || CreateJobRequest {
        kind: "echo".into(),
        ..Default::default()
    };
    let mut answers = vec![
        (
            "GetJob",
            code(
                jobs.get_job(with(GetJobRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CancelJob",
            code(
                jobs.cancel_job(with(CancelJobRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "WatchJob",
            code(
                jobs.watch_job(with(WatchJobRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetJobHistory",
            code(
                jobs.get_job_history(with(GetJobHistoryRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "RetryJob",
            code(
                jobs.retry_job(with(RetryJobRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "DeleteJob",
            code(
                jobs.delete_job(with(DeleteJobRequest { id: id() }, header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListJobs",
            code(
                jobs.list_jobs(with(ListJobsRequest::default(), header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CreateJob",
            code(jobs.create_job(with(create(), header)).await.map(|_| ())),
        ),
        (
            "BatchCreateJobs",
            code(
                jobs.batch_create_jobs(with(
                    BatchCreateJobsRequest {
                        requests: vec![create()],
                    },
                    header,
                ))
                .await
                .map(|_| ()),
            ),
        ),
    ];
    answers.extend(runner_rpcs_raw_header(svc, header, job_id).await);
    answers
}

/// `runner_rpcs` with the authorization header set to `header` as is.
async fn runner_rpcs_raw_header(
    svc: &Svc,
    header: &str,
    job_id: &str,
) -> Vec<(&'static str, Code)> {
    let mut runner = svc.runner.clone();
    let id = || job_id.to_string();
    let code = |r: Result<(), Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    vec![
        (
            "StartJob",
            code(
                runner
                    .start_job(with(
                        StartJobRequest {
                            id: id(),
                            worker_id: "w".into(),
                            ..Default::default()
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Heartbeat",
            code(
                runner
                    .heartbeat(with(
                        HeartbeatRequest {
                            id: id(),
                            attempt: 1,
                            ..Default::default()
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CompleteJob",
            code(
                runner
                    .complete_job(with(
                        CompleteJobRequest {
                            id: id(),
                            attempt: 1,
                            ..Default::default()
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "FailJob",
            code(
                runner
                    .fail_job(with(
                        FailJobRequest {
                            id: id(),
                            attempt: 1,
                            ..Default::default()
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "StartJobs",
            code(
                runner
                    .start_jobs(with(
                        StartJobsRequest {
                            requests: vec![StartJobRequest {
                                id: id(),
                                worker_id: "w".into(),
                                ..Default::default()
                            }],
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CompleteJobs",
            code(
                runner
                    .complete_jobs(with(
                        CompleteJobsRequest {
                            requests: vec![CompleteJobRequest {
                                id: id(),
                                attempt: 1,
                                ..Default::default()
                            }],
                        },
                        header,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ),
    ]
}

#[tokio::test]
async fn another_users_token_finds_nothing_and_changes_nothing_on_any_rpc() {
    let svc = Svc::start().await;
    let secret = json_to_struct(&serde_json::json!({"secret": "alice's"}));
    let queued = svc
        .create(CreateJobRequest {
            kind: "echo".into(),
            payload: Some(secret.clone()),
            idempotency_key: "shared-key".into(),
            ..Default::default()
        })
        .await;
    let running = svc.create_kind("sleep").await;
    svc.start_job(&running.id).await.expect("start");
    let running = svc.get(&running.id).await;
    let alice_list = svc
        .jobs
        .clone()
        .list_jobs(svc.u(ListJobsRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let before = snapshot(&svc.db).await;
    let (bob_id, bob) = svc.other_user().await;

    for job in [&queued, &running] {
        let answers = every_rpc(&svc, &bob, &job.id).await;
        let want = |rpc: &str| match rpc {
            "GetJob" | "CancelJob" | "WatchJob" | "GetJobHistory" | "RetryJob" | "DeleteJob" => {
                Code::NotFound
            }
            "ListJobs" | "CreateJob" | "BatchCreateJobs" => Code::Ok,
            _ => Code::PermissionDenied,
        };
        for (rpc, code) in answers {
            assert_eq!(code, want(rpc), "bob on alice's {} job: {rpc}", job.kind);
        }
    }
    // Alice's own token on the runner is no better.
    for job in [&queued, &running] {
        for (rpc, code) in runner_rpcs(&svc, &svc.token, &job.id).await {
            assert_eq!(code, Code::PermissionDenied, "a user token on {rpc}");
        }
    }

    let mut jobs = svc.jobs.clone();
    // Bob's listings hold only bob's jobs, whatever the filter.
    for req in [
        ListJobsRequest::default(),
        ListJobsRequest {
            status: JobStatus::Running as i32,
            ..Default::default()
        },
        ListJobsRequest {
            kind: "sleep".into(),
            ..Default::default()
        },
    ] {
        let page = jobs
            .list_jobs(authed(req, &bob))
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.iter().all(|j| j.user_id == bob_id.to_string()));
        assert!(page.jobs.iter().all(|j| j.kind != "sleep"));
    }
    // Alice's page token is bound to alice.
    assert_code(
        "bob with alice's page token",
        jobs.list_jobs(authed(
            ListJobsRequest {
                page_size: 1,
                page_token: alice_list.next_page_token.clone(),
                ..Default::default()
            },
            &bob,
        ))
        .await,
        Code::InvalidArgument,
    );
    // The same idempotency key is bob's own: a new job, never alice's.
    let bobs = jobs
        .create_job(authed(
            CreateJobRequest {
                kind: "echo".into(),
                idempotency_key: "shared-key".into(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_ne!(bobs.id, queued.id);
    assert_eq!(bobs.user_id, bob_id.to_string());
    assert_eq!(bobs.payload, Some(json_to_struct(&serde_json::json!({}))));
    let batch = jobs
        .batch_create_jobs(authed(
            BatchCreateJobsRequest {
                requests: vec![CreateJobRequest {
                    kind: "echo".into(),
                    idempotency_key: "shared-key".into(),
                    ..Default::default()
                }],
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(batch[0].id, bobs.id);

    // Alice's jobs, their history and her listing are as they were.
    let (count, _, _) = snapshot(&svc.db).await;
    let client = svc.db.pool.get().await.unwrap();
    let alice_now: (i64, String, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM jobs WHERE user_id = $1),
                        (SELECT md5(string_agg(j::text, '|' ORDER BY j.id)) FROM jobs j WHERE user_id = $1),
                        (SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.user_id = $1)",
                &[&svc.user],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(alice_now, before, "alice's rows changed");
    assert!(count > before.0, "bob's own creates went in");
    assert_eq!(svc.get(&queued.id).await, queued);
    assert_eq!(svc.get(&running.id).await, running);
    let listed = jobs
        .list_jobs(svc.u(ListJobsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed, vec![running.clone(), queued.clone()]);
}

/// Strings are parameters, never SQL: metacharacters are stored and returned
/// verbatim (or refused where the charset forbids them), LIKE wildcards
/// match only themselves, and every table is still there.
#[tokio::test]
async fn sql_metacharacters_are_data() {
    let svc = Svc::start().await;
    let mut jobs = svc.jobs.clone();
    const NASTY: &[&str] = &[
        "'; DROP TABLE jobs; --",
        "' OR '1'='1",
        "%",
        "_",
        "\\",
        "$1",
        "\"quoted\"",
        "$$ $tag$ E'\\x41'",
        "/* -- */",
        "日本語 🦀 \u{202e}",
    ];

    // Kinds: the charset allows `.`, `_` and `-` only.
    for kind in ["abc", "a_c", "a.c", "a-c"] {
        svc.create_kind(kind).await;
    }
    for kind in ["a%c", "a'c", "a;c", "a c", "A_C", "a\\c", "$1"] {
        let r = jobs
            .create_job(svc.u(CreateJobRequest {
                kind: kind.into(),
                ..Default::default()
            }))
            .await;
        assert_code(kind, r, Code::InvalidArgument);
    }
    for kind in ["a_c", "a.c"] {
        let page = jobs
            .list_jobs(svc.u(ListJobsRequest {
                kind: kind.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let kinds: Vec<&str> = page.jobs.iter().map(|j| j.kind.as_str()).collect();
        assert_eq!(kinds, vec![kind], "the filter {kind:?} matches only itself");
    }

    for s in NASTY {
        // Idempotency keys match exactly: the same key twice is one job,
        // and `%` or `_` match no other key.
        let payload = json_to_struct(&serde_json::json!({ *s: s, "list": [s, {"k": s}] }));
        let req = CreateJobRequest {
            kind: "echo".into(),
            payload: Some(payload.clone()),
            idempotency_key: s.to_string(),
            ..Default::default()
        };
        let first = svc.create(req.clone()).await;
        assert_eq!(first.payload, Some(payload.clone()), "payload {s:?}");
        assert_eq!(svc.get(&first.id).await, first);
        assert_eq!(svc.create(req).await.id, first.id, "key {s:?}");
    }
    assert_eq!(
        svc.db
            .pool
            .get()
            .await
            .unwrap()
            .query_one("SELECT count(DISTINCT idempotency_key) FROM jobs", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        NASTY.len() as i64
    );

    // Worker-side strings: error text, output and worker id.
    for s in NASTY {
        let job = svc.create_kind("echo").await;
        svc.runner
            .clone()
            .start_job(svc.w(StartJobRequest {
                id: job.id.clone(),
                worker_id: s.to_string(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let failed = svc
            .runner
            .clone()
            .fail_job(svc.w(FailJobRequest {
                id: job.id.clone(),
                attempt: 1,
                error: s.to_string(),
                retryable: false,
                worker_id: s.to_string(),
            }))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(failed.error, *s);
        assert_eq!(svc.get(&job.id).await.error, *s);
        let workers: Vec<Option<String>> = svc
            .db
            .pool
            .get()
            .await
            .unwrap()
            .query(
                "SELECT worker_id FROM job_events WHERE job_id = $1 AND event <> 'created'",
                &[&Uuid::parse_str(&job.id).unwrap()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            workers.iter().all(|w| w.as_deref() == Some(*s)),
            "{workers:?}"
        );

        let job = svc.create_kind("echo").await;
        svc.start_job(&job.id).await.unwrap();
        let output = json_to_struct(&serde_json::json!({ *s: [s] }));
        let done = svc
            .runner
            .clone()
            .complete_job(svc.w(CompleteJobRequest {
                id: job.id.clone(),
                attempt: 1,
                output: Some(output.clone()),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_eq!(done.output, Some(output.clone()));
        assert_eq!(svc.get(&job.id).await.output, Some(output));
    }

    assert_tables_exist(&svc.db, &["users", "jobs", "job_events", "job_outbox"]).await;
}
