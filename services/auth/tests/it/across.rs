//! Identity as the other services see it: API keys and ended sessions at
//! jobs and memory, with two replicas of each on auth's database.

use std::time::Duration;

use keel_proto::auth::v1::*;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{CreateJobRequest, ListJobsRequest};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{ListMemoriesRequest, PutMemoryRequest};
use keel_shared::auth::{SigningKeyPem, VerifierConfig};
use keel_shared::testing::{self, TestRedis, authed};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Env, PASSWORD, login_req};

/// Revocation must show within the cache period (1 s here); generous for slow CI.
const WITHIN: Duration = Duration::from_secs(15);

/// Jobs and memory replicas trusting `env`'s signing key, on its database.
struct Others {
    jobs: Vec<JobsServiceClient<Channel>>,
    memory: Vec<MemoryServiceClient<Channel>>,
    _redis: TestRedis,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Others {
    async fn start(env: &Env, replicas: usize) -> Self {
        let public = env.key_file.with_extension("pub.pem");
        std::fs::write(
            &public,
            SigningKeyPem::public_from_private(&env.private_pem).unwrap(),
        )
        .unwrap();
        let tokens = VerifierConfig {
            jwt_public_key_files: vec![public],
            jwt_issuer: keel_shared::auth::DEFAULT_ISSUER.into(),
            jwt_audience: keel_shared::auth::DEFAULT_AUDIENCE.into(),
            credential_cache_secs: 1,
        };
        let redis = TestRedis::new();
        let shutdown = CancellationToken::new();
        let mut jobs = Vec::new();
        let mut memory = Vec::new();
        for _ in 0..replicas {
            let (listener, addr) = testing::listener().await;
            let mut config = keel_jobs::Config::new(
                addr,
                env.db.config(),
                redis.config.clone(),
                tokens.clone(),
                "worker-token-for-identity-tests",
            );
            config.database.db_pool_size = 4;
            tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
            jobs.push(JobsServiceClient::new(testing::channel(addr).await));

            let (listener, addr) = testing::listener().await;
            let mut config = keel_memory::Config::new(addr, env.db.config(), tokens.clone());
            config.database.db_pool_size = 4;
            tokio::spawn(keel_memory::run(config, listener, shutdown.clone()));
            memory.push(MemoryServiceClient::new(testing::channel(addr).await));
        }
        Self {
            jobs,
            memory,
            _redis: redis,
            _shutdown: shutdown.drop_guard(),
        }
    }

    /// One user call at every replica of jobs and memory with `token`: Ok or
    /// the first refusal's code.
    async fn call_everywhere(&self, token: &str) -> Result<(), Code> {
        for jobs in &self.jobs {
            jobs.clone()
                .list_jobs(authed(ListJobsRequest::default(), token))
                .await
                .map_err(|s| s.code())?;
        }
        for memory in &self.memory {
            memory
                .clone()
                .list_memories(authed(ListMemoriesRequest::default(), token))
                .await
                .map_err(|s| s.code())?;
        }
        Ok(())
    }

    /// Waits until every replica refuses `token` as UNAUTHENTICATED.
    async fn refused_everywhere(&self, token: &str, what: &str) {
        for (i, jobs) in self.jobs.iter().enumerate() {
            testing::eventually(WITHIN, &format!("{what}: jobs replica {i}"), || async {
                let got = jobs
                    .clone()
                    .list_jobs(authed(ListJobsRequest::default(), token))
                    .await;
                match got {
                    Ok(_) => false,
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                        true
                    }
                }
            })
            .await;
        }
        for (i, memory) in self.memory.iter().enumerate() {
            testing::eventually(WITHIN, &format!("{what}: memory replica {i}"), || async {
                let got = memory
                    .clone()
                    .list_memories(authed(ListMemoriesRequest::default(), token))
                    .await;
                match got {
                    Ok(_) => false,
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                        true
                    }
                }
            })
            .await;
        }
    }
}

async fn api_key(env: &Env, access_token: &str, name: &str) -> CreateApiKeyResponse {
    env.client()
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: name.into(),
                expires_at: None,
            },
            access_token,
        ))
        .await
        .expect("create api key")
        .into_inner()
}

#[tokio::test]
async fn an_api_key_acts_for_its_user_until_revoked_on_every_replica() {
    let env = Env::new().await;
    let others = Others::start(&env, 2).await;
    let registered = env.register("agent-owner@example.com").await;
    let user_id = registered.user.unwrap().id;
    let access = registered.tokens.unwrap().access_token;

    let created = api_key(&env, &access, "nightly agent").await;
    let secret = created.api_key.clone();
    let key = created.key.unwrap();
    assert!(secret.starts_with("keel_") && secret.starts_with(&key.prefix));
    assert!(key.prefix.len() < secret.len() / 2, "{}", key.prefix);
    assert_eq!(key.name, "nightly agent");
    assert!(key.last_used_at.is_none());

    // The key works at jobs and memory as its user, on both replicas.
    let job = others.jobs[0]
        .clone()
        .create_job(authed(
            CreateJobRequest {
                kind: "report".into(),
                ..Default::default()
            },
            &secret,
        ))
        .await
        .expect("create job with an API key")
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.user_id, user_id);
    others.memory[1]
        .clone()
        .put_memory(authed(
            PutMemoryRequest {
                key: "notes/agent".into(),
                content: "written by an agent".into(),
                ..Default::default()
            },
            &secret,
        ))
        .await
        .expect("put memory with an API key");
    let mine = others.memory[0]
        .clone()
        .list_memories(authed(ListMemoriesRequest::default(), &access))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.memories.len(), 1, "the key wrote as its user");
    assert_eq!(others.call_everywhere(&secret).await, Ok(()));

    // Listed without the secret, with its use recorded.
    let listed = env
        .client()
        .list_api_keys(authed(ListApiKeysRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, key.id);
    assert!(listed[0].last_used_at.is_some(), "{listed:?}");
    assert!(!format!("{listed:?}").contains(&secret[key.prefix.len()..]));

    // A key cannot manage keys, passwords or sessions.
    let denied = env
        .client()
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: "minted by a key".into(),
                expires_at: None,
            },
            &secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    for code in [
        env.client()
            .list_api_keys(authed(ListApiKeysRequest {}, &secret))
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        env.client()
            .revoke_api_key(authed(RevokeApiKeyRequest { id: key.id.clone() }, &secret))
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        env.client()
            .logout_all(authed(LogoutAllRequest {}, &secret))
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, Code::PermissionDenied);
    }
    let count: i64 = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "nothing minted by the key");

    // Another user cannot revoke it.
    let other = env.register("someone-else@example.com").await;
    let stranger = env
        .client()
        .revoke_api_key(authed(
            RevokeApiKeyRequest { id: key.id.clone() },
            &other.tokens.unwrap().access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    assert_eq!(others.call_everywhere(&secret).await, Ok(()));

    // Revoked: refused on every replica within seconds, gone from the list.
    env.client()
        .revoke_api_key(authed(RevokeApiKeyRequest { id: key.id.clone() }, &access))
        .await
        .unwrap();
    others
        .refused_everywhere(&secret, "revoked API key refused")
        .await;
    let again = env
        .client()
        .revoke_api_key(authed(RevokeApiKeyRequest { id: key.id.clone() }, &access))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let listed = env
        .client()
        .list_api_keys(authed(ListApiKeysRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(listed.is_empty());
    // The user's own token is unaffected.
    assert_eq!(others.call_everywhere(&access).await, Ok(()));
}

#[tokio::test]
async fn an_expired_api_key_stops_working() {
    let env = Env::new().await;
    let others = Others::start(&env, 1).await;
    let access = env
        .register("expiring@example.com")
        .await
        .tokens
        .unwrap()
        .access_token;
    let soon = chrono::Utc::now() + chrono::Duration::seconds(2);
    let created = env
        .client()
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: "short-lived".into(),
                expires_at: Some(keel_shared::time::to_timestamp(soon)),
            },
            &access,
        ))
        .await
        .unwrap()
        .into_inner();
    others
        .refused_everywhere(&created.api_key, "expired API key refused")
        .await;
}

#[tokio::test]
async fn a_logged_out_session_is_refused_at_jobs_and_memory() {
    let env = Env::new().await;
    let others = Others::start(&env, 2).await;
    env.register("leaving@example.com").await;
    let session = env.login("leaving@example.com").await;
    let other_session = env.login("leaving@example.com").await;
    // Seen as live (and remembered) everywhere first.
    assert_eq!(others.call_everywhere(&session.access_token).await, Ok(()));

    env.client()
        .logout(LogoutRequest {
            refresh_token: session.refresh_token.clone(),
        })
        .await
        .unwrap();
    others
        .refused_everywhere(&session.access_token, "logged-out access token")
        .await;
    let at_auth = env
        .client()
        .list_api_keys(authed(ListApiKeysRequest {}, &session.access_token))
        .await
        .unwrap_err();
    assert_eq!(at_auth.code(), Code::Unauthenticated);
    // Only that session ended.
    assert_eq!(
        others.call_everywhere(&other_session.access_token).await,
        Ok(())
    );
}

#[tokio::test]
async fn logout_all_ends_every_session_of_the_caller() {
    let env = Env::new().await;
    let others = Others::start(&env, 1).await;
    let first = env.register("everywhere@example.com").await.tokens.unwrap();
    let second = env.login("everywhere@example.com").await;
    let bystander = env.register("bystander@example.com").await.tokens.unwrap();
    assert_eq!(others.call_everywhere(&first.access_token).await, Ok(()));
    assert_eq!(others.call_everywhere(&second.access_token).await, Ok(()));

    env.client()
        .logout_all(authed(LogoutAllRequest {}, &second.access_token))
        .await
        .unwrap();
    for tokens in [&first, &second] {
        others
            .refused_everywhere(&tokens.access_token, "LogoutAll's sessions")
            .await;
        let refresh = env
            .client()
            .refresh(RefreshRequest {
                refresh_token: tokens.refresh_token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(refresh.code(), Code::Unauthenticated);
    }
    assert_eq!(
        others.call_everywhere(&bystander.access_token).await,
        Ok(())
    );
}

#[tokio::test]
async fn change_password_keeps_only_the_new_session() {
    let env = Env::new().await;
    let others = Others::start(&env, 1).await;
    let old = env.register("rotating@example.com").await.tokens.unwrap();
    let elsewhere = env.login("rotating@example.com").await;
    assert_eq!(
        others.call_everywhere(&elsewhere.access_token).await,
        Ok(())
    );
    const NEW: &str = "a whole new passphrase";

    // Wrong current password: refused, nothing changed.
    let wrong = env
        .client()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: "not my password".into(),
                new_password: NEW.into(),
            },
            &old.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(wrong.message().contains("current_password"), "{wrong:?}");
    let short = env
        .client()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "short".into(),
            },
            &old.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument);
    assert!(short.message().contains("new_password"), "{short:?}");
    assert_eq!(
        others.call_everywhere(&elsewhere.access_token).await,
        Ok(())
    );

    let fresh = env
        .client()
        .change_password(authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: NEW.into(),
            },
            &old.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    for ended in [&old, &elsewhere] {
        others
            .refused_everywhere(&ended.access_token, "sessions before the change")
            .await;
        let refresh = env
            .client()
            .refresh(RefreshRequest {
                refresh_token: ended.refresh_token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(refresh.code(), Code::Unauthenticated);
    }
    assert_eq!(others.call_everywhere(&fresh.access_token).await, Ok(()));
    env.client()
        .refresh(RefreshRequest {
            refresh_token: fresh.refresh_token.clone(),
        })
        .await
        .expect("the new session refreshes");
    let live: i64 = env
        .db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM sessions WHERE revoked_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 1, "only the new session is left");
    let old_password = env
        .client()
        .login(login_req("rotating@example.com", PASSWORD))
        .await
        .unwrap_err();
    assert_eq!(old_password.code(), Code::Unauthenticated);
    env.client()
        .login(login_req("rotating@example.com", NEW))
        .await
        .expect("the new password signs in");
}

#[tokio::test]
async fn malformed_keys_and_headers_are_unauthenticated_everywhere() {
    let env = Env::new().await;
    let others = Others::start(&env, 1).await;
    let real = api_key(
        &env,
        &env.register("shapes@example.com")
            .await
            .tokens
            .unwrap()
            .access_token,
        "real",
    )
    .await
    .api_key;
    let near_misses = [
        "keel_".to_string(),
        "keel_short".to_string(),
        format!("{real}x"),
        format!("{}!", &real[..real.len() - 1]),
        format!("keel_{}", "A".repeat(43)),
        real.to_uppercase(),
        "name:secret".to_string(),
        ":".to_string(),
        "not-a-token".to_string(),
    ];
    for token in &near_misses {
        assert_eq!(
            others.call_everywhere(token).await,
            Err(Code::Unauthenticated),
            "{token:?}"
        );
        let at_auth = env
            .client()
            .get_current_user(authed(GetCurrentUserRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(at_auth.code(), Code::Unauthenticated, "{token:?}");
    }
    for header in [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "keel_abc",
        "Bearer\tkeel_abc",
    ] {
        let mut req = tonic::Request::new(ListJobsRequest::default());
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let got = others.jobs[0].clone().list_jobs(req).await.unwrap_err();
        assert_eq!(got.code(), Code::Unauthenticated, "{header:?}");
        let mut req = tonic::Request::new(ListMemoriesRequest::default());
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let got = others.memory[0]
            .clone()
            .list_memories(req)
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::Unauthenticated, "{header:?}");
    }
    // Non-ASCII bytes in the header.
    let mut req = tonic::Request::new(ListJobsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(&b"Bearer keel_\xff\xfe"[..]).unwrap(),
    );
    let got = others.jobs[0].clone().list_jobs(req).await.unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated);
    // The real key still works.
    assert_eq!(others.call_everywhere(&real).await, Ok(()));
}

#[tokio::test]
async fn concurrent_password_changes_leave_one_winner() {
    let env = Env::new().await;
    let first = env.register("contested@example.com").await.tokens.unwrap();
    let second = env.login("contested@example.com").await;
    let change = |access: String, new: &'static str| {
        let mut client = env.client();
        async move {
            client
                .change_password(authed(
                    ChangePasswordRequest {
                        current_password: PASSWORD.into(),
                        new_password: new.into(),
                    },
                    &access,
                ))
                .await
                .map(|r| r.into_inner().tokens.unwrap())
        }
    };
    let (a, b) = tokio::join!(
        change(first.access_token.clone(), "first new passphrase"),
        change(second.access_token.clone(), "second new passphrase"),
    );
    let (winner, new) = match (a, b) {
        (Ok(tokens), Err(lost)) => {
            assert_eq!(lost.code(), Code::Unauthenticated, "{lost:?}");
            (tokens, "first new passphrase")
        }
        (Err(lost), Ok(tokens)) => {
            assert_eq!(lost.code(), Code::Unauthenticated, "{lost:?}");
            (tokens, "second new passphrase")
        }
        other => panic!("exactly one change must win: {other:?}"),
    };
    let live: Vec<uuid::Uuid> = env
        .column("SELECT id FROM sessions WHERE revoked_at IS NULL")
        .await;
    assert_eq!(live.len(), 1, "only the winner's session is left");
    env.client()
        .refresh(RefreshRequest {
            refresh_token: winner.refresh_token,
        })
        .await
        .expect("the winner's session works");
    env.client()
        .login(login_req("contested@example.com", new))
        .await
        .expect("the winner's password signs in");
}
