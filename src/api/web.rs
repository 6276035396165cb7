//! Browsers: gRPC-Web on the gRPC port, and CORS for the web pages allowed to
//! call agsync (`--cors-allow-origin`).
//!
//! Every request passes, outermost first, through:
//! 1. the origin gate: a request from a web page whose origin is not allowed
//!    is refused before anything else, with no CORS header: a preflight, a
//!    gRPC-Web call, or anything a page could send without a preflight (a
//!    `text/plain` POST over HTTP/2 would otherwise reach tonic). Only native
//!    gRPC passes, which a page cannot send without a preflight and a proxy
//!    may forward with the page's Origin;
//! 2. CORS (only with `--cors-allow-origin`): answers preflights of allowed
//!    origins, and adds the CORS headers to their responses;
//! 3. `tonic-web`: translates gRPC-Web (HTTP/1.1 or HTTP/2, binary or base64
//!    text) to gRPC and back; native gRPC passes through untouched;
//! 4. the trailers frame: a gRPC-Web call that fails before its first message
//!    gets its status (and the rich details, e.g. a conflict's current
//!    document) in a trailers frame, not in HTTP headers.
//!
//! Inside these, `api::calls` measures and logs every call, and `api::guard`
//! admits each `SyncService` call.
//!
//! Each streamed message is written out as it comes (hyper flushes every
//! chunk), and a page that goes away closes its connection, which drops the
//! call and with it the subscriber.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryFutureExt;
use futures_util::future::{Either, MapOk};
use http_body::Frame;
use http_body_util::StreamBody;
use tonic::codegen::http::header::{
    ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, ORIGIN, VARY,
};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Request headers a page may send: what gRPC-Web clients (grpc-web,
/// connect-web, improbable-eng) set, and the bearer token.
const ALLOW_HEADERS: [&str; 10] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "authorization",
    "connect-protocol-version",
    "connect-timeout-ms",
    "x-requested-with",
];

/// Response headers a page may read: the status, its message, and the rich
/// details (a conflict's current document) that come as trailers-only
/// headers when a call fails at once.
const EXPOSE_HEADERS: [&str; 4] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
];

/// How long a browser may cache a preflight (Chromium caps it at 2 hours).
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The web origins allowed to call agsync, from `--cors-allow-origin`.
#[derive(Debug, Clone, Default)]
pub enum Origins {
    /// No cross-origin access (the default).
    #[default]
    None,
    /// Any origin (`*`).
    Any,
    /// Exactly these origins (`scheme://host[:port]`).
    List(Vec<HeaderValue>),
}

impl Origins {
    /// From the flag's values, each already checked by [`parse_origin`].
    pub fn from_flags(values: &[String]) -> Origins {
        if values.is_empty() {
            Origins::None
        } else if values.iter().any(|v| v == "*") {
            Origins::Any
        } else {
            Origins::List(
                values
                    .iter()
                    .filter_map(|v| HeaderValue::from_str(v).ok())
                    .collect(),
            )
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        match self {
            Origins::None => false,
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o == origin),
        }
    }

    /// The CORS layer, or none when no origin is allowed (then responses
    /// carry no CORS header at all, as before gRPC-Web existed).
    pub fn cors(&self) -> Option<CorsLayer> {
        let allow_origin = match self {
            Origins::None => return None,
            Origins::Any => AllowOrigin::any(),
            Origins::List(list) => AllowOrigin::list(list.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_methods([Method::POST])
                .allow_headers(ALLOW_HEADERS.map(HeaderName::from_static))
                .expose_headers(EXPOSE_HEADERS.map(HeaderName::from_static))
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

/// Checks a `--cors-allow-origin` value: `*`, or an origin as browsers send
/// it: `http` or `https`, a host, an optional port, and nothing after.
pub fn parse_origin(value: &str) -> Result<String, String> {
    if value == "*" {
        return Ok(value.to_string());
    }
    let bad = |why: &str| {
        Err(format!(
            "{value:?} is not a web origin ({why}): give it as a browser sends it in the Origin header, e.g. https://app.example.com or http://localhost:8080, or * for any"
        ))
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return bad("no scheme");
    };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme must be http or https");
    }
    if rest.is_empty() {
        return bad("no host");
    }
    if rest.contains(['/', '?', '#', '@']) {
        return bad("an origin has no path, query, user or trailing slash");
    }
    if rest
        .chars()
        .any(|c| c.is_whitespace() || c.is_ascii_uppercase())
    {
        return bad("browsers send it in lower case, without spaces");
    }
    let port = match rest.rsplit_once(':') {
        // A bracketed IPv6 address without a port ends in ']'.
        Some((_, port)) if !port.ends_with(']') => Some(port),
        _ => None,
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return bad("the port must be a number up to 65535");
    }
    if HeaderValue::from_str(value).is_err() {
        return bad("it is not a valid header value");
    }
    Ok(value.to_string())
}

/// Refuses preflights and gRPC-Web calls from pages of origins that are not
/// allowed.
#[derive(Debug, Clone)]
pub struct OriginGateLayer {
    origins: Arc<Origins>,
}

impl OriginGateLayer {
    pub fn new(origins: Origins) -> Self {
        OriginGateLayer {
            origins: Arc::new(origins),
        }
    }
}

impl<S> tower::Layer<S> for OriginGateLayer {
    type Service = OriginGate<S>;

    fn layer(&self, inner: S) -> OriginGate<S> {
        OriginGate {
            inner,
            origins: self.origins.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OriginGate<S> {
    inner: S,
    origins: Arc<Origins>,
}

impl<S, B> tower::Service<Request<B>> for OriginGate<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if is_grpc_web(request.headers()) {
            request.extensions_mut().insert(WebCall);
        }
        let headers = request.headers();
        let refusal = match headers.get(ORIGIN) {
            Some(origin) if !self.origins.allows(origin) => {
                if request.method() == Method::OPTIONS
                    && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
                {
                    Some(preflight_refused())
                } else if is_native_grpc(headers) {
                    // A proxy translating gRPC-Web (Envoy) may forward the
                    // page's Origin; a page itself cannot send this content
                    // type without a preflight, which is refused above.
                    None
                } else {
                    // gRPC-Web, or anything a page can send without a
                    // preflight (text/plain...): never served.
                    Some(call_refused(origin))
                }
            }
            _ => None,
        };
        match refusal {
            Some(response) => Either::Right(ready(Ok(response))),
            None => Either::Left(self.inner.call(request)),
        }
    }
}

/// Marks a gRPC-Web call for the layers inside `tonic-web`, to which it
/// looks like any gRPC call.
#[derive(Debug, Clone, Copy)]
struct WebCall;

/// Moves the status of a failed gRPC-Web call from the response headers
/// (gRPC's trailers-only form, which tonic uses for every call that fails
/// before its first message) into a trailers frame at the end of the body,
/// where gRPC-Web clients look for it first. Must sit inside `tonic-web`.
#[derive(Debug, Clone, Default)]
pub struct TrailersFrameLayer;

impl<S> tower::Layer<S> for TrailersFrameLayer {
    type Service = TrailersFrame<S>;

    fn layer(&self, inner: S) -> TrailersFrame<S> {
        TrailersFrame { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TrailersFrame<S> {
    inner: S,
}

type Reshape = fn(Response<tonic::body::Body>) -> Response<tonic::body::Body>;

impl<S, B> tower::Service<Request<B>> for TrailersFrame<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MapOk<S::Future, Reshape>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let reshape: Reshape = if request.extensions().get::<WebCall>().is_some() {
            status_into_trailers
        } else {
            std::convert::identity
        };
        self.inner.call(request).map_ok(reshape)
    }
}

const STATUS_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

fn status_into_trailers(mut response: Response<tonic::body::Body>) -> Response<tonic::body::Body> {
    if !response.headers().contains_key(STATUS_HEADERS[0]) {
        return response;
    }
    let mut trailers = HeaderMap::new();
    for name in STATUS_HEADERS {
        if let Some(value) = response.headers_mut().remove(name) {
            trailers.insert(name, value);
        }
    }
    let frame = Ok::<_, tonic::Status>(Frame::trailers(trailers));
    *response.body_mut() =
        tonic::body::Body::new(StreamBody::new(futures_util::stream::iter([frame])));
    response
}

/// `application/grpc` or `application/grpc+...`, but not gRPC-Web.
fn is_native_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc" || (v.starts_with("application/grpc+") && !is_web(v))
        })
}

fn is_web(content_type: &str) -> bool {
    content_type.starts_with("application/grpc-web")
}

fn is_grpc_web(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_web)
}

/// A preflight from an origin that is not allowed: 403 and no CORS header,
/// so the browser does not send the call.
fn preflight_refused() -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::empty());
    *response.status_mut() = StatusCode::FORBIDDEN;
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("origin"));
    response
}

/// A gRPC-Web call from an origin that is not allowed: a trailers-only
/// answer, HTTP 403 and PERMISSION_DENIED, with a message for whoever reads
/// it outside a browser (a browser only reports the missing CORS header).
fn call_refused(origin: &HeaderValue) -> Response<tonic::body::Body> {
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let status = tonic::Status::permission_denied(format!(
        "web pages from {origin} may not call this server: start agsync with --cors-allow-origin {origin}"
    ));
    let mut response = preflight_refused();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/grpc-web+proto"),
    );
    // Only fails for a message that cannot be a header, which this is not.
    let _ = status.add_header(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_as_browsers_send_them() {
        for good in [
            "*",
            "http://localhost:8080",
            "https://app.example.com",
            "http://127.0.0.1:5173",
            "http://[::1]:3000",
            "http://[::1]",
        ] {
            assert_eq!(parse_origin(good).as_deref(), Ok(good));
        }
        for (bad, why) in [
            ("app.example.com", "no scheme"),
            ("ftp://example.com", "http or https"),
            ("https://", "no host"),
            ("https://example.com/", "trailing slash"),
            ("https://example.com/app", "no path"),
            ("https://Example.com", "lower case"),
            ("https://example.com:99999", "port"),
            ("https://example.com:http", "port"),
        ] {
            let err = parse_origin(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn origins_allow_what_the_flags_name() {
        let origin = |s: &'static str| HeaderValue::from_static(s);
        assert!(!Origins::from_flags(&[]).allows(&origin("http://a.test")));
        let any = Origins::from_flags(&["http://a.test".into(), "*".into()]);
        assert!(any.allows(&origin("http://b.test")));
        let list = Origins::from_flags(&["http://a.test".into(), "http://b.test:81".into()]);
        assert!(list.allows(&origin("http://b.test:81")));
        assert!(!list.allows(&origin("http://b.test")));
        assert!(!list.allows(&origin("https://a.test")));
        assert!(Origins::from_flags(&[]).cors().is_none());
        assert!(list.cors().is_some());
    }
}
