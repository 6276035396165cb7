//! request_id across nodes on one PostgreSQL: a retry on another node gets
//! the first node's answer, duplicates racing on both nodes make one write,
//! and a node killed with kill -9 after acknowledging leaves the answer for
//! the retry on the other.

use std::collections::BTreeSet;

use agsync::pb::PutRequest;
use serde_json::json;

use crate::helpers::*;

fn request(request_id: &str) -> PutRequest {
    PutRequest {
        database: "db".into(),
        id: "x".into(),
        body: Some(body(json!({"n": 1}))),
        request_id: request_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_node_and_racing_duplicates_write_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = ProcessServer::start(&path).await;
    let b = ProcessServer::start(&path).await;
    let (mut ca, mut cb) = (connect(a.addr).await, connect(b.addr).await);
    create_db(&mut ca, "db").await;

    let first = ca.put(request("one")).await.unwrap().into_inner();
    let on_b = cb.put(request("one")).await.unwrap().into_inner();
    assert_eq!(on_b, first);

    // 16 identical requests, half on each node, at once.
    let mut racing = request("race");
    racing.id = "y".into();
    let answers = futures::future::join_all((0..16).map(|i| {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let racing = racing.clone();
        tokio::spawn(async move { c.put(racing).await.unwrap().into_inner() })
    }))
    .await;
    let distinct: BTreeSet<(String, u64)> = answers
        .into_iter()
        .map(|a| {
            let a = a.unwrap();
            (a.rev, a.seq)
        })
        .collect();
    assert_eq!(distinct.len(), 1, "{distinct:?}");
    assert_eq!(
        all_change_seqs(&cb, "db").await.len(),
        2,
        "x and y, once each"
    );
}

#[tokio::test]
async fn a_node_killed_after_acknowledging_leaves_the_answer_for_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = ProcessServer::start(&path).await;
    let b = ProcessServer::start(&path).await;
    let mut ca = connect(a.addr).await;
    create_db(&mut ca, "db").await;
    let first = ca.put(request("crash")).await.unwrap().into_inner();
    a.kill().await;
    let mut cb = connect(b.addr).await;
    assert_eq!(cb.put(request("crash")).await.unwrap().into_inner(), first);
    assert_eq!(all_change_seqs(&cb, "db").await, [first.seq]);
}
