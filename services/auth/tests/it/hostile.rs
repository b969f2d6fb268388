//! Hostile input (issue 9, item 5): property tests over every request message
//! of AuthService, one server per property reused across cases; undecodable
//! and oversized messages. Every answer is a contract code for bad input,
//! never UNKNOWN or INTERNAL, and a refused call changes no user or session.

use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::*;
use keel_shared::testing::{self, TestDb};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use prost::bytes::{Buf, BufMut};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::support::{PASSWORD, TempDir, config, register_req};

// ---------------------------------------------------------------------------
// Harness: one runtime and one server per property, cases counted.

pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The inputs' seed: fixed, so a run is reproducible and CI stable, unless
/// `KEEL_FUZZ_SEED` is a number or `random` (a failure prints its input).
pub fn seed() -> RngSeed {
    match std::env::var("KEEL_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => RngSeed::Fixed(n.parse().expect("KEEL_FUZZ_SEED: a number or `random`")),
        Err(_) => RngSeed::Fixed(0x6b65_656c),
    }
}

/// Runs `test` on `cases` generated inputs (shrinking on failure) and prints
/// how many inputs were tried.
pub fn property<S, F, Fut>(name: &str, cases: u32, rt: &Runtime, strategy: S, test: F)
where
    S: Strategy,
    S::Value: Debug,
    F: Fn(S::Value) -> Fut,
    Fut: Future<Output = ()>,
{
    let tried = AtomicUsize::new(0);
    let seed = seed();
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        rng_seed: seed,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&strategy, |input| {
        tried.fetch_add(1, Ordering::Relaxed);
        rt.block_on(test(input));
        Ok(())
    });
    report(&format!(
        "auth {name}: {} inputs tried (seed {seed:?})",
        tried.load(Ordering::Relaxed)
    ));
    if let Err(e) = outcome {
        panic!("auth {name}: {e}");
    }
}

/// A line on the test process's stderr even when output is captured.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "hostile input: {line}");
}

/// The codes the contract allows for a request a client got wrong (OK when
/// the input happens to be valid).
const CLEAN: &[Code] = &[
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::AlreadyExists,
    Code::ResourceExhausted,
];

#[track_caller]
pub fn assert_clean<T>(rpc: &str, result: &Result<T, Status>) {
    if let Err(s) = result {
        assert!(
            CLEAN.contains(&s.code()),
            "{rpc}: {:?} is not a bad-input code: {}",
            s.code(),
            s.message()
        );
        let lower = s.message().to_lowercase();
        for leak in ["sqlstate", "postgres", "syntax error", "select ", "insert "] {
            assert!(!lower.contains(leak), "{rpc}: SQL in message {lower:?}");
        }
    }
}

/// An auth server on its own database and key, with one registered user.
pub struct Auth {
    pub db: TestDb,
    _keys: TempDir,
    pub channel: Channel,
    /// The registered user's tokens.
    pub tokens: TokenPair,
    shutdown: CancellationToken,
}

pub const EMAIL: &str = "hostile@example.com";

impl Auth {
    pub async fn start() -> Self {
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

    pub fn client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    /// Users, sessions and refresh tokens, as one comparable value (login
    /// failure counters are meant to change on a failed login).
    pub async fn snapshot(&self) -> (i64, String, String, String) {
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
    pub async fn checked<T, Fut>(&self, rpc: &str, call: Fut) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let before = self.snapshot().await;
        let result = call.await;
        assert_clean(rpc, &result);
        if result.is_err() {
            assert_eq!(
                self.snapshot().await,
                before,
                "{rpc}: a refused call changed state"
            );
        }
        result
    }

    async fn raw_call(&self, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        grpc.unary(
            tonic::Request::new(body),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map(|r| r.into_inner())
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

pub const SQL_BITS: &[&str] = &[
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    "%",
    "_",
    "%_%",
    "\\",
    "\\\\'",
    "$1",
    "$$; DROP TABLE sessions; $$",
    "\"",
    "'",
    "/* */ --",
    "NULL",
    "\u{202e}gnp.exe",
];

pub fn nasty_char() -> BoxedStrategy<char> {
    prop_oneof![
        3 => prop::sample::select(vec![
            '\0', '\n', '\r', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{200b}', '\u{202e}',
            '\u{feff}', '\u{fffd}', '\u{10ffff}', '\'', '"', '\\', '%', '_', '$', ';', '-', '.',
            ':', '/', ' ', '|', '{', 'é', 'ß', 'İ', '日', '🦀',
        ]),
        3 => prop::char::range('a', 'z'),
        1 => prop::char::range('0', '9'),
        2 => any::<char>(),
    ]
    .boxed()
}

/// Random text: unicode, control characters, NUL, SQL, empty, and long runs
/// that cross every length limit.
pub fn nasty_string() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::collection::vec(nasty_char(), 0..40).prop_map(String::from_iter),
        1 => Just(String::new()),
        2 => prop::sample::select(SQL_BITS).prop_map(String::from),
        1 => (
            prop::sample::select(vec![64usize, 65, 128, 129, 256, 257, 1025, 16_385, 65_537, 200_000]),
            nasty_char()
        )
            .prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
    .boxed()
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
        1 => prop::sample::select(SQL_BITS).prop_map(|s| format!("{s}{s}{s}{s}{s}{s}{s}{s}")),
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
        prop::collection::vec(prop_oneof![32u8..127, 128u8..=255, Just(b'\n')], 0..64),
        prop::collection::vec(nasty_char(), 0..64).prop_map(|s| format!(
            "Bearer {}",
            String::from_iter(s)
        )
        .into_bytes()),
        token().prop_map(|t| match t {
            Token::Text(s) | Token::Shaped(s) => format!("Bearer {s}").into_bytes(),
            Token::Tampered(at) =>
                format!("Bearer {}", t.resolve(&"x".repeat(at % 7 + 1))).into_bytes(),
        }),
    ];
    property("GetCurrentUser", 128, &rt, header, |header| {
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

// ---------------------------------------------------------------------------
// Messages the library refuses before any handler runs.

/// Sends and receives message bytes as they are.
#[derive(Clone, Copy)]
pub struct RawCodec;
pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A length-delimited protobuf field.
pub fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

#[track_caller]
fn assert_decode_error(what: &str, result: Result<Vec<u8>, Status>) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Internal, "{what}: {status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message"),
        "{what}: {status:?}"
    );
}

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
