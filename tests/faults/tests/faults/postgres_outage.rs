//! Postgres outage: a private Postgres is crashed under auth, jobs, memory
//! and a worker (real processes). Every call answers UNAVAILABLE within its
//! deadline, health goes NOT_SERVING, and when Postgres returns everything
//! recovers by itself with nothing committed lost.

use std::time::Duration;

use keel_faults::{
    CALL_TIMEOUT, Env, History, PrivatePostgres, RedisTarget, Sandbox, Service, channel,
    create_job, free_addr, job_request, mixed_job, pg, report, wait_all_terminal, wait_health,
};
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{GetCurrentUserRequest, LoginRequest, RegisterRequest};
use keel_proto::jobs::v1::GetJobRequest;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{GetMemoryRequest, PutMemoryRequest};
use keel_shared::testing::{self, TestRedis};
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const JOBS: usize = 30;
const MEMORIES: usize = 20;
const EMAIL: &str = "pg-outage@example.com";
const PASSWORD: &str = "correct horse battery staple";

struct Clients {
    auth: AuthServiceClient<Channel>,
    jobs: JobsServiceClient<Channel>,
    memory: MemoryServiceClient<Channel>,
    token: String,
}

impl Clients {
    /// One call of each kind on each service: (what, result code).
    async fn probe_all(&self, job_id: &str, n: usize) -> Vec<(&'static str, tonic::Code)> {
        let bounded = CALL_TIMEOUT + Duration::from_secs(5);
        let token = &self.token;
        let mut out = Vec::new();
        macro_rules! call {
            ($what:expr, $fut:expr) => {{
                let code = match tokio::time::timeout(bounded, $fut).await {
                    Ok(Ok(_)) => tonic::Code::Ok,
                    Ok(Err(status)) => status.code(),
                    Err(_) => panic!("{} hung past its deadline", $what),
                };
                out.push(($what, code));
            }};
        }
        call!(
            "auth.Login",
            self.auth.clone().login(LoginRequest {
                email: EMAIL.into(),
                password: PASSWORD.into(),
            })
        );
        call!(
            "auth.GetCurrentUser",
            self.auth
                .clone()
                .get_current_user(testing::authed(GetCurrentUserRequest {}, token))
        );
        call!(
            "jobs.GetJob",
            self.jobs
                .clone()
                .get_job(testing::authed(GetJobRequest { id: job_id.into() }, token))
        );
        call!(
            "jobs.CreateJob",
            create_job(
                &self.jobs,
                token,
                job_request("echo", &json!({"probe": n}), 3)
            )
        );
        call!(
            "memory.PutMemory",
            self.memory
                .clone()
                .put_memory(testing::authed(put(1000 + n), token))
        );
        call!(
            "memory.GetMemory",
            self.memory.clone().get_memory(testing::authed(
                GetMemoryRequest {
                    key: key(0),
                    ..Default::default()
                },
                token
            ))
        );
        out
    }
}

fn key(i: usize) -> String {
    format!("notes/{i}")
}

fn put(i: usize) -> PutMemoryRequest {
    PutMemoryRequest {
        key: key(i),
        content: format!("memory number {i}"),
        tags: vec!["outage".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_answer_unavailable_without_postgres_and_recover_when_it_returns() {
    let sandbox = Sandbox::new("pg-outage");
    let mut postgres = match PrivatePostgres::start(&sandbox) {
        Ok(pg) => pg,
        Err(reason) => {
            report!("SKIPPED postgres outage: {reason}");
            return;
        }
    };
    let url = postgres.url();
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    let (auth_addr, jobs_addr, memory_addr, worker_addr) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let mut services = [
        Service::new(
            &sandbox,
            "auth",
            auth_addr,
            Env::auth(auth_addr, &url, &sandbox),
        ),
        Service::new(
            &sandbox,
            "jobs",
            jobs_addr,
            Env::jobs(jobs_addr, &url, &target).set("KEEL_JOBS_LEASE_MS", 3_000),
        ),
        Service::new(
            &sandbox,
            "memory",
            memory_addr,
            Env::memory(memory_addr, &url),
        ),
        Service::new(
            &sandbox,
            "worker",
            worker_addr,
            Env::worker(worker_addr, jobs_addr, &target, "w"),
        ),
    ];
    for s in &mut services {
        s.start();
    }
    for s in &mut services {
        s.wait_serving().await;
    }

    let mut auth = AuthServiceClient::new(channel(auth_addr));
    let token = auth
        .register(RegisterRequest {
            email: EMAIL.into(),
            password: PASSWORD.into(),
            display_name: "Outage".into(),
        })
        .await
        .expect("Register")
        .into_inner()
        .tokens
        .expect("tokens")
        .access_token;
    let clients = Clients {
        auth,
        jobs: JobsServiceClient::new(channel(jobs_addr)),
        memory: MemoryServiceClient::new(channel(memory_addr)),
        token,
    };
    let mut job_ids = Vec::new();
    for i in 0..JOBS {
        let job = create_job(&clients.jobs, &clients.token, mixed_job(i))
            .await
            .expect("CreateJob");
        job_ids.push(job.id);
    }
    for i in 0..MEMORIES {
        clients
            .memory
            .clone()
            .put_memory(testing::authed(put(i), &clients.token))
            .await
            .expect("PutMemory");
    }

    postgres.crash();
    report!("postgres outage: Postgres crashed (pg_ctl stop -m immediate)");
    let during = clients.probe_all(&job_ids[0], 1).await;
    for s in &services {
        wait_health(s.addr, ServingStatus::NotServing, s.name).await;
    }
    // Once more, now that every pool has noticed.
    let later = clients.probe_all(&job_ids[0], 2).await;
    for s in &mut services {
        s.assert_alive();
    }
    report!(
        "postgres outage: calls while down: {during:?}, then {later:?}; every health NOT_SERVING"
    );
    for (what, code) in during.iter().chain(&later) {
        assert_eq!(
            *code,
            tonic::Code::Unavailable,
            "{what} while Postgres is down"
        );
    }

    postgres.start_server();
    report!("postgres outage: Postgres back");
    for s in &mut services {
        s.wait_serving().await;
    }
    let after = clients.probe_all(&job_ids[0], 3).await;
    report!("postgres outage: calls after recovery: {after:?}");
    for (what, code) in &after {
        assert_eq!(*code, tonic::Code::Ok, "{what} after Postgres returned");
    }

    let history = pg(&url).await;
    wait_all_terminal(&history, JOBS as i64 + 1).await;
    let h = History::read(&history).await;
    for id in &job_ids {
        let row = history
            .query_one("SELECT status FROM jobs WHERE id = $1::text::uuid", &[id])
            .await
            .unwrap_or_else(|e| panic!("committed job {id} lost: {e}"));
        assert_eq!(row.get::<_, String>(0), "succeeded", "job {id}");
    }
    let mut memories = 0;
    for i in 0..MEMORIES {
        let memory = clients
            .memory
            .clone()
            .get_memory(testing::authed(
                GetMemoryRequest {
                    key: key(i),
                    ..Default::default()
                },
                &clients.token,
            ))
            .await
            .unwrap_or_else(|s| panic!("committed memory {i} lost: {s:?}"))
            .into_inner()
            .memory
            .expect("memory");
        assert_eq!(memory.content, format!("memory number {i}"));
        memories += 1;
    }
    report!(
        "postgres outage: 1 outage survived by 4 services; {} jobs, by status {:?}; {memories} \
         of {MEMORIES} memories intact",
        h.jobs,
        h.by_status
    );
    assert_eq!(h.succeeded_twice, 0);
}
