//! Hostile input: property tests over every request message
//! of AuthService, one server per property reused across cases; undecodable
//! and oversized messages. Every answer is a contract code for bad input,
//! never UNKNOWN or INTERNAL, and a refused call changes no user or session.

use std::future::Future;

use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::*;
use keel_shared::testing::fuzz::{self, assert_decode_error, field, property, report, runtime};
use keel_shared::testing::{self, TestDb};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::support::{PASSWORD, TempDir, config, register_req};

const SERVICE: &str = "auth";

/// Two of the service's tables, named in the SQL fragments' DROP lines.
const TABLES: [&str; 2] = ["users", "sessions"];

/// An auth server on its own database and key, with one registered user.
pub(crate) struct Auth {
    pub db: TestDb,
    _keys: TempDir,
    pub channel: Channel,
    /// The registered user's tokens.
    pub tokens: TokenPair,
    shutdown: CancellationToken,
}

pub(crate) const EMAIL: &str = "hostile@example.com";

impl Auth {
    pub(crate) async fn start() -> Self {
        let db = TestDb::new().await;
        let keys = TempDir::new();
        let key_file = keys.path().join("signing.pem");
        std::fs::write(
            &key_file,
            keel_shared::auth::SigningKeyPem::generate().private_pem,
        )
        .unwrap();
        let (listener, _) = testing::listener().await;
        let addr = listener.local_addr().unwrap();
        let mut config = config(&db, &key_file);
        config.listen_addr = addr;
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_auth::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let tokens = AuthServiceClient::new(channel.clone())
            .register(register_req(EMAIL, PASSWORD))
            .await
            .expect("register")
            .into_inner()
            .tokens
            .unwrap();
        Self {
            db,
            _keys: keys,
            channel,
            tokens,
            shutdown,
        }
    }

    pub(crate) fn client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    /// Users, sessions and refresh tokens, as one comparable value (login
    /// failure counters are meant to change on a failed login).
    pub(crate) async fn snapshot(&self) -> (i64, String, String, String) {
        let client = self.db.pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM users),
                        (SELECT coalesce(md5(string_agg(u::text, '|' ORDER BY u.id)), '') FROM users u),
                        (SELECT coalesce(md5(string_agg(s::text, '|' ORDER BY s.id)), '') FROM sessions s),
                        (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t.token_hash)), '') FROM refresh_tokens t)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    /// Runs `call` and asserts a clean code, and that an error changed nothing.
    pub(crate) async fn checked<T, Fut>(&self, rpc: &str, call: Fut) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        fuzz::checked(rpc, || self.snapshot(), call).await
    }

    async fn raw_call(&self, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        fuzz::raw_call(&self.channel, path, tonic::Request::new(body)).await
    }

    async fn assert_serving(&self) {
        self.client()
            .verify_token(VerifyTokenRequest {
                access_token: self.tokens.access_token.clone(),
            })
            .await
            .expect("the server keeps serving");
    }
}

impl Drop for Auth {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------
// Strategies.

fn nasty_string() -> BoxedStrategy<String> {
    fuzz::nasty_string(TABLES)
}

fn email() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(EMAIL.to_string()),
        2 => Just(format!("  {}  ", EMAIL.to_uppercase())),
        3 => ("[a-z0-9._%+'$-]{1,20}", "[a-z0-9-]{1,10}\\.[a-z]{2,4}")
            .prop_map(|(local, domain)| format!("{local}@{domain}")),
        3 => (nasty_string(), nasty_string()).prop_map(|(local, domain)| format!("{local}@{domain}.com")),
        2 => nasty_string(),
    ]
    .boxed()
}

fn password() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(PASSWORD.to_string()),
        1 => prop::sample::select(fuzz::sql_bits(TABLES)).prop_map(|s| format!("{s}{s}{s}{s}{s}{s}{s}{s}")),
        4 => nasty_string(),
    ]
    .boxed()
}

/// Refresh and access tokens: random, shaped like ours, or ours tampered with.
#[derive(Debug, Clone)]
enum Token {
    Text(String),
    Shaped(String),
    /// Our own token with one character changed at this position.
    Tampered(usize),
}

fn token() -> BoxedStrategy<Token> {
    prop_oneof![
        3 => nasty_string().prop_map(Token::Text),
        2 => prop_oneof![
            "[A-Za-z0-9_-]{43}",
            "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,90}",
        ]
        .prop_map(Token::Shaped),
        2 => any::<usize>().prop_map(Token::Tampered),
    ]
    .boxed()
}

impl Token {
    fn resolve(&self, ours: &str) -> String {
        match self {
            Token::Text(s) | Token::Shaped(s) => s.clone(),
            Token::Tampered(at) => {
                let mut bytes = ours.as_bytes().to_vec();
                let i = at % bytes.len();
                bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
                String::from_utf8(bytes).unwrap()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// AuthService.

#[test]
fn register_survives_hostile_requests() {
    let rt = runtime();
    let auth = rt.block_on(Auth::start());
    let strategy = (email(), password(), nasty_string());
    property(
        SERVICE,
        "Register",
        64,
        &rt,
        strategy,
        |(email, password, display_name)| {
            let auth = &auth;
            async move {
                let req = RegisterRequest {
                    email: email.clone(),
                    password: password.clone(),
                    display_name: display_name.clone(),
                };
                let r = auth.checked("Register", auth.client().register(req)).await;
                let Ok(r) = r else { return };
                let r = r.into_inner();
                let user = r.user.unwrap();
                assert_eq!(
                    user.email,
                    email.trim().to_lowercase(),
                    "email stored as given"
                );
                assert_eq!(
                    user.display_name,
                    display_name.trim(),
                    "name stored as given"
                );
                let me = auth
                    .client()
                    .get_current_user(testing::authed(
                        GetCurrentUserRequest {},
                        &r.tokens.unwrap().access_token,
                    ))
                    .await
                    .expect("read back")
                    .into_inner()
                    .user
                    .unwrap();
                assert_eq!(me, user);
                // The password works verbatim.
                auth.client()
                    .login(LoginRequest { email, password })
                    .await
                    .expect("log in with the registered password");
            }
        },
    );
}

#[test]
fn login_survives_hostile_requests() {
    let rt = runtime();
    let auth = rt.block_on(Auth::start());
    property(
        SERVICE,
        "Login",
        64,
        &rt,
        (email(), password()),
        |(email, password)| {
            let auth = &auth;
            async move {
                let req = LoginRequest { email, password };
                let _ = auth.checked("Login", auth.client().login(req)).await;
            }
        },
    );
}

#[test]
fn refresh_logout_and_verify_survive_hostile_tokens() {
    let rt = runtime();
    let auth = rt.block_on(Auth::start());
    property(
        SERVICE,
        "Refresh/Logout/VerifyToken",
        128,
        &rt,
        (token(), 0..3u8),
        |(token, rpc)| {
            let auth = &auth;
            async move {
                let mut client = auth.client();
                match rpc {
                    0 => {
                        let refresh_token = token.resolve(&auth.tokens.refresh_token);
                        let _ = auth
                            .checked("Refresh", client.refresh(RefreshRequest { refresh_token }))
                            .await
                            .expect_err("never our live token");
                    }
                    1 => {
                        let refresh_token = token.resolve(&auth.tokens.refresh_token);
                        let _ = auth
                            .checked("Logout", client.logout(LogoutRequest { refresh_token }))
                            .await
                            .expect_err("never our live token");
                    }
                    _ => {
                        let access_token = token.resolve(&auth.tokens.access_token);
                        let r = auth
                            .checked(
                                "VerifyToken",
                                client.verify_token(VerifyTokenRequest { access_token }),
                            )
                            .await;
                        // Changing the last character may only touch unused bits.
                        if let (Ok(r), Token::Tampered(_)) = (&r, &token) {
                            assert_eq!(r.get_ref().email, EMAIL);
                        } else {
                            r.expect_err("not a token we issued");
                        }
                    }
                }
                // The real session is untouched.
                auth.assert_serving().await;
            }
        },
    );
    // The live refresh token still rotates after all that.
    rt.block_on(async {
        auth.client()
            .refresh(RefreshRequest {
                refresh_token: auth.tokens.refresh_token.clone(),
            })
            .await
            .expect("the genuine refresh token still works");
    });
}

#[test]
fn get_current_user_survives_hostile_credentials() {
    let rt = runtime();
    let auth = rt.block_on(Auth::start());
    let header = prop_oneof![
        fuzz::header_bytes(),
        fuzz::bearer_nasty(),
        // API-key shaped: our prefix, then anything.
        nasty_string().prop_map(|s| format!("Bearer keel_{s}").into_bytes()),
        "[A-Za-z0-9_-]{43}".prop_map(|s| format!("Bearer keel_{s}").into_bytes()),
        token().prop_map(|t| match t {
            Token::Text(s) | Token::Shaped(s) => format!("Bearer {s}").into_bytes(),
            Token::Tampered(at) =>
                format!("Bearer {}", t.resolve(&"x".repeat(at % 7 + 1))).into_bytes(),
        }),
    ];
    property(SERVICE, "GetCurrentUser", 128, &rt, header, |header| {
        let auth = &auth;
        async move {
            let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(header.as_slice()) else {
                return; // not a header value any HTTP/2 client can send
            };
            if header.len() > 8 * 1024 {
                // Past hyper's 16 KiB header-list limit the HTTP/2 layer answers
                // 431 before gRPC runs (clients see UNKNOWN): not ours to shape.
                return;
            }
            let mut req = tonic::Request::new(GetCurrentUserRequest {});
            req.metadata_mut().insert("authorization", value);
            let r = auth
                .checked("GetCurrentUser", auth.client().get_current_user(req))
                .await;
            assert_eq!(
                r.expect_err("random credential").code(),
                Code::Unauthenticated
            );
        }
    });
}

#[test]
fn api_key_and_password_rpcs_survive_hostile_requests() {
    let rt = runtime();
    let auth = rt.block_on(Auth::start());
    let input = (
        nasty_string(),
        prop_oneof![Just(None), (any::<i64>(), any::<i32>()).prop_map(Some)],
        nasty_string(),
        password(),
        password(),
    );
    property(
        SERVICE,
        "CreateApiKey/RevokeApiKey/ChangePassword",
        64,
        &rt,
        input,
        |(name, expires_at, id, current, new)| {
            let auth = &auth;
            async move {
                let token = &auth.tokens.access_token;
                let expires_at =
                    expires_at.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos });
                let created = auth
                    .checked(
                        "CreateApiKey",
                        auth.client().create_api_key(testing::authed(
                            CreateApiKeyRequest { name, expires_at },
                            token,
                        )),
                    )
                    .await;
                if let Err(s) = &created {
                    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
                }
                let revoked = auth
                    .checked(
                        "RevokeApiKey",
                        auth.client()
                            .revoke_api_key(testing::authed(RevokeApiKeyRequest { id }, token)),
                    )
                    .await;
                let code = revoked.expect_err("not a key id we issued").code();
                assert!(
                    matches!(code, Code::InvalidArgument | Code::NotFound),
                    "{code:?}"
                );
                if current == PASSWORD {
                    return;
                }
                let changed = auth
                    .checked(
                        "ChangePassword",
                        auth.client().change_password(testing::authed(
                            ChangePasswordRequest {
                                current_password: current,
                                new_password: new,
                            },
                            token,
                        )),
                    )
                    .await;
                let code = changed.expect_err("not the current password").code();
                assert!(
                    matches!(
                        code,
                        Code::InvalidArgument | Code::Unauthenticated | Code::ResourceExhausted
                    ),
                    "{code:?}"
                );
            }
        },
    );
    // The genuine session survived all that.
    rt.block_on(auth.assert_serving());
}

// ---------------------------------------------------------------------------
// Messages the library refuses before any handler runs.

#[tokio::test]
async fn invalid_utf8_is_refused_at_decode_and_changes_nothing() {
    let auth = Auth::start().await;
    let before = auth.snapshot().await;
    let register = |email: &[u8], password: &[u8], name: &[u8]| {
        [field(1, email), field(2, password), field(3, name)].concat()
    };
    let bad = [
        (
            "/keel.auth.v1.AuthService/Register",
            register(b"new\xff@example.com", PASSWORD.as_bytes(), b""),
        ),
        (
            "/keel.auth.v1.AuthService/Register",
            register(b"new@example.com", b"correct horse \xc3", b""),
        ),
        (
            "/keel.auth.v1.AuthService/Register",
            register(b"new@example.com", PASSWORD.as_bytes(), b"\xed\xa0\x80"),
        ),
        (
            "/keel.auth.v1.AuthService/Login",
            [field(1, EMAIL.as_bytes()), field(2, b"\x80")].concat(),
        ),
        ("/keel.auth.v1.AuthService/Refresh", field(1, b"\xfe\xff")),
        ("/keel.auth.v1.AuthService/Logout", field(1, b"\xfe\xff")),
        (
            "/keel.auth.v1.AuthService/VerifyToken",
            field(1, b"a.b\xff.c"),
        ),
    ];
    let n = bad.len();
    for (path, body) in bad {
        assert_decode_error(path, auth.raw_call(path, body).await);
    }
    // Control: the same bytes, valid, register.
    auth.raw_call(
        "/keel.auth.v1.AuthService/Register",
        register(b"new@example.com", PASSWORD.as_bytes(), b""),
    )
    .await
    .expect("valid bytes");
    assert_eq!(auth.snapshot().await.0, before.0 + 1);
    auth.assert_serving().await;
    report(&format!(
        "auth invalid UTF-8: {n} messages refused at decode"
    ));
}

/// Messages over `MAX_MESSAGE_BYTES` are refused before decoding (tonic says
/// OUT_OF_RANGE; see the jobs tests' `oversized_messages_are_resource_exhausted`),
/// change nothing, and the server goes on serving.
#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_keeps_serving() {
    let auth = Auth::start().await;
    let before = auth.snapshot().await;
    let huge = "x".repeat(keel_shared::server::MAX_MESSAGE_BYTES + 1);
    let status = auth
        .client()
        .register(RegisterRequest {
            email: "big@example.com".into(),
            password: PASSWORD.into(),
            display_name: huge.clone(),
        })
        .await
        .unwrap_err();
    assert!(status.code() == Code::ResourceExhausted, "{status:?}");
    let status = auth
        .client()
        .login(LoginRequest {
            email: EMAIL.into(),
            password: huge,
        })
        .await
        .unwrap_err();
    assert!(status.code() == Code::ResourceExhausted, "{status:?}");
    // Under the message limit: the service's own bounds, before any hashing.
    let status = auth
        .client()
        .login(LoginRequest {
            email: EMAIL.into(),
            password: "x".repeat(3 * 1024 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("password: "), "{status:?}");
    assert_eq!(auth.snapshot().await, before);
    auth.assert_serving().await;
}
