use agsync::pb::{
    BulkPutItem, BulkPutRequest, ChangesRequest, CreateDatabaseRequest, DeleteDatabaseRequest,
    DeleteRequest, GetRequest, ListDatabasesRequest, NewIdRequest, NotifyRequest, PutRequest,
    SubscribeRequest,
};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const ADMIN: &str = "Bearer admin-token-0123456789";
const BOB: &str = "Bearer bob-token-0123456789";
const RITA: &str = "Bearer rita-token-0123456789";
const BACKEND: &str = "Bearer backend-token-0123456789";
const WATCHER: &str = "Bearer watcher-token-0123456789";

fn auth_file(dir: &std::path::Path) -> std::path::PathBuf {
    let hash = |t: &str| agsync::auth::hash_token(t.strip_prefix("Bearer ").unwrap());
    let text = format!(
        r#"
[[token]]
principal = "admin"
hash = "{}"
admin = true
subscribe = ["*"]

[[token]]
principal = "bob"
hash = "{}"
read = ["cars"]
write = ["cars"]
subscribe = ["cars.key"]

[[token]]
principal = "rita"
hash = "{}"
read = ["cars", "c*s"]

[[token]]
principal = "backend"
hash = "{}"
notify = ["cars.*"]

[[token]]
principal = "watcher"
hash = "{}"
subscribe = ["cars.key"]
"#,
        hash(ADMIN),
        hash(BOB),
        hash(RITA),
        hash(BACKEND),
        hash(WATCHER)
    );
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn secured() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = auth_file(dir.path());
    let srv = TestServer::start_with(|c| c.auth = Some(path)).await;
    let mut c = srv.client.clone();
    c.create_database(with_token(
        CreateDatabaseRequest {
            name: "cars".into(),
            sync_key: "cars.key".into(),
        },
        Some(ADMIN),
    ))
    .await
    .unwrap();
    (srv, dir)
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    CreateDatabase,
    DeleteDatabase,
    ListDatabases,
    NewId,
    Put,
    Get,
    Delete,
    BulkPut,
    Changes,
    Notify,
    Subscribe,
    Snapshot,
}

/// Calls `rpc` with `auth` and returns just the outcome's code.
async fn call(c: &mut Client, rpc: Rpc, auth: Option<&str>) -> Code {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let body = || Some(body(json!({"a": 1})));
    match rpc {
        Rpc::CreateDatabase => code(
            c.create_database(with_token(
                CreateDatabaseRequest {
                    name: "other".into(),
                    sync_key: String::new(),
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::DeleteDatabase => code(
            c.delete_database(with_token(
                DeleteDatabaseRequest {
                    name: "other".into(),
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::ListDatabases => code(
            c.list_databases(with_token(ListDatabasesRequest {}, auth))
                .await
                .map(drop),
        ),
        Rpc::NewId => code(
            c.new_id(with_token(NewIdRequest { count: 1 }, auth))
                .await
                .map(drop),
        ),
        Rpc::Put => code(
            c.put(with_token(
                PutRequest {
                    request_id: String::new(),
                    database: "cars".into(),
                    id: "p".into(),
                    rev: String::new(),
                    body: body(),
                    notify_aliases: vec![],
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::Get => code(
            c.get(with_token(
                GetRequest {
                    database: "cars".into(),
                    id: "seed".into(),
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::Delete => code(
            c.delete(with_token(
                DeleteRequest {
                    request_id: String::new(),
                    database: "cars".into(),
                    id: "gone".into(),
                    rev: String::new(),
                    notify_aliases: vec![],
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::BulkPut => code(
            c.bulk_put(with_token(
                BulkPutRequest {
                    request_id: String::new(),
                    database: "cars".into(),
                    docs: vec![BulkPutItem {
                        id: String::new(),
                        rev: String::new(),
                        body: body(),
                        notify_aliases: vec![],
                    }],
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::Changes => code(
            c.changes(with_token(
                ChangesRequest {
                    database: "cars".into(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::Notify => code(
            c.notify(with_token(
                NotifyRequest {
                    sync_key: "cars.key".into(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        ),
        Rpc::Snapshot => code(
            async {
                let mut stream = c
                    .snapshot(with_token(
                        agsync::pb::SnapshotRequest {
                            database: "cars".into(),
                            json_bodies: true,
                        },
                        auth,
                    ))
                    .await?
                    .into_inner();
                while stream.message().await?.is_some() {}
                Ok(())
            }
            .await,
        ),
        Rpc::Subscribe => code(
            c.subscribe(with_token(
                SubscribeRequest {
                    sync_keys: vec!["cars.key".into()],
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        ),
    }
}

/// For every RPC: no token, a wrong token and a malformed header are
/// UNAUTHENTICATED; a token without the grant is PERMISSION_DENIED; the right
/// token succeeds.
#[tokio::test]
async fn auth_matrix() {
    let (srv, _dir) = secured().await;
    let mut c = srv.client.clone();
    // A document to read and one to delete (Delete with an empty rev on a
    // live doc is a conflict, which proves the call got past authorization).
    for id in ["seed", "gone"] {
        c.put(with_token(
            PutRequest {
                request_id: String::new(),
                database: "cars".into(),
                id: id.into(),
                rev: String::new(),
                body: Some(body(json!({}))),
                notify_aliases: vec![],
            },
            Some(BOB),
        ))
        .await
        .unwrap();
    }
    let table: &[(Rpc, Option<&str>, &str, Code)] = &[
        // (rpc, a token without the grant, the right token, its outcome)
        (Rpc::CreateDatabase, Some(BOB), ADMIN, Code::Ok),
        (Rpc::DeleteDatabase, Some(BOB), ADMIN, Code::Ok),
        (Rpc::ListDatabases, None, RITA, Code::Ok),
        (Rpc::NewId, None, BACKEND, Code::Ok),
        (Rpc::Put, Some(RITA), BOB, Code::Ok),
        (Rpc::Get, Some(BACKEND), RITA, Code::Ok),
        (Rpc::Delete, Some(RITA), BOB, Code::Aborted),
        (Rpc::BulkPut, Some(RITA), BOB, Code::Ok),
        (Rpc::Changes, Some(BACKEND), RITA, Code::Ok),
        (Rpc::Notify, Some(BOB), BACKEND, Code::Ok),
        (Rpc::Subscribe, Some(RITA), BOB, Code::Ok),
        (Rpc::Snapshot, Some(BACKEND), RITA, Code::Ok),
    ];
    for &(rpc, without_grant, right, outcome) in table {
        for bad in [
            None,
            Some("Bearer not-a-token"),
            Some("Basic Ym9iOnB3"),
            Some("Bearer "),
        ] {
            assert_eq!(
                call(&mut c, rpc, bad).await,
                Code::Unauthenticated,
                "{rpc:?} with {bad:?}"
            );
        }
        if let Some(token) = without_grant {
            assert_eq!(
                call(&mut c, rpc, Some(token)).await,
                Code::PermissionDenied,
                "{rpc:?} with {token}"
            );
        }
        assert_eq!(
            call(&mut c, rpc, Some(right)).await,
            outcome,
            "{rpc:?} with {right}"
        );
    }
}

#[tokio::test]
async fn denials_say_which_grant_is_missing_and_nothing_else() {
    let (srv, _dir) = secured().await;
    let mut c = srv.client.clone();
    let status = c
        .put(with_token(
            PutRequest {
                request_id: String::new(),
                database: "cars".into(),
                id: "x".into(),
                rev: String::new(),
                body: Some(body(json!({}))),
                notify_aliases: vec![],
            },
            Some(RITA),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "permission denied: principal \"rita\" lacks the \"write\" grant for database \"cars\"; ask the administrator to add it to its token"
    );
    let status = c
        .get(with_token(
            GetRequest {
                database: "cars".into(),
                id: "x".into(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "no credentials: send the metadata \"authorization: Bearer <token>\""
    );
    let status = c
        .get(with_token(
            GetRequest {
                database: "cars".into(),
                id: "x".into(),
            },
            Some("Bearer wrong"),
        ))
        .await
        .unwrap_err();
    assert!(
        !status.message().contains("wrong"),
        "the token is not echoed: {}",
        status.message()
    );

    c.create_database(with_token(
        CreateDatabaseRequest {
            name: "secret".into(),
            sync_key: String::new(),
        },
        Some(ADMIN),
    ))
    .await
    .unwrap();
    // ListDatabases shows only what the caller may read or write.
    let names = |auth| {
        let mut c = srv.client.clone();
        async move {
            c.list_databases(with_token(ListDatabasesRequest {}, Some(auth)))
                .await
                .unwrap()
                .into_inner()
                .databases
                .into_iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(ADMIN).await, vec!["cars", "secret"]);
    assert_eq!(names(RITA).await, vec!["cars"]);
    assert!(names(BACKEND).await.is_empty());
}

/// A subscriber listens as its token's principal: it never receives what is
/// addressed to another alias, live or on replay, and cannot claim one.
#[tokio::test]
async fn subscribers_listen_as_their_principal() {
    let (srv, _dir) = secured().await;
    let mut c = srv.client.clone();
    let sub = |alias: &str, since: Option<u64>| {
        with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                since,
                alias: alias.into(),
            },
            Some(BOB),
        )
    };
    let status = c.subscribe(sub("alice", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("alias \"alice\" is not yours"),
        "{}",
        status.message()
    );

    let mut live = c.subscribe(sub("", None)).await.unwrap().into_inner();
    next_subscribed(&mut live).await;
    let mut as_bob = c.subscribe(sub("bob", None)).await.unwrap().into_inner();
    next_subscribed(&mut as_bob).await;

    let send = |aliases: &[&str]| {
        let mut c = c.clone();
        let aliases: Vec<String> = aliases.iter().map(|a| (*a).to_owned()).collect();
        async move {
            c.notify(with_token(
                NotifyRequest {
                    sync_key: "cars.key".into(),
                    aliases,
                    attributes: Default::default(),
                },
                Some(BACKEND),
            ))
            .await
            .unwrap()
            .into_inner()
            .seq
        }
    };
    let for_alice = send(&["alice"]).await;
    let for_bob = send(&["bob"]).await;
    let for_all = send(&[]).await;
    for stream in [&mut live, &mut as_bob] {
        assert_eq!(next_notification(stream).await.seq, for_bob);
        assert_eq!(next_notification(stream).await.seq, for_all);
    }
    let mut replay = c.subscribe(sub("", Some(0))).await.unwrap().into_inner();
    assert_eq!(next_notification(&mut replay).await.seq, for_bob);
    assert_eq!(next_notification(&mut replay).await.seq, for_all);
    assert_eq!(next_subscribed(&mut replay).await, for_all);
    assert!(for_alice < for_bob);

    // Keys without a subscribe grant are refused, even among granted ones.
    let status = c
        .subscribe(with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into(), "other.key".into()],
                ..Default::default()
            },
            Some(BOB),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("\"subscribe\" grant for sync key \"other.key\""),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn per_principal_subscriber_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = auth_file(dir.path());
    let srv = TestServer::start_with(|c| {
        c.auth = Some(path);
        c.max_subscribers_per_principal = 2;
    })
    .await;
    let mut c = srv.client.clone();
    let sub = |token| {
        with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                ..Default::default()
            },
            Some(token),
        )
    };
    let first = c.subscribe(sub(BOB)).await.unwrap().into_inner();
    let _second = c.subscribe(sub(BOB)).await.unwrap().into_inner();
    assert_status(
        c.subscribe(sub(BOB)).await,
        Code::ResourceExhausted,
        "the limit per principal",
    );
    // Another principal is not affected.
    let _admin = c.subscribe(sub(ADMIN)).await.unwrap();
    // Closing a stream frees its place.
    drop(first);
    let reopened = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match c.subscribe(sub(BOB)).await {
                Ok(s) => return s,
                Err(s) if s.code() == Code::ResourceExhausted => tokio::task::yield_now().await,
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await
    .expect("the closed stream's place is freed");
    drop(reopened);
}

#[tokio::test]
async fn health_and_reflection_stay_open() {
    let (srv, _dir) = secured().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, 1);
}

#[tokio::test]
async fn hash_token_helper_matches_the_server() {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agsync"))
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"bob-token-0123456789\n")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        format!(
            "hash = \"{}\"",
            agsync::auth::hash_token("bob-token-0123456789")
        )
    );
}

#[tokio::test]
async fn tls_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = self_signed_tls(dir.path());
    let srv = TestServer::start_with(|c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
    })
    .await;

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", srv.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = agsync::pb::sync_service_client::SyncServiceClient::new(channel);
    create_db(&mut c, "secure").await;
    let r = put(&mut c, "secure", "x", "", json!({"a": 1}))
        .await
        .unwrap();
    assert_eq!(get(&mut c, "secure", "x").await.unwrap().rev, r.rev);

    // A plaintext client cannot talk to it.
    let mut plain = srv.client.clone();
    assert!(plain.list_databases(ListDatabasesRequest {}).await.is_err());
}

/// Every method of the service, as the descriptor lists it, refuses a call
/// without a token: authentication happens before any handler, for methods
/// that exist today and any added later.
#[tokio::test]
async fn every_method_in_the_descriptor_refuses_a_missing_token() {
    let (srv, _dir) = secured().await;
    let methods =
        agsync::api::guard::methods_of(agsync::pb::FILE_DESCRIPTOR_SET, "agsync.v1.SyncService");
    assert_eq!(methods.len(), 12, "{methods:?}");
    for method in &methods {
        for (authorization, needle) in [
            (None, "no credentials"),
            (Some("Bearer not-a-token"), "unknown token"),
            (Some("Basic YWRtaW46YWRtaW4="), "malformed authorization"),
        ] {
            let mut grpc = tonic::client::Grpc::new(srv.channel().await);
            grpc.ready().await.unwrap();
            let path = format!("/agsync.v1.SyncService/{method}").parse().unwrap();
            // An empty message decodes as any request type.
            let result: Result<tonic::Response<()>, tonic::Status> = grpc
                .unary(
                    with_token((), authorization),
                    path,
                    tonic_prost::ProstCodec::<(), ()>::default(),
                )
                .await;
            assert_status(result, Code::Unauthenticated, needle);
        }
    }
}

/// A caller without the grant is refused before its input is looked at: a
/// bad name is PERMISSION_DENIED, not INVALID_ARGUMENT, for those without
/// the grant.
#[tokio::test]
async fn grants_are_checked_before_input_is_validated() {
    let (srv, _dir) = secured().await;
    let mut c = srv.client.clone();
    let bad = "Not A Name!";
    let r = c
        .create_database(with_token(
            CreateDatabaseRequest {
                name: bad.into(),
                sync_key: String::new(),
            },
            Some(BOB),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "\"admin\" grant");
    let r = c
        .delete_database(with_token(
            DeleteDatabaseRequest { name: bad.into() },
            Some(RITA),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "\"admin\" grant");
    let r = c
        .put(with_token(
            PutRequest {
                database: bad.into(),
                id: "_bad".into(),
                ..Default::default()
            },
            Some(RITA),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "\"write\" grant");
    let r = c
        .get(with_token(
            GetRequest {
                database: bad.into(),
                id: String::new(),
            },
            Some(BACKEND),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "\"read\" grant");
    let r = c
        .notify(with_token(
            NotifyRequest {
                sync_key: "bad key".into(),
                ..Default::default()
            },
            Some(BOB),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "\"notify\" grant");
    // With the grant, the same input is judged on its merits.
    let r = c
        .create_database(with_token(
            CreateDatabaseRequest {
                name: bad.into(),
                sync_key: String::new(),
            },
            Some(ADMIN),
        ))
        .await;
    assert_status(r, Code::InvalidArgument, "invalid name");
}

/// A subscriber allowed to listen to a key but not to read the database
/// learns that something changed (sync key, seq), not what.
#[tokio::test]
async fn subscribers_without_read_get_only_key_and_seq() {
    let (srv, _dir) = secured().await;
    let mut c = srv.client.clone();
    let sub = |token| {
        with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                ..Default::default()
            },
            Some(token),
        )
    };
    let mut watcher = c.subscribe(sub(WATCHER)).await.unwrap().into_inner();
    next_subscribed(&mut watcher).await;
    let mut bob = c.subscribe(sub(BOB)).await.unwrap().into_inner();
    next_subscribed(&mut bob).await;
    let written = c
        .put(with_token(
            PutRequest {
                database: "cars".into(),
                id: "secret-plan".into(),
                body: Some(body(json!({"a": 1}))),
                ..Default::default()
            },
            Some(BOB),
        ))
        .await
        .unwrap()
        .into_inner();
    let seen_by_bob = next_notification(&mut bob).await;
    assert_eq!(
        (
            seen_by_bob.database.as_str(),
            seen_by_bob.id.as_str(),
            seen_by_bob.rev.as_str()
        ),
        ("cars", "secret-plan", written.rev.as_str())
    );
    assert_eq!(
        next_notification(&mut watcher).await,
        agsync::pb::Notification {
            sync_key: "cars.key".into(),
            seq: written.seq,
            ..Default::default()
        }
    );
    // The same on replay.
    let mut replay = c
        .subscribe(with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                since: Some(0),
                ..Default::default()
            },
            Some(WATCHER),
        ))
        .await
        .unwrap()
        .into_inner();
    let replayed = next_notification(&mut replay).await;
    assert_eq!((replayed.seq, replayed.id.as_str()), (written.seq, ""));
}

/// SIGHUP reloads the auth file: a new token works at once, the streams of a
/// removed token end with UNAUTHENTICATED, and a file that does not parse
/// keeps the configuration in force.
#[tokio::test]
async fn sighup_rotates_tokens_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path());
    let server = ProcessServer::start_with(
        &dir.path().join("agsync.db"),
        &["--auth", auth.to_str().unwrap()],
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    c.create_database(with_token(
        CreateDatabaseRequest {
            name: "cars".into(),
            sync_key: "cars.key".into(),
        },
        Some(ADMIN),
    ))
    .await
    .unwrap();
    let mut bob_stream = c
        .subscribe(with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                ..Default::default()
            },
            Some(BOB),
        ))
        .await
        .unwrap()
        .into_inner();
    next_subscribed(&mut bob_stream).await;
    let mut watcher_stream = c
        .subscribe(with_token(
            SubscribeRequest {
                sync_keys: vec!["cars.key".into()],
                ..Default::default()
            },
            Some(WATCHER),
        ))
        .await
        .unwrap()
        .into_inner();
    next_subscribed(&mut watcher_stream).await;
    let list = |token: &'static str| {
        let mut c = c.clone();
        async move {
            c.list_databases(with_token(ListDatabasesRequest {}, Some(token)))
                .await
                .map(drop)
        }
    };
    const CAROL: &str = "Bearer carol-token-0123456789";
    assert_status(list(CAROL).await, Code::Unauthenticated, "unknown token");

    // Bob's token is replaced by Carol's; the watcher's token now names
    // another principal.
    let text = std::fs::read_to_string(&auth)
        .unwrap()
        .replace(
            &agsync::auth::hash_token(BOB.strip_prefix("Bearer ").unwrap()),
            &agsync::auth::hash_token(CAROL.strip_prefix("Bearer ").unwrap()),
        )
        .replace(r#"principal = "watcher""#, r#"principal = "eve""#);
    std::fs::write(&auth, text).unwrap();
    server.signal("HUP");
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), bob_stream.message())
        .await
        .expect("the revoked stream ends")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(status.message().contains("revoked"), "{}", status.message());
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), watcher_stream.message())
        .await
        .expect("the renamed principal's stream ends")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status
            .message()
            .contains(r#"now belongs to principal "eve", not "watcher""#),
        "{}",
        status.message()
    );
    list(CAROL).await.unwrap();
    assert_status(list(BOB).await, Code::Unauthenticated, "unknown token");

    // A broken file is refused; Carol keeps working.
    std::fs::write(&auth, "this is not toml [[").unwrap();
    server
        .logs_after(
            "the auth file did not load; keeping the previous configuration",
            || server.signal("HUP"),
        )
        .await;
    list(CAROL).await.unwrap();
    list(ADMIN).await.unwrap();
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
}
