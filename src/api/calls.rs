//! Every gRPC call measured once and logged once, for every service (native
//! gRPC and gRPC-Web alike): a tower layer in front of the services that
//! records the go-grpc-prometheus metrics (`telemetry`'s names) and writes
//! one log line when the call ends: `debug` normally, `warn` when it was
//! slow (`--slow-request-ms`) or failed with INTERNAL. It also counts each
//! connection's open calls, to report a connection that reached
//! `--max-concurrent-streams` (its client then queues further calls where
//! the server cannot see them). Must not: read or change a message.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use metrics::{Counter, Histogram};
use tonic::body::Body;
use tonic::codegen::http::{Extensions, HeaderMap, Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use crate::telemetry::{
    CONNECTION_STREAMS_FULL, GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_MSG_SENT, GRPC_STARTED,
};

/// Who made a call, filled in by the auth gate, for the request log.
#[derive(Debug, Clone, Default)]
pub struct PrincipalSlot(Arc<OnceLock<String>>);

impl PrincipalSlot {
    pub fn set(&self, principal: &str) {
        if principal.is_empty() {
            return; // the open mode's one principal: logged as "-"
        }
        let _ = self.0.set(principal.to_owned());
    }

    fn get(&self) -> &str {
        self.0.get().map_or("-", String::as_str)
    }
}

/// The metric handles of one method, made once.
struct MethodMetrics {
    service: String,
    method: String,
    kind: &'static str,
    started: Counter,
    msg_sent: Counter,
    handling: Histogram,
    /// By code (its number), made on first use; no lock on the call path.
    handled: [OnceLock<Counter>; 17],
}

impl MethodMetrics {
    fn new(service: &str, method: &str, kind: &'static str) -> MethodMetrics {
        let labels = [
            ("grpc_service", service.to_owned()),
            ("grpc_method", method.to_owned()),
            ("grpc_type", kind.to_owned()),
        ];
        let method = MethodMetrics {
            service: service.into(),
            method: method.into(),
            kind,
            started: metrics::counter!(GRPC_STARTED, &labels),
            msg_sent: metrics::counter!(GRPC_MSG_SENT, &labels),
            handling: metrics::histogram!(GRPC_HANDLING_SECONDS, &labels),
            handled: std::array::from_fn(|_| OnceLock::new()),
        };
        // Served from the start, at 0, as go-grpc-prometheus does.
        method.handled(Code::Ok).absolute(0);
        method
    }

    fn handled(&self, code: Code) -> &Counter {
        let slot = usize::try_from(code as i32).unwrap_or(usize::MAX);
        let slot = self.handled.get(slot).unwrap_or(&self.handled[2]); // Unknown
        slot.get_or_init(|| {
            metrics::counter!(
                GRPC_HANDLED,
                "grpc_service" => self.service.clone(),
                "grpc_method" => self.method.clone(),
                "grpc_type" => self.kind,
                "grpc_code" => code_name(code),
            )
        })
    }
}

/// Measures and logs every gRPC call. The methods are those of the
/// descriptor sets served; any other path counts as service and method
/// "unknown", so a caller cannot make up label values.
#[derive(Clone)]
pub struct GrpcLayer {
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
    unknown: Arc<MethodMetrics>,
    slow: Duration,
    connections: Arc<ConnectionCalls>,
}

impl GrpcLayer {
    /// Every method of the services in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s); `slow`: unary calls slower than this log a
    /// warning; `per_connection`: the server's `--max-concurrent-streams`.
    pub fn new(descriptor_sets: &[&[u8]], slow: Duration, per_connection: u32) -> GrpcLayer {
        use prost::Message;
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        let path = format!("/{full}/{}", method.name());
                        methods.insert(
                            path,
                            Arc::new(MethodMetrics::new(&full, method.name(), kind)),
                        );
                    }
                }
            }
        }
        GrpcLayer {
            methods: Arc::new(methods),
            unknown: Arc::new(MethodMetrics::new("unknown", "unknown", "unknown")),
            slow,
            connections: Arc::new(ConnectionCalls::new(per_connection)),
        }
    }
}

/// The open calls of each connection, by its peer's address (one HTTP/2
/// connection per TCP connection), against the limit the server announces
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`): a client at the limit queues its
/// next calls without a word to the server, so reaching it is counted and
/// logged here.
struct ConnectionCalls {
    limit: u32,
    open: Mutex<HashMap<SocketAddr, u32>>,
    /// When the last warning was logged: at most one per `WARN_EVERY`.
    warned: Mutex<Option<Instant>>,
}

/// A call's place in its connection's count, given back when it ends.
struct ConnectionCall {
    calls: Arc<ConnectionCalls>,
    peer: SocketAddr,
}

impl ConnectionCalls {
    const WARN_EVERY: Duration = Duration::from_secs(10);

    fn new(limit: u32) -> ConnectionCalls {
        ConnectionCalls {
            limit,
            open: Mutex::new(HashMap::new()),
            warned: Mutex::new(None),
        }
    }

    /// Counts a call of the connection `extensions` come from; `None` for
    /// a call without a TCP peer (tests serving a bare service).
    fn open(self: &Arc<Self>, extensions: &Extensions) -> Option<ConnectionCall> {
        let peer = peer(extensions)?;
        let now_open = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = open.entry(peer).or_insert(0);
            *n += 1;
            *n
        };
        if now_open == self.limit {
            self.reached(peer);
        }
        Some(ConnectionCall {
            calls: self.clone(),
            peer,
        })
    }

    fn reached(&self, peer: SocketAddr) {
        metrics::counter!(CONNECTION_STREAMS_FULL).increment(1);
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.is_none_or(|at| at.elapsed() >= Self::WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                %peer,
                limit = self.limit,
                "a connection has --max-concurrent-streams calls open: its client holds further calls back until one ends (raise the flag, or spread calls over more connections); logged at most every 10 s, counted in agsync_connection_streams_full_total"
            );
        }
    }
}

impl Drop for ConnectionCall {
    fn drop(&mut self) {
        let mut open = self
            .calls
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// The peer address tonic recorded for the call's connection, plain or TLS.
fn peer(extensions: &Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = Grpc<S>;

    fn layer(&self, inner: S) -> Grpc<S> {
        Grpc {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Grpc<S> {
    inner: S,
    layer: GrpcLayer,
}

impl<S, B> tower::Service<Request<B>> for Grpc<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let method = self
            .layer
            .methods
            .get(request.uri().path())
            .unwrap_or(&self.layer.unknown)
            .clone();
        method.started.increment(1);
        let principal = PrincipalSlot::default();
        request.extensions_mut().insert(principal.clone());
        let start = Instant::now();
        let deadline = grpc_timeout(request.headers()).and_then(|t| start.checked_add(t));
        let call = CallRecord {
            method,
            principal,
            start,
            deadline,
            slow: self.layer.slow,
            messages: 0,
            done: false,
            _connection: self.layer.connections.open(request.extensions()),
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            // A call that failed before its first message (trailers-only).
            if let Some(code) = status_code(response.headers()) {
                let mut call = call;
                call.finish(code, response.headers());
                return Ok(response);
            }
            let body = std::mem::take(response.body_mut());
            *response.body_mut() = Body::new(Metered {
                inner: body,
                call,
                framing: Framing::default(),
            });
            Ok(response)
        })
    }
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn status_code(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(Status::GRPC_STATUS)?;
    let code = value.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(code))
}

/// One call, from its start to its status.
struct CallRecord {
    method: Arc<MethodMetrics>,
    principal: PrincipalSlot,
    start: Instant,
    /// From the client's `grpc-timeout`: a call dropped past it timed out.
    deadline: Option<Instant>,
    slow: Duration,
    messages: u64,
    done: bool,
    /// Held for the call's whole life (a stream's included).
    _connection: Option<ConnectionCall>,
}

impl CallRecord {
    fn finish(&mut self, code: Code, status_headers: &HeaderMap) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.start.elapsed();
        let m = &self.method;
        m.handled(code).increment(1);
        m.handling.record(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let principal = self.principal.get();
        let message = || {
            status_headers
                .get(Status::GRPC_MESSAGE)
                .and_then(|v| v.to_str().ok())
                .map(percent_encoding_free)
                .unwrap_or_default()
        };
        let method = format!("{}/{}", m.service, m.method);
        if code == Code::Internal {
            tracing::warn!(%method, code = code_name(code), duration_ms, principal, message = %message(), "request failed with INTERNAL");
        } else if m.kind == "unary" && elapsed > self.slow {
            tracing::warn!(%method, code = code_name(code), duration_ms, principal, "slow request (--slow-request-ms)");
        } else {
            tracing::debug!(%method, code = code_name(code), duration_ms, principal, messages = self.messages, "request finished");
        }
    }
}

/// gRPC messages are percent-encoded in `grpc-message`; for the log, the
/// common escapes are enough.
fn percent_encoding_free(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&value[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for CallRecord {
    /// The call ended before its status was sent: its deadline passed
    /// (tonic drops it), or the client went away.
    fn drop(&mut self) {
        let code = if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Code::DeadlineExceeded
        } else {
            Code::Cancelled
        };
        self.finish(code, &HeaderMap::new());
    }
}

/// Counts whole gRPC messages in a response body (5-byte header, then the
/// message) across data frames of any size.
#[derive(Default)]
struct Framing {
    /// Bytes of the current message's header seen so far.
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to skip.
    remaining: usize,
}

impl Framing {
    /// Feeds `data`; returns how many messages started in it.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len());
                self.remaining -= skip;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                started += 1;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.remaining = len as usize;
            }
        }
        started
    }
}

struct Metered {
    inner: Body,
    call: CallRecord,
    framing: Framing,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let sent = this.framing.feed(data);
                    this.call.messages += sent;
                    this.call.method.msg_sent.increment(sent);
                } else if let Some(trailers) = frame.trailers_ref() {
                    let code = status_code(trailers).unwrap_or(Code::Unknown);
                    this.call.finish(code, trailers);
                }
            }
            Some(Err(status)) => {
                let mut headers = HeaderMap::new();
                let _ = status.add_header(&mut headers);
                this.call.finish(status.code(), &headers);
            }
            None => this.call.finish(Code::Ok, &HeaderMap::new()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The code's name as gRPC spells it (`OK`, `NotFound`... as
/// go-grpc-prometheus labels them).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_counts_messages_split_anywhere() {
        let message = |len: u32| {
            let mut m = vec![0u8];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let stream: Vec<u8> = [message(3), message(0), message(70_000), message(1)].concat();
        for chunk in [1, 2, 5, 6, 4096, stream.len()] {
            let mut framing = Framing::default();
            let counted: u64 = stream.chunks(chunk).map(|c| framing.feed(c)).sum();
            assert_eq!(counted, 4, "chunks of {chunk}");
            assert_eq!((framing.header_len, framing.remaining), (0, 0));
        }
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let timeout = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(timeout("5x"), None);
        assert_eq!(timeout("S"), None);
        assert_eq!(timeout(""), None);
    }

    #[test]
    fn the_layer_knows_every_served_method_and_its_type() {
        let layer = GrpcLayer::new(
            &[
                crate::pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            Duration::from_secs(1),
            100,
        );
        let kind = |path: &str| layer.methods.get(path).map(|m| m.kind);
        assert_eq!(kind("/agsync.v1.SyncService/Put"), Some("unary"));
        assert_eq!(
            kind("/agsync.v1.SyncService/Subscribe"),
            Some("server_stream")
        );
        assert_eq!(kind("/grpc.health.v1.Health/Watch"), Some("server_stream"));
        assert_eq!(kind("/agsync.v1.SyncService/Nope"), None);
        assert_eq!(layer.methods.len(), 12 + 2); // Health: Check and Watch
    }
}
