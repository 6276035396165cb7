use std::collections::HashMap;
use std::time::Duration;

use agsync::pb::ListDatabasesRequest;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn data_survives_a_restart() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "cars").await;
    let v1 = put(&mut c, "cars", "a", "", json!({"n": 1})).await.unwrap();
    let v2 = put(&mut c, "cars", "a", &v1.rev, json!({"n": 2}))
        .await
        .unwrap();
    let b = put(&mut c, "cars", "b", "", json!({"n": 3})).await.unwrap();

    srv.restart().await;
    let mut c = srv.client.clone();
    let doc = get(&mut c, "cars", "a").await.unwrap();
    assert_eq!((doc.rev.as_str(), doc.seq), (v2.rev.as_str(), v2.seq));
    assert_eq!(json(doc.body.as_ref().unwrap()), json!({"n": 2}));
    let dbs = c
        .list_databases(ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (dbs.databases[0].doc_count, dbs.databases[0].update_seq),
        (2, b.seq)
    );
    // The stale rev still conflicts, and the seq counter continues.
    assert_eq!(
        put(&mut c, "cars", "a", &v1.rev, json!({}))
            .await
            .unwrap_err()
            .code(),
        Code::Aborted
    );
    let next = put(&mut c, "cars", "c", "", json!({})).await.unwrap();
    assert_eq!(next.seq, b.seq + 1);
}

/// Concurrent writers against the real binary, killed with SIGKILL mid-load:
/// after a restart every acknowledged write is there at its acknowledged rev
/// (or, if the killed write had committed without its answer arriving, the
/// one after it), and seqs continue without reuse. Repeated over kill points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    const WRITERS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("agsync.db");
    // id -> (acknowledged rev, seq)
    let mut acked: HashMap<String, (String, u64)> = HashMap::new();
    let mut max_acked_seq = 0;

    for round in 0..3u64 {
        let server = ProcessServer::start(&db_path).await;
        let mut c = connect(server.addr).await;
        if round == 0 {
            create_db(&mut c, "crash").await;
        }
        // Everything acknowledged before is there.
        for (id, (rev, _)) in &acked {
            let doc = get(&mut c, "crash", id).await.unwrap();
            let (got, want) = (generation(&doc.rev), generation(rev));
            assert!(
                got == want && doc.rev == *rev || got == want + 1,
                "{id}: {} vs acked {rev}",
                doc.rev
            );
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = connect(server.addr).await;
            let id = format!("w{w}");
            let mut rev = match acked.get(&id) {
                Some(_) => get(&mut c, "crash", &id)
                    .await
                    .map(|d| d.rev)
                    .unwrap_or_default(),
                None => String::new(),
            };
            tasks.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                // Bounded: stops at the kill (error) or after 100 000 writes.
                for n in 0..100_000u64 {
                    match put(&mut c, "crash", &id, &rev, json!({"round": round, "n": n})).await {
                        Ok(r) => {
                            rev = r.rev.clone();
                            acks.push((id.clone(), r.rev, r.seq));
                        }
                        Err(_) => break,
                    }
                }
                acks
            }));
        }
        // Kill at a different point each round, once writes are flowing.
        tokio::time::sleep(Duration::from_millis(300 + 250 * round)).await;
        server.kill().await;
        let mut round_acks = 0;
        for t in tasks {
            for (id, rev, seq) in t.await.unwrap() {
                max_acked_seq = max_acked_seq.max(seq);
                round_acks += 1;
                acked.insert(id, (rev, seq));
            }
        }
        assert!(
            round_acks > 0,
            "round {round}: no write was acknowledged before the kill"
        );
    }

    let server = ProcessServer::start(&db_path).await;
    let mut c = connect(server.addr).await;
    for (id, (rev, seq)) in &acked {
        let doc = get(&mut c, "crash", id).await.unwrap();
        if doc.rev == *rev {
            assert_eq!(doc.seq, *seq, "{id}");
        } else {
            assert_eq!(
                generation(&doc.rev),
                generation(rev) + 1,
                "{id}: {} vs acked {rev}",
                doc.rev
            );
        }
    }
    let next = put(&mut c, "crash", "after", "", json!({})).await.unwrap();
    assert!(
        next.seq > max_acked_seq,
        "seq {} reused (acked up to {max_acked_seq})",
        next.seq
    );
    let status = server.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("agsync.db");
    let server = ProcessServer::start(&db_path).await;
    let mut c = connect(server.addr).await;
    create_db(&mut c, "db").await;
    let r = put(&mut c, "db", "x", "", json!({"a": 1})).await.unwrap();
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    if !crate::POSTGRES {
        // The WAL was checkpointed into the main file at shutdown.
        let wal = dir.path().join("agsync.db-wal");
        let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(wal_len, 0, "WAL checkpointed and truncated");
    }
    let server = ProcessServer::start(&db_path).await;
    let mut c = connect(server.addr).await;
    assert_eq!(get(&mut c, "db", "x").await.unwrap().rev, r.rev);
    server.kill().await;
}

/// Subscribers connected when the server is killed resume with `since` after
/// the restart and receive every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_resume_exactly_once_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("agsync.db");
    let server = ProcessServer::start(&db_path).await;
    let mut c = connect(server.addr).await;
    create_db(&mut c, "db").await;
    let mut stream = subscribe(&mut c, &["db"], Some(0), "").await.unwrap();
    assert_eq!(next_subscribed(&mut stream).await, 0);

    // Writers run until the kill; the subscriber reads what it can.
    let writer = {
        let mut c = connect(server.addr).await;
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..100_000u64 {
                match put(&mut c, "db", &format!("d{n}"), "", json!({})).await {
                    Ok(r) => acked.push(r.seq),
                    Err(_) => break,
                }
            }
            acked
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.push(next_notification(&mut stream).await.seq);
    }
    server.kill().await;
    // Drain what arrived before the connection died.
    while let Ok(Some(msg)) = stream.message().await {
        if let Some(agsync::pb::subscribe_response::Event::Notification(n)) = msg.event {
            seen.push(n.seq);
        }
    }
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty());

    let server = ProcessServer::start(&db_path).await;
    let mut c = connect(server.addr).await;
    let last_seen = *seen.last().unwrap();
    let mut resumed = subscribe(&mut c, &["db"], Some(last_seen), "")
        .await
        .unwrap();
    let head = loop {
        match next_event(&mut resumed).await {
            agsync::pb::subscribe_response::Event::Notification(n) => seen.push(n.seq),
            agsync::pb::subscribe_response::Event::Subscribed(s) => break s.head_seq,
            agsync::pb::subscribe_response::Event::Progress(_) => {}
        }
    };
    let after = put(&mut c, "db", "after", "", json!({})).await.unwrap();
    seen.push(next_notification(&mut resumed).await.seq);
    assert_eq!(after.seq, head + 1);
    // Exactly once, in order, no gap: 1..=after.seq.
    assert_eq!(seen, (1..=after.seq).collect::<Vec<_>>());
    // Every acknowledged write is among them.
    assert!(acked.iter().all(|s| *s <= head));
    server.kill().await;
}

/// When a write cannot reach the disk (here: a file-size limit, which
/// SQLite sees as an I/O error), writes fail with UNAVAILABLE or
/// RESOURCE_EXHAUSTED, never INTERNAL; the process stays up and serves
/// reads, health's `agsync.writes` says NOT_SERVING while the server as a
/// whole stays SERVING, and everything acknowledged is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_write_refuses_writes_and_keeps_serving() {
    // A full disk under PostgreSQL is PostgreSQL's to report.
    crate::sqlite_only!();
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("agsync.db");
    let server = ProcessServer::start_with(
        &db_path,
        &["--shutdown-timeout-secs", "2"],
        Some(2 * 1024 * 1024),
    )
    .await;
    let mut c = connect(server.addr).await;
    create_db(&mut c, "db").await;
    let mut acked = Vec::new();
    let mut failed = 0;
    for i in 0..200 {
        match put(
            &mut c,
            "db",
            &format!("d{i}"),
            "",
            json!({"text": "z".repeat(50_000)}),
        )
        .await
        {
            Ok(r) => acked.push((format!("d{i}"), r.rev)),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted),
                    "{s:?}"
                );
                failed += 1;
                if failed >= 5 {
                    break;
                }
            }
        }
    }
    assert!(failed >= 5, "the file-size limit was hit");
    assert!(!acked.is_empty());
    let channel = channel(server.addr).await;
    assert_eq!(health_of(&channel, "agsync.writes").await, NOT_SERVING);
    assert_eq!(health_of(&channel, "").await, SERVING);
    // Still up, still reading: everything acknowledged is there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, rev) in &acked {
        assert_eq!(&get(&mut c, "db", id).await.unwrap().rev, rev);
    }
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// The health status of `service`.
pub async fn health_of(channel: &tonic::transport::Channel, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Puts document "after" in database "db" once the writes refused for a
/// full disk (RESOURCE_EXHAUSTED, nothing else) succeed again, which must
/// happen within 10 s.
pub async fn put_once_space_is_freed(c: &mut Client) -> agsync::pb::PutResponse {
    let started = std::time::Instant::now();
    loop {
        match put(c, "db", "after", "", json!({})).await {
            Ok(r) => return r,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "still full after 10 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(megabytes: u32) -> Result<SmallDisk, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a tmpfs needs root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallDisk { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk (a 32 MiB tmpfs with an 8 MiB ballast file): writes fail
/// with RESOURCE_EXHAUSTED naming the disk, never INTERNAL; the process
/// stays up, and Get, Changes and Subscribe keep serving every acknowledged
/// write; health's `agsync.writes` and `agsync_storage_writable` show it;
/// once the ballast is removed, writes succeed again within seconds,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_until_space_is_freed() {
    crate::sqlite_only!();
    let disk = match SmallDisk::mount(32) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("full-disk test skipped: {why}");
            return;
        }
    };
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![7u8; 8 * 1024 * 1024]).unwrap();
    let server = ProcessServer::start_with(
        &disk.path().join("agsync.db"),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--wal-max-bytes",
            "4194304",
        ],
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    let db = create_db(&mut c, "db").await;
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..20_000 {
        match put(
            &mut c,
            "db",
            &format!("d{i}"),
            "",
            json!({"text": "x".repeat(4000)}),
        )
        .await
        {
            Ok(r) => acked.push((format!("d{i}"), r.rev, r.seq)),
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk filled up");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("disk is full"),
        "{}",
        refusal.message()
    );
    assert!(acked.len() > 100, "only {} writes fit", acked.len());
    // More writes are refused the same way; the process stays up.
    for i in 0..3 {
        let again = put(
            &mut c,
            "db",
            &format!("more{i}"),
            "",
            json!({"text": "x".repeat(4000)}),
        )
        .await;
        assert_eq!(again.unwrap_err().code(), Code::ResourceExhausted);
    }
    let channel = channel(server.addr).await;
    assert_eq!(health_of(&channel, "agsync.writes").await, NOT_SERVING);
    assert_eq!(health_of(&channel, "").await, SERVING);
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_storage_writable", &[]), 0.0);

    // Reads serve every acknowledged write: Get, Changes, Subscribe replay.
    for (id, rev, _) in acked.iter().step_by(17) {
        assert_eq!(&get(&mut c, "db", id).await.unwrap().rev, rev);
    }
    let last = acked.last().unwrap().2;
    let mut replay = subscribe(&mut c, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let mut replayed = 0;
    while replayed < acked.len() {
        next_notification(&mut replay).await;
        replayed += 1;
    }
    assert_eq!(next_subscribed(&mut replay).await, last);

    // Space freed: writes succeed again within seconds, same process.
    std::fs::remove_file(&ballast).unwrap();
    let after = put_once_space_is_freed(&mut c).await;
    assert_eq!(after.seq, last + 1);
    assert_eq!(health_of(&channel, "agsync.writes").await, SERVING);
    for (id, rev, _) in acked.iter().step_by(17) {
        assert_eq!(&get(&mut c, "db", id).await.unwrap().rev, rev);
    }
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
}
