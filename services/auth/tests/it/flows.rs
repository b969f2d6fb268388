//! Every RPC's happy path, refresh rotation, reuse detection and logout.

use std::time::Duration;

use keel_proto::auth::v1::*;
use keel_shared::testing;
use keel_shared::time::from_timestamp;
use tonic::Code;

use crate::support::{Env, PASSWORD, err, login_req};

fn refresh_req(token: &str) -> RefreshRequest {
    RefreshRequest {
        refresh_token: token.into(),
    }
}

fn logout_req(token: &str) -> LogoutRequest {
    LogoutRequest {
        refresh_token: token.into(),
    }
}

#[tokio::test]
async fn register_login_refresh_verify_current_user_logout() {
    let env = Env::new().await;
    let mut client = env.client();

    let registered = client
        .register(RegisterRequest {
            email: "  Alice@Example.COM ".into(),
            password: PASSWORD.into(),
            display_name: " Alice ".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let user = registered.user.unwrap();
    assert_eq!(user.email, "alice@example.com");
    assert_eq!(user.display_name, "Alice");
    let user_id = uuid::Uuid::parse_str(&user.id).unwrap();
    assert_eq!(user_id.get_version_num(), 7);
    assert!(user.created_at.is_some());
    let tokens = registered.tokens.unwrap();
    assert!(!tokens.access_token.is_empty() && !tokens.refresh_token.is_empty());
    let access_exp = from_timestamp(&tokens.access_token_expires_at.unwrap()).unwrap();
    let refresh_exp = from_timestamp(&tokens.refresh_token_expires_at.unwrap()).unwrap();
    let now = chrono::Utc::now();
    // Defaults: about 15 minutes and 30 days.
    assert!(access_exp > now + chrono::Duration::minutes(14));
    assert!(access_exp <= now + chrono::Duration::minutes(16));
    assert!(refresh_exp > now + chrono::Duration::days(29));

    let me = client
        .get_current_user(testing::authed(
            GetCurrentUserRequest {},
            &tokens.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me, user);

    let verified = client
        .verify_token(VerifyTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verified.user_id, user.id);
    assert_eq!(verified.email, "alice@example.com");
    assert_eq!(
        verified.expires_at.unwrap().seconds,
        tokens.access_token_expires_at.unwrap().seconds
    );

    // Login with a differently-cased email is the same account, a new session.
    let login = client
        .login(login_req(" ALICE@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.as_ref().unwrap(), &user);
    let login_tokens = login.tokens.unwrap();
    assert_ne!(login_tokens.refresh_token, tokens.refresh_token);

    let refreshed = client
        .refresh(refresh_req(&login_tokens.refresh_token))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    assert_ne!(refreshed.refresh_token, login_tokens.refresh_token);
    let me = client
        .get_current_user(testing::authed(
            GetCurrentUserRequest {},
            &refreshed.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user.unwrap().id, user.id);

    client
        .logout(logout_req(&refreshed.refresh_token))
        .await
        .unwrap();
    let status = err(client.refresh(refresh_req(&refreshed.refresh_token)).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    // The registration's session is a different sign-in and still works.
    client
        .refresh(refresh_req(&tokens.refresh_token))
        .await
        .unwrap();

    // Refresh tokens are stored only as hashes.
    let db = env.db.pool.get().await.unwrap();
    let stored = db
        .query_one(
            "SELECT count(*) FROM refresh_tokens WHERE token_hash = convert_to($1, 'UTF8')",
            &[&tokens.refresh_token],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn rotation_rejects_the_old_token_and_reuse_revokes_the_session() {
    let env = Env::new().await;
    let mut client = env.client();
    let first = env.register("rot@example.com").await.tokens.unwrap();
    let other_session = client
        .login(login_req("rot@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();

    let second = client
        .refresh(refresh_req(&first.refresh_token))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let third = client
        .refresh(refresh_req(&second.refresh_token))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();

    // Presenting a rotated token again: refused, and the whole family dies.
    let status = err(client.refresh(refresh_req(&first.refresh_token)).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "invalid or expired refresh token");
    let status = err(client.refresh(refresh_req(&third.refresh_token)).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "invalid or expired refresh token");

    let db = env.db.pool.get().await.unwrap();
    let reasons: Vec<Option<String>> = db
        .query("SELECT revoked_reason FROM sessions ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, vec![Some("reuse".to_string()), None]);

    // Another sign-in of the same user is untouched.
    client
        .refresh(refresh_req(&other_session.refresh_token))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_cannot_both_succeed() {
    let env = Env::new().await;
    let tokens = env.register("race@example.com").await.tokens.unwrap();
    let calls = (0..2).map(|_| {
        let mut client = env.client();
        let token = tokens.refresh_token.clone();
        async move { client.refresh(refresh_req(&token)).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn logout_revokes_the_session_and_is_idempotent() {
    let env = Env::new().await;
    let mut client = env.client();
    let tokens = env.register("bye@example.com").await.tokens.unwrap();
    let rotated = client
        .refresh(refresh_req(&tokens.refresh_token))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();

    client
        .logout(logout_req(&rotated.refresh_token))
        .await
        .unwrap();
    let status = err(client.refresh(refresh_req(&rotated.refresh_token)).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    // Again, and with the session's older token: still OK, nothing more to do.
    client
        .logout(logout_req(&rotated.refresh_token))
        .await
        .unwrap();
    client
        .logout(logout_req(&tokens.refresh_token))
        .await
        .unwrap();

    let db = env.db.pool.get().await.unwrap();
    let reason: Option<String> = db
        .query_one("SELECT revoked_reason FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason.as_deref(), Some("logout"));

    let status = err(client.logout(logout_req("not-a-token-we-issued")).await);
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = err(client.logout(logout_req("")).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("refresh_token"), "{status:?}");
    let status = err(client.refresh(refresh_req("")).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = err(client.refresh(refresh_req("made-up")).await);
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn expired_refresh_token_is_refused() {
    let env = Env::with(|c| c.tokens.refresh_token_ttl_secs = 1).await;
    let mut client = env.client();
    let tokens = env.register("late@example.com").await.tokens.unwrap();
    // Past its lifetime: the stored expiry moved into the past.
    env.expire_refresh_tokens().await;
    let status = err(client.refresh(refresh_req(&tokens.refresh_token)).await);
    assert_eq!(status.code(), Code::Unauthenticated);

    // The periodic sweep deletes expired refresh tokens.
    let store = keel_auth::store::Store::new(env.db.pool.clone());
    let (_, tokens_swept) = store.sweep(Duration::from_secs(900)).await.unwrap();
    assert_eq!(tokens_swept, 1);
    let db = env.db.pool.get().await.unwrap();
    let left: i64 = db
        .query_one("SELECT count(*) FROM refresh_tokens", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
