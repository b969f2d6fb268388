//! Conversions between chrono times and `google.protobuf.Timestamp`, and a
//! deadline that may be absent.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(to_timestamp)
}

/// `google.protobuf.Timestamp` is defined for 0001-01-01 through 9999-12-31
/// (which Postgres can also store).
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

/// None when the timestamp is outside protobuf's defined range or has invalid nanos.
pub fn from_timestamp(ts: &Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) || !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds)
    {
        return None;
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
}

/// Sleeps until `at`; forever when there is no `at` (a `select!` branch for
/// a deadline that may not be set).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_protobufs_range_converts() {
        let at = |seconds, nanos| from_timestamp(&Timestamp { seconds, nanos });
        assert!(at(MIN_SECONDS, 0).is_some());
        assert!(at(MAX_SECONDS, 999_999_999).is_some());
        assert!(at(MIN_SECONDS - 1, 0).is_none());
        assert!(at(MAX_SECONDS + 1, 0).is_none());
        assert!(at(0, -1).is_none());
    }
}
