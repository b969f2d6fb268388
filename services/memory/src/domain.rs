//! Validation of memory requests against the configured limits, and the pure
//! helpers (prefix ranges, page filters, search limits) that the handlers use.

use chrono::{DateTime, Utc};
use keel_shared::json::struct_to_json;
use prost_types::{Struct, Timestamp};

use crate::config::Limits;
use crate::error::MemoryError;

/// How many memories the workspace lists as recent.
pub const RECENT_MEMORIES: i64 = 5;
pub const DEFAULT_SEARCH_LIMIT: i64 = 10;
pub const MAX_SEARCH_LIMIT: i64 = 100;

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// Greater than every valid key: the byte after the highest allowed character.
const KEY_UPPER_BOUND: &str = "\u{7f}";

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
}

/// A key: 1..=max bytes of `[A-Za-z0-9._:/-]`.
pub fn validate_key(field: &str, key: &str, limits: &Limits) -> Result<(), MemoryError> {
    if key.is_empty() {
        return Err(MemoryError::invalid(field, "must not be empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(MemoryError::invalid(
            field,
            format!("must be at most {} bytes", limits.max_key_bytes),
        ));
    }
    if !key.chars().all(is_key_char) {
        return Err(MemoryError::invalid(
            field,
            "may only contain A-Z a-z 0-9 . _ : / -",
        ));
    }
    Ok(())
}

/// A namespace: "" (the default one) or 1..=64 bytes of `[A-Za-z0-9._:/-]`.
pub fn validate_namespace(namespace: &str) -> Result<(), MemoryError> {
    if namespace.len() > MAX_NAMESPACE_BYTES {
        return Err(MemoryError::invalid(
            "namespace",
            format!("must be at most {MAX_NAMESPACE_BYTES} bytes"),
        ));
    }
    if !namespace.chars().all(is_key_char) {
        return Err(MemoryError::invalid(
            "namespace",
            "may only contain A-Z a-z 0-9 . _ : / -",
        ));
    }
    Ok(())
}

/// An expiry: absent (never) or a valid instant after `now`.
pub fn validate_expires_at(
    expires_at: Option<&Timestamp>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, MemoryError> {
    let Some(ts) = expires_at else {
        return Ok(None);
    };
    let at = u32::try_from(ts.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| MemoryError::invalid("expires_at", "is not a valid timestamp"))?;
    if at <= now {
        return Err(MemoryError::invalid("expires_at", "must be in the future"));
    }
    Ok(Some(at))
}

/// GetMemory's version: 0 = current, else a version (>= 1).
pub fn validate_version(version: i64) -> Result<i64, MemoryError> {
    if version < 0 {
        return Err(MemoryError::invalid(
            "version",
            "must be 0 (the current version) or a version (>= 1)",
        ));
    }
    Ok(version)
}

/// A search's tag filter: each a valid tag, at most `max_search_tags`
/// distinct ones, returned sorted and deduplicated (so the page-token filter
/// does not depend on their order).
pub fn search_tags(tags: &[String], limits: &Limits) -> Result<Vec<String>, MemoryError> {
    for (i, tag) in tags.iter().enumerate() {
        validate_tag(&format!("tags[{i}]"), tag, limits)?;
    }
    let mut tags = tags.to_vec();
    tags.sort();
    tags.dedup();
    if tags.len() > limits.max_search_tags {
        return Err(MemoryError::invalid(
            "tags",
            format!("at most {} tags to filter on", limits.max_search_tags),
        ));
    }
    Ok(tags)
}

/// What a SearchMemories page token is bound to: caller, namespace, query
/// and tags. Namespaces cannot hold `|` and the query is length-prefixed, so
/// the string stays unambiguous.
pub fn search_filter(user_id: uuid::Uuid, namespace: &str, query: &str, tags: &[String]) -> String {
    format!(
        "search|{user_id}|{namespace}|{}:{query}|{}",
        query.len(),
        serde_json::to_string(tags).unwrap_or_default()
    )
}

/// A key prefix for listing: empty (all keys) or a valid key's beginning.
pub fn validate_key_prefix(prefix: &str, limits: &Limits) -> Result<(), MemoryError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key("key_prefix", prefix, limits)
}

/// The byte range `[lower, upper)` that holds exactly the keys starting with
/// `prefix` (a valid, possibly empty, key prefix). Keys sort in byte order and
/// only use ASCII below 0x7f, so bumping the last byte closes the range.
pub fn prefix_range(prefix: &str) -> (String, String) {
    let Some(last) = prefix.chars().last() else {
        return (String::new(), KEY_UPPER_BOUND.to_string());
    };
    let bumped = char::from_u32(last as u32 + 1).expect("ASCII key characters");
    let mut upper = prefix[..prefix.len() - last.len_utf8()].to_string();
    upper.push(bumped);
    (prefix.to_string(), upper)
}

/// A tag: 1..=max characters, no control characters.
pub fn validate_tag(field: &str, tag: &str, limits: &Limits) -> Result<(), MemoryError> {
    if tag.is_empty() {
        return Err(MemoryError::invalid(field, "must not be empty"));
    }
    if tag.chars().count() > limits.max_tag_chars {
        return Err(MemoryError::invalid(
            field,
            format!("must be at most {} characters", limits.max_tag_chars),
        ));
    }
    if tag.chars().any(char::is_control) {
        return Err(MemoryError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// The tags as stored: each valid, duplicates dropped (first occurrence
/// kept, order preserved), at most `max_tags` distinct ones.
pub fn normalize_tags(tags: &[String], limits: &Limits) -> Result<Vec<String>, MemoryError> {
    let mut distinct: Vec<String> = Vec::with_capacity(tags.len().min(limits.max_tags));
    for (i, tag) in tags.iter().enumerate() {
        validate_tag(&format!("tags[{i}]"), tag, limits)?;
        if !distinct.contains(tag) {
            distinct.push(tag.clone());
            if distinct.len() > limits.max_tags {
                return Err(MemoryError::invalid(
                    "tags",
                    format!("at most {} distinct tags", limits.max_tags),
                ));
            }
        }
    }
    Ok(distinct)
}

/// Content: at most `max_content_bytes` of UTF-8, no NUL (Postgres text cannot hold it).
pub fn validate_content(content: &str, limits: &Limits) -> Result<(), MemoryError> {
    if content.len() > limits.max_content_bytes {
        return Err(MemoryError::invalid(
            "content",
            format!("must be at most {} bytes", limits.max_content_bytes),
        ));
    }
    if content.contains('\0') {
        return Err(MemoryError::invalid(
            "content",
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// Metadata as JSON (an empty object when absent), depth- and size-bounded.
pub fn metadata_json(
    metadata: Option<&Struct>,
    limits: &Limits,
) -> Result<serde_json::Value, MemoryError> {
    let Some(metadata) = metadata else {
        return Ok(serde_json::Value::Object(Default::default()));
    };
    let json =
        struct_to_json(metadata).map_err(|e| MemoryError::invalid("metadata", e.to_string()))?;
    let encoded = serde_json::to_string(&json)
        .map_err(|e| MemoryError::invalid("metadata", e.to_string()))?;
    if encoded.len() > limits.max_metadata_bytes {
        return Err(MemoryError::invalid(
            "metadata",
            format!(
                "must be at most {} bytes as JSON",
                limits.max_metadata_bytes
            ),
        ));
    }
    Ok(json)
}

/// 0 = unconditional; a version is at least 1.
pub fn validate_expected_version(expected: i64) -> Result<i64, MemoryError> {
    if expected < 0 {
        return Err(MemoryError::invalid(
            "expected_version",
            "must be 0 (unconditional) or a version (>= 1)",
        ));
    }
    Ok(expected)
}

/// A validated PutMemory.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    pub namespace: String,
    pub key: String,
    pub content: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    /// 0 = unconditional.
    pub expected_version: i64,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewMemory {
    pub fn validate(
        req: keel_proto::memory::v1::PutMemoryRequest,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Self, MemoryError> {
        let keel_proto::memory::v1::PutMemoryRequest {
            key,
            content,
            tags,
            metadata,
            expected_version,
            namespace,
            expires_at,
        } = req;
        validate_namespace(&namespace)?;
        validate_key("key", &key, limits)?;
        let expires_at = validate_expires_at(expires_at.as_ref(), now)?;
        let tags = &tags;
        let metadata = metadata.as_ref();
        validate_content(&content, limits)?;
        let tags = normalize_tags(tags, limits)?;
        let metadata = metadata_json(metadata, limits)?;
        let expected_version = validate_expected_version(expected_version)?;
        Ok(Self {
            namespace,
            key,
            content,
            tags,
            metadata,
            expected_version,
            expires_at,
        })
    }
}

/// A search query: non-blank and at most `max_query_bytes`. NUL (which
/// Postgres text cannot hold) separates words like a space.
pub fn search_query(query: &str, limits: &Limits) -> Result<String, MemoryError> {
    if query.len() > limits.max_query_bytes {
        return Err(MemoryError::invalid(
            "query",
            format!("must be at most {} bytes", limits.max_query_bytes),
        ));
    }
    let query = query.replace('\0', " ");
    if query.trim().is_empty() {
        return Err(MemoryError::invalid("query", "must not be empty"));
    }
    Ok(query)
}

/// 0 means the default; the contract range is 1..=100, outside it is invalid.
pub fn search_limit(limit: i32) -> Result<i64, MemoryError> {
    match i64::from(limit) {
        0 => Ok(DEFAULT_SEARCH_LIMIT),
        n if (1..=MAX_SEARCH_LIMIT).contains(&n) => Ok(n),
        _ => Err(MemoryError::invalid(
            "limit",
            format!("must be between 1 and {MAX_SEARCH_LIMIT} (0 means {DEFAULT_SEARCH_LIMIT})"),
        )),
    }
}

/// A search page: `page_size` when set (1..=100), else the `limit` given.
pub fn search_page_size(page_size: i32, limit: i64) -> Result<i64, MemoryError> {
    match i64::from(page_size) {
        0 => Ok(limit),
        n if (1..=MAX_SEARCH_LIMIT).contains(&n) => Ok(n),
        _ => Err(MemoryError::invalid(
            "page_size",
            format!("must be between 1 and {MAX_SEARCH_LIMIT} (0 means limit)"),
        )),
    }
}

/// What a ListMemories page token is bound to. Keys and prefixes cannot hold
/// `|`, so the tag (which can) goes last and the string stays unambiguous.
pub fn list_filter(user_id: uuid::Uuid, namespace: &str, key_prefix: &str, tag: &str) -> String {
    if namespace.is_empty() {
        // Unchanged for the default namespace: tokens issued before namespaces stay valid.
        format!("memories|{user_id}|{key_prefix}|{tag}")
    } else {
        format!("memories|{user_id}|ns={namespace}|{key_prefix}|{tag}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn keys() {
        let l = limits();
        assert!(validate_key("key", "a", &l).is_ok());
        assert!(validate_key("key", "Notes/2024-01.md:x_y", &l).is_ok());
        assert!(validate_key("key", &"k".repeat(256), &l).is_ok());
        assert!(validate_key("key", &"k".repeat(257), &l).is_err());
        assert!(validate_key("key", "", &l).is_err());
        for bad in ["a b", "a|b", "é", "a%", "a\0", "a\n"] {
            assert!(validate_key("key", bad, &l).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefix_ranges_hold_exactly_the_prefixed_keys() {
        assert_eq!(prefix_range(""), (String::new(), "\u{7f}".to_string()));
        let (lo, hi) = prefix_range("notes/");
        assert_eq!((lo.as_str(), hi.as_str()), ("notes/", "notes0"));
        let (lo, hi) = prefix_range("a_");
        for key in ["a_", "a_z", "a_zzzz", "a_-", "a_~"] {
            assert!(lo.as_str() <= key && key < hi.as_str(), "{key}");
        }
        for key in ["a", "a-", "a`", "aa", "b"] {
            assert!(!(lo.as_str() <= key && key < hi.as_str()), "{key}");
        }
        // The highest key character still gets an upper bound above it.
        assert_eq!(prefix_range("z").1, "{");
    }

    #[test]
    fn tags_are_validated_then_deduplicated() {
        let l = limits();
        let tags: Vec<String> = ["b", "a", "b", "c", "a"].map(String::from).to_vec();
        assert_eq!(normalize_tags(&tags, &l).unwrap(), vec!["b", "a", "c"]);

        let err = normalize_tags(&["ok".into(), "".into()], &l).unwrap_err();
        assert!(matches!(err, MemoryError::Invalid { field, .. } if field == "tags[1]"));
        assert!(normalize_tags(&["é".repeat(64)], &l).is_ok());
        assert!(normalize_tags(&["é".repeat(65)], &l).is_err());
        assert!(normalize_tags(&["a\tb".into()], &l).is_err());

        let many: Vec<String> = (0..32).map(|i| format!("t{i}")).collect();
        assert_eq!(normalize_tags(&many, &l).unwrap().len(), 32);
        let mut with_dupes = many.clone();
        with_dupes.push("t0".into());
        assert_eq!(normalize_tags(&with_dupes, &l).unwrap().len(), 32);
        let mut too_many = many;
        too_many.push("t32".into());
        let err = normalize_tags(&too_many, &l).unwrap_err();
        assert!(matches!(err, MemoryError::Invalid { field, .. } if field == "tags"));
    }

    #[test]
    fn content_and_metadata_limits() {
        let l = limits();
        assert!(validate_content(&"x".repeat(65536), &l).is_ok());
        assert!(validate_content(&"x".repeat(65537), &l).is_err());
        assert!(validate_content("a\0b", &l).is_err());

        assert_eq!(metadata_json(None, &l).unwrap(), serde_json::json!({}));
        let nul = keel_shared::json::json_to_struct(&serde_json::json!({"a": "x\u{0}y"}));
        assert!(metadata_json(Some(&nul), &l).is_err());
        let nul_key = keel_shared::json::json_to_struct(&serde_json::json!({"l": [{"x\u{0}": 1}]}));
        assert!(metadata_json(Some(&nul_key), &l).is_err());
        let escaped = keel_shared::json::json_to_struct(&serde_json::json!({"a": "\\u0000"}));
        assert!(metadata_json(Some(&escaped), &l).is_ok());
        // {"s":"..."} is 8 bytes of framing.
        let edge =
            keel_shared::json::json_to_struct(&serde_json::json!({"s": "x".repeat(16384 - 8)}));
        assert!(metadata_json(Some(&edge), &l).is_ok());
        let over =
            keel_shared::json::json_to_struct(&serde_json::json!({"s": "x".repeat(16384 - 7)}));
        assert!(metadata_json(Some(&over), &l).is_err());
    }

    #[test]
    fn search_limits_and_queries() {
        assert_eq!(search_limit(0).unwrap(), 10);
        assert_eq!(search_limit(1).unwrap(), 1);
        assert_eq!(search_limit(100).unwrap(), 100);
        assert!(search_limit(101).is_err());
        assert!(search_limit(-1).is_err());

        let l = limits();
        assert!(search_query("  \t ", &l).is_err());
        assert_eq!(search_query("a\0b", &l).unwrap(), "a b");
        assert!(search_query(&"q".repeat(1024), &l).is_ok());
        assert!(search_query(&"q".repeat(1025), &l).is_err());
        assert!(validate_expected_version(-1).is_err());
    }

    #[test]
    fn namespaces() {
        assert!(validate_namespace("").is_ok());
        assert!(validate_namespace("agent-7/session:2").is_ok());
        assert!(validate_namespace(&"n".repeat(64)).is_ok());
        assert!(validate_namespace(&"n".repeat(65)).is_err());
        for bad in ["a b", "a|b", "é", "a\0"] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
        // Distinct filters per namespace, so a token never crosses namespaces.
        let u = uuid::Uuid::nil();
        assert_ne!(list_filter(u, "", "", ""), list_filter(u, "a", "", ""));
        assert_ne!(
            search_filter(u, "", "a|b", &[]),
            search_filter(u, "", "a", &["b".into()])
        );
    }

    #[test]
    fn expiry_and_versions() {
        let now = Utc::now();
        assert_eq!(validate_expires_at(None, now).unwrap(), None);
        let past = Timestamp {
            seconds: now.timestamp() - 1,
            nanos: 0,
        };
        assert!(validate_expires_at(Some(&past), now).is_err());
        let future = Timestamp {
            seconds: now.timestamp() + 60,
            nanos: 0,
        };
        assert!(validate_expires_at(Some(&future), now).unwrap().is_some());
        let bad = Timestamp {
            seconds: now.timestamp() + 60,
            nanos: -1,
        };
        assert!(validate_expires_at(Some(&bad), now).is_err());
        assert_eq!(validate_version(0).unwrap(), 0);
        assert!(validate_version(-1).is_err());
    }
}
