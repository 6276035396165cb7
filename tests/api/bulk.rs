use agsync::pb::{BulkPutItem, BulkPutRequest, BulkPutResult};
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::*;

fn item(id: &str, rev: &str, b: Value) -> BulkPutItem {
    BulkPutItem {
        id: id.into(),
        rev: rev.into(),
        body: Some(body(b)),
        notify_aliases: vec![],
    }
}

async fn bulk(
    c: &mut Client,
    db: &str,
    docs: Vec<BulkPutItem>,
) -> Result<Vec<BulkPutResult>, tonic::Status> {
    c.bulk_put(BulkPutRequest {
        request_id: String::new(),
        database: db.into(),
        docs,
    })
    .await
    .map(|r| r.into_inner().results)
}

#[tokio::test]
async fn each_document_succeeds_or_fails_on_its_own() {
    let srv = TestServer::start_with(|c| c.max_document_bytes = 200).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let existing = put(&mut c, "db", "old", "", json!({"v": 1})).await.unwrap();

    let results = bulk(
        &mut c,
        "db",
        vec![
            item("a", "", json!({"n": 1})),
            item("old", "", json!({"v": 2})),    // conflict: exists
            item("_bad", "", json!({})),         // invalid id
            item("", "", json!({"auto": true})), // server-assigned id
            item("old", &existing.rev, json!({"v": 3})), // good update
            item("a", "", json!({"n": 2})),      // conflict with item 0
            item("big", "", json!({"x": "y".repeat(300)})), // too large
            BulkPutItem {
                id: "nobody".into(),
                rev: String::new(),
                body: None,
                notify_aliases: vec![],
            },
            item("b", "", json!({"n": 3})),
        ],
    )
    .await
    .unwrap();
    let summary: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.id.as_str(), r.error.as_str()))
        .collect();
    let auto_id = results[3].id.clone();
    assert_eq!(
        summary,
        vec![
            ("a", ""),
            ("old", "conflict"),
            ("_bad", "invalid"),
            (auto_id.as_str(), ""),
            ("old", ""),
            ("a", "conflict"),
            ("big", "too_large"),
            ("nobody", "invalid"),
            ("b", ""),
        ]
    );
    assert_eq!(auto_id.len(), 32);
    assert!(
        results[1].reason.contains("Document update conflict"),
        "{}",
        results[1].reason
    );
    assert!(
        results[7].reason.contains("a body is required"),
        "{}",
        results[7].reason
    );
    assert!(
        results[6].reason.contains("over the limit of 200 bytes"),
        "{}",
        results[6].reason
    );
    // Successes got consecutive seqs in request order; failures none.
    let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
    let s = existing.seq;
    assert_eq!(seqs, vec![s + 1, 0, 0, s + 2, s + 3, 0, 0, 0, s + 4]);
    assert!(
        results
            .iter()
            .filter(|r| !r.error.is_empty())
            .all(|r| r.rev.is_empty())
    );

    assert_eq!(get(&mut c, "db", "a").await.unwrap().rev, results[0].rev);
    assert_eq!(generation(&get(&mut c, "db", "old").await.unwrap().rev), 2);
    assert_eq!(
        get(&mut c, "db", &auto_id).await.unwrap().rev,
        results[3].rev
    );
    assert_status(get(&mut c, "db", "big").await, Code::NotFound, "\"big\"");
    let dbs = c
        .list_databases(agsync::pb::ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (dbs.databases[0].doc_count, dbs.databases[0].update_seq),
        (4, s + 4)
    );
}

#[tokio::test]
async fn bulk_request_errors() {
    let srv = TestServer::start_with(|c| c.max_bulk_docs = 3).await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    assert_status(
        bulk(&mut c, "nodb", vec![item("a", "", json!({}))]).await,
        Code::NotFound,
        "database \"nodb\" does not exist",
    );
    assert_status(
        bulk(&mut c, "nodb", vec![item("_a", "", json!({}))]).await,
        Code::NotFound,
        "database \"nodb\" does not exist",
    );
    assert_status(
        bulk(
            &mut c,
            "db",
            (0..4)
                .map(|i| item(&format!("d{i}"), "", json!({})))
                .collect(),
        )
        .await,
        Code::InvalidArgument,
        "4 documents sent; at most 3 per BulkPut",
    );
    assert!(bulk(&mut c, "db", vec![]).await.unwrap().is_empty());
    let dbs = c
        .list_databases(agsync::pb::ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dbs.databases[0].doc_count, 0);
}

#[tokio::test]
async fn large_bulk_commits_everything() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let docs = (0..2000)
        .map(|i| item(&format!("doc{i:05}"), "", json!({"i": i})))
        .collect();
    let results = bulk(&mut c, "db", docs).await.unwrap();
    assert_eq!(results.len(), 2000);
    assert!(results.iter().all(|r| r.error.is_empty()));
    assert!(results.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let doc = get(&mut c, "db", "doc01999").await.unwrap();
    assert_eq!(json(doc.body.as_ref().unwrap()), json!({"i": 1999}));
}
