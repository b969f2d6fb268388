//! ListJobs: newest first, filters, page tokens bound to the filter, stable
//! under concurrent inserts.

use std::collections::HashSet;

use keel_proto::jobs::v1::*;
use tonic::Code;

use crate::support::Svc;

async fn list_all(svc: &Svc, filter: ListJobsRequest, page_size: i32) -> (Vec<Job>, usize) {
    let mut jobs = Vec::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = svc
            .jobs
            .clone()
            .list_jobs(svc.u(ListJobsRequest {
                page_size,
                page_token: token,
                ..filter.clone()
            }))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= page_size as usize);
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return (jobs, pages);
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn pages_have_no_duplicates_or_gaps_while_jobs_are_being_created() {
    let svc = Svc::start().await;
    let requests = (0..120)
        .map(|i| CreateJobRequest {
            kind: if i % 3 == 0 { "report" } else { "echo" }.into(),
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
    // Cancel a few reports so the status filter has something to find.
    let cancelled: HashSet<String> = created
        .iter()
        .filter(|j| j.kind == "report")
        .take(5)
        .map(|j| j.id.clone())
        .collect();
    for id in &cancelled {
        svc.jobs
            .clone()
            .cancel_job(svc.u(CancelJobRequest { id: id.clone() }))
            .await
            .unwrap();
    }

    // Another client keeps creating jobs while we page.
    let writer = {
        let mut client = svc.jobs.clone();
        let token = svc.token.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                client
                    .create_job(keel_shared::testing::authed(
                        CreateJobRequest {
                            kind: "report".into(),
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await
                    .unwrap();
            }
        })
    };
    let (listed, pages) = list_all(&svc, ListJobsRequest::default(), 7).await;
    let (reports, _) = list_all(
        &svc,
        ListJobsRequest {
            kind: "report".into(),
            ..Default::default()
        },
        9,
    )
    .await;
    writer.await.unwrap();
    assert!(pages >= 120 / 7);

    // Every job that existed before paging began is there exactly once, newest first.
    let ids: Vec<&String> = listed.iter().map(|j| &j.id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates across pages");
    for job in &created {
        assert!(unique.contains(&job.id), "gap: {} missing", job.id);
    }
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "not newest first");

    let report_ids: HashSet<&String> = reports.iter().map(|j| &j.id).collect();
    assert_eq!(report_ids.len(), reports.len());
    assert!(reports.iter().all(|j| j.kind == "report"));
    for job in created.iter().filter(|j| j.kind == "report") {
        assert!(report_ids.contains(&job.id));
    }

    let (only_cancelled, _) = list_all(
        &svc,
        ListJobsRequest {
            status: JobStatus::Cancelled as i32,
            kind: "report".into(),
            ..Default::default()
        },
        2,
    )
    .await;
    let got: HashSet<String> = only_cancelled.into_iter().map(|j| j.id).collect();
    assert_eq!(got, cancelled);
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_filter() {
    let svc = Svc::start().await;
    for _ in 0..3 {
        svc.create_kind("echo").await;
    }
    let page = svc
        .jobs
        .clone()
        .list_jobs(svc.u(ListJobsRequest {
            page_size: 1,
            kind: "echo".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 1);
    assert!(!page.next_page_token.is_empty());
    for request in [
        ListJobsRequest {
            page_size: 1,
            kind: "other".into(),
            page_token: page.next_page_token.clone(),
            ..Default::default()
        },
        ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
    ] {
        let err = svc
            .jobs
            .clone()
            .list_jobs(svc.u(request))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("page_token"), "{}", err.message());
    }
    // Another user cannot reuse it either.
    let (_, other) = svc.other_user().await;
    let err = svc
        .jobs
        .clone()
        .list_jobs(keel_shared::testing::authed(
            ListJobsRequest {
                page_size: 1,
                kind: "echo".into(),
                page_token: page.next_page_token,
                ..Default::default()
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for (request, field) in [
        (
            ListJobsRequest {
                status: 99,
                ..Default::default()
            },
            "status",
        ),
        (
            ListJobsRequest {
                kind: "NO".into(),
                ..Default::default()
            },
            "kind",
        ),
        (
            ListJobsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
    ] {
        let err = svc
            .jobs
            .clone()
            .list_jobs(svc.u(request))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
}
