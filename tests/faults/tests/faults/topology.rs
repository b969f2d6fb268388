//! Every service at three replicas: 3 keel-auth, 3 keel-jobs, 3 keel-memory
//! and 3 keel-worker processes on one database and one Redis, their clients
//! spreading calls over the replicas (`grpc_client::balanced_channel`, the
//! workers through a three-URL KEEL_JOBS_URL). A mixed load (register and
//! login, CreateJob, memory writes and reads with an API key, an
//! every-second schedule) runs while one replica of each service in turn is
//! SIGKILLed and restarted. Then the state that lives outside any one
//! process is checked across replicas: the login rate limit, API-key and
//! session revocation, conditional memory writes, WatchJob, and that the
//! outbox relay, lease reaper and schedule ticks acted exactly once.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_faults::{
    CLAIM_KIND, History, RedisTarget, Sandbox, Service, WAIT, WORKER_TOKEN, balanced_channel,
    channel, create_job, job_request, mixed_job, pg, report, stream_channel, urls,
    wait_all_terminal,
};
use keel_faults::{Env, free_addr};
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{
    CreateApiKeyRequest, LoginRequest, LogoutAllRequest, RegisterRequest, RevokeApiKeyRequest,
};
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::schedule_service_client::ScheduleServiceClient;
use keel_proto::jobs::v1::{
    ClaimJobsRequest, CompleteJobRequest, CreateScheduleRequest, DeleteScheduleRequest, JobStatus,
    ListJobsRequest, WatchJobRequest,
};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{GetMemoryRequest, ListMemoriesRequest, PutMemoryRequest};
use keel_shared::testing::{TestDb, TestRedis, authed};
use tonic::transport::Channel;
use tonic::{Code, Status};

const REPLICAS: usize = 3;
const PRODUCERS: usize = 2;
const PASSWORD: &str = "correct horse battery";
/// Each process remembers a session's or API key's answer this long.
const CREDENTIAL_CACHE_SECS: u64 = 1;
/// Bound on revocation reaching every replica: a few cache periods (the
/// processes share 2 cores with eleven others).
const REVOCATION_BOUND: Duration = Duration::from_secs(5 * CREDENTIAL_CACHE_SECS + 5);
/// WatchJob's Postgres re-read, set long so that a watch seeing another
/// replica's transition within [`WATCH_BOUND`] saw it through Redis pub/sub.
const WATCH_POLL_MS: u64 = 60_000;
const WATCH_BOUND: Duration = Duration::from_secs(20);
const LOGIN_MAX_FAILURES: usize = 5;
const RACES: usize = 8;

/// What the load saw: acknowledged work, UNAVAILABLE answers retried, and
/// every other error (there must be none).
#[derive(Default)]
struct Seen {
    retried: AtomicUsize,
    unexpected: Mutex<Vec<String>>,
    jobs_acked: Mutex<Vec<String>>,
    registered: AtomicUsize,
    /// Registers retried after an UNAVAILABLE whose first try had committed.
    registered_on_retry: AtomicUsize,
    logins: AtomicUsize,
    memories: AtomicUsize,
}

impl Seen {
    fn unexpected(&self, what: &str, status: &Status) {
        self.unexpected.lock().unwrap().push(format!(
            "{what}: {:?} {}",
            status.code(),
            status.message()
        ));
    }
}

/// Calls `call` until it answers anything but UNAVAILABLE (what a replica
/// that is down or restarting answers, documented as retryable), up to
/// [`WAIT`]; the answer and how many tries it took.
async fn retrying<T, F, Fut>(seen: &Seen, mut call: F) -> (Result<T, Status>, usize)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Err(s) if s.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                seen.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return (answer, tries),
        }
    }
}

fn register_request(email: &str, password: &str) -> RegisterRequest {
    RegisterRequest {
        email: email.into(),
        password: password.into(),
        display_name: "Topology".into(),
    }
}

fn login_request(email: &str, password: &str) -> LoginRequest {
    LoginRequest {
        email: email.into(),
        password: password.into(),
    }
}

/// Registers `email` through `auth` and returns its access token.
async fn register(auth: Channel, email: &str) -> String {
    AuthServiceClient::new(auth)
        .register(register_request(email, PASSWORD))
        .await
        .unwrap_or_else(|s| panic!("register {email}: {s:?}"))
        .into_inner()
        .tokens
        .expect("tokens")
        .access_token
}

fn addrs(services: &[Service]) -> Vec<SocketAddr> {
    services.iter().map(|s| s.addr).collect()
}

/// SIGKILL, a short pause, start again and wait until SERVING.
async fn bounce(service: &mut Service, index: usize, seen: &Seen) {
    service.sigkill();
    report!(
        "topology: SIGKILL of keel-{} replica {index} with {} jobs acknowledged",
        service.name,
        seen.jobs_acked.lock().unwrap().len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    service.start();
    service.wait_serving().await;
}

/// The code each replica answers a `ListJobs` and a `ListMemories` with
/// `credential`: Ok (as `Code::Ok`) or the error's.
async fn answers_with(jobs: &[SocketAddr], memory: &[SocketAddr], credential: &str) -> Vec<Code> {
    let mut codes = Vec::new();
    for addr in jobs {
        let reply = JobsServiceClient::new(channel(*addr))
            .list_jobs(authed(ListJobsRequest::default(), credential))
            .await;
        codes.push(reply.map_or_else(|s| s.code(), |_| Code::Ok));
    }
    for addr in memory {
        let reply = MemoryServiceClient::new(channel(*addr))
            .list_memories(authed(ListMemoriesRequest::default(), credential))
            .await;
        codes.push(reply.map_or_else(|s| s.code(), |_| Code::Ok));
    }
    codes
}

/// Waits (up to [`REVOCATION_BOUND`]) until every jobs and memory replica
/// refuses `credential` with UNAUTHENTICATED; how long that took.
async fn wait_refused_everywhere(
    jobs: &[SocketAddr],
    memory: &[SocketAddr],
    credential: &str,
    what: &str,
) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let codes = answers_with(jobs, memory, credential).await;
        if codes.iter().all(|c| *c == Code::Unauthenticated) {
            return start.elapsed();
        }
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, Code::Ok | Code::Unauthenticated)),
            "{what}: unexpected answers {codes:?}"
        );
        assert!(
            start.elapsed() < REVOCATION_BOUND,
            "{what}: still accepted after {REVOCATION_BOUND:?}: {codes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_of_everything_under_sigkills_keep_every_promise() {
    let sandbox = Sandbox::new("topology");
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);
    let cache = CREDENTIAL_CACHE_SECS.to_string();

    // Start every server process first, then wait for them together.
    let mut auth = Vec::new();
    let mut memory = Vec::new();
    for _ in 0..REPLICAS {
        let addr = free_addr();
        let env = Env::auth(addr, &db.url, &sandbox)
            .set("KEEL_LOGIN_MAX_FAILURES", LOGIN_MAX_FAILURES)
            .set("KEEL_CREDENTIAL_CACHE_SECS", &cache);
        auth.push(Service::new(&sandbox, "auth", addr, env));
        let addr = free_addr();
        let env = Env::memory(addr, &db.url).set("KEEL_CREDENTIAL_CACHE_SECS", &cache);
        memory.push(Service::new(&sandbox, "memory", addr, env));
    }
    for service in auth.iter_mut().chain(memory.iter_mut()) {
        service.start();
    }
    let mut jobs = Vec::new();
    for _ in 0..REPLICAS {
        jobs.push(
            Service::jobs(&sandbox, &db.url, &target, |env| {
                env.set("KEEL_CREDENTIAL_CACHE_SECS", &cache)
                    .set("KEEL_JOBS_LEASE_MS", 3_000)
                    .set("KEEL_JOBS_WATCH_POLL_MS", WATCH_POLL_MS)
                    .set("KEEL_SCHEDULE_MIN_INTERVAL_SECS", 1)
                    .set("KEEL_SCHEDULE_TICK_MS", 200)
            })
            .await,
        );
    }
    for service in auth.iter_mut().chain(memory.iter_mut()) {
        service.wait_serving().await;
    }
    let (auth_addrs, jobs_addrs, memory_addrs) = (addrs(&auth), addrs(&jobs), addrs(&memory));
    let mut workers = Vec::new();
    for w in 0..REPLICAS {
        workers.push(Service::worker(
            &sandbox,
            jobs_addrs[0],
            &target,
            &format!("w{w}"),
            |env| env.set("KEEL_JOBS_URL", urls(&jobs_addrs)),
        ));
    }
    for worker in &mut workers {
        worker.wait_serving().await;
    }
    report!("topology: 3 auth, 3 jobs, 3 memory and 3 worker processes SERVING");

    let auth_lb = balanced_channel(&auth_addrs);
    let jobs_lb = balanced_channel(&jobs_addrs);
    let memory_lb = balanced_channel(&memory_addrs);
    let token = register(channel(auth_addrs[0]), "topology@example.com").await;
    let api_key = AuthServiceClient::new(auth_lb.clone())
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: "load".into(),
                expires_at: None,
            },
            &token,
        ))
        .await
        .expect("create API key")
        .into_inner()
        .api_key;
    let schedule = ScheduleServiceClient::new(jobs_lb.clone())
        .create_schedule(authed(
            CreateScheduleRequest {
                name: "every-second".into(),
                cron: "* * * * * *".into(),
                kind: "echo".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("create schedule")
        .into_inner()
        .schedule
        .expect("the schedule");

    // The mixed load, through the balanced channels.
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for p in 0..PRODUCERS {
        let client = JobsServiceClient::new(jobs_lb.clone());
        let (seen, stop, token) = (seen.clone(), stop.clone(), token.clone());
        load.push(tokio::spawn(async move {
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                let mut request = mixed_job(i);
                // A retry of a call whose answer a kill lost returns the same job.
                request.idempotency_key = format!("topology-{i}");
                let create = || {
                    let (mut client, request) = (client.clone(), authed(request.clone(), &token));
                    async move {
                        let job = client.create_job(request).await?.into_inner().job;
                        Ok(job.expect("CreateJob returns the job"))
                    }
                };
                match retrying(&seen, create).await.0 {
                    Ok(job) => seen.jobs_acked.lock().unwrap().push(job.id),
                    Err(s) => seen.unexpected("CreateJob", &s),
                }
                i += PRODUCERS;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let client = AuthServiceClient::new(auth_lb.clone());
        let (seen, stop) = (seen.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let email = format!("load-{n}@example.com");
                let (answer, tries) = retrying(&seen, || {
                    let (mut client, request) =
                        (client.clone(), register_request(&email, PASSWORD));
                    async move { client.register(request).await }
                })
                .await;
                match answer {
                    Ok(_) => {
                        seen.registered.fetch_add(1, Ordering::Relaxed);
                    }
                    // The first try committed but its answer was lost in a kill.
                    Err(s) if s.code() == Code::AlreadyExists && tries > 1 => {
                        seen.registered_on_retry.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => seen.unexpected("Register", &s),
                }
                let login = retrying(&seen, || {
                    let (mut client, request) = (client.clone(), login_request(&email, PASSWORD));
                    async move { client.login(request).await }
                })
                .await
                .0;
                match login {
                    Ok(_) => {
                        seen.logins.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => seen.unexpected("Login", &s),
                }
                n += 1;
            }
        }));
    }
    {
        let client = MemoryServiceClient::new(memory_lb.clone());
        let (seen, stop, api_key) = (seen.clone(), stop.clone(), api_key.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load-{i}");
                let put = retrying(&seen, || {
                    let mut client = client.clone();
                    let request = authed(
                        PutMemoryRequest {
                            key: key.clone(),
                            content: format!("content {i}"),
                            ..Default::default()
                        },
                        &api_key,
                    );
                    async move { client.put_memory(request).await }
                })
                .await
                .0;
                if let Err(s) = put {
                    seen.unexpected("PutMemory", &s);
                    continue;
                }
                let got = retrying(&seen, || {
                    let mut client = client.clone();
                    let request = authed(
                        GetMemoryRequest {
                            key: key.clone(),
                            ..Default::default()
                        },
                        &api_key,
                    );
                    async move { client.get_memory(request).await }
                })
                .await
                .0;
                match got.map(|r| r.into_inner().memory.unwrap_or_default().content) {
                    Ok(content) if content == format!("content {i}") => {
                        seen.memories.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(content) => seen.unexpected(
                        "GetMemory",
                        &Status::data_loss(format!("{key} reads {content:?}")),
                    ),
                    Err(s) => seen.unexpected("GetMemory", &s),
                }
                i += 1;
            }
        }));
    }

    // One replica of each service in turn, each a different one.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    bounce(&mut auth[0], 0, &seen).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bounce(&mut jobs[1], 1, &seen).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bounce(&mut memory[2], 2, &seen).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bounce(&mut workers[0], 0, &seen).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let (answer, _) = retrying(&seen, || {
        let mut client = ScheduleServiceClient::new(jobs_lb.clone());
        let request = authed(
            DeleteScheduleRequest {
                id: schedule.id.clone(),
            },
            &token,
        );
        async move { client.delete_schedule(request).await }
    })
    .await;
    answer.expect("delete the schedule");
    report!(
        "topology: load done: {} CreateJob acknowledged, {} users registered (+{} whose answer \
         a kill lost), {} logins, {} memories written and read back with an API key; {} \
         UNAVAILABLE answers retried",
        seen.jobs_acked.lock().unwrap().len(),
        seen.registered.load(Ordering::Relaxed),
        seen.registered_on_retry.load(Ordering::Relaxed),
        seen.logins.load(Ordering::Relaxed),
        seen.memories.load(Ordering::Relaxed),
        seen.retried.load(Ordering::Relaxed),
    );

    // Login rate limit: failures spread over the auth replicas count
    // together, and the account is locked on every replica at the limit.
    register(channel(auth_addrs[0]), "victim@example.com").await;
    for attempt in 0..LOGIN_MAX_FAILURES {
        let addr = auth_addrs[attempt % REPLICAS];
        let status = AuthServiceClient::new(channel(addr))
            .login(login_request("victim@example.com", "wrong password"))
            .await
            .expect_err("a wrong password");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "failure {attempt} on {addr}"
        );
    }
    for addr in &auth_addrs {
        let status = AuthServiceClient::new(channel(*addr))
            .login(login_request("victim@example.com", PASSWORD))
            .await
            .expect_err("locked out");
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "right password on {addr}"
        );
    }

    // API-key revocation and LogoutAll on one auth replica reach every jobs
    // and memory replica within the credential cache period.
    let user_token = register(channel(auth_addrs[1]), "revoke@example.com").await;
    let created = AuthServiceClient::new(channel(auth_addrs[2]))
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: "revoked".into(),
                expires_at: None,
            },
            &user_token,
        ))
        .await
        .expect("create API key")
        .into_inner();
    let key_id = created.key.expect("the key").id;
    // Every replica has both credentials' answers cached.
    for credential in [&created.api_key, &user_token] {
        let codes = answers_with(&jobs_addrs, &memory_addrs, credential).await;
        assert!(codes.iter().all(|c| *c == Code::Ok), "{codes:?}");
    }
    AuthServiceClient::new(channel(auth_addrs[0]))
        .revoke_api_key(authed(RevokeApiKeyRequest { id: key_id }, &user_token))
        .await
        .expect("revoke");
    let key_refused =
        wait_refused_everywhere(&jobs_addrs, &memory_addrs, &created.api_key, "revoked key").await;
    let codes = answers_with(&jobs_addrs, &memory_addrs, &user_token).await;
    assert!(
        codes.iter().all(|c| *c == Code::Ok),
        "the session lives on: {codes:?}"
    );
    AuthServiceClient::new(channel(auth_addrs[1]))
        .logout_all(authed(LogoutAllRequest {}, &user_token))
        .await
        .expect("logout all");
    let session_refused =
        wait_refused_everywhere(&jobs_addrs, &memory_addrs, &user_token, "ended session").await;

    // Conditional writes racing on three memory replicas: exactly one wins.
    let mut winners: HashMap<usize, usize> = HashMap::new();
    for race in 0..RACES {
        let key = format!("race-{race}");
        let put = |addr: SocketAddr, content: String, expected_version: i64| {
            let (key, api_key) = (key.clone(), api_key.clone());
            async move {
                MemoryServiceClient::new(channel(addr))
                    .put_memory(authed(
                        PutMemoryRequest {
                            key,
                            content,
                            expected_version,
                            ..Default::default()
                        },
                        &api_key,
                    ))
                    .await
            }
        };
        let first = put(memory_addrs[race % REPLICAS], "start".into(), 0)
            .await
            .expect("first write")
            .into_inner()
            .memory
            .expect("memory");
        let answers = futures::future::join_all(
            memory_addrs
                .iter()
                .enumerate()
                .map(|(r, addr)| put(*addr, format!("replica {r}"), first.version)),
        )
        .await;
        let won: Vec<usize> = (0..REPLICAS).filter(|r| answers[*r].is_ok()).collect();
        for (r, answer) in answers.iter().enumerate() {
            if let Err(s) = answer {
                assert_eq!(s.code(), Code::Aborted, "race {race}, replica {r}: {s:?}");
            }
        }
        assert_eq!(won.len(), 1, "race {race}: winners {won:?}");
        *winners.entry(won[0]).or_default() += 1;
        let stored = MemoryServiceClient::new(channel(memory_addrs[(race + 1) % REPLICAS]))
            .get_memory(authed(
                GetMemoryRequest {
                    key: key.clone(),
                    ..Default::default()
                },
                &api_key,
            ))
            .await
            .expect("read back")
            .into_inner()
            .memory
            .expect("memory");
        assert_eq!(stored.version, first.version + 1, "race {race}");
        assert_eq!(stored.content, format!("replica {}", won[0]), "race {race}");
    }

    // WatchJob on two replicas sees a job claimed and completed through the
    // third one (Redis pub/sub: the watches' own re-read is a minute away).
    let job = create_job(
        &JobsServiceClient::new(channel(jobs_addrs[0])),
        &token,
        job_request(CLAIM_KIND, &serde_json::json!({}), 3),
    )
    .await
    .expect("create the watched job");
    let mut watches = Vec::new();
    for addr in &jobs_addrs[..2] {
        let mut stream = JobsServiceClient::new(stream_channel(*addr))
            .watch_job(authed(WatchJobRequest { id: job.id.clone() }, &token))
            .await
            .expect("watch")
            .into_inner();
        let first = stream.message().await.expect("first update").expect("job");
        assert_eq!(first.job.expect("job").status(), JobStatus::Queued);
        watches.push(stream);
    }
    let mut runner = JobRunnerServiceClient::new(channel(jobs_addrs[2]));
    let claimed = runner
        .claim_jobs(authed(
            ClaimJobsRequest {
                worker_id: "topology-claimer".into(),
                kinds: vec![CLAIM_KIND.into()],
                max_jobs: 1,
                wait: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
            },
            WORKER_TOKEN,
        ))
        .await
        .expect("claim")
        .into_inner()
        .jobs;
    let claimed = claimed
        .first()
        .and_then(|c| c.job.clone())
        .expect("the job");
    assert_eq!(claimed.id, job.id);
    runner
        .complete_job(authed(
            CompleteJobRequest {
                id: job.id.clone(),
                attempt: claimed.attempt,
                worker_id: "topology-claimer".into(),
                ..Default::default()
            },
            WORKER_TOKEN,
        ))
        .await
        .expect("complete");
    for (r, stream) in watches.iter_mut().enumerate() {
        let terminal = tokio::time::timeout(WATCH_BOUND, async {
            loop {
                let update = stream.message().await.expect("watch update");
                let status = update
                    .expect("a terminal update")
                    .job
                    .expect("job")
                    .status();
                if status != JobStatus::Queued && status != JobStatus::Running {
                    return status;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the watch on jobs replica {r} missed the completion"));
        assert_eq!(terminal, JobStatus::Succeeded, "watch on jobs replica {r}");
    }

    // Nothing lost, nothing run twice; the relay, reaper and schedule acted
    // once per job, lease and tick.
    let acked = seen.jobs_acked.lock().unwrap().clone();
    let history = pg(&db.url).await;
    wait_all_terminal(&history, acked.len() as i64).await;
    let h = History::read(&history).await;
    let per_tick: Vec<i64> = history
        .query(
            "SELECT count(*) FROM jobs WHERE schedule_id = $1::text::uuid GROUP BY scheduled_for",
            &[&schedule.id],
        )
        .await
        .expect("ticks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let leases_expired_twice: i64 = history
        .query_one(
            "SELECT count(*) FROM (SELECT job_id, attempt FROM job_events
              WHERE event = 'lease_expired' GROUP BY 1, 2 HAVING count(*) > 1) t",
            &[],
        )
        .await
        .expect("lease expiries")
        .get(0);
    report!(
        "topology: {} jobs committed, by status {:?}; {} schedule ticks, {} jobs; {} lease \
         expiries, {} retries; {} succeeded twice; login locked on all 3 auth replicas after {} \
         failures spread over them; revoked API key refused by all 6 jobs/memory replicas after \
         {key_refused:?}, ended session after {session_refused:?} (cache {CREDENTIAL_CACHE_SECS} \
         s); {RACES} conditional-write races on 3 memory replicas, one winner each (by replica \
         {winners:?}); 2 watches saw the job completed through a third replica",
        h.jobs,
        h.by_status,
        per_tick.len(),
        per_tick.iter().sum::<i64>(),
        h.lease_expired.len(),
        h.retries,
        h.succeeded_twice,
        LOGIN_MAX_FAILURES,
    );

    let unexpected = seen.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "client errors other than UNAVAILABLE: {unexpected:?}"
    );
    h.assert_every_job_succeeded_once(&history, &acked).await;
    assert_eq!(
        leases_expired_twice, 0,
        "the reaper expired each lease once"
    );
    assert_eq!(
        h.retries,
        h.lease_expired.len() as i64,
        "each retry follows exactly one lease expiry (no job published and run twice)"
    );
    assert!(per_tick.len() >= 5, "schedule ticks: {per_tick:?}");
    assert!(
        per_tick.iter().all(|n| *n == 1),
        "a tick with more than one job: {per_tick:?}"
    );
    for service in auth
        .iter_mut()
        .chain(jobs.iter_mut())
        .chain(memory.iter_mut())
        .chain(workers.iter_mut())
    {
        service.assert_alive();
    }
}
