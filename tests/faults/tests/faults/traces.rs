//! Traces: the real keel-jobs and keel-worker export OpenTelemetry spans over
//! OTLP/gRPC to a collector run by the test, and one job's life (CreateJob,
//! the worker's run through the Redis message, StartJob, CompleteJob) is one
//! trace, continuing the caller's `traceparent` when it sends one. A
//! transition the worker sends in a batched StartJobs/CompleteJobs call is
//! in that call's trace instead, linked from the job's run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_faults::{Env, RedisTarget, Sandbox, Service, channel, create_job, job_request, tenant};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{BatchCreateJobsRequest, GetJobRequest, JobStatus};
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
    /// (trace id, span id) of each linked span.
    links: Vec<(String, String)>,
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
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
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
const BATCH_CREATE: &str = "keel.jobs.v1.JobsService/BatchCreateJobs";
const RUN: &str = "keel.worker/RunJob";

/// A transition as sent alone (`single`, a keel-jobs span) or batched (the
/// worker's span for the batched call, and keel-jobs' span for it).
struct Transition {
    single: &'static str,
    batch_call: &'static str,
    batch_rpc: &'static str,
}

const START: Transition = Transition {
    single: "keel.jobs.v1.JobRunnerService/StartJob",
    batch_call: "keel.worker/StartJobs",
    batch_rpc: "keel.jobs.v1.JobRunnerService/StartJobs",
};
const COMPLETE: Transition = Transition {
    single: "keel.jobs.v1.JobRunnerService/CompleteJob",
    batch_call: "keel.worker/CompleteJobs",
    batch_rpc: "keel.jobs.v1.JobRunnerService/CompleteJobs",
};

/// How keel-jobs received one transition of a run.
#[derive(Debug)]
enum Recorded<'a> {
    /// Its own call: a child of the run.
    Single(&'a Exported),
    /// A batched call: the worker's span links to the run, keel-jobs' span
    /// (if exported yet) is that span's child.
    Batched(&'a Exported, Option<&'a Exported>),
}

/// Every way `t` of `run` shows in `all` (one, once all is exported).
fn recorded<'a>(all: &'a [Exported], run: &Exported, t: &Transition) -> Vec<Recorded<'a>> {
    let singles = all.iter().filter(|s| {
        s.name == t.single && s.trace_id == run.trace_id && s.parent_span_id == run.span_id
    });
    let batched = all
        .iter()
        .filter(|s| {
            s.name == t.batch_call
                && s.links
                    .contains(&(run.trace_id.clone(), run.span_id.clone()))
        })
        .map(|call| {
            let rpc = all.iter().find(|s| {
                s.name == t.batch_rpc
                    && s.trace_id == call.trace_id
                    && s.parent_span_id == call.span_id
            });
            Recorded::Batched(call, rpc)
        });
    singles.map(Recorded::Single).chain(batched).collect()
}

/// Whether both transitions of `run` are exported, whichever way they went.
fn transitions_exported(all: &[Exported], run: &Exported) -> bool {
    [START, COMPLETE].iter().all(|t| {
        recorded(all, run, t)
            .iter()
            .any(|r| matches!(r, Recorded::Single(_) | Recorded::Batched(_, Some(_))))
    })
}

/// Waits until the spans of the runs that are children of span `parent` in
/// trace `trace_id` (`runs` of them) are exported with both transitions each.
async fn runs_exported(collector: &Collector, trace_id: &str, parent: &str, runs: usize) {
    testing::eventually(
        Duration::from_secs(60),
        "the jobs' spans to be exported",
        || {
            let all = collector.spans();
            let done = {
                let found: Vec<&Exported> = all
                    .iter()
                    .filter(|s| {
                        s.name == RUN && s.trace_id == trace_id && s.parent_span_id == parent
                    })
                    .collect();
                found.len() >= runs && found.iter().all(|run| transitions_exported(&all, run))
            };
            async move { done }
        },
    )
    .await;
}

fn one<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let matching: Vec<&Exported> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(matching.len(), 1, "one {name} span in {spans:#?}");
    matching[0]
}

/// Checks how `run`'s StartJob and CompleteJob reached keel-jobs: each once,
/// from the run (its child, or a batched call linked to it). Returns how
/// many went batched.
fn assert_transitions(all: &[Exported], run: &Exported) -> usize {
    assert_eq!(run.service, "keel-worker");
    let mut batched = 0;
    for t in [START, COMPLETE] {
        let found = recorded(all, run, &t);
        assert_eq!(
            found.len(),
            1,
            "{} of run {run:?} once: {found:#?}",
            t.single
        );
        match found[0] {
            Recorded::Single(span) => assert_eq!(span.service, "keel-jobs"),
            Recorded::Batched(call, rpc) => {
                assert_eq!(call.service, "keel-worker");
                let rpc = rpc.expect("keel-jobs' span of the batched call");
                assert_eq!(rpc.service, "keel-jobs");
                batched += 1;
            }
        }
    }
    batched
}

/// Checks the shape of one job's trace: CreateJob (keel-jobs) -> RunJob
/// (keel-worker) -> StartJob and CompleteJob (see [`assert_transitions`]).
fn assert_job_trace<'a>(all: &'a [Exported], trace_id: &str) -> &'a Exported {
    let spans: Vec<Exported> = all
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    let create = one(&spans, CREATE);
    let run = one(&spans, RUN);
    assert_eq!(create.service, "keel-jobs");
    assert_eq!(
        run.parent_span_id, create.span_id,
        "the worker continues CreateJob's span through the Redis message"
    );
    assert_transitions(all, run);
    all.iter()
        .find(|s| s.span_id == create.span_id)
        .expect("CreateJob")
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

    let caller_create = || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.name == CREATE && s.trace_id == caller_trace)
    };
    testing::eventually(Duration::from_secs(60), "CreateJob's span", || {
        let found = caller_create().is_some();
        async move { found }
    })
    .await;
    let create = caller_create().unwrap();
    runs_exported(&collector, caller_trace, &create.span_id, 1).await;
    let all = collector.spans();
    let create = assert_job_trace(&all, caller_trace);
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
    runs_exported(&collector, &roots[0].trace_id, &roots[0].span_id, 1).await;
    assert_job_trace(&collector.spans(), &roots[0].trace_id);

    // Jobs created together run together: the worker sends their
    // transitions in batched calls, each linked to every run it carries.
    let n = 24;
    let requests = (0..n)
        .map(|i| job_request("echo", &serde_json::json!({ "i": i }), 3))
        .collect();
    let created = client
        .clone()
        .batch_create_jobs(testing::authed(BatchCreateJobsRequest { requests }, &token))
        .await
        .expect("BatchCreateJobs")
        .into_inner()
        .jobs;
    assert_eq!(created.len(), n);
    let batch_create = || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.name == BATCH_CREATE)
    };
    testing::eventually(Duration::from_secs(60), "BatchCreateJobs' span", || {
        let found = batch_create().is_some();
        async move { found }
    })
    .await;
    let batch = batch_create().unwrap();
    runs_exported(&collector, &batch.trace_id, &batch.span_id, n).await;
    let all = collector.spans();
    let runs: Vec<&Exported> = all
        .iter()
        .filter(|s| s.name == RUN && s.parent_span_id == batch.span_id)
        .collect();
    assert_eq!(runs.len(), n, "one run per job");
    let batched: usize = runs.iter().map(|run| assert_transitions(&all, run)).sum();
    eprintln!("faults: traces: {batched} of {} transitions batched", 2 * n);
    assert!(
        batched > 0,
        "24 jobs at once, 4 handlers: some transitions batched"
    );

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
