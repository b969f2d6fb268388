//! The memory service's errors, converted into the shared `ApiError` mapping.

use keel_shared::ApiError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MemoryError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Absent or another user's: never says which.
    #[error("memory not found")]
    NotFound,
    /// A conditional write whose `expected_version` is not the stored one
    /// (`current` is None when the memory does not exist).
    #[error("{}", version_mismatch(*expected, *current))]
    VersionMismatch { expected: i64, current: Option<i64> },
    #[error(transparent)]
    Api(#[from] ApiError),
}

fn version_mismatch(expected: i64, current: Option<i64>) -> String {
    match current {
        Some(v) => format!("memory is at version {v}, not the expected version {expected}"),
        None => format!("memory does not exist (expected version {expected})"),
    }
}

impl MemoryError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<keel_shared::batch::Stopped> for MemoryError {
    fn from(_: keel_shared::batch::Stopped) -> Self {
        Self::Api(ApiError::Unavailable(
            "the memory service is stopping".into(),
        ))
    }
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Invalid { field, reason } => ApiError::invalid(field, reason),
            MemoryError::NotFound => ApiError::NotFound("memory".into()),
            e @ MemoryError::VersionMismatch { .. } => ApiError::Aborted(e.to_string()),
            MemoryError::Api(a) => a,
        }
    }
}

keel_shared::service_error_conversions!(MemoryError);
