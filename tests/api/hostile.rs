//! Hostile input: each case gets a clear status, and the server keeps
//! serving everyone else (checked after each case).

use std::time::Duration;

use agsync::pb::{self, NotifyRequest, PutResponse, SubscribeRequest};
use prost::Message;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

/// A PutRequest whose string fields are raw bytes, to send what a generated
/// client never would (invalid UTF-8, pre-encoded bodies, unknown fields).
#[derive(Clone, PartialEq, prost::Message)]
struct RawPut {
    #[prost(bytes = "vec", tag = "1")]
    database: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    id: Vec<u8>,
    /// An encoded google.protobuf.Struct.
    #[prost(bytes = "vec", tag = "4")]
    body: Vec<u8>,
    /// Not in the contract: unknown to the server.
    #[prost(string, tag = "99")]
    unknown: String,
}

async fn raw_put(srv: &TestServer, raw: RawPut) -> Result<PutResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(srv.channel().await);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/agsync.v1.SyncService/Put");
    let codec = tonic_prost::ProstCodec::<RawPut, PutResponse>::default();
    grpc.unary(tonic::Request::new(raw), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// A Struct nested `depth` levels deep ({"k": {"k": ...}}), encoded
/// iteratively so that building it cannot overflow the test's stack.
fn nested_struct(depth: usize) -> Vec<u8> {
    fn len_field(tag: u32, payload: &[u8], out: &mut Vec<u8>) {
        prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, out);
        prost::encoding::encode_varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }
    let mut inner = Vec::new(); // the innermost, empty Struct
    for _ in 0..depth {
        let mut value = Vec::new(); // Value { struct_value = 5 }
        len_field(5, &inner, &mut value);
        let mut entry = Vec::new(); // map entry { key = 1, value = 2 }
        len_field(1, b"k", &mut entry);
        len_field(2, &value, &mut entry);
        let mut outer = Vec::new(); // Struct { fields = 1 }
        len_field(1, &entry, &mut outer);
        inner = outer;
    }
    inner
}

/// The server still answers a normal client correctly.
async fn still_serving(c: &mut Client, n: usize) {
    let id = format!("alive-{n}");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        put(c, "db", &id, "", json!({"n": n})),
    )
    .await
    .expect("the server answers within 10 s")
    .expect("a normal write succeeds");
    assert_eq!(get(c, "db", &id).await.unwrap().rev, r.rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_clear_statuses() {
    let srv = TestServer::start().await;
    let mut c = srv.client.clone();
    create_db(&mut c, "db").await;
    let raw = |database: &[u8], id: &[u8], body: Vec<u8>| RawPut {
        database: database.to_vec(),
        id: id.to_vec(),
        body,
        unknown: String::new(),
    };
    let flat = body(json!({"a": 1})).encode_to_vec();

    let cases: Vec<(&str, RawPut, Code, &str)> = vec![
        (
            "invalid UTF-8 id",
            raw(b"db", b"\xff\xfe", flat.clone()),
            Code::InvalidArgument,
            "not a valid protobuf message",
        ),
        (
            "invalid UTF-8 database",
            raw(b"d\xc3", b"x", flat.clone()),
            Code::InvalidArgument,
            "not a valid protobuf message",
        ),
        (
            "empty id",
            raw(b"db", b"", flat.clone()),
            Code::InvalidArgument,
            "id: a document id is required",
        ),
        (
            "huge id",
            raw(b"db", &[b'x'; 100_000], flat.clone()),
            Code::InvalidArgument,
            "100000 bytes long",
        ),
        (
            "empty database",
            raw(b"", b"x", flat.clone()),
            Code::InvalidArgument,
            "database: a database name is required",
        ),
        (
            "huge database",
            raw(&[b'a'; 10_000], b"x", flat.clone()),
            Code::InvalidArgument,
            "10000 characters long",
        ),
        (
            "10,000 levels of nesting",
            raw(b"db", b"deep", nested_struct(10_000)),
            Code::InvalidArgument,
            "nests deeper than protobuf decoding allows",
        ),
        (
            "33 levels of nesting",
            raw(b"db", b"deep", nested_struct(32)),
            Code::InvalidArgument,
            "33 levels deep; at most 32",
        ),
        (
            "10 MB body",
            raw(
                b"db",
                b"big",
                body(json!({"x": "y".repeat(10_000_000)})).encode_to_vec(),
            ),
            Code::ResourceExhausted,
            "over the limit of 1048576 bytes",
        ),
        (
            "no body",
            raw(b"db", b"x", Vec::new()),
            Code::InvalidArgument,
            "body: a body is required",
        ),
    ];
    for (n, (what, request, code, needle)) in cases.into_iter().enumerate() {
        let result = raw_put(&srv, request).await;
        match &result {
            Err(s) => {
                assert_eq!(s.code(), code, "{what}: {}", s.message());
                assert!(
                    s.message().contains(needle),
                    "{what}: {:?} lacks {needle:?}",
                    s.message()
                );
            }
            Ok(r) => panic!("{what}: expected {code:?}, got {r:?}"),
        }
        still_serving(&mut c, n).await;
    }

    // Unknown fields are ignored, as protobuf's compatibility rules require.
    let mut with_unknown = raw(b"db", b"u", flat.clone());
    with_unknown.unknown = "from a newer client".into();
    assert!(raw_put(&srv, with_unknown).await.is_ok());

    // A body at the depth limit (32 levels: 31 nested in the body) is fine.
    let r = raw_put(&srv, raw(b"db", b"deep-ok", nested_struct(31))).await;
    assert!(r.is_ok(), "{r:?}");

    // Huge attribute maps and thousands of keys.
    let attributes = (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_status(
        c.notify(NotifyRequest {
            sync_key: "k".into(),
            aliases: vec![],
            attributes,
        })
        .await,
        Code::InvalidArgument,
        "10000 attributes given; at most 256",
    );
    let aliases = (0..5_000).map(|i| format!("user{i}")).collect();
    assert_status(
        c.notify(NotifyRequest {
            sync_key: "k".into(),
            aliases,
            attributes: Default::default(),
        })
        .await,
        Code::InvalidArgument,
        "5000 aliases given; at most 1000",
    );
    let sync_keys = (0..5_000).map(|i| format!("key{i}")).collect();
    assert_status(
        c.subscribe(SubscribeRequest {
            sync_keys,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "5000 sync keys given; at most 100",
    );
    still_serving(&mut c, 100).await;
}

/// Many connections open a Subscribe stream and never read it while writes
/// flow: writers and a normal subscriber are unaffected and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_read_do_not_hurt_others() {
    const IDLE_STREAMS: usize = 200;
    const WRITES: u64 = 1000;
    let srv = TestServer::start_with(|c| c.subscriber_buffer = 16).await;
    let mut c = srv.client.clone();
    c.create_database(pb::CreateDatabaseRequest {
        name: "db".into(),
        sync_key: "k".into(),
    })
    .await
    .unwrap();
    let mut idle = Vec::new();
    for _ in 0..IDLE_STREAMS {
        let mut own = connect(srv.addr).await; // one connection each
        idle.push(subscribe(&mut own, &["k"], None, "").await.unwrap());
    }
    let mut normal = subscribe(&mut c, &["k"], None, "").await.unwrap();
    let head = next_subscribed(&mut normal).await;
    for chunk in 0..(WRITES / 100) {
        let docs = (0..100)
            .map(|i| pb::BulkPutItem {
                id: format!("d{chunk}-{i}"),
                rev: String::new(),
                body: Some(body(json!({"pad": "x".repeat(500)}))),
                notify_aliases: vec![],
            })
            .collect();
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            c.bulk_put(pb::BulkPutRequest {
                request_id: String::new(),
                database: "db".into(),
                docs,
            }),
        )
        .await
        .expect("writes are not held up")
        .unwrap()
        .into_inner()
        .results;
        assert!(results.iter().all(|r| r.error.is_empty()));
    }
    for want in head + 1..=head + WRITES {
        assert_eq!(next_notification(&mut normal).await.seq, want);
    }
    still_serving(&mut c, 0).await;
    // And an idle stream, read at last, still has everything.
    let mut late = idle.pop().unwrap();
    assert_eq!(next_subscribed(&mut late).await, head);
    for want in head + 1..=head + WRITES {
        assert_eq!(next_notification(&mut late).await.seq, want);
    }
}
