//! Idempotent writes (AIP-155): a Put, Delete or BulkPut with a request_id
//! that already succeeded is answered with its first response and changes
//! nothing; a reuse with another request, a request_id too long, and a
//! failed request are told apart. Runs on SQLite and (tests/api_postgres)
//! on PostgreSQL; the two-node and kill -9 cases are below too.

use std::collections::BTreeSet;

use agsync::pb::{
    BulkPutItem, BulkPutRequest, CreateDatabaseRequest, DeleteDatabaseRequest, DeleteRequest,
    PutRequest,
};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

fn put_request(id: &str, rev: &str, body_json: Value, request_id: &str) -> PutRequest {
    PutRequest {
        database: "db".into(),
        id: id.into(),
        rev: rev.into(),
        body: Some(body(body_json)),
        request_id: request_id.into(),
        ..Default::default()
    }
}

async fn put_with(
    client: &mut Client,
    request: PutRequest,
) -> Result<agsync::pb::PutResponse, tonic::Status> {
    client.put(request).await.map(tonic::Response::into_inner)
}

/// Every change of "db", as (id, generation, seq).
async fn changes(client: &mut Client) -> Vec<(String, u64, u64)> {
    all_changes(client, "db")
        .await
        .into_iter()
        .map(|c| (c.id, generation(&c.rev), c.seq))
        .collect()
}

fn assert_reused(status: &tonic::Status, request_id: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("REQUEST_ID_REUSED carries ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("REQUEST_ID_REUSED", "agsync")
    );
    assert_eq!(info.metadata["request_id"], request_id);
    assert!(
        status
            .message()
            .contains("was already used for a different request"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_retried_put_gets_the_first_response_and_writes_once() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let db = create_db(&mut c, "db").await;
    let mut events = subscribe(&mut c, &[&db.sync_key], None, "").await.unwrap();
    next_subscribed(&mut events).await;

    let request = put_request("x", "", json!({"n": 1}), "req-1");
    let first = put_with(&mut c, request.clone()).await.unwrap();
    let retry = put_with(&mut c, request.clone()).await.unwrap();
    assert_eq!(retry, first);
    // An update with its own id, then the first retried again: still the
    // first response, though the document has moved on.
    let second = put_with(
        &mut c,
        put_request("x", &first.rev, json!({"n": 2}), "req-2"),
    )
    .await
    .unwrap();
    assert_eq!(put_with(&mut c, request).await.unwrap(), first);
    assert_eq!(
        changes(&mut c).await,
        [("x".to_owned(), 2, second.seq)],
        "one create and one update"
    );
    // One notification per write: the retries published nothing.
    assert_eq!(next_notification(&mut events).await.seq, first.seq);
    assert_eq!(next_notification(&mut events).await.seq, second.seq);
    let marker = put(&mut c, "db", "marker", "", json!({})).await.unwrap();
    assert_eq!(next_notification(&mut events).await.seq, marker.seq);
}

#[tokio::test]
async fn request_id_rules_too_long_reused_and_failed() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;

    // 128 bytes is accepted; 129 is INVALID_ARGUMENT and writes nothing.
    let longest = "r".repeat(128);
    put_with(&mut c, put_request("a", "", json!({}), &longest))
        .await
        .unwrap();
    let too_long = put_with(&mut c, put_request("b", "", json!({}), &"r".repeat(129))).await;
    assert_status(
        too_long,
        Code::InvalidArgument,
        "request_id: is 129 bytes long; at most 128",
    );
    assert_status(get(&mut c, "db", "b").await, Code::NotFound, "\"b\"");

    // The same id with another body, id, rev, or as a Delete: refused,
    // nothing changes.
    let first = put_with(&mut c, put_request("x", "", json!({"n": 1}), "same"))
        .await
        .unwrap();
    for other in [
        put_request("x", "", json!({"n": 2}), "same"),
        put_request("y", "", json!({"n": 1}), "same"),
        put_request("x", &first.rev, json!({"n": 1}), "same"),
    ] {
        assert_reused(&put_with(&mut c, other).await.unwrap_err(), "same");
    }
    let delete = c
        .delete(DeleteRequest {
            database: "db".into(),
            id: "x".into(),
            rev: first.rev.clone(),
            request_id: "same".into(),
            ..Default::default()
        })
        .await;
    assert_reused(&delete.unwrap_err(), "same");
    assert_eq!(get(&mut c, "db", "x").await.unwrap().rev, first.rev);
    assert_status(get(&mut c, "db", "y").await, Code::NotFound, "\"y\"");

    // A failed request records nothing: its id is free for the next one.
    let stale = put_with(&mut c, put_request("x", "", json!({"n": 3}), "free")).await;
    assert_status(stale, Code::Aborted, "conflict");
    let ok = put_with(
        &mut c,
        put_request("x", &first.rev, json!({"n": 3}), "free"),
    )
    .await
    .unwrap();
    assert_eq!(generation(&ok.rev), 2);
    // A missing database too.
    let mut missing = put_request("z", "", json!({}), "nodb");
    missing.database = "nope".into();
    assert_status(put_with(&mut c, missing).await, Code::NotFound, "nope");
    let mut now_ok = put_request("z", "", json!({}), "nodb");
    now_ok.database = "db".into();
    put_with(&mut c, now_ok).await.unwrap();
}

#[tokio::test]
async fn a_retried_delete_and_bulk_put_get_their_first_responses() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let x = put(&mut c, "db", "x", "", json!({"n": 1})).await.unwrap();
    let taken = put(&mut c, "db", "taken", "", json!({})).await.unwrap();

    let delete = DeleteRequest {
        database: "db".into(),
        id: "x".into(),
        rev: x.rev.clone(),
        request_id: "del-1".into(),
        ..Default::default()
    };
    let first = c.delete(delete.clone()).await.unwrap().into_inner();
    // Without the id, a second delete would be NOT_FOUND.
    assert_eq!(c.delete(delete).await.unwrap().into_inner(), first);

    // A BulkPut with a server-chosen id, a conflict and an invalid item.
    let bulk = BulkPutRequest {
        database: "db".into(),
        docs: vec![
            BulkPutItem {
                body: Some(body(json!({"fresh": true}))),
                ..Default::default()
            },
            BulkPutItem {
                id: "taken".into(),
                body: Some(body(json!({"n": 2}))),
                ..Default::default()
            },
            BulkPutItem {
                id: "bad".into(),
                body: Some(body(json!({"_reserved": 1}))),
                ..Default::default()
            },
            BulkPutItem {
                id: "y".into(),
                body: Some(body(json!({"n": 3}))),
                ..Default::default()
            },
        ],
        request_id: "bulk-1".into(),
    };
    let first = c.bulk_put(bulk.clone()).await.unwrap().into_inner();
    let errors: Vec<&str> = first.results.iter().map(|r| r.error.as_str()).collect();
    assert_eq!(errors, ["", "conflict", "invalid", ""]);
    let before = changes(&mut c).await;
    let retry = c.bulk_put(bulk.clone()).await.unwrap().into_inner();
    assert_eq!(retry, first, "the same ids, revs, seqs and errors");
    assert_eq!(changes(&mut c).await, before, "nothing written again");
    assert_eq!(get(&mut c, "db", "taken").await.unwrap().rev, taken.rev);
    // Other items under the same id: refused.
    let mut other = bulk;
    other.docs.pop();
    assert_reused(&c.bulk_put(other).await.unwrap_err(), "bulk-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_make_one_write_and_get_one_answer() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let request = put_request("x", "", json!({"n": 1}), "race");
    let answers = futures::future::join_all((0..16).map(|_| {
        let (mut c, request) = (srv.client.clone(), request.clone());
        tokio::spawn(async move { put_with(&mut c, request).await.unwrap() })
    }))
    .await;
    let answers: BTreeSet<(String, String, u64)> = answers
        .into_iter()
        .map(|a| {
            let a = a.unwrap();
            (a.id, a.rev, a.seq)
        })
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (_, rev, seq) = answers.into_iter().next().unwrap();
    assert_eq!(changes(&mut c).await, [("x".to_owned(), 1, seq)]);
    assert_eq!(generation(&rev), 1);
}

#[tokio::test]
async fn ids_are_per_database_instance_and_survive_a_restart() {
    let mut srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let request = put_request("x", "", json!({"n": 1}), "keep");
    let first = put_with(&mut c, request.clone()).await.unwrap();

    srv.restart().await;
    let mut c = srv.client.clone();
    assert_eq!(put_with(&mut c, request.clone()).await.unwrap(), first);

    // DeleteDatabase drops the ids: in a new "db", the same request runs.
    c.delete_database(DeleteDatabaseRequest { name: "db".into() })
        .await
        .unwrap();
    c.create_database(CreateDatabaseRequest {
        name: "db".into(),
        sync_key: String::new(),
    })
    .await
    .unwrap();
    let again = put_with(&mut c, request).await.unwrap();
    assert!(again.seq > first.seq, "{again:?} vs {first:?}");
    assert_eq!(changes(&mut c).await, [("x".to_owned(), 1, again.seq)]);
}

/// kill -9 right after the write was acknowledged: the retry, on the
/// restarted server, gets the same answer and writes nothing.
#[tokio::test]
async fn a_retry_after_kill_9_gets_the_first_response() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agsync.db");
    let server = ProcessServer::start(&path).await;
    let mut c = connect(server.addr).await;
    create_db(&mut c, "db").await;
    let request = put_request("x", "", json!({"n": 1}), "crash");
    let first = put_with(&mut c, request.clone()).await.unwrap();
    server.kill().await;

    let server = ProcessServer::start(&path).await;
    let mut c = connect(server.addr).await;
    assert_eq!(put_with(&mut c, request).await.unwrap(), first);
    assert_eq!(changes(&mut c).await, [("x".to_owned(), 1, first.seq)]);
}

/// With --auth the key is (database, principal): two principals' ids never
/// meet.
#[tokio::test]
async fn each_principal_has_its_own_request_ids() {
    const ALICE: &str = "Bearer alice-token-0123456789";
    const BOB: &str = "Bearer bob-token-0123456789";
    const ADMIN: &str = "Bearer admin-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let hash = |t: &str| agsync::auth::hash_token(t.strip_prefix("Bearer ").unwrap());
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[token]]\nprincipal = \"admin\"\nhash = \"{}\"\nadmin = true\n\n\
             [[token]]\nprincipal = \"alice\"\nhash = \"{}\"\nread = [\"db\"]\nwrite = [\"db\"]\n\n\
             [[token]]\nprincipal = \"bob\"\nhash = \"{}\"\nread = [\"db\"]\nwrite = [\"db\"]\n",
            hash(ADMIN),
            hash(ALICE),
            hash(BOB)
        ),
    )
    .unwrap();
    let srv = TestServer::start_with(|c| c.auth = Some(auth)).await;
    let mut c = srv.client.clone();
    c.create_database(with_token(
        CreateDatabaseRequest {
            name: "db".into(),
            sync_key: String::new(),
        },
        Some(ADMIN),
    ))
    .await
    .unwrap();
    let alices = c
        .put(with_token(
            put_request("a", "", json!({}), "shared"),
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    // Bob's request under the same id is his own, not a reuse of Alice's.
    let bobs = c
        .put(with_token(
            put_request("b", "", json!({}), "shared"),
            Some(BOB),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(alices.seq, bobs.seq);
    let retry = c
        .put(with_token(
            put_request("a", "", json!({}), "shared"),
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, alices);
}

#[tokio::test]
async fn deduplicated_requests_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = ProcessServer::start_with(
        &dir.path().join("m"),
        &["--metrics-listen", "127.0.0.1:0"],
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    create_db(&mut c, "db").await;
    let request = put_request("x", "", json!({}), "counted");
    for _ in 0..3 {
        put_with(&mut c, request.clone()).await.unwrap();
    }
    let page = crate::scrape::scrape(&server).await;
    assert_eq!(page.value("agsync_requests_deduplicated_total", &[]), 2.0);
    assert_eq!(page.value("agsync_writes_committed_total", &[]), 1.0);
}
