//! Database instances (delete, re-create) as syncing clients see them, and
//! how streams end at shutdown.

use std::time::Duration;

use agsync::pb::subscribe_response::Event;
use agsync::pb::{BulkPutItem, BulkPutRequest, ChangesRequest, DeleteDatabaseRequest};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

async fn delete_db(c: &mut Client, name: &str) {
    c.delete_database(DeleteDatabaseRequest { name: name.into() })
        .await
        .expect("delete database");
}

#[tokio::test]
async fn a_deleted_database_is_announced_and_its_successor_is_a_new_instance() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let first = create_db(&mut c, "cars").await;
    assert_eq!(first.created_seq, 0);
    let x = put(&mut c, "cars", "x", "", json!({"a": 1})).await.unwrap();
    let mut live = subscribe(&mut c, &["cars"], None, "").await.unwrap();
    next_subscribed(&mut live).await;

    delete_db(&mut c, "cars").await;
    let gone = next_notification(&mut live).await;
    assert_eq!(
        gone,
        agsync::pb::Notification {
            sync_key: "cars".into(),
            seq: x.seq + 1,
            database: "cars".into(),
            deleted: true,
            database_deleted: true,
            ..Default::default()
        }
    );

    let second = create_db(&mut c, "cars").await;
    assert_eq!(second.created_seq, gone.seq);
    assert_eq!((second.doc_count, second.update_seq), (0, 0));
    // A client that synced the old instance up to x.seq sees that its
    // `since` is older than the instance: it drops its copy.
    let page = c
        .changes(ChangesRequest {
            database: "cars".into(),
            since: x.seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.database_created_seq, second.created_seq);
    assert!(x.seq < page.database_created_seq);
    assert!(page.changes.is_empty());

    let y = put(&mut c, "cars", "y", "", json!({"b": 2})).await.unwrap();
    assert_eq!(next_notification(&mut live).await.seq, y.seq);
    // A client resuming from 0 replays the old write, the deletion, the new write.
    let mut resumed = subscribe(&mut c, &["cars"], Some(0), "").await.unwrap();
    let mut replayed = Vec::new();
    for _ in 0..3 {
        let n = next_notification(&mut resumed).await;
        replayed.push((n.seq, n.id, n.database_deleted));
    }
    assert_eq!(
        replayed,
        [
            (x.seq, "x".to_owned(), false),
            (gone.seq, String::new(), true),
            (y.seq, "y".to_owned(), false)
        ]
    );
    assert_eq!(next_subscribed(&mut resumed).await, y.seq);
    let listed = c
        .list_databases(agsync::pb::ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .databases;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].doc_count,
            listed[0].update_seq,
            listed[0].created_seq
        ),
        (1, y.seq, gone.seq)
    );
}

/// SIGTERM while a subscriber is replaying a long log: the stream ends at
/// once with UNAVAILABLE naming the seq to resume from, and resuming from it
/// after the restart delivers the rest exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_replay_names_the_since_that_resumes_exactly() {
    const DOCS: u64 = 20_000;
    let mut srv = TestServer::start_with(|c| c.subscriber_replay_bytes = 16 * 1024).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    for chunk in 0..DOCS / 500 {
        let docs = (0..500)
            .map(|i| BulkPutItem {
                id: format!("d{chunk}-{i}"),
                body: Some(body(json!({}))),
                ..Default::default()
            })
            .collect();
        c.bulk_put(BulkPutRequest {
            request_id: String::new(),
            database: "db".into(),
            docs,
        })
        .await
        .unwrap();
    }
    let mut stream = subscribe(&mut c, &["db"], Some(0), "").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(next_notification(&mut stream).await.seq);
    }
    // Stop reading: the server's replay stalls on flow control, mid-log.
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.begin_stop();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(msg)) => match msg.event {
                    Some(Event::Notification(n)) => seen.push(n.seq),
                    other => panic!("unexpected {other:?} during the replay"),
                },
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends promptly at shutdown");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    let since: u64 = info.metadata["since"].parse().unwrap();
    assert_eq!(since, *seen.last().unwrap());
    assert!(status.message().contains(&format!("since={since}")));
    assert!(since < DOCS, "the shutdown came mid-replay (at {since})");

    srv.restart().await;
    let mut c = srv.client.clone();
    let mut resumed = subscribe(&mut c, &["db"], Some(since), "").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), resumed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .event
        {
            Some(Event::Notification(n)) => seen.push(n.seq),
            Some(Event::Subscribed(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (1..=DOCS).collect::<Vec<_>>());
}
