//! `keel`: the common Keel calls from a shell, printing JSON. The session
//! (tokens) is kept in the user's config dir with 0600 permissions and the
//! access token is refreshed when it is about to expire.

mod output;
mod session;

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{
    GetCurrentUserRequest, LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest, TokenPair,
};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    CancelJobRequest, CreateJobRequest, GetJobRequest, JobStatus, ListJobsRequest, WatchJobRequest,
};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{
    DeleteMemoryRequest, GetMemoryRequest, GetWorkspaceRequest, ListMemoriesRequest,
    PutMemoryRequest, SearchMemoriesRequest,
};
use serde_json::{Value, json};
use session::Session;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "keel", version, about = "Command-line client for Keel")]
struct Cli {
    #[arg(
        long,
        env = "KEEL_AUTH_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    auth_url: String,
    #[arg(
        long,
        env = "KEEL_JOBS_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    jobs_url: String,
    #[arg(
        long,
        env = "KEEL_MEMORY_URL",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    memory_url: String,
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
    /// Jobs: create, get, list, watch, cancel.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Memories: put, get, list, search, delete.
    #[command(subcommand)]
    Memories(MemoriesCommand),
    /// The signed-in user's memory workspace figures.
    Workspace,
    /// Health of each server (exit 1 unless all are SERVING).
    Health,
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
    /// Print each update until the job ends.
    Watch {
        id: String,
    },
    Cancel {
        id: String,
    },
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
    },
    Get {
        key: String,
    },
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
    },
    Delete {
        key: String,
        #[arg(long, default_value_t = 0)]
        expected_version: i64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<tonic::Status>() {
            Some(status) => eprintln!("keel: {:?}: {}", status.code(), status.message()),
            None => eprintln!("keel: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn connect(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("invalid URL {url}"))?
        .connect()
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
        let mut auth = AuthServiceClient::new(connect(&cli.auth_url).await?);
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

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Register { email, name } => {
            let mut auth = AuthServiceClient::new(connect(&cli.auth_url).await?);
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
            output::print(
                &json!({"user": output::user(&user), "tokens": resp.tokens.as_ref().map(output::tokens)}),
            );
        }
        Command::Login { email } => {
            let mut auth = AuthServiceClient::new(connect(&cli.auth_url).await?);
            let resp = auth
                .login(LoginRequest {
                    email: email.clone(),
                    password: read_password()?,
                })
                .await?
                .into_inner();
            let user = resp.user.unwrap_or_default();
            store(&user.email, &resp.tokens)?;
            output::print(
                &json!({"user": output::user(&user), "tokens": resp.tokens.as_ref().map(output::tokens)}),
            );
        }
        Command::Logout => {
            let s = session::load()?;
            let mut auth = AuthServiceClient::new(connect(&cli.auth_url).await?);
            auth.logout(LogoutRequest {
                refresh_token: s.refresh_token,
            })
            .await?;
            session::clear()?;
            output::print(&json!({"signed_out": s.email}));
        }
        Command::Whoami => {
            let s = current_session(&cli).await?;
            let mut auth = AuthServiceClient::new(connect(&cli.auth_url).await?);
            let resp = auth
                .get_current_user(authed(&s, GetCurrentUserRequest {})?)
                .await?
                .into_inner();
            output::print(&output::user(&resp.user.unwrap_or_default()));
        }
        Command::Jobs(cmd) => jobs(&cli, cmd).await?,
        Command::Memories(cmd) => memories(&cli, cmd).await?,
        Command::Workspace => {
            let s = current_session(&cli).await?;
            let mut client = MemoryServiceClient::new(connect(&cli.memory_url).await?);
            let resp = client
                .get_workspace(authed(&s, GetWorkspaceRequest {})?)
                .await?
                .into_inner();
            output::print(&output::workspace(&resp.workspace.unwrap_or_default()));
        }
        Command::Health => {
            let mut all = true;
            let mut report = serde_json::Map::new();
            for url in [&cli.auth_url, &cli.jobs_url, &cli.memory_url] {
                let addr = url.trim_start_matches("http://");
                let ok = keel_shared::server::probe(addr).await;
                all &= ok;
                report.insert(
                    url.clone(),
                    json!(if ok { "SERVING" } else { "NOT_SERVING" }),
                );
            }
            output::print(&Value::Object(report));
            if !all {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn jobs(cli: &Cli, cmd: &JobsCommand) -> Result<()> {
    let s = current_session(cli).await?;
    let mut client = JobsServiceClient::new(connect(&cli.jobs_url).await?);
    match cmd {
        JobsCommand::Create {
            kind,
            payload,
            priority,
            max_attempts,
            run_at,
            idempotency_key,
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
                ..Default::default()
            };
            let job = client.create_job(authed(&s, req)?).await?.into_inner().job;
            output::print(&output::job(&job.unwrap_or_default()));
        }
        JobsCommand::Get { id } => {
            let job = client
                .get_job(authed(&s, GetJobRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .job;
            output::print(&output::job(&job.unwrap_or_default()));
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
            output::print(&json!({
                "jobs": resp.jobs.iter().map(output::job).collect::<Vec<_>>(),
                "next_page_token": resp.next_page_token,
            }));
        }
        JobsCommand::Watch { id } => {
            let mut stream = client
                .watch_job(authed(&s, WatchJobRequest { id: id.clone() })?)
                .await?
                .into_inner();
            while let Some(update) = stream.message().await? {
                let job = update.job.unwrap_or_default();
                println!("{}", output::job(&job));
            }
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .cancel_job(authed(&s, CancelJobRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .job;
            output::print(&output::job(&job.unwrap_or_default()));
        }
    }
    Ok(())
}

async fn memories(cli: &Cli, cmd: &MemoriesCommand) -> Result<()> {
    let s = current_session(cli).await?;
    let mut client = MemoryServiceClient::new(connect(&cli.memory_url).await?);
    match cmd {
        MemoriesCommand::Put {
            key,
            content,
            tags,
            metadata,
            expected_version,
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
                    },
                )?)
                .await?
                .into_inner();
            output::print(&json!({
                "created": resp.created,
                "memory": output::memory(&resp.memory.unwrap_or_default()),
            }));
        }
        MemoriesCommand::Get { key } => {
            let memory = client
                .get_memory(authed(&s, GetMemoryRequest { key: key.clone() })?)
                .await?
                .into_inner()
                .memory;
            output::print(&output::memory(&memory.unwrap_or_default()));
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
                    },
                )?)
                .await?
                .into_inner();
            output::print(&json!({
                "memories": resp.memories.iter().map(output::memory).collect::<Vec<_>>(),
                "next_page_token": resp.next_page_token,
            }));
        }
        MemoriesCommand::Search { query, limit } => {
            let resp = client
                .search_memories(authed(
                    &s,
                    SearchMemoriesRequest {
                        query: query.clone(),
                        limit: *limit,
                    },
                )?)
                .await?
                .into_inner();
            output::print(&json!(resp
                .results
                .iter()
                .map(|r| json!({"score": r.score, "memory": output::memory(&r.memory.clone().unwrap_or_default())}))
                .collect::<Vec<_>>()));
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
                    },
                )?)
                .await?;
            output::print(&json!({"deleted": key}));
        }
    }
    Ok(())
}
