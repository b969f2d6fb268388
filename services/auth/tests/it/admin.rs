//! UserAdminService and the KEEL_ADMIN_EMAILS bootstrap: who may call it,
//! granting and revoking the role (audited), listing users.

use keel_proto::admin::v1::*;
use keel_proto::auth::v1::CreateApiKeyRequest;
use keel_shared::testing::{authed, eventually};
use tonic::Code;

use crate::support::{Env, Server, config};

const BOSS: &str = "boss@example.com";

/// An auth server whose KEEL_ADMIN_EMAILS names BOSS, and BOSS's access token.
async fn with_boss() -> (Env, String) {
    let env = Env::with(|c| c.admin_emails = vec![" Boss@Example.com ".into()]).await;
    let token = access(&env, BOSS).await;
    (env, token)
}

async fn access(env: &Env, email: &str) -> String {
    env.register(email).await.tokens.unwrap().access_token
}

async fn user_id(env: &Env, email: &str) -> String {
    env.register(email).await.user.unwrap().id
}

async fn list(
    env: &Env,
    token: &str,
    req: ListUsersRequest,
) -> Result<ListUsersResponse, tonic::Status> {
    env.admin()
        .list_users(authed(req, token))
        .await
        .map(|r| r.into_inner())
}

async fn audit_rows(env: &Env) -> Vec<(String, String, String, serde_json::Value)> {
    let client = env.db.pool.get().await.unwrap();
    client
        .query(
            "SELECT admin_email, action, target, detail FROM admin_audit ORDER BY at, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn a_listed_email_is_admin_on_registration_and_others_are_refused() {
    let (env, boss) = with_boss().await;
    let users = list(&env, &boss, ListUsersRequest::default())
        .await
        .unwrap();
    assert_eq!(users.users.len(), 1);
    assert_eq!(users.users[0].email, BOSS);
    assert!(users.users[0].admin);

    let plain = access(&env, "plain@example.com").await;
    let got = list(&env, &plain, ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "{got:?}");

    let got = env
        .admin()
        .list_users(ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated, "{got:?}");
    let got = list(&env, "not-a-token", ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated, "{got:?}");

    // An admin's API key acts for the admin but is no admin credential.
    let key = env
        .client()
        .create_api_key(authed(
            CreateApiKeyRequest {
                name: "ci".into(),
                expires_at: None,
            },
            &boss,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let got = list(&env, &key, ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "{got:?}");
    let target = user_id(&env, "target@example.com").await;
    let got = env
        .admin()
        .grant_admin(authed(GrantAdminRequest { user_id: target }, &key))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "{got:?}");
    assert!(
        audit_rows(&env).await.is_empty(),
        "a refused call records nothing"
    );
}

#[tokio::test]
async fn existing_accounts_are_bootstrapped_at_start_up_and_on_login() {
    let env = Env::new().await;
    let early = access(&env, "early@example.com").await;
    let got = list(&env, &early, ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied);

    // A second server on the same database, listing both accounts.
    let mut cfg = config(&env.db, &env.key_file);
    cfg.admin_emails = vec!["early@example.com".into(), "late@example.com".into()];
    let second = Server::start(cfg).await;
    let users = second
        .admin
        .clone()
        .list_users(authed(ListUsersRequest::default(), &early))
        .await
        .expect("granted at start-up")
        .into_inner();
    assert!(users.users.iter().all(|u| u.admin));

    // Registered at the first server (which does not list it): not an admin
    // until it signs in at the second.
    let late = access(&env, "late@example.com").await;
    let got = second
        .admin
        .clone()
        .list_users(authed(ListUsersRequest::default(), &late))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied);
    let tokens = second
        .client
        .clone()
        .login(crate::support::login_req(
            "late@example.com",
            crate::support::PASSWORD,
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    second
        .admin
        .clone()
        .list_users(authed(ListUsersRequest::default(), &tokens.access_token))
        .await
        .expect("granted on login");
    second.stop().await;
}

#[tokio::test]
async fn an_invalid_admin_email_stops_start_up() {
    let env = Env::new().await;
    let mut cfg = config(&env.db, &env.key_file);
    cfg.admin_emails = vec!["ok@example.com".into(), "two words@example.com".into()];
    let (listener, _) = keel_shared::testing::listener().await;
    let got = keel_auth::run(cfg, listener, Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(got.contains("KEEL_ADMIN_EMAILS"), "{got}");
}

#[tokio::test]
async fn grant_and_revoke_are_idempotent_audited_and_take_effect() {
    let (env, boss) = with_boss().await;
    let helper_id = user_id(&env, "helper@example.com").await;
    let helper = env.login("helper@example.com").await.access_token;
    assert_eq!(
        list(&env, &helper, ListUsersRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    for _ in 0..2 {
        let granted = env
            .admin()
            .grant_admin(authed(
                GrantAdminRequest {
                    user_id: helper_id.clone(),
                },
                &boss,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert!(granted.admin);
        assert_eq!(granted.email, "helper@example.com");
    }
    list(&env, &helper, ListUsersRequest::default())
        .await
        .expect("the new admin gets in");

    // The new admin revokes the bootstrap admin; then the bootstrap admin is out.
    let boss_id = list(
        &env,
        &helper,
        ListUsersRequest {
            email_contains: "BOSS".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .users[0]
        .id
        .clone();
    for _ in 0..2 {
        let revoked = env
            .admin()
            .revoke_admin(authed(
                RevokeAdminRequest {
                    user_id: boss_id.clone(),
                },
                &helper,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert!(!revoked.admin);
    }
    let got = list(&env, &boss, ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "revoked at once here");

    // The helper is now the only admin and cannot leave Keel without one.
    let got = env
        .admin()
        .revoke_admin(authed(
            RevokeAdminRequest {
                user_id: helper_id.clone(),
            },
            &helper,
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition, "{got:?}");
    assert!(got.message().contains("last admin"), "{got:?}");

    let rows = audit_rows(&env).await;
    let summary: Vec<(&str, &str, bool)> = rows
        .iter()
        .map(|(email, action, _, detail)| {
            (
                email.as_str(),
                action.as_str(),
                detail["changed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (BOSS, "admin.grant", true),
            (BOSS, "admin.grant", false),
            ("helper@example.com", "admin.revoke", true),
            ("helper@example.com", "admin.revoke", false),
        ]
    );
    assert_eq!(rows[0].2, format!("user:{helper_id}"));
    assert_eq!(rows[2].2, format!("user:{boss_id}"));
}

#[tokio::test]
async fn a_revoked_role_stops_working_at_another_replica_within_the_cache_period() {
    let (env, boss) = with_boss().await;
    let helper_id = user_id(&env, "helper@example.com").await;
    let helper = env.login("helper@example.com").await.access_token;
    env.admin()
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: helper_id.clone(),
            },
            &boss,
        ))
        .await
        .unwrap();
    let mut cfg = config(&env.db, &env.key_file);
    cfg.tokens.credential_cache_secs = 1;
    let other = Server::start(cfg).await;
    other
        .admin
        .clone()
        .list_users(authed(ListUsersRequest::default(), &helper))
        .await
        .expect("an admin at the other replica");
    env.admin()
        .revoke_admin(authed(RevokeAdminRequest { user_id: helper_id }, &boss))
        .await
        .unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the role is revoked there too",
        || {
            let mut admin = other.admin.clone();
            let helper = helper.clone();
            async move {
                admin
                    .list_users(authed(ListUsersRequest::default(), &helper))
                    .await
                    .is_err_and(|e| e.code() == Code::PermissionDenied)
            }
        },
    )
    .await;
    other.stop().await;
}

#[tokio::test]
async fn bad_input_names_the_field_and_changes_nothing() {
    let (env, boss) = with_boss().await;
    for id in ["", "nope", "0193-not-a-uuid"] {
        let got = env
            .admin()
            .grant_admin(authed(GrantAdminRequest { user_id: id.into() }, &boss))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{id:?}");
        assert!(got.message().starts_with("user_id"), "{got:?}");
        let got = env
            .admin()
            .revoke_admin(authed(RevokeAdminRequest { user_id: id.into() }, &boss))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{id:?}");
        assert!(got.message().starts_with("user_id"), "{got:?}");
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let got = env
        .admin()
        .grant_admin(authed(
            GrantAdminRequest {
                user_id: unknown.clone(),
            },
            &boss,
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound);
    let got = env
        .admin()
        .revoke_admin(authed(RevokeAdminRequest { user_id: unknown }, &boss))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound);

    for (req, field) in [
        (
            ListUsersRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListUsersRequest {
                page_token: "garbage!".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListUsersRequest {
                email_contains: "x".repeat(300),
                ..Default::default()
            },
            "email_contains",
        ),
    ] {
        let got = list(&env, &boss, req).await.unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument);
        assert!(got.message().starts_with(field), "{got:?}");
    }
    assert!(audit_rows(&env).await.is_empty());
    assert_eq!(env.column::<i64>("SELECT count(*) FROM admins").await, [1]);
}

#[tokio::test]
async fn users_are_listed_newest_first_in_pages_and_filtered_by_email() {
    let (env, boss) = with_boss().await;
    for i in 0..5 {
        env.register(&format!("user{i}@corp.example")).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            &env,
            &boss,
            ListUsersRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.email));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        [
            "user4@corp.example",
            "user3@corp.example",
            "user2@corp.example",
            "user1@corp.example",
            "user0@corp.example",
            BOSS
        ]
    );
    let corp = list(
        &env,
        &boss,
        ListUsersRequest {
            email_contains: "CORP".into(),
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(corp.users.len(), 2);
    // A token of one filter is refused with another.
    let got = list(
        &env,
        &boss,
        ListUsersRequest {
            email_contains: "boss".into(),
            page_token: corp.next_page_token,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(got.code(), Code::InvalidArgument);
    let none = list(
        &env,
        &boss,
        ListUsersRequest {
            email_contains: "%".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(none.users.is_empty(), "no wildcard: % is a character");
}
