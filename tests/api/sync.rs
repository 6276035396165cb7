use std::time::Duration;

use agsync::pb::subscribe_response::Event;
use agsync::pb::{
    BulkPutItem, BulkPutRequest, ChangesRequest, CreateDatabaseRequest, DeleteRequest,
};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

async fn create_db_with_key(c: &mut Client, name: &str, key: &str) {
    c.create_database(CreateDatabaseRequest {
        name: name.into(),
        sync_key: key.into(),
    })
    .await
    .unwrap();
}

async fn changes(
    c: &mut Client,
    db: &str,
    since: u64,
    limit: u32,
    include_docs: bool,
) -> agsync::pb::ChangesResponse {
    c.changes(ChangesRequest {
        database: db.into(),
        since,
        limit,
        include_docs,
        json_bodies: false,
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn changes_lists_each_document_once_at_its_latest_seq() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    create_db(&mut c, "other").await;
    let a1 = put(&mut c, "db", "a", "", json!({"v": 1})).await.unwrap();
    let b1 = put(&mut c, "db", "b", "", json!({"v": 1})).await.unwrap();
    put(&mut c, "other", "x", "", json!({})).await.unwrap();
    let a2 = put(&mut c, "db", "a", &a1.rev, json!({"v": 2}))
        .await
        .unwrap();
    let c1 = put(&mut c, "db", "c", "", json!({"v": 1})).await.unwrap();
    let b_del = c
        .delete(DeleteRequest {
            request_id: String::new(),
            database: "db".into(),
            id: "b".into(),
            rev: b1.rev.clone(),
            notify_aliases: vec![],
        })
        .await
        .unwrap()
        .into_inner();

    let all = changes(&mut c, "db", 0, 0, true).await;
    let summary: Vec<_> = all
        .changes
        .iter()
        .map(|ch| {
            (
                ch.id.as_str(),
                ch.seq,
                ch.deleted,
                ch.body.as_ref().map(json),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", a2.seq, false, Some(json!({"v": 2}))),
            ("c", c1.seq, false, Some(json!({"v": 1}))),
            ("b", b_del.seq, true, None),
        ]
    );
    assert_eq!(all.changes[2].rev, b_del.rev);
    assert_eq!(all.last_seq, b_del.seq);

    // Without include_docs there are no bodies.
    let plain = changes(&mut c, "db", 0, 0, false).await;
    assert!(plain.changes.iter().all(|ch| ch.body.is_none()));

    // Paging with limit and last_seq.
    let page1 = changes(&mut c, "db", 0, 2, false).await;
    assert_eq!(page1.changes.len(), 2);
    assert_eq!(page1.last_seq, c1.seq);
    let page2 = changes(&mut c, "db", page1.last_seq, 2, false).await;
    assert_eq!(
        page2
            .changes
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        vec!["b"]
    );
    let page3 = changes(&mut c, "db", page2.last_seq, 2, false).await;
    assert!(page3.changes.is_empty());
    assert_eq!(
        page3.last_seq, page2.last_seq,
        "last_seq is since when nothing changed"
    );

    assert_status(
        c.changes(ChangesRequest {
            database: "db".into(),
            since: 0,
            limit: 10_001,
            include_docs: false,
            json_bodies: false,
        })
        .await,
        Code::InvalidArgument,
        "10001 is over the maximum page size of 10000",
    );
    assert_status(
        c.changes(ChangesRequest {
            database: "nodb".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "database \"nodb\" does not exist",
    );
}

#[tokio::test]
async fn live_notifications_for_writes_and_notify() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "cal", "org.devnexus.sync.UserCalendar").await;
    let before = put(&mut c, "cal", "e0", "", json!({})).await.unwrap();

    let mut stream = subscribe(&mut c, &["org.devnexus.sync.UserCalendar"], None, "")
        .await
        .unwrap();
    assert_eq!(next_subscribed(&mut stream).await, before.seq);

    let p = put(&mut c, "cal", "e1", "", json!({"title": "talk"}))
        .await
        .unwrap();
    let n = next_notification(&mut stream).await;
    assert_eq!(
        (
            n.sync_key.as_str(),
            n.seq,
            n.database.as_str(),
            n.id.as_str(),
            n.rev.as_str(),
            n.deleted
        ),
        (
            "org.devnexus.sync.UserCalendar",
            p.seq,
            "cal",
            "e1",
            p.rev.as_str(),
            false
        )
    );
    assert!(n.attributes.is_empty());

    let d = c
        .delete(DeleteRequest {
            request_id: String::new(),
            database: "cal".into(),
            id: "e1".into(),
            rev: p.rev,
            notify_aliases: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let n = next_notification(&mut stream).await;
    assert_eq!(
        (n.seq, n.rev.as_str(), n.deleted),
        (d.seq, d.rev.as_str(), true)
    );

    let seq = notify(
        &mut c,
        "org.devnexus.sync.UserCalendar",
        &[],
        &[("reason", "reindex")],
    )
    .await;
    let n = next_notification(&mut stream).await;
    assert_eq!(
        (n.seq, n.database.as_str(), n.id.as_str(), n.rev.as_str()),
        (seq, "", "", "")
    );
    assert_eq!(
        n.attributes.get("reason").map(String::as_str),
        Some("reindex")
    );
    assert_eq!(seq, d.seq + 1, "Notify takes a seq from the same counter");
}

#[tokio::test]
async fn only_subscribed_keys_are_delivered() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "a", "key.a").await;
    create_db_with_key(&mut c, "b", "key.b").await;
    create_db_with_key(&mut c, "c", "key.c").await;
    let mut only_a = subscribe(&mut c, &["key.a"], None, "").await.unwrap();
    let mut a_and_c = subscribe(&mut c, &["key.c", "key.a", "key.a"], None, "")
        .await
        .unwrap();
    next_subscribed(&mut only_a).await;
    next_subscribed(&mut a_and_c).await;

    let b = put(&mut c, "b", "x", "", json!({})).await.unwrap();
    let cc = put(&mut c, "c", "x", "", json!({})).await.unwrap();
    let a = put(&mut c, "a", "x", "", json!({})).await.unwrap();
    assert!(b.seq < cc.seq && cc.seq < a.seq);
    // The first thing each stream sees is the first event for its keys.
    assert_eq!(next_notification(&mut only_a).await.seq, a.seq);
    assert_eq!(next_notification(&mut a_and_c).await.seq, cc.seq);
    assert_eq!(
        next_notification(&mut a_and_c).await.seq,
        a.seq,
        "no duplicate for a repeated key"
    );
}

#[tokio::test]
async fn aliases_restrict_the_audience() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "cal", "cal").await;
    let mut bob = subscribe(&mut c, &["cal"], None, "bob").await.unwrap();
    let mut alice = subscribe(&mut c, &["cal"], None, "alice").await.unwrap();
    let mut anonymous = subscribe(&mut c, &["cal"], None, "").await.unwrap();
    for s in [&mut bob, &mut alice, &mut anonymous] {
        next_subscribed(s).await;
    }
    let for_bob = c
        .put(agsync::pb::PutRequest {
            request_id: String::new(),
            database: "cal".into(),
            id: "x".into(),
            rev: String::new(),
            body: Some(body(json!({}))),
            notify_aliases: vec!["bob".into(), "carol".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let for_all = notify(&mut c, "cal", &[], &[]).await;
    let for_alice = notify(&mut c, "cal", &["alice"], &[]).await;

    assert_eq!(next_notification(&mut bob).await.seq, for_bob.seq);
    assert_eq!(next_notification(&mut bob).await.seq, for_all);
    assert_eq!(next_notification(&mut alice).await.seq, for_all);
    assert_eq!(next_notification(&mut alice).await.seq, for_alice);
    assert_eq!(next_notification(&mut anonymous).await.seq, for_all);

    // The same audiences apply on replay.
    let mut bob_replay = subscribe(&mut c, &["cal"], Some(0), "bob").await.unwrap();
    assert_eq!(next_notification(&mut bob_replay).await.seq, for_bob.seq);
    assert_eq!(next_notification(&mut bob_replay).await.seq, for_all);
    assert_eq!(next_subscribed(&mut bob_replay).await, for_alice);
    let mut anon_replay = subscribe(&mut c, &["cal"], Some(0), "").await.unwrap();
    assert_eq!(next_notification(&mut anon_replay).await.seq, for_all);
    assert_eq!(next_subscribed(&mut anon_replay).await, for_alice);
}

/// A replay over several keys: the events of exactly those keys, each once,
/// in seq order across the keys (the log is read for all of them at once).
#[tokio::test]
async fn replay_over_several_keys_is_in_seq_order() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    for (db, key) in [("a", "key.a"), ("b", "key.b"), ("c", "key.c")] {
        create_db_with_key(&mut c, db, key).await;
    }
    let mut want = Vec::new();
    for i in 0..30 {
        let db = ["a", "b", "c"][i % 3];
        let seq = put(&mut c, db, &format!("d{i}"), "", json!({}))
            .await
            .unwrap()
            .seq;
        if db != "b" {
            want.push((db, seq));
        }
    }
    let mut stream = subscribe(&mut c, &["key.c", "key.a"], Some(0), "")
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        match next_event(&mut stream).await {
            Event::Notification(n) => got.push((n.database.clone(), n.seq)),
            Event::Subscribed(s) => {
                assert_eq!(s.head_seq, want.last().unwrap().1, "head is the last write");
                break;
            }
            Event::Progress(_) => panic!("no progress expected"),
        }
    }
    let want: Vec<(String, u64)> = want.into_iter().map(|(d, s)| (d.to_owned(), s)).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn replay_with_since_then_live() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "a", "key.a").await;
    create_db_with_key(&mut c, "b", "key.b").await;
    let mut seqs_a = Vec::new();
    for i in 0..10 {
        seqs_a.push(
            put(&mut c, "a", &format!("d{i}"), "", json!({}))
                .await
                .unwrap()
                .seq,
        );
        put(&mut c, "b", &format!("d{i}"), "", json!({}))
            .await
            .unwrap();
    }
    let since = seqs_a[3];
    let mut stream = subscribe(&mut c, &["key.a"], Some(since), "")
        .await
        .unwrap();
    for want in &seqs_a[4..] {
        assert_eq!(next_notification(&mut stream).await.seq, *want);
    }
    let head = next_subscribed(&mut stream).await;
    assert_eq!(
        head,
        seqs_a[9] + 1,
        "head is the newest seq (key.b's last write)"
    );
    let live = put(&mut c, "a", "live", "", json!({})).await.unwrap();
    assert_eq!(next_notification(&mut stream).await.seq, live.seq);

    // Across a restart the log is still there.
    srv.restart().await;
    let mut c = srv.client.clone();
    let mut stream = subscribe(&mut c, &["key.a"], Some(since), "")
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        match next_event(&mut stream).await {
            Event::Notification(n) => got.push(n.seq),
            Event::Subscribed(s) => {
                assert_eq!(s.head_seq, live.seq);
                break;
            }
            Event::Progress(_) => panic!("no progress expected"),
        }
    }
    let mut want = seqs_a[4..].to_vec();
    want.push(live.seq);
    assert_eq!(got, want);
}

/// Subscribing with `since` while writers run: every event after `since`
/// arrives exactly once, in order, across the replay/live hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_has_no_gap_and_no_duplicate_under_concurrent_writes() {
    const WRITES: u64 = 600;
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "db", "k").await;
    let first = put(&mut c, "db", "first", "", json!({})).await.unwrap();
    let writer = {
        let mut c = connect(srv.addr).await;
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..WRITES {
                last = put(&mut c, "db", &format!("d{i}"), "", json!({"i": i}))
                    .await
                    .unwrap()
                    .seq;
            }
            last
        })
    };
    // Subscribe several times while the writes are in flight.
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(
            subscribe(&mut c, &["k"], Some(first.seq), "")
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = writer.await.unwrap();
    for mut stream in streams {
        let mut expected = first.seq + 1;
        let mut subscribed = false;
        while expected <= last {
            match next_event(&mut stream).await {
                Event::Notification(n) => {
                    assert_eq!(n.seq, expected, "gap or duplicate");
                    expected += 1;
                }
                Event::Subscribed(s) => {
                    assert!(!subscribed, "subscribed twice");
                    assert!(s.head_seq >= expected - 1 && s.head_seq <= last);
                    subscribed = true;
                }
                Event::Progress(_) => {}
            }
        }
        if !subscribed {
            assert_eq!(next_subscribed(&mut stream).await, last);
        }
    }
}

/// A subscriber that reads nothing while thousands of writes happen is not
/// cut off and misses nothing: it later reads every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_catches_up_without_loss() {
    const DOCS: u64 = 5000;
    let srv = TestServer::start_with(|c| c.subscriber_buffer = 8).await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "db", "k").await;
    let mut slow = subscribe(&mut c, &["k"], None, "").await.unwrap();
    let head = next_subscribed(&mut slow).await;
    let mut fast = subscribe(&mut c, &["k"], None, "").await.unwrap();
    next_subscribed(&mut fast).await;

    // Writers are not held up by the subscriber that reads nothing.
    for chunk in 0..(DOCS / 500) {
        let docs = (0..500)
            .map(|i| BulkPutItem {
                id: format!("d{chunk}-{i}"),
                rev: String::new(),
                body: Some(body(json!({"pad": "x".repeat(200)}))),
                notify_aliases: vec![],
            })
            .collect();
        let results = c
            .bulk_put(BulkPutRequest {
                request_id: String::new(),
                database: "db".into(),
                docs,
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(results.iter().all(|r| r.error.is_empty()));
        // The fast subscriber keeps up meanwhile.
        for r in &results {
            assert_eq!(next_notification(&mut fast).await.seq, r.seq);
        }
    }
    // Now the slow one reads everything, in order, without gaps.
    for want in head + 1..=head + DOCS {
        assert_eq!(next_notification(&mut slow).await.seq, want);
    }
    let after = put(&mut c, "db", "after", "", json!({})).await.unwrap();
    assert_eq!(next_notification(&mut slow).await.seq, after.seq);
}

#[tokio::test]
async fn since_outside_the_log_is_out_of_range() {
    let srv = TestServer::start_with(|c| c.retain_events = 10).await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "db", "k").await;
    let mut last = 0;
    for i in 0..50 {
        last = put(&mut c, "db", &format!("d{i}"), "", json!({}))
            .await
            .unwrap()
            .seq;
    }
    assert_eq!(last, 50);
    let status = subscribe(&mut c, &["k"], Some(5), "").await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert!(
        status.message().contains(
            "since=5 is older than the event log's retention (the oldest event kept is seq 41)"
        ),
        "{}",
        status.message()
    );
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        (info.reason.as_str(), info.metadata["oldest_seq"].as_str()),
        ("SINCE_TOO_OLD", "41")
    );

    // The oldest resumable position works and replays the retained events.
    let mut stream = subscribe(&mut c, &["k"], Some(40), "").await.unwrap();
    for want in 41..=50 {
        assert_eq!(next_notification(&mut stream).await.seq, want);
    }
    assert_eq!(next_subscribed(&mut stream).await, 50);

    assert_status(
        subscribe(&mut c, &["k"], Some(51), "").await,
        Code::OutOfRange,
        "since=51 is ahead",
    );
    // Changes is not limited by the event log's retention.
    assert_eq!(changes(&mut c, "db", 0, 0, false).await.changes.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_all_receive_an_event() {
    const STREAMS: usize = 1000;
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "db", "k").await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(srv.addr).await);
    }
    let mut streams = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let mut stream = subscribe(&mut clients[i % 10], &["k"], None, "")
            .await
            .unwrap();
        next_subscribed(&mut stream).await;
        streams.push(stream);
    }
    let p = put(&mut c, "db", "x", "", json!({})).await.unwrap();
    let received = futures::future::join_all(
        streams
            .iter_mut()
            .map(|s| async move { next_notification(s).await.seq }),
    )
    .await;
    assert_eq!(received.len(), STREAMS);
    assert!(received.iter().all(|seq| *seq == p.seq));
}

#[tokio::test]
async fn idle_streams_get_progress() {
    let srv =
        TestServer::start_with(|c| c.progress_interval_secs = Duration::from_millis(200)).await;
    let mut c = srv.client.clone();
    create_db_with_key(&mut c, "a", "key.a").await;
    create_db_with_key(&mut c, "b", "key.b").await;
    let mut stream = subscribe(&mut c, &["key.a"], None, "").await.unwrap();
    assert_eq!(next_subscribed(&mut stream).await, 0);
    // Traffic on another key only: the stream learns the head moved.
    let b = put(&mut c, "b", "x", "", json!({})).await.unwrap();
    loop {
        match next_event(&mut stream).await {
            Event::Progress(p) if p.head_seq == b.seq => break,
            Event::Progress(p) => assert!(p.head_seq < b.seq),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_subscribe_and_notify_requests() {
    let srv = TestServer::start_with(|c| c.max_subscribe_keys = 3).await;
    let mut c = srv.client.clone();
    let long_key = "k".repeat(257);
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec![], "", "sync_keys: at least one sync key is required"),
        (vec!["a", "b", "c", "d"], "", "4 sync keys given; at most 3"),
        (
            vec!["a", &long_key],
            "",
            "sync_keys[1]: sync key is 257 bytes long",
        ),
        (
            vec!["a b"],
            "",
            "sync_keys[0]: sync key \"a b\" contains ' '",
        ),
        (vec![""], "", "sync_keys[0]: the sync key must not be empty"),
        (
            vec!["a"],
            "bad alias",
            "alias: alias \"bad alias\" contains ' '",
        ),
    ];
    for (keys, alias, needle) in cases {
        assert_status(
            subscribe(&mut c, &keys, None, alias).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let notify_req =
        |key: &str, aliases: Vec<String>, attrs: Vec<(String, String)>| agsync::pb::NotifyRequest {
            sync_key: key.into(),
            aliases,
            attributes: attrs.into_iter().collect(),
        };
    assert_status(
        c.notify(notify_req("", vec![], vec![])).await,
        Code::InvalidArgument,
        "sync_key: the sync key must not be empty",
    );
    assert_status(
        c.notify(notify_req("k", vec!["".into()], vec![])).await,
        Code::InvalidArgument,
        "aliases[0]: the alias must not be empty",
    );
    let many: Vec<(String, String)> = (0..257).map(|i| (format!("k{i}"), String::new())).collect();
    assert_status(
        c.notify(notify_req("k", vec![], many)).await,
        Code::InvalidArgument,
        "257 attributes given; at most 256",
    );
    assert_status(
        c.notify(notify_req(
            "k",
            vec![],
            vec![("big".into(), "x".repeat(70_000))],
        ))
        .await,
        Code::ResourceExhausted,
        "over the limit of 65536 bytes",
    );
    // Nothing was logged by the bad requests.
    assert_eq!(notify(&mut c, "k", &[], &[]).await, 1);
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let mut stream = subscribe(&mut c, &["k"], None, "").await.unwrap();
    next_subscribed(&mut stream).await;
    let seq = notify(&mut c, "k", &[], &[]).await;
    assert_eq!(next_notification(&mut stream).await.seq, seq);
    srv.stop().await;
    let status = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends promptly")
        .expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status
            .message()
            .contains(&format!("subscribe again with since={seq}")),
        "{}",
        status.message()
    );
}
