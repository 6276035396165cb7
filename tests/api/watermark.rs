//! The durable watermark (`--durability full`, the default): the writer
//! commits without an fsync, a syncer fsyncs the WAL off its path, and a
//! write is answered, published, or shown to any reader only once the
//! fsync that covers it is done. Crash tests at many points:
//! - a simulated power loss (the hidden `--simulate-power-loss-at-sync N`
//!   copies the store as the disk holds it at the Nth fsync, that is the
//!   database file and the WAL up to the previous fsync, and aborts);
//! - kill -9 at random moments.
//!
//! Meanwhile writers create and compare-and-set documents, readers Get
//! them and page Changes, and a subscriber listens. Afterwards a server on
//! what survived must hold every acknowledged write and everything any
//! reader saw (no seq a client saw is lost, so none is handed out again),
//! and its next write gets a seq above all of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agsync::pb::{self, ChangesRequest};
use serde_json::json;

use crate::helpers::*;

const DB: &str = "w";
const HOT: usize = 4;

/// What clients were told or shown before the crash: (id, rev, seq).
#[derive(Default)]
struct Seen {
    acked: Vec<(String, String, u64)>,
    read: Vec<(String, String, u64)>,
    notified: Vec<u64>,
}

/// Writers, readers, a Changes pager and a subscriber against `addr`, until
/// the server dies (every loop ends at its first failed call).
async fn load(addr: std::net::SocketAddr, seen: Arc<Mutex<Seen>>) {
    let mut c = connect(addr).await;
    let db = create_db(&mut c, DB).await;
    for h in 0..HOT {
        let w = put(&mut c, DB, &format!("hot{h}"), "", json!({"n": 0}))
            .await
            .unwrap();
        seen.lock()
            .unwrap()
            .acked
            .push((format!("hot{h}"), w.rev, w.seq));
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (mut c, seen) = (connect(addr).await, seen.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..100_000 {
                // Alternately a new document and an update of a hot one.
                let id = if n % 2 == 0 {
                    format!("w{w}-{n}")
                } else {
                    format!("hot{}", n % HOT)
                };
                let rev = if id.starts_with("hot") {
                    match get(&mut c, DB, &id).await {
                        Ok(doc) => doc.rev,
                        Err(_) => return,
                    }
                } else {
                    String::new()
                };
                match put(&mut c, DB, &id, &rev, json!({"w": w, "n": n})).await {
                    Ok(r) => seen.lock().unwrap().acked.push((id, r.rev, r.seq)),
                    Err(s) if s.code() == tonic::Code::Aborted => {}
                    Err(_) => return,
                }
            }
        }));
    }
    for r in 0..2 {
        let (mut c, seen) = (connect(addr).await, seen.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..1_000_000usize {
                let id = format!("hot{}", (n + r) % HOT);
                match get(&mut c, DB, &id).await {
                    Ok(doc) => seen.lock().unwrap().read.push((id, doc.rev, doc.seq)),
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(_) => return,
                }
            }
        }));
    }
    {
        let (mut c, seen) = (connect(addr).await, seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut since = 0;
            loop {
                let page = c
                    .changes(ChangesRequest {
                        database: DB.into(),
                        since,
                        ..Default::default()
                    })
                    .await;
                let Ok(page) = page.map(tonic::Response::into_inner) else {
                    return;
                };
                if page.changes.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let mut seen = seen.lock().unwrap();
                for change in page.changes {
                    seen.read.push((change.id, change.rev, change.seq));
                }
                since = page.last_seq;
            }
        }));
    }
    {
        let seen = seen.clone();
        let key = db.sync_key.clone();
        let mut c = connect(addr).await;
        tasks.push(tokio::spawn(async move {
            let Ok(mut stream) = subscribe(&mut c, &[&key], Some(0), "").await else {
                return;
            };
            while let Ok(Some(item)) = stream.message().await {
                if let Some(pb::subscribe_response::Event::Notification(n)) = item.event {
                    seen.lock().unwrap().notified.push(n.seq);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Checks the store at `db` (a server is started on it) against what was
/// seen before the crash.
async fn check_survivors(db: &Path, seen: &Seen, what: &str) {
    let server = ProcessServer::start(db).await;
    let mut c = connect(server.addr).await;
    let current: HashMap<String, (String, u64)> = all_changes(&c, DB)
        .await
        .into_iter()
        .map(|ch| (ch.id, (ch.rev, ch.seq)))
        .collect();
    let mut replay = subscribe(&mut c, &["nothing.else"], Some(0), "")
        .await
        .unwrap();
    let head = next_subscribed(&mut replay).await;
    let newest_seen = seen
        .acked
        .iter()
        .chain(&seen.read)
        .map(|(_, _, seq)| *seq)
        .chain(seen.notified.iter().copied())
        .max()
        .unwrap_or(0);
    assert!(
        head >= newest_seen,
        "{what}: a client saw seq {newest_seen}, the survivor's head is {head}"
    );
    for (kind, list) in [("acknowledged", &seen.acked), ("read", &seen.read)] {
        for (id, rev, seq) in list {
            let (now_rev, now_seq) = current
                .get(id)
                .unwrap_or_else(|| panic!("{what}: {kind} {id} ({rev}, seq {seq}) is gone"));
            assert!(
                (generation(now_rev), *now_seq) >= (generation(rev), *seq)
                    && (generation(now_rev) > generation(rev) || now_rev == rev),
                "{what}: {kind} {id} was at {rev} (seq {seq}), the survivor has {now_rev} (seq {now_seq})"
            );
        }
    }
    let next = put(&mut c, DB, "after-the-crash", "", json!({}))
        .await
        .unwrap();
    assert!(
        next.seq > newest_seen,
        "{what}: seq {} handed out again",
        next.seq
    );
    server.terminate().await;
}

/// The files of a simulated power loss of `db`.
fn power_loss_copy(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.power-loss", db.display())).join(db.file_name().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_takes_back_nothing_a_client_saw() {
    crate::sqlite_only!();
    let mut cut = 0;
    for at in [20u64, 60, 110, 170, 240] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("agsync.db");
        // A WAL bound the run never reaches: the simulation copies a
        // prefix of the WAL, which a restart of the WAL would invalidate.
        let server = ProcessServer::start_with(
            &db,
            &[
                "--simulate-power-loss-at-sync",
                &at.to_string(),
                "--wal-max-bytes",
                "1073741824",
            ],
            None,
        )
        .await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::time::timeout(Duration::from_secs(60), load(server.addr, seen.clone()))
            .await
            .expect("the power is cut within 60 s");
        let status = server.wait(Duration::from_secs(10)).await;
        assert!(!status.success(), "{status:?}");
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert!(
            seen.acked.len() > HOT,
            "too little happened before fsync {at}"
        );
        check_survivors(
            &power_loss_copy(&db),
            &seen,
            &format!("power loss at fsync {at}"),
        )
        .await;
        cut += 1;
    }
    assert_eq!(cut, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_moment_takes_back_nothing_a_client_saw() {
    crate::sqlite_only!();
    for after_ms in [150u64, 400, 700, 1100] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("agsync.db");
        let server = ProcessServer::start(&db).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let load = tokio::spawn(load(server.addr, seen.clone()));
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        server.kill().await;
        tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("the load ends with the server")
            .unwrap();
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        check_survivors(&db, &seen, &format!("kill -9 after {after_ms} ms")).await;
    }
}
