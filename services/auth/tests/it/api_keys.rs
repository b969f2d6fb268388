//! CreateApiKey / ListApiKeys / RevokeApiKey at the auth service: bad input
//! and races (their use at jobs and memory is in `across`).

use futures::future::join_all;
use keel_proto::auth::v1::*;
use keel_shared::testing::authed;
use keel_shared::time::to_timestamp;
use tonic::Code;

use crate::support::Env;

async fn key_count(env: &Env) -> i64 {
    env.db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn bad_requests_name_the_field_and_change_nothing() {
    let env = Env::new().await;
    let access = env
        .register("keys@example.com")
        .await
        .tokens
        .unwrap()
        .access_token;
    let past = to_timestamp(chrono::Utc::now() - chrono::Duration::seconds(5));
    let cases = [
        ("", None, "name"),
        ("   ", None, "name"),
        (&*"x".repeat(129), None, "name"),
        ("tab\tname", None, "name"),
        ("ok", Some(past), "expires_at"),
    ];
    for (name, expires_at, field) in cases {
        let got = env
            .client()
            .create_api_key(authed(
                CreateApiKeyRequest {
                    name: name.into(),
                    expires_at,
                },
                &access,
            ))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{name:?}");
        assert!(got.message().starts_with(field), "{got:?}");
    }
    for id in ["", "nope", "0193-not-a-uuid"] {
        let got = env
            .client()
            .revoke_api_key(authed(RevokeApiKeyRequest { id: id.into() }, &access))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{id:?}");
        assert!(got.message().starts_with("id"), "{got:?}");
    }
    let unknown = env
        .client()
        .revoke_api_key(authed(
            RevokeApiKeyRequest {
                id: uuid::Uuid::now_v7().to_string(),
            },
            &access,
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // No token at all.
    let anonymous = env
        .client()
        .create_api_key(CreateApiKeyRequest {
            name: "anon".into(),
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(key_count(&env).await, 0);
}

#[tokio::test]
async fn concurrent_creates_and_revokes() {
    let env = Env::new().await;
    let access = env
        .register("racy@example.com")
        .await
        .tokens
        .unwrap()
        .access_token;
    let created = join_all((0..8).map(|i| {
        let mut client = env.client();
        let access = access.clone();
        async move {
            client
                .create_api_key(authed(
                    CreateApiKeyRequest {
                        name: format!("key {i}"),
                        expires_at: None,
                    },
                    &access,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    }))
    .await;
    let mut secrets: Vec<&str> = created.iter().map(|c| c.api_key.as_str()).collect();
    secrets.sort();
    secrets.dedup();
    assert_eq!(secrets.len(), 8, "every key distinct");
    let listed = env
        .client()
        .list_api_keys(authed(ListApiKeysRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 8);
    // Newest first.
    assert_eq!(
        listed[0].id,
        created
            .iter()
            .map(|c| c.key.as_ref().unwrap().id.clone())
            .max()
            .unwrap()
    );

    // The same key revoked from several places at once: exactly one succeeds.
    let id = created[0].key.as_ref().unwrap().id.clone();
    let outcomes = join_all((0..6).map(|_| {
        let mut client = env.client();
        let (access, id) = (access.clone(), id.clone());
        async move {
            client
                .revoke_api_key(authed(RevokeApiKeyRequest { id }, &access))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    }))
    .await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.is_ok() || *o == Err(Code::NotFound))
    );
    let listed = env
        .client()
        .list_api_keys(authed(ListApiKeysRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 7);
    // Stored only as hashes.
    let stored: Vec<Vec<u8>> = env.column("SELECT key_hash FROM api_keys").await;
    for secret in &secrets {
        assert!(
            stored
                .iter()
                .all(|h| h.len() == 32 && h != secret.as_bytes())
        );
    }
}
