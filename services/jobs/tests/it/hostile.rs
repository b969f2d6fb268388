//! Hostile input: property tests over every request message
//! of JobsService and JobRunnerService, one server per property reused across
//! cases; undecodable (invalid UTF-8, nesting past prost's limit) and oversized
//! messages. Every answer is a contract code for bad input, never UNKNOWN or
//! INTERNAL, and a refused call changes nothing.

use std::future::Future;

use keel_proto::jobs::v1::*;
use keel_shared::json::struct_to_json;
use keel_shared::testing::fuzz::{
    self, assert_decode_error, assert_too_deep, field, nested, property, report, runtime,
    small_i32, struct_with_raw_string,
};
use keel_shared::testing::{self, TestDb, TestRedis};
use proptest::prelude::*;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::support::{Svc, WORKER_TOKEN};

const SERVICE: &str = "jobs";

/// Two of the service's tables, named in the SQL fragments' DROP lines.
const TABLES: [&str; 2] = ["jobs", "job_events"];

/// Every job and transition, as one comparable value.
pub(crate) async fn snapshot(db: &TestDb) -> (i64, String, i64) {
    let client = db.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM jobs),
                    (SELECT coalesce(md5(string_agg(j::text, '|' ORDER BY j.id)), '') FROM jobs j),
                    (SELECT count(*) FROM job_events)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Runs `call` and asserts a clean code, and that an error changed nothing.
async fn checked<T, Fut>(db: &TestDb, rpc: &str, call: Fut) -> Result<T, Status>
where
    Fut: Future<Output = Result<T, Status>>,
{
    fuzz::checked(rpc, || snapshot(db), call).await
}

// ---------------------------------------------------------------------------
// Strategies.

fn nasty_string() -> BoxedStrategy<String> {
    fuzz::nasty_string(TABLES)
}

/// Text for any string field, NUL included (see
/// `nul_in_stored_text_is_invalid_argument_not_internal`).
fn text() -> BoxedStrategy<String> {
    nasty_string()
}

fn number() -> BoxedStrategy<f64> {
    prop_oneof![
        4 => (-(1i64 << 49)..(1i64 << 49)).prop_map(|n| n as f64),
        // Any finite double, 17 significant digits included.
        2 => prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        1 => (-1000i32..1000).prop_map(|n| f64::from(n) / 8.0),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0]),
    ]
    .boxed()
}

/// Random Structs, some nested up to `max_levels` objects (see [`fuzz::payload`]).
fn payload(max_levels: usize) -> BoxedStrategy<Struct> {
    fuzz::payload(max_levels, text(), number())
}

fn kind() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec!["echo", "sleep", "fail", "a.b_c-9", "x", "%", "_"]).prop_map(String::from),
        2 => "[a-z0-9._-]{1,130}",
        2 => nasty_string(),
    ]
    .boxed()
}

fn timestamp() -> BoxedStrategy<Timestamp> {
    let now = chrono::Utc::now().timestamp();
    prop_oneof![
        3 => (now - 1000..now + 1000, 0..1_000_000_000i32)
            .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
        1 => (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
        // The range protobuf Timestamps allow: years 1 to 9999.
        1 => (-62_135_596_800i64..253_402_300_800, 0..1_000_000_000i32)
            .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
        // Beyond chrono's range, and within it up to Postgres's end (294276 AD);
        // before 4713 BC see `run_at_before_postgres_range_is_invalid_argument`.
        1 => prop::sample::select(vec![9_000_000_000_000i64, 8_200_000_000_000, -9_000_000_000_000])
            .prop_map(|seconds| Timestamp { seconds, nanos: 0 }),
    ]
    .boxed()
}

fn create_request(max_levels: usize) -> BoxedStrategy<CreateJobRequest> {
    (
        kind(),
        prop::option::of(payload(max_levels)),
        small_i32(-100..=100),
        small_i32(0..=100),
        prop::option::of(timestamp()),
        prop_oneof![Just(String::new()), Just("key-1".to_string()), text()],
        prop::option::of(duration()),
    )
        .prop_map(
            |(kind, payload, priority, max_attempts, run_at, idempotency_key, timeout)| {
                CreateJobRequest {
                    kind,
                    payload,
                    priority,
                    max_attempts,
                    run_at,
                    idempotency_key,
                    timeout,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

/// Durations for `timeout`: in its range, at its edges, and anything.
fn duration() -> BoxedStrategy<prost_types::Duration> {
    let d = |(seconds, nanos)| prost_types::Duration { seconds, nanos };
    prop_oneof![
        2 => (1i64..86_400, 0..1_000_000_000i32).prop_map(d),
        1 => prop::sample::select(vec![(0, 0), (1, 0), (0, 999_999_999), (86_400, 0), (86_400, 1), (-1, 0), (1, -1)]).prop_map(d),
        1 => (any::<i64>(), any::<i32>()).prop_map(d),
    ]
    .boxed()
}

/// How a case names a job: the one the case prepared (as is, or in another
/// UUID spelling), or any string.
#[derive(Debug, Clone)]
enum Id {
    Target,
    Upper,
    Braced,
    Urn,
    Random,
    Text(String),
}

fn id() -> BoxedStrategy<Id> {
    prop_oneof![
        4 => Just(Id::Target),
        1 => Just(Id::Upper),
        1 => Just(Id::Braced),
        1 => Just(Id::Urn),
        1 => Just(Id::Random),
        1 => Just(Id::Text(Uuid::nil().to_string())),
        3 => nasty_string().prop_map(Id::Text),
    ]
    .boxed()
}

impl Id {
    fn resolve(&self, target: &str) -> String {
        match self {
            Id::Target => target.to_string(),
            Id::Upper => target.to_uppercase(),
            Id::Braced => format!("{{{target}}}"),
            Id::Urn => format!("urn:uuid:{target}"),
            Id::Random => Uuid::new_v4().to_string(),
            Id::Text(s) => s.clone(),
        }
    }
}

fn attempt() -> BoxedStrategy<i32> {
    prop_oneof![
        3 => Just(1),
        2 => prop::sample::select(vec![0, -1, 2, i32::MAX, i32::MIN]),
        1 => any::<i32>(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// JobsService.

#[test]
fn create_job_survives_hostile_requests() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    property(SERVICE, "CreateJob", 128, &rt, create_request(33), |req| {
        let svc = &svc;
        async move {
            let sent = req.clone();
            let result = checked(
                &svc.db,
                "CreateJob",
                svc.jobs.clone().create_job(svc.u(req)),
            )
            .await;
            let Ok(resp) = result else { return };
            let job = resp.into_inner().job.expect("job");
            if !sent.idempotency_key.is_empty() {
                return; // may be an earlier job with the same key
            }
            assert_eq!(job.kind, sent.kind);
            let want = sent
                .payload
                .as_ref()
                .map(|p| struct_to_json(p).unwrap())
                .unwrap_or(serde_json::json!({}));
            assert_eq!(struct_to_json(job.payload.as_ref().unwrap()).unwrap(), want);
            assert_eq!(svc.get(&job.id).await, job, "read back");
        }
    });
}

#[test]
fn batch_create_jobs_survives_hostile_requests() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    let requests = prop_oneof![
        8 => prop::collection::vec(create_request(32), 0..5),
        1 => Just(vec![CreateJobRequest { kind: "echo".into(), ..Default::default() }; 1001]),
    ];
    property(SERVICE, "BatchCreateJobs", 64, &rt, requests, |requests| {
        let svc = &svc;
        async move {
            let n = requests.len();
            let before = snapshot(&svc.db).await.0;
            let result = checked(
                &svc.db,
                "BatchCreateJobs",
                svc.jobs
                    .clone()
                    .batch_create_jobs(svc.u(BatchCreateJobsRequest { requests })),
            )
            .await;
            if let Ok(resp) = result {
                let jobs = resp.into_inner().jobs;
                assert_eq!(jobs.len(), n);
                assert!(snapshot(&svc.db).await.0 <= before + n as i64);
            }
        }
    });
}

#[test]
fn job_rpcs_by_id_survive_hostile_ids() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    property(
        SERVICE,
        "GetJob/CancelJob/WatchJob/GetJobHistory/RetryJob/DeleteJob",
        128,
        &rt,
        (id(), 0..6u8),
        |(id, rpc)| {
            let svc = &svc;
            async move {
                let target = svc.create_kind("echo").await;
                let id = id.resolve(&target.id);
                let mut jobs = svc.jobs.clone();
                match rpc {
                    0 => {
                        let r =
                            checked(&svc.db, "GetJob", jobs.get_job(svc.u(GetJobRequest { id })))
                                .await;
                        if let Ok(r) = r {
                            assert_eq!(r.into_inner().job.unwrap(), target);
                        }
                    }
                    1 => {
                        let r = checked(
                            &svc.db,
                            "CancelJob",
                            jobs.cancel_job(svc.u(CancelJobRequest { id })),
                        )
                        .await;
                        if let Ok(r) = r {
                            let job = r.into_inner().job.unwrap();
                            assert_eq!(job.id, target.id);
                            assert_eq!(job.status(), JobStatus::Cancelled);
                        }
                    }
                    3 => {
                        let r = checked(
                            &svc.db,
                            "GetJobHistory",
                            jobs.get_job_history(svc.u(GetJobHistoryRequest { id })),
                        )
                        .await;
                        if let Ok(r) = r {
                            assert_eq!(r.into_inner().events[0].event, "created");
                        }
                    }
                    4 => {
                        // A queued job is not retried.
                        let r = checked(
                            &svc.db,
                            "RetryJob",
                            jobs.retry_job(svc.u(RetryJobRequest { id })),
                        )
                        .await;
                        assert!(r.is_err(), "{r:?}");
                    }
                    5 => {
                        // Nor deleted.
                        let r = checked(
                            &svc.db,
                            "DeleteJob",
                            jobs.delete_job(svc.u(DeleteJobRequest { id })),
                        )
                        .await;
                        assert!(r.is_err(), "{r:?}");
                    }
                    _ => {
                        let r = checked(
                            &svc.db,
                            "WatchJob",
                            jobs.watch_job(svc.u(WatchJobRequest { id })),
                        )
                        .await;
                        if let Ok(r) = r {
                            let first = r.into_inner().message().await.expect("first message");
                            assert_eq!(first.unwrap().job.unwrap().id, target.id);
                        }
                    }
                }
            }
        },
    );
}

#[test]
fn list_jobs_survives_hostile_requests() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    let (real_token, user) = rt.block_on(async {
        for _ in 0..3 {
            svc.create_kind("echo").await;
        }
        let page = svc
            .jobs
            .clone()
            .list_jobs(svc.u(ListJobsRequest {
                page_size: 1,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        (page.next_page_token, svc.user.to_string())
    });
    let token = fuzz::page_token(TABLES);
    let strategy = (
        small_i32(0..=1000),
        token,
        prop_oneof![3 => 0..=5i32, 1 => any::<i32>()],
        prop_oneof![Just(String::new()), Just("echo".to_string()), kind()],
    );
    property(
        SERVICE,
        "ListJobs",
        128,
        &rt,
        strategy,
        |(page_size, token, status, kind)| {
            let svc = &svc;
            let real_token = &real_token;
            let user = &user;
            async move {
                let page_token = token.resolve(real_token, |c| {
                    keel_shared::paging::encode_token(&format!("jobs|{user}||{kind}"), &c)
                });
                let req = ListJobsRequest {
                    page_size,
                    page_token,
                    status,
                    kind: kind.clone(),
                };
                let r = checked(&svc.db, "ListJobs", svc.jobs.clone().list_jobs(svc.u(req))).await;
                if let Ok(r) = r {
                    let page = r.into_inner();
                    let limit = if page_size == 0 {
                        50
                    } else {
                        page_size.min(1000)
                    };
                    assert!(page.jobs.len() <= limit as usize);
                    for job in &page.jobs {
                        assert_eq!(&job.user_id, user);
                        if !kind.is_empty() {
                            assert_eq!(job.kind, kind);
                        }
                        if status != 0 {
                            assert_eq!(job.status, status);
                        }
                    }
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------
// JobRunnerService (worker credential).

#[test]
fn start_job_survives_hostile_requests() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    property(
        SERVICE,
        "StartJob",
        64,
        &rt,
        (id(), text()),
        |(id, worker_id)| {
            let svc = &svc;
            async move {
                let target = svc.create_kind("echo").await;
                let req = StartJobRequest {
                    id: id.resolve(&target.id),
                    worker_id,
                    ..Default::default()
                };
                let r = checked(
                    &svc.db,
                    "StartJob",
                    svc.runner.clone().start_job(svc.w(req)),
                )
                .await;
                if let Ok(r) = r {
                    let job = r.into_inner().job.unwrap();
                    assert_eq!((job.id, job.attempt), (target.id, 1));
                }
            }
        },
    );
}

#[derive(Debug, Clone)]
enum RunnerCall {
    Heartbeat {
        id: Id,
        attempt: i32,
        worker_id: String,
    },
    Complete {
        id: Id,
        attempt: i32,
        output: Option<Struct>,
        cancelled: bool,
        worker_id: String,
    },
    Fail {
        id: Id,
        attempt: i32,
        error: String,
        retryable: bool,
        worker_id: String,
    },
}

#[test]
fn heartbeat_complete_and_fail_survive_hostile_requests() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    let call = prop_oneof![
        (id(), attempt(), text()).prop_map(|(id, attempt, worker_id)| RunnerCall::Heartbeat {
            id,
            attempt,
            worker_id
        }),
        (
            id(),
            attempt(),
            prop::option::of(payload(33)),
            any::<bool>(),
            text()
        )
            .prop_map(
                |(id, attempt, output, cancelled, worker_id)| RunnerCall::Complete {
                    id,
                    attempt,
                    output,
                    cancelled,
                    worker_id
                }
            ),
        (id(), attempt(), text(), any::<bool>(), text()).prop_map(
            |(id, attempt, error, retryable, worker_id)| RunnerCall::Fail {
                id,
                attempt,
                error,
                retryable,
                worker_id
            }
        ),
    ];
    property(
        SERVICE,
        "Heartbeat/CompleteJob/FailJob",
        128,
        &rt,
        call,
        |call| {
            let svc = &svc;
            async move {
                let target = svc.create_kind("echo").await;
                svc.start_job(&target.id).await.expect("start");
                let mut runner = svc.runner.clone();
                match call {
                    RunnerCall::Heartbeat {
                        id,
                        attempt,
                        worker_id,
                    } => {
                        let req = HeartbeatRequest {
                            id: id.resolve(&target.id),
                            attempt,
                            worker_id,
                            ..Default::default()
                        };
                        let _ = checked(&svc.db, "Heartbeat", runner.heartbeat(svc.w(req))).await;
                    }
                    RunnerCall::Complete {
                        id,
                        attempt,
                        output,
                        cancelled,
                        worker_id,
                    } => {
                        let req = CompleteJobRequest {
                            id: id.resolve(&target.id),
                            attempt,
                            output: output.clone(),
                            cancelled,
                            worker_id,
                        };
                        let r =
                            checked(&svc.db, "CompleteJob", runner.complete_job(svc.w(req))).await;
                        if let Ok(r) = r {
                            let job = r.into_inner().job.unwrap();
                            if let (Some(sent), false) = (output, cancelled) {
                                assert_eq!(
                                    struct_to_json(job.output.as_ref().unwrap()).unwrap(),
                                    struct_to_json(&sent).unwrap(),
                                    "output stored verbatim"
                                );
                            }
                        }
                    }
                    RunnerCall::Fail {
                        id,
                        attempt,
                        error,
                        retryable,
                        worker_id,
                    } => {
                        let req = FailJobRequest {
                            id: id.resolve(&target.id),
                            attempt,
                            error: error.clone(),
                            retryable,
                            worker_id,
                        };
                        let r = checked(&svc.db, "FailJob", runner.fail_job(svc.w(req))).await;
                        if let Ok(r) = r {
                            let job = r.into_inner().job.unwrap();
                            if error.len() <= 16 * 1024 {
                                // Verbatim but for NUL, which Postgres text cannot hold.
                                let expected = error.replace('\0', "\u{FFFD}");
                                assert_eq!(job.error, expected, "error stored verbatim");
                            }
                        }
                    }
                }
            }
        },
    );
}

#[test]
fn random_credentials_are_unauthenticated_and_change_nothing() {
    let rt = runtime();
    let svc = rt.block_on(Svc::start());
    let header = fuzz::authorization_header();
    property(SERVICE, "credentials", 128, &rt, header, |header| {
        let svc = &svc;
        async move {
            let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(header.as_slice()) else {
                return; // not a header value any HTTP/2 client can send
            };
            let mut req = tonic::Request::new(CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            });
            req.metadata_mut().insert("authorization", value.clone());
            let r = checked(&svc.db, "CreateJob", svc.jobs.clone().create_job(req)).await;
            assert_eq!(
                r.expect_err("random credential").code(),
                Code::Unauthenticated
            );
            let mut req = tonic::Request::new(StartJobRequest {
                id: Uuid::now_v7().to_string(),
                worker_id: "w".into(),
                ..Default::default()
            });
            req.metadata_mut().insert("authorization", value);
            let r = checked(&svc.db, "StartJob", svc.runner.clone().start_job(req)).await;
            assert_eq!(
                r.expect_err("random credential").code(),
                Code::Unauthenticated
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Known bugs.

/// Postgres text and jsonb cannot hold NUL: every field below is
/// INVALID_ARGUMENT (the worker's id and error text are recorded with the NUL
/// replaced) and nothing changes.
#[tokio::test]
async fn nul_in_stored_text_is_invalid_argument_not_internal() {
    let svc = Svc::start().await;
    let mut jobs = svc.jobs.clone();
    let nul_payload = keel_shared::json::json_to_struct(&serde_json::json!({"s": "a\u{0}b"}));
    let nul_key = keel_shared::json::json_to_struct(&serde_json::json!({"a\u{0}": 1}));
    for req in [
        CreateJobRequest {
            kind: "echo".into(),
            idempotency_key: "a\0b".into(),
            ..Default::default()
        },
        CreateJobRequest {
            kind: "echo".into(),
            payload: Some(nul_payload.clone()),
            ..Default::default()
        },
        CreateJobRequest {
            kind: "echo".into(),
            payload: Some(nul_key),
            ..Default::default()
        },
    ] {
        let r = checked(&svc.db, "CreateJob", jobs.create_job(svc.u(req))).await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    }
    let queued = svc.create_kind("echo").await;
    let r = checked(
        &svc.db,
        "StartJob",
        svc.runner.clone().start_job(svc.w(StartJobRequest {
            id: queued.id.clone(),
            worker_id: "w\0x".into(),
            ..Default::default()
        })),
    )
    .await;
    assert_eq!(r.unwrap().into_inner().job.unwrap().attempt, 1);
    let r = checked(
        &svc.db,
        "CompleteJob",
        svc.runner.clone().complete_job(svc.w(CompleteJobRequest {
            id: queued.id.clone(),
            attempt: 1,
            output: Some(nul_payload),
            ..Default::default()
        })),
    )
    .await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    let r = checked(
        &svc.db,
        "FailJob",
        svc.runner.clone().fail_job(svc.w(FailJobRequest {
            id: queued.id.clone(),
            attempt: 1,
            error: "boom\0".into(),
            ..Default::default()
        })),
    )
    .await;
    assert_eq!(
        r.unwrap().into_inner().job.unwrap().status(),
        JobStatus::Failed
    );
}

/// A run_at outside protobuf's defined range (years 1 to 9999), which Postgres
/// could not store either, is INVALID_ARGUMENT `run_at`.
#[tokio::test]
async fn run_at_before_postgres_range_is_invalid_argument() {
    let svc = Svc::start().await;
    let req = CreateJobRequest {
        kind: "echo".into(),
        run_at: Some(Timestamp {
            seconds: -300_000_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    let r = checked(
        &svc.db,
        "CreateJob",
        svc.jobs.clone().create_job(svc.u(req)),
    )
    .await;
    let status = r.expect_err("year -7500");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("run_at: "), "{status:?}");
}

// ---------------------------------------------------------------------------
// Messages the library refuses before any handler runs.

/// A server of our own (the raw-bytes calls need its channel).
struct Raw {
    db: TestDb,
    _redis: TestRedis,
    channel: Channel,
    token: String,
    shutdown: CancellationToken,
}

impl Raw {
    async fn start() -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let (listener, addr) = testing::listener().await;
        let config = keel_jobs::Config::new(
            addr,
            db.config(),
            redis.config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let user = db.create_user("raw@example.com").await;
        Self {
            token: testing::user_token(user, "raw@example.com"),
            db,
            _redis: redis,
            channel,
            shutdown,
        }
    }

    fn client(&self) -> keel_proto::jobs::v1::jobs_service_client::JobsServiceClient<Channel> {
        keel_proto::jobs::v1::jobs_service_client::JobsServiceClient::new(self.channel.clone())
    }

    async fn call(&self, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        fuzz::raw_call(&self.channel, path, testing::authed(body, &self.token)).await
    }

    /// A normal create still works.
    async fn assert_serving(&self) {
        self.client()
            .create_job(testing::authed(
                CreateJobRequest {
                    kind: "echo".into(),
                    ..Default::default()
                },
                &self.token,
            ))
            .await
            .expect("the server keeps serving");
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn invalid_utf8_is_refused_at_decode_and_changes_nothing() {
    let raw = Raw::start().await;
    let before = snapshot(&raw.db).await;
    const CREATE: &str = "/keel.jobs.v1.JobsService/CreateJob";
    // Control: hand-made bytes that decode are accepted.
    raw.call(CREATE, field(1, b"echo"))
        .await
        .expect("valid bytes");
    let before_bad = snapshot(&raw.db).await;
    assert_ne!(before, before_bad);
    let bad = [
        ("kind", field(1, b"ech\xff")),
        (
            "idempotency_key",
            [field(1, b"echo"), field(6, b"\xc3\x28")].concat(),
        ),
        (
            "payload string",
            [
                field(1, b"echo"),
                field(2, &struct_with_raw_string(b"s", b"\xed\xa0\x80")),
            ]
            .concat(),
        ),
        (
            "payload key",
            [
                field(1, b"echo"),
                field(2, &struct_with_raw_string(b"\xff", b"x")),
            ]
            .concat(),
        ),
    ];
    for (what, body) in bad {
        assert_decode_error(what, raw.call(CREATE, body).await);
    }
    assert_decode_error(
        "GetJob id",
        raw.call("/keel.jobs.v1.JobsService/GetJob", field(1, b"\x80"))
            .await,
    );
    assert_eq!(snapshot(&raw.db).await, before_bad);
    raw.assert_serving().await;
    report("jobs invalid UTF-8: 5 messages refused at decode");
}

/// `levels` lists nested in one another around a number, under key "l".
fn nested_lists(levels: usize) -> Struct {
    let mut v = Value {
        kind: Some(Kind::NumberValue(1.0)),
    };
    for _ in 0..levels {
        v = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
        };
    }
    Struct {
        fields: [("l".to_string(), v)].into_iter().collect(),
    }
}

async fn create_with(raw: &Raw, payload: Struct) -> Result<(), Status> {
    raw.client()
        .create_job(testing::authed(
            CreateJobRequest {
                kind: "echo".into(),
                payload: Some(payload),
                ..Default::default()
            },
            &raw.token,
        ))
        .await
        .map(|_| ())
}

/// The services refuse JSON nested deeper than 64 Struct/Value levels: 32
/// objects pass, 33 are INVALID_ARGUMENT naming the field. (An object costs
/// prost three message levels, so 34 no longer decode at all.)
#[tokio::test]
async fn nesting_past_the_services_bound_is_invalid_argument() {
    let raw = Raw::start().await;
    let before = snapshot(&raw.db).await;
    create_with(&raw, nested(32)).await.expect("32 levels");
    let status = create_with(&raw, nested(33)).await.expect_err("33 levels");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("payload: "), "{status:?}");
    create_with(&raw, nested_lists(48)).await.expect("48 lists");
    assert_eq!(snapshot(&raw.db).await.0, before.0 + 2);
}

/// Past prost's recursion limit (100 message levels) a message cannot be
/// decoded at all: tonic answers INTERNAL with the decode error, as gRPC's
/// status-code guide prescribes for a library parse failure, before any
/// handler runs, and nothing changes.
#[tokio::test]
async fn nesting_past_prosts_limit_is_a_decode_error() {
    let raw = Raw::start().await;
    let before = snapshot(&raw.db).await;
    for payload in [nested(34), nested(200), nested_lists(49), nested_lists(500)] {
        let status = create_with(&raw, payload)
            .await
            .expect_err("too deep to decode");
        assert_too_deep(&status);
    }
    let batch = BatchCreateJobsRequest {
        requests: vec![CreateJobRequest {
            kind: "echo".into(),
            payload: Some(nested(34)),
            ..Default::default()
        }],
    };
    let status = raw
        .client()
        .batch_create_jobs(testing::authed(batch, &raw.token))
        .await
        .expect_err("too deep in a batch too");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(snapshot(&raw.db).await, before);
    raw.assert_serving().await;
}

fn big(bytes: usize) -> CreateJobRequest {
    CreateJobRequest {
        kind: "echo".into(),
        payload: Some(keel_shared::json::json_to_struct(
            &serde_json::json!({"s": "x".repeat(bytes)}),
        )),
        ..Default::default()
    }
}

/// Messages over `MAX_MESSAGE_BYTES` are refused before decoding, change
/// nothing, and the server goes on serving.
#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_keeps_serving() {
    let raw = Raw::start().await;
    let before = snapshot(&raw.db).await;
    let refused = [Code::ResourceExhausted];
    let over = raw
        .client()
        .create_job(testing::authed(
            big(keel_shared::server::MAX_MESSAGE_BYTES + 1),
            &raw.token,
        ))
        .await
        .expect_err("over the message limit");
    assert!(refused.contains(&over.code()), "{over:?}");
    let batch = BatchCreateJobsRequest {
        requests: vec![big(1024 * 1024 - 64); 5],
    };
    let over = raw
        .client()
        .batch_create_jobs(testing::authed(batch, &raw.token))
        .await
        .expect_err("over the message limit");
    assert!(refused.contains(&over.code()), "{over:?}");
    // Under the message limit but over the payload limit: the service's own check.
    let under = raw
        .client()
        .create_job(testing::authed(big(2 * 1024 * 1024), &raw.token))
        .await
        .expect_err("over the payload limit");
    assert_eq!(under.code(), Code::InvalidArgument, "{under:?}");
    assert!(under.message().starts_with("payload: "), "{under:?}");
    assert_eq!(snapshot(&raw.db).await, before);
    raw.assert_serving().await;
}

/// An over-size message is RESOURCE_EXHAUSTED, as gRPC prescribes (tonic's
/// own OUT_OF_RANGE is rewritten by the shared server layer).
#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let raw = Raw::start().await;
    let over = raw
        .client()
        .create_job(testing::authed(
            big(keel_shared::server::MAX_MESSAGE_BYTES + 1),
            &raw.token,
        ))
        .await
        .expect_err("over the message limit");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
}

/// JSON numbers go through serde_json (jsonb in and out); with its
/// `float_roundtrip` feature a number with 16-17 significant digits comes back
/// exactly.
#[tokio::test]
async fn numbers_with_17_significant_digits_round_trip() {
    let raw = Raw::start().await;
    let sent = -2_132_685_841_303_033.0_f64;
    let payload = Struct {
        fields: [(
            "n".to_string(),
            Value {
                kind: Some(Kind::NumberValue(sent)),
            },
        )]
        .into_iter()
        .collect(),
    };
    let job = raw
        .client()
        .create_job(testing::authed(
            CreateJobRequest {
                kind: "echo".into(),
                payload: Some(payload.clone()),
                ..Default::default()
            },
            &raw.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.payload, Some(payload));
}
