//! PostgreSQL's disk fills up under a node: the node's database lives in a
//! tablespace on a small tmpfs (with a ballast file to free), so PostgreSQL
//! itself stays up and refuses to extend its tables with `disk_full`
//! (53100), as it does when a data volume fills. Writes fail with
//! RESOURCE_EXHAUSTED naming the disk; Get, Changes and Subscribe keep
//! serving every acknowledged write; health's `agsync.writes` and
//! `agsync_storage_writable` show it; once the ballast is removed writes
//! succeed again within seconds, without a restart.
//!
//! (When the volume holding PostgreSQL's WAL fills, PostgreSQL itself stops:
//! the node then answers UNAVAILABLE, as for any PostgreSQL outage; see
//! `cluster.rs`.)

use agsync::pb::{BulkPutItem, BulkPutRequest};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::json;
use tonic::Code;

use crate::durability::{NOT_SERVING, SERVING, SmallDisk, health_of, put_once_space_is_freed};
use crate::helpers::*;

/// 4,000 random letters and digits: PostgreSQL cannot compress them away.
fn filler() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(4000)
        .map(char::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_s_full_disk_refuses_writes_until_space_is_freed() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        return; // that server's disks are not ours to fill
    }
    let disk = match SmallDisk::mount(40) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("PostgreSQL full-disk test skipped: {why}");
            return;
        }
    };
    let cluster = crate::pg::OwnCluster::start().unwrap_or_else(|why| crate::pg::skip(&why));
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![7u8; 8 * 1024 * 1024]).unwrap();
    let space = disk.path().join("tablespace");
    std::fs::create_dir(&space).unwrap();
    let chown = std::process::Command::new("chown")
        .arg("postgres:")
        .arg(&space)
        .status()
        .unwrap();
    assert!(chown.success());
    cluster
        .admin(&[
            &format!("CREATE TABLESPACE small LOCATION '{}'", space.display()),
            "CREATE DATABASE agsync TABLESPACE small",
        ])
        .await;
    let url = cluster.url("agsync");
    let server = ProcessServer::start_with(
        std::path::Path::new(&url),
        &["--metrics-listen", "127.0.0.1:0"],
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    let db = create_db(&mut c, "db").await;

    // BulkPuts of 25 documents of 4 KB until PostgreSQL refuses one.
    let mut acked = Vec::new();
    let mut refusal = None;
    for k in 0..2_000 {
        let docs = (0..25)
            .map(|i| BulkPutItem {
                id: format!("d{k}-{i}"),
                body: Some(body(json!({"text": filler()}))),
                ..Default::default()
            })
            .collect();
        let request = BulkPutRequest {
            database: "db".into(),
            docs,
            ..Default::default()
        };
        match c.bulk_put(request).await {
            Ok(r) => {
                for item in r.into_inner().results {
                    assert!(item.error.is_empty(), "{item:?}");
                    acked.push((item.id, item.rev, item.seq));
                }
            }
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("PostgreSQL's disk filled up");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("disk is full") && refusal.message().contains("PostgreSQL"),
        "{}",
        refusal.message()
    );
    assert!(acked.len() > 100, "only {} writes fit", acked.len());
    // Smaller writes may still fit in the last pages for a while; once
    // three in a row are refused, the disk is full for them too. The
    // process stays up throughout.
    let mut refused_in_a_row = 0;
    for i in 0..1_000 {
        match put(
            &mut c,
            "db",
            &format!("more{i}"),
            "",
            json!({"t": filler()}),
        )
        .await
        {
            Ok(r) => {
                acked.push((format!("more{i}"), r.rev, r.seq));
                refused_in_a_row = 0;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused_in_a_row += 1;
                if refused_in_a_row == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused_in_a_row, 3, "small writes kept fitting");
    let channel = channel(server.addr).await;
    assert_eq!(health_of(&channel, "agsync.writes").await, NOT_SERVING);
    assert_eq!(health_of(&channel, "").await, SERVING);
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_storage_writable", &[]), 0.0);

    // Reads serve every acknowledged write: Get, Changes, Subscribe replay.
    for (id, rev, _) in acked.iter().step_by(17) {
        assert_eq!(&get(&mut c, "db", id).await.unwrap().rev, rev);
    }
    let listed = all_change_seqs(&c, "db").await;
    let acked_seqs: Vec<u64> = acked.iter().map(|a| a.2).collect();
    assert_eq!(
        listed, acked_seqs,
        "Changes lists exactly the acknowledged writes"
    );
    let last = *acked_seqs.last().unwrap();
    let mut replay = subscribe(&mut c, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    for seq in &acked_seqs {
        assert_eq!(next_notification(&mut replay).await.seq, *seq);
    }
    assert_eq!(next_subscribed(&mut replay).await, last);

    // Space freed: writes succeed again within seconds, same process.
    std::fs::remove_file(&ballast).unwrap();
    let after = put_once_space_is_freed(&mut c).await;
    assert_eq!(after.seq, last + 1);
    assert_eq!(next_notification(&mut replay).await.seq, after.seq);
    assert_eq!(health_of(&channel, "agsync.writes").await, SERVING);
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_storage_writable", &[]), 1.0);
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    drop(cluster);
}
