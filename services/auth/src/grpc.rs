//! gRPC handlers for `keel.auth.v1.AuthService`.

use deadpool_postgres::Pool;
use keel_proto::auth::v1::auth_service_server::AuthService;
use keel_proto::auth::v1::*;
use tonic::{Request, Response, Status};

pub struct AuthApi {
    #[allow(dead_code)]
    pool: Pool,
}

impl AuthApi {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("Register is not implemented yet"))
    }
    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        Err(Status::unimplemented("Login is not implemented yet"))
    }
    async fn refresh(
        &self,
        _: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Err(Status::unimplemented("Refresh is not implemented yet"))
    }
    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        Err(Status::unimplemented("Logout is not implemented yet"))
    }
    async fn get_current_user(
        &self,
        _: Request<GetCurrentUserRequest>,
    ) -> Result<Response<GetCurrentUserResponse>, Status> {
        Err(Status::unimplemented(
            "GetCurrentUser is not implemented yet",
        ))
    }
    async fn verify_token(
        &self,
        _: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        Err(Status::unimplemented("VerifyToken is not implemented yet"))
    }
}
