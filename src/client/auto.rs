//! Protocol selection (`tcp` feature, auto mode): TCP until the origin advertises HTTP/3 in
//! `Alt-Svc`, then HTTP/3 with a head start over TCP, and TCP again while HTTP/3 is broken.
//!
//! What is resent over TCP after HTTP/3 failed, and what is not:
//! - a request no HTTP/3 connection could be made for (handshake timeout, refused, TLS
//!   failure) goes over TCP, and HTTP/3 is marked broken for the origin;
//! - a request the server refused unprocessed (GOAWAY, `H3_REQUEST_REJECTED`), once more
//!   refused after the usual retry on a new connection, goes over TCP (a request whose body
//!   was a stream, consumed as it was sent, fails instead: one whose body was all in
//!   memory, a `Full<Bytes>` say, goes again with it);
//! - a request whose connection ended before any of its response arrived (the QUIC
//!   connection timed out, failed, or was closed, by the server too) is resent over TCP
//!   only when that is safe: an idempotent method (RFC 9110 §9.2.2) and no body (the body
//!   of a request is consumed as it is sent, and not kept for a resend). HTTP/3 is marked
//!   broken only when the connection was lost (timed out, a socket error, closed without
//!   a reason), not when the server closed it saying why, nor when it answered with a
//!   stateless reset (it had lost the connection, restarted say): that server was reached;
//! - anything else (a stream reset, a malformed response, an error in the response body)
//!   is the caller's error.

use std::sync::Arc;
use std::time::Instant;

use http::header::ALT_SVC;
use http::{HeaderMap, Method, Request, Response, Uri, Version};

use super::conn::{AnyBody, Failure, PendingRequest, SendRequest, box_body};
use super::{H3Failure, Mode, Origin, Pool, Route};
use crate::error::Error;
use crate::h3::body::RecvBody;

impl Pool {
    /// HTTP/3 when the origin advertises HTTP/3 (fresh, not cleared) that is not broken,
    /// on a pooled connection or one that comes up within the handicap; TCP otherwise. A
    /// pooled connection is used only while HTTP/3 is advertised: an `Alt-Svc: clear`
    /// (over any protocol) moves the origin's next requests to TCP at once.
    ///
    /// The connection attempt runs on its own task: when the handicap runs out first, this
    /// request goes over TCP and the attempt carries on, shared with later requests, to
    /// serve them once it is up (or to mark HTTP/3 broken when it fails).
    pub(super) async fn auto_route(self: &Arc<Self>, origin: &Origin) -> Route {
        let port = self.alt_svc().h3_port(origin, Instant::now());
        let Some(port) = port else {
            return Route::Tcp;
        };
        if let Some(send) = self.pick(origin, false, None) {
            if !self.stalled(&send) {
                return Route::H3(send);
            }
            // A resumed connection still in its handshake after the handicap: UDP may no
            // longer get through, and it would hold the request for the connect timeout.
            // Another connection, if one is up, else TCP.
            return match self.pick(origin, false, Some(&send)) {
                Some(other) if !self.stalled(&other) => Route::H3(other),
                _ => Route::Tcp,
            };
        }
        if self.attempt_overdue(origin) {
            // An attempt already slower than the handicap (blocked UDP, say): this request
            // goes over TCP at once instead of waiting the handicap again.
            return Route::Tcp;
        }
        // The attempt runs in a task of its own (`shared_attempt`): past the handicap it
        // goes on for the next requests, without this one.
        match tokio::time::timeout(self.handicap, self.connection(origin, port, None)).await {
            Ok(Ok(send)) => Route::H3(send),
            // Failed (and marked broken), or no faster than the handicap.
            _ => Route::Tcp,
        }
    }

    /// Whether `send`'s connection has carried early data for longer than the handicap
    /// without completing its handshake.
    fn stalled(&self, send: &SendRequest) -> bool {
        send.status()
            .early_since()
            .is_some_and(|since| since.elapsed() >= self.handicap)
    }

    /// Whether an HTTP/3 connection attempt to `origin` has run longer than the handicap
    /// without an outcome.
    fn attempt_overdue(&self, origin: &Origin) -> bool {
        let connecting = self.connecting.lock().unwrap_or_else(|p| p.into_inner());
        connecting.get(origin).is_some_and(|a| {
            let elapsed = a.started.elapsed();
            // Past the connect timeout it has an outcome any moment; never taken for a
            // slow attempt for longer than that.
            a.outcome.peek().is_none() && elapsed >= self.handicap && elapsed < self.connect_timeout
        })
    }

    /// Sends `request` over HTTP/3 on `send`, and over TCP when HTTP/3 fails in a way that
    /// makes that safe (see the module's documentation).
    pub(super) async fn send_h3_or_tcp(
        self: &Arc<Self>,
        send: SendRequest,
        request: Request<AnyBody>,
        origin: Origin,
        replay: Option<bytes::Bytes>,
    ) -> Result<Response<RecvBody>, Error> {
        let port = self.h3_port(&origin);
        let head = Head::of(&request);
        let bodyless = http_body::Body::is_end_stream(request.body());
        let pending = PendingRequest::from_boxed(request)?.with_replay(replay);
        let status = send.shared_status();
        let sent = self.send_h3(send, pending, &origin, port, true);
        let outcome = match status.early_since() {
            // A request in 0-RTT data on a resumed connection (only bodiless safe ones go
            // early): usable at once, its handshake has yet to show that UDP gets through.
            // Past the handicap with the handshake still under way, the request goes over
            // TCP instead (an idempotent request may be sent twice, RFC 9110 §9.2.2).
            Some(since) if bodyless && head.method.is_idempotent() => {
                let mut sent = Box::pin(sent);
                let first = tokio::select! {
                    outcome = &mut sent => Some(outcome),
                    () = tokio::time::sleep_until((since + self.handicap).into()) => None,
                };
                match first {
                    Some(outcome) => outcome,
                    None if status.early_since().is_some() => {
                        // Cancelled first, so that no HTTP/3 copy leaves once TCP has it.
                        drop(sent);
                        tracing::debug!("0-RTT handshake slower than the handicap; sending over TCP");
                        return self.send_tcp(head.with_body(None), &origin).await;
                    }
                    None => sent.await,
                }
            }
            _ => sent.await,
        };
        match outcome {
            Ok(response) => Ok(response),
            Err(H3Failure::Connect(unsent, error) | H3Failure::Request(Failure::Unsent(unsent, error), _)) => {
                tracing::debug!(%error, "request not sent over HTTP/3; sending it over TCP");
                self.send_tcp(head.with_body(unsent.body), &origin).await
            }
            Err(H3Failure::Request(Failure::Failed(error), opened)) => {
                // `opened`: the connection it failed on (maybe another than `send`'s, if
                // it was refused there and went again).
                if lost_the_path(&error) {
                    self.alt_svc().mark_broken(&origin, opened, Instant::now());
                }
                if connection_ended(&error) && bodyless && head.method.is_idempotent() {
                    tracing::debug!(%error, "HTTP/3 connection ended before the response; resending over TCP");
                    return self.send_tcp(head.with_body(None), &origin).await;
                }
                Err(error)
            }
        }
    }

    /// Sends `request` over TCP, and in auto mode learns from the response's `Alt-Svc`.
    pub(super) async fn send_tcp(
        &self,
        request: Request<AnyBody>,
        origin: &Origin,
    ) -> Result<Response<RecvBody>, Error> {
        let tcp = self
            .tcp
            .as_ref()
            .ok_or_else(|| Error::config("this client speaks HTTP/3 only (Builder::http3_prior_knowledge)"))?;
        let response = tcp.send(for_tcp(request, origin)?).await?;
        if self.mode == Mode::Auto {
            self.alt_svc()
                .update(origin, response.headers().get_all(ALT_SVC).iter(), Instant::now());
        }
        Ok(response)
    }

    /// An HTTP/3 response came for `origin`, on a connection opened at `opened`: its
    /// `Alt-Svc` counts as a TCP one's (`clear`, a new port), and it says HTTP/3 works on
    /// this path (its failures are forgotten, and so will be those of older connections).
    pub(super) fn heard_over_h3(&self, origin: &Origin, response: &Response<RecvBody>, opened: Instant) {
        let mut cache = self.alt_svc();
        cache.update(origin, response.headers().get_all(ALT_SVC).iter(), Instant::now());
        cache.confirm(origin, opened);
    }

    pub(super) fn alt_svc(&self) -> std::sync::MutexGuard<'_, super::alt_svc::Cache> {
        self.alt_svc.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `request` as hyper's client takes it: HTTP/1.1 as the version asked for (hyper uses
/// HTTP/2 when ALPN chose it), and its URI naming `origin`, where hyper-util connects. An
/// origin client's request may name another authority (in its URI, or in its `host`,
/// which [`Origin::complete`] moved there): it goes to the client's origin all the same,
/// and names it, `host` included (hyper-util cannot connect to one authority and name
/// another, and HTTP/2 forbids a `host` that disagrees with `:authority`).
fn for_tcp(mut request: Request<AnyBody>, origin: &Origin) -> Result<Request<AnyBody>, Error> {
    if !matches!(request.version(), Version::HTTP_10 | Version::HTTP_11) {
        *request.version_mut() = Version::HTTP_11;
    }
    if !origin.is_named_by(request.uri()) {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = format!("https://{}{path}", origin.authority())
            .parse()
            .map_err(|e| Error::invalid_request(format!("cannot send this request: {e}")))?;
        // hyper-util adds the origin's over HTTP/1.1.
        request.headers_mut().remove(http::header::HOST);
    }
    Ok(request)
}

/// Whether an HTTP/3 request failed because its connection was lost on the way — timed
/// out, its socket failed, or it ended without the server saying why — which is what a
/// network that drops UDP looks like: HTTP/3 is then marked broken. A stream's error (a
/// reset, a malformed response), a TLS failure, a protocol error, the server's own close
/// with a code (even H3_NO_ERROR) or its stateless reset all say the server was reached
/// over HTTP/3.
fn lost_the_path(error: &Error) -> bool {
    error.code().is_none() && !error.is_stateless_reset() && connection_ended(error)
}

/// Whether an HTTP/3 request failed because its whole connection ended — lost, or closed
/// by the server (a graceful shutdown's deadline) — rather than for something about the
/// request itself (its stream reset, its response malformed, a protocol error): a bodiless
/// idempotent request may then go again (RFC 9110 §9.2.2).
fn connection_ended(error: &Error) -> bool {
    let stream_error = matches!(error.code(), Some(crate::Code::Stream(_)));
    !stream_error
        && (error.is_timeout()
            || error.is_io()
            || error.is_plainly_closed()
            || error.is_stateless_reset()
            || error.is_application())
}

/// What a resend over TCP needs of a request sent over HTTP/3 (whose head becomes HTTP/3
/// fields): a copy of its head, taken before. Extensions are not kept.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn of(request: &Request<AnyBody>) -> Head {
        Head {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        }
    }

    fn with_body(self, body: Option<AnyBody>) -> Request<AnyBody> {
        let body = body.unwrap_or_else(|| box_body(http_body_util::Empty::<bytes::Bytes>::new()));
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

#[cfg(test)]
mod tests {
    use super::{connection_ended, lost_the_path};
    use crate::codes;
    use crate::error::{Error, Kind};

    #[test]
    fn only_a_lost_connection_counts_as_a_broken_path() {
        let lost = [
            Error::new(Kind::Timeout).with_message("idle timeout"),
            Error::new(Kind::Io).with_message("network unreachable"),
            Error::new(Kind::Closed).with_message("the HTTP/3 connection is closed"),
        ];
        for error in &lost {
            assert!(lost_the_path(error), "{error}");
        }
        let reached = [
            // A malformed response: the client resets its stream.
            Error::new(Kind::Protocol).with_stream_code(codes::H3_MESSAGE_ERROR),
            // The server refused the request (GOAWAY, REQUEST_REJECTED).
            Error::new(Kind::Closed).with_stream_code(codes::H3_REQUEST_REJECTED),
            Error::new(Kind::Reset).with_stream_code(codes::H3_INTERNAL_ERROR),
            // No extended CONNECT at this server.
            Error::new(Kind::Protocol).with_message("the server does not accept extended CONNECT"),
            Error::new(Kind::Tls).with_message("certificate verify failed"),
            // The server closed the connection, saying why, or cleanly.
            Error::new(Kind::Application).with_code(crate::Code::Application(codes::H3_INTERNAL_ERROR)),
            Error::new(Kind::Closed).with_code(crate::Code::Application(codes::H3_NO_ERROR)),
            // It had lost the connection (restarted), and answered.
            Error::new(Kind::StatelessReset),
        ];
        for error in &reached {
            assert!(!lost_the_path(error), "{error}");
        }
    }

    #[test]
    fn a_request_may_go_again_when_its_whole_connection_ended_not_its_stream() {
        let ended = [
            Error::new(Kind::Timeout).with_message("idle timeout"),
            Error::new(Kind::Io).with_message("network unreachable"),
            Error::new(Kind::Closed).with_message("the HTTP/3 connection is closed"),
            // The server's graceful shutdown closed it before the response.
            Error::new(Kind::Closed).with_code(crate::Code::Application(codes::H3_NO_ERROR)),
            Error::new(Kind::Application).with_code(crate::Code::Application(codes::H3_INTERNAL_ERROR)),
            Error::new(Kind::StatelessReset),
        ];
        for error in &ended {
            assert!(connection_ended(error), "{error}");
        }
        let about_the_request = [
            Error::new(Kind::Protocol).with_stream_code(codes::H3_MESSAGE_ERROR),
            Error::new(Kind::Reset).with_stream_code(codes::H3_INTERNAL_ERROR),
            Error::new(Kind::Closed).with_stream_code(codes::H3_REQUEST_REJECTED),
            Error::new(Kind::Protocol).with_message("the server does not accept extended CONNECT"),
            Error::new(Kind::Tls).with_message("certificate verify failed"),
        ];
        for error in &about_the_request {
            assert!(!connection_ended(error), "{error}");
        }
    }
}
