//! One HTTP/3 client connection, in hyper's shape: [`handshake`] returns a [`SendRequest`]
//! that submits requests and a [`Connection`] that resolves when the connection ends.
//!
//! The connection's task (the QUIC layer's driver) runs a `ClientApp`: it opens a stream
//! per submitted request when the server's stream credit allows, pumps request bodies from
//! inside the task, and hands back each response head with a streaming [`RecvBody`].

use crate::quic::{QuicheConnection, StreamIdMap};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use quiche::h3;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;

use crate::error::{BoxError, Error, Kind};
use crate::h3::body::{RecvBody, pump_body};
use crate::h3::codes as code;
use crate::h3::datagram::{DatagramHub, Datagrams, MalformedDatagram, PeerDatagrams};
use crate::h3::fields::{self, Malformed, request_fields, response_from_fields};
use crate::h3::stream::{self, Cancel, ConnNotify, Limits, ReadFailure, StreamShared, WriteOutcome};
use crate::quic::Endpoint;
use crate::quic::{Application, ConnectionHandle};

/// How many submitted requests may wait for stream credit on one connection.
const SUBMIT_QUEUE: usize = 1024;

/// A request body of any type, boxed once so one connection carries every body type.
pub(crate) type AnyBody = UnsyncBoxBody<Bytes, BoxError>;

pub(crate) fn box_body<B>(body: B) -> AnyBody
where
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
    IntoBytes { inner: body }.boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body's data as `Bytes` (`copy_to_bytes`, which takes `Bytes` as they are) and its
    /// error boxed; unlike `map_frame`, it keeps the size hint, from which the request's
    /// `content-length` comes.
    struct IntoBytes<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for IntoBytes<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame
                    .map(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
                    .map_err(Into::into)
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request ready to go: its head as HTTP/3 fields and its body (None: it ends with the
/// head). Kept whole until a stream takes it, so a refused request can be sent again (and
/// after that with its body's bytes, when they were all in memory: `replay`).
pub(crate) struct PendingRequest {
    pub(crate) fields: Vec<h3::Header>,
    pub(crate) body: Option<AnyBody>,
    /// The length its head declares, which the body must match.
    content_length: Option<u64>,
    /// Whether it may go in 0-RTT data on a resumed connection: a safe method (harmless if
    /// an attacker replays it, RFC 8470 §4) without a body, not already refused as too
    /// early.
    early_data: bool,
    /// The server answered it `425 Too Early` (it went in 0-RTT data).
    too_early: bool,
    /// The body's bytes, when it was all in memory (a `Full<Bytes>`, say; see
    /// [`with_replay`](Self::with_replay)): kept until the response head, so that a request
    /// the server refused unprocessed (GOAWAY, H3_REQUEST_REJECTED) goes again with its
    /// body. A streaming body is consumed as it is sent: such a request fails instead.
    replay: Option<Bytes>,
}

impl PendingRequest {
    /// An extended CONNECT (RFC 9220): its head carries `:protocol` (right after
    /// `:method`, where `request_fields` puts it).
    fn is_extended_connect(&self) -> bool {
        self.fields
            .get(1)
            .is_some_and(|f| h3::NameValue::name(f) == b":protocol")
    }

    /// A CONNECT request (plain or extended): its stream may carry HTTP datagrams.
    fn is_connect(&self) -> bool {
        self.fields
            .first()
            .is_some_and(|f| h3::NameValue::value(f) == b"CONNECT")
    }

    /// `bytes` are the body, whole (a shared reference, not a copy): the request may be
    /// sent again after its body went out.
    pub(crate) fn with_replay(mut self, bytes: Option<Bytes>) -> Self {
        if self.body.is_some() {
            self.replay = bytes;
        }
        self
    }

    /// The request as it was before its body was sent, for sending again: a request is kept
    /// for that only while it has no body or keeps its bytes (see `Entry::retry`).
    fn rewound(mut self) -> Self {
        if self.body.is_none()
            && let Some(bytes) = &self.replay
        {
            self.body = Some(box_body(http_body_util::Full::new(bytes.clone())));
        }
        self
    }

    /// Whether the server refused it only for coming in 0-RTT data: it may go again on the
    /// same connection, once that connection's handshake has completed.
    pub(crate) fn refused_as_too_early(&self) -> bool {
        self.too_early
    }

    pub(crate) fn new<B>(request: Request<B>) -> Result<Self, Error>
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        Self::from_boxed(request.map(box_body))
    }

    /// A request whose body is boxed already (not boxed twice).
    pub(crate) fn from_boxed(request: Request<AnyBody>) -> Result<Self, Error> {
        let mut fields =
            request_fields(&request).map_err(|m| Error::invalid_request(format!("cannot send this request: {m}")))?;
        // Like hyper: a body of known size announces it, so the server can refuse early.
        let exact = request.body().size_hint().exact();
        let bodyless_method = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::CONNECT
        );
        let connect = request.method() == http::Method::CONNECT;
        if connect {
            // A CONNECT has no content (RFC 9110 §9.3.6): its stream carries the tunnel's
            // bytes, however many, and a length on it would only mislead the server.
            fields.retain(|field| h3::NameValue::name(field) != b"content-length");
        }
        let mut content_length = fields::content_length(request.headers())
            .ok()
            .flatten()
            .filter(|_| !connect);
        if let Some(len) = exact
            && !connect
            && !request.headers().contains_key(http::header::CONTENT_LENGTH)
            && (len > 0 || !bodyless_method)
        {
            fields.push(h3::Header::new(b"content-length", len.to_string().as_bytes()));
            content_length = Some(len);
        }
        let safe = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        let body = request.into_body();
        let body = (!body.is_end_stream()).then_some(body);
        let early_data = safe && body.is_none();
        Ok(PendingRequest {
            fields,
            body,
            content_length,
            early_data,
            too_early: false,
            replay: None,
        })
    }
}

/// Why a request failed; `Unsent` requests were not processed by the server (never sent,
/// refused by GOAWAY, or H3_REQUEST_REJECTED, with its body still to send or kept) and may
/// be retried.
pub(crate) enum Failure {
    Unsent(PendingRequest, Error),
    Failed(Error),
}

impl Failure {
    pub(crate) fn into_error(self) -> Error {
        match self {
            Failure::Unsent(_, e) | Failure::Failed(e) => e,
        }
    }
}

pub(crate) type Reply = oneshot::Sender<Result<Response<RecvBody>, Failure>>;

struct Submission {
    request: PendingRequest,
    shared: Arc<StreamShared>,
    reply: Reply,
}

/// The connection's capacity, shared with its [`SendRequest`]s.
pub(crate) struct Status {
    inner: Mutex<StatusInner>,
    /// When the connection was opened: a failure of it says nothing of HTTP/3's path once
    /// a connection opened later has carried a response.
    opened: Instant,
}

#[derive(Default)]
struct StatusInner {
    /// Streams the server still lets us open.
    credit: u64,
    /// Requests reserved by `poll_ready` or submitted, not yet given a stream.
    outstanding: u64,
    /// Requests with a stream, not yet finished.
    in_flight: usize,
    goaway: bool,
    closed: bool,
    /// The path has gone silent ([`PathWatch`]); cleared when the server is heard again.
    silent: bool,
    established: bool,
    /// When HTTP/3 started in 0-RTT data, while the handshake has not completed since.
    early_since: Option<std::time::Instant>,
    /// Tasks to wake when a request may go (or never will). One entry per task: a task
    /// polled again while it waits is not listed again.
    waiters: Vec<Waker>,
}

impl StatusInner {
    /// Whether the connection takes new requests no more (closed, going away, or silent
    /// for now).
    fn refuses_new(&self) -> bool {
        self.closed || self.goaway || self.silent
    }

    fn wait(&mut self, waker: &Waker) {
        if !self.waiters.iter().any(|w| w.will_wake(waker)) {
            self.waiters.push(waker.clone());
        }
    }
}

impl Status {
    fn new() -> Self {
        Status {
            inner: Mutex::default(),
            opened: Instant::now(),
        }
    }

    /// When the connection was opened (before its handshake).
    pub(crate) fn opened(&self) -> Instant {
        self.opened
    }

    fn lock(&self) -> MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether new requests may go to this connection.
    pub(crate) fn usable(&self) -> bool {
        !self.lock().refuses_new()
    }

    /// Streams free for new requests right now.
    pub(crate) fn spare(&self) -> u64 {
        let s = self.lock();
        s.credit.saturating_sub(s.outstanding)
    }

    pub(crate) fn load(&self) -> u64 {
        let s = self.lock();
        s.outstanding + s.in_flight as u64
    }

    /// Ready once the connection's handshake has completed (at once when it has): `true`;
    /// `false` once it can take no new request (closed, GOAWAY, silent).
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    pub(crate) fn poll_handshake_done(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut s = self.lock();
        if s.refuses_new() {
            return Poll::Ready(false);
        }
        if s.established && s.early_since.is_none() {
            return Poll::Ready(true);
        }
        s.wait(cx.waker());
        Poll::Pending
    }

    /// How the handshake of a connection that began in 0-RTT data ends: completed
    /// (`Some(true)`), or the connection closed or its path went silent first
    /// (`Some(false)`: what a failed handshake says of the path); `None` when the server
    /// is going away (GOAWAY), which says nothing of the path.
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    pub(crate) async fn early_handshake_outcome(&self) -> Option<bool> {
        if std::future::poll_fn(|cx| self.poll_handshake_done(cx)).await {
            return Some(true);
        }
        (!self.lock().goaway).then_some(false)
    }

    /// Since when the connection has carried requests in 0-RTT data without its handshake
    /// completing; `None` once it has completed (or for a connection that never went early).
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    pub(crate) fn early_since(&self) -> Option<std::time::Instant> {
        self.lock().early_since
    }

    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        let waiters = {
            let mut s = self.lock();
            let (was_established, was_early) = (s.established, s.early_since.is_some());
            f(&mut s);
            // The handshake's wait ends when the connection is established, whatever the
            // credit (a server may open with none, and grant it later); so does a wait
            // for a handshake begun in early data to complete (`poll_handshake_done`).
            let handshake_done = (s.established && !was_established) || (was_early && s.early_since.is_none());
            if s.refuses_new() || s.credit > s.outstanding || handshake_done {
                std::mem::take(&mut s.waiters)
            } else {
                Vec::new()
            }
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// How many 1xx responses are kept per request (more are dropped): a few 103s in practice.
pub(crate) const MAX_INFORMATIONAL: usize = 16;

fn closed_error() -> Error {
    Error::new(Kind::Closed).with_message("the HTTP/3 connection is closed")
}

/// Why a request waits on no connection whose path went silent ([`PathWatch`]).
fn silent_error() -> Error {
    Error::new(Kind::Closed)
        .with_message("the connection's path went silent (no answer through several probe timeouts)")
}

/// Why a request waits on no connection the server is going away from.
fn goaway_error() -> Error {
    rejected_error("the server is going away (GOAWAY)")
}

fn rejected_error(why: &str) -> Error {
    Error::new(Kind::Closed)
        .with_stream_code(code::H3_REQUEST_REJECTED)
        .with_message(why.to_string())
}

/// Submits requests on one HTTP/3 connection. Cheap to clone.
///
/// [`poll_ready`](Self::poll_ready) reports real capacity: it is pending while the server's
/// stream credit is used up or the connection's path is silent (see
/// [`is_usable`](Self::is_usable)), and fails once the connection is closed or going away.
/// A path that stays silent ends the connection at QUIC's idle timeout (never, with the
/// idle timeout off on both sides: bound the wait yourself then).
pub struct SendRequest {
    submit: mpsc::Sender<Submission>,
    status: Arc<Status>,
    notify: Arc<ConnNotify>,
    settings: Arc<ConnSettings>,
    reserved: bool,
}

impl Clone for SendRequest {
    fn clone(&self) -> Self {
        SendRequest {
            submit: self.submit.clone(),
            status: Arc::clone(&self.status),
            notify: Arc::clone(&self.notify),
            settings: Arc::clone(&self.settings),
            reserved: false,
        }
    }
}

impl std::fmt::Debug for SendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRequest")
            .field("usable", &self.status.usable())
            .finish_non_exhaustive()
    }
}

impl Drop for SendRequest {
    fn drop(&mut self) {
        if self.reserved {
            self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
        }
    }
}

impl SendRequest {
    /// Ready when the connection can open a stream for one more request (the reservation
    /// is kept for the next [`send_request`](Self::send_request)).
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        let mut s = self.status.lock();
        if s.closed {
            return Poll::Ready(Err(closed_error()));
        }
        if s.goaway {
            return Poll::Ready(Err(goaway_error()));
        }
        if s.credit > s.outstanding && !s.silent {
            s.outstanding += 1;
            self.reserved = true;
            return Poll::Ready(Ok(()));
        }
        s.wait(cx.waker());
        Poll::Pending
    }

    /// [`poll_ready`](Self::poll_ready) for a pool, under one lock: a connection whose
    /// path is silent fails with [`silent_error`] (as a closed one does) instead of
    /// waiting, so that its caller moves on to another connection; a reservation made
    /// earlier fails too once the connection takes new requests no more (it goes with this
    /// handle).
    pub(crate) fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut s = self.status.lock();
        if s.closed || self.submit.is_closed() {
            return Poll::Ready(Err(closed_error()));
        }
        if s.goaway {
            return Poll::Ready(Err(goaway_error()));
        }
        if s.silent {
            return Poll::Ready(Err(silent_error()));
        }
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        if s.credit > s.outstanding {
            s.outstanding += 1;
            self.reserved = true;
            return Poll::Ready(Ok(()));
        }
        s.wait(cx.waker());
        Poll::Pending
    }

    /// Waits until [`poll_ready`](Self::poll_ready) is ready.
    pub async fn ready(&mut self) -> Result<(), Error> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    pub(crate) fn status(&self) -> &Status {
        &self.status
    }

    /// The connection's status, to look at after this handle is gone.
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    pub(crate) fn shared_status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Whether `other` sends on the same connection as this.
    pub(crate) fn same_connection(&self, other: &SendRequest) -> bool {
        Arc::ptr_eq(&self.status, &other.status)
    }

    /// Whether the connection can take new requests at all: not closed, no GOAWAY, and its
    /// path not silent. Silent: nothing from the server was received through four probe
    /// timeouts in a row, over a second at least since the first (a network that stopped
    /// passing UDP, a server gone). Requests sent before wait on; those not yet given a
    /// stream fail unsent (a [`Client`](crate::client::Client) sends them on another
    /// connection), and [`poll_ready`](Self::poll_ready) is pending; the connection is
    /// usable again if the server is heard from. A `Client`'s pool forgets it (it closes
    /// once the requests on it have ended) and opens another.
    pub fn is_usable(&self) -> bool {
        // A connection task that ended without saying so (it panicked) leaves the queue
        // closed behind it.
        self.status.usable() && !self.submit.is_closed()
    }

    /// Sends a request; the response arrives with a streaming body. The request URI must
    /// carry the authority (`https://host:port/path`), or the request a `host` header.
    pub fn send_request<B>(&mut self, request: Request<B>) -> ResponseFuture
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        match PendingRequest::new(request) {
            Ok(pending) => self.send_pending(pending),
            Err(e) => ResponseFuture::failed(Failure::Failed(e)),
        }
    }

    pub(crate) fn send_pending(&mut self, request: PendingRequest) -> ResponseFuture {
        if !self.reserved {
            self.status.update(|s| s.outstanding += 1);
        }
        self.reserved = false;
        let limits = Limits {
            recv_buffer: self.settings.response_body_buffer,
            send_buffer: self.settings.request_body_buffer,
        };
        let shared = StreamShared::new_outgoing(Arc::clone(&self.notify), limits, request.body.is_some());
        let (reply, rx) = oneshot::channel();
        let submission = Submission {
            request,
            shared: Arc::clone(&shared),
            reply,
        };
        let queued = match self.submit.try_send(submission) {
            Ok(()) => None,
            // More requests wait for this connection than its queue holds (a burst of
            // thousands): this one waits for room, as it would for a stream, rather than
            // fail unsent.
            Err(mpsc::error::TrySendError::Full(submission)) => Some(Queued {
                room: Box::pin(self.submit.clone().reserve_owned()),
                submission: Some(submission),
                status: Arc::clone(&self.status),
            }),
            Err(mpsc::error::TrySendError::Closed(submission)) => {
                self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                return ResponseFuture::failed(Failure::Unsent(submission.request, closed_error()));
            }
        };
        ResponseFuture {
            queued: queued.map(Mutex::new),
            rx: Some(rx),
            shared: Some(shared),
            error: None,
        }
    }
}

/// Room in a connection's submission queue, once there is some (an error: the connection
/// closed first).
type Room = Pin<Box<dyn Future<Output = Result<mpsc::OwnedPermit<Submission>, mpsc::error::SendError<()>>> + Send>>;

/// A request waiting for room in its connection's submission queue.
struct Queued {
    room: Room,
    submission: Option<Submission>,
    status: Arc<Status>,
}

impl Queued {
    /// Submits the request once there is room; gives it back unsent if the connection
    /// closed first.
    fn poll_submit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let room = std::task::ready!(self.room.as_mut().poll(cx));
        let submission = self.submission.take().expect("submitted once");
        Poll::Ready(match room {
            Ok(permit) => {
                permit.send(submission);
                Ok(())
            }
            Err(_) => {
                self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                Err(Failure::Unsent(submission.request, closed_error()))
            }
        })
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.submission.is_some() {
            // Never submitted: the connection will not count it off.
            self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
        }
    }
}

/// The response to a request sent with [`SendRequest`]. Dropping it before the response
/// arrives cancels the request (the stream is reset with H3_REQUEST_CANCELLED).
#[must_use = "the request is cancelled when this future is dropped"]
pub struct ResponseFuture {
    /// Set while the request waits for room in the connection's queue. (The mutexes keep
    /// the future `Sync`, as a request body is not: only `&mut self` reaches inside.)
    queued: Option<Mutex<Queued>>,
    rx: Option<oneshot::Receiver<Result<Response<RecvBody>, Failure>>>,
    shared: Option<Arc<StreamShared>>,
    error: Option<Mutex<Failure>>,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl ResponseFuture {
    fn failed(failure: Failure) -> Self {
        ResponseFuture {
            queued: None,
            rx: None,
            shared: None,
            error: Some(Mutex::new(failure)),
        }
    }

    pub(crate) fn poll_failure(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<RecvBody>, Failure>> {
        if let Some(failure) = self.error.take() {
            return Poll::Ready(Err(failure.into_inner().unwrap_or_else(PoisonError::into_inner)));
        }
        if let Some(queued) = self.queued.as_mut() {
            let queued = queued.get_mut().unwrap_or_else(PoisonError::into_inner);
            let submitted = std::task::ready!(queued.poll_submit(cx));
            self.queued = None;
            if let Err(failure) = submitted {
                self.rx = None;
                self.shared = None;
                return Poll::Ready(Err(failure));
            }
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(Err(Failure::Failed(closed_error())));
        };
        let result = match Pin::new(rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(result)) => result,
            Poll::Ready(Err(_)) => Err(Failure::Failed(closed_error())),
        };
        self.rx = None;
        self.shared = None;
        Poll::Ready(result)
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvBody>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_failure(cx).map(|r| r.map_err(Failure::into_error))
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if self.queued.is_some() {
            // Never submitted: nothing to cancel (dropping it counts it off).
            return;
        }
        if let (Some(shared), Some(_)) = (self.shared.take(), self.rx.as_ref()) {
            // Not answered yet: cancel the request.
            shared.reset(code::H3_REQUEST_CANCELLED);
        }
    }
}

/// A client connection: resolves when the connection has closed (with its error, if it was
/// not a clean close). Dropping it does not close the connection; dropping every
/// [`SendRequest`] does, once the requests in flight are done.
#[must_use = "await it to learn when the connection ends"]
pub struct Connection {
    handle: ConnectionHandle,
    closed: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The QUIC connection underneath (statistics, peer address, close).
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }
}

impl Future for Connection {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.closed.as_mut().poll(cx)
    }
}

/// Per-connection client settings.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) request_body_buffer: usize,
    pub(crate) response_body_buffer: usize,
    /// The largest response head or trailer section accepted (RFC 9114 §4.2.2 counting).
    pub(crate) max_response_head: u64,
    /// Close the connection after this long without requests in flight.
    pub(crate) idle_timeout: Option<Duration>,
    /// Whether CONNECT streams get HTTP datagrams (when the transport has QUIC datagrams).
    pub(crate) http_datagrams: bool,
    /// The byte budget of one stream's incoming datagrams.
    pub(crate) datagram_buffer: usize,
    /// Whether safe requests go in 0-RTT data on a resumed connection (the pool, which
    /// sends a `425 Too Early` request again, says yes; `handshake` alone does not).
    pub(crate) early_data: bool,
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            request_body_buffer: 64 * 1024,
            response_body_buffer: 64 * 1024,
            max_response_head: 64 * 1024,
            idle_timeout: None,
            http_datagrams: true,
            datagram_buffer: crate::h3::datagram::DEFAULT_FLOW_BUFFER,
            early_data: false,
        }
    }
}

/// Connects to `authority` (`host:port`) over `endpoint` and starts HTTP/3 on the
/// connection. The endpoint's configuration must offer the `h3` ALPN.
pub async fn handshake(endpoint: &Endpoint, authority: &str) -> Result<(SendRequest, Connection), Error> {
    handshake_with(endpoint, authority, Arc::new(ConnSettings::default())).await
}

pub(crate) async fn handshake_with(
    endpoint: &Endpoint,
    authority: &str,
    settings: Arc<ConnSettings>,
) -> Result<(SendRequest, Connection), Error> {
    let (submit, submissions) = mpsc::channel(SUBMIT_QUEUE);
    let status = Arc::new(Status::new());
    let notify = Arc::new(ConnNotify::default());
    let mut app = ClientApp::new(
        submissions,
        Arc::clone(&status),
        Arc::clone(&notify),
        Arc::clone(&settings),
    );
    app.quic_idle_timeout = endpoint.config().inner.s.idle_timeout;
    app.early_data = settings.early_data && endpoint.config().inner.s.early_data;
    if endpoint.config().inner.s.datagrams.is_some() {
        app.datagrams = Some(DatagramHub::new(settings.http_datagrams, settings.datagram_buffer));
    }
    let handle = endpoint.connect(authority, app).await?;
    // The app publishes the server's stream credit once it runs; wait for that (or for
    // the connection's end, should it close first).
    let ready = SendRequest {
        submit,
        status: Arc::clone(&status),
        notify,
        settings,
        reserved: false,
    };
    let published = std::future::poll_fn(|cx| {
        let mut s = status.lock();
        if s.established || s.closed {
            return Poll::Ready(());
        }
        s.wait(cx.waker());
        Poll::Pending
    });
    tokio::select! {
        () = published => {}
        _ = handle.closed() => {}
    }
    if !status.lock().established || handle.is_closed() {
        return Err(closed_error());
    }
    let waiting = handle.clone();
    let closed = Box::pin(async move {
        let closed = waiting.closed().await;
        match closed.error() {
            Some(e) => Err(e.duplicate()),
            None => Ok(()),
        }
    });
    Ok((ready, Connection { handle, closed }))
}

struct Entry {
    shared: Arc<StreamShared>,
    /// Until the response head arrives.
    reply: Option<Reply>,
    /// The request, kept while it can still be retried (no body, or its bytes kept).
    retry: Option<PendingRequest>,
    informational: Vec<Response<()>>,
    written: bool,
    /// A HEAD request: its response has no body, whatever its content-length says.
    head_request: bool,
    /// Sent in 0-RTT data, before the handshake completed.
    early_data: bool,
    /// A CONNECT stream's HTTP datagrams, until the response head takes them.
    datagrams: Option<Datagrams>,
    /// A CONNECT (plain or extended): the one method whose stream may carry datagrams.
    tunnel: bool,
    /// A CONNECT answered 2xx: its stream carries only DATA from now on (RFC 9114 §4.4).
    tunnel_open: bool,
}

/// A request body's pump; it ends with the stream ID and the error of a body that failed.
type PumpFuture = Pin<Box<dyn Future<Output = Option<(u64, BoxError)>> + Send>>;

/// How many extended CONNECT requests may wait for the server's SETTINGS on one connection.
/// A conforming server sends SETTINGS first thing, so they wait a round trip at most; the
/// bound is for one that does not (they fail when the connection idles out).
const AWAITING_SETTINGS: usize = 16;

/// The most often a pooled connection sends keep-alive PINGs, whatever the idle timeout.
const KEEPALIVE_MIN: Duration = Duration::from_millis(100);

/// Finds a connection whose path has gone silent. quiche's probe timeouts (PTOs) fire only
/// while ack-eliciting packets (requests, or the keep-alive PINGs of a pooled connection)
/// go unacknowledged, each twice as late as the one before: [`SILENT_AFTER_PTOS`] of them
/// with no packet received in between is about fifteen times the path's usual answer
/// time. A connection so silent is not chosen for new requests, which would otherwise
/// wait on it until QUIC's idle timeout (30 s): a pool opens another (in auto mode raced
/// against TCP). [`SILENT_AFTER_AT_LEAST`], counted from the first unanswered PTO (not
/// from the last packet heard, which on a quiet connection may be seconds old), keeps a
/// loopback or LAN path, whose PTOs are a few tens of milliseconds, from being given up
/// for a server busy for a moment.
///
/// What it cannot see: a path that fails one way only (the server's own probes still
/// arrive, and count as heard), and a dead path before the client sends something (a
/// pooled connection sends a PING a third of its idle timeout after its last request; the
/// first request after the path died is the one that finds it, and waits on).
#[derive(Default)]
struct PathWatch {
    /// Packets received on all paths when last looked.
    received: usize,
    /// PTOs counted on all paths when a packet was last seen received.
    ptos_when_heard: usize,
    /// When a PTO was first seen since a packet was last received.
    unanswered_since: Option<Instant>,
    silent: bool,
}

const SILENT_AFTER_PTOS: usize = 4;
const SILENT_AFTER_AT_LEAST: Duration = Duration::from_secs(1);

impl PathWatch {
    /// Looks at the connection's counters (on every turn: a PTO fires in a turn of its own,
    /// which a look skipped for economy would miss until the next, seconds later once they
    /// have backed off; quiche builds the counters per path, some tens of nanoseconds);
    /// `Some(silent)` when the path's state changed.
    fn check(&mut self, conn: &QuicheConnection, now: Instant) -> Option<bool> {
        let (received, ptos) = conn
            .path_stats()
            .fold((0, 0), |(r, p), path| (r + path.recv, p + path.total_pto_count));
        self.observe(received, ptos, now)
    }

    /// `received` packets and `ptos` probe timeouts so far, at `now`.
    fn observe(&mut self, received: usize, ptos: usize, now: Instant) -> Option<bool> {
        if received != self.received {
            self.received = received;
            self.ptos_when_heard = ptos;
            self.unanswered_since = None;
            return std::mem::take(&mut self.silent).then_some(false);
        }
        let unanswered = ptos.saturating_sub(self.ptos_when_heard);
        if unanswered == 0 {
            return None;
        }
        let since = *self.unanswered_since.get_or_insert(now);
        let silent = unanswered >= SILENT_AFTER_PTOS && now.duration_since(since) >= SILENT_AFTER_AT_LEAST;
        if silent && !self.silent {
            self.silent = true;
            return Some(true);
        }
        None
    }
}

/// The client side of one HTTP/3 connection, as a QUIC [`Application`].
pub(crate) struct ClientApp {
    submissions: mpsc::Receiver<Submission>,
    waiting: Option<Submission>,
    /// Extended CONNECT requests waiting for the server's SETTINGS (which say whether it
    /// allows them), aside so that other requests go on meanwhile; at most
    /// [`AWAITING_SETTINGS`].
    awaiting_settings: VecDeque<Submission>,
    status: Arc<Status>,
    notify: Arc<ConnNotify>,
    settings: Arc<ConnSettings>,
    h3: Option<h3::Connection>,
    /// Streams whose state quiche's HTTP/3 layer would keep for the connection's life.
    h3_leftovers: stream::H3Leftovers,
    streams: StreamIdMap<Entry>,
    pumps: FuturesUnordered<PumpFuture>,
    lists: stream::RoundLists,
    goaway: Option<u64>,
    /// The stream quiche opens for the next request (client request streams count up by 4).
    next_request_id: u64,
    /// The stream credit last published in `status`.
    credit_told: u64,
    idle_since: Option<Instant>,
    /// What the next keep-alive PING counts from: the last one, or the start of the
    /// current busy spell (an idle spell counts from `idle_since`).
    pinged_at: Option<Instant>,
    /// Our side's QUIC idle timeout (the server may ask for a shorter one).
    quic_idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    /// Whether safe requests may go in 0-RTT data on a resumed connection.
    early_data: bool,
    /// HTTP datagram flows of CONNECT streams (RFC 9297), when the endpoint's transport
    /// enables QUIC datagrams.
    datagrams: Option<DatagramHub>,
    path_watch: PathWatch,
}

impl ClientApp {
    fn new(
        submissions: mpsc::Receiver<Submission>,
        status: Arc<Status>,
        notify: Arc<ConnNotify>,
        settings: Arc<ConnSettings>,
    ) -> Self {
        ClientApp {
            submissions,
            waiting: None,
            awaiting_settings: VecDeque::new(),
            status,
            notify,
            settings,
            h3: None,
            h3_leftovers: stream::H3Leftovers::default(),
            streams: StreamIdMap::default(),
            pumps: FuturesUnordered::new(),
            lists: stream::RoundLists::default(),
            goaway: None,
            next_request_id: 0,
            credit_told: 0,
            idle_since: Some(Instant::now()),
            pinged_at: None,
            quic_idle_timeout: Duration::from_secs(30),
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            timer_at: None,
            early_data: false,
            datagrams: None,
            path_watch: PathWatch::default(),
        }
    }

    /// Whether requests not yet given a stream go elsewhere instead ([`refusal`](Self::refusal)).
    fn refuses(&self) -> bool {
        self.goaway.is_some() || self.path_watch.silent
    }

    /// Why requests not yet given a stream go elsewhere instead (unsent, so safe to):
    /// the server's GOAWAY, or a path gone silent (requests sent before wait on).
    fn refusal(&self) -> Option<Error> {
        if self.goaway.is_some() {
            Some(goaway_error())
        } else if self.path_watch.silent {
            Some(silent_error())
        } else {
            None
        }
    }

    /// Opens streams for waiting requests while the server's credit lasts.
    fn open_streams(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) {
        loop {
            if self.waiting.is_none()
                && !self.awaiting_settings.is_empty()
                && (self.h3.as_ref().is_some_and(|h3| h3.peer_settings_raw().is_some()) || self.refuses())
            {
                self.waiting = self.awaiting_settings.pop_front();
            }
            if self.waiting.is_none() {
                match self.submissions.poll_recv(cx) {
                    Poll::Ready(Some(submission)) => self.waiting = Some(submission),
                    _ => return,
                }
            }
            let submission = self.waiting.as_ref().expect("just filled");
            if submission.reply.is_closed() || submission.shared.reset_requested() {
                // Cancelled before it had a stream.
                self.waiting = None;
                self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                continue;
            }
            if let Some(why) = self.refusal() {
                // Ahead of the credit and early-data checks: a request waiting for either
                // here would wait in vain.
                let Submission { request, reply, .. } = self.waiting.take().expect("present");
                self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                let _ = reply.send(Err(Failure::Unsent(request, why)));
                continue;
            }
            if conn.peer_streams_left_bidi() == 0 {
                return;
            }
            let early_data = !conn.is_established();
            if early_data && !submission.request.early_data {
                // Not safe to replay: it waits for the handshake, and the rest behind it.
                return;
            }
            if submission.request.is_extended_connect() {
                // Only to a server that allows it (RFC 9220 §3), which its SETTINGS say:
                // they come with its first flight, so the request waits for them.
                let h3 = self.h3.as_ref().expect("created when established");
                if h3.peer_settings_raw().is_none() {
                    let submission = self.waiting.take().expect("present");
                    if self.awaiting_settings.len() < AWAITING_SETTINGS {
                        self.awaiting_settings.push_back(submission);
                    } else {
                        self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                        let _ = submission
                            .reply
                            .send(Err(Failure::Failed(Error::new(Kind::Protocol).with_message(
                                "too many extended CONNECT requests wait for the server's SETTINGS",
                            ))));
                    }
                    continue;
                }
                if !h3.extended_connect_enabled_by_peer() {
                    let Submission { reply, .. } = self.waiting.take().expect("present");
                    self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                    let _ = reply.send(Err(Failure::Failed(Error::new(Kind::Protocol).with_message(
                        "the server does not accept extended CONNECT (it sent no SETTINGS_ENABLE_CONNECT_PROTOCOL)",
                    ))));
                    continue;
                }
            }
            let fin = submission.request.body.is_none();
            let h3 = self.h3.as_mut().expect("created when established");
            let id = match h3.send_request(conn, &submission.request.fields, fin) {
                Ok(id) => id,
                Err(h3::Error::StreamBlocked)
                    if let Some(len) =
                        stream::head_never_fits(conn, self.next_request_id, &submission.request.fields) =>
                {
                    let Submission { reply, .. } = self.waiting.take().expect("present");
                    self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                    let _ = reply.send(Err(Failure::Failed(Error::new(Kind::Protocol).with_message(format!(
                        "the request head ({len} bytes as a HEADERS frame) is larger than the \
                         congestion window and cannot be sent: keep request heads under about 12 KB"
                    )))));
                    continue;
                }
                // Not enough room for the head right now: try again next turn.
                Err(h3::Error::StreamBlocked) | Err(h3::Error::TransportError(quiche::Error::StreamLimit)) => return,
                Err(e) => {
                    let Submission { reply, .. } = self.waiting.take().expect("present");
                    self.status.update(|s| s.outstanding = s.outstanding.saturating_sub(1));
                    let _ = reply.send(Err(Failure::Failed(
                        Error::new(Kind::Protocol).with_message(format!("cannot open a request stream: {e}")),
                    )));
                    continue;
                }
            };
            let Submission {
                mut request,
                shared,
                reply,
            } = self.waiting.take().expect("present");
            shared.set_id(id);
            self.next_request_id = id + 4;
            let head_request = request
                .fields
                .first()
                .is_some_and(|f| h3::NameValue::value(f) == b"HEAD");
            self.status.update(|s| {
                s.outstanding = s.outstanding.saturating_sub(1);
                s.in_flight += 1;
            });
            let datagrams = match self.datagrams.as_mut() {
                // The server's SETTINGS are in (an extended CONNECT waited for them).
                Some(hub)
                    if request.is_connect()
                        && PeerDatagrams::of(self.h3.as_ref().expect("created when established"), conn)
                            != PeerDatagrams::Disabled =>
                {
                    hub.open(id)
                }
                _ => None,
            };
            let body = request.body.take();
            let tunnel = request.is_connect();
            // None on a CONNECT (`from_boxed`): its tunnel's bytes are not bounded.
            let content_length = request.content_length;
            // Kept for a resend if the server refuses it unprocessed: a bodyless request, or
            // one whose body's bytes are kept.
            let retry = (body.is_none() || request.replay.is_some()).then_some(request);
            if let Some(body) = body {
                let pump_stream = Arc::clone(&shared);
                self.pumps.push(Box::pin(async move {
                    // A body that panics (its `poll_frame` runs in this task) fails its own
                    // request, as a handler that panics does on a server: the connection
                    // and its other requests go on.
                    match AssertUnwindSafe(pump_body(body, &pump_stream, content_length))
                        .catch_unwind()
                        .await
                    {
                        Ok(pumped) => pumped.err().map(|e| (id, e)),
                        Err(payload) => {
                            // A panic's message is a `&str` or a `String` (from `panic!`).
                            let message = payload
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_owned())
                                .or_else(|| payload.downcast_ref::<String>().cloned())
                                .unwrap_or_default();
                            tracing::warn!(stream_id = id, message, "request body panicked; resetting its stream");
                            pump_stream.reset(code::H3_INTERNAL_ERROR);
                            Some((id, format!("it panicked: {message}").into()))
                        }
                    }
                }));
            }
            // A notification before the stream had its ID went nowhere.
            shared.take_queued();
            let written = shared.send_done();
            self.streams.insert(
                id,
                Entry {
                    shared,
                    reply: Some(reply),
                    retry,
                    informational: Vec::new(),
                    written,
                    head_request,
                    early_data,
                    datagrams,
                    tunnel,
                    tunnel_open: false,
                },
            );
            if self.idle_since.take().is_some() {
                // A busy spell begins: keep-alive PINGs count from here.
                self.pinged_at = Some(Instant::now());
            }
            self.service_stream(conn, id);
        }
    }

    fn poll_events(&mut self, conn: &mut QuicheConnection) {
        loop {
            let h3 = self.h3.as_mut().expect("created when established");
            match h3.poll(conn) {
                Ok((id, h3::Event::Headers { .. } | h3::Event::Data | h3::Event::Finished | h3::Event::Reset(_)))
                    if id % 4 == 1 =>
                {
                    // A bidirectional stream the server opened: HTTP/3 has none (RFC 9114 §6.1).
                    tracing::debug!(stream_id = id, "the server opened a bidirectional stream");
                    if conn.local_error().is_none() {
                        let _ = conn.close(true, code::H3_STREAM_CREATION_ERROR, b"");
                    }
                    return;
                }
                Ok((id, h3::Event::Headers { list, more_frames })) => self.on_headers(conn, id, list, more_frames),
                Ok((id, h3::Event::Data)) => {
                    if self.streams.contains_key(&id) {
                        self.read_body(conn, id);
                    } else {
                        stream::discard(h3, conn, id);
                    }
                }
                Ok((id, h3::Event::Finished)) => self.on_finished(conn, id),
                Ok((id, h3::Event::Reset(code))) => self.on_reset(conn, id, code),
                Ok((_, h3::Event::PriorityUpdate)) => {}
                Ok((id, h3::Event::GoAway)) => {
                    tracing::debug!(last_stream = id, "the server sent GOAWAY");
                    self.goaway = Some(id);
                    self.status.update(|s| s.goaway = true);
                    // Requests on streams from `id` on were not processed (RFC 9114 §5.2).
                    let refused: Vec<u64> = self.streams.keys().copied().filter(|&s| s >= id).collect();
                    for stream in refused {
                        self.on_reset(conn, stream, code::H3_REQUEST_REJECTED);
                    }
                }
                Err(h3::Error::Done) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 connection error");
                    if conn.local_error().is_none() {
                        let _ = conn.close(true, code::h3_wire_code(&e), b"");
                    }
                    return;
                }
            }
        }
    }

    /// Reads a response body from quiche; a body that breaks the rules ends its stream (or
    /// the connection, for a frame out of sequence).
    fn read_body(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        let shared = Arc::clone(&entry.shared);
        let h3 = self.h3.as_mut().expect("created when established");
        match shared.read_from(h3, conn, id) {
            Ok(true) => self.lists.read_again.push(id),
            Ok(false) => {}
            Err(failure) => self.on_read_failure(conn, id, failure),
        }
    }

    /// What a response body (or its trailers) that broke the rules costs: its stream, or the
    /// whole connection for a frame out of sequence (RFC 9114 §4.1).
    fn on_read_failure(&mut self, conn: &mut QuicheConnection, id: u64, failure: ReadFailure) {
        match failure {
            ReadFailure::Malformed(why) => self.refuse_response(conn, id, Malformed(why)),
            ReadFailure::FrameUnexpected => {
                if conn.local_error().is_none() {
                    let _ = conn.close(true, code::H3_FRAME_UNEXPECTED, b"");
                }
            }
            ReadFailure::Reset(code) => self.on_reset(conn, id, code),
            ReadFailure::Closed => self.abandon(conn, id, Cancel::ConnectionClosed, closed_error()),
        }
    }

    /// The server finished the response stream: a response must have come, and its body
    /// must be complete; else the response is malformed (RFC 9114 §4.1.2).
    fn on_finished(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        let complete = entry.shared.on_finished();
        let malformed = if entry.reply.is_some() {
            Some(Malformed("the response stream ended without a response"))
        } else {
            complete.err()
        };
        match malformed {
            Some(why) => self.refuse_response(conn, id, why),
            None => self.forget_if_done(conn, id),
        }
    }

    /// Refuses a malformed response, a stream error of type H3_MESSAGE_ERROR (RFC 9114
    /// §4.1.2); the caller is told why.
    fn refuse_response(&mut self, conn: &mut QuicheConnection, id: u64, why: Malformed) {
        let error = Error::new(Kind::Protocol)
            .with_stream_code(code::H3_MESSAGE_ERROR)
            .with_message(format!("malformed response: {why}"));
        self.abandon(conn, id, Cancel::Malformed(why.0), error);
    }

    /// Gives a stream up while the connection lives: the server is told of each direction
    /// still open (RFC 9114 §4.1.1), the response body's reader sees `why`, and a caller
    /// still waiting for the response gets `error`.
    fn abandon(&mut self, conn: &mut QuicheConnection, id: u64, why: Cancel, error: Error) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        entry.shared.abort(conn, id, why);
        entry.written = true;
        if let Some(reply) = entry.reply.take() {
            let _ = reply.send(Err(Failure::Failed(error)));
        }
        self.forget_if_done(conn, id);
    }

    fn on_headers(&mut self, conn: &mut QuicheConnection, id: u64, list: Vec<h3::Header>, more_frames: bool) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        if entry.reply.is_none() {
            // A second HEADERS frame: the response's trailers. An open tunnel's stream
            // carries only DATA (RFC 9114 §4.4: a connection error), as the server holds
            // its clients to.
            let read = if entry.tunnel_open {
                Err(ReadFailure::FrameUnexpected)
            } else {
                Arc::clone(&entry.shared).on_trailers(&list, self.settings.max_response_head as usize)
            };
            if let Err(failure) = read {
                self.on_read_failure(conn, id, failure);
            }
            return;
        }
        let mut response = match response_from_fields(&list) {
            Ok(response) => response,
            Err(why) => return self.refuse_response(conn, id, why),
        };
        if response.status() == http::StatusCode::TOO_EARLY
            && entry.early_data
            && let Some(mut request) = entry.retry.take()
        {
            // The server would not serve it in 0-RTT data (RFC 8470 §5.2): sent again
            // after the handshake, on whichever connection the pool gives it (never in
            // early data again).
            tracing::debug!(stream_id = id, "425 Too Early: the request is sent again");
            request.early_data = false;
            request.too_early = true;
            entry.written = true;
            let shared = Arc::clone(&entry.shared);
            let reply = entry.reply.take().expect("checked");
            shared.stop_receiving(conn, id, code::H3_REQUEST_CANCELLED);
            let error = rejected_error("the server would not serve the request in 0-RTT data (425 Too Early)");
            let _ = reply.send(Err(Failure::Unsent(request, error)));
            self.forget_if_done(conn, id);
            return;
        }
        if response.status().is_informational() {
            if entry.retry.as_ref().is_some_and(|r| r.replay.is_some()) {
                // The server has begun with it: a body is not sent twice on the word of a
                // refusal that follows (which RFC 9114 §4.1.1 does not allow anyway).
                entry.retry = None;
            }
            // 1xx: not the response; kept for those who ask, up to a bound a server cannot
            // grow (each head is bounded, their number is not).
            if entry.informational.len() < MAX_INFORMATIONAL {
                entry.informational.push(response);
            } else {
                tracing::debug!(stream_id = id, "more 1xx responses than kept; dropping");
            }
            return;
        }
        // A response without content (to HEAD, a 204, a 304) is held to none, whatever its
        // content-length says: DATA on it is malformed (RFC 9114 §4.1.2), as h2 resets it.
        let content_length = if fields::is_bodyless(entry.head_request, response.status()) {
            Some(0)
        } else if fields::forbids_content_length(entry.tunnel, response.status()) {
            // The tunnel's bytes, however many: a client must ignore the content-length of
            // a 2xx to CONNECT (RFC 9110 §8.6), which some servers send (`0`).
            None
        } else {
            fields::content_length(response.headers()).ok().flatten()
        };
        entry.shared.expect_content_length(content_length);
        entry.tunnel_open = entry.tunnel && response.status().is_success();
        if !more_frames && let Err(why) = entry.shared.on_finished() {
            // A head with FIN that promises a body: malformed, not an empty success.
            return self.refuse_response(conn, id, why);
        }
        if let Some(datagrams) = entry.datagrams.take() {
            let h3 = self.h3.as_ref().expect("created when established");
            // Also while the server's SETTINGS have not come (a response may overtake its
            // control stream): sends wait for them, as on the server.
            if PeerDatagrams::of(h3, conn) != PeerDatagrams::Disabled {
                datagrams.into_extensions(response.extensions_mut());
            } else if let Some(hub) = self.datagrams.as_mut() {
                hub.close(id);
            }
        }
        let informational = std::mem::take(&mut entry.informational);
        if !informational.is_empty() {
            response
                .extensions_mut()
                .insert(super::InformationalResponses(informational));
        }
        let body = if more_frames {
            RecvBody::new(Arc::clone(&entry.shared))
        } else {
            RecvBody::empty()
        };
        entry.retry = None;
        let reply = entry.reply.take().expect("checked");
        let _ = reply.send(Ok(response.map(|()| body)));
        self.forget_if_done(conn, id);
    }

    /// The server reset the response (or refused the request by GOAWAY): the request's
    /// unsent rest is reset too, not left for the server to wait on.
    fn on_reset(&mut self, conn: &mut QuicheConnection, id: u64, code: u64) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        entry.written = true;
        entry.shared.abort(conn, id, Cancel::PeerReset(code));
        if let Some(reply) = entry.reply.take() {
            let error = if code == code::H3_REQUEST_REJECTED {
                rejected_error("the server rejected the request before processing it (H3_REQUEST_REJECTED)")
            } else {
                Error::new(Kind::Reset)
                    .with_stream_code(code)
                    .with_message("the server reset the request stream")
            };
            let failure = match entry.retry.take() {
                Some(request) if code == code::H3_REQUEST_REJECTED => Failure::Unsent(request.rewound(), error),
                _ => Failure::Failed(error),
            };
            let _ = reply.send(Err(failure));
        }
        self.forget_if_done(conn, id);
    }

    /// Takes in, once the connection has closed, what quiche still holds of the responses:
    /// a server may close as soon as its last bytes are acknowledged (a graceful close does),
    /// before a slow caller has read them. Each body is taken whole into its buffer, past
    /// the buffer's limit; the connection's flow-control window bounds what quiche held, and
    /// the same bytes leave quiche with the connection. Responses that did not arrive whole
    /// fail as the connection closes.
    fn take_in_what_arrived(&mut self, conn: &mut QuicheConnection) {
        if self.h3.is_none() {
            return;
        }
        for entry in self.streams.values() {
            entry.shared.lift_recv_limit();
        }
        // Heads, trailers and ends already in quiche; Data events now read everything.
        self.poll_events(conn);
        let unread: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, entry)| entry.shared.wants_read())
            .map(|(&id, _)| id)
            .collect();
        for id in unread {
            self.read_body(conn, id);
        }
        // The frames behind an empty DATA frame (see `read_from`), a few times over; then
        // the ends the reads reached.
        for _ in 0..16 {
            self.poll_events(conn);
            let again = std::mem::take(&mut self.lists.read_again);
            if again.is_empty() {
                break;
            }
            for id in again {
                self.read_body(conn, id);
            }
        }
        self.poll_events(conn);
    }

    fn service_stream(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        let shared = Arc::clone(&entry.shared);
        shared.take_queued();
        if shared.reader_gone_early() {
            // The response body was dropped: stop the download (STOP_SENDING).
            shared.stop_receiving(conn, id, code::H3_REQUEST_CANCELLED);
        } else if shared.wants_read() {
            self.read_body(conn, id);
        }
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        // Also once the request is written: the caller may give up on the response.
        let h3 = self.h3.as_mut().expect("created when established");
        // Whether anything went out concerns only a server's stall timer.
        match shared.write_to(h3, conn, id, &mut false) {
            WriteOutcome::Pending => {}
            // The server stopped reading the request; its response still counts (RFC 9114
            // §4.1).
            WriteOutcome::Complete | WriteOutcome::Stopped => entry.written = true,
            WriteOutcome::Aborted => {
                entry.written = true;
                if let Some(reply) = entry.reply.take() {
                    // The caller gave up (nobody listens), or the server stopped the request.
                    let _ = reply.send(Err(Failure::Failed(
                        Error::new(Kind::Reset).with_message("the request stream was stopped"),
                    )));
                }
            }
        }
        self.forget_if_done(conn, id);
    }

    /// Forgets a stream once its request is written and its response fully received (or
    /// abandoned). A response body dropped unfinished is stopped here (STOP_SENDING): the
    /// reader can go away on another thread at any moment, also between this turn's look at
    /// the stream and now, and a forgotten stream's data would otherwise be read and
    /// discarded (granting the server credit) until the whole body had arrived.
    fn forget_if_done(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        // The response body's buffer lives on with its RecvBody; the connection only needs
        // to know that quiche has nothing more for this stream.
        let received = entry.shared.recv_settled();
        if !(entry.written && entry.reply.is_none() && received) {
            return;
        }
        if entry.shared.reader_gone_early() {
            entry.shared.stop_receiving(conn, id, code::H3_REQUEST_CANCELLED);
        }
        if !entry.shared.h3_saw_both_ends()
            && let Some(h3) = self.h3.as_mut()
        {
            self.h3_leftovers.forget_once_gone(h3, conn, id);
        }
        self.streams.remove(&id);
        if let Some(hub) = self.datagrams.as_mut() {
            hub.close(id);
        }
        self.status.update(|s| s.in_flight = s.in_flight.saturating_sub(1));
        if self.streams.is_empty() {
            self.idle_since = Some(Instant::now());
            self.pinged_at = None;
        }
    }

    /// How often a pooled connection with nothing in flight sends a PING: a third of the
    /// QUIC idle timeout in force (the shorter of ours and the server's), so that a PING or
    /// its acknowledgement may be lost once and the connection still lives.
    fn keepalive_interval(&self, conn: &QuicheConnection) -> Duration {
        let peer = conn
            .peer_transport_params()
            .map(|p| Duration::from_millis(p.max_idle_timeout))
            .filter(|d| !d.is_zero());
        let idle = peer.map_or(self.quic_idle_timeout, |p| p.min(self.quic_idle_timeout));
        (idle / 3).max(KEEPALIVE_MIN)
    }

    /// Keeps the connection alive while it is wanted, and closes a pooled one idle for
    /// longer than the pool keeps one. Wanted: while streams are open (a quiet tunnel may
    /// send nothing for minutes) and while it waits in the pool, whose idle timeout (90 s
    /// by default) is usually longer than QUIC's (30 s), which would otherwise end the
    /// connection first, silently. A PING elicits an acknowledgement: both sides' idle
    /// timers restart.
    fn poll_idle(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection, now: Instant) {
        let mut close_at = None;
        if let (Some(since), Some(timeout)) = (self.idle_since, self.settings.idle_timeout)
            && self.waiting.is_none()
            && self.awaiting_settings.is_empty()
        {
            if since + timeout > now {
                close_at = Some(since + timeout);
            } else if conn.is_established() {
                tracing::debug!("pooled connection idle for too long; closing");
                let _ = conn.close(true, code::H3_NO_ERROR, b"idle");
                return;
            }
            // Else a resumed connection still in its handshake (its early requests gone
            // over TCP): its connect deadline bounds it, and closing it now would pass for
            // a handshake that failed (the auto mode watches it). Closed once established.
        }
        if close_at.is_none() && self.streams.is_empty() {
            // Held outside a pool with nothing open: its holder decides how long it lives.
            return;
        }
        let interval = self.keepalive_interval(conn);
        let mut ping_at = self.pinged_at.or(self.idle_since).unwrap_or(now) + interval;
        if ping_at <= now {
            let _ = conn.send_ack_eliciting();
            self.pinged_at = Some(now);
            ping_at = now + interval;
            // Also the time to let go of what quiche's HTTP/3 layer keeps of streams the
            // transport has forgotten since (a pooled connection may idle for long).
            if let Some(h3) = self.h3.as_mut() {
                self.h3_leftovers.prune(h3, conn);
            }
        }
        let at = close_at.map_or(ping_at, |close_at| close_at.min(ping_at));
        if self.timer_at != Some(at) {
            self.timer.as_mut().reset(at.into());
            self.timer_at = Some(at);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }
}

/// A connection's task that ends without `on_closed` (it panicked: request bodies are
/// polled in it, and one may panic; or its runtime shut down) leaves nobody waiting on it:
/// readers of response bodies and tunnels get an error, and whoever waits for the
/// connection's readiness learns it is gone. After `on_closed` nothing is left to do.
impl Drop for ClientApp {
    fn drop(&mut self) {
        self.end_streams(closed_error);
    }
}

impl ClientApp {
    /// Marks the connection closed (waking whoever waits for its readiness), closes its
    /// datagram flows, and ends every stream: readers get an error, and a request still
    /// waiting for its response head fails with `why`.
    fn end_streams(&mut self, why: impl Fn() -> Error) {
        self.status.update(|s| s.closed = true);
        if let Some(hub) = self.datagrams.as_mut() {
            hub.close_all();
        }
        for (_, entry) in self.streams.drain() {
            entry.shared.cancel(Cancel::ConnectionClosed);
            if let Some(reply) = entry.reply {
                let _ = reply.send(Err(Failure::Failed(why())));
            }
        }
    }
}

impl stream::StreamOwner for ClientApp {
    fn poll_events(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        ClientApp::poll_events(self, conn);
        Ok(())
    }
    fn poll_tasks(&mut self, cx: &mut Context<'_>, _conn: &mut QuicheConnection) {
        while let Poll::Ready(Some(outcome)) = self.pumps.poll_next_unpin(cx) {
            // The caller learns that its own body failed, not that the server reset the
            // stream (the pump reset it).
            let Some((id, error)) = outcome else { continue };
            if let Some(reply) = self.streams.get_mut(&id).and_then(|entry| entry.reply.take()) {
                let _ = reply.send(Err(Failure::Failed(Error::body(error))));
            }
        }
    }
    fn notify(&self) -> &ConnNotify {
        &self.notify
    }
    fn round_lists(&mut self) -> &mut stream::RoundLists {
        &mut self.lists
    }
    fn is_tracked(&self, id: u64) -> bool {
        self.streams.contains_key(&id)
    }
    fn urgency(&self, id: u64) -> u8 {
        self.streams.get(&id).map_or(3, |e| e.shared.urgency())
    }
    fn service_stream(&mut self, conn: &mut QuicheConnection, id: u64) {
        ClientApp::service_stream(self, conn, id);
    }
}

impl ClientApp {
    /// Starts HTTP/3 on the connection: when the handshake completes, or before, when a
    /// resumed session lets safe requests go in 0-RTT data.
    fn start_h3(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        let mut config =
            h3::Config::new().map_err(|e| Error::config(format!("cannot create the HTTP/3 configuration: {e}")))?;
        config.set_max_field_section_size(self.settings.max_response_head);
        let h3 = h3::Connection::with_transport(conn, &config)
            .map_err(|e| Error::application(code::h3_wire_code(&e), format!("cannot start HTTP/3: {e}")))?;
        self.h3 = Some(h3);
        if let Some(hub) = &self.datagrams {
            hub.start(conn);
        }
        let credit = conn.peer_streams_left_bidi();
        self.credit_told = credit;
        let early = !conn.is_established();
        self.status.update(|s| {
            s.credit = credit;
            s.established = true;
            s.early_since = early.then(std::time::Instant::now);
        });
        Ok(())
    }
}

impl Application for ClientApp {
    fn accepts_early_data(&self) -> bool {
        self.early_data
    }

    fn on_early_data(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        self.start_h3(conn)
    }

    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        if self.h3.is_some() {
            // Started in early data; the server's limits may have changed with the
            // handshake (it can refuse the remembered ones).
            let credit = conn.peer_streams_left_bidi();
            self.credit_told = credit;
            self.status.update(|s| {
                s.credit = credit;
                s.early_since = None;
            });
            return Ok(());
        }
        self.start_h3(conn)
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error> {
        if self.h3.is_none() {
            return Ok(());
        }
        self.open_streams(cx, conn);
        stream::StreamOwner::run_rounds(self, cx, conn)?;
        if self.waiting.is_some() || !self.awaiting_settings.is_empty() {
            // What the rounds read may let them go now: the server's SETTINGS (an extended
            // CONNECT waits for them), or its GOAWAY (they are refused, to go elsewhere).
            // No turn follows to look again (`repeat_after_progress`).
            let opened = self.next_request_id;
            self.open_streams(cx, conn);
            if self.next_request_id != opened {
                // The rounds that poll a new stream's body have run: the next turn does.
                cx.waker().wake_by_ref();
            }
        }
        if let Some(hub) = self.datagrams.as_mut() {
            let peer = PeerDatagrams::of(self.h3.as_ref().expect("created when established"), conn);
            let unrouted = match hub.process(cx, conn, peer) {
                Ok(unrouted) => unrouted,
                Err(MalformedDatagram(why, code)) => {
                    tracing::debug!(reason = why, code, "malformed HTTP datagram: connection error");
                    if conn.local_error().is_none() {
                        let _ = conn.close(true, code, b"");
                    }
                    return Ok(());
                }
            };
            for id in unrouted {
                // RFC 9297 §2: a datagram for a request whose method defines none (not a
                // CONNECT) ends that request; one for a stream gone is dropped.
                if self.streams.get(&id).is_some_and(|entry| !entry.tunnel) {
                    tracing::debug!(stream_id = id, "an HTTP datagram on a request that takes none");
                    let error = Error::new(Kind::Protocol)
                        .with_stream_code(code::H3_DATAGRAM_ERROR)
                        .with_message("the server sent an HTTP datagram on a request that takes none");
                    self.abandon(conn, id, Cancel::StrayDatagram, error);
                }
            }
        }
        // Told only when it changes: every turn would take the lock for nothing.
        let credit = conn.peer_streams_left_bidi();
        if credit != self.credit_told {
            self.credit_told = credit;
            self.status.update(|s| s.credit = credit);
        }
        // Nobody can submit any more and nothing is in flight: done.
        if self.submissions.is_closed()
            && self.waiting.is_none()
            && self.awaiting_settings.is_empty()
            && self.streams.is_empty()
            && self.submissions.is_empty()
        {
            let _ = conn.close(true, code::H3_NO_ERROR, b"");
            return Ok(());
        }
        if self.goaway.is_some() && self.streams.is_empty() {
            let _ = conn.close(true, code::H3_NO_ERROR, b"");
            return Ok(());
        }
        let now = Instant::now();
        if let Some(silent) = self.path_watch.check(conn, now) {
            self.status.update(|s| s.silent = silent);
            if silent {
                tracing::debug!("no answer through several probe timeouts: not used for new requests");
                // Requests waiting for a stream here go elsewhere (`refusal`).
                self.open_streams(cx, conn);
            }
        }
        self.poll_idle(cx, conn, now);
        Ok(())
    }

    /// `process` acts on what each turn brings in the same call (see above) and the rounds
    /// wake the task when they stop with work left.
    fn repeat_after_progress(&self) -> bool {
        false
    }

    fn on_closed(&mut self, conn: &mut QuicheConnection, error: Option<&Error>) {
        self.status.update(|s| s.closed = true);
        self.take_in_what_arrived(conn);
        // A close the server chose (even with H3_NO_ERROR) keeps its code: it says the
        // server was reached, which a lost connection does not (`auto::lost_the_path`).
        let peer_code = conn.peer_error().map(crate::Code::of_close);
        let why = || {
            error.map(Error::duplicate).unwrap_or_else(|| match peer_code {
                Some(code) => closed_error().with_code(code),
                None => closed_error(),
            })
        };
        self.end_streams(why);
        for Submission { request, reply, .. } in self.waiting.take().into_iter().chain(self.awaiting_settings.drain(..))
        {
            let _ = reply.send(Err(Failure::Unsent(request, why())));
        }
        self.submissions.close();
        while let Ok(Submission { request, reply, .. }) = self.submissions.try_recv() {
            let _ = reply.send(Err(Failure::Unsent(request, why())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed connection's handshake, begun in 0-RTT data, ends in one of three ways for
    /// the auto mode's record: completed, failed (closed, or its path silent), or neither
    /// (the server going away says nothing of the path). It is not decided before then.
    #[tokio::test]
    async fn an_early_handshake_ends_completed_failed_or_neither() {
        type End = fn(&mut StatusInner);
        let cases: [(End, Option<bool>); 4] = [
            (|s| s.early_since = None, Some(true)),
            (|s| s.closed = true, Some(false)),
            (|s| s.silent = true, Some(false)),
            (|s| s.goaway = true, None),
        ];
        for (end, outcome) in cases {
            let status = Status::new();
            status.update(|s| {
                s.established = true;
                s.early_since = Some(Instant::now());
            });
            let woken = Arc::new(Counter(Default::default()));
            let waker = Waker::from(Arc::clone(&woken));
            let mut cx = Context::from_waker(&waker);
            let mut waiting = std::pin::pin!(status.early_handshake_outcome());
            assert!(
                waiting.as_mut().poll(&mut cx).is_pending(),
                "decided before the handshake ended"
            );
            status.update(end);
            assert_eq!(
                woken.0.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "the end wakes the waiter"
            );
            assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(outcome));
        }
    }

    /// A waker that counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A pool's reservation (`poll_reserve`) fails on a connection whose path is silent,
    /// where the public `poll_ready` waits (the path may come back); one made before the
    /// path went silent fails too, and its stream goes back with the handle; one waiting
    /// for credit is woken when the path goes silent.
    #[test]
    fn a_pools_reservation_fails_on_a_silent_connection() {
        let (submit, _submissions) = mpsc::channel(1);
        let status = Arc::new(Status::new());
        status.update(|s| {
            s.established = true;
            s.credit = 2;
        });
        let mut first = SendRequest {
            submit,
            status: Arc::clone(&status),
            notify: Arc::default(),
            settings: Arc::default(),
            reserved: false,
        };
        let woken = Arc::new(Counter(Default::default()));
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let (mut second, mut third) = (first.clone(), first.clone());
        // A reservation held throughout: a stream given back twice would show in `spare`.
        assert!(matches!(third.poll_reserve(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(first.poll_reserve(&mut cx), Poll::Ready(Ok(()))));
        assert!(second.poll_reserve(&mut cx).is_pending(), "no credit left");
        status.update(|s| s.silent = true);
        assert_eq!(
            woken.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "woken by the silence"
        );
        assert!(matches!(second.poll_reserve(&mut cx), Poll::Ready(Err(_))));
        assert!(
            matches!(first.poll_reserve(&mut cx), Poll::Ready(Err(_))),
            "reserved before"
        );
        drop(first);
        assert_eq!(status.spare(), 1, "its stream went back with the handle");
        assert!(
            second.poll_ready(&mut cx).is_pending(),
            "the public poll_ready waits, credit or not"
        );
        assert!(matches!(second.poll_reserve(&mut cx), Poll::Ready(Err(_))));
    }

    /// Four PTOs unanswered are not enough before a second has passed since the first,
    /// whenever the last packet came; a packet heard ends the silence and starts over.
    #[test]
    fn a_path_is_silent_after_four_unanswered_ptos_over_a_second_from_the_first() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = PathWatch::default();
        assert_eq!(watch.observe(10, 0, at(0)), None, "heard: nothing changes");
        // Quiet for a minute (a pooled connection), then a request goes unanswered.
        assert_eq!(watch.observe(10, 0, at(60_000)), None);
        assert_eq!(watch.observe(10, 1, at(60_030)), None, "the first PTO starts the count");
        assert_eq!(
            watch.observe(10, 4, at(60_400)),
            None,
            "four PTOs, but within the second"
        );
        assert_eq!(watch.observe(10, 5, at(61_029)), None);
        assert_eq!(
            watch.observe(10, 6, at(61_030)),
            Some(true),
            "a second since the first PTO"
        );
        assert_eq!(watch.observe(10, 7, at(62_000)), None, "told once");
        assert_eq!(watch.observe(11, 7, at(62_100)), Some(false), "heard again");
        assert_eq!(watch.observe(11, 8, at(62_200)), None, "counts from the last heard");
        assert_eq!(watch.observe(11, 10, at(63_300)), None, "three PTOs only");
        assert_eq!(watch.observe(11, 11, at(63_400)), Some(true));
    }
}
