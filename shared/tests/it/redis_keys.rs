//! The Redis keys the docs and deployment files name are the ones the code
//! uses (with the default prefix), so an operator copying one from the docs
//! (a KEDA trigger, an XRANGE) watches the real key.

use std::path::{Path, PathBuf};

use keel_shared::config::RedisConfig;
use keel_shared::queue::CONSUMER_GROUP;

/// How the docs write the prefix: literally (the default) or as a placeholder.
const PREFIXES: &[&str] = &["keel:", "<prefix>:", "<KEEL_REDIS_PREFIX>:"];

/// Every key the code makes, with the default prefix; `<>` stands for a job id.
fn code_keys() -> Vec<String> {
    let redis = RedisConfig::new("redis://unused", "keel");
    let job = uuid::Uuid::nil();
    vec![
        redis.jobs_stream("<>"),
        redis.served_kinds(),
        redis.dead_letter_stream(),
        redis
            .job_updates_channel(&job)
            .replace(&job.to_string(), "<>"),
    ]
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// README and the other top-level docs, docs/, deploy/ and compose.yaml.
fn doc_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let root = repo_root();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.push(root.join("compose.yaml"));
    walk(&root.join("docs"), &mut files);
    walk(&root.join("deploy"), &mut files);
    files.sort();
    files
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:<>{}".contains(c)
}

/// The Redis key mentions in `line`: a token starting with a prefix, at the
/// start of a word (so not `postgres://keel:password@` or `.../keel:0.1.0`),
/// and not a container image (`image: keel:dev`).
fn mentions(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (start, _) in line.char_indices() {
        let before = &line[..start];
        let at_word_start = before
            .chars()
            .last()
            .is_none_or(|c| c.is_whitespace() || "`'\"([".contains(c));
        if !at_word_start || before.trim_end().ends_with("image:") {
            continue;
        }
        let rest = &line[start..];
        let Some(prefix) = PREFIXES.iter().find(|p| rest.starts_with(*p)) else {
            continue;
        };
        let token: String = rest.chars().take_while(|&c| is_key_char(c)).collect();
        // Sentence punctuation after a key is not part of it.
        let token = token.trim_end_matches(['.', ':']);
        if token.len() > prefix.len() {
            found.push(format!("keel:{}", &token[prefix.len()..]));
        }
    }
    found
}

/// `<job_id>`-style placeholders (and a literal job id) stand for any job,
/// and a hash tag (`{echo}`, a kind) for any kind.
fn normalized(key: &str) -> String {
    let mut out = String::new();
    let tagged = match (key.find('{'), key.rfind('}')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}{{<>}}{}", &key[..open], &key[close + 1..])
        }
        _ => key.to_string(),
    };
    let mut rest = tagged.as_str();
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('>').map_or(rest.len(), |i| open + i + 1);
        out.push_str("<>");
        rest = &rest[close..];
    }
    out.push_str(rest);
    out.split(':')
        .map(|part| match uuid::Uuid::parse_str(part) {
            Ok(_) => "<>",
            Err(_) => part,
        })
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn redis_keys_in_docs_are_the_ones_the_code_uses() {
    let known = code_keys();
    let mut unknown = Vec::new();
    let mut checked = 0;
    let mut groups = Vec::new();
    for file in doc_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let shown = file
            .strip_prefix(repo_root())
            .unwrap()
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            for key in mentions(line) {
                checked += 1;
                if !known.contains(&normalized(&key)) {
                    unknown.push(format!("{shown}:{}: {key}", n + 1));
                }
            }
            // KEDA's redis-streams trigger names the consumer group too.
            if let Some(group) = line.trim().strip_prefix("consumerGroup:") {
                let group = group.split('#').next().unwrap().trim().trim_matches('"');
                if group != CONSUMER_GROUP {
                    groups.push(format!("{shown}:{}: {group}", n + 1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "Redis keys in the docs that the code does not use (it uses {known:?}):\n{}",
        unknown.join("\n")
    );
    assert!(
        groups.is_empty(),
        "consumer groups in the docs other than {CONSUMER_GROUP:?}:\n{}",
        groups.join("\n")
    );
    // The docs do name keys (the dead-letter stream, the KEDA trigger): a
    // scan that found none would prove nothing.
    assert!(checked >= 2, "found only {checked} key mentions");
}

#[test]
fn the_scan_recognises_keys_and_skips_what_is_not_one() {
    assert_eq!(
        mentions("stream: keel:jobs   # <KEEL_REDIS_PREFIX>:jobs"),
        ["keel:jobs", "keel:jobs"]
    );
    assert_eq!(
        mentions("Inspect `<prefix>:jobs:dead` (`XRANGE`)."),
        ["keel:jobs:dead"]
    );
    assert_eq!(mentions("ends in keel:jobs:stream."), ["keel:jobs:stream"]);
    assert!(mentions("image: registry.example.com/keel:0.1.0").is_empty());
    assert!(mentions("  image: keel:dev").is_empty());
    assert!(mentions("DATABASE_URL: postgres://keel:secret@postgres/keel").is_empty());
    assert!(mentions("x-keel: &keel").is_empty());
    assert_eq!(
        normalized("keel:jobs:updates:<job_id>"),
        normalized("keel:jobs:updates:0190a5b2-7c1e-7a3b-8f00-000000000001")
    );
    assert!(code_keys().contains(&normalized("keel:jobs:updates:<id>")));
}
