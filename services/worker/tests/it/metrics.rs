//! Prometheus metrics as an operator scrapes them: the jobs service and a
//! worker in this process, `/metrics` read over plain HTTP. The recorder is
//! process-wide and other tests run alongside, so job series use kinds of
//! their own (exact values) and shared series are checked with lower bounds.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use keel_proto::jobs::v1::{CreateJobRequest, JobStatus, WatchJobRequest};
use keel_shared::queue::FIELD_JOB_ID;
use keel_shared::testing::{self, eventually};
use keel_worker::{HandlerError, JobContext, Registry};
use serde_json::json;

use crate::support::{Env, WAIT};

#[tokio::test]
async fn metrics_are_scraped_over_http_with_rpc_job_pool_and_queue_series() {
    let metrics_addr = free_addr();
    let env = Env::start_with(|jobs| {
        jobs.runtime.metrics.metrics_addr = Some(metrics_addr);
        jobs.runtime.metrics.metrics_sample_ms = 200;
        jobs.database.db_pool_size = 5;
    })
    .await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let ok_kind = format!("metrics-ok-{suffix}");
    let fail_kind = format!("metrics-fail-{suffix}");
    let registry = Registry::with_builtins()
        .register_fn(
            ok_kind.clone(),
            |ctx: JobContext| async move { Ok(ctx.payload) },
        )
        .register_fn(fail_kind.clone(), |_ctx: JobContext| async move {
            Err(HandlerError::Permanent("no".into()))
        });
    let mut worker_config = env.worker_config();
    worker_config.runtime.metrics.metrics_sample_ms = 200;
    let worker = env.start_worker(worker_config, registry).await;

    let ok_a = env.create(&ok_kind, json!({"n": 1}), 1).await;
    let ok_b = env.create(&ok_kind, json!({"n": 2}), 1).await;
    let failing = env.create(&fail_kind, json!({}), 1).await;
    let invalid = env
        .jobs
        .clone()
        .create_job(testing::authed(
            CreateJobRequest {
                kind: "Not A Kind".into(),
                ..Default::default()
            },
            &env.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let anonymous = env
        .jobs
        .clone()
        .create_job(CreateJobRequest {
            kind: ok_kind.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    // A poison entry (no job id) is dead-lettered by the worker.
    let _: String = redis::cmd("XADD")
        .arg(env.redis.config.jobs_stream("echo"))
        .arg("*")
        .arg(FIELD_JOB_ID)
        .arg("not-a-uuid")
        .query_async(&mut *env.redis().await)
        .await
        .unwrap();

    env.wait_for(&ok_a.id, JobStatus::Succeeded).await;
    env.wait_for(&ok_b.id, JobStatus::Succeeded).await;
    env.wait_for(&failing.id, JobStatus::Failed).await;
    // A stream is counted when it ends (its status comes in the trailers).
    let mut watch = env
        .jobs
        .clone()
        .watch_job(testing::authed(
            WatchJobRequest {
                id: ok_a.id.clone(),
            },
            &env.token,
        ))
        .await
        .unwrap()
        .into_inner();
    while watch.message().await.unwrap().is_some() {}

    let ok = ok_kind.as_str();
    let fail = fail_kind.as_str();
    let create = ("method", "/keel.jobs.v1.JobsService/CreateJob");
    let start = ("method", "/keel.jobs.v1.JobRunnerService/StartJob");
    let watch_method = ("method", "/keel.jobs.v1.JobsService/WatchJob");
    eventually(WAIT, "the expected series in /metrics", || async {
        let m = Metrics::parse(&scrape(metrics_addr).await);
        let at_least = |name: &str, labels: &[(&str, &str)], min: f64| {
            m.get(name, labels).is_some_and(|v| v >= min)
        };
        let exactly = |name: &str, labels: &[(&str, &str)], want: f64| m.get(name, labels) == Some(want);
        let present = |name: &str, labels: &[(&str, &str)]| m.get(name, labels).is_some();
        let transitions = "keel_jobs_transitions_total";
        // Per-RPC counts by status code, and the latency histogram.
        at_least("keel_grpc_server_requests_total", &[create, ("code", "OK")], 3.0)
            && at_least("keel_grpc_server_requests_total", &[create, ("code", "INVALID_ARGUMENT")], 1.0)
            && at_least("keel_grpc_server_requests_total", &[create, ("code", "UNAUTHENTICATED")], 1.0)
            && at_least("keel_grpc_server_requests_total", &[start, ("code", "OK")], 3.0)
            && at_least("keel_grpc_server_requests_total", &[watch_method, ("code", "OK")], 1.0)
            && at_least("keel_grpc_server_handling_seconds_count", &[create], 5.0)
            && at_least("keel_grpc_server_handling_seconds_bucket", &[create, ("le", "+Inf")], 5.0)
            // Job transitions by kind, recorded by the jobs service.
            && exactly(transitions, &[("transition", "created"), ("kind", ok)], 2.0)
            && exactly(transitions, &[("transition", "started"), ("kind", ok)], 2.0)
            && exactly(transitions, &[("transition", "succeeded"), ("kind", ok)], 2.0)
            && exactly(transitions, &[("transition", "created"), ("kind", fail)], 1.0)
            && exactly(transitions, &[("transition", "failed"), ("kind", fail)], 1.0)
            && !present(transitions, &[("transition", "retried"), ("kind", fail)])
            // Attempts by kind and outcome, recorded by the worker.
            && exactly("keel_worker_jobs_total", &[("kind", ok), ("outcome", "succeeded")], 2.0)
            && exactly("keel_worker_jobs_total", &[("kind", fail), ("outcome", "failed")], 1.0)
            && exactly("keel_worker_job_duration_seconds_count", &[("kind", ok)], 2.0)
            && at_least("keel_worker_dead_lettered_total", &[("reason", "invalid_message")], 1.0)
            // Sampled gauges: pools, outbox, queue.
            && exactly("keel_pool_max_connections", &[("service", "jobs"), ("pool", "postgres")], 5.0)
            && at_least("keel_pool_connections", &[("service", "jobs"), ("pool", "postgres"), ("state", "idle")], 1.0)
            && present("keel_pool_connections", &[("service", "worker"), ("pool", "redis"), ("state", "in_use")])
            && present("keel_jobs_outbox_rows", &[])
            && present("keel_jobs_outbox_oldest_due_seconds", &[])
            && present("keel_queue_stream_length", &[])
            && present("keel_queue_lag", &[])
            && present("keel_queue_pending", &[])
            && present("keel_queue_dead_letter_length", &[])
    })
    .await;
    let text = scrape(metrics_addr).await;
    assert!(
        text.contains("# TYPE keel_grpc_server_handling_seconds histogram"),
        "{text}"
    );
    worker.stop().await;
}

/// A port nobody listens on right now (the exporter binds it itself).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `GET /metrics` over HTTP/1.0 (so the body is neither chunked nor kept
/// alive); empty while nothing listens.
async fn scrape(addr: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
            return String::new();
        };
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("a UTF-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_string()
    })
    .await
    .unwrap()
}

/// Samples of the Prometheus text format: (name, labels, value).
struct Metrics(Vec<(String, BTreeMap<String, String>, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("numeric sample"),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label pair");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Self(samples)
    }

    /// The value of the series with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }
}
