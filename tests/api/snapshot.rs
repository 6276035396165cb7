//! Snapshot: every live document as of one seq, streamed, and the hand-off
//! from it to Changes and Subscribe at that seq.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agsync::pb::{self, BulkPutItem, BulkPutRequest, DeleteRequest, SnapshotRequest};
use prost::Message;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

/// One acknowledged write, as its writer saw it.
#[derive(Debug, Clone, PartialEq)]
struct Write {
    id: String,
    rev: String,
    seq: u64,
    deleted: bool,
    body: Value,
}

/// A document as a snapshot (or a replica) holds it.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    rev: String,
    seq: u64,
    body: Value,
}

/// Applies one write to a replica: a deletion removes the document.
fn apply(state: &mut BTreeMap<String, Held>, id: &str, deleted: bool, held: impl FnOnce() -> Held) {
    if deleted {
        state.remove(id);
    } else {
        state.insert(id.to_owned(), held());
    }
}

/// The live documents after `writes` up to `through`, by id.
fn state_at(writes: &[Write], through: u64) -> BTreeMap<String, Held> {
    let mut sorted: Vec<&Write> = writes.iter().filter(|w| w.seq <= through).collect();
    sorted.sort_by_key(|w| w.seq);
    let mut state = BTreeMap::new();
    for w in sorted {
        apply(&mut state, &w.id, w.deleted, || Held {
            rev: w.rev.clone(),
            seq: w.seq,
            body: w.body.clone(),
        });
    }
    state
}

/// The body of a change, from `body` or `body_json`.
fn change_body(c: &pb::Change) -> Value {
    match &c.body {
        Some(b) => json(b),
        None => serde_json::from_str(&c.body_json).expect("body_json is JSON"),
    }
}

/// Fills `db` with `n` documents "p{i}" of about `pad` bytes each (BulkPuts
/// of 500); returns the writes.
async fn fill(client: &mut Client, db: &str, n: usize, pad: usize) -> Vec<Write> {
    let mut writes = Vec::new();
    for start in (0..n).step_by(500) {
        let docs = (start..(start + 500).min(n))
            .map(|i| BulkPutItem {
                id: format!("p{i:05}"),
                body: Some(body(json!({"i": i, "pad": "x".repeat(pad)}))),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let bodies: Vec<Value> = docs
            .iter()
            .map(|d| json(d.body.as_ref().unwrap()))
            .collect();
        let results = client
            .bulk_put(BulkPutRequest {
                database: db.into(),
                docs,
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        for (r, body) in results.into_iter().zip(bodies) {
            assert!(r.error.is_empty(), "{r:?}");
            writes.push(Write {
                id: r.id,
                rev: r.rev,
                seq: r.seq,
                deleted: false,
                body,
            });
        }
    }
    writes
}

async fn delete(
    client: &mut Client,
    db: &str,
    id: &str,
    rev: &str,
) -> Result<Write, tonic::Status> {
    let r = client
        .delete(DeleteRequest {
            database: db.into(),
            id: id.into(),
            rev: rev.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Write {
        id: r.id,
        rev: r.rev,
        seq: r.seq,
        deleted: true,
        body: Value::Null,
    })
}

/// Reads a whole Snapshot stream, `pause` between messages.
async fn read_snapshot(
    client: &mut Client,
    db: &str,
    json_bodies: bool,
    pause: Duration,
) -> Vec<pb::SnapshotResponse> {
    let mut stream = client
        .snapshot(SnapshotRequest {
            database: db.into(),
            json_bodies,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("a message within 30 s")
        .unwrap()
    {
        messages.push(m);
        tokio::time::sleep(pause).await;
    }
    messages
}

/// Checks the framing of a stream's messages; returns its seq and changes.
fn unpack(messages: &[pb::SnapshotResponse], max_bytes: usize) -> (u64, Vec<pb::Change>) {
    let last = messages.last().expect("at least one message");
    assert!(last.complete, "the last message is complete");
    let seq = last.snapshot_seq;
    let created = last.database_created_seq;
    let mut changes = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.snapshot_seq, seq, "message {i}: one snapshot_seq");
        assert_eq!(m.database_created_seq, created, "message {i}");
        assert_eq!(
            m.complete,
            i + 1 == messages.len(),
            "message {i}: complete only on the last"
        );
        assert!(
            m.encoded_len() <= max_bytes,
            "message {i} is {} bytes, over --max-response-bytes",
            m.encoded_len()
        );
        if i + 1 < messages.len() {
            assert!(
                !m.changes.is_empty(),
                "message {i}: only the last may be empty"
            );
        }
        changes.extend(m.changes.iter().cloned());
    }
    for pair in changes.windows(2) {
        assert!(
            pair[0].seq < pair[1].seq,
            "seq order: {} then {}",
            pair[0].seq,
            pair[1].seq
        );
    }
    for c in &changes {
        assert!(!c.deleted && c.seq <= seq, "{c:?} in a snapshot at {seq}");
    }
    (seq, changes)
}

fn held(changes: &[pb::Change]) -> BTreeMap<String, Held> {
    changes
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                Held {
                    rev: c.rev.clone(),
                    seq: c.seq,
                    body: change_body(c),
                },
            )
        })
        .collect()
}

/// While three clients write (creates, updates, deletes), a slowly read
/// snapshot holds exactly the live documents as of its seq S; Subscribe
/// (since=S) then replays exactly the writes after S, and the snapshot
/// plus Changes(since=S) is the database's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_the_state_at_its_seq_and_subscribe_goes_on_from_there() {
    const MAX_RESPONSE: usize = 64 * 1024;
    let srv = TestServer::start_with(|c| c.max_response_bytes = MAX_RESPONSE).await;
    let mut c = srv.client.clone();
    let key = create_db(&mut c, "snap").await.sync_key;
    let mut writes = fill(&mut c, "snap", 3000, 150).await;
    for i in 0..100 {
        let doc = writes[i].clone();
        writes.push(delete(&mut c, "snap", &doc.id, &doc.rev).await.unwrap());
    }

    // Writers: each updates, deletes and recreates its own ids and some
    // of the filled ones, 150 writes each.
    let writers = (0..3).map(|w| {
        let mut c = c.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..150usize {
                let id = if n % 3 == 0 {
                    format!("p{:05}", 100 + w * 700 + n)
                } else {
                    format!("w{w}-{}", n % 20)
                };
                let current = get(&mut c, "snap", &id).await.ok();
                let write = match current {
                    Some(doc) if n % 5 == 4 => delete(&mut c, "snap", &id, &doc.rev).await.unwrap(),
                    current => {
                        let b = json!({"w": w, "n": n});
                        let rev = current.map(|d| d.rev).unwrap_or_default();
                        let r = put(&mut c, "snap", &id, &rev, b.clone()).await.unwrap();
                        Write {
                            id: r.id,
                            rev: r.rev,
                            seq: r.seq,
                            deleted: false,
                            body: b,
                        }
                    }
                };
                mine.push(write);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            mine
        })
    });
    let writers: Vec<_> = writers.collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let messages = read_snapshot(&mut c, "snap", false, Duration::from_millis(30)).await;
    for w in writers {
        writes.extend(w.await.unwrap());
    }
    let (s, changes) = unpack(&messages, MAX_RESPONSE);
    assert!(
        messages.len() >= 5,
        "{} messages: the 64 KiB budget splits them",
        messages.len()
    );
    let head = writes.iter().map(|w| w.seq).max().unwrap();
    assert!(
        s > 3100 && s < head,
        "the snapshot ({s}) was taken while the writers wrote (last seq {head})"
    );

    // Exactly the state at S.
    assert_eq!(held(&changes), state_at(&writes, s));

    // Subscribe(since=S) replays exactly the writes after S.
    let mut events = subscribe(&mut c, &[&key], Some(s), "").await.unwrap();
    let mut heard = Vec::new();
    loop {
        match next_event(&mut events).await {
            pb::subscribe_response::Event::Notification(n) => {
                heard.push((n.id, n.rev, n.seq, n.deleted))
            }
            pb::subscribe_response::Event::Subscribed(_) => break,
            pb::subscribe_response::Event::Progress(_) => {}
        }
    }
    let mut after: Vec<_> = writes
        .iter()
        .filter(|w| w.seq > s)
        .map(|w| (w.id.clone(), w.rev.clone(), w.seq, w.deleted))
        .collect();
    after.sort_by_key(|w| w.2);
    assert!(!after.is_empty());
    assert_eq!(heard, after);

    // The snapshot, then Changes(since=S): the final state.
    let mut replica = held(&changes);
    for ch in changes_after(&c, "snap", s, true).await {
        apply(&mut replica, &ch.id, ch.deleted, || Held {
            rev: ch.rev.clone(),
            seq: ch.seq,
            body: change_body(&ch),
        });
    }
    assert_eq!(replica, state_at(&writes, u64::MAX));
}

/// With json_bodies, bodies come as canonical JSON text (keys sorted) in
/// body_json, on Snapshot and on Changes; without it, as Structs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_come_as_canonical_json_text() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "j").await;
    put(
        &mut c,
        "j",
        "a",
        "",
        json!({"z": 1, "a": [true, null, "s"], "m": {"y": 2.5, "b": "t"}}),
    )
    .await
    .unwrap();
    let gone = put(&mut c, "j", "b", "", json!({})).await.unwrap();
    delete(&mut c, "j", "b", &gone.rev).await.unwrap();
    let text = r#"{"a":[true,null,"s"],"m":{"b":"t","y":2.5},"z":1}"#;

    let (_, changes) = unpack(
        &read_snapshot(&mut c, "j", true, Duration::ZERO).await,
        4 << 20,
    );
    assert_eq!(changes.len(), 1, "the deleted document is left out");
    assert_eq!(
        (changes[0].id.as_str(), changes[0].body_json.as_str()),
        ("a", text)
    );
    assert_eq!(changes[0].body, None);

    let (_, structs) = unpack(
        &read_snapshot(&mut c, "j", false, Duration::ZERO).await,
        4 << 20,
    );
    assert_eq!(structs[0].body_json, "");
    assert_eq!(
        change_body(&structs[0]),
        serde_json::from_str::<Value>(text).unwrap()
    );

    let page = |json_bodies| {
        let mut c = c.clone();
        async move {
            c.changes(pb::ChangesRequest {
                database: "j".into(),
                include_docs: true,
                json_bodies,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .changes
        }
    };
    let listed = page(true).await;
    assert_eq!(
        (listed[0].body_json.as_str(), listed[0].body.is_none()),
        (text, true)
    );
    assert_eq!(
        (
            listed[1].id.as_str(),
            listed[1].deleted,
            listed[1].body_json.as_str()
        ),
        ("b", true, "")
    );
    let listed = page(false).await;
    assert_eq!(
        (listed[0].body_json.as_str(), listed[0].body.is_some()),
        ("", true)
    );
}

/// An empty database is one complete message at the current head; a
/// missing one is NOT_FOUND; a bad name is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_missing_and_invalid_databases() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "full").await;
    let w = put(&mut c, "full", "a", "", json!({})).await.unwrap();
    let created = create_db(&mut c, "empty").await;
    let messages = read_snapshot(&mut c, "empty", false, Duration::ZERO).await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].complete && messages[0].changes.is_empty());
    assert_eq!(messages[0].snapshot_seq, created.created_seq.max(w.seq));
    assert_eq!(messages[0].database_created_seq, created.created_seq);

    let open = |db: &str| {
        let mut c = c.clone();
        let db = db.to_owned();
        async move {
            c.snapshot(SnapshotRequest {
                database: db,
                json_bodies: false,
            })
            .await
            .map(|_| ())
        }
    };
    assert_status(open("nope").await, Code::NotFound, "nope");
    assert_status(open("Bad Name").await, Code::InvalidArgument, "database");
}

/// Fills "big" with about 8 MB: more than the server and the connection
/// buffer, so a stream not read stops its reader.
async fn big(srv: &TestServer) -> Vec<Write> {
    let mut c = srv.client.clone();
    create_db(&mut c, "big").await;
    fill(&mut c, "big", 2000, 4000).await
}

/// A snapshot not read for --snapshot-stall-secs ends with UNAVAILABLE
/// (SNAPSHOT_STALLED, `since` = the seq of the last document sent); the
/// documents received plus Changes(since) are the whole database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_snapshot_ends_and_changes_goes_on_from_its_since() {
    let srv = TestServer::start_with(|c| {
        c.snapshot_stall_secs = Duration::from_secs(1);
        c.max_response_bytes = 256 * 1024;
    })
    .await;
    let writes = big(&srv).await;
    let mut c = srv.client.clone();
    let mut stream = c
        .snapshot(SnapshotRequest {
            database: "big".into(),
            json_bodies: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = vec![stream.message().await.unwrap().unwrap()];
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => received.push(m),
            Ok(None) => panic!("the stream completed although it was not read for 4 s"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("not read for 1 s"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SNAPSHOT_STALLED");
    let got: Vec<pb::Change> = received.iter().flat_map(|m| m.changes.clone()).collect();
    let since: u64 = info.metadata["since"].parse().unwrap();
    assert_eq!(
        since,
        got.last().unwrap().seq,
        "since is the last seq received"
    );
    assert!(
        got.len() < writes.len(),
        "the stream stopped early ({} documents)",
        got.len()
    );
    assert!(
        status
            .message()
            .contains(&format!("Changes(since={since})"))
    );

    let mut all: Vec<String> = got.iter().map(|ch| ch.id.clone()).collect();
    all.extend(
        all_changes(&c, "big")
            .await
            .into_iter()
            .filter(|ch| ch.seq > since)
            .map(|ch| ch.id),
    );
    let expected: Vec<String> = writes.iter().map(|w| w.id.clone()).collect();
    assert_eq!(all, expected);
}

/// Past --max-snapshots, a Snapshot waits --read-timeout-secs for a slot,
/// then fails with UNAVAILABLE naming the flag; once the open one ends, a
/// new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_past_the_limit_are_refused_with_unavailable() {
    let srv = TestServer::start_with(|c| {
        c.max_snapshots = 1;
        c.read_timeout_secs = Duration::from_secs(1);
    })
    .await;
    big(&srv).await;
    let mut c = srv.client.clone();
    let open = || {
        let mut c = c.clone();
        async move {
            c.snapshot(SnapshotRequest {
                database: "big".into(),
                json_bodies: false,
            })
            .await
        }
    };
    let held = open().await.unwrap();
    let started = Instant::now();
    assert_status(
        open().await.map(|_| ()),
        Code::Unavailable,
        "--max-snapshots",
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited for a slot"
    );
    drop(held);
    // The reader notices its consumer left at its next chunk.
    let messages = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match open().await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut n = 0;
                    while stream.message().await.unwrap().is_some() {
                        n += 1;
                    }
                    return n;
                }
                Err(s) => assert_eq!(s.code(), Code::Unavailable, "{}", s.message()),
            }
        }
    })
    .await
    .expect("a snapshot is served once the first one ended");
    assert!(messages > 1);
    let _ = c.list_databases(pb::ListDatabasesRequest {}).await.unwrap();
}

/// An open snapshot (a long read transaction) does not hold up writes:
/// the writer's WAL restart gives up quickly instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_a_snapshot_is_open() {
    crate::sqlite_only!();
    let srv = TestServer::start_with(|c| c.wal_max_bytes = 1024 * 1024).await;
    big(&srv).await;
    let mut c = srv.client.clone();
    let stream = c
        .snapshot(SnapshotRequest {
            database: "big".into(),
            json_bodies: false,
        })
        .await
        .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        put(
            &mut c,
            "big",
            &format!("during{i}"),
            "",
            json!({"pad": "y".repeat(10_000)}),
        )
        .await
        .unwrap();
        slowest = slowest.max(started.elapsed());
    }
    drop(stream);
    // Waiting out the reader (10 s busy timeout) would take seconds.
    assert!(slowest < Duration::from_secs(2), "a write took {slowest:?}");
}
