//! Test environment: auth, jobs and memory servers in-process (one database,
//! one Redis prefix), the console on a free port, an operator and a plain
//! user, and a ClaimJobs runner whose first run of each job fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::auth::v1::RegisterRequest;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    ClaimJobsRequest, CompleteJobRequest, CreateJobRequest, FailJobRequest, GetJobRequest, Job,
    JobStatus,
};
use keel_shared::testing::{self, TestDb, TestRedis};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) const WORKER_TOKEN: &str = "console-test-worker-token";
pub(crate) const PASSWORD: &str = "correct horse battery";
pub(crate) const OPERATOR: &str = "ops@example.com";
pub(crate) const USER: &str = "dev@example.com";
/// The kind the runner serves: its first run of each job fails for good.
pub(crate) const FLAKY: &str = "flaky";
/// Long enough for a loaded 2-core CI machine.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) struct Env {
    _db: TestDb,
    _redis: TestRedis,
    key_file: PathBuf,
    pub(crate) url: String,
    pub(crate) user_token: String,
    jobs: JobsServiceClient<Channel>,
    shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_file(&self.key_file);
    }
}

impl Env {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tune: impl FnOnce(&mut keel_console::Config)) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            keel_shared::telemetry::init(Default::default());
        }
        let shutdown = CancellationToken::new();
        let db = TestDb::new().await;
        let redis = TestRedis::new();

        // Auth signs with the per-process test key, which jobs and memory trust.
        let key_file = std::env::temp_dir().join(format!(
            "keel-console-test-{}.pem",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&key_file, &testing::keys().pem.private_pem).unwrap();
        let (listener, auth_addr) = testing::listener().await;
        let mut auth = keel_auth::Config::new(auth_addr, db.config(), key_file.clone());
        auth.database.db_pool_size = 4;
        auth.login.argon2_memory_kib = 1024;
        auth.login.argon2_iterations = 1;
        auth.admin_emails = vec![OPERATOR.into()];
        tokio::spawn(keel_auth::run(auth, listener, shutdown.clone()));

        let (listener, jobs_addr) = testing::listener().await;
        let mut jobs = keel_jobs::Config::new(
            jobs_addr,
            db.config(),
            redis.config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        jobs.relay_interval_ms = 50;
        jobs.reaper_interval_ms = 100;
        tokio::spawn(keel_jobs::run(jobs, listener, shutdown.clone()));

        let (listener, memory_addr) = testing::listener().await;
        let memory = keel_memory::Config::new(memory_addr, db.config(), testing::verifier_config());
        tokio::spawn(keel_memory::run(memory, listener, shutdown.clone()));

        let (listener, addr) = testing::listener().await;
        let mut console = keel_console::Config::new(
            addr,
            format!("http://{auth_addr}"),
            format!("http://{jobs_addr}"),
            format!("http://{memory_addr}"),
        );
        tune(&mut console);
        tokio::spawn(keel_console::run(console, listener, shutdown.clone()));

        let mut auth_client = AuthServiceClient::new(testing::channel(auth_addr).await);
        for email in [OPERATOR, USER] {
            auth_client
                .register(RegisterRequest {
                    email: email.into(),
                    password: PASSWORD.into(),
                    display_name: email.split('@').next().unwrap().into(),
                })
                .await
                .expect("Register");
        }
        let user_token = auth_client
            .login(keel_proto::auth::v1::LoginRequest {
                email: USER.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("Login")
            .into_inner()
            .tokens
            .expect("tokens")
            .access_token;
        let jobs_channel = testing::channel(jobs_addr).await;
        run_flaky_jobs(jobs_channel.clone(), shutdown.clone());
        testing::channel(memory_addr).await;
        Self {
            _db: db,
            _redis: redis,
            key_file,
            url: format!("http://{addr}"),
            user_token,
            jobs: JobsServiceClient::new(jobs_channel),
            shutdown,
        }
    }

    /// A job of the plain user's.
    pub(crate) async fn create(&self, kind: &str, payload: Value) -> Job {
        self.jobs
            .clone()
            .create_job(testing::authed(
                CreateJobRequest {
                    kind: kind.into(),
                    payload: Some(keel_shared::json::json_to_struct(&payload)),
                    max_attempts: 1,
                    ..Default::default()
                },
                &self.user_token,
            ))
            .await
            .expect("CreateJob")
            .into_inner()
            .job
            .expect("job")
    }

    pub(crate) async fn get(&self, id: &str) -> Job {
        self.jobs
            .clone()
            .get_job(testing::authed(
                GetJobRequest { id: id.into() },
                &self.user_token,
            ))
            .await
            .expect("GetJob")
            .into_inner()
            .job
            .expect("job")
    }

    pub(crate) async fn wait_for(&self, id: &str, status: JobStatus) -> Job {
        testing::eventually(WAIT, &format!("job {id} to be {status:?}"), || async {
            self.get(id).await.status() == status
        })
        .await;
        self.get(id).await
    }

    /// A flaky job that has failed (its first run).
    pub(crate) async fn failed_job(&self, payload: Value) -> Job {
        let job = self.create(FLAKY, payload).await;
        self.wait_for(&job.id, JobStatus::Failed).await
    }
}

/// Claims `flaky` jobs: the first run of each fails for good, later runs
/// (after an operator's retry) succeed.
fn run_flaky_jobs(channel: Channel, shutdown: CancellationToken) {
    let failed_once = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    tokio::spawn(async move {
        let mut runner = JobRunnerServiceClient::new(channel);
        let worker_id = "console-test-runner".to_string();
        while !shutdown.is_cancelled() {
            let claimed = runner
                .claim_jobs(testing::authed(
                    ClaimJobsRequest {
                        worker_id: worker_id.clone(),
                        kinds: vec![FLAKY.into()],
                        max_jobs: 10,
                        wait: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 200_000_000,
                        }),
                    },
                    WORKER_TOKEN,
                ))
                .await;
            let Ok(claimed) = claimed else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            for job in claimed.into_inner().jobs.into_iter().filter_map(|c| c.job) {
                let first = failed_once.lock().unwrap().insert(job.id.clone());
                if first {
                    let _ = runner
                        .fail_job(testing::authed(
                            FailJobRequest {
                                id: job.id.clone(),
                                attempt: job.attempt,
                                error: "upstream said no (first run always fails)".into(),
                                retryable: false,
                                worker_id: worker_id.clone(),
                            },
                            WORKER_TOKEN,
                        ))
                        .await;
                } else {
                    let output = serde_json::json!({"ok": true, "run": "second"});
                    let _ = runner
                        .complete_job(testing::authed(
                            CompleteJobRequest {
                                id: job.id.clone(),
                                attempt: job.attempt,
                                output: Some(keel_shared::json::json_to_struct(&output)),
                                cancelled: false,
                                worker_id: worker_id.clone(),
                            },
                            WORKER_TOKEN,
                        ))
                        .await;
                }
            }
        }
    });
}

/// The value of the first `name="csrf"` field of a page.
pub(crate) fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a csrf field") + marker.len();
    let end = html[start..].find('"').expect("end of the csrf value") + start;
    html[start..end].to_string()
}

/// The `name=value` of cookie `name` among Set-Cookie headers.
pub(crate) fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// A plain HTTP client of the console that keeps the session cookie by hand
/// and never follows redirects (so tests see them).
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    pub(crate) cookie: Option<String>,
}

impl Http {
    pub(crate) fn new(env: &Env) -> Self {
        Self {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: env.url.clone(),
            cookie: None,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        request.send().await.expect("GET")
    }

    /// A form POST from the console's own origin.
    pub(crate) async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.post_from(path, form, Some(&self.base)).await
    }

    pub(crate) async fn post_from(
        &self,
        path: &str,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        if let Some(cookie) = &self.cookie {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        if let Some(origin) = origin {
            request = request.header(reqwest::header::ORIGIN, origin);
        }
        request.send().await.expect("POST")
    }

    /// Signs in as `email`; returns the answer to the sign-in POST.
    pub(crate) async fn sign_in(&mut self, email: &str) -> reqwest::Response {
        let page = self.get("/login").await;
        let login_cookie = set_cookie(&page, "keel_console_login").expect("login cookie");
        let login_cookie = login_cookie.split(';').next().unwrap().to_string();
        let csrf = csrf_of(&page.text().await.unwrap());
        self.cookie = Some(login_cookie);
        let answer = self
            .post(
                "/login",
                &[("csrf", &csrf), ("email", email), ("password", PASSWORD)],
            )
            .await;
        self.cookie = set_cookie(&answer, "keel_console_session")
            .map(|c| c.split(';').next().unwrap().to_string());
        answer
    }

    /// The CSRF token of the signed-in session (read from a page's form).
    pub(crate) async fn csrf(&self) -> String {
        csrf_of(&self.get("/workers").await.text().await.unwrap())
    }
}
