//! How results are printed: readable tables (the default) or JSON (`-o json`,
//! field names as in the proto, snake_case) for scripts.

use chrono::SecondsFormat;
use keel_proto::auth::v1::{TokenPair, User};
use keel_proto::jobs::v1::{Job, JobEvent, JobStatus};
use keel_proto::memory::v1::{Memory, SearchResult, Workspace};
use keel_shared::json::struct_to_json;
use prost_types::{Struct, Timestamp};
use serde_json::{Value, json};

/// `--output` / `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts (one object per line for `jobs watch`).
    Json,
}

impl Format {
    /// Prints `json()` as pretty JSON, or `table()` as is.
    pub(crate) fn emit(self, json: impl FnOnce() -> Value, table: impl FnOnce() -> String) {
        match self {
            Format::Json => print(&json()),
            Format::Table => {
                let text = table();
                if text.ends_with('\n') {
                    print!("{text}");
                } else {
                    println!("{text}");
                }
            }
        }
    }
}

pub(crate) fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values print")
    );
}

/// Rows under a header, columns left-aligned and three spaces apart (the
/// kubectl layout). Widths count characters.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                // Cells are one line each: a newline would break the columns.
                let cell = cell.replace(['\n', '\r', '\t'], " ");
                line.push_str(&cell);
                if c + 1 < row.len() {
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One object as `NAME   value` lines, names aligned (for get, create, ...).
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (name, value) in pairs {
        let value = if value.is_empty() { "-" } else { value };
        out.push_str(&format!("{name:<width$}   {value}\n"));
    }
    out
}

/// A timestamp for tables: RFC 3339 in UTC to the second, `-` when unset.
pub(crate) fn when(ts: &Option<Timestamp>) -> String {
    ts.as_ref()
        .and_then(keel_shared::time::from_timestamp)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

fn time(ts: &Option<Timestamp>) -> Value {
    ts.as_ref()
        .and_then(keel_shared::time::from_timestamp)
        .map(|t| Value::String(t.to_rfc3339()))
        .unwrap_or(Value::Null)
}

pub(crate) fn object(s: &Option<Struct>) -> Value {
    s.as_ref()
        .map(|s| struct_to_json(s).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

/// A Struct as one line of JSON, `-` when unset.
pub(crate) fn compact(s: &Option<Struct>) -> String {
    match object(s) {
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

pub(crate) fn user(u: &User) -> Value {
    json!({"id": u.id, "email": u.email, "display_name": u.display_name, "created_at": time(&u.created_at)})
}

pub(crate) fn user_fields(u: &User) -> Vec<(&'static str, String)> {
    vec![
        ("ID", u.id.clone()),
        ("EMAIL", u.email.clone()),
        ("NAME", u.display_name.clone()),
        ("CREATED", when(&u.created_at)),
    ]
}

/// Tokens are never printed: only when they expire.
pub(crate) fn tokens(t: &TokenPair) -> Value {
    json!({
        "access_token_expires_at": time(&t.access_token_expires_at),
        "refresh_token_expires_at": time(&t.refresh_token_expires_at),
    })
}

pub(crate) fn status_name(status: i32) -> String {
    JobStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATUS_")
                .to_string()
        })
        .unwrap_or_else(|_| status.to_string())
}

pub(crate) fn job(j: &Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "status": status_name(j.status), "payload": object(&j.payload),
        "priority": j.priority, "attempt": j.attempt, "max_attempts": j.max_attempts,
        "output": object(&j.output), "error": j.error, "run_at": time(&j.run_at),
        "created_at": time(&j.created_at), "updated_at": time(&j.updated_at),
        "started_at": time(&j.started_at), "finished_at": time(&j.finished_at),
        "cancel_requested": j.cancel_requested, "timeout": seconds(&j.timeout),
    })
}

/// A Duration as seconds for JSON (whole seconds as an integer), null when unset.
fn seconds(d: &Option<prost_types::Duration>) -> Value {
    match d {
        None => Value::Null,
        Some(d) if d.nanos == 0 => json!(d.seconds),
        Some(d) => json!(d.seconds as f64 + f64::from(d.nanos) / 1e9),
    }
}

/// A Duration for tables (`90s`), `-` when unset.
fn seconds_text(d: &Option<prost_types::Duration>) -> String {
    match seconds(d) {
        Value::Null => "-".into(),
        v => format!("{v}s"),
    }
}

fn attempt(j: &Job) -> String {
    format!("{}/{}", j.attempt, j.max_attempts)
}

pub(crate) const JOB_COLUMNS: &[&str] = &["ID", "KIND", "STATUS", "ATTEMPT", "CREATED"];

pub(crate) fn job_row(j: &Job) -> Vec<String> {
    vec![
        j.id.clone(),
        j.kind.clone(),
        status_name(j.status),
        attempt(j),
        when(&j.created_at),
    ]
}

pub(crate) fn jobs_table(jobs: &[Job]) -> String {
    let mut table = Table::new(JOB_COLUMNS);
    for j in jobs {
        table.row(job_row(j));
    }
    table.render()
}

/// One job in full.
pub(crate) fn job_fields(j: &Job) -> String {
    fields(&[
        ("ID", j.id.clone()),
        ("KIND", j.kind.clone()),
        ("STATUS", status_name(j.status)),
        ("ATTEMPT", attempt(j)),
        ("PRIORITY", j.priority.to_string()),
        ("TIMEOUT", seconds_text(&j.timeout)),
        ("PAYLOAD", compact(&j.payload)),
        ("OUTPUT", compact(&j.output)),
        ("ERROR", j.error.clone()),
        (
            "CANCEL REQUESTED",
            if j.cancel_requested { "yes" } else { "no" }.into(),
        ),
        ("RUN AT", when(&j.run_at)),
        ("CREATED", when(&j.created_at)),
        ("STARTED", when(&j.started_at)),
        ("FINISHED", when(&j.finished_at)),
        ("UPDATED", when(&j.updated_at)),
    ])
}

/// One line of `jobs watch`: time (of the update, to the millisecond),
/// status, attempt, and the error when there is one.
pub(crate) fn watch_line(j: &Job) -> String {
    let at = j
        .updated_at
        .as_ref()
        .and_then(keel_shared::time::from_timestamp)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{at}   {:<9}   attempt {}",
        status_name(j.status),
        attempt(j)
    );
    if j.cancel_requested {
        line.push_str("   cancel requested");
    }
    if !j.error.is_empty() {
        line.push_str("   error: ");
        line.push_str(&j.error.replace(['\n', '\r'], " "));
    }
    line
}

pub(crate) fn job_event(e: &JobEvent) -> Value {
    json!({
        "event": e.event, "status": status_name(e.status), "attempt": e.attempt,
        "worker_id": e.worker_id, "error": e.error, "at": time(&e.at),
    })
}

/// A cell that may be empty: `-` then, so every column has a value.
fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// `jobs history`: one row per transition, oldest first; times to the
/// millisecond (a job's transitions are often within one second).
pub(crate) fn history_table(events: &[JobEvent]) -> String {
    let mut table = Table::new(&["AT", "EVENT", "STATUS", "ATTEMPT", "WORKER", "ERROR"]);
    for e in events {
        let at =
            e.at.as_ref()
                .and_then(keel_shared::time::from_timestamp)
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
                .unwrap_or_else(|| "-".into());
        table.row(vec![
            at,
            e.event.clone(),
            status_name(e.status),
            e.attempt.to_string(),
            or_dash(&e.worker_id),
            or_dash(&e.error),
        ]);
    }
    table.render()
}

pub(crate) fn memory(m: &Memory) -> Value {
    json!({
        "key": m.key, "content": m.content, "tags": m.tags, "metadata": object(&m.metadata),
        "version": m.version, "created_at": time(&m.created_at), "updated_at": time(&m.updated_at),
        "namespace": m.namespace, "expires_at": time(&m.expires_at),
    })
}

fn tags(m: &Memory) -> String {
    if m.tags.is_empty() {
        "-".into()
    } else {
        m.tags.join(",")
    }
}

pub(crate) fn memories_table(memories: &[Memory]) -> String {
    let mut table = Table::new(&["KEY", "VERSION", "TAGS", "UPDATED"]);
    for m in memories {
        table.row(vec![
            m.key.clone(),
            m.version.to_string(),
            tags(m),
            when(&m.updated_at),
        ]);
    }
    table.render()
}

pub(crate) fn search_table(results: &[SearchResult]) -> String {
    let mut table = Table::new(&["SCORE", "KEY", "VERSION", "TAGS", "UPDATED", "SNIPPET"]);
    for r in results {
        let m = r.memory.clone().unwrap_or_default();
        table.row(vec![
            format!("{:.4}", r.score),
            m.key.clone(),
            m.version.to_string(),
            tags(&m),
            when(&m.updated_at),
            r.snippet.replace(['\n', '\t'], " "),
        ]);
    }
    table.render()
}

/// One memory in full: its fields, then its content after a blank line.
pub(crate) fn memory_fields(m: &Memory) -> String {
    let mut out = fields(&[
        ("KEY", m.key.clone()),
        ("VERSION", m.version.to_string()),
        ("TAGS", tags(m)),
        ("METADATA", compact(&m.metadata)),
        ("CREATED", when(&m.created_at)),
        ("UPDATED", when(&m.updated_at)),
    ]);
    out.push('\n');
    out.push_str(&m.content);
    out
}

pub(crate) fn workspace(w: &Workspace) -> Value {
    json!({
        "memory_count": w.memory_count, "total_content_bytes": w.total_content_bytes,
        "tag_counts": w.tag_counts, "last_updated_at": time(&w.last_updated_at),
        "recent": w.recent.iter().map(memory).collect::<Vec<_>>(),
    })
}

pub(crate) fn workspace_fields(w: &Workspace) -> String {
    let mut tag_counts: Vec<_> = w.tag_counts.iter().collect();
    tag_counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut out = fields(&[
        ("MEMORIES", w.memory_count.to_string()),
        ("CONTENT BYTES", w.total_content_bytes.to_string()),
        ("LAST UPDATED", when(&w.last_updated_at)),
        (
            "TAGS",
            tag_counts
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]);
    if !w.recent.is_empty() {
        out.push_str("\nRECENT\n");
        out.push_str(&memories_table(&w.recent));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_by_characters() {
        let mut table = Table::new(&["KEY", "VERSION", "TAGS"]);
        table.row(vec!["notes/é".into(), "12".into(), "-".into()]);
        table.row(vec!["a".into(), "1".into(), "x,y".into()]);
        assert_eq!(
            table.render(),
            "KEY       VERSION   TAGS\nnotes/é   12        -\na         1         x,y\n"
        );
    }

    #[test]
    fn fields_align_names_and_mark_empty_values() {
        assert_eq!(
            fields(&[("ID", "1".into()), ("ERROR", String::new())]),
            "ID      1\nERROR   -\n"
        );
    }
}
