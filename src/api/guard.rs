//! The gate every `SyncService` call passes before any handler code runs:
//! it authenticates the caller (the `Principal` goes into the request's
//! extensions, where handlers find it), refuses a method that has no access
//! rule, refuses a request message over `--max-request-bytes` unread
//! (RESOURCE_EXHAUSTED), and admits the call under the server's budgets:
//! calls in flight and bytes of large request messages (past either:
//! UNAVAILABLE at once, before the message is read). Must not: run for
//! health or reflection (they stay open and SERVING under load), or let a
//! call through that it did not authenticate.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

use crate::auth::{Authenticator, Principal};
use crate::domain::{Error, Result};

/// What a method needs beyond a valid token. The handler checks the grant
/// itself (it depends on the database or keys named in the request), but a
/// method missing from this table is refused here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `admin`.
    Admin,
    /// `read` on the request's database.
    Read,
    /// `write` on the request's database.
    Write,
    /// `notify` on the request's sync key.
    Notify,
    /// `subscribe` on every requested key; a long-lived stream, bounded by
    /// the subscriber limits rather than the in-flight cap.
    Subscribe,
    /// Any valid token (the reply is filtered by grants, or is harmless).
    Authenticated,
}

/// The access rule of each `SyncService` method; `None`: refused.
pub fn access(method: &str) -> Option<Access> {
    Some(match method {
        "CreateDatabase" | "DeleteDatabase" => Access::Admin,
        "Get" | "Changes" | "Snapshot" => Access::Read,
        "Put" | "Delete" | "BulkPut" => Access::Write,
        "Notify" => Access::Notify,
        "Subscribe" => Access::Subscribe,
        "ListDatabases" | "NewId" => Access::Authenticated,
        _ => return None,
    })
}

/// Request messages above this size count against the large-request budget.
const LARGE_MESSAGE: u32 = 64 * 1024;

/// The budgets the gate admits calls under.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Calls other than Subscribe served at once.
    pub in_flight: usize,
    /// Bytes of large request messages received and served at once.
    pub large_request_bytes: usize,
    /// The largest request message decoded at all (`--max-request-bytes`);
    /// a bigger one takes no budget: the gate refuses it unread
    /// (RESOURCE_EXHAUSTED).
    pub max_request_bytes: usize,
}

/// Wraps the generated `SyncServiceServer`.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    auth: Arc<Authenticator>,
    /// Method names of the service, from the descriptor: a call to any other
    /// path goes to tonic, which answers UNIMPLEMENTED.
    methods: Arc<[String]>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    large: Arc<Semaphore>,
    large_budget: usize,
    max_request: usize,
}

impl<S> Guard<S> {
    pub fn new(inner: S, auth: Arc<Authenticator>, methods: Vec<String>, budgets: Budgets) -> Self {
        let large_budget = budgets.large_request_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Guard {
            inner,
            auth,
            methods: methods.into(),
            in_flight: Arc::new(Semaphore::new(budgets.in_flight.max(1))),
            max_in_flight: budgets.in_flight.max(1),
            large: Arc::new(Semaphore::new(large_budget)),
            large_budget,
            max_request: budgets.max_request_bytes,
        }
    }

    /// Authenticates and applies the method's rule; returns whether the call
    /// is a stream (exempt from the in-flight cap).
    fn admit<B>(&self, request: &mut Request<B>) -> Result<bool> {
        let principal = self
            .auth
            .authenticate(request.headers().get("authorization").map(|v| v.as_bytes()))?;
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let verdict = match access(method) {
            Some(rule) => Ok(rule == Access::Subscribe),
            None if self.methods.iter().any(|m| m == method) => Err(Error::PermissionDenied(
                format!("method {method} has no access rule on this server, so nobody may call it"),
            )),
            None => Ok(false), // not a method of the service: UNIMPLEMENTED
        };
        if let Some(slot) = request
            .extensions()
            .get::<crate::api::calls::PrincipalSlot>()
        {
            slot.set(principal.limit_key());
        }
        request.extensions_mut().insert(principal);
        verdict
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<Request<Body>> for Guard<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // The clone serves the next call; this one uses the instance that
        // was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let refuse = |e: Error| -> Self::Future {
            let response = Status::from(e).into_http();
            Box::pin(async move { Ok(response) })
        };
        let is_stream = match self.admit(&mut request) {
            Ok(is_stream) => is_stream,
            Err(e) => return refuse(e),
        };
        let call_permit = if is_stream {
            None
        } else {
            match self.in_flight.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return refuse(Error::Busy(format!(
                        "the server is serving {} calls, its limit (--max-in-flight)",
                        self.max_in_flight
                    )));
                }
            }
        };
        let large = self.large.clone();
        let (large_budget, max_request) = (self.large_budget, self.max_request);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let admitted = admit_message(body, large, large_budget, max_request).await;
            let (body, mut bytes_permit) = match admitted {
                Ok(admitted) => admitted,
                Err(e) => return Ok(Status::from(e).into_http()),
            };
            let response = inner.call(Request::from_parts(parts, body)).await?;
            if is_stream {
                // A stream's request is decoded once the handler has
                // answered; its bytes must not stay counted for the
                // stream's lifetime.
                bytes_permit = None;
            }
            // The permits are held until the response is sent, not just
            // computed: an encoded response holds memory too.
            let permits = (call_permit, bytes_permit);
            if permits.0.is_none() && permits.1.is_none() {
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(Holding {
                    body,
                    _permits: permits,
                })
            }))
        })
    }
}

/// A response body that holds the call's permits until it is sent or
/// dropped. It forwards `is_end_stream`: a trailers-only response (an error
/// status) must stay one, or clients see a stream without trailers.
struct Holding {
    body: Body,
    _permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
}

impl http_body::Body for Holding {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Reads the 5-byte gRPC message header; a message over `max_request` is
/// refused unread (RESOURCE_EXHAUSTED, as the gRPC spec says for a message
/// over the size limit); one over `LARGE_MESSAGE` takes its size in `large`
/// permits before the rest is read, or is refused.
/// Returns the body with what was read put back in front.
async fn admit_message(
    mut body: Body,
    large: Arc<Semaphore>,
    budget: usize,
    max_request: usize,
) -> Result<(Body, Option<OwnedSemaphorePermit>)> {
    let mut read = Vec::new();
    let mut head = Vec::with_capacity(5);
    while head.len() < 5 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    head.extend_from_slice(&data[..data.len().min(5 - head.len())]);
                }
                read.push(frame);
            }
            Some(Err(e)) => {
                return Err(Error::Unavailable(format!(
                    "the request could not be received ({e})"
                )));
            }
            None => break,
        }
    }
    let length = match head.as_slice() {
        [_, a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    };
    if usize::try_from(length).map_or(true, |l| l > max_request) {
        return Err(Error::Exhausted(format!(
            "the request is too large (--max-request-bytes): its message is {length} bytes; the limit is: {max_request} bytes"
        )));
    }
    let permit = if length > LARGE_MESSAGE {
        // Refused, not queued: a request waiting here would keep its unread
        // bytes in the connection's HTTP/2 window, and enough of them would
        // stall the admitted requests on the same connection for ever. A
        // message bigger than the whole budget needs all of it.
        let wanted = usize::try_from(length).unwrap_or(usize::MAX).min(budget);
        let permit = large
            .try_acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
            .map_err(|_| {
                Error::Busy(format!(
                    "the server is already receiving its limit of large requests (--max-large-request-bytes, {} MiB); this one is {} KiB",
                    budget / (1024 * 1024),
                    length / 1024
                ))
            })?;
        Some(permit)
    } else {
        None
    };
    let front = futures_util::stream::iter(read.into_iter().map(Ok::<_, Status>));
    let body = Body::new(StreamBody::new(front.chain(BodyStream::new(body))));
    Ok((body, permit))
}

/// The caller, as the gate authenticated it. A request that did not pass
/// the gate has none, and is refused.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Arc<Principal>> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| {
            Error::Unauthenticated(
                crate::domain::Credentials::Missing,
                "the call was not authenticated".into(),
            )
        })
}

/// The method names of `service` (e.g. "agsync.v1.SyncService") in an
/// encoded file descriptor set.
pub fn methods_of(descriptor_set: &[u8], service: &str) -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(descriptor_set) else {
        return Vec::new();
    };
    set.file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.iter().filter_map(move |s| {
                let full = format!("{package}.{}", s.name());
                (full == service).then(|| s.method.iter().map(|m| m.name().to_owned()))
            })
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_descriptor_has_an_access_rule() {
        let methods = methods_of(crate::pb::FILE_DESCRIPTOR_SET, "agsync.v1.SyncService");
        assert_eq!(methods.len(), 12, "{methods:?}");
        for method in &methods {
            assert!(access(method).is_some(), "{method} has no access rule");
        }
        assert_eq!(access("Subscribe"), Some(Access::Subscribe));
        assert_eq!(access("Snapshot"), Some(Access::Read));
        assert_eq!(access("NoSuchMethod"), None);
    }
}
