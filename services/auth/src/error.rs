//! The auth service's errors and their mapping onto `ApiError`.

use keel_shared::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("a user with this email already exists")]
    EmailTaken,
    /// Unknown email and wrong password alike: one message for both.
    #[error("invalid email or password")]
    InvalidCredentials,
    /// Attempts are counted before the password is checked, so this also
    /// answers more than the limit of simultaneous (even correct) logins.
    #[error("too many login attempts for this email, try again later")]
    RateLimited,
    /// Unknown, expired, used or revoked: the client learns only that it is invalid.
    #[error("invalid or expired refresh token")]
    InvalidRefreshToken,
    #[error("the user of this token no longer exists")]
    UserGone,
    #[error("no such API key")]
    ApiKeyNotFound,
    #[error("current_password: is not the user's password")]
    WrongPassword,
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Internal(String),
}

impl AuthError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidArgument { field, reason } => ApiError::invalid(field, reason),
            AuthError::EmailTaken => ApiError::AlreadyExists(err.to_string()),
            AuthError::InvalidCredentials
            | AuthError::InvalidRefreshToken
            | AuthError::UserGone
            | AuthError::WrongPassword => ApiError::Unauthenticated(err.to_string()),
            AuthError::RateLimited => ApiError::ResourceExhausted(err.to_string()),
            AuthError::ApiKeyNotFound => ApiError::NotFound(err.to_string()),
            AuthError::Api(e) => e,
            AuthError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

keel_shared::service_error_conversions!(AuthError);
