//! CreateJob / BatchCreateJobs: validation, idempotency (also under a race),
//! all-or-nothing batches.

use std::collections::HashSet;

use keel_proto::jobs::v1::*;
use tonic::Code;

use crate::support::Svc;

fn req(kind: &str) -> CreateJobRequest {
    CreateJobRequest {
        kind: kind.into(),
        ..Default::default()
    }
}

async fn job_count(svc: &Svc) -> i64 {
    svc.count("SELECT count(*) FROM jobs").await
}

#[tokio::test]
async fn concurrent_identical_creates_make_exactly_one_job() {
    let svc = Svc::start().await;
    let mut calls = Vec::new();
    for _ in 0..10 {
        let mut client = svc.jobs.clone();
        let request = svc.u(CreateJobRequest {
            kind: "echo".into(),
            idempotency_key: "order-42".into(),
            ..Default::default()
        });
        calls.push(tokio::spawn(
            async move { client.create_job(request).await },
        ));
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap().unwrap().into_inner().job.unwrap().id);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(job_count(&svc).await, 1);
    svc.wait_delivered().await;
    assert_eq!(svc.stream_ids().await.len(), 1);

    // Later repeats return the original; the key is per user.
    let again = svc
        .create(CreateJobRequest {
            kind: "other".into(),
            idempotency_key: "order-42".into(),
            ..Default::default()
        })
        .await;
    assert!(ids.contains(&again.id));
    assert_eq!(again.kind, "echo");
    let (_, other_token) = svc.other_user().await;
    let theirs = svc
        .jobs
        .clone()
        .create_job(keel_shared::testing::authed(
            CreateJobRequest {
                kind: "echo".into(),
                idempotency_key: "order-42".into(),
                ..Default::default()
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(!ids.contains(&theirs.id));
}

#[tokio::test]
async fn batches_are_all_or_nothing_in_request_order_with_per_item_idempotency() {
    let svc = Svc::start().await;
    let existing = svc
        .create(CreateJobRequest {
            kind: "echo".into(),
            idempotency_key: "k-1".into(),
            ..Default::default()
        })
        .await;

    // One bad item: nothing is created, and the error names the item.
    let mut bad = vec![req("a"), req("b"), req("c"), req("Not Valid")];
    bad[1].idempotency_key = "k-2".into();
    let err = svc
        .jobs
        .clone()
        .batch_create_jobs(svc.u(BatchCreateJobsRequest { requests: bad }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("requests[3].kind"),
        "{}",
        err.message()
    );
    assert_eq!(job_count(&svc).await, 1);

    let mut items = vec![req("a"), req("b"), req("c"), req("d")];
    items[1].idempotency_key = "k-1".into(); // exists already
    items[2].idempotency_key = "k-3".into();
    items[3].idempotency_key = "k-3".into(); // twice in one batch
    let jobs = svc
        .jobs
        .clone()
        .batch_create_jobs(svc.u(BatchCreateJobsRequest { requests: items }))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 4);
    assert_eq!(jobs[0].kind, "a");
    assert_eq!(jobs[1], existing);
    assert_eq!(jobs[2].kind, "c");
    assert_eq!(jobs[3].id, jobs[2].id);
    assert_eq!(job_count(&svc).await, 3);

    for n in [0, 1001] {
        let err = svc
            .jobs
            .clone()
            .batch_create_jobs(svc.u(BatchCreateJobsRequest {
                requests: vec![req("a"); n],
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("requests"), "{}", err.message());
    }
}

#[tokio::test]
async fn invalid_requests_name_the_field_and_change_nothing() {
    let svc = Svc::start_with(|c| c.max_payload_bytes = 1000).await;
    let big = keel_shared::json::json_to_struct(&serde_json::json!({"s": "x".repeat(1000)}));
    // Deeper than the 64 levels Struct conversion allows, yet within what
    // prost itself decodes (deeper still is refused by the transport).
    let mut deep = serde_json::json!(1);
    for _ in 0..33 {
        deep = serde_json::json!({ "a": deep });
    }
    let cases = [
        (req(""), "kind"),
        (req(&"a".repeat(129)), "kind"),
        (req("UPPER"), "kind"),
        (
            CreateJobRequest {
                payload: Some(big),
                ..req("echo")
            },
            "payload",
        ),
        (
            CreateJobRequest {
                payload: Some(keel_shared::json::json_to_struct(&deep)),
                ..req("echo")
            },
            "payload",
        ),
        (
            CreateJobRequest {
                max_attempts: 101,
                ..req("echo")
            },
            "max_attempts",
        ),
        (
            CreateJobRequest {
                priority: -101,
                ..req("echo")
            },
            "priority",
        ),
        (
            CreateJobRequest {
                idempotency_key: "k".repeat(257),
                ..req("echo")
            },
            "idempotency_key",
        ),
        (
            CreateJobRequest {
                run_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..req("echo")
            },
            "run_at",
        ),
    ];
    for (request, field) in cases {
        let err = svc
            .jobs
            .clone()
            .create_job(svc.u(request))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    assert_eq!(job_count(&svc).await, 0);

    let ok = svc
        .create(CreateJobRequest {
            max_attempts: 100,
            priority: -100,
            idempotency_key: "k".repeat(256),
            ..req(&"a".repeat(128))
        })
        .await;
    assert_eq!((ok.max_attempts, ok.priority), (100, -100));
}
