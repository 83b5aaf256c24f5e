//! The service bridge: calls the service for one request (tower's contract: `poll_ready`,
//! then `call` on the same clone), then pumps the response into the stream's outbox, one
//! body frame at a time and only while the outbox has room (hyper's `PipeToSendStream`
//! model). Runs inside the connection's task; a reset stream drops this future.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::FutureExt;

use http::header::{CONTENT_LENGTH, DATE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::HttpService;
use crate::error::BoxError;
use crate::h3::body::{RecvBody, pump_body};
use crate::h3::codes as code;
use crate::h3::fields::{OutFields, ResponseHead, forbids_content_length, is_bodyless};
use crate::h3::stream::StreamShared;

/// Calls `service` for `request` once it is ready, then sends its response on `stream`.
///
/// Two futures in a row rather than one `async fn`, for the size of the future (one
/// allocation per request): an `async fn` keeps its arguments (the request is 264 bytes)
/// for its whole life, beside the service's future and the response head it works on.
/// Here the request goes into the service's future when it is called, the head is handled
/// without an `.await` (so it is never part of the future), and only the body pump waits.
/// With `bench_server`'s axum app the whole future (with the connection's wrappers) went
/// from 1,080 to 392 bytes. glibc serves allocations up to 1,032 bytes from a per-thread
/// cache and larger ones on a slow path that first merges its free lists
/// (`malloc_consolidate`, 1.4 % of the instructions of `GET /hello` before, 0.7 % after;
/// 2.7 % fewer instructions in all, callgrind, 20,000 requests on 1 connection × 64
/// streams).
pub(crate) fn respond<S: HttpService<RecvBody>>(
    service: S,
    request: Request<RecvBody>,
    stream: Arc<StreamShared>,
) -> impl Future<Output = ()> + Send {
    let head_request = request.method() == Method::HEAD;
    let connect = request.method() == Method::CONNECT;
    let call = CallWhenReady::new(service, request);
    call.then(move |called| {
        let body = send_head(called, &stream, head_request, connect);
        async move {
            if let Some((body, declared_length)) = body {
                // A failed response body resets the stream (logged by the pump): the
                // client sees the response end in an error.
                let _ = pump_body(body, &stream, declared_length).await;
            }
        }
    })
}

pin_project_lite::pin_project! {
    /// tower's contract for one request: `poll_ready` until ready, then `call` on the same
    /// service; resolves to the response, or to the failed step and its error.
    #[project = CallProj]
    pub(crate) enum CallWhenReady<S: Service<Request<RecvBody>>> {
        Ready { service: S, request: Option<Request<RecvBody>> },
        Calling { #[pin] call: S::Future },
    }
}

impl<S: Service<Request<RecvBody>>> CallWhenReady<S> {
    /// `request` for `service`, once it is ready.
    pub(crate) fn new(service: S, request: Request<RecvBody>) -> Self {
        CallWhenReady::Ready {
            service,
            request: Some(request),
        }
    }
}

impl<S: Service<Request<RecvBody>>> Future for CallWhenReady<S> {
    type Output = Result<S::Response, (&'static str, S::Error)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                CallProj::Ready { service, request } => {
                    if let Err(e) = ready!(service.poll_ready(cx)) {
                        return Poll::Ready(Err(("service not ready", e)));
                    }
                    let request = request.take().expect("the request leaves only in the call just below");
                    let call = service.call(request);
                    self.set(CallWhenReady::Calling { call });
                }
                CallProj::Calling { call } => return call.poll(cx).map_err(|e| ("service error", e)),
            }
        }
    }
}

/// Queues the service's response head on `stream` (or resets it when the service failed),
/// and returns the body still to be sent, with the length the head declared. Not `async`:
/// what it works with (the head, about 250 bytes) is gone before the body is pumped.
fn send_head<B: Body, E: Into<BoxError>>(
    called: Result<Response<B>, (&'static str, E)>,
    stream: &StreamShared,
    head_request: bool,
    connect: bool,
) -> Option<(B, Option<u64>)> {
    let response = match called {
        Ok(response) => response,
        Err((what, e)) => {
            tracing::debug!(error = %e.into(), "{what}; resetting the stream");
            stream.reset(code::H3_INTERNAL_ERROR);
            return None;
        }
    };
    let (mut parts, body) = response.into_parts();
    let body = if parts.status.is_informational() {
        // A 1xx is never final (RFC 9110 §15.2) and HTTP/3 has no 101 (RFC 9114 §4.5): a
        // user error. hyper's HTTP/1 server answers 500 instead, with no body; so do we, as
        // no head has been sent yet. (1xx responses go through `Informational`.)
        tracing::warn!(
            status = %parts.status,
            "the service answered with an informational status, which cannot be a final response; answering 500"
        );
        parts = Response::new(()).into_parts().0;
        parts.status = StatusCode::INTERNAL_SERVER_ERROR;
        None
    } else {
        Some(body)
    };
    tracing::Span::current().record("status", parts.status.as_u16());
    if forbids_content_length(connect, parts.status) && parts.headers.contains_key(CONTENT_LENGTH) {
        tracing::debug!(status = %parts.status, "dropping the service's content-length (RFC 9110 §8.6)");
    }
    // RFC 9110 §6.6.1: an origin server with a clock sends Date; hyper adds it likewise.
    parts.headers.entry(DATE).or_insert_with(super::date::now);
    let bodyless = is_bodyless(head_request, parts.status);
    let content_length = match &body {
        Some(body) if !bodyless => body.size_hint().exact(),
        Some(_) => None,
        None => Some(0),
    };
    let head = ResponseHead::new(parts.status, parts.headers, content_length, connect);
    let declared_length = head.declared_length();
    // An empty body ends with the head, unless the head declares bytes: then it goes
    // through the pump, which resets the stream for the length it breaks.
    let end =
        bodyless || (body.as_ref().is_none_or(Body::is_end_stream) && declared_length.is_none_or(|length| length == 0));
    stream.push_head(OutFields::Response(head), end);
    body.filter(|_| !end).map(|body| (body, declared_length))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;

    use super::*;
    use crate::h3::stream::Limits;

    /// Each request's future is one allocation; past 1,032 bytes glibc serves it on its
    /// slow path (see [`respond`]). So the request is given up when the service is called,
    /// and the response handled without it: the future never holds both.
    #[test]
    fn a_requests_future_holds_its_request_or_its_response_never_both() {
        let service = tower::service_fn(|_: Request<RecvBody>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
        });
        let limits = Limits {
            recv_buffer: 1,
            send_buffer: 1,
        };
        let stream = StreamShared::new_incoming(0, Arc::default(), limits, None, true);
        let future = respond(service, Request::new(RecvBody::empty()), stream);
        let both = size_of::<Request<RecvBody>>() + size_of::<Response<Full<Bytes>>>();
        assert!(
            size_of_val(&future) < both,
            "{} bytes, as much as a request and a response ({both})",
            size_of_val(&future)
        );
    }
}
