//! Security (issue 9, item 6) for AuthService. Forged, expired, wrong-key,
//! `alg: none`, wrong-audience, wrong-issuer and garbage tokens on
//! GetCurrentUser and VerifyToken: `tokens.rs`; login brute force:
//! `login.rs` (`repeated_failures_are_rate_limited_until_the_window_passes`).
//! Here: SQL metacharacters in every string field are data.

use keel_proto::auth::v1::*;
use keel_shared::testing;
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

    let db = env.db.pool.get().await.unwrap();
    for table in ["users", "sessions", "refresh_tokens", "login_failures"] {
        let found: Option<String> = db
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found.as_deref(), Some(table));
    }
}
