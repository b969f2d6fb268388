//! Keel behind PgBouncer (Debian's, 1.18 here): a private pgbouncer in front
//! of a fresh, empty database. In session mode the real services migrate
//! and serve through it; in transaction mode, which loses named prepared
//! statements before PgBouncer 1.21, a service refuses to start with one
//! line saying why and what to do, and touches nothing.

use std::time::Duration;

use keel_faults::{
    Env, PoolMode, PrivatePgBouncer, RedisTarget, Sandbox, Service, WAIT, channel, create_job,
    free_addr, job_request, pg, report,
};
use keel_proto::auth::v1::RegisterRequest;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{GetJobRequest, JobStatus};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{GetMemoryRequest, PutMemoryRequest};
use keel_shared::testing::{self, TestRedis};
use serde_json::json;

const JOBS: usize = 24;
const MEMORIES: usize = 12;

/// An empty database (no migrations), dropped with whatever is connected
/// to it when this goes out of scope.
struct EmptyDb {
    name: String,
}

impl EmptyDb {
    async fn new() -> Self {
        let name = format!("keel_pooler_{}", uuid::Uuid::new_v4().simple());
        pg(&testing::admin_url())
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        Self { name }
    }

    /// A direct connection, for what the assertions read.
    async fn direct(&self) -> tokio_postgres::Client {
        pg(&testing::with_dbname(&testing::admin_url(), &self.name)).await
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let _ = pg(&testing::admin_url()).await.batch_execute(&sql).await;
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_migrate_and_serve_through_pgbouncer_in_session_mode() {
    let db = EmptyDb::new().await;
    let sandbox = Sandbox::new("pooler-session");
    let Some(bouncer) =
        PrivatePgBouncer::start(&sandbox, &testing::admin_url(), PoolMode::Session).await
    else {
        return;
    };
    let url = bouncer.url(&db.name);
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    // Started together: three migrations race for the advisory lock, held
    // by a session of the pooler.
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
            Env::jobs(jobs_addr, &url, &target),
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

    let token = AuthServiceClient::new(channel(auth_addr))
        .register(RegisterRequest {
            email: "pooler@example.com".into(),
            password: "correct horse battery staple".into(),
            display_name: "Pooler".into(),
        })
        .await
        .expect("Register through the pooler")
        .into_inner()
        .tokens
        .expect("tokens")
        .access_token;

    // Concurrent calls: more than the services' pools hold, so pooled
    // connections (and their prepared statements) are shared and reused.
    let jobs = JobsServiceClient::new(channel(jobs_addr));
    let created =
        futures_join(
            (0..JOBS).map(|i| {
                let (jobs, token) = (jobs.clone(), token.clone());
                async move {
                    create_job(&jobs, &token, job_request("echo", &json!({ "i": i }), 3)).await
                }
            }),
        )
        .await;
    let ids: Vec<String> = created
        .into_iter()
        .map(|r| r.expect("CreateJob through the pooler").id)
        .collect();
    let memory = MemoryServiceClient::new(channel(memory_addr));
    let puts = futures_join((0..MEMORIES).map(|i| {
        let mut memory = memory.clone();
        let token = token.clone();
        async move {
            memory
                .put_memory(testing::authed(
                    PutMemoryRequest {
                        key: format!("notes/{i}"),
                        content: format!("through the pooler {i}"),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
        }
    }))
    .await;
    for put in puts {
        put.expect("PutMemory through the pooler");
    }

    for id in &ids {
        testing::eventually(WAIT, "each job SUCCEEDED through the pooler", || {
            let (mut jobs, id, token) = (jobs.clone(), id.clone(), token.clone());
            async move {
                let job = jobs
                    .get_job(testing::authed(GetJobRequest { id }, &token))
                    .await
                    .expect("GetJob through the pooler")
                    .into_inner()
                    .job
                    .expect("job");
                let done = job.status() == JobStatus::Succeeded;
                if !done {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                done
            }
        })
        .await;
    }
    for i in 0..MEMORIES {
        let got = memory
            .clone()
            .get_memory(testing::authed(
                GetMemoryRequest {
                    key: format!("notes/{i}"),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .expect("GetMemory through the pooler")
            .into_inner()
            .memory
            .expect("memory");
        assert_eq!(got.content, format!("through the pooler {i}"));
        assert_eq!(got.version, 1);
    }

    // Each migration applied once, though three services ran them.
    let direct = db.direct().await;
    let applied: i64 = direct
        .query_one(
            "SELECT count(*) - count(DISTINCT version) FROM refinery_schema_history",
            &[],
        )
        .await
        .expect("migrations applied through the pooler")
        .get(0);
    assert_eq!(applied, 0, "a migration applied twice");
    for s in &mut services {
        s.assert_alive();
    }
    report!(
        "pooler: auth, jobs, memory and a worker through PgBouncer ({:?} mode): {JOBS} jobs \
         SUCCEEDED, {MEMORIES} memories written and read",
        bouncer.mode
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_mode_pgbouncer_is_refused_at_startup_with_the_cause() {
    let db = EmptyDb::new().await;
    let sandbox = Sandbox::new("pooler-transaction");
    let Some(bouncer) =
        PrivatePgBouncer::start(&sandbox, &testing::admin_url(), PoolMode::Transaction).await
    else {
        return;
    };
    let url = bouncer.url(&db.name);
    let addr = free_addr();
    let mut memory = Service::new(&sandbox, "memory", addr, Env::memory(addr, &url));
    memory.start();
    let (status, log) = memory.wait_exit().await;

    assert!(!status.success(), "keel-memory started anyway:\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    let error = lines
        .iter()
        .find(|l| l.starts_with("keel-memory: "))
        .unwrap_or_else(|| panic!("no start-up error line in:\n{log}"));
    for needed in [
        "connection pooler in transaction mode",
        "prepared statement",
        "session mode",
        "PgBouncer >= 1.21 with max_prepared_statements",
        "connect directly",
    ] {
        assert!(error.contains(needed), "{needed:?} missing from {error:?}");
    }
    // Refused before migrating: the database is as empty as it was.
    let tables: i64 = db
        .direct()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 0, "a refused start-up changed the database");
    report!("pooler: transaction mode refused: {error}");
}

/// Runs the futures concurrently, results in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
