//! Register: email normalisation and uniqueness, password and name bounds.

use keel_proto::auth::v1::RegisterRequest;
use tonic::Code;

use crate::support::{Env, PASSWORD, err, register_req};

#[tokio::test]
async fn duplicate_email_differing_in_case_and_spaces_is_already_exists() {
    let env = Env::new().await;
    let mut client = env.client();
    env.register("dup@example.com").await;
    for email in ["dup@example.com", "  DUP@Example.com\t"] {
        let status = err(client.register(register_req(email, PASSWORD)).await);
        assert_eq!(status.code(), Code::AlreadyExists, "{email:?}");
    }
    assert_eq!(env.user_count().await, 1);
}

#[tokio::test]
async fn concurrent_registrations_of_one_email_yield_exactly_one_user() {
    let env = Env::new().await;
    let calls = (0..8).map(|i| {
        let mut client = env.client();
        // Same address, spelled differently.
        let email = if i % 2 == 0 {
            "race@example.com"
        } else {
            " RACE@example.com "
        };
        async move { client.register(register_req(email, PASSWORD)).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exists = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::AlreadyExists))
        .count();
    assert_eq!((ok, exists), (1, 7), "{results:?}");
    assert_eq!(env.user_count().await, 1);
}

#[tokio::test]
async fn password_must_be_8_to_128_characters() {
    let env = Env::new().await;
    let mut client = env.client();
    for (len, email) in [(7, "p7@example.com"), (129, "p129@example.com")] {
        let status = err(client.register(register_req(email, &"x".repeat(len))).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{len}");
        assert!(status.message().starts_with("password"), "{status:?}");
    }
    assert_eq!(env.user_count().await, 0);
    // Characters, not bytes: 8 two-byte characters and 128 four-byte ones pass.
    client
        .register(register_req("p8@example.com", &"é".repeat(8)))
        .await
        .unwrap();
    client
        .register(register_req("p128@example.com", &"😀".repeat(128)))
        .await
        .unwrap();
    assert_eq!(env.user_count().await, 2);
}

#[tokio::test]
async fn malformed_email_and_overlong_display_name_are_invalid_argument() {
    let env = Env::new().await;
    let mut client = env.client();
    for email in [
        "",
        "   ",
        "no-at-sign",
        "a@b",
        "two@@example.com",
        "sp ace@example.com",
    ] {
        let status = err(client.register(register_req(email, PASSWORD)).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{email:?}");
        assert!(status.message().starts_with("email"), "{status:?}");
    }
    let status = err(client
        .register(RegisterRequest {
            email: "name@example.com".into(),
            password: PASSWORD.into(),
            display_name: "n".repeat(257),
        })
        .await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("display_name"), "{status:?}");
    assert_eq!(env.user_count().await, 0);

    // An empty display name is allowed.
    let user = client
        .register(RegisterRequest {
            email: "name@example.com".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.display_name, "");
}

#[tokio::test]
async fn passwords_are_stored_as_argon2id_with_owasp_parameters() {
    // Production defaults (the other tests use small parameters for speed).
    let env = Env::with(|c| {
        let defaults = keel_auth::Config::new(c.listen_addr, c.database.clone(), "unused".into());
        c.login = defaults.login;
    })
    .await;
    env.register("owasp@example.com").await;
    let db = env.db.pool.get().await.unwrap();
    let hash: String = db
        .query_one("SELECT password_hash FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert!(!hash.contains(PASSWORD));
    env.client()
        .login(crate::support::login_req("owasp@example.com", PASSWORD))
        .await
        .unwrap();
}
