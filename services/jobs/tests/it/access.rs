//! Who may call what: another user's jobs are NOT_FOUND everywhere, the
//! runner needs the worker credential, user RPCs need a user.

use keel_proto::jobs::v1::*;
use keel_shared::testing::authed;
use tonic::Code;

use crate::support::{Svc, code};

#[tokio::test]
async fn another_users_job_is_not_found_for_every_rpc() {
    let svc = Svc::start().await;
    let mine = svc.create_kind("echo").await;
    let (_, other) = svc.other_user().await;
    let mut jobs = svc.jobs.clone();

    let get = jobs
        .get_job(authed(
            GetJobRequest {
                id: mine.id.clone(),
            },
            &other,
        ))
        .await;
    assert_eq!(code(get), Code::NotFound);
    let cancel = jobs
        .cancel_job(authed(
            CancelJobRequest {
                id: mine.id.clone(),
            },
            &other,
        ))
        .await;
    assert_eq!(code(cancel), Code::NotFound);
    let watch = jobs
        .watch_job(authed(
            WatchJobRequest {
                id: mine.id.clone(),
            },
            &other,
        ))
        .await;
    assert_eq!(code(watch), Code::NotFound);
    let listed = jobs
        .list_jobs(authed(ListJobsRequest::default(), &other))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    // The same key as mine is theirs alone.
    let theirs = jobs
        .create_job(authed(
            CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            },
            &other,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mine_listed = jobs
        .list_jobs(svc.u(ListJobsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(mine_listed, vec![mine.clone()]);
    assert_ne!(theirs.id, mine.id);
    // Untouched by their attempts.
    assert_eq!(svc.get(&mine.id).await, mine);
}

#[tokio::test]
async fn the_runner_needs_the_worker_credential_and_users_need_a_user_token() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let mut runner = svc.runner.clone();
    let as_user = runner
        .start_job(svc.u(StartJobRequest {
            id: job.id.clone(),
            worker_id: "sneaky".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(as_user), Code::PermissionDenied);
    for result in [
        runner
            .heartbeat(svc.u(HeartbeatRequest {
                id: job.id.clone(),
                attempt: 1,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        runner
            .complete_job(svc.u(CompleteJobRequest {
                id: job.id.clone(),
                attempt: 1,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        runner
            .fail_job(svc.u(FailJobRequest {
                id: job.id.clone(),
                attempt: 1,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
    ] {
        assert_eq!(code(result), Code::PermissionDenied);
    }
    let anonymous = runner
        .start_job(tonic::Request::new(StartJobRequest {
            id: job.id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(anonymous), Code::Unauthenticated);
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Queued);

    let worker_on_user_rpc = svc
        .jobs
        .clone()
        .get_job(svc.w(GetJobRequest { id: job.id.clone() }))
        .await;
    assert_eq!(code(worker_on_user_rpc), Code::PermissionDenied);
    let forged = svc
        .jobs
        .clone()
        .get_job(authed(GetJobRequest { id: job.id.clone() }, "not-a-token"))
        .await;
    assert_eq!(code(forged), Code::Unauthenticated);
}

#[tokio::test]
async fn a_token_whose_user_no_longer_exists_cannot_create_jobs() {
    let svc = Svc::start().await;
    let ghost = keel_shared::testing::user_token(uuid::Uuid::now_v7(), "ghost@example.com");
    let result = svc
        .jobs
        .clone()
        .create_job(authed(
            CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            },
            &ghost,
        ))
        .await;
    assert_eq!(code(result), Code::Unauthenticated);
}

/// GetJob calls that arrive together are read together (one statement for
/// many ids): each caller still gets its own job, and NOT_FOUND for another
/// user's job or an id that does not exist, in the same burst.
#[tokio::test]
async fn concurrent_gets_of_several_users_each_get_only_their_own_jobs() {
    let svc = Svc::start().await;
    let mut users = vec![svc.token.clone()];
    for _ in 0..2 {
        users.push(svc.other_user().await.1);
    }
    let mut jobs_of = Vec::new();
    for (u, token) in users.iter().enumerate() {
        let mut mine = Vec::new();
        for i in 0..5 {
            let job = svc.create_kind_as(&format!("kind-{u}-{i}"), token).await;
            mine.push(job);
        }
        jobs_of.push(mine);
    }
    let missing = uuid::Uuid::now_v7().to_string();

    let (svc, users, jobs_of, missing) = (&svc, &users, &jobs_of, &missing);
    let gets = (0..3).flat_map(|_round| {
        (0..users.len()).flat_map(move |u| {
            (0..users.len()).flat_map(move |owner| {
                jobs_of[owner]
                    .iter()
                    .map(|j| j.id.clone())
                    .chain([missing.clone()])
                    .map(move |id| {
                        let mut client = svc.jobs.clone();
                        let token = users[u].clone();
                        async move {
                            let got = client
                                .get_job(authed(GetJobRequest { id: id.clone() }, &token))
                                .await
                                .map(|r| r.into_inner().job.expect("job"));
                            (u, owner, id, got)
                        }
                    })
            })
        })
    });
    let results = futures::future::join_all(gets).await;

    assert_eq!(results.len(), 3 * 3 * 3 * 6);
    for (u, owner, id, got) in results {
        if id == *missing || u != owner {
            assert_eq!(
                code(got),
                Code::NotFound,
                "user {u} reading {id} of user {owner}"
            );
            continue;
        }
        let job = got.unwrap_or_else(|e| panic!("user {u} reading {id}: {e}"));
        assert_eq!(job.id, id);
        let expected = jobs_of[owner].iter().find(|j| j.id == id).unwrap();
        assert_eq!(job.kind, expected.kind);
    }
}
