//! What an operator sees: Prometheus metrics on `--metrics-listen`, and one
//! log line per finished request.
//!
//! - [`GrpcLayer`] measures every gRPC call once, for every service (native
//!   gRPC and gRPC-Web alike), under the go-grpc-prometheus names, and logs
//!   it when it finishes: `debug` normally, `warn` when it was slow or
//!   failed with INTERNAL.
//! - agsync's own metrics are recorded where things happen (writer, hub,
//!   status mapping) through the `metrics` facade, under the names below;
//!   gauges of state (subscribers, queue depth, seqs, pool) are read when
//!   `/metrics` is scraped ([`serve`]'s `collect`).
//!
//! Without `--metrics-listen` no recorder is installed and every metric
//! call is a no-op; the request logs stay.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::{Code, Status};

// gRPC server metrics, as go-grpc-prometheus names them.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub const GRPC_MSG_SENT: &str = "grpc_server_msg_sent_total";
// agsync's own.
pub const WRITES_COMMITTED: &str = "agsync_writes_committed_total";
pub const CONFLICTS: &str = "agsync_conflicts_total";
pub const WRITER_BATCH_SIZE: &str = "agsync_writer_batch_size";
pub const WRITER_COMMIT_SECONDS: &str = "agsync_writer_commit_seconds";
pub const WRITER_QUEUE_DEPTH: &str = "agsync_writer_queue_depth";
pub const READ_BATCH_SIZE: &str = "agsync_read_batch_size";
pub const HEAD_SEQ: &str = "agsync_head_seq";
pub const OLDEST_REPLAYABLE_SEQ: &str = "agsync_oldest_replayable_seq";
pub const SUBSCRIBERS: &str = "agsync_subscribers";
pub const NOTIFICATIONS_DELIVERED: &str = "agsync_notifications_delivered_total";
pub const SUBSCRIBER_OVERFLOWS: &str = "agsync_subscriber_overflows_total";
pub const SUBSCRIBER_CATCHUPS: &str = "agsync_subscriber_catchups_total";
pub const REPLAYED_EVENTS: &str = "agsync_replayed_events_total";
pub const LOG_GAPS: &str = "agsync_log_gaps_total";
pub const AUTH_FAILURES: &str = "agsync_auth_failures_total";
pub const PG_POOL_CONNECTIONS: &str = "agsync_pg_pool_connections";
pub const BUILD_INFO: &str = "agsync_build_info";

const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    300.0,
];
const COMMIT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the process-wide recorder (once: every server in the process
/// shares it) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = [
                (GRPC_HANDLING_SECONDS, &SECONDS_BUCKETS[..]),
                (WRITER_COMMIT_SECONDS, &COMMIT_BUCKETS[..]),
                (WRITER_BATCH_SIZE, &SIZE_BUCKETS[..]),
                (READ_BATCH_SIZE, &SIZE_BUCKETS[..]),
            ]
            .into_iter()
            .fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
                builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                    .expect("non-empty buckets")
            });
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics will be empty");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Every series that exists from the start, at zero, so
            // dashboards and alerts see 0 rather than nothing.
            for name in [
                WRITES_COMMITTED,
                CONFLICTS,
                NOTIFICATIONS_DELIVERED,
                SUBSCRIBER_OVERFLOWS,
                SUBSCRIBER_CATCHUPS,
                REPLAYED_EVENTS,
                LOG_GAPS,
            ] {
                metrics::counter!(name).absolute(0);
            }
            for reason in ["missing", "unknown", "denied"] {
                metrics::counter!(AUTH_FAILURES, "reason" => reason).absolute(0);
            }
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(GRPC_STARTED, "RPCs started on the server.");
    describe_counter!(
        GRPC_HANDLED,
        "RPCs completed on the server, by status code (a stream counts when it ends)."
    );
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "Time from the start of an RPC to its status (streams: their whole life)."
    );
    describe_counter!(
        GRPC_MSG_SENT,
        "Response messages sent (streams: each event)."
    );
    describe_counter!(
        WRITES_COMMITTED,
        "Document writes committed (each Put, Delete and BulkPut item)."
    );
    describe_counter!(
        CONFLICTS,
        "Document writes refused because their rev was not the current one (Put and Delete: ABORTED; BulkPut: that item's error)."
    );
    describe_histogram!(
        WRITER_BATCH_SIZE,
        "Requests committed per transaction (group commit; a BulkPut counts once)."
    );
    describe_histogram!(
        WRITER_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to apply and commit one batch of writes."
    );
    describe_gauge!(
        WRITER_QUEUE_DEPTH,
        "Writes waiting for the writer (--writer-queue is the most)."
    );
    describe_histogram!(
        READ_BATCH_SIZE,
        "Gets answered per coalesced query (SQLite)."
    );
    describe_gauge!(HEAD_SEQ, "The highest committed seq.");
    describe_gauge!(
        OLDEST_REPLAYABLE_SEQ,
        "The oldest seq still in the event log: a Subscribe with since below it minus one gets OUT_OF_RANGE."
    );
    describe_gauge!(SUBSCRIBERS, "Open Subscribe streams.");
    describe_counter!(
        NOTIFICATIONS_DELIVERED,
        "Notifications handed to subscribers' streams."
    );
    describe_counter!(
        SUBSCRIBER_OVERFLOWS,
        "Times a subscriber's live buffer was full, so it fell back to catching up from the log."
    );
    describe_counter!(
        SUBSCRIBER_CATCHUPS,
        "Catch-ups from the log started by subscribers that overflowed."
    );
    describe_counter!(
        REPLAYED_EVENTS,
        "Notifications delivered from the event log (replay after since, and catch-up)."
    );
    describe_counter!(
        LOG_GAPS,
        "Times this node found events pruned from the log before it could publish them (a PostgreSQL node whose tailer fell behind --retain-events): its subscribers were told OUT_OF_RANGE instead of skipping them."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Calls refused by authentication or authorization, by reason: missing (no token), unknown (not a valid token), denied (no grant)."
    );
    describe_gauge!(
        PG_POOL_CONNECTIONS,
        "PostgreSQL connections of the node's pool, by state (in_use, idle); the writer and the LISTEN connection hold one each for as long as the node runs."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which agsync runs."
    );
}

/// Serves the Prometheus text format at `/metrics` on `listener` until
/// `stop`. Before each render `collect` sets the gauges read from state.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handle: PrometheusHandle,
    auth: Arc<crate::auth::Authenticator>,
    collect: F,
    stop: CancellationToken,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    // Histograms keep their samples until upkeep folds them in.
    let upkeep = {
        let (handle, stop) = (handle.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    // A slow or hostile client never holds more than one of a few
    // connections, for a bounded time.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "metrics: {MAX_CONNECTIONS} connections already open; closing a new one"
            );
            continue;
        };
        let (handle, collect, stop) = (handle.clone(), collect.clone(), stop.clone());
        let auth = auth.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (handle, collect, auth) = (handle.clone(), collect.clone(), auth.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(request, &handle, &auth, collect).await,
                    )
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(CONNECTION_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection.as_mut()) => {}
                () = stop.cancelled() => {
                    // Finish a scrape in flight, briefly.
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
    let _ = upkeep.await;
}

/// Scrapes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a scrape may take, headers included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

async fn answer<B, F, Fut>(
    request: Request<B>,
    handle: &PrometheusHandle,
    auth: &crate::auth::Authenticator,
    collect: F,
) -> Response<http_body_util::Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    use tonic::codegen::http::{Method, StatusCode, header};
    let plain = |status: StatusCode, text: &str| {
        let mut response = Response::new(http_body_util::Full::new(Bytes::from(text.to_owned())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n");
    }
    // With --auth, scrapers present a token with the metrics grant, as
    // Prometheus does with `authorization: {credentials: ...}`.
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(e) = auth
        .authenticate(token)
        .and_then(|principal| principal.require_metrics())
    {
        count_auth_failure(&e);
        let status = match e {
            crate::domain::Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut response = plain(status, &format!("{e}\n"));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        return response;
    }
    collect().await;
    let mut response = plain(StatusCode::OK, &handle.render());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Counts a refusal by authentication or authorization (calls and scrapes
/// alike) under its reason; other errors are not counted.
pub fn count_auth_failure(e: &crate::domain::Error) {
    use crate::domain::Error;
    let reason = match e {
        Error::Unauthenticated(credentials, _) => credentials.as_str(),
        Error::Revoked(_) => "unknown",
        Error::PermissionDenied(_) => "denied",
        _ => return,
    };
    metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

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
}

impl GrpcLayer {
    /// Every method of the services in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s); `slow`: unary calls slower than this log a
    /// warning.
    pub fn new(descriptor_sets: &[&[u8]], slow: Duration) -> GrpcLayer {
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
        }
    }
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
        );
        let kind = |path: &str| layer.methods.get(path).map(|m| m.kind);
        assert_eq!(kind("/agsync.v1.SyncService/Put"), Some("unary"));
        assert_eq!(
            kind("/agsync.v1.SyncService/Subscribe"),
            Some("server_stream")
        );
        assert_eq!(kind("/grpc.health.v1.Health/Watch"), Some("server_stream"));
        assert_eq!(kind("/agsync.v1.SyncService/Nope"), None);
        assert_eq!(layer.methods.len(), 11 + 2); // Health: Check and Watch
    }
}
