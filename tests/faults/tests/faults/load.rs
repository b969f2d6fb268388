//! Sustained mixed load (not for CI: `#[ignore]`d; see RELIABILITY.md):
//! every service under a steady mix of calls for minutes, with no errors and
//! flat memory (RSS at the end within 20% of after warm-up).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_faults::{
    Env, RedisTarget, Sandbox, Service, channel, create_job, free_addr, job_request, pg, report,
    wait_all_terminal,
};
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{GetCurrentUserRequest, LoginRequest, RegisterRequest};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{GetJobRequest, ListJobsRequest};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{GetMemoryRequest, PutMemoryRequest, SearchMemoriesRequest};
use keel_shared::testing::{self, TestDb, TestRedis};
use serde_json::json;
use tonic::transport::Channel;

const CLIENTS: u64 = 8;
const PASSWORD: &str = "correct horse battery staple";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone)]
struct Clients {
    auth: AuthServiceClient<Channel>,
    jobs: JobsServiceClient<Channel>,
    memory: MemoryServiceClient<Channel>,
    token: String,
    email: String,
}

impl Clients {
    /// One call of the mix; Err(what) on any non-OK answer.
    async fn step(&self, client: u64, i: u64, last_job: &mut Option<String>) -> Result<(), String> {
        let token = &self.token;
        let fail = |what: &str, s: tonic::Status| format!("{what}: {:?} {}", s.code(), s.message());
        match i % 10 {
            0..=2 => {
                let request = if i % 20 < 10 {
                    job_request("echo", &json!({ "client": client, "i": i }), 3)
                } else {
                    job_request("sleep", &json!({ "ms": 20 }), 3)
                };
                let job = create_job(&self.jobs, token, request)
                    .await
                    .map_err(|s| fail("CreateJob", s))?;
                *last_job = Some(job.id);
            }
            3 => {
                if let Some(id) = last_job.clone() {
                    self.jobs
                        .clone()
                        .get_job(testing::authed(GetJobRequest { id }, token))
                        .await
                        .map_err(|s| fail("GetJob", s))?;
                }
            }
            4 => {
                let request = ListJobsRequest {
                    page_size: 20,
                    ..Default::default()
                };
                self.jobs
                    .clone()
                    .list_jobs(testing::authed(request, token))
                    .await
                    .map_err(|s| fail("ListJobs", s))?;
            }
            5 | 6 => {
                let request = PutMemoryRequest {
                    key: format!("load/{client}/{}", i % 50),
                    content: format!("client {client} wrote note {i} about sustained load"),
                    tags: vec![format!("c{client}"), "load".into()],
                    ..Default::default()
                };
                self.memory
                    .clone()
                    .put_memory(testing::authed(request, token))
                    .await
                    .map_err(|s| fail("PutMemory", s))?;
            }
            7 => {
                let request = GetMemoryRequest {
                    key: format!("load/{client}/{}", (i / 10) % 50),
                    ..Default::default()
                };
                match self
                    .memory
                    .clone()
                    .get_memory(testing::authed(request, token))
                    .await
                {
                    // Not written yet early in the run.
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(fail("GetMemory", s)),
                }
            }
            8 => {
                let request = SearchMemoriesRequest {
                    query: "sustained note".into(),
                    limit: 10,
                    ..Default::default()
                };
                self.memory
                    .clone()
                    .search_memories(testing::authed(request, token))
                    .await
                    .map_err(|s| fail("SearchMemories", s))?;
            }
            _ => {
                if i % 100 == 9 {
                    self.auth
                        .clone()
                        .login(LoginRequest {
                            email: self.email.clone(),
                            password: PASSWORD.into(),
                        })
                        .await
                        .map_err(|s| fail("Login", s))?;
                } else {
                    self.auth
                        .clone()
                        .get_current_user(testing::authed(GetCurrentUserRequest {}, token))
                        .await
                        .map_err(|s| fail("GetCurrentUser", s))?;
                }
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes of load: run by hand, see RELIABILITY.md"]
async fn sustained_mixed_load_has_no_errors_and_flat_memory() {
    let seconds = env_u64("KEEL_FAULTS_LOAD_SECS", 120);
    let warm_up = Duration::from_secs((seconds / 6).max(5));
    let sandbox = Sandbox::new("load");
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    let (auth_addr, jobs_addr, memory_addr) = (free_addr(), free_addr(), free_addr());
    let mut services = vec![
        Service::new(
            &sandbox,
            "auth",
            auth_addr,
            Env::auth(auth_addr, &db.url, &sandbox),
        ),
        Service::new(
            &sandbox,
            "jobs",
            jobs_addr,
            Env::jobs(jobs_addr, &db.url, &target),
        ),
        Service::new(
            &sandbox,
            "memory",
            memory_addr,
            Env::memory(memory_addr, &db.url),
        ),
    ];
    for n in 0..2 {
        let addr = free_addr();
        services.push(Service::new(
            &sandbox,
            "worker",
            addr,
            Env::worker(addr, jobs_addr, &target, &format!("load-{n}"))
                .set("KEEL_WORKER_CONCURRENCY", 8)
                .set("RUST_LOG", "warn"),
        ));
    }
    for s in &mut services {
        s.set_env("RUST_LOG", "warn");
        s.start();
    }
    for s in &mut services {
        s.wait_serving().await;
    }

    // One user per client: a user's concurrent logins are not this test's subject.
    let base = Clients {
        auth: AuthServiceClient::new(channel(auth_addr)),
        jobs: JobsServiceClient::new(channel(jobs_addr)),
        memory: MemoryServiceClient::new(channel(memory_addr)),
        token: String::new(),
        email: String::new(),
    };
    let mut users = Vec::new();
    for client in 0..CLIENTS {
        let email = format!("load-{client}@example.com");
        let token = base
            .auth
            .clone()
            .register(RegisterRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: format!("Load {client}"),
            })
            .await
            .expect("Register")
            .into_inner()
            .tokens
            .expect("tokens")
            .access_token;
        users.push(Clients {
            token,
            email,
            ..base.clone()
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (client, clients) in (0..CLIENTS).zip(users) {
        let (stop, calls, errors) = (stop.clone(), calls.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut last_job = None;
            let mut i = client;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = clients.step(client, i, &mut last_job).await {
                    errors.lock().expect("errors").push(e);
                }
                calls.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    tokio::time::sleep(warm_up).await;
    let warm: Vec<Option<u64>> = services.iter().map(Service::rss_kib).collect();
    let warm_calls = calls.load(Ordering::Relaxed);
    report!("load: after {warm_up:?} warm-up, {warm_calls} calls; RSS KiB {warm:?}");
    tokio::time::sleep(Duration::from_secs(seconds) - warm_up).await;
    let end: Vec<Option<u64>> = services.iter().map(Service::rss_kib).collect();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    let total = calls.load(Ordering::Relaxed);
    let errors = errors.lock().expect("errors").clone();

    let history = pg(&db.url).await;
    wait_all_terminal(&history, 1).await;
    let rows = history
        .query("SELECT status, count(*) FROM jobs GROUP BY status", &[])
        .await
        .expect("jobs by status");
    let by_status: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    report!(
        "load: {seconds} s, {CLIENTS} clients: {total} calls ({:.0}/s), {} errors {:?}; jobs {by_status:?}",
        total as f64 / seconds as f64,
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    for ((s, w), e) in services.iter_mut().zip(&warm).zip(&end) {
        let (w, e) = (w.expect("RSS after warm-up"), e.expect("RSS at the end"));
        report!(
            "load: keel-{} RSS {w} KiB after warm-up, {e} KiB at the end ({:+.1}%)",
            s.name,
            (e as f64 / w as f64 - 1.0) * 100.0
        );
        s.assert_alive();
    }
    assert!(
        errors.is_empty(),
        "{} calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(
        by_status.iter().all(|(s, _)| s == "succeeded"),
        "{by_status:?}"
    );
    for ((s, w), e) in services.iter().zip(&warm).zip(&end) {
        let (w, e) = (w.unwrap_or(0), e.unwrap_or(0));
        assert!(
            e as f64 <= w as f64 * 1.2,
            "keel-{} RSS grew from {w} KiB to {e} KiB",
            s.name
        );
    }
}
