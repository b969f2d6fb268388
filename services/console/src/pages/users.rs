//! Accounts and the admin role; a user's memories, read-only (the memory
//! service records each read in the audit log).

use askama::Template;
use axum::extract::{Path, Query, State};
use keel_proto::admin::v1::{
    GrantAdminRequest, ListUserMemoriesRequest, ListUsersRequest, RevokeAdminRequest,
};
use serde::{Deserialize, Serialize};

use super::{done, query_string, refused, render};
use crate::App;
use crate::backend::authed;
use crate::error::{PageError, PageResult};
use crate::session::Session;
use crate::view::{self, Nav};

struct UserRow {
    id: String,
    email: String,
    display_name: String,
    created_at: String,
    admin: bool,
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    nav: Nav,
    email: String,
    users: Vec<UserRow>,
    next: Option<String>,
}

#[derive(Default, Clone, Deserialize, Serialize)]
pub(crate) struct UserQuery {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    email: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    page: String,
}

pub(crate) async fn list(
    State(app): State<App>,
    session: Session,
    Query(query): Query<UserQuery>,
) -> PageResult {
    let answer = app
        .backends
        .users()
        .list_users(authed(
            ListUsersRequest {
                page_size: 50,
                page_token: query.page.clone(),
                email_contains: query.email.trim().to_string(),
            },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    let next = (!answer.next_page_token.is_empty()).then(|| {
        let q = query_string(&UserQuery {
            page: answer.next_page_token.clone(),
            ..query.clone()
        });
        format!("/users{q}")
    });
    render(&UsersPage {
        nav: Nav::new(&app, &session, "users"),
        email: query.email,
        users: answer
            .users
            .iter()
            .map(|u| UserRow {
                id: u.id.clone(),
                email: u.email.clone(),
                display_name: u.display_name.clone(),
                created_at: view::time(u.created_at.as_ref()),
                admin: u.admin,
            })
            .collect(),
        next,
    })
}

pub(crate) async fn act(
    State(app): State<App>,
    session: Session,
    Path((id, action)): Path<(String, String)>,
) -> PageResult {
    let token = &session.tokens.access_token;
    let users = || app.backends.users();
    let answer = match action.as_str() {
        "grant" => users()
            .grant_admin(authed(
                GrantAdminRequest {
                    user_id: id.clone(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().user),
        "revoke" => users()
            .revoke_admin(authed(
                RevokeAdminRequest {
                    user_id: id.clone(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().user),
        _ => return Err(PageError::NotFound("No such page.".into())),
    };
    let message = match answer {
        Ok(user) => {
            let who = user.map(|u| u.email).unwrap_or(id);
            if action == "grant" {
                format!("{who} is now an operator.")
            } else {
                format!("{who} is no longer an operator.")
            }
        }
        Err(status) => refused(status)?,
    };
    done(&app, &session, "/users", message)
}

struct MemoryRow {
    key: String,
    content: String,
    tags: String,
    metadata: String,
    version: i64,
    updated_at: String,
    expires_at: String,
}

#[derive(Template)]
#[template(path = "memories.html")]
struct MemoriesPage {
    nav: Nav,
    user_id: String,
    namespace: String,
    memories: Vec<MemoryRow>,
    next: Option<String>,
}

#[derive(Default, Clone, Deserialize, Serialize)]
pub(crate) struct MemoryQuery {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    page: String,
}

pub(crate) async fn memories(
    State(app): State<App>,
    session: Session,
    Path(user_id): Path<String>,
    Query(query): Query<MemoryQuery>,
) -> PageResult {
    let answer = app
        .backends
        .memory()
        .list_user_memories(authed(
            ListUserMemoriesRequest {
                user_id: user_id.clone(),
                namespace: query.namespace.trim().to_string(),
                page_size: 50,
                page_token: query.page.clone(),
            },
            &session.tokens.access_token,
        ))
        .await?
        .into_inner();
    let next = (!answer.next_page_token.is_empty()).then(|| {
        let q = query_string(&MemoryQuery {
            page: answer.next_page_token.clone(),
            ..query.clone()
        });
        format!("/users/{}/memories{q}", super::jobs::percent_path(&user_id))
    });
    render(&MemoriesPage {
        nav: Nav::new(&app, &session, "users"),
        user_id,
        namespace: query.namespace,
        memories: answer
            .memories
            .iter()
            .map(|m| MemoryRow {
                key: m.key.clone(),
                content: m.content.clone(),
                tags: m.tags.join(", "),
                metadata: view::json_compact(m.metadata.as_ref()),
                version: m.version,
                updated_at: view::time(m.updated_at.as_ref()),
                expires_at: view::time(m.expires_at.as_ref()),
            })
            .collect(),
        next,
    })
}
