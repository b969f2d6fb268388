//! Errors: `ApiError` is what every service's own error converts into, and the
//! one place it becomes a `tonic::Status`; `StartupError` is what stops a binary.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The gRPC-facing error. Messages are for clients: never SQL, never secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed or out-of-range input; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Absent, or another user's: the message never says which.
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected backend error: logged in full, sent as "internal error".
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match &err {
            ApiError::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                err.to_string(),
                ErrorDetails::with_bad_request_violation(field.clone(), reason.clone()),
            ),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "backend unavailable");
                Status::unavailable(detail.clone())
            }
            _ => Status::new(err.code(), err.to_string()),
        }
    }
}

/// Postgres errors that no service-specific rule claimed: connection trouble
/// is UNAVAILABLE, serialization conflicts ABORTED, anything else INTERNAL.
#[cfg(feature = "server")]
impl From<tokio_postgres::Error> for ApiError {
    fn from(err: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let Some(db) = err.as_db_error() else {
            // No server error attached: a lost connection is UNAVAILABLE; a
            // client-side problem (a parameter that does not encode, a column
            // that does not decode) is a bug, not an outage.
            let io = std::error::Error::source(&err)
                .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
            if err.is_closed() || io {
                return Self::Unavailable("database unavailable".into());
            }
            return Self::Internal(format!("postgres: {}", source_chain(&err)));
        };
        let code = db.code();
        if code.code().starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            Self::Unavailable("database unavailable".into())
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            Self::Aborted("conflicting concurrent update, retry".into())
        } else {
            Self::Internal(format!("postgres: {}", source_chain(&err)))
        }
    }
}

#[cfg(feature = "server")]
impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Self::Unavailable(format!("database unavailable: {other}")),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
        {
            Self::Unavailable("redis unavailable".into())
        } else {
            Self::Internal(format!("redis: {err}"))
        }
    }
}

impl From<deadpool_redis::PoolError> for ApiError {
    fn from(err: deadpool_redis::PoolError) -> Self {
        match err {
            deadpool_redis::PoolError::Backend(e) => e.into(),
            _ => Self::Unavailable("redis unavailable".into()),
        }
    }
}

/// Why a binary could not start. Printed as one line, then exit non-zero.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0} is not set")]
    MissingVar(&'static str),
    #[error("{var} is invalid: {reason}")]
    InvalidVar { var: &'static str, reason: String },
    #[error("cannot reach Postgres at {target} (gave up after {waited:?}): {cause}")]
    PostgresUnreachable {
        target: String,
        waited: Duration,
        cause: String,
    },
    /// The server's certificate was refused (never retried).
    #[error("Postgres at {target}: {cause} with sslmode={sslmode}")]
    PostgresTls {
        target: String,
        cause: String,
        sslmode: &'static str,
    },
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: String, cause: String },
    #[error("{0}")]
    Other(String),
    /// Several problems found at once (each on its own, "; " between them).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<StartupError>),
}

impl StartupError {
    /// Ok when `problems` is empty; the one problem, or all of them.
    pub fn check_all(mut problems: Vec<StartupError>) -> Result<(), StartupError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(StartupError::Several(problems)),
        }
    }
}

/// The conversions of a service's own error enum that has an
/// `Api(ApiError)` variant and a `From<Self> for ApiError` (its own codes):
/// Postgres and pool errors in, through the shared classification above,
/// and a gRPC status out. The crate using it depends on tokio-postgres,
/// deadpool-postgres and tonic.
#[cfg(feature = "server")]
#[macro_export]
macro_rules! service_error_conversions {
    ($error:ty) => {
        impl From<::tokio_postgres::Error> for $error {
            fn from(e: ::tokio_postgres::Error) -> Self {
                Self::Api(e.into())
            }
        }

        impl From<::deadpool_postgres::PoolError> for $error {
            fn from(e: ::deadpool_postgres::PoolError) -> Self {
                Self::Api(e.into())
            }
        }

        impl From<$error> for ::tonic::Status {
            fn from(e: $error) -> Self {
                $crate::ApiError::from(e).into()
            }
        }
    };
}

/// An error and its causes on one line: "a: b: c".
pub fn source_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Ends a binary's `main`: on error, one line on stderr and exit code 1.
pub fn exit_on_error<E: std::fmt::Display>(binary: &str, result: Result<(), E>) {
    if let Err(e) = result {
        eprintln!("{binary}: {e}");
        std::process::exit(1);
    }
}
