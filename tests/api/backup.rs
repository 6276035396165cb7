//! `agsync backup --db FILE DEST` under concurrent writes: a server started
//! on DEST serves exactly the store as of one seq S (every write
//! acknowledged before the backup began, nothing after S, Changes and the
//! replayed log gap-free up to S), and DEST is never overwritten.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// Runs `agsync backup --db db dest`; its exit status, stdout and stderr.
fn run_backup(db: &std::path::Path, dest: &std::path::Path) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agsync"))
        .arg("backup")
        .arg("--db")
        .arg(db)
        .arg(dest)
        .output()
        .expect("run agsync backup");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_writes_is_the_store_as_of_one_seq() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let db = create_db(&mut c, "db").await;
    let stop = Arc::new(AtomicBool::new(false));
    // Writers record each acknowledgement with when it arrived.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (mut c, stop) = (srv.client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("w{w}-{n}");
                    let r = put(&mut c, "db", &id, "", json!({"n": n})).await.unwrap();
                    acked.push((Instant::now(), id, r.rev, r.seq));
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("backup.db");
    let began = Instant::now();
    let source = srv.db_path();
    let dest_for_run = dest.clone();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_backup(&source, &dest_for_run))
            .await
            .unwrap();
    assert!(ok, "backup failed: {stderr}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let before: Vec<_> = acked.iter().filter(|(at, ..)| *at < began).collect();
    assert!(
        before.len() > 10,
        "only {} writes before the backup",
        before.len()
    );

    // A server on the copy.
    let copy = TestServer::start_with(|cfg| cfg.db = dest.clone().into()).await;
    let mut b = copy.client.clone();
    let mut live = subscribe(&mut b, &[&db.sync_key], None, "").await.unwrap();
    let s = next_subscribed(&mut live).await;
    assert!(
        stdout.contains(&format!("through seq {s}")),
        "the command names the seq: {stdout}"
    );
    // Every write acknowledged before the backup began is in it, as acked.
    for (_, id, rev, seq) in &before {
        assert!(*seq <= s);
        assert_eq!(&get(&mut b, "db", id).await.unwrap().rev, rev, "{id}");
    }
    // Exactly the acknowledged writes up to S, nothing after: Changes holds
    // seqs 1..=S, each once.
    let mut expected: Vec<u64> = acked.iter().map(|a| a.3).filter(|q| *q <= s).collect();
    expected.sort_unstable();
    assert_eq!(expected, (1..=s).collect::<Vec<_>>(), "acked seqs up to S");
    let seqs = all_change_seqs(&b, "db").await;
    assert_eq!(seqs, expected);
    // The log replays gap-free up to S.
    let mut replay = subscribe(&mut b, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < s as usize {
        replayed.push(next_notification(&mut replay).await.seq);
    }
    assert_eq!(replayed, (1..=s).collect::<Vec<_>>());
    assert_eq!(next_subscribed(&mut replay).await, s);
    // And the copy takes writes.
    put(&mut b, "db", "after-restore", "", json!({}))
        .await
        .unwrap();

    // DEST is never overwritten.
    let (ok, _, stderr) = run_backup(&srv.db_path(), &dest);
    assert!(!ok);
    assert!(stderr.contains("already exists"), "{stderr}");
    // A file never served (not in WAL mode), such as the copy before a
    // server opened it, backs up too.
    let never_served = dir.path().join("never-served.db");
    let (ok, _, stderr) = run_backup(&srv.db_path(), &never_served);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = run_backup(&never_served, &dir.path().join("again.db"));
    assert!(ok, "a backup of a backup: {stderr}");
    assert!(stdout.contains("through seq"), "{stdout}");
    // A missing store is an error, not a new empty one.
    let (ok, _, stderr) = run_backup(&dir.path().join("missing.db"), &dir.path().join("x.db"));
    assert!(!ok);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!dir.path().join("missing.db").exists());
}
