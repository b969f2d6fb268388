//! Hostile input: property tests over every request message
//! of MemoryService, one server per property reused across cases;
//! undecodable (invalid UTF-8, nesting past prost's limit) and oversized
//! messages. Every answer is a contract code for bad input, never UNKNOWN or
//! INTERNAL, and a refused call changes nothing.

use std::future::Future;

use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::*;
use keel_shared::json::struct_to_json;
use keel_shared::testing::fuzz::{
    self, assert_decode_error, assert_too_deep, field, nested, property, report, runtime,
    small_i32, struct_with_raw_string,
};
use keel_shared::testing::{self, TestDb};
use proptest::prelude::*;
use prost_types::Struct;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

const SERVICE: &str = "memory";

/// Two of the service's tables, named in the SQL fragments' DROP lines.
const TABLES: [&str; 2] = ["memories", "memory_tag_counts"];

/// A memory server on its own database, with one user.
pub(crate) struct Mem {
    pub db: TestDb,
    pub channel: Channel,
    pub user_id: Uuid,
    pub token: String,
    shutdown: CancellationToken,
}

impl Mem {
    pub(crate) async fn start() -> Self {
        let db = TestDb::new().await;
        let (listener, addr) = testing::listener().await;
        let config = keel_memory::Config::new(addr, db.config(), testing::verifier_config());
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_memory::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let user_id = db.create_user("hostile@example.com").await;
        Self {
            token: testing::user_token(user_id, "hostile@example.com"),
            db,
            channel,
            user_id,
            shutdown,
        }
    }

    pub(crate) fn client(&self) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::new(self.channel.clone())
    }

    pub(crate) fn u<T>(&self, message: T) -> tonic::Request<T> {
        testing::authed(message, &self.token)
    }

    pub(crate) async fn put(&self, req: PutMemoryRequest) -> Result<Memory, Status> {
        self.client()
            .put_memory(self.u(req))
            .await
            .map(|r| r.into_inner().memory.expect("memory"))
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Memory, Status> {
        self.client()
            .get_memory(self.u(GetMemoryRequest {
                key: key.into(),
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().memory.expect("memory"))
    }

    /// Every memory, tag count and key's last version, as one comparable value.
    pub(crate) async fn snapshot(&self) -> (i64, String, String, String) {
        let client = self.db.pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM memories),
                        (SELECT coalesce(md5(string_agg(m::text, '|' ORDER BY m::text)), '') FROM memories m),
                        (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM memory_tag_counts t),
                        (SELECT coalesce(md5(string_agg(v::text, '|' ORDER BY v::text)), '') FROM memory_versions v)",
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
        fuzz::raw_call(&self.channel, path, self.u(body)).await
    }

    async fn assert_serving(&self) {
        self.put(put("serving", "still here"))
            .await
            .expect("the server keeps serving");
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) fn put(key: &str, content: &str) -> PutMemoryRequest {
    PutMemoryRequest {
        key: key.into(),
        content: content.into(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Strategies.

fn nasty_string() -> BoxedStrategy<String> {
    fuzz::nasty_string(TABLES)
}

fn text() -> BoxedStrategy<String> {
    nasty_string()
}

fn number() -> BoxedStrategy<f64> {
    prop_oneof![
        // Up to 15 significant digits: longer ones come back changed (see
        // the jobs tests' `numbers_with_17_significant_digits_round_trip`).
        4 => (-(1i64 << 49)..(1i64 << 49)).prop_map(|n| n as f64),
        1 => (-1000i32..1000).prop_map(|n| f64::from(n) / 8.0),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0]),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec!["k", "a_b", "a.b", "notes/2024:x-y", "A", "_", "-", "..", "/"])
            .prop_map(String::from),
        3 => "[A-Za-z0-9._:/-]{1,20}",
        1 => "[A-Za-z0-9._:/-]{250,260}",
        3 => nasty_string(),
    ]
    .boxed()
}

fn tags() -> BoxedStrategy<Vec<String>> {
    prop_oneof![
        4 => prop::collection::vec(
            prop_oneof![prop::sample::select(vec!["t", "%", "_", "a b", "日本"]).prop_map(String::from), nasty_string()],
            0..6
        ),
        1 => prop::collection::vec("[a-z]{1,3}", 30..40),
    ]
    .boxed()
}

fn version() -> BoxedStrategy<i64> {
    prop_oneof![
        3 => Just(0i64),
        3 => 1i64..4,
        1 => prop::sample::select(vec![-1i64, i64::MAX, i64::MIN]),
        1 => any::<i64>(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// MemoryService.

#[test]
fn put_memory_survives_hostile_requests() {
    let rt = runtime();
    let mem = rt.block_on(Mem::start());
    let strategy = (
        key(),
        text(),
        tags(),
        prop::option::of(fuzz::payload(33, text(), number())),
        version(),
    );
    property(
        SERVICE,
        "PutMemory",
        128,
        &rt,
        strategy,
        |(key, content, tags, metadata, expected_version)| {
            let mem = &mem;
            async move {
                let req = PutMemoryRequest {
                    key: key.clone(),
                    content: content.clone(),
                    tags: tags.clone(),
                    metadata: metadata.clone(),
                    expected_version,
                    ..Default::default()
                };
                let Ok(stored) = mem.checked("PutMemory", mem.put(req)).await else {
                    return;
                };
                assert_eq!(stored.key, key);
                assert_eq!(stored.content, content, "content stored verbatim");
                let mut distinct: Vec<String> = Vec::new();
                for t in tags {
                    if !distinct.contains(&t) {
                        distinct.push(t);
                    }
                }
                assert_eq!(stored.tags, distinct, "tags stored verbatim");
                let want = metadata
                    .as_ref()
                    .map(|m| struct_to_json(m).unwrap())
                    .unwrap_or(serde_json::json!({}));
                assert_eq!(
                    struct_to_json(stored.metadata.as_ref().unwrap()).unwrap(),
                    want
                );
                assert_eq!(mem.get(&key).await.expect("read back"), stored);
            }
        },
    );
}

#[test]
fn get_and_delete_memory_survive_hostile_requests() {
    let rt = runtime();
    let mem = rt.block_on(Mem::start());
    let strategy = (key(), version(), any::<bool>());
    property(
        SERVICE,
        "GetMemory/DeleteMemory",
        128,
        &rt,
        strategy,
        |(key, expected_version, delete)| {
            let mem = &mem;
            async move {
                // Something to find (or delete) under a few of the keys generated.
                let target = mem.put(put("a_b", "target")).await.expect("put target");
                if delete {
                    let req = DeleteMemoryRequest {
                        key: key.clone(),
                        expected_version,
                        ..Default::default()
                    };
                    let r = mem
                        .checked("DeleteMemory", mem.client().delete_memory(mem.u(req)))
                        .await;
                    if r.is_ok() {
                        assert_eq!(mem.get(&key).await.unwrap_err().code(), Code::NotFound);
                    }
                } else {
                    let before = mem.snapshot().await;
                    let r = mem.checked("GetMemory", mem.get(&key)).await;
                    if let Ok(found) = r {
                        if key == "a_b" {
                            assert_eq!(found, target);
                        }
                        assert_eq!(found.key, key);
                    }
                    assert_eq!(mem.snapshot().await, before, "GetMemory changed state");
                }
            }
        },
    );
}

#[test]
fn list_memories_survives_hostile_requests() {
    let rt = runtime();
    let mem = rt.block_on(Mem::start());
    let real_token = rt.block_on(async {
        for (k, tag) in [("a_b", "t"), ("a.b", "%"), ("axb", "_"), ("notes/1", "t")] {
            let mut req = put(k, "x");
            req.tags = vec![tag.into()];
            mem.put(req).await.unwrap();
        }
        mem.client()
            .list_memories(mem.u(ListMemoriesRequest {
                page_size: 1,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .next_page_token
    });
    let token = fuzz::page_token(TABLES);
    let prefix = prop_oneof![
        Just(String::new()),
        Just("a_".to_string()),
        Just("a".to_string()),
        key()
    ];
    let tag = prop_oneof![
        Just(String::new()),
        Just("_".to_string()),
        Just("%".to_string()),
        nasty_string()
    ];
    let strategy = (small_i32(0..=1000), token, prefix, tag);
    property(
        SERVICE,
        "ListMemories",
        128,
        &rt,
        strategy,
        |(page_size, token, key_prefix, tag)| {
            let mem = &mem;
            let real_token = &real_token;
            async move {
                let page_token = token.resolve(real_token, |c| {
                    keel_shared::paging::encode_token(
                        &keel_memory::domain::list_filter(mem.user_id, "", &key_prefix, &tag),
                        &c,
                    )
                });
                let req = ListMemoriesRequest {
                    page_size,
                    page_token,
                    key_prefix: key_prefix.clone(),
                    tag: tag.clone(),
                    ..Default::default()
                };
                let before = mem.snapshot().await;
                let r = mem
                    .checked("ListMemories", mem.client().list_memories(mem.u(req)))
                    .await;
                assert_eq!(mem.snapshot().await, before, "ListMemories changed state");
                if let Ok(r) = r {
                    let page = r.into_inner();
                    let limit = if page_size == 0 {
                        50
                    } else {
                        page_size.min(1000)
                    };
                    assert!(page.memories.len() <= limit as usize);
                    for m in &page.memories {
                        // `_` and `%` are literal: no LIKE wildcards.
                        assert!(m.key.starts_with(&key_prefix), "{} !~ {key_prefix}", m.key);
                        if !tag.is_empty() {
                            assert!(m.tags.contains(&tag), "{:?} lacks {tag}", m.tags);
                        }
                    }
                }
            }
        },
    );
}

#[test]
fn search_memories_survives_hostile_requests() {
    let rt = runtime();
    let mem = rt.block_on(Mem::start());
    rt.block_on(async {
        for (k, c) in [
            ("a", "the walrus said '; DROP TABLE memories; --"),
            ("b", "100% of _underscores_ and \\ backslashes $1"),
            ("c", "日本語のテキスト & | ! <-> :* (x)"),
        ] {
            mem.put(put(k, c)).await.unwrap();
        }
    });
    let query = prop_oneof![
        3 => nasty_string(),
        2 => prop::sample::select(vec![
            "walrus", "!walrus", "walrus & !", "(", ")", "|", "&", "<->", ":*", "a:*", "'",
            "\\", "%", "_", "!!!", "-walrus", "\"or\"", "\"unterminated", "walrus or", "日本語",
        ])
        .prop_map(String::from),
        1 => prop::collection::vec(prop::sample::select(vec!["&", "|", "!", "(", ")", "<->", ":*", "\"", "-", "or", "walrus", " "]), 0..30)
            .prop_map(|parts| parts.concat()),
    ];
    property(
        SERVICE,
        "SearchMemories",
        128,
        &rt,
        (query, small_i32(0..=100)),
        |(query, limit)| {
            let mem = &mem;
            async move {
                let before = mem.snapshot().await;
                let req = SearchMemoriesRequest {
                    query,
                    limit,
                    ..Default::default()
                };
                let r = mem
                    .checked("SearchMemories", mem.client().search_memories(mem.u(req)))
                    .await;
                assert_eq!(mem.snapshot().await, before, "SearchMemories changed state");
                if let Ok(r) = r {
                    let n = r.into_inner().results.len();
                    assert!(n <= if limit == 0 { 10 } else { limit as usize });
                }
            }
        },
    );
}

#[test]
fn random_credentials_are_unauthenticated_and_change_nothing() {
    let rt = runtime();
    let mem = rt.block_on(Mem::start());
    let header = fuzz::authorization_header();
    property(SERVICE, "credentials", 128, &rt, header, |header| {
        let mem = &mem;
        async move {
            let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(header.as_slice()) else {
                return; // not a header value any HTTP/2 client can send
            };
            let mut req = tonic::Request::new(put("k", "v"));
            req.metadata_mut().insert("authorization", value.clone());
            let r = mem.checked("PutMemory", mem.client().put_memory(req)).await;
            assert_eq!(
                r.expect_err("random credential").code(),
                Code::Unauthenticated
            );
            let mut req = tonic::Request::new(GetWorkspaceRequest::default());
            req.metadata_mut().insert("authorization", value);
            let r = mem
                .checked("GetWorkspace", mem.client().get_workspace(req))
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

const PUT: &str = "/keel.memory.v1.MemoryService/PutMemory";

#[tokio::test]
async fn invalid_utf8_is_refused_at_decode_and_changes_nothing() {
    let mem = Mem::start().await;
    // Control: hand-made bytes that decode are accepted.
    mem.raw_call(PUT, [field(1, b"k"), field(2, b"content")].concat())
        .await
        .expect("valid bytes");
    let before = mem.snapshot().await;
    let bad = [
        ("key", field(1, b"k\xff")),
        ("content", [field(1, b"k"), field(2, b"caf\xc3")].concat()),
        (
            "tag",
            [field(1, b"k"), field(3, b"ok"), field(3, b"\xed\xa0\x80")].concat(),
        ),
        (
            "metadata string",
            [
                field(1, b"k"),
                field(4, &struct_with_raw_string(b"s", b"\xc0\xaf")),
            ]
            .concat(),
        ),
        (
            "metadata key",
            [
                field(1, b"k"),
                field(4, &struct_with_raw_string(b"\xfe", b"x")),
            ]
            .concat(),
        ),
    ];
    let n = bad.len();
    for (what, body) in bad {
        assert_decode_error(what, mem.raw_call(PUT, body).await);
    }
    assert_decode_error(
        "search query",
        mem.raw_call(
            "/keel.memory.v1.MemoryService/SearchMemories",
            field(1, b"\x80"),
        )
        .await,
    );
    assert_eq!(mem.snapshot().await, before);
    assert_eq!(mem.get("k").await.unwrap().content, "content");
    mem.assert_serving().await;
    report(&format!(
        "memory invalid UTF-8: {} messages refused at decode",
        n + 1
    ));
}

fn with_metadata(metadata: Struct) -> PutMemoryRequest {
    PutMemoryRequest {
        metadata: Some(metadata),
        ..put("meta", "")
    }
}

/// 32 nested objects are the deepest the services' 64-level bound allows;
/// 33 are INVALID_ARGUMENT; from 34 prost (100 message levels, three per
/// object) cannot decode the message: INTERNAL with the decode error, as
/// gRPC's status-code guide prescribes for a library parse failure.
#[tokio::test]
async fn nesting_past_the_bounds_is_refused_and_changes_nothing() {
    let mem = Mem::start().await;
    mem.put(with_metadata(nested(32))).await.expect("32 levels");
    let before = mem.snapshot().await;
    let status = mem.put(with_metadata(nested(33))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("metadata: "), "{status:?}");
    for levels in [34, 200] {
        let status = mem.put(with_metadata(nested(levels))).await.unwrap_err();
        assert_too_deep(&status);
    }
    assert_eq!(mem.snapshot().await, before);
    mem.assert_serving().await;
}

/// Messages over `MAX_MESSAGE_BYTES` are refused before decoding (tonic says
/// OUT_OF_RANGE; see the jobs tests' `oversized_messages_are_resource_exhausted`),
/// change nothing, and the server goes on serving.
#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_keeps_serving() {
    let mem = Mem::start().await;
    mem.put(put("k", "small")).await.unwrap();
    let before = mem.snapshot().await;
    let huge = "x".repeat(keel_shared::server::MAX_MESSAGE_BYTES + 1);
    let status = mem.put(put("k", &huge)).await.unwrap_err();
    assert!(status.code() == Code::ResourceExhausted, "{status:?}");
    let tags = vec!["t".repeat(64); keel_shared::server::MAX_MESSAGE_BYTES / 60];
    let status = mem
        .put(PutMemoryRequest {
            tags,
            ..put("k", "")
        })
        .await
        .unwrap_err();
    assert!(status.code() == Code::ResourceExhausted, "{status:?}");
    // Under the message limit, over the content limit: the service's own check.
    let status = mem
        .put(put("k", &"x".repeat(3 * 1024 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("content: "), "{status:?}");
    assert_eq!(mem.snapshot().await, before);
    assert_eq!(mem.get("k").await.unwrap().content, "small");
    mem.assert_serving().await;
}
