//! A PostgreSQL node's data backed up with pg_dump and restored into a
//! fresh database, which a node then serves: the same documents, the same
//! Changes and event log, and seqs that go on after the restored head.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::helpers::*;

/// `pg_dump` and `pg_restore` from the installed PostgreSQL, else PATH.
fn tool(name: &str) -> PathBuf {
    crate::pg::pg_bin()
        .map(|bin| bin.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(program: &PathBuf, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn state(c: &mut Client, key: &str) -> (Vec<(String, String, u64)>, Vec<u64>) {
    let changes = all_changes(c, "db")
        .await
        .into_iter()
        .map(|ch| (ch.id, ch.rev, ch.seq))
        .collect();
    let mut replay = subscribe(c, &[key], Some(0), "").await.unwrap();
    let mut seqs = Vec::new();
    loop {
        match next_event(&mut replay).await {
            agsync::pb::subscribe_response::Event::Notification(n) => seqs.push(n.seq),
            agsync::pb::subscribe_response::Event::Subscribed(_) => return (changes, seqs),
            agsync::pb::subscribe_response::Event::Progress(_) => {}
        }
    }
}

#[tokio::test]
async fn a_pg_dump_restored_into_a_fresh_database_is_served_by_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original");
    let node = ProcessServer::start(&original).await;
    let mut c = connect(node.addr).await;
    let db = create_db(&mut c, "db").await;
    let mut last = 0;
    for i in 0..20 {
        last = put(&mut c, "db", &format!("d{i}"), "", json!({"i": i}))
            .await
            .unwrap()
            .seq;
    }
    let before = state(&mut c, &db.sync_key).await;

    let dump = dir.path().join("agsync.dump");
    let source_url = crate::pg::url_for(&original).await;
    run(
        &tool("pg_dump"),
        &[
            "--format=custom",
            "--file",
            dump.to_str().unwrap(),
            &source_url,
        ],
    );
    // A fresh, empty database to restore into.
    let restored = dir.path().join("restored");
    let restored_url = crate::pg::url_for(&restored).await;
    run(
        &tool("pg_restore"),
        &[
            "--no-owner",
            "--dbname",
            &restored_url,
            dump.to_str().unwrap(),
        ],
    );

    let served = ProcessServer::start(&restored).await;
    let mut r = connect(served.addr).await;
    assert_eq!(state(&mut r, &db.sync_key).await, before);
    let next = put(&mut r, "db", "after", "", json!({})).await.unwrap();
    assert_eq!(next.seq, last + 1);
    // The original is untouched by the restored node's write.
    assert_eq!(state(&mut c, &db.sync_key).await, before);
}
