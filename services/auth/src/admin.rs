//! `keel.admin.v1.UserAdminService`: accounts and who administers Keel.
//! Behind the admin gate (`Authenticator::admins_only`): every handler runs
//! for a signed-in admin only. Also the KEEL_ADMIN_EMAILS bootstrap.

use std::collections::HashSet;
use std::sync::Arc;

use keel_proto::admin::v1::user_admin_service_server::UserAdminService;
use keel_proto::admin::v1::*;
use keel_shared::auth::Admin;
use keel_shared::identity::Identity;
use keel_shared::time::to_timestamp;
use keel_shared::{ApiError, paging};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain;
use crate::error::AuthError;
use crate::store::{RevokeOutcome, Store, UserRow};

/// The accounts KEEL_ADMIN_EMAILS names (normalised emails): they hold the
/// admin role from start-up, and from their registration or next login.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    emails: HashSet<String>,
}

impl Bootstrap {
    /// Normalises each email (as Register does); an invalid one is refused.
    pub fn new(raw: &[String]) -> Result<Self, String> {
        let mut emails = HashSet::new();
        for email in raw.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let normalised =
                domain::normalize_email(email).map_err(|e| format!("{email:?}: {e}"))?;
            emails.insert(normalised);
        }
        Ok(Self { emails })
    }

    pub fn is_empty(&self) -> bool {
        self.emails.is_empty()
    }

    /// Grants the role to every existing account of the list.
    pub async fn grant_existing(&self, store: &Store) -> Result<(), AuthError> {
        let emails: Vec<String> = self.emails.iter().cloned().collect();
        for user_id in store.grant_admin_by_email(&emails).await? {
            tracing::info!(target: "audit", event = "admin_bootstrapped", user_id = %user_id);
        }
        Ok(())
    }

    /// Grants the role to this account if the list names it (Register and
    /// Login call it with the normalised email). A failure is logged, not
    /// returned: the sign-in itself succeeded, and the next one grants it.
    pub async fn grant_if_listed(&self, store: &Store, identity: &Identity, email: &str) {
        if !self.emails.contains(email) {
            return;
        }
        match store.grant_admin_by_email(&[email.to_string()]).await {
            Ok(granted) => {
                for user_id in granted {
                    identity.forget_admin(user_id);
                    tracing::info!(target: "audit", event = "admin_bootstrapped", user_id = %user_id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not grant a KEEL_ADMIN_EMAILS account the admin role")
            }
        }
    }
}

/// The UserAdminService handlers.
pub struct UserAdminApi {
    store: Store,
    identity: Arc<Identity>,
}

impl UserAdminApi {
    pub fn new(store: Store, identity: Arc<Identity>) -> Self {
        Self { store, identity }
    }
}

fn admin<T>(req: &Request<T>) -> Result<Admin, Status> {
    Ok(Admin::of(req)?.clone())
}

fn summary(user: &UserRow, admin: bool) -> UserSummary {
    UserSummary {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        created_at: Some(to_timestamp(user.created_at)),
        admin,
    }
}

/// Longest `email_contains` accepted (an email's longest).
const MAX_EMAIL_FILTER_BYTES: usize = 254;

#[tonic::async_trait]
impl UserAdminService for UserAdminApi {
    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let contains = r.email_contains.trim();
        if contains.len() > MAX_EMAIL_FILTER_BYTES {
            return Err(AuthError::invalid("email_contains", "is longer than 254 bytes").into());
        }
        if contains.chars().any(char::is_control) {
            return Err(AuthError::invalid(
                "email_contains",
                "must not contain control characters",
            )
            .into());
        }
        let filter = format!("users|{contains}");
        let before = paging::decode_token::<String>(&r.page_token, &filter)?
            .map(|c| Uuid::parse_str(&c))
            .transpose()
            .map_err(|_| AuthError::invalid("page_token", "malformed page token"))?;
        let mut rows = self.store.list_users(contains, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|(u, _)| u.id)
        } else {
            None
        };
        Ok(Response::new(ListUsersResponse {
            users: rows.iter().map(|(u, a)| summary(u, *a)).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(&filter, &id.to_string()))
                .unwrap_or_default(),
        }))
    }

    async fn grant_admin(
        &self,
        req: Request<GrantAdminRequest>,
    ) -> Result<Response<GrantAdminResponse>, Status> {
        let admin = admin(&req)?;
        let user_id = domain::parse_id("user_id", &req.get_ref().user_id)?;
        let user = self
            .store
            .grant_admin(&admin, user_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("user".into()))?;
        self.identity.forget_admin(user_id);
        Ok(Response::new(GrantAdminResponse {
            user: Some(summary(&user, true)),
        }))
    }

    async fn revoke_admin(
        &self,
        req: Request<RevokeAdminRequest>,
    ) -> Result<Response<RevokeAdminResponse>, Status> {
        let admin = admin(&req)?;
        let user_id = domain::parse_id("user_id", &req.get_ref().user_id)?;
        match self.store.revoke_admin(&admin, user_id).await? {
            RevokeOutcome::Revoked(user) => {
                self.identity.forget_admin(user_id);
                Ok(Response::new(RevokeAdminResponse {
                    user: Some(summary(&user, false)),
                }))
            }
            RevokeOutcome::LastAdmin => Err(ApiError::FailedPrecondition(
                "user_id: this user is the last admin; grant the role to another user first".into(),
            )
            .into()),
            RevokeOutcome::UnknownUser => Err(ApiError::NotFound("user".into()).into()),
        }
    }
}
