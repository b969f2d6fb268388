//! Access tokens that must not pass: GetCurrentUser and VerifyToken both
//! answer UNAUTHENTICATED.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_proto::auth::v1::*;
use keel_shared::auth::{AccessClaims, DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenSigner};
use keel_shared::testing;
use tonic::Code;

use crate::support::{Client, Env};

async fn assert_rejected(client: &mut Client, token: &str, what: &str) {
    let status = client
        .get_current_user(testing::authed(GetCurrentUserRequest {}, token))
        .await
        .expect_err(what);
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "GetCurrentUser, {what}"
    );
    let status = client
        .verify_token(VerifyTokenRequest {
            access_token: token.to_string(),
        })
        .await
        .expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "VerifyToken, {what}");
}

#[tokio::test]
async fn forged_expired_and_misaddressed_tokens_are_unauthenticated() {
    let env = Env::new().await;
    let mut client = env.client();
    let registered = env.register("victim@example.com").await;
    let user_id = registered.user.unwrap().id;
    let good = registered.tokens.unwrap().access_token;

    let server_key = TokenSigner::from_private_pem(
        &env.private_pem,
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
        Duration::from_secs(900),
    )
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = AccessClaims {
        sub: user_id.clone(),
        email: "victim@example.com".into(),
        iss: DEFAULT_ISSUER.into(),
        aud: DEFAULT_AUDIENCE.into(),
        iat: now,
        exp: now + 600,
        sid: None,
    };
    // Control: claims signed by the server's key pass.
    client
        .verify_token(VerifyTokenRequest {
            access_token: server_key.sign_claims(&claims),
        })
        .await
        .expect("control token");

    let expired = server_key.sign_claims(&AccessClaims {
        iat: now - 3600,
        exp: now - 1800,
        ..claims.clone()
    });
    assert_rejected(&mut client, &expired, "expired").await;

    let wrong_audience = server_key.sign_claims(&AccessClaims {
        aud: "somebody-else".into(),
        ..claims.clone()
    });
    assert_rejected(&mut client, &wrong_audience, "wrong audience").await;

    let wrong_issuer = server_key.sign_claims(&AccessClaims {
        iss: "evil-auth".into(),
        ..claims.clone()
    });
    assert_rejected(&mut client, &wrong_issuer, "wrong issuer").await;

    // Signed by a different Ed25519 key (the harness's per-process test key).
    let wrong_key = testing::keys().signer.sign_claims(&claims);
    assert_rejected(&mut client, &wrong_key, "wrong key").await;

    // A real token with its payload swapped for another user's claims.
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&AccessClaims {
            sub: uuid::Uuid::now_v7().to_string(),
            ..claims.clone()
        })
        .unwrap(),
    );
    parts[1] = &forged_payload;
    assert_rejected(&mut client, &parts.join("."), "tampered payload").await;
    // ... or one signature byte flipped.
    let mut sig = URL_SAFE_NO_PAD
        .decode(good.rsplit('.').next().unwrap())
        .unwrap();
    sig[0] ^= 1;
    let (head, _) = good.rsplit_once('.').unwrap();
    let flipped = format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert_rejected(&mut client, &flipped, "tampered signature").await;

    // `alg: none` with the server's kid and valid claims, no signature.
    let header = URL_SAFE_NO_PAD.encode(
        format!(
            r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#,
            server_key.key_id()
        )
        .as_bytes(),
    );
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    assert_rejected(&mut client, &format!("{header}.{payload}."), "alg none").await;

    assert_rejected(&mut client, "not-a-jwt", "garbage").await;

    // No bearer token at all.
    let status = client
        .get_current_user(GetCurrentUserRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .verify_token(VerifyTokenRequest {
            access_token: String::new(),
        })
        .await
        .expect_err("empty token");
    assert_eq!(status.code(), Code::InvalidArgument);

    // The genuine token still works after all that.
    client
        .get_current_user(testing::authed(GetCurrentUserRequest {}, &good))
        .await
        .expect("genuine token");
}
