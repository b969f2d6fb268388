//! The jobs read and write paths: CreateJob, GetJob, ListJobs, each against
//! the same SQL straight on Postgres.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_proto::jobs::v1::{CreateJobRequest, GetJobRequest, ListJobsRequest};

use super::Ctx;
use super::drive::{Limit, authed, drive};
use crate::stats::Stats;

pub(super) async fn create_job(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let (jobs_client, created) = (cx.jobs_client(), &cx.created_job_ids);
    let (jc, tk, ids) = (jobs_client.clone(), token.clone(), created.clone());
    let mut s = drive(
        "create-job",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk, ids) = (jc(i), tk.clone(), ids.clone());
            async move {
                let job = client
                    .create_job(authed(
                        &tk,
                        CreateJobRequest {
                            kind: "bench.noop".into(),
                            payload: Some(keel_shared::json::json_to_struct(
                                &serde_json::json!({"i": i}),
                            )),
                            ..Default::default()
                        },
                    ))
                    .await?
                    .into_inner()
                    .job
                    .context("job")?;
                ids.lock().unwrap().push(job.id);
                Ok(())
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .create_job(c, Duration::from_secs(opts.seconds))
            .await?,
    );
    Ok(Some(s))
}

/// Nothing to report when create-job created no job.
pub(super) async fn get_job(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let jobs_client = cx.jobs_client();
    let ids = Arc::new(cx.created_job_ids.lock().unwrap().clone());
    if ids.is_empty() {
        return Ok(None);
    }
    let (jc, tk, ids2) = (jobs_client.clone(), token.clone(), ids.clone());
    let mut s = drive(
        "get-job",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk, id) = (
                jc(i),
                tk.clone(),
                ids2[i.wrapping_mul(7919) % ids2.len()].clone(),
            );
            async move {
                client
                    .get_job(authed(
                        &tk,
                        GetJobRequest {
                            id,
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .get_job(c, Duration::from_secs(opts.seconds), &ids)
            .await?,
    );
    Ok(Some(s))
}

pub(super) async fn list_jobs(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, c, baseline, token) = (&cx.opts, cx.opts.concurrency, &cx.baseline, &cx.token);
    let jobs_client = cx.jobs_client();
    let (jc, tk) = (jobs_client.clone(), token.clone());
    let mut s = drive(
        "list-jobs",
        c,
        Limit::Time(Duration::from_secs(opts.seconds)),
        move |i| {
            let (mut client, tk) = (jc(i), tk.clone());
            async move {
                client
                    .list_jobs(authed(
                        &tk,
                        ListJobsRequest {
                            page_size: 50,
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    s.baseline_ops_per_sec = Some(
        baseline
            .list_jobs(c, Duration::from_secs(opts.seconds))
            .await?,
    );
    Ok(Some(s))
}
