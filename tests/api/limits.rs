//! Budgets and bounds: response size, read connections, calls in flight,
//! the WAL.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agsync::pb::{BulkPutItem, BulkPutRequest, ChangesRequest, ListDatabasesRequest};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

/// `n` documents of about `bytes` bytes each, written with BulkPut.
async fn fill(c: &mut Client, db: &str, n: usize, bytes: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let docs = chunk
            .iter()
            .map(|i| BulkPutItem {
                id: format!("doc{i:05}"),
                body: Some(body(json!({"n": i, "text": "x".repeat(bytes)}))),
                ..Default::default()
            })
            .collect();
        let r = c
            .bulk_put(BulkPutRequest {
                request_id: String::new(),
                database: db.into(),
                docs,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.error.is_empty()));
    }
}

/// A page of 1,000 documents of 5 KB is over the 4 MiB default receive
/// limit of gRPC clients: the server ends it early, and paging with
/// `last_seq` still reads every document exactly once.
#[tokio::test]
async fn changes_pages_fit_the_default_client_receive_limit() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "big").await;
    fill(&mut c, "big", 1000, 5000).await;
    // A tonic client keeps its default 4 MiB decoding limit.
    let mut reader = connect(srv.addr).await;
    let mut since = 0;
    let mut seen = HashSet::new();
    let mut pages = Vec::new();
    loop {
        let page = reader
            .changes(ChangesRequest {
                database: "big".into(),
                since,
                limit: 1000,
                include_docs: true,
                json_bodies: false,
            })
            .await
            .expect("a page within the client's receive limit")
            .into_inner();
        if page.changes.is_empty() {
            assert_eq!(page.last_seq, since);
            break;
        }
        assert!(prost::Message::encoded_len(&page) <= 4 * 1024 * 1024);
        pages.push(page.changes.len());
        for change in &page.changes {
            assert!(seen.insert(change.id.clone()), "{} twice", change.id);
            assert!(change.body.is_some());
        }
        assert_eq!(page.last_seq, page.changes.last().unwrap().seq);
        since = page.last_seq;
    }
    assert_eq!(seen.len(), 1000);
    assert!(pages.len() >= 2, "the first page ended early: {pages:?}");
    assert!(pages[0] < 1000 && pages[0] > 500, "{pages:?}");
}

/// One change bigger than the budget still comes alone: a page always holds
/// at least one change.
#[tokio::test]
async fn a_page_holds_at_least_one_change() {
    let srv = TestServer::start_with(|c| c.max_response_bytes = 1000).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    fill(&mut c, "db", 3, 2000).await;
    let mut since = 0;
    for expected in ["doc00000", "doc00001", "doc00002"] {
        let page = c
            .changes(ChangesRequest {
                database: "db".into(),
                since,
                include_docs: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<_> = page.changes.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, [expected]);
        since = page.last_seq;
    }
}

/// With a single read connection every kind of read works, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_connection_serves_every_read() {
    let srv = TestServer::start_with(|c| c.read_connections = 1).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    fill(&mut c, "db", 50, 10).await;
    let reads = (0..8).map(|i| {
        let mut c = c.clone();
        async move {
            get(&mut c, "db", &format!("doc{i:05}")).await.unwrap();
            c.list_databases(ListDatabasesRequest {}).await.unwrap();
            let page = c
                .changes(ChangesRequest {
                    database: "db".into(),
                    include_docs: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.changes.len(), 50);
            let mut s = subscribe(&mut c, &["db"], Some(0), "").await.unwrap();
            for _ in 0..50 {
                next_notification(&mut s).await;
            }
            next_subscribed(&mut s).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(reads))
        .await
        .expect("reads finish well before the pool's acquire timeout");
}

/// Past `--max-in-flight`, calls fail at once with UNAVAILABLE (retryable)
/// and the server stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_in_flight_cap_are_unavailable() {
    let srv = TestServer::start_with(|c| c.max_in_flight = 2).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let puts = (0..64).map(|i| {
        let mut c = c.clone();
        async move { put(&mut c, "db", &format!("p{i}"), "", json!({"i": i})).await }
    });
    let results = futures::future::join_all(puts).await;
    let mut refused = 0;
    for r in results {
        match r {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                assert!(s.message().contains("--max-in-flight"), "{}", s.message());
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "64 concurrent Puts with a cap of 2");
    assert!(refused < 64);
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "agsync.v1.SyncService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Under sustained writes the WAL stays under `--wal-max-bytes`, and it is
/// truncated once writes pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_under_its_bound_and_is_truncated_when_idle() {
    crate::sqlite_only!();
    const BOUND: u64 = 1024 * 1024;
    let srv = TestServer::start_with(|c| c.wal_max_bytes = BOUND).await;
    let wal = srv.db_path().with_extension("db-wal");
    let wal_len = {
        let wal = wal.clone();
        move || std::fs::metadata(&wal).map_or(0, |m| m.len())
    };
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    // A task samples the WAL while four clients write at once.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (done, wal_len) = (done.clone(), wal_len.clone());
        async move {
            let mut largest = 0;
            while !done.load(Ordering::Relaxed) {
                largest = largest.max(wal_len());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            largest
        }
    });
    let writers = (0..4).map(|w| {
        let mut c = c.clone();
        async move {
            for i in 0..50 {
                put(
                    &mut c,
                    "db",
                    &format!("w{w}-d{i}"),
                    "",
                    json!({"text": "y".repeat(50_000)}),
                )
                .await
                .unwrap();
            }
        }
    });
    futures::future::join_all(writers).await;
    done.store(true, Ordering::Relaxed);
    let largest = sampler.await.unwrap();
    // 10 MB were written through a WAL bounded to 1 MiB.
    assert!(largest > 0 && largest <= BOUND, "largest WAL {largest}");
    tokio::time::timeout(Duration::from_secs(10), async {
        while wal_len() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the WAL is truncated once writes pause");
}

/// Requests over 64 KiB pass the large-message budget: of several 15 MiB
/// BulkPuts at once on one connection, more than the budget holds, those
/// that do not fit are refused at once with UNAVAILABLE (never left waiting
/// with their bytes in the connection's window, which would stall the
/// admitted ones), and all succeed when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_past_the_budget_are_refused_and_succeed_on_retry() {
    let srv = TestServer::start_with(|c| c.max_large_request_bytes = 32 * 1024 * 1024).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "bulk").await;
    let text = "b".repeat(100 * 1024);
    let calls = (0..6).map(|k| {
        let mut c = c.clone();
        let text = text.clone();
        async move {
            let mut refused = 0;
            loop {
                let docs = (0..150)
                    .map(|i| BulkPutItem {
                        id: format!("k{k}-{i}"),
                        body: Some(body(json!({"text": text}))),
                        ..Default::default()
                    })
                    .collect();
                match c
                    .bulk_put(BulkPutRequest {
                        request_id: String::new(),
                        database: "bulk".into(),
                        docs,
                    })
                    .await
                {
                    Ok(r) => return (r.into_inner().results.len(), refused),
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                        assert!(
                            s.message().contains("--max-large-request-bytes"),
                            "{}",
                            s.message()
                        );
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(calls))
        .await
        .expect("large BulkPuts complete");
    for (written, _) in &results {
        assert_eq!(*written, 150);
    }
    // Six 15 MiB requests at once against a 32 MiB budget: some waited
    // their turn by being refused.
    assert!(results.iter().map(|(_, refused)| refused).sum::<usize>() > 0);
    let page = c
        .changes(ChangesRequest {
            database: "bulk".into(),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.changes.len(), 900);
}

/// A gateway multiplexes thousands of Subscribe streams on one connection:
/// with the default per-connection limit (--max-subscribers plus
/// --max-in-flight) 5,000 streams opened at once on one HTTP/2 connection
/// all open. (With hyper's default 1 MiB connection window, h2's guard
/// against floods of small DATA frames closed the connection with
/// ENHANCE_YOUR_CALM after about 2,000: each request's message waits as a
/// small frame until its call reads it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_thousands_of_streams_by_default() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut streams = Vec::new();
    for _ in 0..5_000 {
        let mut c = Client::new(channel.clone());
        streams.push(tokio::spawn(async move {
            let mut stream = subscribe(&mut c, &["gateway.key"], None, "").await.unwrap();
            next_subscribed(&mut stream).await;
            stream
        }));
    }
    let mut open = Vec::new();
    for s in streams {
        open.push(
            tokio::time::timeout(Duration::from_secs(60), s)
                .await
                .expect("every stream opens")
                .unwrap(),
        );
    }
    assert_eq!(open.len(), 5_000);
}

/// A connection at --max-concurrent-streams: its client holds the next
/// call back (HTTP/2), and the server says so once, in its log and in
/// agsync_connection_streams_full_total; the held call proceeds when one
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_the_per_connection_limit_is_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = ProcessServer::start_with(
        &dir.path().join("db"),
        &[
            "--max-concurrent-streams",
            "4",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        None,
    )
    .await;
    let channel = channel(server.addr).await;
    let mut c = Client::new(channel.clone());
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = subscribe(&mut c, &["k"], None, "").await.unwrap();
        next_subscribed(&mut stream).await;
        streams.push(stream);
    }
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_connection_streams_full_total", &[]), 0.0);
    let mut fourth = None;
    server
        .logs_after("--max-concurrent-streams calls open", || {
            fourth = Some(tokio::spawn({
                let mut c = c.clone();
                async move {
                    let mut s = subscribe(&mut c, &["k"], None, "").await.unwrap();
                    next_subscribed(&mut s).await;
                    s
                }
            }));
        })
        .await;
    streams.push(fourth.unwrap().await.unwrap());
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_connection_streams_full_total", &[]), 1.0);
    // A fifth call on the same connection waits in the client...
    let mut fifth = tokio::spawn({
        let mut c = c.clone();
        async move { c.new_id(agsync::pb::NewIdRequest { count: 1 }).await }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fifth)
            .await
            .is_err(),
        "a call past the limit was not held back"
    );
    // ...until a stream ends.
    drop(streams.pop());
    let id = tokio::time::timeout(Duration::from_secs(10), fifth)
        .await
        .expect("the held call proceeds once a stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(id.into_inner().ids.len(), 1);
}

/// Past --max-subscribers a Subscribe is refused with RESOURCE_EXHAUSTED
/// carrying RetryInfo (retryable after a delay) and ErrorInfo
/// SUBSCRIBERS_FULL; it succeeds once another stream has closed.
#[tokio::test]
async fn subscribers_past_the_cap_are_told_to_retry() {
    use tonic_types::StatusExt;
    let server = TestServer::start_with(|c| c.max_subscribers = 2).await;
    let mut c = server.client.clone();
    let mut first = subscribe(&mut c, &["k"], None, "").await.unwrap();
    next_subscribed(&mut first).await;
    let _second = subscribe(&mut c, &["k"], None, "").await.unwrap();
    let refused = subscribe(&mut c, &["k"], None, "").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("2 open subscriptions")
            && refused.message().contains("--max-subscribers")
            && refused.message().contains("retry"),
        "{}",
        refused.message()
    );
    assert_eq!(
        refused.get_details_error_info().expect("ErrorInfo").reason,
        "SUBSCRIBERS_FULL"
    );
    let retry = refused.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
    drop(first);
    let started = std::time::Instant::now();
    loop {
        match subscribe(&mut c, &["k"], None, "").await {
            Ok(_) => break,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(started.elapsed() < Duration::from_secs(5), "never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
