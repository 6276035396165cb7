//! The `/metrics` endpoint: Prometheus's text format over HTTP/1.1 on
//! `--metrics-listen`, with the metrics grant checked when `--auth` is on.
//! A few connections at a time, each for a bounded time. Must not: serve
//! anything but `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::http::{Request, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::count_auth_failure;

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
    use hyper::http::{Method, StatusCode, header};
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
