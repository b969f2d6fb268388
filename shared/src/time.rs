//! Conversions between chrono times and `google.protobuf.Timestamp`.

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

/// None when the timestamp is out of chrono's range or has invalid nanos.
pub fn from_timestamp(ts: &Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
}
