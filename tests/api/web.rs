//! gRPC-Web, as a browser speaks it, through a raw HTTP client (hyper's
//! HTTP/1.1 and HTTP/2 connections, no gRPC library): unary calls in binary
//! and text, a Subscribe stream that delivers notifications one by one, the
//! trailers frame with the status and the conflict details, CORS, and auth.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use agsync::pb;
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::Code;

use crate::helpers::*;

const BINARY: &str = "application/grpc-web+proto";
const TEXT: &str = "application/grpc-web-text";
const APP: &str = "http://app.test:8080";
const EVIL: &str = "http://evil.test";

/// A TLS connection to `addr` trusting `ca`, offering `alpn`.
async fn tls_stream(
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("the test CA");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// One HTTP connection to the server, as a browser holds it.
enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Web {
    /// `http://ADDR` or, over TLS, `https://localhost:PORT`.
    origin: String,
    conn: Conn,
    driver: JoinHandle<()>,
    /// `BINARY` or `TEXT`: how requests are sent and responses asked for.
    encoding: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Drop for Web {
    fn drop(&mut self) {
        // Closes the connection, as a closed tab does.
        self.driver.abort();
    }
}

impl Web {
    async fn http1(addr: SocketAddr) -> Web {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Web::new(format!("http://{addr}"), Conn::Http1(sender), driver)
    }

    /// HTTP/2 with prior knowledge (cleartext).
    async fn http2(addr: SocketAddr) -> Web {
        let io = TcpStream::connect(addr).await.expect("connect");
        Web::over_http2(format!("http://{addr}"), io).await
    }

    /// TLS offering HTTP/2 and HTTP/1.1 by ALPN, as a browser does; the
    /// server must pick HTTP/2.
    async fn tls(addr: SocketAddr, ca: CertificateDer<'static>) -> Web {
        let tls = tls_stream(addr, ca, &[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        Web::over_http2(format!("https://localhost:{}", addr.port()), tls).await
    }

    /// TLS offering only HTTP/1.1 by ALPN, as some proxies and tools do:
    /// the server must accept it and serve HTTP/1.1.
    async fn tls_http1(addr: SocketAddr, ca: CertificateDer<'static>) -> Web {
        let tls = tls_stream(addr, ca, &[b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Web::new(
            format!("https://localhost:{}", addr.port()),
            Conn::Http1(sender),
            driver,
        )
    }

    async fn over_http2<T>(origin: String, io: T) -> Web
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("HTTP/2 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Web::new(origin, Conn::Http2(sender), driver)
    }

    fn new(origin: String, conn: Conn, driver: JoinHandle<()>) -> Web {
        Web {
            origin,
            conn,
            driver,
            encoding: BINARY,
            headers: vec![("x-grpc-web", "1".into())],
        }
    }

    fn text(mut self) -> Web {
        self.encoding = TEXT;
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Web {
        self.headers.push((name, value.into()));
        self
    }

    /// Sends one call and returns the response with its body unread.
    async fn call(&mut self, method: &str, message: &impl Message) -> Response {
        let mut frame = vec![0u8];
        let payload = message.encode_to_vec();
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        let body = if self.encoding == TEXT {
            Bytes::from(base64::engine::general_purpose::STANDARD.encode(frame))
        } else {
            Bytes::from(frame)
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/agsync.v1.SyncService/{method}", self.origin))
            .header("content-type", self.encoding)
            .header("accept", self.encoding);
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(body)).unwrap();
        let response = match &mut self.conn {
            Conn::Http1(sender) => {
                sender.ready().await.expect("connection ready");
                sender.send_request(request).await
            }
            Conn::Http2(sender) => {
                sender.ready().await.expect("connection ready");
                sender.send_request(request).await
            }
        }
        .expect("response");
        let (parts, body) = response.into_parts();
        Response {
            status: parts.status,
            headers: parts.headers,
            text: self.encoding == TEXT,
            body,
            raw: BytesMut::new(),
            decoded: BytesMut::new(),
        }
    }

    /// A unary call, read to the end.
    async fn unary(&mut self, method: &str, message: &impl Message) -> Finished {
        let mut response = self.call(method, message).await;
        let mut messages = Vec::new();
        let trailers = loop {
            match response.next_frame().await {
                Some(WebFrame::Message(m)) => messages.push(m),
                Some(WebFrame::Trailers(t)) => break t,
                None => panic!("the body ended without a trailers frame"),
            }
        };
        assert!(
            response.next_frame().await.is_none(),
            "nothing after the trailers frame"
        );
        Finished {
            status: response.status,
            headers: response.headers,
            messages,
            trailers,
        }
    }
}

struct Response {
    status: StatusCode,
    headers: HeaderMap,
    text: bool,
    body: Incoming,
    /// Body bytes not decoded yet (base64 in text mode).
    raw: BytesMut,
    /// Decoded bytes not yet split into frames.
    decoded: BytesMut,
}

#[derive(Debug)]
enum WebFrame {
    Message(Bytes),
    Trailers(HashMap<String, String>),
}

impl Response {
    /// The next gRPC-Web frame, waiting at most 10 s; None at the end.
    async fn next_frame(&mut self) -> Option<WebFrame> {
        loop {
            if self.decoded.len() >= 5 {
                let len = u32::from_be_bytes(self.decoded[1..5].try_into().unwrap()) as usize;
                if self.decoded.len() >= 5 + len {
                    let flag = self.decoded[0];
                    self.decoded.advance(5);
                    let payload = self.decoded.split_to(len).freeze();
                    return Some(if flag & 0x80 == 0 {
                        WebFrame::Message(payload)
                    } else {
                        WebFrame::Trailers(parse_trailers(&payload))
                    });
                }
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("a frame within 10 s");
            let Some(frame) = frame else {
                assert!(self.decoded.is_empty() && self.raw.is_empty(), "truncated");
                return None;
            };
            let frame = frame.expect("body frame");
            let Ok(data) = frame.into_data() else {
                panic!("gRPC-Web sends no HTTP trailers");
            };
            if self.text {
                // Each chunk is padded base64 on its own; decode whole quads.
                self.raw.extend_from_slice(&data);
                let whole = self.raw.len() / 4 * 4;
                let quads = self.raw.split_to(whole);
                for quad in quads.chunks(4) {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(quad)
                        .expect("base64");
                    self.decoded.extend_from_slice(&bytes);
                }
            } else {
                self.decoded.extend_from_slice(&data);
            }
        }
    }

    async fn next_event(&mut self) -> pb::subscribe_response::Event {
        match self.next_frame().await {
            Some(WebFrame::Message(m)) => pb::SubscribeResponse::decode(m)
                .expect("SubscribeResponse")
                .event
                .expect("event set"),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

fn parse_trailers(block: &[u8]) -> HashMap<String, String> {
    std::str::from_utf8(block)
        .expect("trailers are text")
        .split("\r\n")
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').expect("name:value");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect()
}

struct Finished {
    status: StatusCode,
    headers: HeaderMap,
    messages: Vec<Bytes>,
    trailers: HashMap<String, String>,
}

impl Finished {
    /// The call's outcome as a tonic Status, from the trailers frame.
    fn status(&self) -> tonic::Status {
        let code: i32 = self.trailers["grpc-status"].parse().expect("a code");
        let message = self
            .trailers
            .get("grpc-message")
            .map(|m| percent_decode(m))
            .unwrap_or_default();
        let details = self
            .trailers
            .get("grpc-status-details-bin")
            .map(|d| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(d.trim_end_matches('='))
                    .expect("base64 details")
            })
            .unwrap_or_default();
        tonic::Status::with_details(Code::from_i32(code), message, details.into())
    }

    fn ok<M: Message + Default>(&self) -> M {
        let status = self.status();
        assert_eq!(status.code(), Code::Ok, "{}", status.message());
        assert_eq!(self.messages.len(), 1, "one response message");
        M::decode(self.messages[0].clone()).expect("response message")
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 message")
}

fn create_request(name: &str, sync_key: &str) -> pb::CreateDatabaseRequest {
    pb::CreateDatabaseRequest {
        name: name.into(),
        sync_key: sync_key.into(),
    }
}

/// Subscribe to "cars.key", live only.
fn cars_subscription() -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        sync_keys: vec!["cars.key".into()],
        since: None,
        alias: String::new(),
    }
}

fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn unary_calls_over_http1_and_http2_in_binary_and_text() {
    let srv = TestServer::start().await;
    let mut h1 = Web::http1(srv.addr).await;
    let created: pb::CreateDatabaseResponse = h1
        .unary("CreateDatabase", &create_request("cars", "cars.key"))
        .await
        .ok();
    assert_eq!(created.database.unwrap().name, "cars");

    // Two calls on one HTTP/1.1 connection (keep-alive), then text mode.
    let mut h1 = h1.text();
    let listed = h1
        .unary("ListDatabases", &pb::ListDatabasesRequest {})
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(
        listed.headers["content-type"],
        "application/grpc-web-text+proto"
    );
    let listed: pb::ListDatabasesResponse = listed.ok();
    assert_eq!(listed.databases[0].name, "cars");

    let mut h2 = Web::http2(srv.addr).await;
    let put = h2
        .unary(
            "Put",
            &pb::PutRequest {
                request_id: String::new(),
                database: "cars".into(),
                id: "tesla".into(),
                rev: String::new(),
                body: Some(body(json!({"make": "Tesla"}))),
                notify_aliases: vec![],
            },
        )
        .await;
    assert_eq!(put.headers["content-type"], BINARY);
    let put: pb::PutResponse = put.ok();
    assert_eq!(generation(&put.rev), 1);

    // Native gRPC on the same port sees what gRPC-Web wrote.
    let mut native = srv.client.clone();
    let doc = get(&mut native, "cars", "tesla").await.unwrap();
    assert_eq!(doc.rev, put.rev);
    assert_eq!(json(doc.body.as_ref().unwrap()), json!({"make": "Tesla"}));
}

#[tokio::test]
async fn a_conflict_comes_in_the_trailers_frame_with_the_current_document() {
    let srv = TestServer::start().await;
    let mut native = srv.client.clone();
    create_db(&mut native, "cars").await;
    let v1 = put(&mut native, "cars", "tesla", "", json!({"n": 1}))
        .await
        .unwrap();
    let v2 = put(&mut native, "cars", "tesla", &v1.rev, json!({"n": 2}))
        .await
        .unwrap();

    for mut web in [
        Web::http1(srv.addr).await,
        Web::http1(srv.addr).await.text(),
    ] {
        let stale = web
            .unary(
                "Put",
                &pb::PutRequest {
                    request_id: String::new(),
                    database: "cars".into(),
                    id: "tesla".into(),
                    rev: v1.rev.clone(),
                    body: Some(body(json!({"n": 3}))),
                    notify_aliases: vec![],
                },
            )
            .await;
        // The status is in the trailers frame, not in the HTTP headers.
        assert_eq!(stale.status, StatusCode::OK);
        assert!(stale.messages.is_empty());
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            assert!(!stale.headers.contains_key(name), "{name} in the headers");
        }
        let status = stale.status();
        assert!(
            status.message().contains("conflict"),
            "{}",
            status.message()
        );
        let details = conflict_details(&status);
        assert_eq!(details.info.reason, "CONFLICT");
        assert_eq!(details.info.metadata["current_rev"], v2.rev);
        let current = details.current.expect("the current document");
        assert_eq!(current.rev, v2.rev);
        assert_eq!(json(current.body.as_ref().unwrap()), json!({"n": 2}));
    }
    let doc = get(&mut native, "cars", "tesla").await.unwrap();
    assert_eq!(doc.rev, v2.rev, "the stale write changed nothing");
}

#[tokio::test]
async fn subscribe_delivers_each_notification_as_it_is_published() {
    let srv = TestServer::start().await;
    let mut native = srv.client.clone();
    native
        .create_database(create_request("cars", "cars.key"))
        .await
        .unwrap();
    for web in [
        Web::http1(srv.addr).await,
        Web::http1(srv.addr).await.text(),
    ] {
        let mut web = web;
        let mut stream = web.call("Subscribe", &cars_subscription()).await;
        assert_eq!(stream.status, StatusCode::OK);
        match stream.next_event().await {
            pb::subscribe_response::Event::Subscribed(_) => {}
            other => panic!("expected subscribed, got {other:?}"),
        }
        // Each notification arrives before the next write is made: nothing
        // waits in a buffer for more data.
        for i in 0..3 {
            let id = format!("car-{}-{i}", web.encoding.len());
            let written = put(&mut native, "cars", &id, "", json!({"i": i}))
                .await
                .unwrap();
            match tokio::time::timeout(Duration::from_secs(2), stream.next_event())
                .await
                .expect("the notification within 2 s")
            {
                pb::subscribe_response::Event::Notification(n) => {
                    assert_eq!((n.seq, n.database.as_str()), (written.seq, "cars"));
                    assert_eq!(n.id, id);
                }
                other => panic!("expected a notification, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_closed_page_unregisters_its_subscriber_promptly() {
    let srv = TestServer::start_with(|c| c.max_subscribers = 1).await;
    let mut native = srv.client.clone();
    let request = cars_subscription();
    let mut web = Web::http1(srv.addr).await;
    let mut stream = web.call("Subscribe", &request).await;
    assert!(matches!(
        stream.next_event().await,
        pb::subscribe_response::Event::Subscribed(_)
    ));
    // The one place is taken while the page is open...
    assert_status(
        subscribe(&mut native, &["cars.key"], None, "").await,
        Code::ResourceExhausted,
        "subscribers",
    );
    // ...and given back soon after the tab closes its connection.
    drop(stream);
    drop(web);
    let started = std::time::Instant::now();
    loop {
        match subscribe(&mut native, &["cars.key"], None, "").await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "the closed page's subscriber still holds its place after 2 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
}

#[tokio::test]
async fn cors_lets_allowed_origins_in_and_keeps_others_out() {
    let srv = TestServer::start_with(|c| c.cors_allow_origin = vec![APP.into()]).await;
    let preflight = |origin: &'static str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(format!("http://{}/agsync.v1.SyncService/Put", srv.addr))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,grpc-timeout,x-grpc-web,x-user-agent,connect-protocol-version",
            )
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let send = |request: Request<Full<Bytes>>| async {
        let mut web = Web::http1(srv.addr).await;
        let Conn::Http1(sender) = &mut web.conn else {
            unreachable!()
        };
        sender.send_request(request).await.expect("response")
    };

    let allowed = send(preflight(APP)).await;
    assert_eq!(allowed.status(), StatusCode::OK);
    let h = allowed.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-methods"], "POST");
    let allow_headers = h["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "authorization",
        "connect-protocol-version",
    ] {
        assert!(
            allow_headers.contains(name),
            "{name} not in {allow_headers}"
        );
    }

    let refused = send(preflight(EVIL)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(cors_headers(refused.headers()), Vec::<String>::new());

    // A call from the allowed page: readable status, details and message.
    let mut web = Web::http1(srv.addr).await.header("origin", APP);
    let created = web
        .unary("CreateDatabase", &create_request("cars", ""))
        .await;
    assert_eq!(created.headers["access-control-allow-origin"], APP);
    let exposed = created.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
    let _: pb::CreateDatabaseResponse = created.ok();

    // A call from another page is refused and has no effect, even if a
    // browser sent it.
    let mut evil = Web::http1(srv.addr).await.header("origin", EVIL);
    let response = evil
        .call("CreateDatabase", &create_request("evil", ""))
        .await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    assert_eq!(cors_headers(&response.headers), Vec::<String>::new());
    assert_eq!(response.headers["grpc-status"], "7");
    assert!(
        percent_decode(response.headers["grpc-message"].to_str().unwrap())
            .contains("start agsync with --cors-allow-origin http://evil.test"),
    );
    let mut native = srv.client.clone();
    let names: Vec<String> = native
        .list_databases(pb::ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .databases
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["cars"]);
}

#[tokio::test]
async fn without_the_flag_no_page_gets_in_and_nothing_else_changes() {
    let srv = TestServer::start().await;
    let mut web = Web::http1(srv.addr).await.header("origin", APP);
    let response = web
        .call("CreateDatabase", &create_request("cars", ""))
        .await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    assert_eq!(cors_headers(&response.headers), Vec::<String>::new());

    // gRPC-Web without an Origin (not from a page) is served...
    let mut web = Web::http1(srv.addr).await;
    let _: pb::CreateDatabaseResponse = web
        .unary("CreateDatabase", &create_request("cars", ""))
        .await
        .ok();
    // ...and native gRPC responses carry no CORS header.
    let mut native = srv.client.clone();
    let response = native
        .list_databases(pb::ListDatabasesRequest {})
        .await
        .unwrap();
    let metadata = response.metadata().clone().into_headers();
    assert_eq!(cors_headers(&metadata), Vec::<String>::new());
    assert_eq!(response.into_inner().databases.len(), 1);
}

#[tokio::test]
async fn any_origin_with_a_star() {
    let srv = TestServer::start_with(|c| c.cors_allow_origin = vec!["*".into()]).await;
    let mut web = Web::http1(srv.addr).await.header("origin", EVIL);
    let created = web
        .unary("CreateDatabase", &create_request("cars", ""))
        .await;
    assert_eq!(created.headers["access-control-allow-origin"], "*");
    let _: pb::CreateDatabaseResponse = created.ok();
}

#[tokio::test]
async fn auth_travels_in_the_authorization_header() {
    const TOKEN: &str = "web-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        format!(
            "[[token]]\nprincipal = \"page\"\nhash = \"{}\"\nread = [\"cars\"]\nwrite = [\"cars\"]\n\n[[token]]\nprincipal = \"admin\"\nhash = \"{}\"\nadmin = true\n",
            agsync::auth::hash_token(TOKEN),
            agsync::auth::hash_token("admin-token-0123456789"),
        ),
    )
    .unwrap();
    let srv = TestServer::start_with(|c| {
        c.auth = Some(path);
        c.cors_allow_origin = vec![APP.into()];
    })
    .await;
    let request = pb::NewIdRequest { count: 1 };

    let mut anonymous = Web::http1(srv.addr).await.header("origin", APP);
    let refused = anonymous.unary("NewId", &request).await;
    assert_eq!(refused.status().code(), Code::Unauthenticated);
    assert_eq!(refused.headers["access-control-allow-origin"], APP);

    let mut wrong = Web::http1(srv.addr)
        .await
        .header("origin", APP)
        .header("authorization", "Bearer not-a-token-0123456789");
    assert_eq!(
        wrong.unary("NewId", &request).await.status().code(),
        Code::Unauthenticated
    );

    let mut page = Web::http1(srv.addr)
        .await
        .header("origin", APP)
        .header("authorization", &format!("Bearer {TOKEN}"));
    let ids: pb::NewIdResponse = page.unary("NewId", &request).await.ok();
    assert_eq!(ids.ids.len(), 1);
    // Its grants apply: it may not create databases.
    let denied = page
        .unary("CreateDatabase", &create_request("cars", ""))
        .await;
    assert_eq!(denied.status().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn over_tls_browsers_get_http2_and_one_connection_carries_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = self_signed_tls(dir.path());
    let srv = TestServer::start_with(|c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
        c.cors_allow_origin = vec![APP.into()];
    })
    .await;
    let mut web = Web::tls(srv.addr, cert.cert.der().clone())
        .await
        .text()
        .header("origin", APP);
    let _: pb::CreateDatabaseResponse = web
        .unary("CreateDatabase", &create_request("cars", "cars.key"))
        .await
        .ok();
    let mut stream = web.call("Subscribe", &cars_subscription()).await;
    assert!(matches!(
        stream.next_event().await,
        pb::subscribe_response::Event::Subscribed(_)
    ));
    // While the stream is open, a write on the same connection.
    let put: pb::PutResponse = web
        .unary(
            "Put",
            &pb::PutRequest {
                request_id: String::new(),
                database: "cars".into(),
                id: "tesla".into(),
                rev: String::new(),
                body: Some(body(json!({"make": "Tesla"}))),
                notify_aliases: vec![],
            },
        )
        .await
        .ok();
    match stream.next_event().await {
        pb::subscribe_response::Event::Notification(n) => assert_eq!(n.seq, put.seq),
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// A client that offers only HTTP/1.1 by ALPN (gRPC-Web from some proxies
/// and tools) is served over TLS: unary calls and a stream.
#[tokio::test]
async fn over_tls_a_client_offering_only_http1_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = self_signed_tls(dir.path());
    let srv = TestServer::start_with(|c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
    })
    .await;
    let mut web = Web::tls_http1(srv.addr, cert.cert.der().clone()).await;
    let _: pb::CreateDatabaseResponse = web
        .unary("CreateDatabase", &create_request("cars", "cars.key"))
        .await
        .ok();
    let put: pb::PutResponse = web
        .unary(
            "Put",
            &pb::PutRequest {
                database: "cars".into(),
                id: "beetle".into(),
                body: Some(body(json!({"model": "Beetle"}))),
                ..Default::default()
            },
        )
        .await
        .ok();
    assert_eq!(put.seq, 1);
    // A stream on a connection of its own (HTTP/1.1: one call at a time).
    let mut listening = Web::tls_http1(srv.addr, cert.cert.der().clone()).await;
    let mut stream = listening.call("Subscribe", &cars_subscription()).await;
    assert!(matches!(
        stream.next_event().await,
        pb::subscribe_response::Event::Subscribed(_)
    ));
    let second: pb::PutResponse = web
        .unary(
            "Put",
            &pb::PutRequest {
                database: "cars".into(),
                id: "golf".into(),
                body: Some(body(json!({"model": "Golf"}))),
                ..Default::default()
            },
        )
        .await
        .ok();
    match stream.next_event().await {
        pb::subscribe_response::Event::Notification(n) => assert_eq!(n.seq, second.seq),
        other => panic!("expected a notification, got {other:?}"),
    }
}

#[tokio::test]
async fn a_page_cannot_slip_a_call_through_as_plain_text() {
    let srv = TestServer::start_with(|c| c.cors_allow_origin = vec![APP.into()]).await;
    // What `fetch(url, {mode: "no-cors", body})` sends without a preflight,
    // over HTTP/2 as a browser does with TLS.
    let mut web = Web::http2(srv.addr).await.header("origin", EVIL);
    web.encoding = "text/plain";
    let response = web
        .call("CreateDatabase", &create_request("evil", ""))
        .await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    assert_eq!(cors_headers(&response.headers), Vec::<String>::new());

    // Native gRPC carrying a page's Origin (a proxy that translated
    // gRPC-Web forwards it) is served: a page cannot send it itself.
    let mut native = srv.client.clone();
    let mut request = tonic::Request::new(create_request("cars", ""));
    request
        .metadata_mut()
        .insert("origin", EVIL.parse().unwrap());
    native.create_database(request).await.unwrap();
    let names: Vec<String> = native
        .list_databases(pb::ListDatabasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .databases
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["cars"]);
}
