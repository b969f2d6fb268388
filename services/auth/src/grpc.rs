//! gRPC handlers for `keel.auth.v1.AuthService`: decode, validate, call the
//! service, encode. Register, Login, Refresh, Logout and VerifyToken need no
//! bearer token; GetCurrentUser authenticates inside its handler.

use std::sync::Arc;

use keel_proto::auth::v1::auth_service_server::AuthService;
use keel_proto::auth::v1::*;
use keel_shared::auth::{Authenticator, TokenVerifier};
use keel_shared::time::to_timestamp;
use tonic::{Request, Response, Status};

use crate::convert::{tokens_proto, user_proto};
use crate::domain;
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
        let caller = self.authenticator.authenticate(request.metadata())?;
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
}
