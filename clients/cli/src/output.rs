//! Keel messages as JSON for printing (field names as in the proto, snake_case).

use keel_proto::auth::v1::{TokenPair, User};
use keel_proto::jobs::v1::{Job, JobStatus};
use keel_proto::memory::v1::{Memory, Workspace};
use keel_shared::json::struct_to_json;
use prost_types::{Struct, Timestamp};
use serde_json::{Value, json};

fn time(ts: &Option<Timestamp>) -> Value {
    ts.as_ref()
        .and_then(keel_shared::time::from_timestamp)
        .map(|t| Value::String(t.to_rfc3339()))
        .unwrap_or(Value::Null)
}

fn object(s: &Option<Struct>) -> Value {
    s.as_ref()
        .map(|s| struct_to_json(s).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

pub fn user(u: &User) -> Value {
    json!({"id": u.id, "email": u.email, "display_name": u.display_name, "created_at": time(&u.created_at)})
}

/// Tokens are never printed: only when they expire.
pub fn tokens(t: &TokenPair) -> Value {
    json!({
        "access_token_expires_at": time(&t.access_token_expires_at),
        "refresh_token_expires_at": time(&t.refresh_token_expires_at),
    })
}

pub fn status_name(status: i32) -> String {
    JobStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATUS_")
                .to_string()
        })
        .unwrap_or_else(|_| status.to_string())
}

pub fn job(j: &Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "status": status_name(j.status), "payload": object(&j.payload),
        "priority": j.priority, "attempt": j.attempt, "max_attempts": j.max_attempts,
        "output": object(&j.output), "error": j.error, "run_at": time(&j.run_at),
        "created_at": time(&j.created_at), "updated_at": time(&j.updated_at),
        "started_at": time(&j.started_at), "finished_at": time(&j.finished_at),
        "cancel_requested": j.cancel_requested,
    })
}

pub fn memory(m: &Memory) -> Value {
    json!({
        "key": m.key, "content": m.content, "tags": m.tags, "metadata": object(&m.metadata),
        "version": m.version, "created_at": time(&m.created_at), "updated_at": time(&m.updated_at),
    })
}

pub fn workspace(w: &Workspace) -> Value {
    json!({
        "memory_count": w.memory_count, "total_content_bytes": w.total_content_bytes,
        "tag_counts": w.tag_counts, "last_updated_at": time(&w.last_updated_at),
        "recent": w.recent.iter().map(memory).collect::<Vec<_>>(),
    })
}

pub fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values print")
    );
}
