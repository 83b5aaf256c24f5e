//! The service bridge: calls the service for one request (tower's contract: `poll_ready`,
//! then `call` on the same clone), then pumps the response into the stream's outbox, one
//! body frame at a time and only while the outbox has room (hyper's `PipeToSendStream`
//! model). Runs inside the connection's task; a reset stream drops this future.

use std::future::poll_fn;
use std::sync::Arc;

use http::header::{CONTENT_LENGTH, DATE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;

use super::HttpService;
use crate::h3::body::{RecvBody, pump_body};
use crate::h3::codes as code;
use crate::h3::fields::{OutFields, ResponseHead, forbids_content_length, is_bodyless};
use crate::h3::stream::StreamShared;

pub(crate) async fn respond<S: HttpService<RecvBody>>(
    mut service: S,
    request: Request<RecvBody>,
    stream: Arc<StreamShared>,
) {
    let head_request = request.method() == Method::HEAD;
    let connect = request.method() == Method::CONNECT;
    if let Err(e) = poll_fn(|cx| service.poll_ready(cx)).await {
        tracing::debug!(error = %e.into(), "service not ready; resetting the stream");
        stream.reset(code::H3_INTERNAL_ERROR);
        return;
    }
    let response = match service.call(request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(error = %e.into(), "service error; resetting the stream");
            stream.reset(code::H3_INTERNAL_ERROR);
            return;
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
    if let Some(body) = body.filter(|_| !end) {
        // A failed response body resets the stream (logged by the pump): the client sees
        // the response end in an error.
        let _ = pump_body(body, &stream, declared_length).await;
    }
}
