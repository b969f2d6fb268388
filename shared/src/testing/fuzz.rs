//! Hostile-input harness for the services' property tests: a seeded proptest
//! runner, nasty text and JSON strategies, the clean-code check, raw message bytes.

use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use prost::bytes::{Buf, BufMut};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use tokio::runtime::Runtime;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::TestDb;

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
/// how many inputs were tried, as "`service` `name`".
pub fn property<S, F, Fut>(
    service: &str,
    name: &str,
    cases: u32,
    rt: &Runtime,
    strategy: S,
    test: F,
) where
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
        "{service} {name}: {} inputs tried (seed {seed:?})",
        tried.load(Ordering::Relaxed)
    ));
    if let Err(e) = outcome {
        panic!("{service} {name}: {e}");
    }
}

/// A line on the test process's stderr even when output is captured.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "hostile input: {line}");
}

/// The codes the contract allows for a request a client got wrong (OK when
/// the input happens to be valid).
pub const CLEAN: &[Code] = &[
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

/// Runs `call` and asserts a clean code, and that an error left what
/// `snapshot` reads unchanged.
pub async fn checked<T, V, Snap, SnapFut, Fut>(
    rpc: &str,
    snapshot: Snap,
    call: Fut,
) -> Result<T, Status>
where
    V: PartialEq + Debug,
    Snap: Fn() -> SnapFut,
    SnapFut: Future<Output = V>,
    Fut: Future<Output = Result<T, Status>>,
{
    let before = snapshot().await;
    let result = call.await;
    assert_clean(rpc, &result);
    if result.is_err() {
        assert_eq!(
            snapshot().await,
            before,
            "{rpc}: a refused call changed state"
        );
    }
    result
}

/// Strings are parameters, never SQL: every one of `tables` still exists.
pub async fn assert_tables_exist(db: &TestDb, tables: &[&str]) {
    let client = db.pool.get().await.unwrap();
    for table in tables {
        let found: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[table])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found.as_deref(), Some(*table));
    }
}

// ---------------------------------------------------------------------------
// Strategies.

/// SQL fragments for text fields; the two DROP lines name the service's `tables`.
pub fn sql_bits([first, second]: [&str; 2]) -> Vec<String> {
    let drop_first = format!("'; DROP TABLE {first}; --");
    let drop_second = format!("$$; DROP TABLE {second}; $$");
    [
        drop_first.as_str(),
        "' OR '1'='1",
        "%",
        "_",
        "%_%",
        "\\",
        "\\\\'",
        "$1",
        drop_second.as_str(),
        "\"",
        "'",
        "/* */ --",
        "NULL",
        "\u{202e}gnp.exe",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

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

/// Random text: unicode, control characters, NUL, SQL naming `tables`
/// (see [`sql_bits`]), empty, and long runs that cross every length limit.
pub fn nasty_string(tables: [&str; 2]) -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::collection::vec(nasty_char(), 0..40).prop_map(String::from_iter),
        1 => Just(String::new()),
        2 => prop::sample::select(sql_bits(tables)),
        1 => (
            prop::sample::select(vec![64usize, 65, 128, 129, 256, 257, 1025, 16_385, 65_537, 200_000]),
            nasty_char()
        )
            .prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
    .boxed()
}

fn leaf(text: BoxedStrategy<String>, number: BoxedStrategy<f64>) -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        number.prop_map(Kind::NumberValue),
        text.prop_map(Kind::StringValue),
    ]
    .prop_map(|k| Value { kind: Some(k) })
    .boxed()
}

/// Random JSON values with strings from `text` and numbers from `number`.
pub fn json_value(text: BoxedStrategy<String>, number: BoxedStrategy<f64>) -> BoxedStrategy<Value> {
    leaf(text.clone(), number)
        .prop_recursive(4, 32, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(|values| Value {
                    kind: Some(Kind::ListValue(ListValue { values })),
                }),
                prop::collection::btree_map(text.clone(), inner, 0..5).prop_map(|fields| Value {
                    kind: Some(Kind::StructValue(Struct { fields })),
                }),
            ]
        })
        .boxed()
}

/// `levels` objects nested in one another around a number.
pub fn nested(levels: usize) -> Struct {
    let mut s = Struct {
        fields: [(
            "n".to_string(),
            Value {
                kind: Some(Kind::NumberValue(1.0)),
            },
        )]
        .into_iter()
        .collect(),
    };
    for _ in 1..levels {
        s = Struct {
            fields: [(
                "a".to_string(),
                Value {
                    kind: Some(Kind::StructValue(s)),
                },
            )]
            .into_iter()
            .collect(),
        };
    }
    s
}

/// Random Structs, some nested up to `max_levels` objects: one past the
/// services' 64-level bound is 33, and prost refuses 34 in a top-level field
/// (the jobs tests' `nesting_past_prosts_limit_is_a_decode_error` covers that).
pub fn payload(
    max_levels: usize,
    text: BoxedStrategy<String>,
    number: BoxedStrategy<f64>,
) -> BoxedStrategy<Struct> {
    prop_oneof![
        6 => prop::collection::btree_map(text.clone(), json_value(text, number), 0..6)
            .prop_map(|fields| Struct { fields }),
        1 => (1usize..=max_levels).prop_map(nested),
    ]
    .boxed()
}

/// Mostly `valid`, else edge values and any i32.
pub fn small_i32(valid: std::ops::RangeInclusive<i32>) -> BoxedStrategy<i32> {
    prop_oneof![
        3 => valid,
        1 => prop::sample::select(vec![-1, 0, 1, 101, 1000, 1001, i32::MAX, i32::MIN]),
        1 => any::<i32>(),
    ]
    .boxed()
}

/// How a case spells a list call's page token.
#[derive(Debug, Clone)]
pub enum PageToken {
    Empty,
    /// A real token from the case's setup.
    Real,
    /// The right filter fingerprint around a cursor that is not a row's key.
    ForgedCursor(String),
    Text(String),
}

/// Page tokens: empty, real, forged around a [`nasty_string`] cursor, or text.
pub fn page_token(tables: [&str; 2]) -> BoxedStrategy<PageToken> {
    prop_oneof![
        2 => Just(PageToken::Empty),
        2 => Just(PageToken::Real),
        2 => nasty_string(tables).prop_map(PageToken::ForgedCursor),
        2 => nasty_string(tables).prop_map(PageToken::Text),
        1 => "[A-Za-z0-9_-]{0,64}".prop_map(PageToken::Text),
    ]
    .boxed()
}

impl PageToken {
    /// The token to send: `real`, or `forge(cursor)` for a forged cursor.
    pub fn resolve(&self, real: &str, forge: impl FnOnce(&str) -> String) -> String {
        match self {
            PageToken::Empty => String::new(),
            PageToken::Real => real.to_string(),
            PageToken::ForgedCursor(c) => forge(c),
            PageToken::Text(t) => t.clone(),
        }
    }
}

/// Authorization header bytes: printable ASCII, high bytes and newlines.
pub fn header_bytes() -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(prop_oneof![32u8..127, 128u8..=255, Just(b'\n')], 0..64).boxed()
}

/// `Bearer ` and nasty characters.
pub fn bearer_nasty() -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(nasty_char(), 0..64)
        .prop_map(|s| format!("Bearer {}", String::from_iter(s)).into_bytes())
        .boxed()
}

/// Random authorization header values: [`header_bytes`], [`bearer_nasty`]
/// or `Bearer ` and a random JWT-shaped token.
pub fn authorization_header() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        header_bytes(),
        bearer_nasty(),
        "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,90}"
            .prop_map(|s| format!("Bearer {s}").into_bytes()),
    ]
    .boxed()
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

/// A unary call of `path` on `channel` with the message bytes in `request` as they are.
pub async fn raw_call(
    channel: &Channel,
    path: &'static str,
    request: tonic::Request<Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(request, PathAndQuery::from_static(path), RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A length-delimited protobuf field.
pub fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A Struct `{key: "<bytes>"}` whose string value is `bytes` as they are.
pub fn struct_with_raw_string(key: &[u8], bytes: &[u8]) -> Vec<u8> {
    let value = field(3, bytes); // Value.string_value
    let entry = [field(1, key), field(2, &value)].concat(); // map entry
    field(1, &entry) // Struct.fields
}

/// `result` is tonic's INTERNAL for a message prost could not decode.
#[track_caller]
pub fn assert_decode_error(what: &str, result: Result<Vec<u8>, Status>) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Internal, "{what}: {status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message"),
        "{what}: {status:?}"
    );
}

/// `status` is tonic's INTERNAL for a message past prost's recursion limit.
#[track_caller]
pub fn assert_too_deep(status: &Status) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message")
            && status.message().contains("recursion limit reached"),
        "{status:?}"
    );
}
