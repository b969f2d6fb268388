//! `keel`: the common Keel calls from a shell, printing readable tables or
//! (`-o json`) JSON. The session (tokens) is kept in the user's config dir
//! with 0600 permissions and the access token is refreshed when it is about
//! to expire. `keel dead-letters` talks to Redis directly (the admin path).

mod dead_letters;
mod output;
mod schedules;
mod session;
mod worker_credential;

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dead_letters::EntryJson;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{
    GetCurrentUserRequest, LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest, TokenPair,
    User,
};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    CancelJobRequest, CreateJobRequest, DeleteJobRequest, GetJobHistoryRequest, GetJobRequest, Job,
    JobStatus, ListJobsRequest, RetryJobRequest, WatchJobRequest,
};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{
    DeleteMemoryRequest, GetMemoryRequest, GetWorkspaceRequest, ListMemoriesRequest,
    ListMemoryVersionsRequest, PutMemoryRequest, SearchMemoriesRequest,
};
use keel_shared::config::GrpcClientTlsConfig;
use keel_shared::config::RedisConfig;
use output::Format;
use serde_json::{Value, json};
use session::Session;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "keel", version, about = "Command-line client for Keel")]
struct Cli {
    /// The service's URL, or its replicas' URLs separated by commas (the
    /// first that accepts a connection, in random order, is used).
    #[arg(
        long,
        env = "KEEL_AUTH_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    auth_url: String,
    /// The service's URL, or its replicas' URLs separated by commas (the
    /// first that accepts a connection, in random order, is used).
    #[arg(
        long,
        env = "KEEL_JOBS_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    jobs_url: String,
    /// The service's URL, or its replicas' URLs separated by commas (the
    /// first that accepts a connection, in random order, is used).
    #[arg(
        long,
        env = "KEEL_MEMORY_URL",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    memory_url: String,
    /// Output format: a readable table, or JSON for scripts.
    #[arg(
        long,
        short = 'o',
        value_enum,
        default_value_t = Format::Table,
        global = true
    )]
    output: Format,
    /// TLS for https:// service URLs.
    #[command(flatten)]
    tls: GrpcClientTlsConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account and sign in. The password is read from KEEL_PASSWORD or stdin.
    Register {
        email: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Sign in. The password is read from KEEL_PASSWORD or stdin.
    Login { email: String },
    /// Revoke the session and forget it.
    Logout,
    /// Show the signed-in user.
    Whoami,
    /// Jobs: create, get, list, watch, cancel, history, retry, delete.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Cron schedules that create jobs: create, list, get, pause, resume, delete.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCommand),
    /// Memories: put, get, list, search, delete, history.
    Memories(MemoriesArgs),
    /// The signed-in user's memory workspace figures.
    Workspace {
        /// The namespace to sum ("" = the default namespace).
        #[arg(long, default_value = "")]
        namespace: String,
        /// Sum every namespace.
        #[arg(long, conflicts_with = "namespace")]
        all_namespaces: bool,
    },
    /// Health of each server (exit 1 unless all are SERVING).
    Health,
    /// The worker's dead-letter stream: list and replay. Reaches Redis
    /// directly: REDIS_URL and KEEL_REDIS_PREFIX, as the services use them.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Named worker credentials for KEEL_WORKER_CREDENTIALS_FILE: new.
    #[command(subcommand)]
    WorkerCredential(worker_credential::WorkerCredentialCommand),
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// Entries, oldest first.
    List {
        /// Show at most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        redis: RedisConfig,
    },
    /// Put each entry's job back on the stream it came from (a job that can
    /// no longer run is refused by the jobs service and acknowledged by the
    /// worker, so replaying is harmless), then remove the entry.
    Replay {
        /// Entry ids, as `list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every entry present now.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        redis: RedisConfig,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    Create {
        kind: String,
        /// JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        #[arg(long, default_value_t = 0)]
        max_attempts: i32,
        /// RFC 3339 time to run at.
        #[arg(long)]
        run_at: Option<String>,
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Longest one attempt may run, in seconds (1..=86400); none when absent.
        #[arg(long)]
        timeout: Option<u32>,
    },
    Get {
        id: String,
    },
    List {
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value = "")]
        kind: String,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Print each update until the job ends: one line each (one JSON object
    /// per line with -o json).
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Every transition of the job, oldest first.
    History {
        id: String,
    },
    /// Queue a failed or cancelled job again with a fresh set of attempts.
    Retry {
        id: String,
    },
    /// Delete a finished job and its history (frees its idempotency key).
    Delete {
        id: String,
    },
}

#[derive(clap::Args)]
struct MemoriesArgs {
    /// The namespace (an agent's or session's own space); "" = the default one.
    #[arg(long, global = true, default_value = "")]
    namespace: String,
    #[command(subcommand)]
    cmd: MemoriesCommand,
}

#[derive(Subcommand)]
enum MemoriesCommand {
    Put {
        key: String,
        /// The content; read from stdin when absent.
        #[arg(long)]
        content: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// JSON object.
        #[arg(long)]
        metadata: Option<String>,
        #[arg(long, default_value_t = 0)]
        expected_version: i64,
        /// When the memory stops existing (RFC 3339, e.g. 2030-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    Get {
        key: String,
        /// An earlier version still kept (0 = the current one).
        #[arg(long, default_value_t = 0)]
        version: i64,
    },
    /// The current version and the earlier ones kept, newest first.
    History { key: String },
    List {
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value = "")]
        tag: String,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Search {
        query: String,
        #[arg(long, default_value_t = 0)]
        limit: i32,
        /// Only memories carrying this tag (repeatable: all must match).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Delete {
        key: String,
        #[arg(long, default_value_t = 0)]
        expected_version: i64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = keel_shared::config::parse_config::<Cli>();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<tonic::Status>() {
            Some(status) => eprintln!("keel: {:?}: {}", status.code(), status.message()),
            None => eprintln!("keel: {e:#}"),
        }
        std::process::exit(1);
    }
}

/// A channel to the service at `url`, or at one of its comma-separated
/// replicas (the first, in random order, that accepts a connection).
async fn connect(tls: &GrpcClientTlsConfig, url: &str) -> Result<Channel> {
    let endpoints =
        keel_shared::grpc_client::client_endpoints(url, tls).map_err(anyhow::Error::msg)?;
    keel_shared::grpc_client::connect_any(endpoints)
        .await
        .with_context(|| format!("cannot reach {url}"))
}

fn read_password() -> Result<String> {
    if let Ok(p) = std::env::var("KEEL_PASSWORD") {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn parse_object(what: &str, text: &str) -> Result<prost_types::Struct> {
    let value: Value = serde_json::from_str(text).with_context(|| format!("{what} is not JSON"))?;
    if !value.is_object() {
        bail!("{what} must be a JSON object");
    }
    Ok(keel_shared::json::json_to_struct(&value))
}

fn store(email: &str, tokens: &Option<TokenPair>) -> Result<()> {
    let t = tokens.as_ref().context("the server sent no tokens")?;
    session::save(&Session {
        email: email.to_string(),
        access_token: t.access_token.clone(),
        access_token_expires_at: t.access_token_expires_at.map(|t| t.seconds).unwrap_or(0),
        refresh_token: t.refresh_token.clone(),
    })
}

/// The saved session, refreshed first when its access token is about to expire.
async fn current_session(cli: &Cli) -> Result<Session> {
    let mut s = session::load()?;
    if s.access_token_expires_at - 30 <= chrono::Utc::now().timestamp() {
        let mut auth = AuthServiceClient::new(connect(&cli.tls, &cli.auth_url).await?);
        let resp = auth
            .refresh(RefreshRequest {
                refresh_token: s.refresh_token.clone(),
            })
            .await?
            .into_inner();
        store(&s.email, &resp.tokens)?;
        s = session::load()?;
    }
    Ok(s)
}

fn authed<T>(s: &Session, message: T) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", s.access_token).parse()?,
    );
    Ok(req)
}

fn signed_in(format: Format, user: &User, tokens: &Option<TokenPair>) {
    format.emit(
        || json!({"user": output::user(user), "tokens": tokens.as_ref().map(output::tokens)}),
        || output::fields(&output::user_fields(user)),
    );
}

async fn run(cli: Cli) -> Result<()> {
    let format = cli.output;
    match &cli.command {
        Command::Register { email, name } => {
            let mut auth = AuthServiceClient::new(connect(&cli.tls, &cli.auth_url).await?);
            let resp = auth
                .register(RegisterRequest {
                    email: email.clone(),
                    password: read_password()?,
                    display_name: name.clone(),
                })
                .await?
                .into_inner();
            let user = resp.user.unwrap_or_default();
            store(&user.email, &resp.tokens)?;
            signed_in(format, &user, &resp.tokens);
        }
        Command::Login { email } => {
            let mut auth = AuthServiceClient::new(connect(&cli.tls, &cli.auth_url).await?);
            let resp = auth
                .login(LoginRequest {
                    email: email.clone(),
                    password: read_password()?,
                })
                .await?
                .into_inner();
            let user = resp.user.unwrap_or_default();
            store(&user.email, &resp.tokens)?;
            signed_in(format, &user, &resp.tokens);
        }
        Command::Logout => {
            let s = session::load()?;
            let mut auth = AuthServiceClient::new(connect(&cli.tls, &cli.auth_url).await?);
            auth.logout(LogoutRequest {
                refresh_token: s.refresh_token,
            })
            .await?;
            session::clear()?;
            format.emit(
                || json!({"signed_out": s.email}),
                || format!("signed out {}", s.email),
            );
        }
        Command::Whoami => {
            let s = current_session(&cli).await?;
            let mut auth = AuthServiceClient::new(connect(&cli.tls, &cli.auth_url).await?);
            let resp = auth
                .get_current_user(authed(&s, GetCurrentUserRequest {})?)
                .await?
                .into_inner();
            let user = resp.user.unwrap_or_default();
            format.emit(
                || output::user(&user),
                || output::fields(&output::user_fields(&user)),
            );
        }
        Command::Jobs(cmd) => jobs(&cli, cmd).await?,
        Command::Schedules(cmd) => schedules::run(&cli, cmd).await?,
        Command::Memories(cmd) => memories(&cli, cmd).await?,
        Command::DeadLetters(cmd) => dead_letters(format, cmd).await?,
        Command::WorkerCredential(cmd) => worker_credential::run(cmd)?,
        Command::Workspace {
            namespace,
            all_namespaces,
        } => {
            let s = current_session(&cli).await?;
            let mut client = MemoryServiceClient::new(connect(&cli.tls, &cli.memory_url).await?);
            let req = GetWorkspaceRequest {
                namespace: namespace.clone(),
                all_namespaces: *all_namespaces,
            };
            let resp = client.get_workspace(authed(&s, req)?).await?.into_inner();
            let workspace = resp.workspace.unwrap_or_default();
            format.emit(
                || output::workspace(&workspace),
                || output::workspace_fields(&workspace),
            );
        }
        Command::Health => {
            let mut all = true;
            let mut report = serde_json::Map::new();
            let mut table = output::Table::new(&["SERVER", "STATUS"]);
            let urls = [&cli.auth_url, &cli.jobs_url, &cli.memory_url]
                .into_iter()
                .flat_map(|list| list.split(',').map(|url| url.trim().to_string()));
            for url in urls {
                let ok = match keel_shared::grpc_client::client_endpoint(&url, &cli.tls) {
                    Ok(endpoint) => keel_shared::grpc_client::probe_endpoint(endpoint).await,
                    Err(_) => false,
                };
                all &= ok;
                let status = if ok { "SERVING" } else { "NOT_SERVING" };
                report.insert(url.clone(), json!(status));
                table.row(vec![url.clone(), status.into()]);
            }
            format.emit(|| Value::Object(report), || table.render());
            if !all {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// One job: in full as a table, or as JSON.
fn show_job(format: Format, job: &Option<Job>) {
    let job = job.clone().unwrap_or_default();
    format.emit(|| output::job(&job), || output::job_fields(&job));
}

async fn jobs(cli: &Cli, cmd: &JobsCommand) -> Result<()> {
    let format = cli.output;
    let s = current_session(cli).await?;
    let mut client = JobsServiceClient::new(connect(&cli.tls, &cli.jobs_url).await?);
    match cmd {
        JobsCommand::Create {
            kind,
            payload,
            priority,
            max_attempts,
            run_at,
            idempotency_key,
            timeout,
        } => {
            let run_at = match run_at {
                Some(t) => Some(keel_shared::time::to_timestamp(
                    chrono::DateTime::parse_from_rfc3339(t)
                        .context("--run-at must be RFC 3339")?
                        .into(),
                )),
                None => None,
            };
            let req = CreateJobRequest {
                kind: kind.clone(),
                payload: Some(parse_object("--payload", payload)?),
                priority: *priority,
                max_attempts: *max_attempts,
                run_at,
                idempotency_key: idempotency_key.clone(),
                timeout: timeout.map(|secs| prost_types::Duration {
                    seconds: i64::from(secs),
                    nanos: 0,
                }),
                ..Default::default()
            };
            let job = client.create_job(authed(&s, req)?).await?.into_inner().job;
            show_job(format, &job);
        }
        JobsCommand::Get { id } => {
            let job = client
                .get_job(authed(&s, GetJobRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .job;
            show_job(format, &job);
        }
        JobsCommand::List {
            status,
            kind,
            page_size,
            page_token,
        } => {
            let status = match status {
                Some(name) => {
                    JobStatus::from_str_name(&format!("JOB_STATUS_{}", name.to_ascii_uppercase()))
                        .with_context(|| format!("unknown status {name}"))?
                        as i32
                }
                None => 0,
            };
            let resp = client
                .list_jobs(authed(
                    &s,
                    ListJobsRequest {
                        page_size: *page_size,
                        page_token: page_token.clone(),
                        status,
                        kind: kind.clone(),
                    },
                )?)
                .await?
                .into_inner();
            format.emit(
                || {
                    json!({
                        "jobs": resp.jobs.iter().map(output::job).collect::<Vec<_>>(),
                        "next_page_token": resp.next_page_token,
                    })
                },
                || output::jobs_table(&resp.jobs),
            );
            next_page_hint(format, &resp.next_page_token);
        }
        JobsCommand::Watch { id } => {
            let mut stream = client
                .watch_job(authed(&s, WatchJobRequest { id: id.clone() })?)
                .await?
                .into_inner();
            while let Some(update) = stream.message().await? {
                let job = update.job.unwrap_or_default();
                match format {
                    Format::Json => println!("{}", output::job(&job)),
                    Format::Table => println!("{}", output::watch_line(&job)),
                }
            }
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .cancel_job(authed(&s, CancelJobRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .job;
            show_job(format, &job);
        }
        JobsCommand::History { id } => {
            let events = client
                .get_job_history(authed(&s, GetJobHistoryRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .events;
            format.emit(
                || json!({"events": events.iter().map(output::job_event).collect::<Vec<_>>()}),
                || output::history_table(&events),
            );
        }
        JobsCommand::Retry { id } => {
            let job = client
                .retry_job(authed(&s, RetryJobRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .job;
            show_job(format, &job);
        }
        JobsCommand::Delete { id } => {
            client
                .delete_job(authed(&s, DeleteJobRequest { id: id.clone() })?)
                .await?;
            format.emit(|| json!({"deleted": id}), || format!("deleted {id}"));
        }
    }
    Ok(())
}

/// Tables show the rows only: the next page's token goes to stderr.
fn next_page_hint(format: Format, token: &str) {
    if format == Format::Table && !token.is_empty() {
        eprintln!("more: --page-token {token}");
    }
}

async fn memories(cli: &Cli, args: &MemoriesArgs) -> Result<()> {
    let (cmd, namespace) = (&args.cmd, args.namespace.clone());
    let format = cli.output;
    let s = current_session(cli).await?;
    let mut client = MemoryServiceClient::new(connect(&cli.tls, &cli.memory_url).await?);
    match cmd {
        MemoriesCommand::Put {
            key,
            content,
            tags,
            metadata,
            expected_version,
            expires_at,
        } => {
            let content = match content {
                Some(c) => c.clone(),
                None => std::io::read_to_string(std::io::stdin())?,
            };
            let metadata = metadata
                .as_deref()
                .map(|m| parse_object("--metadata", m))
                .transpose()?;
            let resp = client
                .put_memory(authed(
                    &s,
                    PutMemoryRequest {
                        key: key.clone(),
                        content,
                        tags: tags.clone(),
                        metadata,
                        expected_version: *expected_version,
                        namespace,
                        expires_at: expires_at.map(|t| prost_types::Timestamp {
                            seconds: t.timestamp(),
                            nanos: t.timestamp_subsec_nanos() as i32,
                        }),
                    },
                )?)
                .await?
                .into_inner();
            let memory = resp.memory.unwrap_or_default();
            format.emit(
                || json!({"created": resp.created, "memory": output::memory(&memory)}),
                || {
                    let done = if resp.created { "created" } else { "updated" };
                    format!("{done} {} (version {})", memory.key, memory.version)
                },
            );
        }
        MemoriesCommand::Get { key, version } => {
            let req = GetMemoryRequest {
                key: key.clone(),
                namespace,
                version: *version,
            };
            let memory = client
                .get_memory(authed(&s, req)?)
                .await?
                .into_inner()
                .memory;
            let memory = memory.unwrap_or_default();
            format.emit(
                || output::memory(&memory),
                || output::memory_fields(&memory),
            );
        }
        MemoriesCommand::List {
            prefix,
            tag,
            page_size,
            page_token,
        } => {
            let resp = client
                .list_memories(authed(
                    &s,
                    ListMemoriesRequest {
                        page_size: *page_size,
                        page_token: page_token.clone(),
                        key_prefix: prefix.clone(),
                        tag: tag.clone(),
                        namespace,
                    },
                )?)
                .await?
                .into_inner();
            format.emit(
                || {
                    json!({
                        "memories": resp.memories.iter().map(output::memory).collect::<Vec<_>>(),
                        "next_page_token": resp.next_page_token,
                    })
                },
                || output::memories_table(&resp.memories),
            );
            next_page_hint(format, &resp.next_page_token);
        }
        MemoriesCommand::Search {
            query,
            limit,
            tags,
            page_size,
            page_token,
        } => {
            let resp = client
                .search_memories(authed(
                    &s,
                    SearchMemoriesRequest {
                        query: query.clone(),
                        limit: *limit,
                        namespace,
                        tags: tags.clone(),
                        page_size: *page_size,
                        page_token: page_token.clone(),
                    },
                )?)
                .await?
                .into_inner();
            format.emit(
                || {
                    json!(
                        resp.results
                            .iter()
                            .map(|r| json!({
                                "score": r.score,
                                "snippet": r.snippet,
                                "memory": output::memory(&r.memory.clone().unwrap_or_default()),
                            }))
                            .collect::<Vec<_>>()
                    )
                },
                || output::search_table(&resp.results),
            );
            next_page_hint(format, &resp.next_page_token);
        }
        MemoriesCommand::History { key } => {
            let req = ListMemoryVersionsRequest {
                namespace,
                key: key.clone(),
            };
            let versions = client
                .list_memory_versions(authed(&s, req)?)
                .await?
                .into_inner()
                .versions;
            format.emit(
                || json!(versions.iter().map(output::memory).collect::<Vec<_>>()),
                || output::memories_table(&versions),
            );
        }
        MemoriesCommand::Delete {
            key,
            expected_version,
        } => {
            client
                .delete_memory(authed(
                    &s,
                    DeleteMemoryRequest {
                        key: key.clone(),
                        expected_version: *expected_version,
                        namespace,
                    },
                )?)
                .await?;
            format.emit(|| json!({"deleted": key}), || format!("deleted {key}"));
        }
    }
    Ok(())
}

async fn dead_letters(format: Format, cmd: &DeadLettersCommand) -> Result<()> {
    match cmd {
        DeadLettersCommand::List { limit, redis } => {
            let mut conn = dead_letters::connect(redis).await?;
            let entries = dead_letters::list(&mut *conn, redis, *limit).await?;
            format.emit(
                || json!(entries.iter().map(|e| e.to_json()).collect::<Vec<_>>()),
                || dead_letters::table(&entries),
            );
        }
        DeadLettersCommand::Replay { ids, all, redis } => {
            let mut conn = dead_letters::connect(redis).await?;
            let ids = (!*all).then_some(ids.as_slice());
            let results = dead_letters::replay(&mut *conn, redis, ids).await?;
            format.emit(
                || json!(results.iter().map(|r| r.to_json()).collect::<Vec<_>>()),
                || dead_letters::replay_table(&results),
            );
            let missing: Vec<&str> = results
                .iter()
                .filter_map(|r| match r {
                    dead_letters::Replay::NotFound { entry } => Some(entry.as_str()),
                    _ => None,
                })
                .collect();
            if !missing.is_empty() {
                bail!("not in the dead-letter stream: {}", missing.join(", "));
            }
        }
    }
    Ok(())
}
