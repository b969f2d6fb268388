//! MemoryAdminService: an admin reads one user's memories (newest first,
//! paged), each read audited; nobody else may.

use keel_proto::admin::v1::ListUserMemoriesRequest;
use keel_proto::memory::v1::PutMemoryRequest;
use keel_shared::testing::{self, authed};
use tonic::{Code, Request};
use uuid::Uuid;

use crate::support::{Env, User, put_req};

fn req(
    user_id: &str,
    namespace: &str,
    page_size: i32,
    page_token: &str,
) -> ListUserMemoriesRequest {
    ListUserMemoriesRequest {
        user_id: user_id.into(),
        namespace: namespace.into(),
        page_size,
        page_token: page_token.into(),
    }
}

#[tokio::test]
async fn an_admin_reads_a_users_memories_newest_first_and_each_read_is_audited() {
    let env = Env::start().await;
    let (_, admin) = env.db.create_admin("ops@example.com").await;
    let email = "owner@example.com";
    let owner_id = env.db.create_user(email).await;
    let owner = User {
        token: testing::user_token(owner_id, email),
    };
    for key in ["a", "b", "c"] {
        env.put_ok(&owner, key, &format!("content {key}"), &[])
            .await;
    }
    env.put_ok(&owner, "a", "updated", &[]).await; // now the newest
    env.put(
        &owner,
        PutMemoryRequest {
            namespace: "work".into(),
            ..put_req("w", "elsewhere", &[])
        },
    )
    .await
    .unwrap();

    let mut client = env.admin.clone();
    let first = client
        .list_user_memories(authed(req(&owner_id.to_string(), "", 2, ""), &admin))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<_> = first.memories.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    assert_eq!(first.memories[0].content, "updated");
    let rest = client
        .list_user_memories(authed(
            req(&owner_id.to_string(), "", 2, &first.next_page_token),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<_> = rest.memories.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["b"]);
    assert!(rest.next_page_token.is_empty());
    let work = client
        .list_user_memories(authed(req(&owner_id.to_string(), "work", 0, ""), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(work.memories.len(), 1);
    assert_eq!(work.memories[0].key, "w");

    let pg = env.db.pool.get().await.unwrap();
    let audited: Vec<(String, String, String, serde_json::Value)> = pg
        .query(
            "SELECT admin_email, action, target, detail FROM admin_audit ORDER BY at, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(audited.len(), 3, "every read is recorded");
    for (email, action, target, _) in &audited {
        assert_eq!(email, "ops@example.com");
        assert_eq!(action, "memory.read");
        assert_eq!(target, &format!("user:{owner_id}"));
    }
    assert_eq!(audited[2].3["namespace"], "work");
}

#[tokio::test]
async fn bad_input_names_the_field_and_non_admins_are_refused() {
    let env = Env::start().await;
    let (admin_id, admin) = env.db.create_admin("ops@example.com").await;
    let plain = env.user("plain").await;
    let some_user = Uuid::now_v7().to_string();
    let mut client = env.admin.clone();
    let cases = [
        (req("", "", 0, ""), "user_id"),
        (req("nope", "", 0, ""), "user_id"),
        (req(&some_user, "bad namespace!", 0, ""), "namespace"),
        (req(&some_user, "", -1, ""), "page_size"),
        (req(&some_user, "", 0, "garbage!"), "page_token"),
    ];
    for (r, field) in cases {
        let got = client
            .list_user_memories(authed(r, &admin))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{field}");
        assert!(got.message().starts_with(field), "{got:?}");
    }
    let got = client
        .list_user_memories(authed(req(&some_user, "", 0, ""), &plain.token))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied);
    let got = client
        .list_user_memories(Request::new(req(&some_user, "", 0, "")))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated);
    let pg = env.db.pool.get().await.unwrap();
    let key = format!("keel_{}", "B".repeat(43));
    pg.execute(
        "INSERT INTO api_keys (id, user_id, name, prefix, key_hash) VALUES ($1, $2, 'k', 'keel_BBBBBBBB', $3)",
        &[
            &Uuid::now_v7(),
            &admin_id,
            &keel_shared::identity::api_key_digest(&key).as_slice(),
        ],
    )
    .await
    .unwrap();
    let got = client
        .list_user_memories(authed(req(&some_user, "", 0, ""), &key))
        .await
        .unwrap_err();
    assert_eq!(
        got.code(),
        Code::PermissionDenied,
        "an admin's API key is no admin credential"
    );
    let count: i64 = pg
        .query_one("SELECT count(*) FROM admin_audit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "refused calls record nothing");
}
