//! `/metrics` after a known workload: exact counts. The real binary runs in
//! its own process, so its metrics count only what the test does.

use std::time::Duration;

use agsync::pb;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;
use crate::scrape::{get_with, scrape};

const SYNC: &str = "agsync.v1.SyncService";

fn rpc<'a>(method: &'a str, kind: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("grpc_service", SYNC),
        ("grpc_method", method),
        ("grpc_type", kind),
    ]
}

fn handled<'a>(method: &'a str, kind: &'a str, code: &'a str) -> [(&'a str, &'a str); 4] {
    let [a, b, c] = rpc(method, kind);
    [a, b, c, ("grpc_code", code)]
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ProcessServer::start_with(
        &dir.path().join("agsync.db"),
        &["--metrics-listen", "127.0.0.1:0", "--retain-events", "100"],
        None,
    )
    .await;
    let mut c = connect(srv.addr).await;

    let before = scrape(&srv).await;
    assert_eq!(before.value("agsync_subscribers", &[]), 0.0);
    assert_eq!(before.value("agsync_conflicts_total", &[]), 0.0);
    assert_eq!(
        before.value(
            "agsync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(before.text.contains("# HELP agsync_conflicts_total "));

    c.create_database(pb::CreateDatabaseRequest {
        name: "cars".into(),
        sync_key: "cars.key".into(),
    })
    .await
    .unwrap();
    let mut stream = subscribe(&mut c, &["cars.key"], None, "").await.unwrap();
    next_subscribed(&mut stream).await;
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(
            put(&mut c, "cars", &format!("car-{i}"), "", json!({"i": i}))
                .await
                .unwrap()
                .rev,
        );
    }
    for _ in 0..5 {
        next_notification(&mut stream).await;
    }
    assert_status(
        put(&mut c, "cars", "car-0", "", json!({"stale": true})).await,
        Code::Aborted,
        "conflict",
    );
    get(&mut c, "cars", "car-1").await.unwrap();
    assert_status(get(&mut c, "cars", "nope").await, Code::NotFound, "nope");

    let during = scrape(&srv).await;
    assert!(
        during
            .text
            .contains("# TYPE grpc_server_handling_seconds histogram")
    );
    assert_eq!(
        during.value("grpc_server_started_total", &rpc("Put", "unary")),
        6.0
    );
    assert_eq!(
        during.value("grpc_server_handled_total", &handled("Put", "unary", "OK")),
        5.0
    );
    assert_eq!(
        during.value(
            "grpc_server_handled_total",
            &handled("Put", "unary", "Aborted")
        ),
        1.0
    );
    assert_eq!(
        during.value("grpc_server_handled_total", &handled("Get", "unary", "OK")),
        1.0
    );
    assert_eq!(
        during.value(
            "grpc_server_handled_total",
            &handled("Get", "unary", "NotFound")
        ),
        1.0
    );
    assert_eq!(
        during.value("grpc_server_handling_seconds_count", &rpc("Put", "unary")),
        6.0
    );
    let le = |bound: &'static str| {
        let [a, b, c] = rpc("Put", "unary");
        [a, b, c, ("le", bound)]
    };
    assert_eq!(
        during.value("grpc_server_handling_seconds_bucket", &le("+Inf")),
        6.0
    );
    assert_eq!(during.value("agsync_conflicts_total", &[]), 1.0);
    assert_eq!(during.value("agsync_writes_committed_total", &[]), 5.0);
    assert_eq!(during.value("agsync_subscribers", &[]), 1.0);
    assert_eq!(
        during.value("agsync_notifications_delivered_total", &[]),
        5.0
    );
    assert_eq!(during.value("agsync_head_seq", &[]), 5.0);
    assert_eq!(during.value("agsync_oldest_replayable_seq", &[]), 1.0);
    assert_eq!(during.value("agsync_writer_queue_depth", &[]), 0.0);
    // subscribed + 5 notifications, on the open stream.
    assert_eq!(
        during.value(
            "grpc_server_msg_sent_total",
            &rpc("Subscribe", "server_stream")
        ),
        6.0
    );
    // The create and each Put committed in batches of their own or shared.
    assert_eq!(during.value("agsync_writer_batch_size_sum", &[]), 7.0);
    assert!(during.value("agsync_writer_commit_seconds_count", &[]) >= 1.0);
    assert!(during.value("agsync_read_batch_size_count", &[]) >= 1.0);

    // A resumed subscriber replays from the log.
    let mut resumed = subscribe(&mut c, &["cars.key"], Some(2), "").await.unwrap();
    for _ in 0..3 {
        next_notification(&mut resumed).await;
    }
    next_subscribed(&mut resumed).await;
    drop(resumed);

    // The client leaves: the stream ends as Canceled and the gauge drops.
    drop(stream);
    let canceled = handled("Subscribe", "server_stream", "Canceled");
    let mut after = scrape(&srv).await;
    for _ in 0..100 {
        // The stream unregisters, then its call is recorded: wait for both.
        if after.value("agsync_subscribers", &[]) == 0.0
            && after.get("grpc_server_handled_total", &canceled) == Some(2.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(&srv).await;
    }
    assert_eq!(after.value("agsync_subscribers", &[]), 0.0);
    assert_eq!(after.value("agsync_replayed_events_total", &[]), 3.0);
    assert_eq!(
        after.value("agsync_notifications_delivered_total", &[]),
        8.0
    );
    assert_eq!(
        after.value(
            "grpc_server_handled_total",
            &handled("Subscribe", "server_stream", "Canceled")
        ),
        2.0
    );

    let other = get_with(srv.metrics_addr.unwrap(), "/", None).await;
    assert!(other.status.contains("404"), "{}", other.status);
}

#[tokio::test]
async fn auth_failures_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[token]]\nprincipal = \"reader\"\nhash = \"{}\"\nread = [\"cars\"]\n\n[[token]]\nprincipal = \"prometheus\"\nhash = \"{}\"\nmetrics = true\n",
            agsync::auth::hash_token("reader-token-0123456789"),
            agsync::auth::hash_token("scraper-token-0123456789"),
        ),
    )
    .unwrap();
    let srv = ProcessServer::start_with(
        &dir.path().join("agsync.db"),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--auth",
            auth.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let mut c = connect(srv.addr).await;
    let list = |token: Option<&'static str>| {
        let mut c = c.clone();
        async move {
            c.list_databases(with_token(pb::ListDatabasesRequest {}, token))
                .await
                .map(|_| ())
        }
    };
    assert_status(list(None).await, Code::Unauthenticated, "no credentials");
    assert_status(list(None).await, Code::Unauthenticated, "no credentials");
    assert_status(
        list(Some("Bearer wrong-token-0123456789")).await,
        Code::Unauthenticated,
        "unknown token",
    );
    list(Some("Bearer reader-token-0123456789")).await.unwrap();
    assert_status(
        c.create_database(with_token(
            pb::CreateDatabaseRequest {
                name: "cars".into(),
                sync_key: String::new(),
            },
            Some("Bearer reader-token-0123456789"),
        ))
        .await,
        Code::PermissionDenied,
        "",
    );
    // With --auth, /metrics wants a token with the metrics grant.
    let metrics = srv.metrics_addr.unwrap();
    let anonymous = get_with(metrics, "/metrics", None).await;
    assert!(anonymous.status.contains(" 401 "), "{}", anonymous.status);
    let reader = get_with(metrics, "/metrics", Some("reader-token-0123456789")).await;
    assert!(reader.status.contains(" 403 "), "{}", reader.status);
    let page = get_with(metrics, "/metrics", Some("scraper-token-0123456789")).await;
    assert!(page.status.contains(" 200 "), "{}", page.status);
    let failures = |reason| page.value("agsync_auth_failures_total", &[("reason", reason)]);
    // Two calls and one scrape without a token, one call with an unknown
    // token, one call and one scrape without the grant.
    assert_eq!(
        (failures("missing"), failures("unknown"), failures("denied")),
        (3.0, 1.0, 2.0)
    );
    assert_eq!(
        page.value(
            "grpc_server_handled_total",
            &handled("ListDatabases", "unary", "Unauthenticated")
        ),
        3.0
    );
}

#[tokio::test]
async fn metrics_on_a_public_address_need_auth() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_agsync"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "0.0.0.0:0",
            "--db",
        ])
        .arg(dir.path().join("agsync.db"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve metrics on 0.0.0.0:0 without authentication"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_stream_dropped_past_its_deadline_counts_as_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let srv = ProcessServer::start_with(
        &dir.path().join("agsync.db"),
        &["--metrics-listen", "127.0.0.1:0"],
        None,
    )
    .await;
    let mut c = connect(srv.addr).await;
    let mut request = tonic::Request::new(pb::SubscribeRequest {
        sync_keys: vec!["cars.key".into()],
        since: None,
        alias: String::new(),
    });
    request.set_timeout(Duration::from_millis(300));
    let mut stream = c.subscribe(request).await.unwrap().into_inner();
    next_subscribed(&mut stream).await;
    // The client gives up at its deadline and resets the stream, as grpc-go
    // and grpc-java do (tonic's client only times the response headers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    let exceeded = handled("Subscribe", "server_stream", "DeadlineExceeded");
    let mut page = scrape(&srv).await;
    for _ in 0..100 {
        if page.get("grpc_server_handled_total", &exceeded) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        page = scrape(&srv).await;
    }
    assert_eq!(page.value("grpc_server_handled_total", &exceeded), 1.0);
    assert_eq!(
        page.get(
            "grpc_server_handled_total",
            &handled("Subscribe", "server_stream", "Canceled")
        ),
        None
    );
}
