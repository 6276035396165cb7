//! Several agsync nodes on one PostgreSQL database: every promise of the
//! contract holds across nodes (CAS, one gap-free seq, Subscribe live and
//! on resume), and through a node's crash and a PostgreSQL restart.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use agsync::pb::{BulkPutItem, BulkPutRequest, ChangesRequest, DeleteDatabaseRequest};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::helpers::*;

/// Two in-process nodes on one database (the same path maps to the same
/// PostgreSQL database), polling the log every 50 ms.
async fn two_nodes() -> (TestServer, TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let node = || {
        let path = path.clone();
        TestServer::start_with(move |c| {
            c.db = path.into();
            c.pg_poll_interval_ms = Duration::from_millis(50);
        })
    };
    let a = node().await;
    let b = node().await;
    (a, b, dir)
}

/// The next notification, past `subscribed` and progress events.
async fn next_note(stream: &mut Events) -> agsync::pb::Notification {
    loop {
        if let agsync::pb::subscribe_response::Event::Notification(n) = next_event(stream).await {
            return n;
        }
    }
}

/// Notifications from `stream` until `n` arrived (10 s each at most).
async fn notifications(stream: &mut Events, n: usize) -> Vec<agsync::pb::Notification> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(next_note(stream).await);
    }
    out
}

#[tokio::test]
async fn a_write_on_one_node_reaches_a_subscriber_on_the_other() {
    let (a, b, _dir) = two_nodes().await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    ca.create_database(agsync::pb::CreateDatabaseRequest {
        name: "cars".into(),
        sync_key: "cars.key".into(),
    })
    .await
    .unwrap();
    let mut everyone = subscribe(&mut cb, &["cars.key"], None, "").await.unwrap();
    let mut rita = subscribe(&mut cb, &["cars.key"], None, "rita")
        .await
        .unwrap();
    next_subscribed(&mut everyone).await;
    next_subscribed(&mut rita).await;

    let written = put(&mut ca, "cars", "x", "", json!({"n": 1}))
        .await
        .unwrap();
    let seen = next_notification(&mut everyone).await;
    assert_eq!(
        (seen.seq, seen.id.as_str(), seen.database.as_str()),
        (written.seq, "x", "cars")
    );
    assert_eq!(next_notification(&mut rita).await.seq, written.seq);

    // Alias rules hold across nodes: a Notify for bob skips rita, one for
    // rita reaches only her, one for everyone reaches both.
    notify(&mut ca, "cars.key", &["bob"], &[]).await;
    let for_rita = notify(&mut ca, "cars.key", &["rita"], &[]).await;
    let for_all = notify(&mut ca, "cars.key", &[], &[]).await;
    assert_eq!(next_notification(&mut rita).await.seq, for_rita);
    assert_eq!(next_notification(&mut rita).await.seq, for_all);
    assert_eq!(next_notification(&mut everyone).await.seq, for_all);

    // A database deleted on A is seen deleted on B, live and in B's reads.
    ca.delete_database(DeleteDatabaseRequest {
        name: "cars".into(),
    })
    .await
    .unwrap();
    let deleted = next_notification(&mut everyone).await;
    assert!(deleted.database_deleted, "{deleted:?}");
    assert_status(get(&mut cb, "cars", "x").await, Code::NotFound, "cars");
}

/// 32 clients over both nodes update one document with its current rev;
/// every success is one generation: no update is lost, none wins twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_across_nodes_loses_no_update() {
    let (a, b, _dir) = two_nodes().await;
    let mut ca = a.client.clone();
    create_db(&mut ca, "counter").await;
    put(&mut ca, "counter", "c", "", json!({"n": 0}))
        .await
        .unwrap();
    let successes = Arc::new(AtomicU64::new(0));
    let tasks = (0..32).map(|i| {
        let mut c = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        let successes = successes.clone();
        tokio::spawn(async move {
            let mut conflicts = 0;
            // Bounded: 5 successful updates, or 400 attempts.
            let mut mine = 0;
            for _ in 0..400 {
                if mine == 5 {
                    break;
                }
                let current = get(&mut c, "counter", "c").await.unwrap();
                match put(&mut c, "counter", "c", &current.rev, json!({"by": i})).await {
                    Ok(_) => {
                        mine += 1;
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => {
                        assert_eq!(s.code(), Code::Aborted, "{}", s.message());
                        conflicts += 1;
                    }
                }
            }
            conflicts
        })
    });
    let conflicts: u64 = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    let total = successes.load(Ordering::Relaxed);
    let doc = get(&mut b.client.clone(), "counter", "c").await.unwrap();
    assert_eq!(generation(&doc.rev), 1 + total, "{total} successes");
    assert!(conflicts > 0, "32 racing clients never conflicted");
}

#[tokio::test]
async fn a_subscriber_resumes_on_another_node_with_its_since() {
    let (a, b, _dir) = two_nodes().await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let db = create_db(&mut ca, "db").await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(
            put(&mut ca, "db", &format!("d{i}"), "", json!({}))
                .await
                .unwrap()
                .seq,
        );
    }
    // Heard on A up to the third write, then A is gone.
    let mut on_a = subscribe(&mut ca, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let heard = notifications(&mut on_a, 3).await;
    let since = heard[2].seq;
    drop(on_a);
    drop(a);

    let mut on_b = subscribe(&mut cb, &[&db.sync_key], Some(since), "")
        .await
        .unwrap();
    let rest = notifications(&mut on_b, 2).await;
    assert_eq!(rest.iter().map(|n| n.seq).collect::<Vec<_>>(), seqs[3..]);
    let live = put(&mut cb, "db", "after", "", json!({})).await.unwrap();
    assert_eq!(next_note(&mut on_b).await.seq, live.seq);
}

/// Concurrent BulkPuts from both nodes: Changes and the replayed event log
/// hold every seq from 1 to the last exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bulk_puts_from_both_nodes_leave_seqs_gap_free() {
    const TASKS: usize = 8;
    const BULKS: usize = 10;
    const DOCS: usize = 50;
    let (a, b, _dir) = two_nodes().await;
    let mut ca = a.client.clone();
    let db = create_db(&mut ca, "bulk").await;
    let tasks = (0..TASKS).map(|t| {
        let mut c = if t % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        tokio::spawn(async move {
            for k in 0..BULKS {
                let docs = (0..DOCS)
                    .map(|i| BulkPutItem {
                        id: format!("t{t}-b{k}-{i}"),
                        body: Some(body(json!({"i": i}))),
                        ..Default::default()
                    })
                    .collect();
                let results = c
                    .bulk_put(BulkPutRequest {
                        request_id: String::new(),
                        database: "bulk".into(),
                        docs,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .results;
                assert!(results.iter().all(|r| r.error.is_empty()), "{results:?}");
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    let total = (TASKS * BULKS * DOCS) as u64;
    let seqs = all_change_seqs(&a.client, "bulk").await;
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let mut replay = subscribe(&mut b.client.clone(), &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let replayed: Vec<u64> = notifications(&mut replay, total as usize)
        .await
        .iter()
        .map(|n| n.seq)
        .collect();
    assert_eq!(replayed, (1..=total).collect::<Vec<_>>());
}

/// kill -9 of a node under load: every write it acknowledged is in
/// PostgreSQL, and its subscriber, resuming on the other node with its
/// `since`, misses none of them and sees none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_nothing_and_its_subscribers_resume_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = ProcessServer::start(&path).await;
    let b = ProcessServer::start(&path).await;
    let mut ca = connect(a.addr).await;
    let db = create_db(&mut ca, "crash").await;
    let mut stream = subscribe(&mut ca, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let writers = (0..8).map(|w| {
        let addr = a.addr;
        tokio::spawn(async move {
            let mut c = connect(addr).await;
            let mut acked = Vec::new();
            // Bounded: stops at the kill, or after 20 000 writes.
            for n in 0..20_000 {
                match put(&mut c, "crash", &format!("w{w}-{n}"), "", json!({})).await {
                    Ok(r) => acked.push(r.seq),
                    Err(_) => break,
                }
            }
            acked
        })
    });
    let writers: Vec<_> = writers.collect();
    // Hear some, then kill A mid-load.
    let mut heard = BTreeSet::new();
    let mut since = 0;
    for n in notifications(&mut stream, 50).await {
        since = n.seq;
        heard.insert(n.seq);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill().await;
    let mut acked = BTreeSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    // The stream on A is cut; what it delivered before is in `heard`.
    while let Ok(Ok(Some(item))) =
        tokio::time::timeout(Duration::from_secs(2), stream.message()).await
    {
        if let Some(agsync::pb::subscribe_response::Event::Notification(n)) = item.event {
            since = n.seq;
            assert!(heard.insert(n.seq), "seq {} twice", n.seq);
        }
    }

    // Resumed on B: the rest, from `since`, exactly once.
    let mut cb = connect(b.addr).await;
    let last = *acked.last().unwrap();
    let mut resumed = subscribe(&mut cb, &[&db.sync_key], Some(since), "")
        .await
        .unwrap();
    while since < last {
        let n = next_note(&mut resumed).await;
        assert_eq!(n.seq, since + 1, "resumed on B: a gap or a duplicate");
        since = n.seq;
        heard.insert(n.seq);
    }
    for seq in &acked {
        assert!(
            heard.contains(seq),
            "acknowledged seq {seq} never delivered"
        );
    }
    // Every acknowledged write is readable on B.
    let stored: BTreeSet<u64> = all_change_seqs(&cb, "crash").await.into_iter().collect();
    assert!(acked.is_subset(&stored), "an acknowledged write is missing");
    let status = b.terminate().await;
    assert!(status.success(), "{status:?}");
}

/// PostgreSQL restarted under load (`pg_ctl stop -m fast`, then started
/// again once a call has seen it down): new calls fail with UNAVAILABLE
/// (never INTERNAL, within the connect timeout) while it is down, calls already queued fail
/// with UNAVAILABLE or wait for it, health says NOT_SERVING meanwhile, and the
/// node recovers by itself with nothing acknowledged lost; a subscriber
/// either rides it out or resumes with its `since`, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_load_loses_nothing() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        // That server is not ours to restart.
        return;
    }
    // A cluster of its own: restarting the suite's would break the tests
    // running beside this one.
    let cluster =
        Arc::new(crate::pg::OwnCluster::start().unwrap_or_else(|why| crate::pg::skip(&why)));
    let url = cluster.url("agsync");
    cluster.admin(&["CREATE DATABASE agsync"]).await;
    let node = || {
        let url = url.clone();
        TestServer::start_with(move |c| {
            c.db = url.into();
            c.pg_poll_interval_ms = Duration::from_millis(50);
        })
    };
    let (a, _b) = (node().await, node().await);
    let mut ca = a.client.clone();
    let db = create_db(&mut ca, "restart").await;
    let mut stream = subscribe(&mut ca, &[&db.sync_key], Some(0), "")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = a.client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut acked, mut unavailable) = (Vec::new(), 0);
                // Bounded by `stop` and by count.
                for n in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match put(&mut c, "restart", &format!("w{w}-{n}"), "", json!({})).await {
                        Ok(r) => acked.push(r.seq),
                        Err(s) => {
                            assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, unavailable)
            })
        })
        .collect();
    let mut health = HealthClient::new(a.channel().await);
    let not_serving_seen = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, seen) = (stop.clone(), not_serving_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = health.check(HealthCheckRequest::default()).await
                    && r.into_inner().status == ServingStatus::NotServing as i32
                {
                    seen.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop_fast())
        .await
        .unwrap();
    // While it is down, a new call fails with UNAVAILABLE: at once once the
    // node has seen it down, else within the writer's connect timeout (5 s);
    // the writers' calls already queued may also wait for it to come back.
    let refused_at_once = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = a.client.clone();
        loop {
            let started = std::time::Instant::now();
            match put(&mut c, "restart", "while-down", "", json!({})).await {
                Err(s) if s.code() == Code::Unavailable => break started.elapsed(),
                Err(s) => panic!("expected UNAVAILABLE, got {s:?}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("a call failed with UNAVAILABLE while PostgreSQL was down");
    assert!(
        refused_at_once < Duration::from_secs(8),
        "refused after {refused_at_once:?}"
    );
    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_again())
        .await
        .unwrap();
    // Writes succeed again on their own.
    let recovered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = a.client.clone();
        loop {
            if put(&mut c, "restart", "probe", "", json!({})).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(recovered.is_ok(), "the node did not recover");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let (mut acked, mut refused) = (BTreeSet::new(), 0);
    for w in writers {
        let (seqs, unavailable) = w.await.unwrap();
        acked.extend(seqs);
        refused += unavailable;
    }
    // The writers' own calls either failed with UNAVAILABLE (asserted in
    // each) or waited for PostgreSQL and succeeded.
    eprintln!("{refused} writes refused while PostgreSQL was down");
    assert!(
        not_serving_seen.load(Ordering::Relaxed),
        "health never said NOT_SERVING while PostgreSQL was down"
    );
    let last = *acked.last().unwrap();
    // The stream: delivered in order without gaps, resuming if it ended.
    let mut since = 0;
    while since < last {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(item))) => {
                if let Some(agsync::pb::subscribe_response::Event::Notification(n)) = item.event {
                    assert_eq!(n.seq, since + 1, "a gap or a duplicate");
                    since = n.seq;
                }
            }
            Ok(Err(s)) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                stream = subscribe(&mut ca, &[&db.sync_key], Some(since), "")
                    .await
                    .unwrap();
            }
            other => panic!("stream stalled at {since}: {other:?}"),
        }
    }
    let stored: BTreeSet<u64> = all_change_seqs(&ca, "restart").await.into_iter().collect();
    assert!(acked.is_subset(&stored), "an acknowledged write is missing");
}

/// A PostgreSQL-backed node reports its pool on `/metrics`.
#[tokio::test]
async fn a_postgresql_node_reports_its_pool() {
    let dir = tempfile::tempdir().unwrap();
    let node = ProcessServer::start_with(
        &dir.path().join("metrics"),
        &["--metrics-listen", "127.0.0.1:0", "--pg-pool-size", "4"],
        None,
    )
    .await;
    let mut c = connect(node.addr).await;
    create_db(&mut c, "cars").await;
    put(&mut c, "cars", "a", "", json!({})).await.unwrap();
    let page = crate::scrape::scrape(&node).await;
    let in_use = page.value("agsync_pg_pool_connections", &[("state", "in_use")]);
    let idle = page.value("agsync_pg_pool_connections", &[("state", "idle")]);
    // The pool holds at most --pg-pool-size + 1 connections, and at least
    // the one that served the writes.
    assert!(
        in_use + idle >= 1.0 && in_use + idle <= 5.0,
        "{in_use} + {idle}"
    );
    assert_eq!(page.value("agsync_writes_committed_total", &[]), 1.0);
    assert_eq!(page.value("agsync_head_seq", &[]), 1.0);
}

/// When PostgreSQL goes away, calls fail with UNAVAILABLE within 1 s: the
/// first read and the first write included, not only those made after the
/// node has noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_within_a_second_when_postgresql_goes_away() {
    if std::env::var_os("AGSYNC_TEST_POSTGRES_URL").is_some() {
        return; // that server is not ours to stop
    }
    let cluster =
        Arc::new(crate::pg::OwnCluster::start().unwrap_or_else(|why| crate::pg::skip(&why)));
    cluster.admin(&["CREATE DATABASE agsync"]).await;
    let url = cluster.url("agsync");
    let node = TestServer::start_with(move |c| c.db = url.into()).await;
    let mut c = node.client.clone();
    create_db(&mut c, "db").await;
    put(&mut c, "db", "x", "", json!({})).await.unwrap();
    get(&mut c, "db", "x").await.unwrap();

    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop_fast())
        .await
        .unwrap();
    for call in ["get", "put", "changes"] {
        let started = std::time::Instant::now();
        let status = match call {
            "get" => get(&mut c, "db", "x").await.map(|_| ()),
            "put" => put(&mut c, "db", "y", "", json!({})).await.map(|_| ()),
            _ => c
                .changes(ChangesRequest {
                    database: "db".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        }
        .expect_err("PostgreSQL is down");
        let took = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
        assert!(took < Duration::from_secs(1), "{call} took {took:?}");
    }
    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_again())
        .await
        .unwrap();
    let recovered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if put(&mut c, "db", "z", "", json!({})).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(recovered.is_ok(), "the node did not recover");
}
