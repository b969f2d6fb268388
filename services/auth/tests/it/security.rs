//! Security for AuthService. Forged, expired, wrong-key,
//! `alg: none`, wrong-audience, wrong-issuer and garbage tokens on
//! GetCurrentUser and VerifyToken: `tokens.rs`; login brute force:
//! `login.rs` (`repeated_failures_are_rate_limited_until_the_window_passes`).
//! Here: the tokens `tokens.rs` leaves out, and SQL metacharacters in every
//! string field are data.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_proto::auth::v1::*;
use keel_shared::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenSigner};
use keel_shared::testing;
use keel_shared::testing::fuzz::assert_tables_exist;
use keel_shared::testing::tokens;
use tonic::Code;

use crate::support::{Env, PASSWORD};

#[tokio::test]
async fn sql_metacharacters_are_data() {
    let env = Env::new().await;
    let mut client = env.client();
    let cases = [
        (
            "o'brien@example.com",
            "'; DROP TABLE users; --",
            "' OR '1'='1",
        ),
        ("100%_sure@example.com", "%_%_%_%_%_%", "%"),
        ("$1$2@example.com", "$1 $2 $$ $tag$", "_"),
        ("back\\slash@example.com", "\\\\\\\\\\\\\\\\", "\\"),
        (
            "';drop/**/table/**/users;--@example.com",
            "\"quoted\" /* -- */",
            "\"quoted\" /* -- */ 日本語 🦀",
        ),
    ];
    for (email, password, display_name) in cases {
        let registered = client
            .register(RegisterRequest {
                email: email.into(),
                password: password.into(),
                display_name: display_name.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("register {email:?}: {e:?}"))
            .into_inner();
        let user = registered.user.unwrap();
        assert_eq!(
            (user.email.as_str(), user.display_name.as_str()),
            (email, display_name)
        );
        let me = client
            .get_current_user(testing::authed(
                GetCurrentUserRequest {},
                &registered.tokens.unwrap().access_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(me, user);
        let logged_in = client
            .login(LoginRequest {
                email: email.into(),
                password: password.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("login {email:?}: {e:?}"))
            .into_inner();
        assert_eq!(logged_in.user.unwrap(), user);
        // `%` and `_` match only themselves: a wildcard email finds no one.
        let status = client
            .login(LoginRequest {
                email: email.replace(['o', '1', 's', 'b', 'd'], "_"),
                password: password.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{email:?}");
    }
    // Wildcard spellings of a registered email are distinct accounts.
    client
        .register(RegisterRequest {
            email: "o_brien@example.com".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .expect("o_brien is not o'brien");
    assert_eq!(env.user_count().await, cases.len() as i64 + 1);

    assert_tables_exist(
        &env.db,
        &["users", "sessions", "refresh_tokens", "login_failures"],
    )
    .await;
}

/// An HS256 token naming the server's key id, a subject that is not a UUID,
/// other schemes and an empty bearer: UNAUTHENTICATED on GetCurrentUser (and
/// VerifyToken, which takes the token as a field).
#[tokio::test]
async fn odd_tokens_are_unauthenticated() {
    let env = Env::new().await;
    let mut client = env.client();
    let registered = env.register("victim@example.com").await;
    let good = registered.tokens.unwrap().access_token;
    let server_key = TokenSigner::from_private_pem(
        &env.private_pem,
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
        Duration::from_secs(900),
    )
    .unwrap();
    let claims = tokens::claims(registered.user.unwrap().id);
    let hs256 = tokens::unsigned(
        "HS256",
        server_key.key_id(),
        &claims,
        &URL_SAFE_NO_PAD.encode([7u8; 32]),
    );
    let not_a_uuid = tokens::with_subject(&server_key, claims, "'; DROP TABLE users; --");
    for (what, token) in [
        ("HS256 with our kid", &hs256),
        ("subject not a UUID", &not_a_uuid),
    ] {
        let status = client
            .get_current_user(testing::authed(GetCurrentUserRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "GetCurrentUser, {what}"
        );
        let status = client
            .verify_token(VerifyTokenRequest {
                access_token: token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "VerifyToken, {what}");
    }
    for header in [format!("Basic {good}"), good.clone(), "Bearer ".to_string()] {
        let mut req = tonic::Request::new(GetCurrentUserRequest {});
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let status = client.get_current_user(req).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header:.12}");
    }
    client
        .get_current_user(testing::authed(GetCurrentUserRequest {}, &good))
        .await
        .expect("the genuine token still works");
}
