//! The signing key file: generated once for local runs (private 0600, public
//! beside it), kept across restarts, and its `.pub` is what other services load.

use std::os::unix::fs::PermissionsExt;

use keel_proto::auth::v1::GetCurrentUserRequest;
use keel_shared::StartupError;
use keel_shared::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKeyPem, VerifierConfig};
use keel_shared::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;

use crate::support::{Server, TempDir, config, register_req};

#[tokio::test]
async fn generated_key_is_kept_and_restarts_keep_tokens_valid() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let key_file = dir.path().join("nested/jwt/signing.pem");
    let pub_file = dir.path().join("nested/jwt/signing.pem.pub");

    let mut first = config(&db, &key_file);
    first.tokens.jwt_generate_key = true;
    let server = Server::start(first).await;
    let tokens = server
        .client
        .clone()
        .register(register_req("keep@example.com", "long enough"))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    server.stop().await;

    let private_pem = std::fs::read_to_string(&key_file).unwrap();
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key mode {mode:o}");
    let public_pem = std::fs::read_to_string(&pub_file).unwrap();
    assert_eq!(
        public_pem,
        SigningKeyPem::public_from_private(&private_pem).unwrap()
    );

    // What the jobs and memory services do with `<file>.pub`.
    let verifier = VerifierConfig {
        jwt_public_key_files: vec![pub_file.clone()],
        jwt_issuer: DEFAULT_ISSUER.into(),
        jwt_audience: DEFAULT_AUDIENCE.into(),
        credential_cache_secs: 5,
    }
    .load()
    .unwrap();
    let verified = verifier.verify(&tokens.access_token).unwrap();
    assert_eq!(verified.email, "keep@example.com");

    // Restart (without the generate flag, and with the .pub gone): same key,
    // old tokens still valid, nothing rewritten.
    std::fs::remove_file(&pub_file).unwrap();
    let server = Server::start(config(&db, &key_file)).await;
    server
        .client
        .clone()
        .get_current_user(testing::authed(
            GetCurrentUserRequest {},
            &tokens.access_token,
        ))
        .await
        .expect("token from before the restart");
    server.stop().await;
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), private_pem);
    assert!(!pub_file.exists());

    // With the generate flag an existing key is kept and its .pub rewritten.
    let mut again = config(&db, &key_file);
    again.tokens.jwt_generate_key = true;
    let server = Server::start(again).await;
    server.stop().await;
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), private_pem);
    assert_eq!(std::fs::read_to_string(&pub_file).unwrap(), public_pem);
}

#[tokio::test]
async fn missing_or_bad_key_file_fails_start_up() {
    let db = TestDb::new().await;
    let dir = TempDir::new();

    let missing = dir.path().join("absent.pem");
    let err = start_err(config(&db, &missing)).await;
    assert!(
        matches!(
            err,
            StartupError::InvalidVar {
                var: "KEEL_JWT_PRIVATE_KEY_FILE",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("absent.pem"), "{err}");
    assert!(!missing.exists());

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let err = start_err(config(&db, &garbage)).await;
    assert!(
        matches!(
            err,
            StartupError::InvalidVar {
                var: "KEEL_JWT_PRIVATE_KEY_FILE",
                ..
            }
        ),
        "{err}"
    );

    let mut unset = config(&db, &missing);
    unset.tokens.jwt_private_key_file = None;
    let err = start_err(unset).await;
    assert!(
        matches!(err, StartupError::MissingVar("KEEL_JWT_PRIVATE_KEY_FILE")),
        "{err}"
    );
}

async fn start_err(config: keel_auth::Config) -> StartupError {
    let (listener, _) = testing::listener().await;
    keel_auth::run(config, listener, CancellationToken::new())
        .await
        .expect_err("start-up should fail")
}
