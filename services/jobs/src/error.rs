//! The jobs service's errors, converted into the shared `ApiError` mapping.

use keel_shared::ApiError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JobsError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Absent or another user's: never says which.
    #[error("job not found")]
    NotFound,
    /// The job is not in a state that allows this call.
    #[error("{0}")]
    WrongState(String),
    /// Flow control held the start back (the message names the limit and
    /// a retry delay: see `crate::flow::Held`).
    #[error("{0}")]
    Held(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl JobsError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<keel_shared::batch::Stopped> for JobsError {
    fn from(_: keel_shared::batch::Stopped) -> Self {
        Self::Api(ApiError::Unavailable("the jobs service is stopping".into()))
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        match e {
            JobsError::Invalid { field, reason } => ApiError::invalid(field, reason),
            JobsError::NotFound => ApiError::NotFound("job".into()),
            JobsError::WrongState(m) => ApiError::FailedPrecondition(m),
            JobsError::Held(m) => ApiError::ResourceExhausted(m),
            JobsError::Api(a) => a,
        }
    }
}

keel_shared::service_error_conversions!(JobsError);
