//! Traces: the real keel-jobs and keel-worker export OpenTelemetry spans over
//! OTLP/gRPC to a collector run by the test, and one job's life (CreateJob,
//! the worker's run through the Redis message, StartJob, CompleteJob) is one
//! trace, continuing the caller's `traceparent` when it sends one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_faults::{Env, RedisTarget, Sandbox, Service, channel, create_job, job_request, tenant};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{GetJobRequest, JobStatus};
use keel_shared::testing::{self, TestRedis};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tonic::transport::server::TcpIncoming;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<String>,
}

/// A minimal OTLP collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Exported>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Exported {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| format!("{}={:?}", kv.key, kv.value))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    fn spans(&self) -> Vec<Exported> {
        self.0.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CREATE: &str = "keel.jobs.v1.JobsService/CreateJob";
const RUN: &str = "keel.worker/RunJob";
const START: &str = "keel.jobs.v1.JobRunnerService/StartJob";
const COMPLETE: &str = "keel.jobs.v1.JobRunnerService/CompleteJob";

/// The spans of one trace, once all four of a job's life are there.
async fn job_trace(collector: &Collector, trace_id: &str) -> Vec<Exported> {
    let mut found = Vec::new();
    testing::eventually(
        Duration::from_secs(60),
        "the job's four spans to be exported",
        || {
            found = collector
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
            let done = [CREATE, RUN, START, COMPLETE]
                .iter()
                .all(|n| names.contains(n));
            async move { done }
        },
    )
    .await;
    found
}

fn one<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let matching: Vec<&Exported> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(matching.len(), 1, "one {name} span in {spans:#?}");
    matching[0]
}

/// Checks the shape of one job's trace: CreateJob (keel-jobs) -> RunJob
/// (keel-worker) -> StartJob and CompleteJob (keel-jobs).
fn assert_job_trace(spans: &[Exported]) -> &Exported {
    let create = one(spans, CREATE);
    let run = one(spans, RUN);
    let start = one(spans, START);
    let complete = one(spans, COMPLETE);
    assert_eq!(create.service, "keel-jobs");
    assert_eq!(run.service, "keel-worker");
    assert_eq!(start.service, "keel-jobs");
    assert_eq!(complete.service, "keel-jobs");
    assert_eq!(
        run.parent_span_id, create.span_id,
        "the worker continues CreateJob's span through the Redis message"
    );
    assert_eq!(
        start.parent_span_id, run.span_id,
        "StartJob is called from the run"
    );
    assert_eq!(
        complete.parent_span_id, run.span_id,
        "CompleteJob is called from the run"
    );
    create
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_jobs_life_is_one_trace_across_services_and_redis() {
    let sandbox = Sandbox::new("traces");
    let (db, token) = tenant("traces@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let traced = |env: Env| {
        env.set(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .set("OTEL_BSP_SCHEDULE_DELAY", 100)
        .set("KEEL_LOG_FORMAT", "json")
    };

    let jobs = Service::jobs(&sandbox, &db.url, &target, traced).await;
    let jobs_addr = jobs.addr;
    let worker = Service::worker(&sandbox, jobs_addr, &target, "traced", traced);

    let client = JobsServiceClient::new(channel(jobs_addr));
    // A caller already inside a trace sends its traceparent.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = testing::authed(
        job_request("echo", &serde_json::json!({ "n": 1 }), 3),
        &token,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let continued = client
        .clone()
        .create_job(request)
        .await
        .expect("CreateJob with traceparent")
        .into_inner()
        .job
        .unwrap();
    // A caller without one: the jobs service starts the trace.
    let fresh = create_job(
        &client,
        &token,
        job_request("echo", &serde_json::json!({ "n": 2 }), 3),
    )
    .await
    .expect("CreateJob");
    for id in [&continued.id, &fresh.id] {
        testing::eventually(Duration::from_secs(60), "the job to succeed", || {
            let mut client = client.clone();
            let request = testing::authed(GetJobRequest { id: id.clone() }, &token);
            async move {
                client.get_job(request).await.is_ok_and(|r| {
                    r.into_inner().job.unwrap().status == JobStatus::Succeeded as i32
                })
            }
        })
        .await;
    }

    let spans = job_trace(&collector, caller_trace).await;
    let create = assert_job_trace(&spans);
    assert_eq!(
        create.parent_span_id, caller_span,
        "CreateJob's span is a child of the caller's"
    );

    // The second job's trace starts at its CreateJob span (no parent).
    let roots: Vec<Exported> = collector
        .spans()
        .into_iter()
        .filter(|s| s.name == CREATE && s.trace_id != caller_trace)
        .collect();
    assert_eq!(roots.len(), 1, "one other CreateJob: {roots:#?}");
    assert!(roots[0].parent_span_id.is_empty(), "{:?}", roots[0]);
    let spans = job_trace(&collector, &roots[0].trace_id).await;
    assert_job_trace(&spans);

    // Log lines carry the trace id: the worker's "job started" inside the run.
    testing::eventually(
        Duration::from_secs(10),
        "the worker's log to name the trace",
        || {
            let logs: String = worker
                .logs()
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .collect();
            let found = logs.lines().any(|l| {
                l.contains("job started") && l.contains(&format!("\"trace_id\":\"{caller_trace}\""))
            });
            async move { found }
        },
    )
    .await;

    // Health probes are not traced, and no credential is ever exported.
    let all = collector.spans();
    assert!(all.iter().all(|s| !s.name.starts_with("grpc.")), "{all:#?}");
    for s in &all {
        for a in &s.attributes {
            assert!(
                !a.contains(&token) && !a.contains(keel_faults::WORKER_TOKEN),
                "a credential in span {s:?}"
            );
        }
    }
}
