use agsync::pb::{DeleteRequest, NewIdRequest, PutRequest};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

/// The design note's session: create a database, get an id, create the car,
/// update it with rev 1, a stale rev 1 conflicts, Get shows rev 2.
#[tokio::test]
async fn design_note_session() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "cars").await;
    let id = c
        .new_id(NewIdRequest { count: 0 })
        .await
        .unwrap()
        .into_inner()
        .ids
        .remove(0);

    let v1 = put(
        &mut c,
        "cars",
        &id,
        "",
        json!({"model": "Mustang", "year": 1969}),
    )
    .await
    .unwrap();
    assert_eq!(v1.id, id);
    assert!(v1.rev.starts_with("1-") && v1.rev.len() == 34, "{}", v1.rev);

    let v2 = put(
        &mut c,
        "cars",
        &id,
        &v1.rev,
        json!({"model": "Mustang", "year": 1970}),
    )
    .await
    .unwrap();
    assert_eq!(generation(&v2.rev), 2);
    assert!(v2.seq > v1.seq);

    let stale = put(&mut c, "cars", &id, &v1.rev, json!({"model": "Camaro"})).await;
    let status = stale.expect_err("a stale rev must conflict");
    assert!(
        status.message().starts_with("Document update conflict"),
        "{}",
        status.message()
    );
    let details = conflict_details(&status);
    assert_eq!(details.info.reason, "CONFLICT");
    assert_eq!(details.info.domain, "agsync");
    assert_eq!(details.info.metadata["current_rev"], v2.rev);
    assert_eq!(details.info.metadata["id"], id);
    assert_eq!(details.info.metadata["database"], "cars");
    let current = details
        .current
        .expect("the current document in the details");
    assert_eq!(
        (current.rev.as_str(), current.seq),
        (v2.rev.as_str(), v2.seq)
    );
    assert_eq!(
        json(current.body.as_ref().unwrap()),
        json!({"model": "Mustang", "year": 1970})
    );

    let doc = get(&mut c, "cars", &id).await.unwrap();
    assert_eq!(
        (doc.id.as_str(), doc.rev.as_str(), doc.seq),
        (id.as_str(), v2.rev.as_str(), v2.seq)
    );
    assert_eq!(
        json(doc.body.as_ref().unwrap()),
        json!({"model": "Mustang", "year": 1970})
    );
}

#[tokio::test]
async fn create_conflicts_with_live_document() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let v1 = put(&mut c, "db", "x", "", json!({"a": 1})).await.unwrap();
    let status = put(&mut c, "db", "x", "", json!({"a": 2}))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("but the request sent no rev;"),
        "{}",
        status.message()
    );
    let details = conflict_details(&status);
    assert_eq!(details.info.metadata["current_rev"], v1.rev);
    assert_eq!(details.current.unwrap().rev, v1.rev);
    // A rev on a document that does not exist is a conflict too (as CouchDB).
    let status = put(&mut c, "db", "nope", &v1.rev, json!({}))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("does not exist"),
        "{}",
        status.message()
    );
    let details = conflict_details(&status);
    assert_eq!(details.info.metadata["current_rev"], "");
    assert!(details.current.is_none());
    // Nothing changed.
    assert_eq!(get(&mut c, "db", "x").await.unwrap().rev, v1.rev);
    assert_status(get(&mut c, "db", "nope").await, Code::NotFound, "\"nope\"");
}

#[tokio::test]
async fn delete_leaves_tombstone_and_recreate_continues_generation() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let v1 = put(&mut c, "db", "x", "", json!({"a": 1})).await.unwrap();
    let v2 = put(&mut c, "db", "x", &v1.rev, json!({"a": 2}))
        .await
        .unwrap();
    let del = |rev: &str| DeleteRequest {
        request_id: String::new(),
        database: "db".into(),
        id: "x".into(),
        rev: rev.into(),
        notify_aliases: vec![],
    };

    // Delete needs the current rev.
    let status = c.delete(del(&v1.rev)).await.unwrap_err();
    assert_eq!(
        conflict_details(&status).info.metadata["current_rev"],
        v2.rev
    );
    let status = c.delete(del("")).await.unwrap_err();
    assert_eq!(conflict_details(&status).current.unwrap().rev, v2.rev);

    let tomb = c.delete(del(&v2.rev)).await.unwrap().into_inner();
    assert_eq!((tomb.id.as_str(), generation(&tomb.rev)), ("x", 3));
    assert!(tomb.seq > v2.seq);
    assert_status(
        get(&mut c, "db", "x").await,
        Code::NotFound,
        "missing or deleted",
    );
    assert_status(c.delete(del(&tomb.rev)).await, Code::NotFound, "\"x\"");
    assert_status(c.delete(del("")).await, Code::NotFound, "\"x\"");

    // An update naming an old rev of a deleted document conflicts, with the
    // tombstone's rev and no document in the details.
    let status = put(&mut c, "db", "x", &v2.rev, json!({}))
        .await
        .unwrap_err();
    let details = conflict_details(&status);
    assert_eq!(details.info.metadata["current_rev"], tomb.rev);
    assert!(details.current.is_none());

    // Recreating continues from the tombstone.
    let v4 = put(&mut c, "db", "x", "", json!({"a": 4})).await.unwrap();
    assert_eq!(generation(&v4.rev), 4);
    let doc = get(&mut c, "db", "x").await.unwrap();
    assert_eq!(
        (doc.rev, json(doc.body.as_ref().unwrap())),
        (v4.rev, json!({"a": 4}))
    );
}

#[tokio::test]
async fn revisions_are_deterministic() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "one").await;
    create_db(&mut c, "two").await;
    let body_a = json!({"b": [1, 2.5, "x", null, true], "a": {"z": 1, "y": 2}});
    let body_a_reordered = json!({"a": {"y": 2, "z": 1}, "b": [1, 2.5, "x", null, true]});
    let r1 = put(&mut c, "one", "d", "", body_a.clone()).await.unwrap();
    let r2 = put(&mut c, "two", "d", "", body_a_reordered).await.unwrap();
    assert_eq!(r1.rev, r2.rev, "same edit from the same parent, same rev");
    let u1 = put(&mut c, "one", "d", &r1.rev, json!({"v": 2}))
        .await
        .unwrap();
    let u2 = put(&mut c, "two", "d", &r2.rev, json!({"v": 3}))
        .await
        .unwrap();
    assert_ne!(u1.rev, u2.rev, "different bodies, different revs");
    assert_eq!(generation(&u1.rev), 2);
    // The same body again is still a new revision (new parent).
    let u3 = put(&mut c, "one", "d", &u1.rev, json!({"v": 2}))
        .await
        .unwrap();
    assert_ne!(u3.rev, u1.rev);
    // Numbers survive the round trip; integral ones stay integral.
    let doc = get(&mut c, "one", "d").await.unwrap();
    assert_eq!(json(doc.body.as_ref().unwrap()), json!({"v": 2}));
    let doc = get(&mut c, "two", "d").await.unwrap();
    assert_eq!(doc.rev, u2.rev);
}

#[tokio::test]
async fn seqs_are_global_and_strictly_increasing() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "a").await;
    create_db(&mut c, "b").await;
    let mut last = 0;
    for i in 0..10 {
        let db = if i % 2 == 0 { "a" } else { "b" };
        let r = put(&mut c, db, &format!("d{i}"), "", json!({"i": i}))
            .await
            .unwrap();
        assert_eq!(r.seq, last + 1, "seqs are consecutive across databases");
        last = r.seq;
    }
    // Failed writes do not take a seq.
    put(&mut c, "a", "d0", "", json!({})).await.unwrap_err();
    let r = put(&mut c, "a", "new", "", json!({})).await.unwrap();
    assert_eq!(r.seq, last + 1);
}

#[tokio::test]
async fn new_id_counts_and_format() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    let ids = |n| NewIdRequest { count: n };
    assert_eq!(c.new_id(ids(0)).await.unwrap().into_inner().ids.len(), 1);
    let first = c.new_id(ids(1000)).await.unwrap().into_inner().ids;
    let second = c.new_id(ids(5)).await.unwrap().into_inner().ids;
    assert_eq!((first.len(), second.len()), (1000, 5));
    let all: Vec<&String> = first.iter().chain(&second).collect();
    for id in &all {
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );
        assert_eq!(&id[12..13], "7", "UUID version 7: {id}");
    }
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "unique and time-ordered"
    );
    assert_status(
        c.new_id(ids(1001)).await,
        Code::InvalidArgument,
        "1001 ids requested; at most 1000",
    );
}

#[tokio::test]
async fn bad_writes_are_rejected_and_change_nothing() {
    let srv = TestServer::start_with(|c| {
        c.max_document_bytes = 1000;
        c.max_json_depth = 10;
    })
    .await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let v1 = put(&mut c, "db", "x", "", json!({"keep": true}))
        .await
        .unwrap();
    let nan = prost_types::Struct {
        fields: [(
            "n".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    };
    let no_kind = prost_types::Struct {
        fields: [("k".to_owned(), prost_types::Value { kind: None })].into(),
    };
    let mut deep = json!({});
    for _ in 0..11 {
        deep = json!({ "d": deep });
    }
    let req = |db: &str, id: &str, rev: &str, b: Option<prost_types::Struct>| PutRequest {
        request_id: String::new(),
        database: db.into(),
        id: id.into(),
        rev: rev.into(),
        body: b,
        notify_aliases: vec![],
    };
    let ok_body = || Some(body(json!({"a": 1})));
    let cases: Vec<(PutRequest, Code, &str)> = vec![
        (
            req("", "x", "", ok_body()),
            Code::InvalidArgument,
            "database: a database name is required",
        ),
        (
            req("Db", "x", "", ok_body()),
            Code::InvalidArgument,
            "must start with a lowercase letter",
        ),
        (
            req("nodb", "x", "", ok_body()),
            Code::NotFound,
            "database \"nodb\" does not exist",
        ),
        (
            req("db", "", "", ok_body()),
            Code::InvalidArgument,
            "id: a document id is required",
        ),
        (
            req("db", "_x", "", ok_body()),
            Code::InvalidArgument,
            "starts with '_', which is reserved",
        ),
        (
            req("db", &"i".repeat(1025), "", ok_body()),
            Code::InvalidArgument,
            "1025 bytes long",
        ),
        (
            req("db", "x", "2", ok_body()),
            Code::InvalidArgument,
            "rev: \"2\" is not a revision",
        ),
        (
            req("db", "x", "1-ABC", ok_body()),
            Code::InvalidArgument,
            "is not a revision",
        ),
        (
            req("db", "x", &v1.rev, None),
            Code::InvalidArgument,
            "body: a body is required",
        ),
        (
            req("db", "x", &v1.rev, Some(body(json!({"_id": "x"})))),
            Code::InvalidArgument,
            "top-level key \"_id\"",
        ),
        (
            req("db", "x", &v1.rev, Some(nan)),
            Code::InvalidArgument,
            "body.n: NaN is not a JSON number",
        ),
        (
            req("db", "x", &v1.rev, Some(no_kind)),
            Code::InvalidArgument,
            "body.k: a google.protobuf.Value without a kind",
        ),
        (
            req("db", "x", &v1.rev, Some(body(deep))),
            Code::InvalidArgument,
            "12 levels deep; at most 10",
        ),
        (
            req(
                "db",
                "x",
                &v1.rev,
                Some(body(json!({"big": "x".repeat(1000)}))),
            ),
            Code::ResourceExhausted,
            "over the limit of 1000 bytes",
        ),
    ];
    for (request, code, needle) in cases {
        let what = format!("{:?}/{:?}", request.database, request.id.get(..20));
        let result = c.put(request).await;
        assert!(result.is_err(), "{what} should fail");
        assert_status(result, code, needle);
    }
    let mut bad_alias = req("db", "x", &v1.rev, ok_body());
    bad_alias.notify_aliases = vec!["ok".into(), "not ok".into()];
    assert_status(
        c.put(bad_alias).await,
        Code::InvalidArgument,
        "notify_aliases[1]",
    );

    let doc = get(&mut c, "db", "x").await.unwrap();
    assert_eq!((doc.rev, doc.seq), (v1.rev, v1.seq), "nothing was written");
    assert_status(
        get(&mut c, "db", "").await,
        Code::InvalidArgument,
        "id: a document id is required",
    );
}

#[tokio::test]
async fn oversized_request_is_refused_by_transport() {
    let srv = TestServer::start_with(|c| c.max_request_bytes = 64 * 1024).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let result = put(&mut c, "db", "big", "", json!({"x": "y".repeat(100_000)})).await;
    // RESOURCE_EXHAUSTED, as the gRPC spec says (tonic's own code would be
    // OUT_OF_RANGE; the server rewrites it).
    assert_status(result, Code::ResourceExhausted, "the limit is: 65536 bytes");
    assert_status(get(&mut c, "db", "big").await, Code::NotFound, "\"big\"");
    // The server keeps serving.
    put(&mut c, "db", "small", "", json!({"x": 1}))
        .await
        .unwrap();
}

/// 32 clients update one document with CAS retry loops: no update is lost,
/// and the final generation is 1 + the number of successful updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_updates_lose_nothing() {
    const CLIENTS: usize = 32;
    const UPDATES_EACH: usize = 5;
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    put(&mut c, "db", "counter", "", json!({"n": 0, "by": []}))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for client_no in 0..CLIENTS {
        let mut c = connect(srv.addr).await;
        tasks.push(tokio::spawn(async move {
            let (mut successes, mut conflicts) = (0, 0);
            while successes < UPDATES_EACH {
                let doc = get(&mut c, "db", "counter").await.unwrap();
                let mut b = json(doc.body.as_ref().unwrap());
                b["n"] = json!(b["n"].as_f64().unwrap() + 1.0);
                b["by"].as_array_mut().unwrap().push(json!(client_no));
                match put(&mut c, "db", "counter", &doc.rev, b).await {
                    Ok(_) => successes += 1,
                    Err(s) if s.code() == Code::Aborted => conflicts += 1,
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
            (successes, conflicts)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap().0;
    }
    assert_eq!(total, CLIENTS * UPDATES_EACH);
    let doc = get(&mut c, "db", "counter").await.unwrap();
    assert_eq!(generation(&doc.rev), 1 + total as u64);
    let b = json(doc.body.as_ref().unwrap());
    assert_eq!(b["n"], json!(total));
    let by = b["by"].as_array().unwrap();
    assert_eq!(by.len(), total);
    for client_no in 0..CLIENTS {
        let n = by.iter().filter(|v| **v == json!(client_no)).count();
        assert_eq!(
            n, UPDATES_EACH,
            "client {client_no}'s updates are all there"
        );
    }
}

/// Gets coalesced into shared queries each get their own answer: 400 at
/// once over 4 connections, mixing live documents (exact rev and body), a
/// deleted one, a missing one, and a missing database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_each_get_their_own_answer() {
    let server = TestServer::start().await;
    let mut c = server.client.clone();
    create_db(&mut c, "many").await;
    let mut revs = Vec::new();
    for i in 0..50 {
        let written = put(&mut c, "many", &format!("d{i}"), "", json!({"i": i}))
            .await
            .unwrap();
        revs.push(written.rev);
    }
    let gone = put(&mut c, "many", "gone", "", json!({})).await.unwrap();
    c.delete(agsync::pb::DeleteRequest {
        database: "many".into(),
        id: "gone".into(),
        rev: gone.rev,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::new(server.channel().await));
    }
    let revs = std::sync::Arc::new(revs);
    let calls: Vec<_> = (0..400usize)
        .map(|k| {
            let mut c = clients[k % 4].clone();
            let revs = revs.clone();
            tokio::spawn(async move {
                match k % 5 {
                    0 => assert_status(
                        get(&mut c, "nosuchdb", "d1").await,
                        Code::NotFound,
                        "nosuchdb",
                    ),
                    1 => assert_status(
                        get(&mut c, "many", "missing").await,
                        Code::NotFound,
                        "missing",
                    ),
                    2 => assert_status(get(&mut c, "many", "gone").await, Code::NotFound, "gone"),
                    _ => {
                        let i = k % 50;
                        let doc = get(&mut c, "many", &format!("d{i}")).await.unwrap();
                        assert_eq!(doc.rev, revs[i], "d{i}");
                        assert_eq!(json(doc.body.as_ref().unwrap()), json!({"i": i}));
                    }
                }
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}
