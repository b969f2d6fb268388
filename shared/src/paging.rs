//! List pagination: page sizes (default 50, max 1000, larger clamped) and opaque
//! page tokens bound to the filter they were issued for.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ApiError;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// 0 means the default; above the maximum is clamped; negative is invalid.
pub fn page_size(requested: i32) -> Result<i64, ApiError> {
    match requested {
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<C> {
    /// Fingerprint of the filter (and caller) the token belongs to.
    f: String,
    /// Where the next page starts.
    c: C,
}

fn fingerprint(filter: &str) -> String {
    hex::encode(&Sha256::digest(filter.as_bytes())[..8])
}

/// A token for the page after `cursor`, valid only with the same `filter`
/// (a string naming the caller and every filter field).
pub fn encode_token<C: Serialize>(filter: &str, cursor: &C) -> String {
    let envelope = Envelope {
        f: fingerprint(filter),
        c: cursor,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&envelope).expect("cursor serializes"))
}

/// The cursor in `token` (None for an empty token, the first page). A token
/// that does not decode, or was issued for another filter, is INVALID_ARGUMENT.
pub fn decode_token<C: DeserializeOwned>(token: &str, filter: &str) -> Result<Option<C>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = |reason: &str| ApiError::invalid("page_token", reason);
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid("malformed page token"))?;
    let envelope: Envelope<C> =
        serde_json::from_slice(&bytes).map_err(|_| invalid("malformed page token"))?;
    if envelope.f != fingerprint(filter) {
        return Err(invalid("page token was issued for a different filter"));
    }
    Ok(Some(envelope.c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_are_bound_to_their_filter() {
        let token = encode_token("user-1|kind=echo", &("k", 3));
        let back: Option<(String, i32)> = decode_token(&token, "user-1|kind=echo").unwrap();
        assert_eq!(back, Some(("k".to_string(), 3)));
        assert!(decode_token::<(String, i32)>(&token, "user-1|kind=sleep").is_err());
        assert!(decode_token::<(String, i32)>("not a token!", "x").is_err());
        assert_eq!(decode_token::<(String, i32)>("", "x").unwrap(), None);
    }
}
