//! GetWorkspace: aggregate figures against what was written.

use std::collections::HashMap;

use keel_shared::time::from_timestamp;

use crate::support::Env;

#[tokio::test]
async fn empty_workspace() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 0);
    assert_eq!(ws.total_content_bytes, 0);
    assert!(ws.tag_counts.is_empty());
    assert_eq!(ws.last_updated_at, None);
    assert!(ws.recent.is_empty());
}

#[tokio::test]
async fn figures_match_what_was_written() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    env.put_ok(&bob, "bob/only", "not alice's", &["work", "bob"])
        .await;

    let writes: [(&str, &str, &[&str]); 7] = [
        ("m1", "plain ascii", &["work"]),
        ("m2", "héllo wörld", &["work", "home"]),
        ("m3", "日本語のメモ", &[]),
        ("m4", "🦀🦀 crabs", &["home"]),
        ("m5", "", &["work", "empty"]),
        ("m6", "to be deleted", &["gone"]),
        ("m7", "Привет", &["work"]),
    ];
    for (key, content, tags) in writes {
        env.put_ok(&alice, key, content, tags).await;
    }
    let m2 = env.put_ok(&alice, "m2", "updated ✓", &["home"]).await;
    env.delete(&alice, "m6", 0).await.unwrap();

    let live: Vec<(&str, &str, &[&str])> = vec![
        ("m1", "plain ascii", &["work"]),
        ("m2", "updated ✓", &["home"]),
        ("m3", "日本語のメモ", &[]),
        ("m4", "🦀🦀 crabs", &["home"]),
        ("m5", "", &["work", "empty"]),
        ("m7", "Привет", &["work"]),
    ];
    let mut tag_counts: HashMap<String, i64> = HashMap::new();
    for tag in live.iter().flat_map(|(_, _, tags)| tags.iter()) {
        *tag_counts.entry(tag.to_string()).or_default() += 1;
    }
    let total_bytes: usize = live.iter().map(|(_, content, _)| content.len()).sum();

    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 6);
    assert_eq!(ws.total_content_bytes, total_bytes as i64);
    assert!(
        total_bytes
            > live
                .iter()
                .map(|(_, c, _)| c.chars().count())
                .sum::<usize>()
    );
    assert_eq!(ws.tag_counts, tag_counts);

    // Newest update first: m2 was rewritten last, m6 is gone.
    let recent: Vec<&str> = ws.recent.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(recent, vec!["m2", "m7", "m5", "m4", "m3"]);
    for m in &ws.recent {
        assert_eq!(m, &env.get(&alice, &m.key).await.unwrap());
    }
    assert_eq!(ws.last_updated_at, m2.updated_at);
    let newest = from_timestamp(ws.last_updated_at.as_ref().unwrap()).unwrap();
    for m in &ws.recent {
        assert!(from_timestamp(m.updated_at.as_ref().unwrap()).unwrap() <= newest);
    }

    // Bob sees only his own.
    let bobs = env.workspace(&bob).await.unwrap();
    assert_eq!(bobs.memory_count, 1);
    assert_eq!(bobs.total_content_bytes, "not alice's".len() as i64);
    assert_eq!(
        bobs.tag_counts,
        HashMap::from([("work".to_string(), 1), ("bob".to_string(), 1)])
    );
    assert_eq!(bobs.recent.len(), 1);
}
