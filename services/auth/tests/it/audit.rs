//! Audit events: structured, naming the user, never carrying secrets. Runs
//! the real binary (its own global JSON logging) and reads its stderr.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{
    ChangePasswordRequest, CreateApiKeyRequest, LogoutAllRequest, LogoutRequest, RefreshRequest,
};
use keel_shared::testing::{self, TestDb};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{PASSWORD, TempDir, err, login_req, register_req};

const BIN: &str = env!("CARGO_BIN_EXE_keel-auth");
const NEW_PASSWORD: &str = "a brand new passphrase";

#[tokio::test]
async fn sign_in_events_are_logged_without_secrets() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let mut child = tokio::process::Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env("KEEL_AUTH_ADDR", "127.0.0.1:0")
        .env("KEEL_JWT_PRIVATE_KEY_FILE", dir.path().join("signing.pem"))
        .env("KEEL_JWT_GENERATE_KEY", "true")
        .env("KEEL_ARGON2_MEMORY_KIB", "1024")
        .env("KEEL_ARGON2_ITERATIONS", "1")
        .env("KEEL_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            let value = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
            sink.lock().unwrap().push(value);
        }
    });
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        lines.lock().unwrap().iter().find(|v| pred(v)).cloned()
    };
    testing::eventually(Duration::from_secs(30), "keel-auth serving", || async {
        find(&|v| v["message"] == "keel-auth serving").is_some()
    })
    .await;
    // "Some(127.0.0.1:PORT)"
    let addr = find(&|v| v["message"] == "keel-auth serving").unwrap()["addr"]
        .as_str()
        .unwrap()
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .unwrap();
    let mut client = AuthServiceClient::new(testing::channel(addr).await);

    let registered = client
        .register(register_req("audited@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner();
    let user_id = registered.user.unwrap().id;
    let first = registered.tokens.unwrap();
    err(client
        .login(login_req("audited@example.com", "wrong password!"))
        .await);
    let login = client
        .login(login_req("audited@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let second = client
        .refresh(RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    err(client
        .refresh(RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await);
    client
        .logout(LogoutRequest {
            refresh_token: login.refresh_token.clone(),
        })
        .await
        .unwrap();
    testing::eventually(Duration::from_secs(10), "logout audit line", || async {
        find(&|v| v["event"] == "logout").is_some()
    })
    .await;

    // API keys, a password change and LogoutAll: logged, their secrets not.
    let third = client
        .login(login_req("audited@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let api_key = client
        .create_api_key(testing::authed(
            CreateApiKeyRequest {
                name: "audited agent".into(),
                expires_at: None,
            },
            &third.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let _ = client
        .create_api_key(testing::authed(
            CreateApiKeyRequest {
                name: "minted by a key".into(),
                expires_at: None,
            },
            &api_key,
        ))
        .await;
    let _ = client
        .change_password(testing::authed(
            ChangePasswordRequest {
                current_password: "wrong password!".into(),
                new_password: NEW_PASSWORD.into(),
            },
            &third.access_token,
        ))
        .await;
    let changed = client
        .change_password(testing::authed(
            ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: NEW_PASSWORD.into(),
            },
            &third.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    client
        .logout_all(testing::authed(LogoutAllRequest {}, &changed.access_token))
        .await
        .unwrap();
    testing::eventually(Duration::from_secs(10), "logout_all audit line", || async {
        find(&|v| v["event"] == "logout_all").is_some()
    })
    .await;
    child.kill().await.unwrap();

    let all = lines.lock().unwrap().clone();
    let audit: Vec<&serde_json::Value> = all.iter().filter(|v| v["target"] == "audit").collect();
    let names: Vec<&str> = audit.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        names,
        [
            "user_registered",
            "login_failed",
            "login_succeeded",
            "token_refreshed",
            "refresh_token_reuse_detected",
            "logout",
            "login_succeeded",
            "api_key_created",
            "password_change_refused",
            "password_changed",
            "logout_all"
        ],
        "{all:#?}"
    );
    for e in &audit {
        if e["event"] == "login_failed" {
            assert!(e["email_hash"].is_string(), "{e}");
        } else {
            assert_eq!(e["user_id"], user_id.as_str(), "{e}");
        }
    }

    let hash: String = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT password_hash FROM users", &[])
        .await
        .unwrap()
        .get(0);
    let text = all
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [
        PASSWORD,
        "wrong password!",
        "audited@example.com",
        hash.as_str(),
        first.access_token.as_str(),
        first.refresh_token.as_str(),
        login.refresh_token.as_str(),
        second.refresh_token.as_str(),
        second.access_token.as_str(),
        api_key.as_str(),
        NEW_PASSWORD,
        third.access_token.as_str(),
        third.refresh_token.as_str(),
        changed.access_token.as_str(),
        changed.refresh_token.as_str(),
    ] {
        assert!(!text.contains(secret), "log contains a secret: {secret}");
    }
}
