//! gRPC handlers for `keel.auth.v1.AuthService`: decode, validate, call the
//! service, encode. Register, Login, Refresh, Logout and VerifyToken need no
//! bearer token; the others authenticate inside their handler (GetCurrentUser
//! takes an access token or an API key, the rest an access token only).

use std::sync::Arc;

use keel_proto::auth::v1::auth_service_server::AuthService;
use keel_proto::auth::v1::*;
use keel_shared::auth::{Authenticator, Caller, TokenVerifier};
use keel_shared::time::{from_timestamp, to_timestamp};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::convert::{api_key_proto, tokens_proto, user_proto};
use crate::domain;
use crate::error::AuthError;
use crate::service::Auth;

/// The handlers' view of the service, built once by `run`.
pub struct AuthApi {
    auth: Auth,
    verifier: Arc<TokenVerifier>,
    authenticator: Authenticator,
}

impl AuthApi {
    pub fn new(auth: Auth, verifier: Arc<TokenVerifier>, authenticator: Authenticator) -> Self {
        Self {
            auth,
            verifier,
            authenticator,
        }
    }
}

impl AuthApi {
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        Ok(self.authenticator.authenticate(metadata).await?)
    }

    /// The user of an access token whose session is live; an API key is
    /// PERMISSION_DENIED.
    async fn signed_in_user(&self, metadata: &MetadataMap) -> Result<Uuid, Status> {
        Ok(self.caller(metadata).await?.signed_in_user()?.user_id)
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let email = domain::normalize_email(&req.email)?;
        domain::validate_new_password(&req.password)?;
        let display_name = domain::normalize_display_name(&req.display_name)?;
        let (user, tokens) = self
            .auth
            .register(&email, req.password, &display_name)
            .await?;
        Ok(Response::new(RegisterResponse {
            user: Some(user_proto(&user)),
            tokens: Some(tokens_proto(tokens)),
        }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let req = request.into_inner();
        let email = domain::normalize_email(&req.email)?;
        domain::validate_login_password(&req.password)?;
        let (user, tokens) = self.auth.login(&email, req.password).await?;
        Ok(Response::new(LoginResponse {
            user: Some(user_proto(&user)),
            tokens: Some(tokens_proto(tokens)),
        }))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let req = request.into_inner();
        domain::validate_refresh_token(&req.refresh_token)?;
        let tokens = self.auth.refresh(&req.refresh_token).await?;
        Ok(Response::new(RefreshResponse {
            tokens: Some(tokens_proto(tokens)),
        }))
    }

    /// Revokes the token's session. Idempotent for a token of an already
    /// revoked session (OK again); an unknown token is UNAUTHENTICATED.
    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let req = request.into_inner();
        domain::validate_refresh_token(&req.refresh_token)?;
        self.auth.logout(&req.refresh_token).await?;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn get_current_user(
        &self,
        request: Request<GetCurrentUserRequest>,
    ) -> Result<Response<GetCurrentUserResponse>, Status> {
        let caller = self.caller(request.metadata()).await?;
        let user = self.auth.current_user(caller.user_id()?).await?;
        Ok(Response::new(GetCurrentUserResponse {
            user: Some(user_proto(&user)),
        }))
    }

    /// The same checks the other services make locally (signature, `exp`,
    /// `iss`, `aud`, EdDSA only); it does not consult sessions.
    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let req = request.into_inner();
        domain::validate_access_token(&req.access_token)?;
        let token = self.verifier.verify(&req.access_token)?;
        Ok(Response::new(VerifyTokenResponse {
            user_id: token.user_id.to_string(),
            email: token.email,
            expires_at: Some(to_timestamp(token.expires_at)),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let user_id = self.signed_in_user(request.metadata()).await?;
        let req = request.into_inner();
        let name = domain::normalize_api_key_name(&req.name)?;
        let expires_at = req
            .expires_at
            .as_ref()
            .map(|ts| {
                from_timestamp(ts)
                    .ok_or_else(|| AuthError::invalid("expires_at", "is not a valid timestamp"))
            })
            .transpose()?;
        domain::validate_api_key_expiry(expires_at, chrono::Utc::now())?;
        let (api_key, key) = self.auth.create_api_key(user_id, &name, expires_at).await?;
        Ok(Response::new(CreateApiKeyResponse {
            api_key,
            key: Some(api_key_proto(&key)),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let user_id = self.signed_in_user(request.metadata()).await?;
        let keys = self.auth.list_api_keys(user_id).await?;
        Ok(Response::new(ListApiKeysResponse {
            keys: keys.iter().map(api_key_proto).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let user_id = self.signed_in_user(request.metadata()).await?;
        let key_id = domain::parse_id("id", &request.get_ref().id)?;
        self.auth.revoke_api_key(user_id, key_id).await?;
        Ok(Response::new(RevokeApiKeyResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let user_id = self.signed_in_user(request.metadata()).await?;
        let req = request.into_inner();
        domain::validate_presented_password("current_password", &req.current_password)?;
        domain::validate_new_password_field("new_password", &req.new_password)?;
        let tokens = self
            .auth
            .change_password(user_id, req.current_password, req.new_password)
            .await?;
        Ok(Response::new(ChangePasswordResponse {
            tokens: Some(tokens_proto(tokens)),
        }))
    }

    async fn logout_all(
        &self,
        request: Request<LogoutAllRequest>,
    ) -> Result<Response<LogoutAllResponse>, Status> {
        let user_id = self.signed_in_user(request.metadata()).await?;
        self.auth.logout_all(user_id).await?;
        Ok(Response::new(LogoutAllResponse {}))
    }
}
